"""Corpora: where the documents that both models read come from.

A corpus spec is one source or a comma-separated list of sources read round-robin (two
sources → half and half, the paper's web + chat mix):

- `path/to/file.txt`   one document per line
- `path/to/file.jsonl` one JSON object per line with a `text` field, or chat `messages`
                       (a list of {"role", "content"}; `conversation`/`conversations` too)
- `builtin:smoke`      the small mixed corpus shipped with the package (smoke runs)
- `builtin:prose`      real human-written prose read from the Python install itself (see prose.py)
- `hf:org/name[:split][:config]`  a hub dataset, streamed with `datasets`

Chat documents keep their messages, so each model can render them with its own chat
template (`render_chat`); their canonical text — what stored character offsets index
into — is the message contents joined by a blank line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xdiff_cli.data.alignment import ContentSpan
from xdiff_cli.errors import XdiffError

MESSAGE_SEPARATOR = "\n\n"
_MESSAGE_KEYS = ("messages", "conversation", "conversations")
_TEXT_KEYS = ("text", "content")


@dataclass
class Document:
    """One document; `text` is canonical (for chats: contents joined by MESSAGE_SEPARATOR)."""

    doc_id: int
    text: str
    messages: list[dict[str, str]] | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def canonical_chat_text(messages: list[dict[str, str]]) -> str:
    return MESSAGE_SEPARATOR.join(m["content"] for m in messages)


def _normalise_messages(raw: Any) -> list[dict[str, str]] | None:
    """Accept OpenAI-style ({role, content}) and ShareGPT-style ({from, value}) turns."""
    if not isinstance(raw, list) or not raw:
        return None
    roles = {"human": "user", "gpt": "assistant", "bot": "assistant"}
    messages = []
    for turn in raw:
        if not isinstance(turn, dict):
            return None
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            return None
        messages.append({"role": roles.get(role, role), "content": content})
    return messages


def _record_to_document(record: Any) -> tuple[str, list[dict[str, str]] | None] | None:
    """(text, messages|None) from one JSON/dataset record, or None when it holds neither."""
    if isinstance(record, str):
        return record, None
    if not isinstance(record, dict):
        return None
    for key in _MESSAGE_KEYS:
        messages = _normalise_messages(record.get(key))
        if messages:
            return canonical_chat_text(messages), messages
    for key in _TEXT_KEYS:
        if isinstance(record.get(key), str):
            return record[key], None
    return None


# A document longer than this is cut while it is read (the harvest keeps far less of it).
MAX_DOCUMENT_CHARS = 1_000_000


def _bounded_lines(fh: Any, limit: int = MAX_DOCUMENT_CHARS) -> Iterator[str]:
    """Lines of at most `limit` characters; the rest of a longer line is skipped unread-into-memory."""
    while True:
        line = fh.readline(limit)
        if not line:
            return
        if not line.endswith("\n"):
            while (rest := fh.readline(limit)) and not rest.endswith("\n"):
                pass
        yield line


def _read_txt(path: Path) -> Iterator[tuple[str, None]]:
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in _bounded_lines(fh):
            line = line.rstrip("\n")
            if line.strip():
                yield line, None


# A JSON record cannot be cut like a text line; one longer than this is skipped, with a note,
# so memory stays bounded whatever the input (its text would be cut by the harvest anyway).
MAX_JSONL_RECORD_CHARS = 8 * MAX_DOCUMENT_CHARS


def _jsonl_lines(fh: Any, path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of records up to MAX_JSONL_RECORD_CHARS; longer ones are skipped unread."""
    line_no = 0
    while line := fh.readline(MAX_JSONL_RECORD_CHARS):
        line_no += 1
        if len(line) == MAX_JSONL_RECORD_CHARS and not line.endswith("\n"):
            while (rest := fh.readline(MAX_JSONL_RECORD_CHARS)) and not rest.endswith("\n"):
                pass
            from xdiff_cli.console import err_console

            err_console.print(f"note: skipped {path}:{line_no}: a record over {MAX_JSONL_RECORD_CHARS:,} characters",
                              soft_wrap=True, markup=False)
            continue
        yield line_no, line


