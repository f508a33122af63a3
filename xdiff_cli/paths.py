"""Where xdiff keeps its files.

Everything lives under one root: platformdirs' user data dir for `xdiff`, or
`$XDIFF_HOME` when set (tests and shared boxes). Model weights stay in Hugging Face's own
cache (`HF_HOME`/`HF_HUB_CACHE`) so downloads are shared with other tools.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

APP_NAME = "xdiff"
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def validate_id(value: str, what: str = "run name") -> str:
    """A name safe as one path component: letters, digits, '.', '_', '-'; no '/', no '..'."""
    if not isinstance(value, str) or not ID_RE.match(value) or ".." in value:
        from xdiff_cli.errors import XdiffError

        raise XdiffError(f"invalid {what} {value!r}", "use letters, digits, '.', '_' and '-' (no '/' or '..')")
    return value


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


def contained(root: Path, child: Path) -> Path:
    """`child` resolved, after checking it stays inside `root` (no '..' or symlink escapes).

    Every path built from user input (a run name, an id) goes through this before use."""
    from xdiff_cli.errors import XdiffError

    root_r, child_r = Path(root).resolve(), Path(child).resolve()
    if child_r != root_r and root_r not in child_r.parents:
        raise XdiffError(f"{child} is outside {root}", "refusing to touch files outside the data directory")
    return child_r


DISK_HEADROOM = 1.10  # ask for 10% more than the estimate: filesystems and estimates are not exact


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that holds (or will hold) `path`."""
    import shutil

    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_free_space(path: Path, needed_bytes: int, what: str) -> None:
    """Fail before writing when `what` (~`needed_bytes`) will not fit under `path`."""
    from xdiff_cli.errors import XdiffError

    if needed_bytes <= 0:
        return
    from xdiff_cli.run.formatting import format_bytes

    free = free_bytes(path)
    if needed_bytes * DISK_HEADROOM > free:
        raise XdiffError(
            f"not enough disk for {what}: needs ~{format_bytes(needed_bytes)} (+{DISK_HEADROOM - 1:.0%} headroom), "
            f"{format_bytes(free)} free under {path}",
            "lower --tokens, free space, or point XDIFF_HOME at a bigger disk",
        )
