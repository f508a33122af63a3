"""The columns of a feature list, shared by `xdiff features` (rich table) and the TUI list.

One `FeatureColumn` per column: its header, a fixed width, how a value prints, and the
`FeatureIndex` sort key a header click uses. Adding a column (a verdict, a label, …) is one
entry in `LIST_COLUMNS`; both the CLI table and the TUI pick it up.

Numbers are formatted for their range (a frequency of 2.1e-5 prints as "<.01%", not
"2.10e-…"), so every column keeps a fixed width and only the example text shrinks when the
terminal is narrow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from xdiff_cli.findings.feature_index import Feature

BLOCK_NAMES = {"a": "A-only", "b": "B-only", "shared": "shared"}
PARTITION_SHORT = {"a": "A", "b": "B", "shared": "A+B"}
VERDICT_WHY = {"exclusive": "exclusive", "analogous": "analogous", "weak": "weak evidence"}


def format_frequency(frequency: float) -> str:
    """Share of token pairs as a percentage that fits 6 characters: 12.3%, 0.42%, <.01%, 0."""
    if frequency <= 0:
        return "0"
    if frequency < 0.0001:
        return "<.01%"
    if frequency < 0.1:
        return f"{frequency * 100:.2f}%"
    return f"{frequency * 100:.1f}%"


def format_activation(value: float) -> str:
    """An activation in at most 6 characters: 0.123, 12.3, 1.2k."""
    if value >= 1e5:
        return f"{value:.1e}"
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_score(score: float) -> str:
    return f"{score:.0f}" if abs(score) >= 100 else f"{score:.3g}"


def why(feature: Feature) -> str:
    """Why the feature sits where it does in the ranking, in a few words (replaces a bare ★)."""
    if not feature.alive:
        return "dead: never fires"
    if feature.verdict in VERDICT_WHY:  # `xdiff verify` evidence outranks the block prior
        where = " (in shared)" if feature.found_in_shared else ""
        return f"{VERDICT_WHY[feature.verdict]}{where}"
    words = f"{feature.n_distinct_tokens} word" + ("" if feature.n_distinct_tokens == 1 else "s")
    if feature.token_artifact:
        top = (feature.top_token or "").strip()[:9]
        return f"artifact {top!r}" if top else "token artifact"
    if feature.partition in ("a", "b"):
        return f"{BLOCK_NAMES[feature.partition]}, {words}"
    if feature.candidate:
        side = "A" if feature.rel_norm > 0.5 else "B"
        return f"mostly {side}, {words}"
    return f"shared, {words}"


@dataclass(frozen=True)
class FeatureColumn:
    key: str
    header: str
    width: int
    value: Callable[[Feature], str]
    sort: str | None = None  # FeatureIndex sort key, None when the column cannot sort
    justify: str = "right"


LIST_COLUMNS: list[FeatureColumn] = [
    FeatureColumn("id", "id", 5, lambda f: str(f.id), sort="id"),
    FeatureColumn("partition", "model", 5, lambda f: PARTITION_SHORT[f.partition], justify="left"),
    FeatureColumn("rel_norm", "R", 4, lambda f: f"{f.rel_norm:.2f}", sort="rel_norm"),
    FeatureColumn("frequency", "freq", 6, lambda f: format_frequency(f.frequency), sort="frequency"),
    FeatureColumn("max_activation", "s_max", 5, lambda f: format_activation(f.max_activation),
                  sort="max_activation"),
    FeatureColumn("score", "score", 5, lambda f: format_score(f.score) if f.alive else "-", sort="score"),
    FeatureColumn("why", "why", 18, why, justify="left"),
]


def column(key: str) -> FeatureColumn:
    return next(c for c in LIST_COLUMNS if c.key == key)


# --- what the user may type for --partition and --sort (case-insensitive, with the aliases the
# table headers and tabs suggest) ------------------------------------------------------------

PARTITION_ALIASES = {
    "a": "a", "a-only": "a", "a-exclusive": "a",
    "b": "b", "b-only": "b", "b-exclusive": "b",
    "shared": "shared", "s": "shared", "a+b": "shared",
    "all": "all",
}
SORT_ALIASES = {
    "rank": "rank", "id": "id", "score": "score",
    "frequency": "frequency", "freq": "frequency",
    "max_activation": "max_activation", "max-activation": "max_activation", "s_max": "max_activation",
    "smax": "max_activation", "max": "max_activation", "max_act": "max_activation",
    "rel_norm": "rel_norm", "rel-norm": "rel_norm", "r": "rel_norm",
}


def parse_partition(text: str) -> str:
    """'A', 'a-only', 'Shared', … → 'a' | 'b' | 'shared' | 'all'; ValueError otherwise."""
    found = PARTITION_ALIASES.get(text.strip().lower())
    if found is None:
        raise ValueError(f"unknown partition {text!r}: use a, b, shared or all")
    return found


def parse_sort(text: str) -> str:
    """'freq', 'S_MAX', 'R', … → a FeatureIndex sort key; ValueError otherwise."""
    found = SORT_ALIASES.get(text.strip().lower())
    if found is None:
        raise ValueError(f"unknown sort key {text!r}: use rank, score, id, freq, s_max or R")
    return found
