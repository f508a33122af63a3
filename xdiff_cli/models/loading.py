"""Load a causal LM + tokenizer from a local directory, in the requested precision.

Input: a local model directory (see `hub.py` for turning hub ids into one).
Output: `LoadedModel` — eval mode, no grad, on the chosen device, with its `ArchAdapter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xdiff_cli.errors import XdiffError
from xdiff_cli.models.arch import ArchAdapter
from xdiff_cli.models.modelconfig import read_config
from xdiff_cli.run import hardware


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    adapter: ArchAdapter
    path: Path
    quant: str  # "none" | "8bit" | "4bit", or a shipped format such as "mxfp4"
    device: str
    dtype: str

    @property
    def input_device(self) -> Any:
        return self.model.get_input_embeddings().weight.device


resolve_device = hardware.resolve_device  # one home: xdiff_cli/run/hardware.py


def default_dtype(device: str) -> str:
    """bf16 on GPU (the paper's setting); fp32 on CPU, where bf16 matmuls are slow or missing."""
    return "bfloat16" if device.startswith("cuda") else "float32"


def quantization_config(quant: str, device: str):
    """The transformers BitsAndBytesConfig for `quant`, or None for full precision."""
    if quant in ("none", "auto"):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    compute_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True,
        )
    raise XdiffError(f"unknown quantisation {quant!r}", "use none, 8bit or 4bit")


_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


@dataclass(frozen=True)
class ModelDirInfo:
    """What config.json says about a model directory, checked before any weights load."""

    model_type: str
    architectures: tuple[str, ...]
    prequantized: str | None  # quant_method of weights shipped quantised (e.g. "mxfp4")


def model_name(path: Path | str) -> str:
    """What the user calls the model in `path`: the repo id for a hub-cache snapshot
    (`…/models--org--name/snapshots/<sha>` → `org/name`), the folder name otherwise."""
    path = Path(path)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name[len("models--"):].replace("--", "/")
    return path.name


def inspect_model_dir(path: Path | str, *, trust_remote_code: bool = False) -> ModelDirInfo:
    """Reject, with one line, what cannot load as a causal LM: encoders, custom code, unknown types."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(path)
    config = read_config(path)
    model_type = str(config.get("model_type", ""))
    architectures = tuple(config.get("architectures") or ())
    custom = "AutoModelForCausalLM" in (config.get("auto_map") or {})
    name = model_name(path)
    if model_type not in CONFIG_MAPPING_NAMES:
        if custom and not trust_remote_code:
            raise XdiffError(
                f"{name} needs custom code to load (model type {model_type!r})",
                "rerun with --trust-remote-code if you trust its publisher",
            )
        if not custom:
            raise XdiffError(
                f"{name} has a model type this transformers does not know ({model_type!r})",
                "upgrade transformers (pip install -U transformers)",
            )
    elif architectures and not any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures):
        raise XdiffError(
            f"{name} is not a causal LM ({', '.join(architectures)})",
            "xdiff compares decoder-only language models",
        )
    elif not architectures and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise XdiffError(f"{name} is not a causal LM (model type {model_type!r})")
    method = (config.get("quantization_config") or {}).get("quant_method")
    return ModelDirInfo(model_type, architectures, method)


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise XdiffError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from exc


def load_model(
    path: Path | str,
    *,
    quant: str = "none",
    device: str = "auto",
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load model + tokenizer from a local directory, ready for inference."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # xdiff reports loading itself; transformers' per-weight bar would garble the TUI and
    # interleave with our progress displays.
    hf_logging.disable_progress_bar()

    path = Path(path)
    info = inspect_model_dir(path, trust_remote_code=trust_remote_code)
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "trust_remote_code": trust_remote_code}
    # Weights shipped quantised (GPT-OSS's MXFP4) load in their own format, or dequantised by
    # transformers where its kernels are missing; bitsandbytes cannot be stacked on them.
    qconfig = None if info.prequantized else quantization_config(quant, device)
    if qconfig is not None:
        _require_bitsandbytes(quant)
        kwargs["quantization_config"] = qconfig
    if qconfig is not None or info.prequantized:
        kwargs["device_map"] = {"": device if device != "cuda" else "cuda:0"}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except ValueError as exc:
        message = str(exc).splitlines()[0]
        if "trust_remote_code" in message or "custom code" in message:
            raise XdiffError(
                f"{model_name(path)} needs custom code to load", "rerun with --trust-remote-code if you trust it"
            ) from exc
        raise XdiffError(f"cannot load {path} as a causal LM: {message}") from exc
    if qconfig is None and not info.prequantized:
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    loaded_quant = info.prequantized or ("none" if qconfig is None else quant)
    return LoadedModel(model, tokenizer, ArchAdapter(model), path, loaded_quant, device, dtype)


def _require_bitsandbytes(quant: str) -> None:
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise XdiffError(
            f"--quant {quant} needs bitsandbytes", "pip install bitsandbytes, or use --quant none"
        )
