"""The activation store: token-aligned residuals of both models, sharded on disk.

Layout (see docs/ARCHITECTURE.md, "Activation store"):

    activations/
      manifest.json                 identity (models, revisions, layers, tokenizers, dtype,
                                    quant), scales, counts, shards[], eval_start_shard, complete
      documents.jsonl               {"doc_id", "text"}: the text the char spans index into
      shards/shard-00000.safetensors  acts_a [n, d_a], acts_b [n, d_b] (raw, bf16/fp16),
                                    doc_id, start_a, start_b, end [n] int64

Written only by `harvest.py` through `StoreWriter`: each shard lands atomically, then the
documents it needs, then the manifest that lists it — so after any crash the manifest
names exactly the complete shards, and a rerun resumes after the last of them.
Normalised activation = raw × scale (scale makes the median norm √((d_a+d_b)/2)).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xdiff_cli.atomic import (
    atomic_path,
    clean_temp_files,
    disk_full_error,
    is_disk_full,
    read_json,
    record_checksum,
    write_json,
)
from xdiff_cli.errors import XdiffError

FORMAT_VERSION = 1
STORE_BYTES_PER_VALUE = 2  # activations are stored in bf16/fp16
INDEX_BYTES_PER_PAIR = 5 * 8  # doc_id, start_a, start_b, end (+ one spare) as int64


def estimate_bytes(tokens: int, d_a: int, d_b: int) -> int:
    """Disk the shards of `tokens` aligned pairs take (no headroom: `paths.check_free_space` adds it)."""
    return int(tokens * ((d_a + d_b) * STORE_BYTES_PER_VALUE + INDEX_BYTES_PER_PAIR))


def eval_start_shard(shard_tokens: list[int], eval_fraction: float) -> int:
    """First eval shard: the fewest trailing shards holding >= eval_fraction of the tokens.

    Chosen by tokens, not shard count (the last shard is often a small remainder), and
    always leaving at least one shard for training and one for eval."""
    target = eval_fraction * sum(shard_tokens)
    held_out, start = 0, len(shard_tokens)
    while start > 1 and (held_out < target or start == len(shard_tokens)):
        start -= 1
        held_out += shard_tokens[start]
    return start
MANIFEST = "manifest.json"
DOCUMENTS = "documents.jsonl"
SHARDS_DIR = "shards"
DTYPES = ("bfloat16", "float16")
# Manifest fields that must match for a harvest to continue (or reuse) an existing store.
IDENTITY_FIELDS = (
    "model_a", "model_b", "revision_a", "revision_b", "layer_a", "layer_b", "d_a", "d_b",
    "tokenizer_hash_a", "tokenizer_hash_b", "dtype", "quant", "corpus", "context_length",
    "seed", "target_tokens",
)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@dataclass
class Shard:
    """One shard's aligned pairs (raw activations, in document order)."""

    acts_a: Any  # torch [n, d_a]
    acts_b: Any  # torch [n, d_b]
    doc_id: Any  # torch [n] int64
    start_a: Any  # torch [n] int64
    start_b: Any
    end: Any

    def __len__(self) -> int:
        return int(self.doc_id.shape[0])

    def tensors(self) -> dict[str, Any]:
        return {
            "acts_a": self.acts_a, "acts_b": self.acts_b, "doc_id": self.doc_id,
            "start_a": self.start_a, "start_b": self.start_b, "end": self.end,
        }


def load_shard_file(path: Path) -> Shard:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        shard = Shard(**{name: tensors[name] for name in ("acts_a", "acts_b", "doc_id", "start_a", "start_b", "end")})
    except (SafetensorError, OSError, KeyError) as exc:
        raise XdiffError(
            f"activation shard {path} is unreadable ({exc})", "rerun `xdiff run` to harvest again (it redoes a corrupt store)"
        ) from exc
    check_finite(shard, path)
    return shard


def check_finite(shard: Shard, where: Any) -> None:
    """NaN/inf activations (an overflowing model, a corrupted file) are refused, not trained on."""
    import torch

    for name in ("acts_a", "acts_b"):
        values = getattr(shard, name)
        if values.numel() and not bool(torch.isfinite(values).all()):
            bad = int((~torch.isfinite(values)).any(dim=-1).sum())
            raise XdiffError(
                f"{bad} token(s) of {name} in {where} are NaN or infinite",
                "delete that activations/ directory and harvest again; if it recurs, the model overflows at "
                "this layer or precision (try another --layer, or no quantization)",
            )


