"""Feature labels on an analysed run: wall time per feature, detection AUC vs shuffled labels.

Labels the top N live features of each exclusive block (A, then B) of an analysed run with a
local labeller (any `--model` xdiff can load: hub id, local dir, .gguf file), then prints:
- wall time per feature (explanation + detection scoring; the shuffled baseline after);
- mean detection AUC and balanced accuracy of the labels, and of the same held-out texts
  scored against another feature's label (the chance baseline, measured in the same process);
- five labels with their strongest examples (firing token in «»).

The run is copied first (the activation store is linked, not copied), so the original run is
never written to. Run:
    XDIFF_HOME=... python benchmarks/label.py --run ID --model path/to/model.gguf [--per-side 20]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from xdiff_cli.findings import label as lb
from xdiff_cli.findings.feature_index import FeatureIndex
from xdiff_cli.run.runs import Run, resolve_run


def copy_run(run: Run, target: Path) -> Run:
    """The run's record, crosscoder and analysis copied; its activation store symlinked."""
    target.mkdir(parents=True, exist_ok=True)
    for item in run.dir.iterdir():
        if item.name == "activations":
            (target / item.name).symlink_to(item.resolve())
        elif item.is_dir():
            shutil.copytree(item, target / item.name)
        elif item.name != "label_cache.sqlite":
            shutil.copy2(item, target / item.name)
    return Run.load(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="run id (default: newest analysed run)")
    parser.add_argument("--model", required=True, help="the local labeller (hub id, dir or .gguf)")
    parser.add_argument("--per-side", type=int, default=20, help="features labelled per exclusive block")
    parser.add_argument("--sides", default="a,b", help="partitions to label, in order (a, b, candidates, all)")
    parser.add_argument("--n-top", type=int, default=lb.LabelConfig.n_top)
    parser.add_argument("--n-quantile", type=int, default=lb.LabelConfig.n_quantile)
    parser.add_argument("--n-score", type=int, default=lb.LabelConfig.n_score)
    parser.add_argument("--max-new-tokens", type=int, default=lb.LabelConfig.max_new_tokens)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--examples", type=int, default=5, help="labels printed with their examples")
    parser.add_argument("--workdir", default=None, help="keep the run's copy here (resumable) instead of a temp dir")
    parser.add_argument("--out", default=None, help="also write every result as JSON to this file")
    parser.add_argument("--oracle", nargs=2, metavar=("LABEL", "CONTROL"), default=None,
                        help="instead of explaining: score a hand-written LABEL and a CONTROL label on the "
                             "held-out texts of the top --per-side B-exclusive features (checks the scorer)")
    args = parser.parse_args()
    if args.oracle:
        return oracle(args)

    source = resolve_run(args.run)
    with tempfile.TemporaryDirectory(prefix="xdiff-label-bench-") as tmp:
        # --workdir keeps the copy (labels and answer cache): a stopped benchmark resumes there.
        target = Path(args.workdir or tmp) / source.id
        run = Run.load(target) if (target / "run.json").is_file() else copy_run(source, target)
        started = time.perf_counter()
        backend = lb.make_backend(args.model, None, device=args.device, settings=run.settings)
        load_s = time.perf_counter() - started
        config = lb.LabelConfig(n_top=args.n_top, n_quantile=args.n_quantile, n_score=args.n_score,
                                max_new_tokens=args.max_new_tokens)
        print(f"run {source.id} ({source.dir}) · labeller {backend.name} (loaded in {load_s:.1f} s) · "
              f"device {args.device} · {config}", flush=True)
        features, side_of = [], {}
        for side in args.sides.split(","):
            chosen = lb.select_features(run.analysis_path, side, args.per_side)
            print(f"side {side}: {len(chosen)} live features (asked for {args.per_side})", flush=True)
            for f in chosen:
                if f[0] not in side_of:
                    side_of[f[0]] = side
                    features.append(f)
        evidence_s = [0.0]

        def evidence_for(todo):  # noqa: ANN001, ANN202
            t0 = time.perf_counter()
            out = lb.run_evidence(run, device=args.device, config=config)(todo)
            evidence_s[0] = time.perf_counter() - t0
            print(f"evidence for {len(todo)} features in {evidence_s[0]:.1f} s", flush=True)
            return out

        def on_feature(result, requests):  # noqa: ANN001, ANN202
            print(f"#{result.feature_id} ({side_of[result.feature_id]}) {result.status} in {result.seconds:.1f} s: "
                  f"{result.label!r} AUC {_f(result.auc)} on {len(result.scored)} texts; reply {result.reply!r}",
                  flush=True)

        t0 = time.perf_counter()
        summary = lb.label_features(run.analysis_path, lb.cache_path_for(run), backend, features,
                                    evidence_for, config, on_feature=on_feature)
        total_s = time.perf_counter() - t0
        results = {r.feature_id: r for r in summary.results}
        per_feature_s = sum(r.seconds for r in results.values())
        baseline_s = total_s - evidence_s[0] - per_feature_s

        index = FeatureIndex.open(run.analysis_path)
        print(f"\n{len(features)} features in {total_s:.0f} s: evidence {evidence_s[0]:.1f} s, label + score "
              f"{per_feature_s:.0f} s, shuffled baseline {baseline_s:.0f} s")
        print(f"{'side':10} {'features':>8} {'labelled':>8} {'s/feature':>9} {'AUC':>6} {'shuffled':>8} "
              f"{'bal.acc':>7} {'shuffled':>8}")
        for side in args.sides.split(","):
            mine = [r for f, r in results.items() if side_of[f] == side]
            labelled = [r for r in mine if r.status == "labelled"]
            n = max(1, len(mine))
            print(f"{side:10} {len(mine):8d} {len(labelled):8d} {sum(r.seconds for r in mine) / n:9.1f} "
                  f"{_f(lb._mean([r.auc for r in labelled])):>6} {_f(lb._mean([r.shuffled_auc for r in labelled])):>8} "
                  f"{_f(lb._mean([r.balanced_accuracy for r in labelled])):>7} "
                  f"{_f(lb._mean([r.shuffled_balanced_accuracy for r in labelled])):>8}")
        all_labelled = [r for r in results.values() if r.status == "labelled"]
        mean_auc = lb._mean([r.auc for r in all_labelled])
        mean_shuffled = lb._mean([r.shuffled_auc for r in all_labelled])
        print(f"all  {len(all_labelled)}/{len(results)} labelled; mean detection AUC {_f(mean_auc)} vs shuffled "
              f"{_f(mean_shuffled)} (difference "
              f"{_f(None if mean_auc is None or mean_shuffled is None else mean_auc - mean_shuffled)}); "
              f"wall time per feature {total_s / max(1, len(results)):.1f} s all in "
              f"({per_feature_s / max(1, len(results)):.1f} s label + score)")
        print(f"\n{args.examples} labels (highest AUC first) with their top examples:")
        for r in sorted(all_labelled, key=lambda r: -(r.auc or 0))[: args.examples]:
            feature = index.feature(r.feature_id)
            print(f"- #{r.feature_id} ({feature.partition.upper()}) «{r.label}» AUC {_f(r.auc)} "
                  f"(shuffled {_f(r.shuffled_auc)}): {r.description}")
            for e in feature.examples_for(feature.own_view)[:3]:
                text = (e.text[: e.start] + "«" + e.text[e.start : e.end] + "»" + e.text[e.end :]).replace("\n", " ")
                print(f"    {text[-90:]!r}")
        index.close()
        if args.out:
            Path(args.out).write_text(json.dumps({
                "run": source.id, "run_dir": str(source.dir), "model": backend.name, "config": str(config),
                "load_s": load_s, "evidence_s": evidence_s[0], "total_s": total_s, "baseline_s": baseline_s,
                "summary": summary.to_json(), "side_of": side_of,
                "replies": {r.feature_id: r.reply for r in results.values()},
            }, indent=1, ensure_ascii=False))


