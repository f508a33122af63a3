"""Untrusted text made inert before it reaches a terminal, a TUI, Markdown or HTML.

Every string that came from a corpus, a model or a tokenizer (example text, tokens, labels,
generated answers, model names read from a hub) can carry terminal control sequences:
`ESC[2J` clears the screen, `ESC]0;…BEL` retitles the window, `ESC]52;c;…BEL` writes the
clipboard. `inert(text)` replaces every control character with one visible character
(C0 → its Unicode control picture, ESC → ␛, DEL → ␡, C1 and bidi overrides → ¿/⸮) so the
sequence is shown, never obeyed. The replacement is one character for one, so character
offsets into the text (token spans, highlights) stay valid.

`--json` output keeps the exact text: `json_dumps` escapes the same characters as
`\\uXXXX` (JSON already forces that for C0; DEL, C1 and bidi controls are escaped too, so
printing the JSON to a terminal is safe as well).
"""

from __future__ import annotations

import json
from typing import Any

# Bidirectional overrides/isolates can reorder what a reader sees ("trojan source").
_BIDI = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]


def _table(keep: str) -> dict[int, str]:
    table = {code: chr(0x2400 + code) for code in range(0x20)}  # ␀ … ␟ (ESC → ␛)
    table[0x7F] = "␡"
    table.update({code: "¿" for code in range(0x80, 0xA0)})  # C1: 0x9b is a one-byte CSI
    table.update({code: "⸮" for code in _BIDI})
    for ch in keep:
        table.pop(ord(ch), None)
    return table


_KEEP_LAYOUT = _table("\n\t")
_ONE_LINE = _table("")


def inert(text: Any, *, one_line: bool = False) -> str:
    """`text` with every control character replaced by one visible character.

    Newlines and tabs are kept unless `one_line` (then they show as ␊ and ␉ too).
    Length is preserved, so spans computed on the original text index the result.
    """
    if text is None:
        return ""
    return str(text).translate(_ONE_LINE if one_line else _KEEP_LAYOUT)


_JSON_ESCAPE = {code: f"\\u{code:04x}" for code in (0x7F, *range(0x80, 0xA0), *_BIDI)}


def json_dumps(obj: Any, **kwargs: Any) -> str:
    """`json.dumps(obj, ensure_ascii=False)` that is also safe to print to a terminal.

    JSON escapes C0 controls itself; DEL, C1 and bidi controls (legal raw in JSON strings,
    live on some terminals) are written as `\\uXXXX` too. Decoding gives the exact text.
    """
    kwargs.setdefault("ensure_ascii", False)
    return json.dumps(obj, **kwargs).translate(_JSON_ESCAPE)
