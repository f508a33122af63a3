"""Is a finished stage's output still what the stage wrote?

A stage is recorded done only after its artifacts are complete, but files can be truncated,
overwritten or corrupted afterwards (a full disk, a copy that stopped, a bad sector). Before
a later command trusts a done stage, these checks look at each artifact's size, header and
the checksum `atomic.py` recorded when it was written:

- activation store: manifest structure, every listed shard (safetensors header covers the
  file exactly; recorded checksum), documents.jsonl (size in the manifest; checksum);
- crosscoder (`final/`): model.safetensors header and checksum, config.json;
- analysis.sqlite: SQLite header, `PRAGMA quick_check`, the `complete` flag.

Each check returns a one-line reason, or None when the artifact is sound.
"""

from __future__ import annotations

import json
import sqlite3
import struct
from pathlib import Path
from typing import Any

from xdiff_cli.atomic import recorded_mismatch
from xdiff_cli.errors import XdiffError

SQLITE_MAGIC = b"SQLite format 3\x00"
MAX_SAFETENSORS_HEADER = 100_000_000  # the format's own limit


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file (header + exactly the data it declares)."""
    path = Path(path)
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_SAFETENSORS_HEADER or 8 + header_len > size:
                return f"{path.name} is truncated or not a safetensors file"
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError) as exc:
        return f"{path.name} has an unreadable header ({exc.__class__.__name__})"
    if not isinstance(header, dict):
        return f"{path.name} has an unreadable header"
    ends = [
        entry["data_offsets"][1]
        for key, entry in header.items()
        if key != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
    ]
    expected = 8 + header_len + (max(ends) if ends else 0)
    if expected != size:
        how = "truncated" if size < expected else "longer than it should be"
        return f"{path.name} is {how} ({size:,} bytes, its header describes {expected:,})"
    return _mismatch(path)


def _mismatch(path: Path) -> str | None:
    reason = recorded_mismatch(path)
    return f"{Path(path).name}: {reason}" if reason else None


def store_problem(directory: Path) -> str | None:
    """Why the activation store at `directory` cannot be trusted, or None."""
    from xdiff_cli.data.remote import is_url
    from xdiff_cli.data.store import DOCUMENTS, MANIFEST, SHARDS_DIR, ActivationStore, open_store

    if is_url(str(directory)):  # a store elsewhere: its shards are checked when fetched (data/remote.py)
        try:
            open_store(str(directory))
        except XdiffError as exc:
            return exc.message
        return None
    directory = Path(directory)
    try:
        manifest = ActivationStore.open(directory).manifest  # structure, completeness
    except XdiffError as exc:
        return exc.message
    manifest_issue = _mismatch(directory / MANIFEST)
    if manifest_issue:
        return manifest_issue
    docs = directory / DOCUMENTS
    if not docs.is_file():
        return f"{DOCUMENTS} is missing"
    if docs.stat().st_size != manifest["documents_bytes"]:
        return f"{DOCUMENTS} is {docs.stat().st_size:,} bytes, the manifest says {manifest['documents_bytes']:,}"
    docs_issue = _mismatch(docs)
    if docs_issue:
        return docs_issue
    for entry in manifest["shards"]:
        problem = safetensors_problem(directory / SHARDS_DIR / entry["name"])
        if problem:
            return problem
    return None


def crosscoder_problem(directory: Path) -> str | None:
    """Why the crosscoder saved in `directory` (model.safetensors + config.json) is unusable, or None."""
    directory = Path(directory)
    problem = safetensors_problem(directory / "model.safetensors")
    if problem:
        return problem
    config = directory / "config.json"
    try:
        if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
            return "config.json is not an object"
    except FileNotFoundError:
        return "config.json is missing"
    except (OSError, ValueError):
        return "config.json is unreadable"
    return _mismatch(config)


def sqlite_problem(path: Path) -> str | None:
    """Why the SQLite file at `path` is damaged (header, page structure), or None."""
    path = Path(path)
    if not path.is_file():
        return f"{path.name} is missing"
    with path.open("rb") as fh:
        if fh.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
            return f"{path.name} is not an SQLite database"
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute("PRAGMA quick_check").fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        return f"{path.name} is corrupt ({exc})"
    if rows != [("ok",)]:
        return f"{path.name} is corrupt ({rows[0][0] if rows else 'quick_check gave no answer'})"
    return None


def analysis_problem(path: Path) -> str | None:
    """Why `analysis.sqlite` is not a complete, sound analysis, or None."""
    problem = sqlite_problem(path)
    if problem:
        return problem
    from xdiff_cli.findings.feature_index import FeatureIndex

    try:
        index = FeatureIndex.open(path)
        try:
            complete = index.meta.get("complete")
        finally:
            index.close()
    except XdiffError as exc:
        return exc.message
    return None if complete else f"{Path(path).name} is incomplete"


def stage_problem(run: Any, stage: str) -> str | None:
    """Why a stage recorded as done cannot be trusted (its artifacts are damaged), or None."""
    if stage == "harvest":
        return store_problem(run.store_location)
    if stage == "train":
        return crosscoder_problem(Path(run.crosscoder_dir) / "final")
    if stage == "analyze":
        return analysis_problem(run.analysis_path)
    return None
