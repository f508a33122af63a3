"""Discovery on planted pairs: do the planted differences come out, on the right side?

Two offline pairs (xdiff_cli/models/tiny.py):
- `ctx`  (default): llama-ctx (A) vs qwen3-ctx (B) on a contextual corpus. Five planted
  concepts: topic_a (carried forward by an attention head of A only), topic_b (B only),
  animals (a B-only direction on animal tokens), topic_shared and colors (both models).
- `tiny`: the tiny demo pair (llama vs qwen3 on builtin:smoke), animals (B) and colors.

For each arch (DFC, standard crosscoder), seed and training recipe it trains on one harvest,
analyses the held-out split and prints:
- dead_a / dead_b / dead_sh: features that never fire on held-out text, per block;
- fve: eval fraction of variance explained (mean of A and B);
- blk: exclusive concepts matched by a live feature of the right exclusive block (DFC);
- R: exclusive concepts matched by a shared feature with R on the right side (> 0.8 for A,
  < 0.2 for B); any: either;
- wrong: exclusive concepts matched by a feature called exclusive to the *other* model;
- shFP: shared concepts matched by a feature called exclusive (block or R);
- p5a / p5b: precision of the top 5 A-side / B-side candidates of the default ranking
  (exclusive block or R), i.e. the share matching a planted concept of that side.
- v_*: the same after `xdiff verify` (what `xdiff run` reports): a feature is called for a
  side when its verdict is `exclusive` and that side's model predicts it (any block), and
  the top 5 come from the verified ranking.

A feature *matches* a concept when >= 60% of its held-out firing mass lies on the concept's
positions and it fires there at least 10 times. A topic's positions are those after its
first trigger word (the trigger token itself is not one: a feature for the word is not a
feature for the topic); a token concept's are its words' tokens.

Recipes: `before` = xdiff 0.1 (squared loss, per-model AuxK at 0.03, plain init, the
harvest's scalar normalisation, lr 1e-3); `loss-fix` = the first pass at #19 (the paper code's
unsquared L2 loss and joint AuxK, balanced exclusive init, AuxK 0.3; scalar normalisation,
lr 1e-3); `after` = the current defaults (each model's residual centred and scaled, AuxK
1.0, lr 4e-3 as in presets/tiny.toml); `--sweep` adds the other candidates measured.
Run: `python benchmarks/discovery.py [--pair ctx|tiny] [--seeds 0 1] [--sweep]` (default
size: a few minutes on 2 cores; 1 torch thread, which is faster than 2 on a shared box).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

MATCH_SHARE, MATCH_MIN_FIRES = 0.6, 10
SIDE_OF = {"topic_a": "a", "topic_b": "b", "animals": "b", "topic_shared": None, "colors": None}

# name -> TrainConfig overrides (and crosscoder overrides under "cc")
RECIPES: dict[str, dict] = {
    "before": {  # xdiff 0.1
        "recon_loss": "mse", "aux_form": "per_model", "aux_coef": 0.03, "normalisation": "store",
        "lr_mult": 0.25, "cc": {"balance_exclusive_init": False},
    },
    # The first pass at #19: the paper code's loss, balanced init, AuxK 0.3, the harvest's scalar
    # normalisation and the old learning rate.
    "loss-fix": {"aux_coef": 0.3, "normalisation": "store", "lr_mult": 0.25},
    "after": {},  # the current defaults: + centred normalisation, AuxK 1.0, the presets' 4x rate
}
SWEEP: dict[str, dict] = {
    "l2+joint": {"aux_coef": 0.03, "cc": {"balance_exclusive_init": False}},
    "l2+joint+bal": {"aux_coef": 0.03},
    "mse+joint+bal": {"recon_loss": "mse", "aux_form": "joint"},
    "l2+per_model+bal": {"recon_loss": "l2", "aux_form": "per_model"},
    "after,k_start=4k": {"k_start_mult": 4},
    "after,window/4": {"dead_window_div": 4},
    "after,lr/3": {"lr_mult": 1 / 3},
    "after,lr/2": {"lr_mult": 0.5},
    "after,uncentred": {"normalisation": "store"},
    "after,aux=0.3": {"aux_coef": 0.3},
    "after,aux=0.03": {"aux_coef": 0.03},
    "before,aux=0.3": {"recon_loss": "mse", "aux_form": "per_model", "aux_coef": 0.3, "cc": {"balance_exclusive_init": False}},
}


@dataclasses.dataclass
class PairSpec:
    models: tuple[str, str]
    concepts: tuple[str, ...]
    tokens: int
    dict_size: int
    k: int
    steps: int
    batch_size: int
    lr: float
    exclusive_frac: float = 0.1


PAIRS = {
    "ctx": PairSpec(("llama-ctx", "qwen3-ctx"), tuple(SIDE_OF), 32_000, 512, 16, 1000, 256, 4e-3),
    "tiny": PairSpec(("llama", "qwen3"), ("animals", "colors"), 20_000, 256, 16, 800, 256, 4e-3),  # presets/tiny.toml
}


# --- data ----------------------------------------------------------------------------------


def harvest_pair(pair: str, spec: PairSpec, root: Path):  # noqa: ANN201
    """Build the pair, write its corpus, harvest once (reused across runs of this script)."""
    from xdiff_cli.data.harvest import harvest_run
    from xdiff_cli.data.store import ActivationStore
    from xdiff_cli.models.loading import load_model
    from xdiff_cli.models.tiny import build_tiny_models, write_contextual_corpus_jsonl, write_corpus_jsonl
    from xdiff_cli.run.runs import Run, list_runs
    from xdiff_cli.run.settings import RunSettings

    os.environ["XDIFF_HOME"] = str(root / "home")
    os.environ["HF_HUB_OFFLINE"] = "1"
    paths = build_tiny_models(root / "models", names=spec.models)
    if pair == "ctx":
        corpus = write_contextual_corpus_jsonl(root / "ctx.jsonl", n_docs=4000, seed=0)
    else:
        corpus = write_corpus_jsonl(root / "tiny.jsonl", n_docs=1500, n_chats=300, seed=0)
    name = f"bench-{pair}-{spec.tokens}"
    for run in list_runs():
        if run.id == name and run.stage_done("harvest"):
            return ActivationStore.open(run.store_dir), paths
    settings = RunSettings(
        model_a=str(paths[spec.models[0]]), model_b=str(paths[spec.models[1]]), corpus=str(corpus),
        tokens=spec.tokens, context_length=128, harvest_batch_size=16, eval_fraction=0.25, dict_size=spec.dict_size,
        k=spec.k, quant="none", device="cpu",
    ).validate()
    run = Run.create(settings, name=name)
    model_a = load_model(paths[spec.models[0]], device="cpu")
    model_b = load_model(paths[spec.models[1]], device="cpu")
    harvest_run(run, model_a, model_b, progress=False)
    run.mark_stage("harvest", "done")
    return ActivationStore.open(run.store_dir), paths


def concept_labels(store, split, concepts) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Per held-out token pair, whether it lies on each planted concept."""
    from xdiff_cli.models.tiny import ANIMALS, COLORS, CONTEXTUAL, topic_spans

    words = {"animals": set(ANIMALS), "colors": set(COLORS)}
    labels = {c: [] for c in concepts}
    for i in range(split.num_shards):
        shard = split.load_shard(i)
        for doc, sa, sb, e in zip(*(t.tolist() for t in (shard.doc_id, shard.start_a, shard.start_b, shard.end)), strict=True):
            text = store.document_text(doc)
            token = text[min(sa, sb) : e].strip().lower()
            for c in concepts:
                if c in words:
                    labels[c].append(token in words[c])
                else:
                    spans = topic_spans(text, CONTEXTUAL[c])
                    labels[c].append(any(min(sa, sb) >= start and text[start:min(sa, sb)].strip() for start, _ in spans))
    return {c: torch.tensor(v) for c, v in labels.items()}


