"""Verify on the tiny demo pair: verdicts for the planted concepts, null control, cost vs analyse.

Runs (or resumes) `xdiff run --preset tiny` under XDIFF_HOME (default: a fresh temp dir),
then, in this process:
- analyse : the analyse stage again (`analyze_run(force=True)`), the baseline;
- verify  : the transfer probe on every live feature (`verify_run(force=True)`);
- null    : `verify --null` — trains the same config on A vs A (same text, seed + 1),
            analyses and probes it, and re-verifies the run with its thresholds
            (timed apart: it is a second training run, not part of the probe's budget).
Prints verify/analyse (goal ≤ 1.5), the verdict counts per block, the verdicts of the
features whose top examples are mostly animal words (the planted B-exclusive concept) and of
exclusive-block features whose top examples are mostly colour words (planted as shared),
and the null run's false-positive count.

Run: `python benchmarks/verify.py [--home DIR] [--preset tiny] [--no-null]`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def concept_share(feature: dict, words: tuple[str, ...]) -> float:
    fired = [e["text"][e["start"] : e["end"]].strip().lower() for e in feature["examples"]]
    return sum(w in words for w in fired) / max(1, len(fired))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", default=None, help="XDIFF_HOME to use (reused: the run resumes)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--name", default="bench-verify")
    parser.add_argument("--no-null", action="store_true")
    args = parser.parse_args()
    os.environ["XDIFF_HOME"] = args.home or tempfile.mkdtemp(prefix="xdiff-bench-verify-")

    from typer.testing import CliRunner

    from xdiff_cli.analysis import analyze_run
    from xdiff_cli.cli import app
    from xdiff_cli.feature_index import FeatureIndex
    from xdiff_cli.runs import resolve_run
    from xdiff_cli.tiny import ANIMALS, COLORS
    from xdiff_cli.verify import verify_run

    started = time.perf_counter()
    result = CliRunner().invoke(app, ["run", "--preset", args.preset, "--name", args.name])
    if result.exit_code != 0:
        raise SystemExit(result.output)
    print(f"pipeline (pull→analyse, or resume): {time.perf_counter() - started:.1f} s  XDIFF_HOME={os.environ['XDIFF_HOME']}")
    run = resolve_run(args.name)

    start = time.perf_counter()
    analyze_run(run, progress=False, force=True)
    analyse_s = time.perf_counter() - start
    start = time.perf_counter()
    meta = verify_run(run, progress=False, force=True)
    verify_s = time.perf_counter() - start
    print(f"analyse: {analyse_s:.2f} s   verify (probe fit + score + write): {verify_s:.2f} s   "
          f"ratio verify/analyse: {verify_s / analyse_s:.2f}   (probe seconds {meta['seconds']})")
    print(f"probed {meta['n_probed']} live features on {meta['n_train_tokens']:,} train / "
          f"{meta['n_eval_tokens']:,} held-out tokens")

    if not args.no_null:
        start = time.perf_counter()
        meta = verify_run(run, progress=False, null=True)
        print(f"null control (train A vs A + analyse + probe + re-verify): {time.perf_counter() - start:.1f} s")
        print(f"null false positives: {meta['false_positives']}")
        print(f"thresholds: {meta['thresholds']}")

    for part in ("a", "b", "shared"):
        print(f"verdicts {part:>6}: {meta['counts'][part]}")
    print(f"differences found in the shared block: {meta['found_in_shared']}")

    index = FeatureIndex.open(run.analysis_path)
    rows = []
    for f in index.features(alive_only=True):
        f.examples = index.examples(f.id, view=f.own_view, limit=20)
        rows.append(f.to_json(n_examples=20))
    index.close()
    animal = [f for f in rows if concept_share(f, ANIMALS) >= 0.5]
    colour_ex = [f for f in rows if f["partition"] in ("a", "b") and concept_share(f, COLORS) >= 0.5]
    print(f"animal features (≥ 50% of top examples on animal words): {len(animal)}")
    for f in animal:
        print(f"  #{f['id']:<5} {f['partition']:>6} rank {f['rank']:<4} {f['verdict']:<10} {f['verdict_reason']}")
    print(f"exclusive-block colour features: {len(colour_ex)}")
    for f in colour_ex:
        print(f"  #{f['id']:<5} {f['partition']:>6} rank {f['rank']:<4} {f['verdict']:<10} {f['verdict_reason']}")
    print("top 5 of the default ranking:")
    for f in rows[:5]:
        words = sorted({e["text"][e["start"]:e["end"]].strip().lower() for e in f["examples"]})[:6]
        print(f"  #{f['id']:<5} {f['partition']:>6} {str(f['verdict']):<10} {words}")


if __name__ == "__main__":
    main()
