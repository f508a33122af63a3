"""Exclusive locks: one process at a time per run directory and per shared cache entry.

A lock is an `fcntl.flock` on a small file that also names its holder (pid and command), so
the second command can say who has it. The kernel drops the lock when the holder exits,
even on SIGKILL, so a stale lock file never blocks anyone.

Locks are re-entrant within a process (a stage runner holding the run lock may call code
that asks for it again).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from xdiff_cli.errors import XdiffError

_HELD: dict[str, tuple[int, int]] = {}  # resolved lock path -> (fd, depth) for this process


def holder(lock_path: Path) -> str:
    """Who holds `lock_path`, as the holder wrote it ('process 123 (xdiff run ...)')."""
    try:
        info = json.loads(Path(lock_path).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return "another process"
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    command = info.get("command")
    return f"process {info['pid']}" + (f" ({command})" if command else "")


@contextmanager
def exclusive(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` or fail at once naming the holder.

    `what` names the locked thing in the error ("run 2024-…", "the tiny-model cache")."""
    import fcntl

    lock_path = Path(lock_path)
    key = str(lock_path.resolve())
    if key in _HELD:
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _HELD[key]
            _HELD[key] = (fd, depth - 1)
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise XdiffError(
            f"{what} is in use by {holder(lock_path)}",
            "wait for it to finish (or stop it), then run this command again",
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": " ".join(["xdiff", *sys.argv[1:]])}).encode())
        _HELD[key] = (fd, 1)
        yield
    finally:
        depth = _HELD.get(key, (fd, 1))[1]
        if depth <= 1:
            _HELD.pop(key, None)
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def is_locked(lock_path: Path) -> bool:
    """Whether another process holds `lock_path` right now (never blocks)."""
    import fcntl

    lock_path = Path(lock_path)
    if str(lock_path.resolve()) in _HELD or not lock_path.is_file():
        return False
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we may just have taken
    return False
