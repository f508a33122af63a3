"""Steering: verify a feature causally by adding its decoder direction to a model's residual.

DESIGN §2 "Screen, then verify": add α · s_max · d_i to the residual stream at the
crosscoder's layer, at every position, during generation, and compare with the unsteered
answer. d_i is the feature's decoder row *for the model being steered*, mapped back from
the crosscoder's normalised space to that model's raw residual space. Because
normalised = (raw − mean) × scale, a normalised *direction* d is d / scale in raw space (the mean cancels).

    steering_vector(crosscoder, feature, side, s_max, α)   [d_side], raw space
    with steer(loaded, layer, vector): ...                  hook on, always removed after
    Steerer(run).generate(prompt, [(feature, α)], side=)    baseline + steered → SteerResult

`Steerer` is what both `xdiff steer` and the TUI's steered chat call. It loads models
lazily (only the model(s) a feature belongs to) and decodes token by token with a KV cache
so callers can stream pieces (`on_token`) and cancel between tokens (`should_stop`).

`--measure` (KL): the *steered* answer is teacher-forced through the unsteered and the
steered model; at every answer position (the position predicting each generated token,
stop token included) we take KL(p_steered ‖ p_unsteered) of the temperature-1 next-token
distributions and average it. Reported in nats per token; 0 means steering did nothing
on that answer. Beside it, `kl_random`: the same measurement with a random direction of
the same norm added instead (seeded), so the number has a scale: a feature whose KL is
several times the random one moves the model along a direction it is sensitive to; one at
or below it is no more than pushing the residual stream that hard in any direction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from xdiff_cli.errors import XdiffError
from xdiff_cli.models.arch import layer_output_tensor, replace_layer_output, text_config

SIDES = ("a", "b")
# Turn-end tokens of common chat formats; generation also stops at the model's own eos ids.
# ("<|end|>" is left out on purpose: GPT-OSS ends its analysis channel with it and keeps going.)
CHAT_END_TOKENS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|return|>", "<|endoftext|>", "<|end_of_text|>")

FeatureScales = list[tuple[int, float]]


# --- the steering rule -------------------------------------------------------------------


def steering_vector(crosscoder: Any, feature: int, side: str, s_max: float, scale: float) -> torch.Tensor:
    """α · s_max · d_side[feature] / scale_side: the feature's decoder row in `side`'s raw space.

    Returns a float32 CPU tensor of shape [d_side]. A feature that does not write `side`
    (an exclusive feature of the other model) has no direction there: that is an error,
    not a silent zero vector.
    """
    cfg = crosscoder.cfg
    if side not in SIDES:
        raise XdiffError(f"unknown model side {side!r}", "use a or b")
    partition = cfg.partition_of(feature)
    if partition not in ("shared", side):
        raise XdiffError(
            f"feature {feature} is exclusive to model {partition.upper()}; it has no direction in model {side.upper()}",
            f"steer it on model {partition}",
        )
    W_dec_FD = crosscoder.W_dec_FA if side == "a" else crosscoder.W_dec_FB
    scale_side = cfg.scale_a if side == "a" else cfg.scale_b
    d_D = W_dec_FD[feature].detach().float().cpu()
    return scale * s_max * d_D / scale_side


def _adapter(adapter_or_loaded: Any) -> Any:
    return getattr(adapter_or_loaded, "adapter", adapter_or_loaded)


@contextmanager
def steer(adapter_or_loaded: Any, layer: int, vector: torch.Tensor) -> Iterator[Any]:
    """Add `vector` to decoder layer `layer`'s output at every position while inside.

    Accepts an `ArchAdapter` or a `LoadedModel`. The hook is removed on exit, also when the
    body raises, so a later plain generation is never silently steered.
    """
    module = _adapter(adapter_or_loaded).layer(layer)
    cast: dict[tuple[Any, Any], torch.Tensor] = {}  # the vector per (device, dtype), cast once

    def add_vector(_module: Any, _inputs: Any, output: Any) -> Any:
        hidden = layer_output_tensor(output)
        key = (hidden.device, hidden.dtype)
        if key not in cast:
            cast[key] = vector.to(device=hidden.device, dtype=hidden.dtype)
        return replace_layer_output(output, hidden + cast[key])

    handle = module.register_forward_hook(add_vector)
    try:
        yield handle
    finally:
        handle.remove()


# --- results -----------------------------------------------------------------------------


@dataclass
class SteerResult:
    features: FeatureScales  # [(feature id, α), ...]
    model: str  # "a" | "b"
    prompt: str
    baseline: str
    steered: str
    kl: float | None = None  # mean KL(steered ‖ unsteered) per answer token, nats (--measure)
    kl_random: float | None = None  # the same for a random direction of the same norm (baseline)
    layer: int | None = None
    model_name: str | None = None  # the model's spec, for display
    stopped: bool = False  # cancelled by should_stop before both answers finished
    notes: list[str] = field(default_factory=list)  # things the user should know (e.g. no chat template)

    def to_json(self) -> dict[str, Any]:
        """DESIGN §4: one feature → scalar "feature"/"scale"; several → parallel lists."""
        ids = [f for f, _ in self.features]
        scales = [s for _, s in self.features]
        single = len(self.features) == 1
        out: dict[str, Any] = {
            "feature": ids[0] if single else ids,
            "model": self.model,
            "scale": scales[0] if single else scales,
            "prompt": self.prompt,
            "baseline": self.baseline,
            "steered": self.steered,
        }
        if self.kl is not None:
            out["kl"] = self.kl
        if self.kl_random is not None:
            out["kl_random"] = self.kl_random
        return out


# --- generation --------------------------------------------------------------------------


class _TextStream:
    """Turns a growing list of token ids into text pieces (whole-list decode, emit the new
    suffix), holding back a trailing partial multi-byte character until it completes."""

    def __init__(self, tokenizer: Any, emit: Callable[[str], None] | None) -> None:
        self.tokenizer = tokenizer
        self.emit = emit
        self.sent = ""

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def update(self, ids: list[int], final: bool = False) -> None:
        text = self.text(ids)
        if not final and text.endswith("\ufffd"):
            return
        if text.startswith(self.sent) and len(text) > len(self.sent):
            if self.emit is not None:
                self.emit(text[len(self.sent) :])
            self.sent = text


def stop_token_ids(loaded: Any) -> set[int]:
    """The model's eos ids (generation config + tokenizer) and known chat turn-end tokens."""
    ids: set[int] = set()
    for source in (getattr(loaded.model, "generation_config", None), loaded.model.config, loaded.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    vocab = loaded.tokenizer.get_vocab()
    ids.update(vocab[token] for token in CHAT_END_TOKENS if token in vocab)
    return ids


def context_length(model: Any) -> int | None:
    value = getattr(text_config(model.config), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def encode_prompt(tokenizer: Any, prompt: str, raw: bool) -> tuple[list[int], list[str]]:
    """Prompt token ids (through the chat template unless `raw`), and notes for the user."""
    notes = []
    if not raw and not getattr(tokenizer, "chat_template", None):
        notes.append("this model's tokenizer has no chat template; the prompt is used as raw text")
        raw = True
    if raw:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    else:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template already has BOS
    if not ids:
        raise XdiffError("the prompt is empty", "pass some text to answer")
    return list(ids), notes


@torch.inference_mode()
def decode(
    loaded: Any,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    stop_ids: set[int] | None = None,
    on_piece: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[int], bool]:
    """Greedy (temperature 0) or sampled decoding with a KV cache, one token at a time.

    Returns the generated ids (a final stop token included) and whether `should_stop`
    cut it short. Sampling uses its own generator seeded with `seed`, so two calls with the
    same seed draw the same random numbers (baseline and steered runs are comparable).
    """
    model = loaded.model
    device = loaded.input_device
    stop_ids = stop_token_ids(loaded) if stop_ids is None else stop_ids
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    stream = _TextStream(loaded.tokenizer, on_piece)
    input_ids = torch.tensor([prompt_ids], device=device)
    past = None
    generated: list[int] = []
    stopped = False
    for _ in range(max_new_tokens):
        if should_stop is not None and should_stop():
            stopped = True
            break
        out = model(input_ids=input_ids, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits_V = out.logits[0, -1].float()
        if temperature > 0:
            probs_V = torch.softmax(logits_V / temperature, dim=-1)
            token = int(torch.multinomial(probs_V, 1, generator=generator))
        else:
            token = int(logits_V.argmax())
        generated.append(token)
        if token in stop_ids:
            break
        stream.update(generated)
        input_ids = torch.tensor([[token]], device=device)
    stream.update(answer_ids(generated, stop_ids), final=True)
    return generated, stopped


def answer_ids(generated: list[int], stop_ids: set[int]) -> list[int]:
    """The generated ids without the final stop token (what the answer text is made of)."""
    return generated[:-1] if generated and generated[-1] in stop_ids else generated


@torch.inference_mode()
def answer_log_probs(loaded: Any, prompt_ids: list[int], answer_ids: list[int]) -> torch.Tensor:
    """Log next-token distributions [n, V] at the positions predicting each answer token
    (at least one: the position after the prompt), teacher-forcing the answer."""
    n = max(len(answer_ids), 1)
    ids = torch.tensor([prompt_ids + answer_ids], device=loaded.input_device)
    logits_TV = loaded.model(input_ids=ids, use_cache=False).logits[0].float()
    start = len(prompt_ids) - 1
    return torch.log_softmax(logits_TV[start : start + n], dim=-1)


def random_direction_like(vector_D: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A random direction with the norm of `vector_D` (the KL baseline of `--measure`)."""
    generator = torch.Generator().manual_seed(seed)
    random_D = torch.randn(vector_D.shape, generator=generator, dtype=torch.float32)
    return random_D * (vector_D.float().norm() / random_D.norm().clamp_min(1e-12))


def mean_kl(logp_steered_NV: torch.Tensor, logp_plain_NV: torch.Tensor) -> float:
    """Mean over positions of KL(steered ‖ plain), nats."""
    kl_N = (logp_steered_NV.exp() * (logp_steered_NV - logp_plain_NV)).sum(-1)
    return float(kl_N.mean().clamp_min(0.0))


# --- the run-level API (CLI and TUI) -----------------------------------------------------


class Steerer:
    """Steered generation for one run: crosscoder, feature index and models, loaded lazily."""

    def __init__(self, run: Any, *, device: str | None = None, quant: str | None = None,
                 trust_remote_code: bool = False) -> None:
        self.run = run
        self.trust_remote_code = trust_remote_code  # from this command line only, never run.json
        self.device = device
        self.quant = quant
        self._crosscoder: Any = None
        self._index: Any = None
        self._manifest: dict[str, Any] | None = None
        self._models: dict[str, Any] = {}

    # --- run artifacts --------------------------------------------------------------
    @property
    def index(self) -> Any:
        if self._index is None:
            from xdiff_cli.findings.feature_index import FeatureIndex

            self._index = FeatureIndex.open(self.run.analysis_path)
        return self._index

    @property
    def crosscoder(self) -> Any:
        if self._crosscoder is None:
            from xdiff_cli.dfc.crosscoder import Crosscoder

            _ = self.index  # "not analysed yet" is the more useful first error
            self._crosscoder = Crosscoder.load(self.run.crosscoder_dir / "final")
        return self._crosscoder

    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            import json

            path = self.run.store_dir / "manifest.json"
            try:
                if self.run.settings.store:  # harvested elsewhere (data/remote.py)
                    self._manifest = self.run.open_store().manifest
                else:
                    self._manifest = json.loads(path.read_text()) if path.is_file() else {}
            except (OSError, ValueError, XdiffError):
                self._manifest = {}
        return self._manifest

    def model_info(self, side: str) -> dict[str, Any]:
        """run.json's record of the model (from `pull`), falling back to the settings."""
        model = self.run.models.get(side)
        info = {k: v for k, v in model.to_json().items() if v is not None} if model else {}
        spec = getattr(self.run.settings, f"model_{side}")
        info.setdefault("spec", spec)
        info.setdefault("path", spec)
        return info

    def model_name(self, side: str) -> str:
        info = self.model_info(side)
        return str(info.get("repo_id") or info.get("spec") or info.get("path"))

    def layer(self, side: str) -> int:
        """The crosscoder's layer for `side`: what harvest recorded in the store manifest,
        else what `pull` planned (run.json), else the settings, else the middle layer."""
        candidates = (
            self.manifest.get(f"layer_{side}"),
            self.model_info(side).get("layer"),
            getattr(self.run.settings, f"layer_{side}"),
        )
        for value in candidates:
            if isinstance(value, int):
                return value
        return self.load(side).adapter.default_layer

    def s_max(self, feature: int) -> float:
        return float(self.index.feature(feature).max_activation)

    # --- models ---------------------------------------------------------------------
    def load(self, side: str, on_progress: Callable[[str], None] | None = None) -> Any:
        """The LoadedModel for `side` (cached): run.json's local path, precision and device."""
        from pathlib import Path

        from xdiff_cli.models.loading import load_model

        if side not in SIDES:
            raise XdiffError(f"unknown model {side!r}", "use a or b")
        if side in self._models:
            return self._models[side]
        info = self.model_info(side)
        path = Path(str(info["path"])).expanduser()
        if not (path / "config.json").is_file():
            name = info.get("repo_id") or info.get("spec") or str(path)
            raise XdiffError(
                f"model {side.upper()} ({name}) is not downloaded", f"run `xdiff pull {info.get('spec') or name}`"
            )
        settings = self.run.settings
        # What `pull` planned for this machine (run.json), unless the caller overrides it.
        quant = self.quant or info.get("quant") or settings.quant
        quant = "none" if quant in (None, "auto") else quant
        device = self.device or info.get("device") or settings.device or "auto"
        dtype = info.get("dtype") if self.device is None else None
        if on_progress is not None:
            on_progress(f"loading model {side.upper()} ({self.model_name(side)}, {quant}) …")
        loaded = load_model(path, quant=quant, device=device, dtype=dtype, trust_remote_code=self.trust_remote_code)
        self._models[side] = loaded
        return loaded

    # --- features -------------------------------------------------------------------
    def sides_for(self, features: FeatureScales, model: str | None = None) -> list[str]:
        """The model(s) to steer: those every feature writes to (A-exclusive → a,
        B-exclusive → b, shared → both), or `model` when it is allowed for all of them."""
        if not features:
            raise XdiffError("no feature to steer", "pass --feature ID")
        if model is not None and model not in SIDES:
            raise XdiffError(f"unknown model {model!r}", "use --model a or --model b")
        cfg = self.crosscoder.cfg
        allowed = set(SIDES)
        for feature, _ in features:
            partition = cfg.partition_of(feature)
            if partition == "shared":
                continue
            if model is not None and partition != model:
                raise XdiffError(
                    f"feature {feature} is exclusive to model {partition.upper()}; it cannot steer model {model.upper()}",
                    f"use --model {partition} or leave --model out",
                )
            allowed &= {partition}
        if not allowed:
            raise XdiffError(
                "these features are exclusive to different models (A and B)", "steer each model's features separately"
            )
        if model is not None:
            return [model]
        return [s for s in SIDES if s in allowed]

    def vector(self, features: FeatureScales, side: str) -> tuple[torch.Tensor, list[str]]:
        """Sum of the features' steering vectors for `side` (raw space), and notes."""
        notes = []
        total_D: torch.Tensor | None = None
        for feature, scale in features:
            if not math.isfinite(scale):
                raise XdiffError(f"the scale of feature {feature} must be a finite number, got {scale}")
            s_max = self.s_max(feature)
            if s_max <= 0:
                notes.append(f"feature {feature} never fired on the corpus (s_max = 0): steering it changes nothing")
            v_D = steering_vector(self.crosscoder, feature, side, s_max, scale)
            total_D = v_D if total_D is None else total_D + v_D
        assert total_D is not None
        return total_D, notes

    # --- generation -----------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        features: FeatureScales,
        *,
        side: str,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
        raw: bool = False,
        measure: bool = False,
        on_token: Callable[[str, str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_progress: Callable[[str], None] | None = None,
    ) -> SteerResult:
        """Baseline then steered answer to `prompt` on model `side` (same seed).

        `on_token(stream, piece)` streams text with stream in {"baseline", "steered"};
        `should_stop()` is polled between tokens and ends both generations early.
        """
        if max_new_tokens < 1:
            raise XdiffError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0:
            raise XdiffError(f"--temperature must be >= 0, got {temperature}")
        self.sides_for(features, side)
        vector_D, notes = self.vector(features, side)
        loaded = self.load(side, on_progress)
        layer = self.layer(side)
        loaded.adapter.check_layer(layer)
        if vector_D.shape[0] != loaded.adapter.hidden_size:
            raise XdiffError(
                f"the crosscoder's model {side.upper()} width ({vector_D.shape[0]}) does not match "
                f"the loaded model ({loaded.adapter.hidden_size})",
                "this run's model files changed; rerun `xdiff run`",
            )
        prompt_ids, prompt_notes = encode_prompt(loaded.tokenizer, prompt, raw)
        notes += prompt_notes
        limit = context_length(loaded.model)
        if limit is not None and len(prompt_ids) + max_new_tokens > limit:
            raise XdiffError(
                f"the prompt is {len(prompt_ids)} tokens; with --max-new-tokens {max_new_tokens} it exceeds "
                f"model {side.upper()}'s context of {limit} tokens",
                "shorten the prompt or lower --max-new-tokens",
            )

        def stream(name: str) -> Callable[[str], None] | None:
            return None if on_token is None else (lambda piece: on_token(name, piece))

        stop_ids = stop_token_ids(loaded)
        options = dict(
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stop_ids=stop_ids, should_stop=should_stop
        )
        base_ids, stopped = decode(loaded, prompt_ids, on_piece=stream("baseline"), **options)
        steered_ids: list[int] = []
        if not stopped:
            with steer(loaded, layer, vector_D):
                steered_ids, stopped = decode(loaded, prompt_ids, on_piece=stream("steered"), **options)
        kl = kl_random = None
        if measure and not stopped:
            logp_plain_NV = answer_log_probs(loaded, prompt_ids, steered_ids)
            with steer(loaded, layer, vector_D):
                logp_steered_NV = answer_log_probs(loaded, prompt_ids, steered_ids)
            kl = mean_kl(logp_steered_NV, logp_plain_NV)
            with steer(loaded, layer, random_direction_like(vector_D, seed)):
                logp_random_NV = answer_log_probs(loaded, prompt_ids, steered_ids)
            kl_random = mean_kl(logp_random_NV, logp_plain_NV)

        def text(ids: list[int]) -> str:
            return _TextStream(loaded.tokenizer, None).text(answer_ids(ids, stop_ids))

        return SteerResult(
            features=[(int(f), float(s)) for f, s in features],
            model=side,
            prompt=prompt,
            baseline=text(base_ids),
            steered=text(steered_ids),
            kl=kl,
            kl_random=kl_random,
            layer=layer,
            model_name=self.model_name(side),
            stopped=stopped,
            notes=notes,
        )

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None
