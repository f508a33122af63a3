"""Every setting of a run, typed and validated in one place.

`RunSettings` is what `xdiff run` (and each stage command) accepts, what presets set, and
what `run.json` records so a run can be reproduced. Each field is declared once: its type,
default, `--help` text and CLI flag live here, and the commands get their options from it
(`cli_options`). Decisions derived from settings live here too: the default dictionary
size and the size of each exclusive block.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xdiff_cli.errors import XdiffError

QUANT_CHOICES = ("auto", "none", "8bit", "4bit")
ARCH_CHOICES = ("dfc", "crosscoder")
PRECISION_CHOICES = ("auto", "bf16", "fp32")  # crosscoder training (also checked by dfc/training.py: TrainConfig)
# Not a setting: it says what this command line allows, so run.json never records it and a
# run never enables custom model code by itself. Commands that load models take the flag.
TRUST_REMOTE_CODE_HELP = "Allow models that ship custom Python code (only from publishers you trust)."
LEGACY_KEYS = ("trust_remote_code",)  # recorded by older versions; ignored when read
DICT_EXPANSION = 32  # the paper's dictionary: 32 x the mean width of the two models


def default_dict_size(d_a: int, d_b: int) -> int:
    """The paper's 32x expansion of the mean width (131,072 for d≈4096)."""
    return DICT_EXPANSION * (d_a + d_b) // 2


def exclusive_size(dict_size: int, exclusive_frac: float, arch: str = "dfc") -> int:
    """Features in *each* exclusive block (0 for a standard crosscoder); the plan and the
    trained model both use this, so they agree for every size."""
    if arch == "crosscoder":
        return 0
    return int(round(dict_size * exclusive_frac))


