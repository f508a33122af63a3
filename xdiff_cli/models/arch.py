"""Architecture adapter: where the decoder layers are, how many, how wide.

Every stage that touches a model's residual stream (harvest reads it, steering writes it)
goes through `ArchAdapter`, so supporting a new family means teaching this file one path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xdiff_cli.errors import XdiffError

# Attribute paths (from the *ForCausalLM object) to the decoder-layer ModuleList, by family.
_LAYER_PATHS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "qwen3_moe": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "gemma3": "model.language_model.layers",
    "gpt_oss": "model.layers",
    "phi3": "model.layers",
    "olmo": "model.layers",
    "olmo2": "model.layers",
    "gpt_neox": "gpt_neox.layers",
    "gpt2": "transformer.h",
}
# Fallback search order for families not listed above.
_FALLBACK_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "layers",
)


def _get_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def text_config(config: Any) -> Any:
    """The language-model part of a (possibly multimodal) config."""
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def config_hidden_size(config: Any) -> int:
    cfg = text_config(config)
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    raise XdiffError(f"cannot find the hidden size in a {cfg.model_type!r} config")


def config_num_layers(config: Any) -> int:
    cfg = text_config(config)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    raise XdiffError(f"cannot find the number of layers in a {cfg.model_type!r} config")


def default_layer(num_layers: int) -> int:
    from xdiff_cli.models.modelconfig import middle_layer

    return middle_layer(num_layers)


def find_decoder_layers(model: Any) -> Any:
    """The ModuleList of decoder layers of a causal LM."""
    import torch

    model_type = getattr(model.config, "model_type", "")
    candidates = [_LAYER_PATHS[model_type]] if model_type in _LAYER_PATHS else []
    candidates += [p for p in _FALLBACK_PATHS if p not in candidates]
    for dotted in candidates:
        try:
            layers = _get_path(model, dotted)
        except AttributeError:
            continue
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return layers
    layers = _largest_layer_list(model)
    if layers is not None:
        return layers
    raise XdiffError(
        f"cannot find the decoder layers of a {model_type!r} model",
        "this architecture is not supported yet; please file an issue with the model id",
    )


def _largest_layer_list(model: Any) -> Any:
    """General fallback: the ModuleList whose length is the config's layer count (else the longest)."""
    import torch

    try:
        expected = config_num_layers(model.config)
    except XdiffError:
        expected = None
    lists = [m for _, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    matching = [m for m in lists if len(m) == expected]
    if matching:
        return matching[0]
    return max(lists, key=len) if lists and expected is None else None


def layer_output_tensor(output: Any) -> Any:
    """Decoder layers return a tensor in some versions/families and a tuple in others."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_layer_output(output: Any, hidden: Any) -> Any:
    """Put `hidden` back into a decoder layer's output in the shape it came in."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


@dataclass
class ArchAdapter:
    """Residual-stream access for one loaded causal LM."""

    model: Any

    @property
    def layers(self) -> Any:
        return find_decoder_layers(self.model)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return config_hidden_size(self.model.config)

    @property
    def default_layer(self) -> int:
        return default_layer(self.num_layers)

    def check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.num_layers:
            raise XdiffError(
                f"layer {layer} is out of range for this model", f"choose 0..{self.num_layers - 1}"
            )
        return layer

    def layer(self, index: int) -> Any:
        return self.layers[self.check_layer(index)]
