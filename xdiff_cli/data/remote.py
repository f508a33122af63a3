"""Activation stores that live elsewhere: read through fsspec, shard by shard, into a bounded cache.

Input: a URL of a store's `activations/` folder (`s3://bucket/run/activations`,
`hf://datasets/org/name/activations`, `gs://…`, `http(s)://…`, `file:///…`, `memory://…`).
Output: a `RemoteActivationStore`, an `ActivationStore` whose `load_shard(i)` fetches shard i
on first use into the local cache and reads it from there, so training and analysis never
need the whole store on local disk. `prefetch(i)` starts that fetch on a background thread:
the trainer's shuffle buffer and the analysis pass name the next shard while they read one.

The cache (`<cache>/stores/<hash of the URL>/`, one root for every store on this machine):
- bounded: the shards in it take at most `XDIFF_STORE_CACHE` bytes (default 20G; accepts
  K/M/G/T suffixes); before a download the least recently used shards are evicted to make
  room (a shard larger than the bound is refused). The manifest and documents.jsonl (text,
  needed whole for examples) are kept beside it, outside the bound;
- atomic: a shard is downloaded into a hidden temporary (which declares its final size, so
  concurrent processes, e.g. torchrun ranks on one node, count it against the bound), checked
  and only then renamed into place; an interrupted download leaves no shard behind;
- checked: size and CRC-32 must equal the manifest's (recorded at harvest time, `store.py`;
  older stores: the `shards/.xdiff-sums.json` uploaded beside them). A cached file is named
  by its checksum, so a hit needs no re-read and a replaced remote store is never mixed up
  with a stale copy.

Backends are optional: `s3://` needs s3fs, `gs://` gcsfs, `http(s)://` aiohttp; a missing one is
a one-line error naming the package to install. `hf://` comes with huggingface_hub: the hub's
environment is read when a store is opened, as for model downloads (`HF_ENDPOINT`,
`HF_HUB_OFFLINE`; `HF_TOKEN` or `hf auth login` for private and gated repos).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xdiff_cli.data.store import (
    DOCUMENTS,
    MANIFEST,
    SHARDS_DIR,
    ActivationStore,
    Shard,
    check_manifest,
    load_shard_file,
)
from xdiff_cli.errors import XdiffError

CACHE_ENV = "XDIFF_STORE_CACHE"
DEFAULT_CACHE_BYTES = 20 * 10**9
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# fsspec protocols whose backend is another package than the one its registry names.
_BACKEND_PACKAGE = {"http": "aiohttp", "https": "aiohttp"}
_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def is_url(location: str) -> bool:
    """A URL (`scheme://…`) rather than a local path."""
    return bool(_URL_RE.match(location))


def cache_limit() -> int:
    """The cache bound in bytes: `XDIFF_STORE_CACHE` ("20G", "500M", "1000000"), default 20 GB."""
    text = os.environ.get(CACHE_ENV, "").strip().lower().removesuffix("b")
    if not text:
        return DEFAULT_CACHE_BYTES
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?", text)
    if not match:
        raise XdiffError(f"{CACHE_ENV}={os.environ[CACHE_ENV]!r} is not a size", f"set it like {CACHE_ENV}=20G")
    return int(float(match.group(1)) * _SUFFIXES[match.group(2)])


def cache_shortfall_note(split: Any, epochs: float, share: float = 1.0) -> str | None:
    """A note when training would read a remote split for more than one epoch through a cache
    too small to hold what this machine reads of it (`share`: the fraction of the split its
    ranks read): least-recently-used eviction then downloads most shards again every epoch."""
    cache = getattr(split.store, "cache", None)
    if cache is None or epochs <= 1:
        return None
    shards = split.store.manifest["shards"]
    needed = share * sum(int(shards[i].get("bytes") or 0) for i in split.shard_indices)
    if needed <= cache.limit:
        return None
    wanted = max(1, math.ceil(needed * 1.1 / 1e9))
    return (f"the store cache ({cache.limit / 1e9:.1f} GB) is smaller than the {needed / 1e9:.1f} GB of shards "
            f"this machine trains on for {epochs:.1f} epochs: most are downloaded again every epoch; "
            f"set {CACHE_ENV}={wanted}G to fetch each once")


def cache_root() -> Path:
    from xdiff_cli import paths

    return paths.cache_root() / "stores"


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for `url`; a missing backend is a one-line error."""
    import fsspec.core
    from fsspec.registry import known_implementations

    protocol = url.split("://", 1)[0].lower()
    options = _hub_options() if protocol == "hf" else {}
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        known = known_implementations.get(protocol, {})
        package = _BACKEND_PACKAGE.get(protocol) or known.get("class", protocol).split(".")[0]
        raise XdiffError(f"reading {protocol}:// stores needs the {package} package", f"pip install {package}") from exc
    except ValueError as exc:
        raise XdiffError(f"{url}: unknown storage protocol {protocol!r} ({exc})",
                         "use a directory, or an fsspec URL such as s3://, gs://, hf://, https:// or file://") from exc


