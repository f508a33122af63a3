"""A fake Hugging Face Hub on 127.0.0.1, so tests exercise the real download code.

It serves local model directories through the few routes `huggingface_hub.snapshot_download`
uses:

- `GET  /api/models/{repo}/revision/{rev}`          repo info, whose `sha` is the commit
- `GET  /api/models/{repo}/tree/{rev}?recursive=…`  the file listing
- `HEAD /{repo}/resolve/{rev}/{file}`               metadata: `X-Repo-Commit`, `ETag`, size
- `GET  /{repo}/resolve/{rev}/{file}`               the bytes, honouring `Range: bytes=N-`

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
from urllib.parse import unquote, urlsplit


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, bytes]
    sha: str
    revisions: dict[str, str] = field(default_factory=dict)  # branch/tag -> sha
    gated: bool = False
    allowed_tokens: set[str] = field(default_factory=set)

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
    ) -> FakeRepo:
        """Serve `directory` (or `files`) as `repo_id` on branch `main`.

        `extra_revisions` maps a tag name to a different file set, served under its own sha.
        """
        content = dict(files or {})
        if directory is not None:
            for path in sorted(Path(directory).rglob("*")):
                if path.is_file():
                    content[path.relative_to(directory).as_posix()] = path.read_bytes()
        sha = _commit_sha(repo_id, content)
        repo = FakeRepo(repo_id, content, sha, {"main": sha}, gated, set(allowed_tokens or ()))
        self.repos[repo_id] = repo
        for tag, tag_files in (extra_revisions or {}).items():
            tag_sha = _commit_sha(repo_id + tag, tag_files)
            self.repos[f"{repo_id}@{tag_sha}"] = FakeRepo(repo_id, dict(tag_files), tag_sha)
            repo.revisions[tag] = tag_sha
        return repo

    def downloads(self, filename: str) -> list[dict[str, str]]:
        """Headers (lower-case keys) of every GET of `filename` so far, e.g. to see Range requests."""
        return [
            h for m, p, h in self.requests if m == "GET" and "/resolve/" in p and p.endswith("/" + filename)
        ]

    def _find(self, repo_id: str, revision: str) -> tuple[FakeRepo | None, str | None]:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, None
        sha = repo.resolve(revision)
        if sha is not None and sha != repo.sha:
            return self.repos[f"{repo_id}@{sha}"], sha
        return repo, sha

    def _split_repo(self, parts: list[str]) -> tuple[str, list[str]]:
        """`org/name/rest…` or `name/rest…` (single-segment ids like `gpt2`)."""
        if parts and parts[0] in self.repos:
            return parts[0], parts[1:]
        return "/".join(parts[:2]), parts[2:]

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

    def _route(self) -> None:
        self._record()
        parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
        if parts[:2] == ["api", "models"]:
            repo_id, rest = self.hub._split_repo(parts[2:])
            if len(rest) >= 2 and rest[0] == "revision":
                return self._repo_info(repo_id, "/".join(rest[1:]))
            if len(rest) >= 2 and rest[0] == "tree":
                return self._tree(repo_id, rest[1])
            return self._error(404, "EntryNotFound", "unknown api route")
        repo_id, rest = self.hub._split_repo(parts)
        if len(rest) >= 3 and rest[0] == "resolve":
            return self._resolve(repo_id, rest[1], "/".join(rest[2:]))
        return self._error(404, "EntryNotFound", "unknown route")

    def _lookup(self, repo_id: str, revision: str) -> tuple[FakeRepo, str] | None:
        repo, sha = self.hub._find(repo_id, revision)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, sha

    def _repo_info(self, repo_id: str, revision: str) -> None:
        found = self._lookup(repo_id, revision)
        if found is None:
            return
        repo, sha = found
        self._send_json(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": sha,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "siblings": [{"rfilename": name} for name in sorted(repo.files)],
            },
        )

    def _tree(self, repo_id: str, revision: str) -> None:
        found = self._lookup(repo_id, revision)
        if found is None:
            return
        repo, _ = found
        entries = []
        for name in sorted(repo.files):
            data = repo.files[name]
            entry = {"type": "file", "oid": _git_blob_sha(data), "size": len(data), "path": name}
            if _is_lfs(name):
                entry["lfs"] = {"oid": _sha256(data), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._send_json(200, entries)

    def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
        found = self._lookup(repo_id, revision)
        if found is None:
            return
        repo, sha = found
        if repo.gated or self.hub.repos[repo_id].gated:
            gate = self.hub.repos[repo_id]
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
        start = self._range_start()
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", sha)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
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

    def _range_start(self) -> int:
        header = self.headers.get("Range", "")
        if header.startswith("bytes=") and header.endswith("-"):
            return int(header[len("bytes=") : -1] or 0)
        return 0
