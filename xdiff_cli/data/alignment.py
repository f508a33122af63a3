"""Cross-tokenizer alignment: which token of model A sits at the same point of the text as
which token of model B.

Two tokenizers split one text differently ("1989" vs "198"+"9", one token per CJK
character vs three byte pieces). The paper walks both token sequences with two pointers,
growing the shorter window until both spell the same text, and keeps the last token of
each window. The same pairs fall out of character offsets: a token *closes* a character
boundary when the next token starts at or after its end (byte pieces of one multi-byte
character share that character's offsets, so only the last piece closes it); two tokens
pair when both close the boundary at the same character.

- `token_spans` turns one model's offsets (plain text, or a chat rendered with the model's
  own template) into `TokenSpans` over the *canonical* document text.
- `align` intersects two `TokenSpans` → `AlignedPairs` (the fast path used by harvest).
- `align_by_windows` is the paper's two-pointer algorithm over token bytes; tests use it to
  cross-check the fast path on hard text.

Skipped on both sides: special tokens (BOS, template markers), template text around chat
messages, whitespace-only tokens, and tokens that end inside a multi-byte character.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Code points for which str.isspace() is true (the set Python itself uses).
_WHITESPACE_CODEPOINTS = np.array([c for c in range(0x3000 + 1) if chr(c).isspace()], dtype=np.uint32)


@dataclass(frozen=True)
class ContentSpan:
    """A run of canonical text inside a rendered string: rendered[r_start:r_end] == canonical[c_start:...]."""

    r_start: int
    r_end: int
    c_start: int


@dataclass
class TokenSpans:
    """One model's tokens of one document, mapped onto the canonical document text.

    `start`/`end` are character offsets in the canonical text (meaningful where `content`);
    `keep` marks content tokens that close a character boundary (the alignable ones).
    """

    start: np.ndarray  # [T] int64
    end: np.ndarray  # [T] int64
    content: np.ndarray  # [T] bool: text token inside a content span (not special/template/whitespace)
    keep: np.ndarray  # [T] bool: content and closes a character boundary

    @property
    def num_tokens(self) -> int:
        return len(self.end)


@dataclass
class AlignedPairs:
    """Token positions of A and B that end at the same character of the canonical text."""

    pos_a: np.ndarray  # [P] int64 token index in A's sequence
    pos_b: np.ndarray  # [P] int64 token index in B's sequence
    start_a: np.ndarray  # [P] int64: A's token is text[start_a:end]
    start_b: np.ndarray  # [P] int64: B's token is text[start_b:end]
    end: np.ndarray  # [P] int64
    n_content_a: int  # A's content tokens within the text both sequences cover
    n_content_b: int
    covered_end: int  # last character both sides reach with an alignable token

    def __len__(self) -> int:
        return len(self.end)

    @property
    def fully_aligned(self) -> bool:
        """Both token streams are reconciled up to the end of the text they share."""
        return len(self) > 0 and int(self.end[-1]) == self.covered_end

    @property
    def aligned_fraction(self) -> float:
        """Aligned pairs / the smaller side's content-token count (1.0 = every token of the
        coarser tokenizer found a partner)."""
        denominator = min(self.n_content_a, self.n_content_b)
        return len(self) / denominator if denominator else 1.0

    def select(self, mask: np.ndarray) -> AlignedPairs:
        return AlignedPairs(
            self.pos_a[mask], self.pos_b[mask], self.start_a[mask], self.start_b[mask], self.end[mask],
            self.n_content_a, self.n_content_b, self.covered_end,
        )


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _non_whitespace_prefix_counts(text: str) -> np.ndarray:
    """counts[i] = number of non-whitespace characters in text[:i] (length len(text)+1)."""
    is_text = ~np.isin(_codepoints(text), _WHITESPACE_CODEPOINTS)
    counts = np.zeros(len(text) + 1, dtype=np.int64)
    np.cumsum(is_text, out=counts[1:])
    return counts


def token_spans(
    rendered: str,
    offsets_T2: np.ndarray,
    special_T: np.ndarray,
    content_spans: Sequence[ContentSpan] | None = None,
    next_start: int | None = None,
) -> TokenSpans:
    """Map one tokenized string onto canonical text.

    `offsets_T2` are the tokenizer's character offsets into `rendered`; `special_T` marks
    special tokens. `content_spans` (sorted, non-overlapping) say which parts of `rendered`
    are canonical text; None means all of it (plain documents). `next_start` is the start of
    the token after the last one when the sequence was truncated (None: it was not).
    """
    offsets_T2 = np.asarray(offsets_T2, dtype=np.int64).reshape(-1, 2)
    starts, ends = offsets_T2[:, 0], offsets_T2[:, 1]
    if content_spans is None:
        content_spans = [ContentSpan(0, len(rendered), 0)]
    if len(content_spans) == 0:  # e.g. a chat whose messages were all empty
        nothing = np.zeros(len(ends), dtype=bool)
        return TokenSpans(starts.copy(), ends.copy(), nothing, nothing.copy())
    r_start = np.array([s.r_start for s in content_spans], dtype=np.int64)
    r_end = np.array([s.r_end for s in content_spans], dtype=np.int64)
    c_start = np.array([s.c_start for s in content_spans], dtype=np.int64)

    # Which content span holds each token's end? (the first span with r_end >= end)
    span = np.minimum(np.searchsorted(r_end, ends, side="left"), len(r_end) - 1)
    in_span = (ends > r_start[span]) & (ends <= r_end[span])
    clipped_start = np.maximum(starts, r_start[span])  # template text before the content is cut off
    canonical_start = clipped_start - r_start[span] + c_start[span]
    canonical_end = ends - r_start[span] + c_start[span]

    non_ws = _non_whitespace_prefix_counts(rendered)
    has_text = non_ws[np.clip(ends, 0, len(rendered))] > non_ws[np.clip(clipped_start, 0, len(rendered))]
    content = in_span & ~np.asarray(special_T, dtype=bool) & (ends > starts) & has_text

    # A token closes a character boundary when the next token starts at or after its end;
    # byte pieces of one multi-byte character overlap, so all but the last fail this test.
    following = np.empty_like(starts)
    following[:-1] = starts[1:]
    if len(starts):
        following[-1] = np.iinfo(np.int64).max if next_start is None else next_start
    closes_boundary = following >= ends
    return TokenSpans(canonical_start, canonical_end, content, content & closes_boundary)


def align(a: TokenSpans, b: TokenSpans) -> AlignedPairs:
    """Pair the alignable tokens of A and B that end at the same canonical character."""
    keep_a, keep_b = np.flatnonzero(a.keep), np.flatnonzero(b.keep)
    _, index_a, index_b = np.intersect1d(a.end[keep_a], b.end[keep_b], assume_unique=True, return_indices=True)
    pos_a, pos_b = keep_a[index_a], keep_b[index_b]
    # Count content tokens only over the text both sequences cover (truncation cuts them
    # at different characters; the tail of the longer one has no partner to find).
    covered = min(
        int(a.end[a.keep].max()) if a.keep.any() else 0,
        int(b.end[b.keep].max()) if b.keep.any() else 0,
    )
    n_content_a = int((a.content & (a.end <= covered)).sum())
    n_content_b = int((b.content & (b.end <= covered)).sum())
    return AlignedPairs(
        pos_a, pos_b, a.start[pos_a], b.start[pos_b], a.end[pos_a], n_content_a, n_content_b, covered
    )


# --- reference implementation: the paper's two-pointer walk over token bytes --------------


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes→printable-unicode table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    byte_values, code_points = printable[:], printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            byte_values.append(byte)
            code_points.append(256 + extra)
            extra += 1
    return {chr(cp): byte for byte, cp in zip(byte_values, code_points, strict=True)}


def token_bytes(tokenizer, ids: Sequence[int]) -> list[bytes | None]:
    """Each token's exact bytes (None for special tokens), for byte-level BPE tokenizers;
    other tokenizers fall back to each token's decoded string."""
    decoder = _byte_level_decoder()
    special = set(tokenizer.all_special_ids)
    out: list[bytes | None] = []
    for token_id, piece in zip(ids, tokenizer.convert_ids_to_tokens(list(ids)), strict=True):
        if token_id in special:
            out.append(None)
        elif all(ch in decoder for ch in piece):
            out.append(bytes(decoder[ch] for ch in piece))
        else:
            out.append(tokenizer.convert_tokens_to_string([piece]).encode("utf-8"))
    return out