@dataclass
class StoreSplit:
    """The train or eval shards of a store."""

    store: ActivationStore
    name: str
    shard_indices: list[int]

    @property
    def num_shards(self) -> int:
        return len(self.shard_indices)

    @property
    def n_tokens(self) -> int:
        shards = self.store.manifest["shards"]
        return sum(shards[i]["n_tokens"] for i in self.shard_indices)

    @property
    def d_a(self) -> int:
        return self.store.manifest["d_a"]

    @property
    def d_b(self) -> int:
        return self.store.manifest["d_b"]

    @property
    def scale_a(self) -> float:
        return self.store.manifest["scale_a"]

    @property
    def scale_b(self) -> float:
        return self.store.manifest["scale_b"]

    def shard_tokens(self, i: int) -> int:
        """Tokens in the i-th shard of this split (from the manifest; nothing is read)."""
        return self.store.manifest["shards"][self.shard_indices[i]]["n_tokens"]

    def load_shard(self, i: int) -> Shard:
        """The i-th shard of this split (0-based within the split)."""
        if not 0 <= i < self.num_shards:
            raise IndexError(f"{self.name} split has {self.num_shards} shards, asked for {i}")
        return self.store.load_shard(self.shard_indices[i])

    def prefetch(self, i: int) -> None:
        """Say that shard i (within the split) comes next (a remote store starts fetching it)."""
        if 0 <= i < self.num_shards:
            self.store.prefetch(self.shard_indices[i])

    def __iter__(self):
        for i in range(self.num_shards):
            self.prefetch(i + 1)
            yield self.load_shard(i)