@torch.no_grad()
def firing_mass(crosscoder, split, labels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:  # noqa: ANN001
    """Total held-out activation mass per feature, the part on each concept, and fire counts on it."""
    F = crosscoder.cfg.dict_size
    total = torch.zeros(F, dtype=torch.float64)
    on = {c: torch.zeros(F, dtype=torch.float64) for c in labels}
    fires_on = {c: torch.zeros(F) for c in labels}
    row = 0
    for i in range(split.num_shards):
        shard = split.load_shard(i)
        x_a, x_b = crosscoder.normalise(shard.acts_a, shard.acts_b)
        f = crosscoder.encode(x_a, x_b).double()
        n = f.shape[0]
        total += f.sum(0)
        for c, lab in labels.items():
            mask = lab[row : row + n]
            on[c] += f[mask].sum(0)
            fires_on[c] += (f[mask] > 0).sum(0)
        row += n
    return total, on, fires_on


# --- scoring -------------------------------------------------------------------------------


def called_by_partition(f: dict) -> str | None:
    """The side the analysis reports a feature for, if any: its exclusive block, or R."""
    if f["n_fires"] == 0:
        return None
    if f["partition"] in ("a", "b"):
        return f["partition"]
    return "a" if f["rel_norm"] > 0.8 else "b" if f["rel_norm"] < 0.2 else None


def called_by_verdict(f: dict) -> str | None:
    """The side `xdiff verify` reports a feature for: verdict exclusive, on the model that predicts it."""
    return f["probe_side"] if f.get("verdict") == "exclusive" else None


def score(features: list[dict], total, on, fires_on, called=called_by_partition) -> dict:  # noqa: ANN001
    """Discovery metrics for one analysed crosscoder (features as `xdiff features --json`)."""

    matches: dict[int, set[str]] = {}
    for f in features:
        i = f["id"]
        if total[i] <= 0:
            continue
        matches[i] = {c for c in on if on[c][i] / total[i] >= MATCH_SHARE and fires_on[c][i] >= MATCH_MIN_FIRES}
    exclusive = [c for c in on if SIDE_OF[c]]
    shared = [c for c in on if not SIDE_OF[c]]
    by_id = {f["id"]: f for f in features}

    def found(c: str, pred) -> bool:  # noqa: ANN001
        return any(c in m and pred(by_id[i]) for i, m in matches.items())

    out = {}
    for name, block in (("a", "a"), ("b", "b"), ("sh", "shared")):
        feats = [f for f in features if f["partition"] == block]
        if feats:
            out[f"dead_{name}"] = sum(f["n_fires"] == 0 for f in feats) / len(feats)
    out["blk"] = sum(found(c, lambda f, c=c: f["partition"] == SIDE_OF[c]) for c in exclusive)
    out["R"] = sum(found(c, lambda f, c=c: f["partition"] == "shared" and called(f) == SIDE_OF[c]) for c in exclusive)
    out["any"] = sum(found(c, lambda f, c=c: called(f) == SIDE_OF[c]) for c in exclusive)
    out["wrong"] = sum(found(c, lambda f, c=c: called(f) not in (None, SIDE_OF[c])) for c in exclusive)
    out["shFP"] = sum(found(c, lambda f: called(f) is not None) for c in shared)
    out["n_excl"] = len(exclusive)
    for side in ("a", "b"):
        wanted = {c for c in exclusive if SIDE_OF[c] == side}
        if not wanted:
            continue
        ranked = sorted((f for f in features if called(f) == side), key=lambda f: f["rank"])[:5]
        hits = sum(bool(matches.get(f["id"], set()) & wanted) for f in ranked)
        out[f"p5{side}"] = hits / max(1, len(ranked))
    return out


def train_and_score(store, split_labels, spec: PairSpec, arch: str, seed: int, recipe: dict, workdir: Path) -> dict:  # noqa: ANN001
    from xdiff_cli.dfc.crosscoder import Crosscoder, CrosscoderConfig
    from xdiff_cli.dfc.training import TrainConfig, train
    from xdiff_cli.findings.analysis import AnalysisConfig, analyze
    from xdiff_cli.findings.feature_index import FeatureIndex

    recipe = dict(recipe)
    cc_extra = recipe.pop("cc", {})
    k_start_mult = recipe.pop("k_start_mult", None)
    window_div = recipe.pop("dead_window_div", None)
    lr = spec.lr * recipe.pop("lr_mult", 1.0)
    source = store.split("train")
    cc = CrosscoderConfig(
        d_a=source.d_a, d_b=source.d_b, dict_size=spec.dict_size, k=spec.k, exclusive_frac=spec.exclusive_frac, arch=arch,
        **cc_extra,
    )
    tc = TrainConfig(steps=spec.steps, batch_size=spec.batch_size, lr=lr, seed=seed, device="cpu",
                     log_every=max(1, spec.steps // 10), checkpoint_every=spec.steps, **recipe)
    if k_start_mult:
        tc.k_start = spec.k * k_start_mult
        tc.k_anneal_steps = spec.steps // 4
    if window_div:
        tc.dead_window_tokens = tc.dead_window() // window_div
    import hashlib

    # The resolved configs, not the recipe: a changed default must not reuse an old model.
    key = json.dumps([dataclasses.asdict(tc), dataclasses.asdict(cc), dataclasses.asdict(spec)], sort_keys=True)
    out_dir = workdir / f"{arch}-{seed}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    started = time.perf_counter()
    result = train(source, cc, tc, out_dir, progress=False)
    train_s = time.perf_counter() - started
    model = Crosscoder.load(result.final_dir)
    eval_split = store.split("eval")
    db = analyze(model, eval_split, store, out_dir / "analysis.sqlite", config=AnalysisConfig(top_k=10))
    index = FeatureIndex.open(db)
    try:
        features = [dataclasses.asdict(f) for f in index.features()]
        summary = index.meta["summary"]
    finally:
        index.close()
    total, on, fires_on = firing_mass(model, eval_split, split_labels)
    row = score(features, total, on, fires_on)
    row["fve"] = (summary["eval_fve_a"] + summary["eval_fve_b"]) / 2
    # The product's own answer: `xdiff run` verifies, and the verified ranking is the default.
    from xdiff_cli.findings.verify import verify

    verify(model, source, eval_split, out_dir / "analysis.sqlite", documents=store)
    index = FeatureIndex.open(out_dir / "analysis.sqlite")
    try:
        verified = [dataclasses.asdict(f) for f in index.features()]
    finally:
        index.close()
    after = score(verified, total, on, fires_on, called=called_by_verdict)
    row.update({f"v_{key}": after.get(key) for key in ("any", "wrong", "shFP", "p5a", "p5b")})
    row["train_s"] = round(train_s, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="ctx")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--archs", nargs="+", default=["dfc", "crosscoder"])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), help=f"of {list(RECIPES) + list(SWEEP)}")
    parser.add_argument("--sweep", action="store_true", help="add every recipe of SWEEP (DFC only)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "xdiff-discovery-bench")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    spec = PAIRS[args.pair]
    spec = dataclasses.replace(spec, steps=args.steps or spec.steps, tokens=args.tokens or spec.tokens)
    recipes = {**RECIPES, **SWEEP}
    chosen = list(args.recipes) + (list(SWEEP) if args.sweep else [])
    started = time.perf_counter()
    store, _ = harvest_pair(args.pair, spec, args.workdir / args.pair)
    print(f"pair {args.pair}: {store.split('train').n_tokens} train / {store.split('eval').n_tokens} eval pairs, "
          f"dict {spec.dict_size}, k {spec.k}, {spec.steps} steps x {spec.batch_size} (harvest/load "
          f"{time.perf_counter() - started:.0f} s)", flush=True)
    labels = concept_labels(store, store.split("eval"), spec.concepts)
    print("concept positions in eval: " + ", ".join(f"{c} {int(v.sum())}" for c, v in labels.items()), flush=True)
    cols = ("dead_a", "dead_b", "dead_sh", "fve", "blk", "R", "any", "wrong", "shFP", "p5a", "p5b",
            "v_any", "v_wrong", "v_shFP", "v_p5a", "v_p5b", "train_s")
    print(f"{'arch':10} {'recipe':18} {'seed':>4} " + " ".join(f"{c:>7}" for c in cols), flush=True)
    rows = []
    for recipe_name in chosen:
        for arch in args.archs:
            if arch == "crosscoder" and recipe_name in SWEEP:
                continue
            for seed in args.seeds:
                row = train_and_score(store, labels, spec, arch, seed, recipes[recipe_name], args.workdir / args.pair / "runs")
                row.update(arch=arch, recipe=recipe_name, seed=seed)
                rows.append(row)
                cells = []
                for c in cols:
                    v = row.get(c)
                    cells.append(f"{'-':>7}" if v is None else f"{v:7.3f}" if isinstance(v, float) else f"{v:>7}")
                print(f"{arch:10} {recipe_name:18} {seed:>4} " + " ".join(cells), flush=True)
    print(f"(blk/R/any/wrong out of {rows[0]['n_excl']} exclusive concepts; shFP out of "
          f"{len(spec.concepts) - rows[0]['n_excl']} shared; total {time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