def _read_jsonl(path: Path) -> Iterator[tuple[str, list[dict[str, str]] | None]]:
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line_no, line in _jsonl_lines(fh, path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise XdiffError(f"{path}:{line_no} is not valid JSON ({exc.msg})", "fix or remove that line") from exc
            parsed = _record_to_document(record)
            if parsed is None:
                raise XdiffError(
                    f"{path}:{line_no} has neither a 'text' string nor chat 'messages'",
                    "give each line {\"text\": ...} or {\"messages\": [{\"role\", \"content\"}, ...]}",
                )
            if parsed[0].strip():
                yield parsed


def builtin_smoke_path() -> Path:
    return Path(__file__).parent / "smoke.jsonl"  # beside this module, in the data package


def _read_hub_dataset(spec: str, seed: int) -> Iterator[tuple[str, list[dict[str, str]] | None]]:
    """hf:org/name[:split][:config], streamed (never downloaded whole)."""
    parts = spec.split(":")
    name = parts[0]
    split = parts[1] if len(parts) > 1 and parts[1] else "train"
    config = parts[2] if len(parts) > 2 and parts[2] else None
    if not name:
        raise XdiffError("empty hub dataset name in corpus spec", "use hf:org/name[:split][:config]")
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise XdiffError("hub corpora need the `datasets` package", "pip install datasets") from exc
    try:
        dataset = datasets.load_dataset(name, config, split=split, streaming=True)
        dataset = dataset.shuffle(seed=seed, buffer_size=10_000)
        iterator = iter(dataset)
        first = next(iterator, None)
    except Exception as exc:  # datasets raises many types (connection, auth, missing split)
        raise XdiffError(
            f"cannot stream hub dataset {name!r} (split {split!r}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            "check the name, split and config, your network, and `huggingface-cli login` for gated sets",
        ) from exc
    if first is None:
        return
    for record in _chain_first(first, iterator):
        parsed = _record_to_document(record)
        if parsed is None:
            raise XdiffError(
                f"hub dataset {name!r} has no 'text' or 'messages' column",
                f"columns are: {', '.join(record) if isinstance(record, dict) else type(record).__name__}",
            )
        if parsed[0].strip():
            yield parsed


def _chain_first(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _open_source(source: str, seed: int) -> Iterator[tuple[str, list[dict[str, str]] | None]]:
    source = source.strip()
    if source == "builtin:smoke":
        return _read_jsonl(builtin_smoke_path())
    if source == "builtin:prose":
        from xdiff_cli.data.prose import prose_documents

        return prose_documents()
    if source.startswith("builtin:"):
        raise XdiffError(f"unknown built-in corpus {source!r}", "the built-in corpora are builtin:smoke and builtin:prose")
    if source.startswith("hf:"):
        return _read_hub_dataset(source[3:], seed)
    path = Path(source).expanduser()
    if not path.is_file():
        raise XdiffError(f"corpus file {path} not found", "pass a .txt/.jsonl file, hf:org/name, or builtin:smoke")
    if path.suffix == ".txt":
        return _read_txt(path)
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    raise XdiffError(f"unsupported corpus file type {path.suffix!r} ({path})", "use .txt (one document per line) or .jsonl")


def parse_sources(spec: str) -> list[str]:
    sources = [s.strip() for s in spec.split(",") if s.strip()]
    if not sources:
        raise XdiffError("empty --corpus", "pass a .txt/.jsonl file, hf:org/name, or builtin:smoke")
    return sources


def iter_documents(spec: str, *, seed: int = 0, start: int = 0) -> Iterator[Document]:
    """Documents of a corpus spec in a deterministic order, numbered from 0.

    Several sources are interleaved round-robin until every one is exhausted. `start` skips
    the first `start` documents (resuming a harvest); their ids are still counted.
    """
    iterators = [_open_source(source, seed) for source in parse_sources(spec)]
    doc_id = 0
    while iterators:
        alive = []
        for iterator in iterators:
            item = next(iterator, None)
            if item is None:
                continue
            alive.append(iterator)
            if doc_id >= start:
                text, messages = item
                yield Document(doc_id, text, messages)
            doc_id += 1
        iterators = alive


def check_corpus(spec: str) -> None:
    """Fail fast (before loading models) when a local corpus source is missing or unreadable."""
    for source in parse_sources(spec):
        if not source.startswith(("hf:", "builtin:")):
            if next(_open_source(source, seed=0), None) is None:
                raise XdiffError(f"corpus file {source} has no documents (it is empty or whitespace only)",
                                 "pass a file with text: one document per line (.txt) or one JSON record per line (.jsonl)")
        elif source.startswith("builtin:") and source not in ("builtin:smoke", "builtin:prose"):
            _open_source(source, seed=0)


# --- rendering for one model ------------------------------------------------------------


@dataclass
class RenderedDocument:
    """A document as one model will read it: the string to tokenize, and where in it the
    canonical text lies (None: the string *is* the canonical text)."""

    string: str
    content_spans: list[ContentSpan] | None
    add_special_tokens: bool


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> RenderedDocument:
    """Render a chat with the model's own template and locate each message's content in it.

    Tokens outside those content spans are template tokens (role headers, turn markers) and
    never get aligned. A tokenizer without a template reads the canonical text itself.
    """
    if not getattr(tokenizer, "chat_template", None):
        return RenderedDocument(canonical_chat_text(messages), None, True)
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # templates raise on role orders they do not support
        raise XdiffError(f"the chat template rejected a conversation: {str(exc).splitlines()[0]}") from exc
    spans: list[ContentSpan] = []
    cursor, canonical_cursor = 0, 0
    for message in messages:
        content = message["content"]
        # Some templates strip message contents; then look for the stripped text.
        for piece in (content, content.strip()):
            found = rendered.find(piece, cursor) if piece else -1
            if found >= 0:
                lead = content.index(piece)
                spans.append(ContentSpan(found, found + len(piece), canonical_cursor + lead))
                cursor = found + len(piece)
                break
        # A message the template rewrote beyond that is simply not aligned.
        canonical_cursor += len(content) + len(MESSAGE_SEPARATOR)
    return RenderedDocument(rendered, spans, False)


def render_document(tokenizer: Any, document: Document) -> RenderedDocument:
    if document.is_chat:
        return render_chat(tokenizer, document.messages)
    return RenderedDocument(document.text, None, True)