def oracle(args) -> None:  # noqa: ANN001 - argparse.Namespace
    """Detection AUC of a known-right label vs a known-wrong one (scorer check, no explainer)."""
    source = resolve_run(args.run)
    started = time.perf_counter()
    backend = lb.make_backend(args.model, None, device=args.device, settings=source.settings)
    load_s = time.perf_counter() - started
    config = lb.LabelConfig(n_score=args.n_score)
    features = lb.select_features(source.analysis_path, "b", args.per_side)
    evidence = lb.run_evidence(source, device=args.device, config=config)(features)
    label, control = args.oracle
    print(f"run {source.id} · scorer {backend.name} (loaded in {load_s:.1f} s) · oracle {label!r} vs control {control!r}")
    rows = []
    for feature_id, _ in features:
        ev = evidence[feature_id]
        scored = [(w.text, True) for w in ev.held_out] + [(w.text, False) for w in ev.negatives]
        t0 = time.perf_counter()
        right = lb.detection_scores(backend, label, "", scored)
        wrong = lb.detection_scores(backend, control, "", scored)
        seconds = time.perf_counter() - t0
        rows.append((right[0], wrong[0]))
        top = ev.explain[0]
        fired = [top.text[s:e] for s, e, a in top.token_acts if a > 0]
        print(f"#{feature_id}: {len(scored)} texts, AUC {_f(right[0])} (bal.acc {_f(right[1])}) vs control "
              f"{_f(wrong[0])} (bal.acc {_f(wrong[1])}); {seconds / max(1, 2 * len(scored)):.2f} s per scored text; "
              f"top tokens {fired[:4]}")
    print(f"mean AUC {_f(lb._mean([r for r, _ in rows]))} vs control {_f(lb._mean([w for _, w in rows]))}")


def _f(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