def _hub_options() -> dict[str, Any]:
    """HfFileSystem's options from the environment now: huggingface_hub froze HF_ENDPOINT when
    it was imported (the same reason `models/hub.py` passes it). The token it reads itself at
    every request (HF_TOKEN, else the one `hf auth login` stored)."""
    from xdiff_cli.models.hub import hub_offline

    if hub_offline():
        raise XdiffError("hf:// stores are read from the hub, and offline mode is on (HF_HUB_OFFLINE)",
                         "unset HF_HUB_OFFLINE, or download the activations/ folder and give its directory")
    return {"endpoint": os.environ.get("HF_ENDPOINT") or None}


def _access_hint(exc: BaseException) -> str:
    """What to do when a read failed with `exc` (the hub answers 401/403 for gated and private
    repos without a token that may read them)."""
    response = getattr(exc, "response", None)
    if type(exc).__module__.startswith("huggingface_hub") and getattr(response, "status_code", None) in (401, 403):
        return "a private or gated repo: accept its terms on the hub, then set HF_TOKEN (or run `hf auth login`)"
    return "check the URL, your credentials and the network"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0]}" if text else exc.__class__.__name__


# ---------------------------------------------------------------------------------------
# The bounded cache
# ---------------------------------------------------------------------------------------


class StoreCache:
    """Shard files under `root/*/shards/`, at most `limit` bytes together, least recently used
    evicted first. `evicted` lists what this process evicted (for tests and notes)."""

    TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<tag>[0-9a-f]+)\.(?P<size>\d+)\.tmp$")

    def __init__(self, root: Path, limit: int) -> None:
        self.root, self.limit = Path(root), int(limit)
        self.evicted: list[Path] = []

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One process at a time decides what to evict (a blocking flock: waits are short)."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _entries(self) -> tuple[list[tuple[float, int, Path]], int]:
        """(complete shards as (mtime, size, path), bytes reserved by live downloads);
        temporaries of processes that died are removed."""
        files, reserved = [], 0
        for path in self.root.glob(f"*/{SHARDS_DIR}/*"):
            temp = self.TEMP_RE.match(path.name)
            try:
                if temp is None:
                    stat = path.stat()
                    files.append((stat.st_mtime, stat.st_size, path))
                elif _alive(int(temp.group("pid"))):
                    reserved += int(temp.group("size"))
                else:
                    path.unlink()
            except FileNotFoundError:  # removed by another process meanwhile
                continue
        return files, reserved

    def usage(self) -> int:
        files, reserved = self._entries()
        return sum(size for _, size, _ in files) + reserved

    def fetch(self, fs: Any, remote: str, target: Path, size: int, crc32: str | None, what: str) -> Path:
        """`target` (a path under `root`), downloaded from `remote` unless cached; checked
        against `size` and `crc32`. `what` names it in errors ("shard X at URL")."""
        if target.is_file():
            with contextlib.suppress(FileNotFoundError):
                _touch(target)  # most recently used
                return target
        if size > self.limit:
            raise XdiffError(
                f"{what} is {size / 1e9:.2f} GB, more than the store cache may hold ({self.limit / 1e9:.2f} GB)",
                f"raise {CACHE_ENV} (e.g. {CACHE_ENV}={max(1, 2 * size // 10**9)}G)",
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        # pid: a dead process's reservation is dropped; tag: two threads never share a temporary.
        temp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{size}.tmp")
        with self._locked():
            files, reserved = self._entries()
            used = sum(s for _, s, _ in files) + reserved
            for _, file_size, path in sorted(files):
                if used + size <= self.limit:
                    break
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    self.evicted.append(path)
                used -= file_size
            temp.touch()  # reserves `size` bytes for the other processes
        try:
            download_checked(fs, remote, temp, size, crc32, what)
            os.replace(temp, target)
            with contextlib.suppress(FileNotFoundError):  # another reader may evict it at once
                _touch(target)
        finally:
            temp.unlink(missing_ok=True)
        return target


def download_checked(fs: Any, remote: str, temp: Path, size: int | None, crc32: str | None, what: str) -> None:
    """Download `remote` to `temp` and check it against the manifest's size and CRC-32; any
    failure is a one-line error naming `what` ("shard X at URL")."""
    try:
        fs.get_file(remote, str(temp))
    except FileNotFoundError as exc:
        raise XdiffError(f"{what} is listed in the store's manifest but missing",
                         "upload the whole activations/ folder again") from exc
    except Exception as exc:  # network, permissions: the backend's own exception types
        raise XdiffError(f"could not download {what} ({_first_line(exc)})",
                         f"{_access_hint(exc)}, then rerun to resume") from exc
    problem = _mismatch(temp, size, crc32)
    if problem:
        raise XdiffError(f"{what} does not match the store's manifest ({problem})",
                         "the remote copy is damaged or was replaced: upload it again, or harvest again")


def _touch(path: Path) -> None:
    """Set the mtime (the LRU order) from the fine clock: the filesystem's own is coarse (ms)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mismatch(path: Path, size: int | None, crc32: str | None) -> str | None:
    from xdiff_cli.atomic import file_checksum

    got = path.stat().st_size
    if size is not None and got != size:
        return f"{got:,} bytes, {size:,} expected"
    if crc32 is not None and file_checksum(path) != crc32:
        return "checksum differs"
    return None


# ---------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------


class RemoteActivationStore(ActivationStore):
    """An `ActivationStore` at a URL: the manifest is read at open, shards and documents are
    fetched into the cache when first needed. `self.dir` is this store's cache directory."""

    def __init__(self, url: str, manifest: dict[str, Any], fs: Any, root: str, cache: StoreCache) -> None:
        key = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
        super().__init__(cache.root / key, manifest)
        self.url, self.fs, self.root, self.cache = url, fs, root.rstrip("/"), cache
        self._sums: dict[str, Any] | None = None
        self._warned_unchecked = False
        self._pending: dict[int, Any] = {}  # shard index -> Future of a read-ahead fetch
        self._reader: Any = None  # one background thread for read-ahead

    @property
    def location(self) -> str:
        return self.url

    @classmethod
    def open_url(cls, url: str, *, require_complete: bool = True, cache: StoreCache | None = None) -> RemoteActivationStore:
        url = url.rstrip("/")
        fs, root = filesystem(url)
        # fsspec shares one filesystem object per URL kind in a process: forget the listings an
        # earlier open cached (sizes of a store replaced since would fail the download checks).
        with contextlib.suppress(Exception):
            fs.invalidate_cache()
        try:
            raw = fs.cat_file(f"{root.rstrip('/')}/{MANIFEST}")
        except FileNotFoundError as exc:
            # HfFileSystem says why a path is missing: "(repository not found)", "(revision not found)".
            reason = re.search(r"\((repository|revision) not found\)", str(exc))
            if reason:
                raise XdiffError(f"no activation store at {url} ({reason.group(1)} not found)",
                                 "check the repo id and revision in the URL; a private repo needs HF_TOKEN "
                                 "(or `hf auth login`)") from exc
            raise XdiffError(f"no activation store at {url} (no {MANIFEST} there)",
                             "give the URL of a harvested run's activations/ folder") from exc
        except Exception as exc:
            raise XdiffError(f"could not read the activation store at {url} ({_first_line(exc)})",
                             _access_hint(exc)) from exc
        try:
            manifest = json.loads(raw)
        except ValueError as exc:
            raise XdiffError(f"the activation store manifest at {url} is not JSON", "upload it again") from exc
        check_manifest(manifest, url, require_complete=require_complete)
        store = cls(url, manifest, fs, root, cache or StoreCache(cache_root(), cache_limit()))
        from xdiff_cli.atomic import write_json

        write_json(store.dir / MANIFEST, manifest)  # what the cached files belong to (for people looking)
        return store

    def _remote(self, *relative: str) -> str:
        return "/".join((self.root, *relative))

    def _recorded(self, name: str) -> tuple[int | None, str | None]:
        """(size, crc32) of a shard: the manifest's, else the uploaded `.xdiff-sums.json`'s."""
        entry = next(e for e in self.manifest["shards"] if e["name"] == name)
        if "crc32" in entry:
            return entry.get("bytes"), entry["crc32"]
        if self._sums is None:
            from xdiff_cli.atomic import SUMS_FILE

            try:
                self._sums = json.loads(self.fs.cat_file(self._remote(SHARDS_DIR, SUMS_FILE)))
            except Exception:  # older store uploaded without it: size-only check below
                self._sums = {}
        recorded = self._sums.get(name) if isinstance(self._sums, dict) else None
        if isinstance(recorded, dict) and re.fullmatch(r"[0-9a-f]{8}", str(recorded.get("crc32"))):
            return int(recorded["size"]), str(recorded["crc32"])
        if not self._warned_unchecked:
            from xdiff_cli.console import err_console

            err_console.print(f"[yellow]note:[/] the store at {self.url} records no shard checksums "
                              "(harvested by an older xdiff); shards are checked for size only")
            self._warned_unchecked = True
        return None, None

    def shard_path(self, index: int) -> Path:
        """The cached copy of shard `index` (fetched now if it is not cached)."""
        name = self.manifest["shards"][index]["name"]
        size, crc32 = self._recorded(name)
        if size is None:
            size = int(self.fs.size(self._remote(SHARDS_DIR, name)))
        stem = name.removesuffix(".safetensors")
        local = self.dir / SHARDS_DIR / (f"{stem}.{crc32}.safetensors" if crc32 else name)
        return self.cache.fetch(self.fs, self._remote(SHARDS_DIR, name), local, size, crc32,
                                f"shard {name} at {self.url}")

    def prefetch(self, index: int) -> None:
        """Start fetching shard `index` in the background (read-ahead: the download overlaps
        the caller's work on the current shard). Its errors surface when it is loaded."""
        if index in self._pending or not 0 <= index < self.num_shards:
            return
        if self._reader is None:
            from concurrent.futures import ThreadPoolExecutor

            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xdiff-store-read-ahead")
        self._pending[index] = self._reader.submit(self.shard_path, index)

    def load_shard(self, index: int) -> Shard:
        pending = self._pending.pop(index, None)
        if pending is not None:
            with contextlib.suppress(Exception):  # a failed read-ahead: the fetch below says why
                pending.result()
        for _ in range(3):  # another reader (a torchrun rank) may evict it between fetch and read
            path = self.shard_path(index)
            try:
                return load_shard_file(path)
            except XdiffError:
                if path.is_file():
                    raise
        return load_shard_file(self.shard_path(index))

    def document_text(self, doc_id: int) -> str:
        self._fetch_documents()
        return super().document_text(doc_id)

    def _fetch_documents(self) -> None:
        local = self.dir / DOCUMENTS
        size, crc32 = self.manifest["documents_bytes"], self.manifest.get("documents_crc32")
        marker = self.dir / f".{DOCUMENTS}.checked"
        if local.is_file() and marker.is_file() and marker.read_text() == f"{size} {crc32}":
            return
        self._doc_offsets = None
        local.unlink(missing_ok=True)
        marker.unlink(missing_ok=True)
        from xdiff_cli.atomic import atomic_path

        with atomic_path(local) as temp:
            download_checked(self.fs, self._remote(DOCUMENTS), temp, size, crc32, f"{DOCUMENTS} at {self.url}")
        marker.write_text(f"{size} {crc32}")
