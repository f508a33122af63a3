"""`builtin:prose`: real, human-written English prose that every Python install already has.

No hub, no download: the text is read from the running Python itself.

- **reference**: the Python Language Reference and library-topic pages that CPython ships
  for `help()` (`pydoc_data.topics`): long-form explanatory technical prose (grammar,
  data model, statements, the execution model...).
- **docstrings**: the module, class and function docstrings of the Python standard library,
  read from its `.py` sources with `ast` (nothing is imported or executed): API
  documentation written by hundreds of CPython contributors over 30 years.

Both are © Python Software Foundation, under the PSF License Agreement (PSF-2.0), which
permits use, copying and derivatives. The two kinds are interleaved round-robin, each cut at
paragraph breaks into documents of about `DOC_CHARS` characters. The exact text follows the
Python version (3.11 and 3.12 differ a little); order is deterministic for a given Python.
"""

from __future__ import annotations

import ast
import inspect
import sysconfig
from collections.abc import Iterator
from pathlib import Path

DOC_CHARS = 1000  # ~230 tokens: one document fills about one 256-token context, so little is truncated away
MIN_DOCSTRING_CHARS = 160  # one-line docstrings are API labels, not prose
_SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "site-packages",
              "dist-packages", "ensurepip", "venv", "__pycache__", "pydoc_data", "encodings"}

PROVENANCE = ("Python documentation shipped with CPython (pydoc_data.topics) + standard-library "
              "docstrings; (c) Python Software Foundation, PSF License 2.0")


def chunk_paragraphs(text: str, size: int = DOC_CHARS) -> Iterator[str]:
    """Cut `text` at blank lines into pieces of about `size` characters (never mid-paragraph)."""
    piece: list[str] = []
    length = 0
    for paragraph in text.split("\n\n"):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip():
            continue
        if piece and length + len(paragraph) > size:
            yield "\n\n".join(piece)
            piece, length = [], 0
        piece.append(paragraph)
        length += len(paragraph) + 2
    if piece:
        yield "\n\n".join(piece)


def reference_documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield from chunk_paragraphs(topics[name])


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(part in _SKIP_DIRS for part in rel) or rel[-1].startswith(("test_", "_")):
            continue
        files.append(path)
    return files


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    out = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=False)
        if doc and len(doc) >= MIN_DOCSTRING_CHARS:
            out.append(inspect.cleandoc(doc))
    return out


def docstring_documents() -> Iterator[str]:
    for path in _stdlib_files():
        docs = _docstrings(path)
        if docs:
            yield from chunk_paragraphs("\n\n".join(docs))


def prose_documents() -> Iterator[tuple[str, None]]:
    """The two kinds interleaved, one document each in turn, until both run out."""
    iterators = [reference_documents(), docstring_documents()]
    while iterators:
        alive = []
        for iterator in iterators:
            text = next(iterator, None)
            if text is None:
                continue
            alive.append(iterator)
            yield text, None
        iterators = alive
