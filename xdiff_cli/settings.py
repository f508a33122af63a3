"""Every setting of a run, typed and validated in one place.

`RunSettings` is what `xdiff run` (and each stage command) accepts, what presets set, and
what `run.json` records so a run can be reproduced. Field docs double as `--help` text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from xdiff_cli.errors import XdiffError

QUANT_CHOICES = ("auto", "none", "8bit", "4bit")
ARCH_CHOICES = ("dfc", "crosscoder")


@dataclass
class RunSettings:
    model_a: str = field(default="", metadata={"help": "Model A: hub id (org/name[@revision]) or local directory."})
    model_b: str = field(default="", metadata={"help": "Model B: hub id (org/name[@revision]) or local directory."})
    corpus: str = field(
        default="builtin:smoke",
        metadata={"help": "Local .txt/.jsonl file, hub dataset (hf:org/name[:split]), builtin:smoke or builtin:prose."},
    )
    tokens: int = field(default=200_000, metadata={"help": "Aligned token pairs to harvest."})
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
    quant: str = field(default="auto", metadata={"help": "Model precision: auto, none, 8bit or 4bit."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N."})
    seed: int = field(default=0, metadata={"help": "Seed for data order, init and sampling."})
    top_examples: int = field(default=20, metadata={"help": "Top examples kept per feature."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models that ship custom code."})
    allow_pickle_weights: bool = field(
        default=False, metadata={"help": "Allow pickle .bin weights when a repo has no safetensors."}
    )

    def validate(self) -> RunSettings:
        """Reject impossible combinations early, with a message that says what to change."""
        if self.tokens <= 0:
            raise XdiffError(f"--tokens must be positive, got {self.tokens}")
        if not 0.0 <= self.exclusive_frac < 0.5:
            raise XdiffError(f"--exclusive-frac must be in [0, 0.5), got {self.exclusive_frac}")
        if self.arch not in ARCH_CHOICES:
            raise XdiffError(f"--arch must be one of {', '.join(ARCH_CHOICES)}, got {self.arch!r}")
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise XdiffError(f"unknown setting(s): {', '.join(unknown)}")
        return cls(**data)

    def updated(self, **changes: Any) -> RunSettings:
        """A copy with the non-None `changes` applied."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def help_for(name: str) -> str:
    for f in dataclasses.fields(RunSettings):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)
