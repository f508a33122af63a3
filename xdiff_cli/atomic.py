"""Atomic file writes: a later command never trusts a half-written artifact.

Write to a temporary sibling, fsync, then rename over the target (rename is atomic on
POSIX within one filesystem). A full disk surfaces as an `XdiffError`, never a traceback.

Every file written here also gets its size and CRC-32 recorded in its directory's
`.xdiff-sums.json`, so a stage declared done can check that its artifacts are still the
bytes it wrote (`recorded_mismatch`). Temporaries a killed process left behind
(`.NAME.*.tmp`, SQLite journals, `.step-*.tmp/`) are removed by `clean_temp_files`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xdiff_cli.errors import XdiffError

SUMS_FILE = ".xdiff-sums.json"
_sums_lock = threading.Lock()  # the harvest writes shards from a background thread
# errno values that mean "no room": ENOSPC, EFBIG (file too large), EDQUOT (quota).
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def is_disk_full(exc: BaseException) -> bool:
    """A full disk, however it surfaced: an OSError errno, or a message from a library
    (safetensors raises `SafetensorError`, SQLite `OperationalError`) that lost the errno."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    text = str(exc).lower()
    return any(s in text for s in ("no space left", "file too large", "disk quota", "database or disk is full"))


def disk_full_error(path: Path) -> XdiffError:
    return XdiffError(
        f"the disk holding {path.parent} is full",
        "free some space (or point XDIFF_HOME elsewhere), then rerun the same command to resume",
    )


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; on success rename it onto `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        digest = file_checksum(tmp)
        size = tmp.stat().st_size
        os.replace(tmp, target)
        _store_sum(target, size, digest)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and is_disk_full(exc):
            raise disk_full_error(target) from exc
        raise


# --- checksums recorded at write time --------------------------------------------------


def _read_sums(directory: Path) -> dict[str, Any]:
    try:
        sums = json.loads((directory / SUMS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return sums if isinstance(sums, dict) else {}


def _store_sum(target: Path, size: int, digest: str) -> None:
    with _sums_lock:
        sums = _read_sums(target.parent)
        sums[target.name] = {"size": size, "crc32": digest}
        fd, tmp_name = tempfile.mkstemp(prefix=f".{SUMS_FILE}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(sums, fh, indent=0, sort_keys=True)
            os.replace(tmp_name, target.parent / SUMS_FILE)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


def file_checksum(path: Path) -> str:
    """CRC-32 of the file, as 8 hex digits. It guards against truncation and damage, not
    tampering; CRC-32 runs ~3x faster than SHA-256 here, and shards are hundreds of MB."""
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def record_checksum(path: Path) -> None:
    """Record the current size and checksum of a file written in place (an append-only log)."""
    path = Path(path)
    _store_sum(path, path.stat().st_size, file_checksum(path))


def carry_recorded_sum(source: Path, target: Path) -> None:
    """Record for `target` (a hard link or byte copy of `source`) the sum recorded for `source`."""
    source, target = Path(source), Path(target)
    entry = _read_sums(source.parent).get(source.name)
    if isinstance(entry, dict) and "crc32" in entry:
        _store_sum(target, int(entry["size"]), str(entry["crc32"]))


def recorded_sum(path: Path) -> dict[str, Any] | None:
    """`{"size", "crc32"}` recorded for `path` when it was written, or None."""
    path = Path(path)
    entry = _read_sums(path.parent).get(path.name)
    return entry if isinstance(entry, dict) and "crc32" in entry else None


def recorded_mismatch(path: Path) -> str | None:
    """Why `path` is not the file recorded at write time, or None when it matches.

    A file with no record (written by an older xdiff) is not called corrupt here; the
    format checks in `integrity.py` still apply to it.
    """
    path = Path(path)
    if not path.is_file():
        return "missing"
    entry = _read_sums(path.parent).get(path.name)
    if not isinstance(entry, dict):
        return None
    size = path.stat().st_size
    if size != entry.get("size"):
        return f"{size:,} bytes, {entry.get('size', 0):,} were written"
    if "crc32" in entry and file_checksum(path) != entry["crc32"]:
        return "checksum differs from the one recorded when it was written"
    return None


# --- temporaries left by killed or disk-full runs ---------------------------------------

_TEMP_SUFFIXES = (".tmp", ".tmp-journal", ".tmp-wal", ".tmp-shm")


def clean_temp_files(directory: Path, *, recursive: bool = True) -> list[Path]:
    """Delete temporaries an interrupted write left in `directory`; returns what was removed.

    Only names our writers create: hidden `.NAME.*.tmp` files (and SQLite's journals next to
    them) and hidden `.step-*.tmp` checkpoint folders. Call it at the start of the stage that
    owns the directory (the run lock keeps a concurrent writer out).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    entries = directory.rglob(".*") if recursive else directory.glob(".*")
    for path in sorted(entries, key=lambda p: len(p.parts), reverse=True):
        if not path.name.endswith(_TEMP_SUFFIXES):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def write_text(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, what: str) -> Any:
    """Read a JSON artifact, turning corruption into a one-line user error."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise XdiffError(f"{what} not found at {path}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise XdiffError(
            f"{what} at {path} is corrupt ({exc.__class__.__name__})",
            "delete it and rerun the stage that writes it",
        ) from exc
