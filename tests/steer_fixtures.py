"""A run that can be steered, built in a second, without harvesting or training.

`make_steerable_run(tiny_models, tmp_path)` gives a `Run` whose models are the tiny Llama
(A, d=64) and tiny Qwen3 (B, d=48), with a crosscoder of deterministic random weights in
`crosscoder/final`, an `analysis.sqlite` giving every feature a known s_max, and an
activation-store manifest naming the layers. Reused by the TUI's steered-chat tests.

Feature layout (dict_size 64, exclusive_frac 0.1 → 6 per exclusive block):
A-exclusive 0..5, B-exclusive 6..11, shared 12..63. s_max of feature i is 1 + i / 8.
"""

from __future__ import annotations

import json
from pathlib import Path

STEER_LAYER_A = 1
STEER_LAYER_B = 2
SCALE_A = 0.5  # raw × scale = normalised
SCALE_B = 2.0


def s_max_of(feature: int) -> float:
    return 1.0 + feature / 8


def _feature_row(feature: int, partition: str) -> dict:
    return {
        "id": feature, "partition": partition, "frequency": 0.01, "n_fires": 10,
        "mean_activation": s_max_of(feature) / 2, "max_activation": s_max_of(feature),
        "dec_norm_a": 1.0, "dec_norm_b": 1.0, "rel_norm": 0.5, "dec_cos": None,
        "n_distinct_tokens": 3, "top_token": "cat", "top_token_share": 0.5, "token_artifact": 0,
        "candidate": int(partition != "shared"), "score": 1.0, "rank": feature + 1,
        "histogram": {"edges": [0.0, 1.0], "counts": [10]},
    }


def make_steerable_run(tiny_models: dict[str, Path], tmp_path: Path, *, analysed: bool = True):
    """A Run over the tiny llama (A) / qwen3 (B) pair with crosscoder, analysis and manifest."""
    import torch

    from xdiff_cli.dfc.crosscoder import Crosscoder, CrosscoderConfig
    from xdiff_cli.findings.feature_index import FeatureIndexWriter
    from xdiff_cli.run.runs import Run
    from xdiff_cli.run.settings import RunSettings

    llama, qwen = tiny_models["llama"], tiny_models["qwen3"]
    run = Run.create(RunSettings(model_a=str(llama), model_b=str(qwen), device="cpu", quant="none"))
    run.set_model("a", {"spec": "tiny/llama", "path": str(llama), "repo_id": "tiny/llama", "revision": "local", "quant": "none"})
    run.set_model("b", {"spec": "tiny/qwen3", "path": str(qwen), "repo_id": "tiny/qwen3", "revision": "local", "quant": "none"})

    torch.manual_seed(1234)
    cfg = CrosscoderConfig(d_a=64, d_b=48, dict_size=64, k=4, exclusive_frac=0.1, scale_a=SCALE_A, scale_b=SCALE_B)
    crosscoder = Crosscoder(cfg)
    with torch.no_grad():
        # Decoder rows big enough to move a tiny model's residual (norm ≈ 3 in normalised space).
        crosscoder.W_dec_FA.mul_(3.0 / 0.4)
        crosscoder.W_dec_FB.mul_(3.0 / 0.4)
        crosscoder.threshold.fill_(0.1)
    crosscoder.save(run.crosscoder_dir / "final")

    run.store_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"layer_a": STEER_LAYER_A, "layer_b": STEER_LAYER_B, "scale_a": SCALE_A, "scale_b": SCALE_B}
    (run.store_dir / "manifest.json").write_text(json.dumps(manifest))

    for stage in ("pull", "harvest", "train"):
        run.mark_stage(stage, "done")
    if analysed:
        labels = crosscoder.partition_labels()
        with FeatureIndexWriter(run.analysis_path) as writer:
            writer.add_features([_feature_row(i, p) for i, p in enumerate(labels)])
        run.mark_stage("analyze", "done")
    return run
