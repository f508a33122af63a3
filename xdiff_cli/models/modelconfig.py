"""Reading a model's `config.json`: the one home for what the plan, the planner and the
loader learn from it before any weights load.

Multimodal configs keep the language model under `text_config`; every reader here looks
there first (its keys win over the top level), so all callers agree on width and depth.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xdiff_cli.errors import XdiffError

WIDTH_KEYS = ("hidden_size", "n_embd", "d_model")
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def read_config(folder: Path | str) -> dict[str, Any]:
    """`folder/config.json` as a dict, or a one-line error."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise XdiffError(f"{folder} is not a model directory (no config.json)", "pass a hub id or a saved model dir") from exc
    except (OSError, ValueError) as exc:
        raise XdiffError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise XdiffError(f"cannot read {path}: not a JSON object")
    return config


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a config dict: `text_config` merged over the top level."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def first_int(cfg: dict[str, Any], *names: str, default: int | None = None) -> int | None:
    for name in names:
        value = cfg.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


def width(config: dict[str, Any]) -> int | None:
    return first_int(text_config(config), *WIDTH_KEYS)


def depth(config: dict[str, Any]) -> int | None:
    return first_int(text_config(config), *DEPTH_KEYS)


def middle_layer(num_layers: int) -> int:
    """The paper reads the residual stream after a middle decoder layer (12 of 24, 16 of 36)."""
    return num_layers // 2


def weight_bytes(folder: Path) -> int | None:
    """Size of the safetensors weights: the index's total_size, else the files on disk."""
    for index in Path(folder).glob("*.safetensors.index.json"):
        try:
            return int(json.loads(index.read_text(encoding="utf-8"))["metadata"]["total_size"])
        except (KeyError, ValueError, TypeError):
            continue
    files = list(Path(folder).glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None
