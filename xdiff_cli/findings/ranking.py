"""What makes a feature a candidate difference, and how the default ranking reads: the one
home for the R bounds and the ranking text (import-light, so `--help` can show it)."""

from __future__ import annotations

# A shared feature whose relative decoder norm R = |dA|/(|dA|+|dB|) is outside
# [EXCLUSIVE_R_LOW, EXCLUSIVE_R_HIGH] writes (almost) only to one model: a candidate difference.
EXCLUSIVE_R_LOW, EXCLUSIVE_R_HIGH = 0.2, 0.8
ARTIFACT_SHARE = 0.8  # share of firing mass on one word type that makes a feature "one-word"

RANKING_HELP = (
    "Default ranking (--sort rank): features fall in tiers — (1) candidate differences: "
    f"A- or B-exclusive features and shared features whose relative decoder norm R = |dA|/(|dA|+|dB|) "
    f"is < {EXCLUSIVE_R_LOW} or > {EXCLUSIVE_R_HIGH}; (2) candidates flagged as artifacts: tokenization "
    f"artifacts (> {ARTIFACT_SHARE:.0%} of their firing "
    "mass on one word that A and B tokenise differently) and features with more than half of their "
    "firing mass on punctuation, whitespace, special/template tokens or a document's first two tokens; "
    "(3) other live shared features; "
    "(4) dead features. Within a tier the score rewards breadth (effective number of distinct "
    "word types the feature fires on, exp of the entropy of its firing mass), penalises "
    "domination by one word type, rewards consistent examples (mean of the top examples' "
    "activation over s_max) and a firing frequency between 1e-4 and 0.1."
)