@dataclass
class RunSettings:
    model_a: str = field(default="", metadata={"help": "Model A: hub id (org/name[@revision]) or local directory."})
    model_b: str = field(default="", metadata={"help": "Model B: hub id (org/name[@revision]) or local directory."})
    corpus: str = field(
        default="builtin:smoke",
        metadata={"help": "Local .txt/.jsonl file, hub dataset (hf:org/name[:split]), builtin:smoke or builtin:prose."},
    )
    tokens: int = field(default=200_000, metadata={"help": "Aligned token pairs to harvest."})
    store: str | None = field(
        default=None,
        metadata={"help": "Use the activation store harvested elsewhere at this URL or directory instead of "
                          "harvesting (s3://, hf://, gs://, https://, file://; the activations/ folder of a run). "
                          "Shards stream through a local cache bounded by XDIFF_STORE_CACHE (default 20G)."},
    )
    layer_a: int | None = field(default=None, metadata={"help": "Decoder layer of model A to read (default: middle)."})
    layer_b: int | None = field(default=None, metadata={"help": "Decoder layer of model B to read (default: middle)."})
    context_length: int = field(default=512, metadata={"help": "Max tokens per document fed to the models."})
    harvest_batch_size: int = field(default=8, metadata={"help": "Documents per forward pass when harvesting."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Share of tokens held out for analysis."})
    dict_size: int | None = field(default=None, metadata={"help": "Crosscoder features (default: 32 x mean width)."})
    k: int = field(default=200, metadata={"help": "Active features per token (BatchTopK)."})
    exclusive_frac: float = field(default=0.05, metadata={"help": "Share of features exclusive to each model (DFC)."})
    arch: str = field(default="dfc", metadata={"help": "dfc (partitioned) or crosscoder (standard baseline)."})
    steps: int = field(default=100_000, metadata={"help": "Training steps."})
    batch_size: int = field(default=2048, metadata={"help": "Training batch size (token pairs)."})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate."})
    precision: str = field(
        default="auto",
        metadata={"help": "Crosscoder training precision: auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32. "
                          "Weights and Adam state stay fp32."},
    )
    quant: str = field(default="auto", metadata={"help": "Model precision: auto, none, 8bit or 4bit."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N."})
    seed: int = field(default=0, metadata={"help": "Seed for data order, init and sampling."})
    top_examples: int = field(default=20, metadata={"help": "Top examples kept per feature."})
    allow_pickle_weights: bool = field(
        default=False, metadata={"help": "Allow pickle .bin weights when a repo has no safetensors."}
    )

    def validate(self) -> RunSettings:
        """Reject impossible combinations early, with a message that says what to change."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise XdiffError(f"{flag(f.name)} must be a finite number, got {value}")
        if self.tokens <= 0:
            raise XdiffError(f"--tokens must be positive, got {self.tokens}")
        if not 0.0 <= self.exclusive_frac < 0.5:
            raise XdiffError(f"--exclusive-frac must be in [0, 0.5), got {self.exclusive_frac}")
        if self.arch not in ARCH_CHOICES:
            raise XdiffError(f"--arch must be one of {', '.join(ARCH_CHOICES)}, got {self.arch!r}")
        if self.precision not in PRECISION_CHOICES:
            raise XdiffError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}, got {self.precision!r}")
        if self.quant not in QUANT_CHOICES:
            raise XdiffError(f"--quant must be one of {', '.join(QUANT_CHOICES)}, got {self.quant!r}")
        if self.k <= 0:
            raise XdiffError(f"--k must be positive, got {self.k}")
        if self.dict_size is not None and self.dict_size < 4:
            raise XdiffError(f"--dict-size must be at least 4, got {self.dict_size}")
        if self.dict_size is not None and self.k > self.dict_size:
            raise XdiffError(f"--k ({self.k}) cannot exceed --dict-size ({self.dict_size})")
        if not 0.0 < self.eval_fraction < 1.0:
            raise XdiffError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}")
        for name in ("steps", "batch_size", "context_length", "harvest_batch_size", "top_examples"):
            if getattr(self, name) <= 0:
                raise XdiffError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise XdiffError(f"--lr must be positive, got {self.lr}")
        return self

    def dict_size_for(self, d_a: int, d_b: int) -> int:
        return self.dict_size if self.dict_size is not None else default_dict_size(d_a, d_b)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k not in LEGACY_KEYS}
        unknown = sorted(set(data) - known)
        if unknown:
            raise XdiffError(f"unknown setting(s): {', '.join(unknown)}")
        for f in dataclasses.fields(cls):
            if f.name in data and not _has_type(data[f.name], str(f.type)):
                raise XdiffError(f"setting {f.name} has the wrong type ({data[f.name]!r})")
        return cls(**data)

    def updated(self, **changes: Any) -> RunSettings:
        """A copy with the non-None `changes` applied."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def help_for(name: str) -> str:
    return _field(name).metadata.get("help", "")


def flag(name: str) -> str:
    """The CLI flag of a setting: `harvest_batch_size` → `--harvest-batch-size`."""
    return "--" + name.replace("_", "-")


def _field(name: str) -> dataclasses.Field:
    for f in dataclasses.fields(RunSettings):
        if f.name == name:
            return f
    raise KeyError(name)


def _has_type(value: Any, declared: str) -> bool:
    if value is None:
        return declared.endswith("| None")
    kind = _OPTION_TYPES[declared]
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


_OPTION_TYPES = {"int": int, "int | None": int, "float": float, "str": str, "str | None": str, "bool": bool}


def cli_options(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a typer command one option per named setting, derived from the field here.

    The decorated command declares a parameter `options: dict` and receives the settings
    the user gave (not given → left out), ready for `RunSettings.updated(**options)`.
    Flags are `--field-name`; help is the field doc; booleans are on/off flags."""
    import typer

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        import typing

        hints = typing.get_type_hints(command)
        signature = inspect.signature(command)
        signature = signature.replace(parameters=[
            p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()
        ])
        added = []
        for name in names:
            kind = _OPTION_TYPES[str(_field(name).type)]
            if kind is bool:
                default = typer.Option(False, flag(name), help=help_for(name))
                annotation: Any = bool
            else:
                default = typer.Option(None, flag(name), help=help_for(name))
                annotation = kind | None
            added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                           annotation=annotation))
        kept = [p for p in signature.parameters.values() if p.name != "options"]
        positional = [p for p in kept if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        keyword = [p for p in kept if p.kind is inspect.Parameter.KEYWORD_ONLY]
        # Arguments first, then the settings, then the command's own options (e.g. --run, --quiet).
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in positional if _is_argument(p)]
        params += added
        params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in positional if not _is_argument(p)]
        params += keyword

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in names}
            kwargs["options"] = {k: v for k, v in given.items() if v is not None and v is not False}
            return command(**kwargs)

        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {**{p.name: p.annotation for p in params}, "return": None}
        del wrapper.__wrapped__  # typer must read the new signature, not the original
        return wrapper

    return decorate


def _is_argument(param: inspect.Parameter) -> bool:
    from typer.models import ArgumentInfo

    return isinstance(param.default, ArgumentInfo)