def align_by_windows(tokens_a: Sequence[bytes | None], tokens_b: Sequence[bytes | None], text: str) -> list[tuple[int, int]]:
    """Paper's alignment: grow the shorter window until both windows spell the same bytes,
    then pair the last token of each window (skipping special and whitespace-only tokens,
    and window ends inside a character). Stops where the two sequences cannot be reconciled."""
    text_bytes = text.encode("utf-8")
    char_boundaries = set(np.cumsum([0] + [len(ch.encode("utf-8")) for ch in text]).tolist())
    real_a = [i for i, t in enumerate(tokens_a) if t is not None]
    real_b = [j for j, t in enumerate(tokens_b) if t is not None]

    def is_whitespace(piece: bytes) -> bool:
        return piece.decode("utf-8", errors="ignore").isspace()

    pairs: list[tuple[int, int]] = []
    ia = ib = 0  # pointers into real_a / real_b
    spelled_a, spelled_b = bytearray(), bytearray()  # bytes consumed by each side so far
    while ia < len(real_a) and ib < len(real_b):
        window_start = len(spelled_a)
        spelled_a += tokens_a[real_a[ia]]
        spelled_b += tokens_b[real_b[ib]]
        ia, ib = ia + 1, ib + 1
        while len(spelled_a) != len(spelled_b):
            if len(spelled_a) < len(spelled_b):
                if ia == len(real_a):
                    return pairs
                spelled_a += tokens_a[real_a[ia]]
                ia += 1
            else:
                if ib == len(real_b):
                    return pairs
                spelled_b += tokens_b[real_b[ib]]
                ib += 1
        window_end = len(spelled_a)
        window = spelled_a[window_start:window_end]
        if window != spelled_b[window_start:window_end] or window != text_bytes[window_start:window_end]:
            return pairs  # the sequences disagree about the text: cut here
        last_a, last_b = real_a[ia - 1], real_b[ib - 1]
        if window_end in char_boundaries and not is_whitespace(tokens_a[last_a]) and not is_whitespace(tokens_b[last_b]):
            pairs.append((last_a, last_b))
    return pairs