class ActivationStore:
    """Read access to a harvested store."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.dir = Path(directory)
        self.manifest = manifest
        self._doc_offsets: dict[int, int] | None = None

    @property
    def location(self) -> str:
        """Where the store lives, as the user named it (a directory here; a URL for a remote store)."""
        return str(self.dir)

    @classmethod
    def open(cls, directory: Path | str, *, require_complete: bool = True) -> ActivationStore:
        directory = Path(directory)
        if not (directory / MANIFEST).is_file():
            raise XdiffError(f"no activation store at {directory}", "run `xdiff harvest` (or `xdiff run`) first")
        manifest = read_json(directory / MANIFEST, "activation store manifest")
        check_manifest(manifest, str(directory), require_complete=require_complete)
        return cls(directory, manifest)

    # --- contents -----------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    def shard_path(self, index: int) -> Path:
        return self.dir / SHARDS_DIR / self.manifest["shards"][index]["name"]

    def load_shard(self, index: int) -> Shard:
        return load_shard_file(self.shard_path(index))

    def prefetch(self, index: int) -> None:
        """A hint that shard `index` is read next (nothing to do for a local store)."""

    def split(self, name: str) -> StoreSplit:
        eval_start = int(self.manifest["eval_start_shard"])
        if name == "train":
            return StoreSplit(self, name, list(range(eval_start)))
        if name == "eval":
            return StoreSplit(self, name, list(range(eval_start, self.num_shards)))
        raise ValueError(f"split must be 'train' or 'eval', got {name!r}")

    def document_text(self, doc_id: int) -> str:
        """The canonical text of a document (what the char spans index into)."""
        if self._doc_offsets is None:
            self._doc_offsets = {}
            with (self.dir / DOCUMENTS).open("rb") as fh:
                offset = 0
                for line in fh:
                    self._doc_offsets[self._document_record(line)["doc_id"]] = offset
                    offset += len(line)
        if doc_id not in self._doc_offsets:
            raise XdiffError(
                f"document {doc_id} is missing from {self.dir / DOCUMENTS} (the file is truncated)",
                "rerun `xdiff run` for this run: it redoes a damaged harvest",
            )
        with (self.dir / DOCUMENTS).open("rb") as fh:
            fh.seek(self._doc_offsets[doc_id])
            return self._document_record(fh.readline())["text"]

    def _document_record(self, line: bytes) -> dict[str, Any]:
        try:
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record.get("doc_id"), int) and isinstance(record.get("text"), str):
                return record
        except ValueError:
            pass
        raise XdiffError(
            f"{self.dir / DOCUMENTS} is damaged (a line is cut short or not a document record)",
            "rerun `xdiff run` for this run: it redoes a damaged harvest",
        )


def open_store(location: Path | str, *, require_complete: bool = True) -> ActivationStore:
    """The store at `location`: a directory (local or a shared filesystem, read in place), or
    a URL (`s3://`, `hf://`, `gs://`, `http(s)://`, `file://`, …) whose shards stream through
    the bounded local cache of `data/remote.py`."""
    from xdiff_cli.data.remote import is_url

    if is_url(str(location)):
        from xdiff_cli.data.remote import RemoteActivationStore

        return RemoteActivationStore.open_url(str(location), require_complete=require_complete)
    return ActivationStore.open(location, require_complete=require_complete)


def check_manifest(manifest: Any, where: str, *, require_complete: bool = True) -> None:
    """Refuse a manifest of an unknown format, a corrupt one, or (by default) an incomplete one."""
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise XdiffError(f"activation store at {where} has an unknown format", "delete it and harvest again")
    problem = manifest_problem(manifest)
    if problem:
        raise XdiffError(
            f"the activation store manifest at {where} is corrupt ({problem})",
            "delete that activations/ directory (or rerun `xdiff run`, which redoes a corrupt harvest)",
        )
    if require_complete and not manifest.get("complete"):
        raise XdiffError(
            f"the activation store at {where} is incomplete (interrupted harvest)",
            "rerun the same harvest/run command to resume it",
        )


def manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is structurally wrong with a manifest (a field missing or of the wrong type), if anything."""
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return "no 'shards' list"
    for entry in shards:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("n_tokens"), int):
            return "a 'shards' entry lacks its name or token count"
        if Path(entry["name"]).name != entry["name"]:
            return f"shard name {entry['name']!r} is not a plain file name"
        if "crc32" in entry and not (isinstance(entry["crc32"], str) and re.fullmatch(r"[0-9a-f]{8}", entry["crc32"])):
            return f"shard {entry['name']} has a malformed checksum"
    for key in ("n_tokens", "documents_bytes", "next_doc_index"):
        if not isinstance(manifest.get(key), int):
            return f"'{key}' is missing or not an integer"
    if manifest.get("complete"):
        eval_start = manifest.get("eval_start_shard")
        if not isinstance(eval_start, int) or not 0 < eval_start < len(shards):
            return "'eval_start_shard' is missing or out of range"
        for key in ("scale_a", "scale_b"):
            value = manifest.get(key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                return f"'{key}' is missing or not a positive number"
    return None


def _file_sum(path: Path) -> dict[str, Any]:
    """`{"bytes", "crc32"}` as `atomic.py` recorded them when `path` was written ({} if not recorded)."""
    from xdiff_cli.atomic import recorded_sum

    entry = recorded_sum(path)
    return {"bytes": int(entry["size"]), "crc32": str(entry["crc32"])} if entry else {}


def _only_a_skeleton(directory: Path) -> bool:
    """True when `directory` holds nothing but what a harvest killed before its first manifest
    left (empty shards/, empty documents.jsonl, checksums, temporaries): safe to start over."""
    from xdiff_cli.atomic import SUMS_FILE

    clean_temp_files(directory)
    for path in directory.iterdir():
        if path.name == SHARDS_DIR and path.is_dir():
            if any(p.name != SUMS_FILE for p in path.iterdir()):
                return False
        elif path.name == DOCUMENTS and path.is_file():
            if path.stat().st_size:
                return False
        elif path.name != SUMS_FILE:
            return False
    return True


def mismatched_fields(manifest: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    return [key for key in IDENTITY_FIELDS if key in identity and manifest.get(key) != identity[key]]


class StoreWriter:
    """Appends shards to a store, keeping manifest, documents and shards consistent."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.dir = Path(directory)
        self.manifest = manifest

    @classmethod
    def open_or_create(cls, directory: Path | str, identity: dict[str, Any]) -> StoreWriter:
        """Start a store, or continue one whose identity matches; a mismatch is refused."""
        directory = Path(directory)
        if (directory / MANIFEST).is_file():
            manifest = ActivationStore.open(directory, require_complete=False).manifest
            wrong = mismatched_fields(manifest, identity)
            if wrong:
                details = ", ".join(f"{k}: stored {manifest.get(k)!r} vs requested {identity[k]!r}" for k in wrong)
                raise XdiffError(
                    f"the activation store at {directory} was harvested with different settings ({details})",
                    "start a new run, or delete that activations/ directory to harvest again",
                )
            writer = cls(directory, manifest)
            writer._discard_partial_writes()
            return writer
        if directory.exists() and not _only_a_skeleton(directory):
            raise XdiffError(
                f"{directory} exists but holds no activation store manifest",
                "delete it or choose another run/output directory",
            )
        manifest = {
            "format_version": FORMAT_VERSION,
            **identity,
            "aligned_fraction": None,
            "scale_a": None,
            "scale_b": None,
            "n_tokens": 0,
            "shards": [],
            "eval_start_shard": None,
            "complete": False,
            "documents_bytes": 0,
            "next_doc_index": 0,
            "stats": {},
        }
        (directory / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        (directory / DOCUMENTS).touch()
        record_checksum(directory / DOCUMENTS)
        writer = cls(directory, manifest)
        writer._save()
        return writer

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def _save(self) -> None:
        write_json(self.dir / MANIFEST, self.manifest)

    def _discard_partial_writes(self) -> None:
        """Forget what an interrupted harvest wrote after the last manifest update."""
        docs = self.dir / DOCUMENTS
        with docs.open("ab") as fh:
            fh.truncate(self.manifest["documents_bytes"])
        record_checksum(docs)
        listed = {s["name"] for s in self.manifest["shards"]}
        for path in (self.dir / SHARDS_DIR).glob("shard-*"):
            if path.name not in listed:
                path.unlink()
        clean_temp_files(self.dir)

    def write_shard(
        self, shard: Shard, documents: list[tuple[int, str]], next_doc_index: int, stats: dict[str, float]
    ) -> None:
        """Append one shard, the documents its pairs point into, and count it in the manifest.

        `next_doc_index` is the corpus position to resume from; `stats` are counters added
        to the manifest's running totals.
        """
        from safetensors.torch import save_file

        index = len(self.manifest["shards"])
        name = shard_name(index)
        with atomic_path(self.dir / SHARDS_DIR / name) as tmp:
            save_file({k: v.contiguous() for k, v in shard.tensors().items()}, str(tmp))
        lines = "".join(json.dumps({"doc_id": d, "text": t}, ensure_ascii=False) + "\n" for d, t in documents)
        docs = self.dir / DOCUMENTS
        try:
            with docs.open("ab") as fh:
                fh.truncate(self.manifest["documents_bytes"])
                fh.write(lines.encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(docs) from exc
            raise
        record_checksum(docs)
        first_doc = int(shard.doc_id[0]) if len(shard) else None
        # Size and CRC-32 in the manifest: a copy read elsewhere (`data/remote.py`) is checked against them.
        self.manifest["shards"].append(
            {"name": name, "n_tokens": len(shard), "first_doc_id": first_doc, **_file_sum(self.dir / SHARDS_DIR / name)}
        )
        self.manifest["n_tokens"] += len(shard)
        self.manifest["documents_bytes"] = docs.stat().st_size
        self.manifest["documents_crc32"] = _file_sum(docs).get("crc32")
        self.manifest["next_doc_index"] = next_doc_index
        totals = self.manifest["stats"]
        for key, value in stats.items():
            totals[key] = totals.get(key, 0) + value
        self._save()

    def finish(self, *, scale_a: float, scale_b: float, aligned_fraction: float, eval_fraction: float) -> None:
        n = len(self.manifest["shards"])
        if n < 2:
            raise XdiffError(
                f"the corpus yielded only {self.manifest['n_tokens']} aligned tokens ({n} shard)",
                "use a larger corpus (or more --tokens) so there are train and eval shards",
            )
        start = eval_start_shard([s["n_tokens"] for s in self.manifest["shards"]], eval_fraction)
        self.manifest.update(
            scale_a=scale_a, scale_b=scale_b, aligned_fraction=aligned_fraction,
            eval_start_shard=start, complete=True,
        )
        self._save()

    def finish_part(self, *, aligned_fraction: float) -> None:
        """Mark one part of a sharded harvest complete (`parts.merge_parts` splits and scales)."""
        self.manifest.update(aligned_fraction=aligned_fraction, complete=True)
        self._save()
