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
    parser.add_argument("--n-score", type=int, default=lb.LabelConfig.n_score)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--examples", type=int, default=5, help="labels printed with their examples")
    parser.add_argument("--oracle", nargs=2, metavar=("LABEL", "CONTROL"), default=None,
                        help="instead of explaining: score a hand-written LABEL and a CONTROL label on the "
                             "held-out texts of the top --per-side B-exclusive features (checks the scorer)")
    args = parser.parse_args()
    if args.oracle:
        return oracle(args)

    source = resolve_run(args.run)
    with tempfile.TemporaryDirectory(prefix="xdiff-label-bench-") as tmp:
        run = copy_run(source, Path(tmp) / source.id)
        started = time.perf_counter()
        backend = lb.make_backend(args.model, None, device=args.device, settings=run.settings)
        load_s = time.perf_counter() - started
        config = lb.LabelConfig(n_score=args.n_score)
        summaries = []
        for side in ("a", "b"):
            features = lb.select_features(run.analysis_path, side, args.per_side)
            evidence_s = [0.0]

            def evidence_for(todo, evidence_s=evidence_s):  # noqa: ANN001, ANN202
                t0 = time.perf_counter()
                out = lb.run_evidence(run, device=args.device, config=config)(todo)
                evidence_s[0] = time.perf_counter() - t0
                return out

            t0 = time.perf_counter()
            summary = lb.label_features(run.analysis_path, lb.cache_path_for(run), backend, features,
                                        evidence_for, config)
            summaries.append((side, summary, time.perf_counter() - t0, evidence_s[0]))

        index = FeatureIndex.open(run.analysis_path)
        print(f"run {source.id} · labeller {backend.name} (loaded in {load_s:.1f} s) · device {args.device}")
        print(f"{'side':4} {'features':>8} {'labelled':>8} {'s/feature':>9} {'evidence s':>10} "
              f"{'AUC':>6} {'shuffled':>8} {'bal.acc':>7} {'shuffled':>8}")
        # The shuffled baseline is refreshed over every label at the end of each call: read it now.
        final = {r.feature_id: r for r in lb.LabelStore(run.analysis_path).results(backend.name)}
        all_labelled = []
        for side, summary, seconds, evidence in summaries:
            results = [final[r.feature_id] for r in summary.results]
            labelled = [r for r in results if r.status == "labelled"]
            all_labelled += labelled
            n = max(1, len(results))
            print(f"{side:4} {len(results):8d} {len(labelled):8d} {seconds / n:9.1f} {evidence:10.1f} "
                  f"{_f(lb._mean([r.auc for r in labelled])):>6} {_f(lb._mean([r.shuffled_auc for r in labelled])):>8} "
                  f"{_f(lb._mean([r.balanced_accuracy for r in labelled])):>7} "
                  f"{_f(lb._mean([r.shuffled_balanced_accuracy for r in labelled])):>8}")
        mean_auc = lb._mean([r.auc for r in all_labelled])
        mean_shuffled = lb._mean([r.shuffled_auc for r in all_labelled])
        print(f"all  mean detection AUC {_f(mean_auc)} vs shuffled {_f(mean_shuffled)} "
              f"(difference {_f(None if mean_auc is None or mean_shuffled is None else mean_auc - mean_shuffled)})")
        print(f"\n{args.examples} labels (highest AUC first) with their top examples:")
        for r in sorted(all_labelled, key=lambda r: -(r.auc or 0))[: args.examples]:
            feature = index.feature(r.feature_id)
            print(f"- #{r.feature_id} ({feature.partition.upper()}) «{r.label}» AUC {_f(r.auc)} "
                  f"(shuffled {_f(r.shuffled_auc)}): {r.description}")
            for e in feature.examples_for(feature.own_view)[:3]:
                text = (e.text[: e.start] + "«" + e.text[e.start : e.end] + "»" + e.text[e.end :]).replace("\n", " ")
                print(f"    {text[-90:]!r}")
        index.close()


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
