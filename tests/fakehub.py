"""A fake Hugging Face Hub on 127.0.0.1, so tests exercise the real download code.

It serves local directories as model or dataset repos through the routes that
`huggingface_hub.snapshot_download` and `HfFileSystem` (`hf://` URLs) use; `{type}` is `models`
or `datasets`, and a dataset's files resolve under `/datasets/{repo}/…`:

- `GET  /api/{type}/{repo}[/revision/{rev}]`               repo info, whose `sha` is the commit
- `GET  /api/{type}/{repo}/tree/{rev}[/{path}]?recursive=…` the listing of a folder (the root
  by default): its files and sub-folders, or everything below it when recursive
- `POST /api/{type}/{repo}/paths-info/{rev}`               entries of the form's `paths`
- `HEAD /{repo}/resolve/{rev}/{file}`                      metadata: `X-Repo-Commit`, `ETag`, size
- `GET  /{repo}/resolve/{rev}/{file}`                      the bytes, honouring `Range: bytes=N-`
  and `bytes=N-M`

A missing repo or revision answers 404 with the Hub's `X-Error-Code`; a gated repo answers
its metadata (as the real Hub does) but refuses file downloads with 401 (no token) or 403
(a token without access), `X-Error-Code: GatedRepo`. `drop_once` makes the next download
of a file stop half-way through its body (the client must resume with a Range request);
`fail` makes every download of a file answer 500 until cleared.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, bytes]
    sha: str
    revisions: dict[str, str] = field(default_factory=dict)  # branch/tag -> sha
    gated: bool = False
    allowed_tokens: set[str] = field(default_factory=set)
    repo_type: str = "model"

    def resolve(self, revision: str) -> str | None:
        if revision == self.sha or revision in self.revisions.values():
            return revision
        return self.revisions.get(revision)


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_lfs(path: str) -> bool:
    return path.endswith((".safetensors", ".bin", ".model"))


class FakeHub:
    """Start with `with FakeHub() as hub:`; `hub.url` is the endpoint for HF_ENDPOINT."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers)
        self.drop_once: set[str] = set()  # file names whose next GET is cut half-way
        self.fail: set[str] = set()  # file names whose downloads answer 500
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- repos -------------------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        directory: Path | None = None,
        *,
        files: dict[str, bytes] | None = None,
        gated: bool = False,
        allowed_tokens: set[str] | None = None,
        extra_revisions: dict[str, dict[str, bytes]] | None = None,
        repo_type: str = "model",
    ) -> FakeRepo:
        """Serve `directory` (or `files`) as `repo_id` on branch `main`.

        `extra_revisions` maps a tag name to a different file set, served under its own sha.
        `repo_type` "dataset" serves it as `datasets/{repo_id}` (`hf://datasets/{repo_id}/…`).
        """
        content = dict(files or {})
        if directory is not None:
            for path in sorted(Path(directory).rglob("*")):
                if path.is_file():
                    content[path.relative_to(directory).as_posix()] = path.read_bytes()
        key = _key(repo_type, repo_id)
        sha = _commit_sha(key, content)
        repo = FakeRepo(repo_id, content, sha, {"main": sha}, gated, set(allowed_tokens or ()), repo_type)
        self.repos[key] = repo
        for tag, tag_files in (extra_revisions or {}).items():
            tag_sha = _commit_sha(key + tag, tag_files)
            self.repos[f"{key}@{tag_sha}"] = FakeRepo(repo_id, dict(tag_files), tag_sha, repo_type=repo_type)
            repo.revisions[tag] = tag_sha
        return repo

    def downloads(self, filename: str) -> list[dict[str, str]]:
        """Headers (lower-case keys) of every GET of `filename` so far, e.g. to see Range requests."""
        return [
            h for m, p, h in self.requests if m == "GET" and "/resolve/" in p and p.endswith("/" + filename)
        ]

    def _find(self, key: str, revision: str) -> tuple[FakeRepo | None, str | None]:
        repo = self.repos.get(key)
        if repo is None:
            return None, None
        sha = repo.resolve(revision)
        if sha is not None and sha != repo.sha:
            return self.repos[f"{key}@{sha}"], sha
        return repo, sha

    def _split_repo(self, parts: list[str], repo_type: str = "model") -> tuple[str, list[str]]:
        """(key of the repo, rest) from `org/name/rest…` or `name/rest…` (single-segment ids
        like `gpt2`)."""
        if parts and _key(repo_type, parts[0]) in self.repos:
            return _key(repo_type, parts[0]), parts[1:]
        return _key(repo_type, "/".join(parts[:2])), parts[2:]

    # --- server ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "start the hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _key(repo_type: str, repo_id: str) -> str:
    """Where a repo is kept in `FakeHub.repos`: models by id, datasets as `datasets/{id}`."""
    return repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"


