"""Atomic file writes: a later command never trusts a half-written artifact.

Write to a temporary sibling, fsync, then rename over the target (rename is atomic on
POSIX within one filesystem). A full disk surfaces as an `XdiffError`, never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xdiff_cli.errors import XdiffError


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
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise disk_full_error(target) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
