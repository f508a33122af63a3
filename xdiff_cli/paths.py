"""Where xdiff keeps its files.

Everything lives under one root: platformdirs' user data dir for `xdiff`, or
`$XDIFF_HOME` when set (tests and shared boxes). Model weights stay in Hugging Face's own
cache (`HF_HOME`/`HF_HUB_CACHE`) so downloads are shared with other tools.
"""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "xdiff"


def data_root() -> Path:
    """The root of all xdiff data (runs, tiny models, caches)."""
    override = os.environ.get("XDIFF_HOME")
    if override:
        return Path(override).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir(APP_NAME, appauthor=False))


def runs_root() -> Path:
    return data_root() / "runs"


def cache_root() -> Path:
    """Recomputable caches (e.g. locally built demo models)."""
    override = os.environ.get("XDIFF_HOME")
    if override:
        return Path(override).expanduser() / "cache"
    from platformdirs import user_cache_dir

    return Path(user_cache_dir(APP_NAME, appauthor=False))


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def dir_bytes(path: Path) -> int:
    """Total size of the files under `path` (0 when it does not exist)."""
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0
