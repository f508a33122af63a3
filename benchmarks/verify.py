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

`--synthetic` times only analyse vs verify at a larger scale, on the random split of
benchmarks/analysis.py (train and eval splits of --tokens each, dict --dict, width --width):
`python benchmarks/verify.py --synthetic [--tokens 50000] [--dict 8192] [--width 256]`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def concept_share(feature: dict, words: tuple[str, ...]) -> float:
    fired = [e["text"][e["start"] : e["end"]].strip().lower() for e in feature["examples"]]
    return sum(w in words for w in fired) / max(1, len(fired))


def synthetic(tokens: int, dict_size: int, width: int, k: int = 32) -> None:
    import importlib.util
    from pathlib import Path

    import torch

    from xdiff_cli.dfc.crosscoder import Crosscoder, CrosscoderConfig
    from xdiff_cli.findings.analysis import AnalysisConfig, analyze
    from xdiff_cli.findings.verify import VerifyConfig, verify

    spec = importlib.util.spec_from_file_location("bench_analysis", Path(__file__).with_name("analysis.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    eval_split, train_split = bench.SyntheticSplit(tokens, width, seed=0), bench.SyntheticSplit(tokens, width, seed=1)
    torch.manual_seed(0)
    cc = Crosscoder(CrosscoderConfig(d_a=width, d_b=width, dict_size=dict_size, k=k))
    with torch.no_grad():  # a threshold that keeps about k features per token
        x = eval_split.shards[0]
        scores = cc.ranking_scores(cc.pre_activations(x.acts_a[:1024], x.acts_b[:1024]))
        cc.threshold.fill_(float(scores.flatten().kthvalue(scores.numel() - k * 1024).values))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.sqlite"
        start = time.perf_counter()
        analyze(cc, eval_split, eval_split, path, config=AnalysisConfig(top_k=20))
        analyse_s = time.perf_counter() - start
        start = time.perf_counter()
        summary = verify(cc, train_split, eval_split, path, config=VerifyConfig(max_train_tokens=tokens))
        verify_s = time.perf_counter() - start
    print(f"synthetic: tokens {tokens:,} (train and eval)  dict {dict_size:,}  width {width}  k {k}  "
          f"probed {summary.n_probed:,} live features")
    print(f"analyse: {analyse_s:.2f} s   verify: {verify_s:.2f} s (fit {summary.seconds.get('fit')} s, "
          f"score {summary.seconds.get('score')} s)   ratio verify/analyse: {verify_s / analyse_s:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--tokens", type=int, default=50_000)
    parser.add_argument("--dict", type=int, default=8192)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--home", default=None, help="XDIFF_HOME to use (reused: the run resumes)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--name", default="bench-verify")
    parser.add_argument("--no-null", action="store_true")
    args = parser.parse_args()
    if args.synthetic:
        synthetic(args.tokens, args.dict, args.width)
        return
    os.environ["XDIFF_HOME"] = args.home or tempfile.mkdtemp(prefix="xdiff-bench-verify-")

    from typer.testing import CliRunner

    from xdiff_cli.cli import app
    from xdiff_cli.findings.analysis import analyze_run
    from xdiff_cli.findings.feature_index import FeatureIndex
    from xdiff_cli.findings.verify import verify_run
    from xdiff_cli.models.tiny import ANIMALS, COLORS
    from xdiff_cli.run.runs import resolve_run

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
        print(f"  #{f['id']:<5} {f['partition']:>6} rank {f['rank']:<4} {str(f['verdict']):<10} {f['verdict_reason']}")
    print(f"exclusive-block colour features: {len(colour_ex)}")
    for f in colour_ex:
        print(f"  #{f['id']:<5} {f['partition']:>6} rank {f['rank']:<4} {str(f['verdict']):<10} {f['verdict_reason']}")
    found = [f for f in rows if f.get("found_in_shared")]
    for side in ("a", "b"):
        mine = [f for f in found if f["verdict_reason"].startswith(f"found in the shared block: {side.upper()} ")]
        n_animal = sum(concept_share(f, ANIMALS) >= 0.3 for f in mine)
        print(f"found in the shared block, {side.upper()} encodes it: {len(mine)} "
              f"({n_animal} with >= 30% of top examples on animal words)")
    print("top 5 of the default ranking:")
    for f in rows[:5]:
        words = sorted({e["text"][e["start"]:e["end"]].strip().lower() for e in f["examples"]})[:6]
        print(f"  #{f['id']:<5} {f['partition']:>6} {str(f['verdict']):<10} {words}")


if __name__ == "__main__":
    main()