def _commit_sha(repo_id: str, files: dict[str, bytes]) -> str:
    digest = hashlib.sha1(repo_id.encode())
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + _sha256(files[name]).encode())
    return digest.hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # keep test output quiet

    # --- helpers -------------------------------------------------------------------------
    def _send_json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str = "") -> None:
        headers = {"X-Error-Code": code}
        if message:
            headers["X-Error-Message"] = message
        self._send_json(status, {"error": message or code}, headers)

    def _record(self) -> None:
        with self.hub._lock:
            headers = {key.lower(): value for key, value in self.headers.items()}
            self.hub.requests.append((self.command, urlsplit(self.path).path, headers))

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth.removeprefix("Bearer ").strip() or None

    # --- routes ------------------------------------------------------------------------
    def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
        self._route()

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._route()

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        self._route()

    def _route(self) -> None:
        self._record()
        # Read a POST's form whole first: an answer must never leave body bytes on the connection.
        self._form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if len(parts) > 1 and parts[0] == "api" and parts[1] in ("models", "datasets"):
            key, rest = self.hub._split_repo(parts[2:], parts[1].removesuffix("s"))
            if self.command == "POST":
                if len(rest) == 2 and rest[0] == "paths-info":
                    return self._paths_info(key, rest[1])
                return self._error(404, "EntryNotFound", "unknown api route")
            if not rest or (len(rest) >= 2 and rest[0] == "revision"):
                return self._repo_info(key, "/".join(rest[1:]) or "main")
            if len(rest) >= 2 and rest[0] == "tree":
                recursive = parse_qs(url.query).get("recursive", ["False"])[0].lower() == "true"
                return self._tree(key, rest[1], "/".join(rest[2:]), recursive)
            return self._error(404, "EntryNotFound", "unknown api route")
        if parts[0] == "datasets":
            key, rest = self.hub._split_repo(parts[1:], "dataset")
        else:
            key, rest = self.hub._split_repo(parts)
        if len(rest) >= 3 and rest[0] == "resolve" and self.command != "POST":
            return self._resolve(key, rest[1], "/".join(rest[2:]))
        return self._error(404, "EntryNotFound", "unknown route")

    def _lookup(self, key: str, revision: str) -> tuple[FakeRepo, str] | None:
        repo, sha = self.hub._find(key, revision)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, sha

    def _repo_info(self, key: str, revision: str) -> None:
        found = self._lookup(key, revision)
        if found is None:
            return
        repo, sha = found
        self._send_json(
            200,
            {
                "id": repo.repo_id,
                **({"modelId": repo.repo_id} if repo.repo_type == "model" else {}),
                "sha": sha,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "siblings": [{"rfilename": name} for name in sorted(repo.files)],
            },
        )

    def _tree(self, key: str, revision: str, folder: str, recursive: bool) -> None:
        """The entries below `folder` ("" the root): its files and sub-folders, or with
        `recursive` every file and folder below it (the Hub lists folders in both)."""
        found = self._lookup(key, revision)
        if found is None:
            return
        repo, _ = found
        folder = folder.strip("/")
        prefix = f"{folder}/" if folder else ""
        paths = set()
        for name in repo.files:
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            paths.update(prefix + "/".join(parts[: i + 1]) for i in range(min(depth, len(parts))))
        if folder and not paths:
            return self._error(404, "EntryNotFound", f"{folder} does not exist on {revision}")
        self._send_json(200, [_entry(repo, path) for path in sorted(paths)])

    def _paths_info(self, key: str, revision: str) -> None:
        """The entries of the form's `paths` that exist (files or folders); others are left out."""
        found = self._lookup(key, revision)
        if found is None:
            return
        repo, _ = found
        folders = {name.rsplit("/", i)[0] for name in repo.files for i in range(1, name.count("/") + 1)}
        wanted = [p.strip("/") for p in self._form.get("paths", [])]
        self._send_json(200, [_entry(repo, p) for p in wanted if p in repo.files or p in folders])

    def _resolve(self, key: str, revision: str, filename: str) -> None:
        found = self._lookup(key, revision)
        if found is None:
            return
        repo, sha = found
        if repo.gated or self.hub.repos[key].gated:
            gate = self.hub.repos[key]
            token = self._token()
            if token is None:
                return self._error(401, "GatedRepo", "Access to this model is restricted; log in")
            if token not in gate.allowed_tokens:
                return self._error(403, "GatedRepo", "You have not been granted access to this model")
        if filename not in repo.files:
            return self._error(404, "EntryNotFound", f"{filename} does not exist")
        if self.command == "GET" and filename in self.hub.fail:
            return self._error(500, "ServerError", "internal error")
        data = repo.files[filename]
        etag = _sha256(data) if _is_lfs(filename) else _git_blob_sha(data)
        start, stop = self._range(len(data))
        body = data[start:stop]
        ranged = start > 0 or stop < len(data)
        self.send_response(206 if ranged else 200)
        self.send_header("X-Repo-Commit", sha)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        self.end_headers()
        if self.command == "HEAD":
            return
        if filename in self.hub.drop_once and not start:
            self.hub.drop_once.discard(filename)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # cut the body: the client sees a short read
            return
        self.wfile.write(body)

    def _range(self, size: int) -> tuple[int, int]:
        """[start, stop) of `Range: bytes=N-` or `bytes=N-M` (M inclusive); the whole file without one."""
        header = self.headers.get("Range", "")
        if not header.startswith("bytes=") or "-" not in header:
            return 0, size
        first, last = header[len("bytes=") :].split("-", 1)
        return int(first or 0), min(size, int(last) + 1) if last else size


def _entry(repo: FakeRepo, path: str) -> dict[str, object]:
    """A tree / paths-info entry as the Hub writes it: a file (with `lfs` for weights) or a folder."""
    if path not in repo.files:
        return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}
    data = repo.files[path]
    entry: dict[str, object] = {"type": "file", "oid": _git_blob_sha(data), "size": len(data), "path": path}
    if _is_lfs(path):
        entry["lfs"] = {"oid": _sha256(data), "size": len(data), "pointerSize": 134}
    return entry
