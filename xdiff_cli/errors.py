"""The one error type for user mistakes.

Raise `XdiffError` for anything the user can fix (bad argument, missing model, corrupt
cache, full disk). The CLI renders it as one red line and exits 1; `--debug` shows the
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class XdiffError(Exception):
    """A user-facing error: what went wrong, and what to do about it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} — {self.hint}"
        return self.message
