"""Which output tokens a feature promotes and suppresses, in each model that reads it.

The feature's decoder direction d (its row of W_dec for that model), multiplied by the
model's final-norm gain and its unembedding W_U, gives the change in every output logit
per unit of the feature: logits_V = W_U · (g ⊙ d). The largest entries are the tokens the
feature pushes the model towards, the smallest those it pushes away from (the "logit lens"
view Neuronpedia shows). The final norm's normalisation is ignored: it rescales all logits
together and does not change their order.

Computed lazily (the TUI asks for the selected feature in a worker), not at analysis time:
it needs only the crosscoder's decoder row and the unembedding, read straight from the
safetensors files, so no model is loaded. Unembeddings are cached per model directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from xdiff_cli.errors import XdiffError

UNEMBED_NAMES = ("lm_head.weight", "model.lm_head.weight", "model.embed_tokens.weight", "embed_tokens.weight",
                 "transformer.wte.weight", "model.embed.weight")
FINAL_NORM_NAMES = ("model.norm.weight", "norm.weight", "transformer.ln_f.weight", "model.final_layernorm.weight")


@dataclass
class TokenEffects:
    """Top tokens by logit change per unit of the feature: (token text, change), largest first."""

    side: str
    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name → safetensors file, for single-file and sharded checkpoints."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise XdiffError(f"no safetensors weights in {model_dir}", "run `xdiff pull` for this model")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as handle:
        return {name: single for name in handle.keys()}


def _read(path: Path, name: str) -> Any:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(name)


@lru_cache(maxsize=2)
def unembedding(model_dir: str) -> tuple[Any, Any]:
    """(W_U [V, D] float32, final-norm gain [D] float32 or None) of the model in `model_dir`."""
    directory = Path(model_dir)
    files = _tensor_files(directory)
    name = next((n for n in UNEMBED_NAMES if n in files), None)
    if name is None:
        raise XdiffError(f"cannot find the unembedding in {directory}", "its tensor names are not ones xdiff knows")
    W_U_VD = _read(files[name], name).float()
    norm_name = next((n for n in FINAL_NORM_NAMES if n in files), None)
    gain_D = _read(files[norm_name], norm_name).float() if norm_name else None
    return W_U_VD, gain_D


def decoder_row(crosscoder_dir: Path, feature: int, side: str) -> Any:
    """Row `feature` of W_dec for `side`, read without loading the whole crosscoder."""
    from safetensors import safe_open

    path = Path(crosscoder_dir) / "model.safetensors"
    if not path.is_file():
        raise XdiffError(f"no trained crosscoder at {crosscoder_dir}", "run `xdiff train`")
    name = "W_dec_FA" if side == "a" else "W_dec_FB"
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_slice(name)[feature : feature + 1][0].float()


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


@lru_cache(maxsize=2)
def _tokenizer(model_dir: str) -> Any:
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def token_effects(crosscoder_dir: Path, model_dir: Path, feature: int, side: str, k: int = 8) -> TokenEffects:
    """The k tokens feature `feature` most promotes and most suppresses in the model at `model_dir`."""
    import torch

    d_D = decoder_row(crosscoder_dir, feature, side)
    W_U_VD, gain_D = unembedding(str(model_dir))
    if W_U_VD.shape[1] != d_D.shape[0]:
        raise XdiffError(
            f"the unembedding in {model_dir} has width {W_U_VD.shape[1]}, the crosscoder's model {side.upper()} "
            f"{d_D.shape[0]}", "is this the model the run was trained on?"
        )
    if gain_D is not None:
        d_D = d_D * gain_D
    logits_V = W_U_VD @ d_D
    k = min(k, logits_V.shape[0])
    tokenizer = _tokenizer(str(model_dir))
    top = torch.topk(logits_V, k)
    bottom = torch.topk(-logits_V, k)
    return TokenEffects(
        side=side,
        promoted=[(_token_text(tokenizer, int(i)), float(v)) for v, i in zip(top.values, top.indices, strict=True)],
        suppressed=[(_token_text(tokenizer, int(i)), -float(v))
                    for v, i in zip(bottom.values, bottom.indices, strict=True)],
    )


def _model_dir(run: Any, side: str) -> Path:
    info = run.record.models.get(side)
    return Path(str((info and info.path) or getattr(run.settings, f"model_{side}"))).expanduser()


def unavailable_reason(run: Any, side: str) -> str | None:
    """Why effects cannot be computed for `side`, from cheap file checks (None: they can)."""
    if not (_model_dir(run, side) / "config.json").is_file():
        return f"model {side.upper()} is not downloaded here (`xdiff pull` it to see its tokens)"
    if not (run.crosscoder_dir / "final" / "model.safetensors").is_file():
        return "no trained crosscoder in this run"
    return None


def sides_reading(partition: str) -> tuple[str, ...]:
    return ("a", "b") if partition == "shared" else (partition,)


def effects_for_run(run: Any, feature: int, partition: str, k: int = 8) -> dict[str, TokenEffects | str]:
    """Per model that reads the feature ('a' for A-exclusive, both for shared): its effects,
    or a one-line reason why they cannot be shown (model not downloaded, …)."""
    out: dict[str, TokenEffects | str] = {}
    for side in sides_reading(partition):
        reason = unavailable_reason(run, side)
        if reason is not None:
            out[side] = reason
            continue
        try:
            out[side] = token_effects(run.crosscoder_dir / "final", _model_dir(run, side), feature, side, k=k)
        except XdiffError as exc:
            out[side] = str(exc)
    return out
