"""Label stage: a short, scored natural-language explanation for each feature.

Input: a trained crosscoder, the held-out ("eval") split of the activation store, the run's
`analysis.sqlite` (which features, in which order) and an explainer backend (a local chat
model through transformers, or any OpenAI-compatible endpoint).
Output: a `labels` table in `analysis.sqlite` — per feature a label (<= 8 words), a one-sentence
description and its detection score — and a response cache beside it, so that re-running
sends no request that was already answered.

The method follows the automated-interpretability recipe (Bills et al. 2023; EleutherAI's
delphi):
1. Evidence: one streaming pass over the store computes the chosen features' activations.
   The explainer sees the strongest windows plus windows sampled from lower activation
   quantiles (from the train split, which has far more documents than the eval split; at most
   `explain_pairs` token pairs of it are read), the firing tokens marked <<like this>> and
   listed with activation levels 1-9. The held-out windows come from the eval split.
2. Explanation: the reply must read `LABEL: ...` / `DESCRIPTION: ...`. A malformed reply is
   asked for once more; a second failure is recorded as unlabelled (never a crash).
3. Detection score: held-out windows the explainer never saw (from other documents; several
   non-overlapping windows may come from one document), as many activating as non-activating
   (the feature is zero over the whole window), each put to a
   scorer: "does this feature fire in this text?". A local scorer's P(yes) is read from the
   next-token logits (no parsing); over an API from logprobs when the server returns them,
   else from the Yes/No text. Per label: AUC and balanced accuracy (threshold P = 0.5).
4. Chance baseline: the same held-out texts scored against another feature's label
   (labels rotated by one over the labelled features), AUC and balanced accuracy again.

Shape suffixes: N = token pairs of a shard, S = the selected features.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from xdiff_cli.errors import XdiffError

DEFAULT_LOCAL_MODEL = "HuggingFaceTB/SmolLM2-1.7B-Instruct"
API_KEY_ENV = "XDIFF_LABEL_API_KEY"  # falls back to OPENAI_API_KEY
PARTITIONS = ("a", "b", "candidates", "all")
MAX_LABEL_WORDS = 8

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class LabelConfig:
    """How much evidence each feature gets. Defaults follow delphi's scale, shrunk for CPU."""

    n_top: int = 8  # strongest windows shown to the explainer
    n_quantile: int = 8  # more windows shown, sampled evenly from lower activation quantiles
    n_quantiles: int = 4  # quantile bins below the top windows
    n_score: int = 8  # held-out activating windows scored (and as many non-activating ones)
    window_before: int = 12  # tokens of context before the sampled token
    window_after: int = 4
    window_chars: int = 300  # never more characters than this in a window
    max_new_tokens: int = 64  # explanation reply budget
    explain_pairs: int = 500_000  # token pairs of the train split read for the explainer's windows
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_top", "n_score", "window_chars", "max_new_tokens", "explain_pairs"):
            if getattr(self, name) < 1:
                raise XdiffError(f"label setting {name} must be at least 1")
        if self.n_quantile < 0 or self.n_quantiles < 1:
            raise XdiffError("label settings n_quantile must be >= 0 and n_quantiles >= 1")


# --- evidence -----------------------------------------------------------------------------


@dataclass
class Window:
    """A context window of one document, with the feature's activation at each of its tokens."""

    text: str
    token_acts: list[tuple[int, int, float]]  # [start, end) within text, activation
    doc_id: int | None = None

    @property
    def activation(self) -> float:
        return max((a for _, _, a in self.token_acts), default=0.0)


@dataclass
class FeatureEvidence:
    feature_id: int
    view: str  # whose tokens the windows show: "a" or "b"
    explain: list[Window]  # what the explainer sees, strongest first
    held_out: list[Window]  # activating windows from documents the explainer never saw
    negatives: list[Window]  # windows where the feature is zero throughout


def _selected_activations(crosscoder, x_NA, x_NB, feats_S):  # noqa: ANN001, ANN202 - tensors
    """Threshold-inference activations of only the selected features (they are independent)."""
    import torch

    norm_a_F, norm_b_F = crosscoder.decoder_norms()
    pre_NS = torch.relu(x_NA @ crosscoder.W_enc_AF[:, feats_S] + x_NB @ crosscoder.W_enc_BF[:, feats_S]
                        + crosscoder.b_enc_F[feats_S])
    score_S = (norm_a_F + norm_b_F)[feats_S]
    return pre_NS * (pre_NS * score_S > float(crosscoder.threshold))


@dataclass
class _ShardRows:
    acts_NS: Any  # float32 tensor
    doc_id: list[int]
    starts: dict[str, list[int]]
    end: list[int]


def collect_evidence(
    crosscoder,  # noqa: ANN001 - crosscoder.Crosscoder
    split,  # noqa: ANN001 - store split (analysis.EvalSplit protocol)
    docs,  # noqa: ANN001 - anything with document_text(doc_id)
    features: Sequence[tuple[int, str]],
    config: LabelConfig = LabelConfig(),
    device: str = "cpu",
    advance: Callable[[int], None] | None = None,
    explain_split=None,  # noqa: ANN001 - another split: the explainer's windows come from it
) -> dict[int, FeatureEvidence]:
    """Explainer and held-out windows for each (feature id, view), from one pass over `split`
    (and over the first `config.explain_pairs` token pairs of `explain_split` when given: the
    explainer's windows then come from there, the held-out ones from `split`)."""
    import torch

    if not features:
        return {}
    feats_S = torch.tensor([f for f, _ in features], device=device)

    def rows_of(source, max_pairs: int | None) -> list[_ShardRows]:  # noqa: ANN001
        shards: list[_ShardRows] = []
        pairs = 0
        with torch.no_grad():
            for index in range(source.num_shards):
                if max_pairs is not None and pairs >= max_pairs:
                    break
                shard = source.load_shard(index)
                x_a, x_b = crosscoder.normalise(shard.acts_a.to(device), shard.acts_b.to(device))
                acts = torch.cat([_selected_activations(crosscoder, x_a[lo:lo + 8192], x_b[lo:lo + 8192], feats_S)
                                  for lo in range(0, len(x_a), 8192)]) if len(x_a) else torch.zeros(0, len(features))
                shards.append(_ShardRows(acts.cpu(), shard.doc_id.tolist(),
                                         {"a": shard.start_a.tolist(), "b": shard.start_b.tolist()}, shard.end.tolist()))
                pairs += len(x_a)
                if advance:
                    advance(1)
        return shards

    shards = rows_of(split, None)
    use_other = explain_split is not None and explain_split.num_shards > 0
    explain_shards = rows_of(explain_split, config.explain_pairs) if use_other else shards
    texts: dict[int, str] = {}

    def text_of(doc_id: int) -> str:
        if doc_id not in texts:
            texts[doc_id] = docs.document_text(doc_id)
        return texts[doc_id]

    out = {}
    for column, (feature_id, view) in enumerate(features):
        rng = random.Random(config.seed * 1_000_003 + feature_id)
        out[feature_id] = _feature_evidence(feature_id, view, column, explain_shards, shards, text_of, config, rng)
    return out


def _window_bounds(rows: _ShardRows, row: int, view: str, cfg: LabelConfig) -> tuple[int, int]:
    doc = rows.doc_id[row]
    first = row
    while first > 0 and row - first < cfg.window_before and rows.doc_id[first - 1] == doc:
        first -= 1
    hi = row + 1
    while hi < len(rows.doc_id) and hi - row <= cfg.window_after and rows.doc_id[hi] == doc:
        hi += 1
    starts = rows.starts[view]
    while first < row and rows.end[hi - 1] - starts[first] > cfg.window_chars:
        first += 1
    return first, hi


def _cut_window(rows: _ShardRows, column: int, row: int, view: str, cfg: LabelConfig, text_of) -> Window:  # noqa: ANN001
    first, hi = _window_bounds(rows, row, view, cfg)
    starts = rows.starts[view]
    lo_char = min(starts[first:hi])
    hi_char = rows.end[hi - 1]
    text = text_of(rows.doc_id[row])[lo_char:hi_char]
    acts = rows.acts_NS[first:hi, column].tolist()
    token_acts = [(starts[i] - lo_char, rows.end[i] - lo_char, round(a, 4))
                  for i, a in zip(range(first, hi), acts, strict=True)]
    return Window(text, token_acts, rows.doc_id[row])


def _locate(shards: list[_ShardRows], flat: int) -> tuple[int, int]:
    """(shard, row) of the `flat`-th token pair of the split."""
    for s, rows in enumerate(shards):
        if flat < len(rows.doc_id):
            return s, flat
        flat -= len(rows.doc_id)
    raise IndexError(flat)


def _firings(shards: list[_ShardRows], column: int) -> list[tuple[float, int, int]]:
    """(activation, shard, row) of every token pair where the feature fires, strongest first."""
    firing: list[tuple[float, int, int]] = []
    for s, rows in enumerate(shards):
        col = rows.acts_NS[:, column]
        idx = (col > 0).nonzero().flatten()
        firing.extend(zip(col[idx].tolist(), [s] * len(idx), idx.tolist(), strict=True))
    firing.sort(key=lambda t: -t[0])
    return firing


def _feature_evidence(feature_id, view, column, explain_shards, shards, text_of, cfg: LabelConfig, rng) -> FeatureEvidence:  # noqa: ANN001
    import torch

    # The explainer's windows: one per document, so they show the feature in varied contexts.
    firing = _firings(explain_shards, column)
    if not firing and explain_shards is not shards:  # never fires in the train pairs read: use eval's
        explain_shards = shards
        firing = _firings(shards, column)
    seen_docs: set[int] = set()

    def take(candidates, n: int) -> list[Window]:  # noqa: ANN001
        """Up to n windows from distinct, not yet used documents."""
        chosen = []
        for _, s, row in candidates:
            doc = explain_shards[s].doc_id[row]
            if doc in seen_docs:
                continue
            seen_docs.add(doc)
            chosen.append(_cut_window(explain_shards[s], column, row, view, cfg, text_of))
            if len(chosen) == n:
                break
        return chosen

    explain = take(firing, cfg.n_top)
    rest = firing[len(explain):]
    # Lower quantiles: equal-count bins of the remaining firings, sampled evenly.
    if cfg.n_quantile and rest:
        bins = [rest[i * len(rest) // cfg.n_quantiles:(i + 1) * len(rest) // cfg.n_quantiles]
                for i in range(cfg.n_quantiles)]
        per_bin = math.ceil(cfg.n_quantile / cfg.n_quantiles)
        for b in bins:
            explain.extend(take(rng.sample(b, len(b)), per_bin))
        explain = explain[:cfg.n_top + cfg.n_quantile]
    explain.sort(key=lambda w: -w.activation)

    # Held out: windows of documents the explainer did not see, none overlapping another one;
    # distinct documents first, then more windows of the same documents if there are too few.
    used: list[tuple[int, int, int]] = []  # (shard, first row, end row) of every held-out window

    def free(s: int, row: int) -> tuple[int, int] | None:
        rows = shards[s]
        if rows.doc_id[row] in seen_docs:
            return None
        first, hi = _window_bounds(rows, row, view, cfg)
        if any(u == s and first < u_hi and u_first < hi for u, u_first, u_hi in used):
            return None
        return first, hi

    def held(candidates, n: int, seen: set[int], accept=lambda s, first, hi: True) -> list[Window]:  # noqa: ANN001
        chosen: list[Window] = []
        for distinct in (True, False):
            for s, row in candidates:
                if len(chosen) >= n:
                    return chosen
                doc = shards[s].doc_id[row]
                span = None if distinct and doc in seen else free(s, row)
                if span is None or not accept(s, *span):
                    continue
                used.append((s, *span))
                seen.add(doc)
                chosen.append(_cut_window(shards[s], column, row, view, cfg, text_of))
        return chosen

    positives = [(s, row) for _, s, row in _firings(shards, column)]
    held_out = held(rng.sample(positives, len(positives)), cfg.n_score, set())
    # Non-activating: random windows in which the feature is zero at every token.
    total = sum(len(r.doc_id) for r in shards)
    tries = [_locate(shards, rng.randrange(total)) for _ in range(40 * cfg.n_score)] if total else []
    negatives = held(tries, len(held_out), set(),
                     lambda s, first, hi: not bool(torch.any(shards[s].acts_NS[first:hi, column] > 0)))
    held_out = held_out[:len(negatives)]  # balanced: as many activating as non-activating
    return FeatureEvidence(feature_id, view, explain, held_out, negatives)


# --- prompts ------------------------------------------------------------------------------

EXPLAIN_SYSTEM = (
    "You are a meticulous interpretability researcher. You are shown text excerpts on which one "
    "feature of a language model's internal activations fires, and explain in plain words what "
    "the feature detects. Tokens where it fires are marked <<like this>>; after each excerpt the "
    "marked tokens are listed with their activation level, from 1 (weak) to 9 (the strongest seen). "
    "Look at the marked tokens and their context: what do they have in common? Be specific. "
    "Answer in exactly two lines and nothing else: first a line starting with LABEL: and a short "
    "label of at most 8 words, then a line starting with DESCRIPTION: and one sentence saying "
    "when the feature fires."
)
EXPLAIN_QUESTION = "What do the marked tokens have in common?"
# Two worked examples, shown as earlier turns of the conversation: small chat models follow a
# format they have seen answered far more reliably than one they are only told about, and with
# two different answers they copy neither (with one, a 0.5B model labelled every feature
# "names of weekdays"). A reply that repeats a worked example's label is refused.
DEMOS = (
    ((("We met again on Monday morning before work.", "Monday", 9),
      ("The shop is closed every Sunday and on holidays.", "Sunday", 8),
      ("See you on Friday night at the game.", "Friday", 6)),
     "days of the week", "Fires on the names of weekdays, such as Monday or Friday."),
    ((("\"Come in,\" she said quietly.", "said", 9),
      ("He asked me where the station was.", "asked", 7),
      ("\"No,\" replied the old man.", "replied", 8)),
     "verbs of speaking", "Fires on verbs that report speech, such as said, asked or replied."),
)
DEMO_LABELS = tuple(label for _, label, _ in DEMOS)
RETRY_MESSAGE = (
    "That was not in the required format. Answer in exactly two lines: LABEL: followed by at most "
    "8 words, then DESCRIPTION: followed by one sentence."
)
REPLY_PREFILL = "LABEL:"
DETECT_SYSTEM = (
    "You check whether a feature of a language model, described below, fires anywhere in a text "
    "excerpt. Answer with one word: Yes or No."
)


def activation_level(activation: float, top: float) -> int:
    """0-9, relative to the strongest activation shown (any firing token is at least 1)."""
    if activation <= 0 or top <= 0:
        return 0
    return max(1, min(9, round(9 * activation / top)))


def mark_window(window: Window, top: float) -> tuple[str, list[tuple[str, int]]]:
    """The window's text with firing tokens in <<>>, and [(token, level)] for each of them."""
    pieces, levels, cursor = [], [], 0
    for start, end, act in sorted(window.token_acts):
        level = activation_level(act, top)
        if level == 0 or start < cursor:
            continue
        token = window.text[start:end]
        stripped = token.strip()
        if not stripped:
            continue
        lead = token[:len(token) - len(token.lstrip())]
        trail = token[len(token.rstrip()):]
        pieces.append(window.text[cursor:start])
        pieces.append(f"{lead}<<{stripped}>>{trail}")
        levels.append((stripped, level))
        cursor = end
    pieces.append(window.text[cursor:])
    return "".join(pieces), levels


def examples_text(windows: Sequence[Window]) -> str:
    """The numbered excerpts, firing tokens marked, each followed by its tokens' levels."""
    top = max((w.activation for w in windows), default=0.0)
    blocks = []
    for i, window in enumerate(windows, 1):
        marked, levels = mark_window(window, top)
        listed = ", ".join(f"{json.dumps(token, ensure_ascii=False)} {level}" for token, level in levels)
        blocks.append(f"Example {i}:\n{marked.strip()}\nActivations: {listed}")
    return "\n\n".join(blocks)


def _demo_windows(items: Sequence[tuple[str, str, int]]) -> list[Window]:
    windows = []
    for text, token, level in items:
        start = text.index(token)
        windows.append(Window(text, [(start, start + len(token), level / 9)]))
    return windows


def explanation_prompt(evidence: FeatureEvidence) -> Messages:
    # Instructions in the system message, worked examples as earlier turns, the feature's
    # examples last: small models otherwise echo the format instead of filling it in.
    messages = [{"role": "system", "content": EXPLAIN_SYSTEM}]
    for items, label, description in DEMOS:
        messages.append({"role": "user", "content": examples_text(_demo_windows(items)) + "\n\n" + EXPLAIN_QUESTION})
        messages.append({"role": "assistant", "content": f"LABEL: {label}\nDESCRIPTION: {description}"})
    messages.append({"role": "user", "content": examples_text(evidence.explain) + "\n\n" + EXPLAIN_QUESTION})
    return messages


def detection_prompt(label: str, description: str, text: str) -> Messages:
    described = f"{label}. {description}".strip() if description else label
    user = (f"Feature: {described}\n\nText excerpt:\n\"\"\"\n{text.strip()}\n\"\"\"\n\n"
            "Does this feature fire anywhere in the excerpt? Answer Yes or No.")
    return [{"role": "system", "content": DETECT_SYSTEM}, {"role": "user", "content": user}]


_LABEL_LINE = re.compile(r"^[\s*#>_-]*label[\s*_]*:[\s*_]*(.+?)[\s*_]*$", re.IGNORECASE | re.MULTILINE)
_DESCRIPTION_LINE = re.compile(r"^[\s*#>_-]*description[\s*_]*:[\s*_]*(.+?)[\s*_]*$", re.IGNORECASE | re.MULTILINE)
_INLINE_DESCRIPTION = re.compile(r"[\s*_]*description[\s*_]*:", re.IGNORECASE)
_MARKED = re.compile(r"<<\s*(.*?)\s*>>")  # a firing token quoted back in its markers
_LABEL_END = re.compile(r"\.\s|;|\s[-\u2013\u2014]\s|\(|:")  # where a run-on label line is cut


def _clean(text: str) -> str:
    return text.strip().strip("\"'`*_").strip().rstrip(".").strip().strip("\"'`*_").strip()


def parse_explanation(reply: str) -> tuple[str, str] | None:
    """(label, description) from a `LABEL:` / `DESCRIPTION:` reply; None when malformed.

    Tolerant of what small models write: markdown around the keys, the description on the
    label's line, no description after a finished label line (then it is ""), a label line that runs on into a
    sentence (cut at the first '. ', ';', ' - ', '(' or ':'). Refused: no LABEL line, an empty
    label or one still over 8 words, a template left unfilled (`<...>`), and labels that only
    repeat the prompt (the worked example's label, or words copied from the instructions)."""
    match = _LABEL_LINE.search(reply or "")
    if not match:
        return None
    line = match.group(1)
    inline = _INLINE_DESCRIPTION.search(line)
    described = _DESCRIPTION_LINE.search(reply)
    description = line[inline.end():] if inline else described.group(1) if described else ""
    description = _MARKED.sub(r"\1", description).strip().strip("\"'`*_").strip()
    if not inline and not described and "\n" not in reply[match.start(1):]:
        return None  # no description and the label line never ended: a cut-off reply
    label = _clean(_MARKED.sub(r"\1", line[:inline.start()] if inline else line))
    if len(label.split()) > MAX_LABEL_WORDS:
        cut = _LABEL_END.search(label)
        label = _clean(label[:cut.start()]) if cut else label
    if not label or len(label.split()) > MAX_LABEL_WORDS or "<" in label or "<" in description or "\ufffd" in label:
        return None
    echoed = len(label.split()) >= 3 and label.lower() in EXPLAIN_SYSTEM.lower()
    if label.lower() in DEMO_LABELS or echoed or label.lower() in ("description", "label"):
        return None
    return label, description


# --- scores ---------------------------------------------------------------------------------


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    """P(a random positive scores above a random negative), ties counting half."""
    if not positives or not negatives:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def balanced_accuracy(positives: Sequence[float], negatives: Sequence[float], threshold: float = 0.5) -> float | None:
    if not positives or not negatives:
        return None
    tpr = sum(p > threshold for p in positives) / len(positives)
    tnr = sum(n <= threshold for n in negatives) / len(negatives)
    return (tpr + tnr) / 2


# --- backends -------------------------------------------------------------------------------


class Backend(Protocol):
    name: str  # identity for the cache and the labels table ("local:SPEC" or "URL#MODEL")

    def complete(self, messages: Messages, max_tokens: int, prefill: str = "") -> str:
        """The reply to `messages`, greedy. Backends that can put words in the model's mouth
        start the reply with `prefill` (and return it as part of the reply); others ignore it."""
        ...

    def p_yes(self, messages: Messages) -> float: ...


class LocalChatModel:
    """A causal LM loaded by xdiff (`loading.LoadedModel`), greedy, on CPU or GPU."""

    YES = ("Yes", " Yes", "yes", " yes", "YES")
    NO = ("No", " No", "no", " no", "NO")

    def __init__(self, loaded, name: str) -> None:  # noqa: ANN001 - loading.LoadedModel
        self.loaded = loaded
        self.name = name
        tok = loaded.tokenizer
        self._yes = self._first_ids(self.YES)
        self._no = self._first_ids(self.NO) - self._yes
        if not self._yes or not self._no:
            raise XdiffError(f"the tokenizer of {name} has no Yes/No tokens to score with")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self._last: tuple[list[int], Any] | None = None  # the last scored prompt's ids and KV cache

    def _first_ids(self, words: Sequence[str]) -> set[int]:
        """The first token of each spelling (the whole word in any real chat vocabulary)."""
        ids = set()
        for word in words:
            encoded = self.loaded.tokenizer.encode(word, add_special_tokens=False)
            if encoded:
                ids.add(encoded[0])
        return ids

    def _input_ids(self, messages: Messages, prefill: str = ""):  # noqa: ANN202 - tensor
        import torch

        tok = self.loaded.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill
            ids = tok.encode(text, add_special_tokens=False)
        else:  # a base model: a plain transcript
            text = "".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant: " + prefill
            ids = tok.encode(text)
        return torch.tensor([ids], device=self.loaded.input_device)

    def complete(self, messages: Messages, max_tokens: int, prefill: str = "") -> str:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        tok = self.loaded.tokenizer
        ids = self._input_ids(messages, prefill)
        start = ids.shape[1]

        class AnswerComplete(StoppingCriteria):
            """Stop once a DESCRIPTION line has ended: small models ramble on otherwise."""

            def __call__(self, input_ids, scores, **kwargs) -> bool:  # noqa: ANN001, ANN003
                return bool(_FINISHED.search(prefill + tok.decode(input_ids[0, start:], skip_special_tokens=True)))

        with torch.no_grad():
            out = self.loaded.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                pad_token_id=tok.pad_token_id, stopping_criteria=StoppingCriteriaList([AnswerComplete()]),
            )
        return prefill + tok.decode(out[0, start:], skip_special_tokens=True)

    def p_yes(self, messages: Messages) -> float:
        """P(yes) / (P(yes) + P(no)) over the next token, summed over Yes/No spellings.

        Consecutive prompts share a long prefix (instructions and label; only the excerpt
        differs): the key/value cache of the last prompt is cut back to the shared tokens and
        only the rest is run, which gives the same logits at a third of the cost."""
        import torch

        ids = self._input_ids(messages)
        with torch.no_grad():
            logits = self._last_logits(ids)
        probs = torch.softmax(logits.float(), dim=-1)
        yes = float(probs[sorted(self._yes)].sum())
        no = float(probs[sorted(self._no)].sum())
        return 0.5 if yes + no <= 0 else yes / (yes + no)

    def _last_logits(self, ids):  # noqa: ANN001, ANN202 - tensors
        new = ids[0].tolist()
        if self._last is not None:
            old, cache = self._last
            shared = 0
            for a, b in zip(old, new[:-1], strict=False):  # at least one new token must run
                if a != b:
                    break
                shared += 1
            window = getattr(self.loaded.model.config, "sliding_window", None) or len(new)
            if shared >= 16 and len(new) <= window:
                try:
                    if len(old) > shared:  # a negative crop removes tokens in every transformers version
                        cache.crop(shared - len(old))
                    out = self.loaded.model(ids[:, shared:], past_key_values=cache, use_cache=True)
                    self._last = (new, out.past_key_values)
                    return out.logits[0, -1]
                except (AttributeError, NotImplementedError, ValueError, TypeError):
                    pass  # a cache that cannot be cut back (e.g. sliding-window layers): run it all
        self._last = None
        out = self.loaded.model(ids, use_cache=True)
        self._last = (new, out.past_key_values) if getattr(out, "past_key_values", None) is not None else None
        return out.logits[0, -1]


_FINISHED = re.compile(r"description\s*:[^\n]*\S[^\n]*\n", re.IGNORECASE)


class OpenAIEndpoint:
    """Any OpenAI-compatible chat-completions server (OpenAI, vLLM, llama.cpp, Ollama, ...).

    The API key is read from the environment at construction and only ever sent in the
    Authorization header: never stored, never printed."""

    def __init__(self, url: str, model: str, *, api_key_env: str = API_KEY_ENV, timeout: float = 60.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise XdiffError(f"--endpoint must be an http(s) URL, got {url!r}", "e.g. https://api.openai.com/v1")
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        self.model = model
        self.name = backend_name(model, url)
        self.timeout = timeout
        self._key = os.environ.get(api_key_env) or (os.environ.get("OPENAI_API_KEY") if api_key_env == API_KEY_ENV else None)
        self._logprobs = True  # dropped after the server rejects them once

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        import urllib.error
        import urllib.request

        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        for attempt in range(3):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as exc:
                if exc.code in (401, 403):
                    raise XdiffError(
                        f"the label endpoint rejected the API key (HTTP {exc.code})",
                        f"set ${API_KEY_ENV} (or $OPENAI_API_KEY) to a valid key",
                    ) from None
                if exc.code in (429, 500, 502, 503, 504) and attempt < 2:
                    time.sleep(1.0 + 2 * attempt)
                    continue
                if exc.code == 400 and body.get("logprobs"):
                    raise _LogprobsRejected from None
                raise XdiffError(f"the label endpoint answered HTTP {exc.code} {exc.reason}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                raise XdiffError(f"cannot reach the label endpoint {self.url}: {reason}",
                                 "check --endpoint and that the server is running") from None
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise XdiffError(f"the label endpoint {self.url} did not answer with JSON") from None
        raise AssertionError("unreachable")

    def _body(self, messages: Messages, max_tokens: int) -> dict[str, Any]:
        return {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}

    @staticmethod
    def _text(reply: dict[str, Any]) -> str:
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise XdiffError("the label endpoint's reply has no choices[0].message.content") from None

    def complete(self, messages: Messages, max_tokens: int, prefill: str = "") -> str:
        return self._text(self._post(self._body(messages, max_tokens)))  # chat APIs cannot prefill

    def p_yes(self, messages: Messages) -> float:
        body = self._body(messages, 1)
        if self._logprobs:
            body.update(logprobs=True, top_logprobs=10)
        try:
            reply = self._post(body)
        except _LogprobsRejected:
            self._logprobs = False
            reply = self._post(self._body(messages, 1))
        try:
            top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            yes = sum(math.exp(t["logprob"]) for t in top if t["token"].strip().lower() == "yes")
            no = sum(math.exp(t["logprob"]) for t in top if t["token"].strip().lower() == "no")
            if yes + no > 0:
                return yes / (yes + no)
        except (KeyError, IndexError, TypeError):
            pass
        answer = self._text(reply).strip().lower()
        return 1.0 if answer.startswith("yes") else 0.0 if answer.startswith("no") else 0.5


class _LogprobsRejected(Exception):
    pass


class ResponseCache:
    """Answers already received, keyed by sha256(backend, kind, prompt): re-runs send nothing."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.commit()

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, ensure_ascii=False, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, json.dumps(value)))
        self._db.commit()

    def close(self) -> None:
        self._db.close()


class CachedBackend:
    """A backend whose answers go through a `ResponseCache`; counts the requests really sent."""

    def __init__(self, backend: Backend, cache: ResponseCache) -> None:
        self.backend = backend
        self.cache = cache
        self.name = backend.name
        self.requests = 0

    def complete(self, messages: Messages, max_tokens: int, prefill: str = "") -> str:
        key = self.cache.key(self.name, "complete", max_tokens, prefill, messages)
        found = self.cache.get(key)
        if found is None:
            self.requests += 1
            found = self.backend.complete(messages, max_tokens, prefill)
            self.cache.put(key, found)
        return found

    def p_yes(self, messages: Messages) -> float:
        key = self.cache.key(self.name, "p_yes", messages)
        found = self.cache.get(key)
        if found is None:
            self.requests += 1
            found = float(self.backend.p_yes(messages))
            self.cache.put(key, found)
        return found


# --- the labels table ---------------------------------------------------------------------

LABELS_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    feature_id INTEGER PRIMARY KEY,
    model TEXT NOT NULL,              -- the explainer/scorer: "local:SPEC" or "URL#MODEL"
    status TEXT NOT NULL CHECK (status IN ('labelled', 'malformed', 'no_examples')),
    label TEXT,                       -- <= 8 words; NULL unless labelled
    description TEXT,
    auc REAL,                         -- detection AUC on held-out texts (the label_score)
    balanced_accuracy REAL,
    shuffled_auc REAL,                -- the same texts scored against another feature's label
    shuffled_balanced_accuracy REAL,
    n_scored INTEGER NOT NULL,        -- held-out texts (half activating, half not)
    scored_texts TEXT NOT NULL,       -- JSON [[text, activating], ...]: rescored for the baseline
    reply TEXT,                       -- the explainer's last raw reply
    seconds REAL NOT NULL             -- wall time spent on this feature (0 when cached)
);
"""


@dataclass
class LabelResult:
    feature_id: int
    status: str
    label: str | None = None
    description: str | None = None
    auc: float | None = None
    balanced_accuracy: float | None = None
    shuffled_auc: float | None = None
    shuffled_balanced_accuracy: float | None = None
    scored: list[tuple[str, bool]] = field(default_factory=list)
    reply: str | None = None
    seconds: float = 0.0


class LabelStore:
    """Read/write access to the `labels` table of a run's analysis.sqlite (each row one commit)."""

    def __init__(self, path: Path | str) -> None:
        path = Path(path)
        if not path.is_file():
            raise XdiffError("this run has not been analysed yet", "run `xdiff analyze` first")
        self._db = sqlite3.connect(path)
        self._db.executescript(LABELS_SCHEMA)
        self._db.commit()

    def done(self, model: str) -> set[int]:
        return {r[0] for r in self._db.execute("SELECT feature_id FROM labels WHERE model = ?", (model,))}

    def save(self, model: str, result: LabelResult) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO labels VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (result.feature_id, model, result.status, result.label, result.description, result.auc,
             result.balanced_accuracy, result.shuffled_auc, result.shuffled_balanced_accuracy,
             len(result.scored), json.dumps(result.scored, ensure_ascii=False), result.reply, result.seconds),
        )
        self._db.commit()

    def results(self, model: str | None = None) -> list[LabelResult]:
        sql = ("SELECT feature_id, status, label, description, auc, balanced_accuracy, shuffled_auc, "
               "shuffled_balanced_accuracy, scored_texts, reply, seconds FROM labels")
        rows = self._db.execute(sql + (" WHERE model = ?" if model else "") + " ORDER BY feature_id",
                                (model,) if model else ())
        return [LabelResult(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7],
                            [(t, bool(a)) for t, a in json.loads(r[8])], r[9], r[10]) for r in rows]

    def close(self) -> None:
        self._db.close()


# --- labelling ------------------------------------------------------------------------------


def explain(backend: Backend, evidence: FeatureEvidence, config: LabelConfig) -> tuple[tuple[str, str] | None, str]:
    """(label, description) or None after one retry, and the last raw reply."""
    messages = explanation_prompt(evidence)
    # Local models get the reply started for them ("LABEL:"): small ones then keep the format.
    reply = backend.complete(messages, config.max_new_tokens, prefill=REPLY_PREFILL)
    parsed = parse_explanation(reply)
    if parsed is None:
        retry = messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": RETRY_MESSAGE}]
        reply = backend.complete(retry, config.max_new_tokens, prefill=REPLY_PREFILL)
        parsed = parse_explanation(reply)
    return parsed, reply


def detection_scores(backend: Backend, label: str, description: str,
                     scored: Sequence[tuple[str, bool]]) -> tuple[float | None, float | None]:
    """(AUC, balanced accuracy) of `label` at telling activating from non-activating texts."""
    pos, neg = [], []
    for text, activating in scored:
        (pos if activating else neg).append(backend.p_yes(detection_prompt(label, description, text)))
    return auc(pos, neg), balanced_accuracy(pos, neg)


def label_feature(backend: Backend, evidence: FeatureEvidence, config: LabelConfig) -> LabelResult:
    started = time.perf_counter()
    if not evidence.explain:
        return LabelResult(evidence.feature_id, "no_examples")
    parsed, reply = explain(backend, evidence, config)
    scored = [(w.text, True) for w in evidence.held_out] + [(w.text, False) for w in evidence.negatives]
    if parsed is None:
        return LabelResult(evidence.feature_id, "malformed", scored=scored, reply=reply,
                           seconds=time.perf_counter() - started)
    label, description = parsed
    score_auc, score_bacc = detection_scores(backend, label, description, scored)
    return LabelResult(evidence.feature_id, "labelled", label, description, score_auc, score_bacc,
                       scored=scored, reply=reply, seconds=time.perf_counter() - started)


def shuffled_baseline(backend: Backend, results: list[LabelResult]) -> list[LabelResult]:
    """Score each labelled feature's held-out texts with the next labelled feature's label."""
    labelled = [r for r in results if r.status == "labelled"]
    if len(labelled) < 2:
        return []
    for i, result in enumerate(labelled):
        other = labelled[(i + 1) % len(labelled)]
        result.shuffled_auc, result.shuffled_balanced_accuracy = detection_scores(
            backend, other.label or "", other.description or "", result.scored)
    return labelled


@dataclass
class LabelSummary:
    model: str
    labelled: int
    malformed: int
    skipped: int  # already labelled by this model before this call
    requests: int  # requests really sent (the rest came from the cache)
    seconds: float
    mean_auc: float | None
    mean_shuffled_auc: float | None
    mean_balanced_accuracy: float | None
    mean_shuffled_balanced_accuracy: float | None
    results: list[LabelResult]

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("model", "labelled", "malformed", "skipped", "requests", "seconds",
                                             "mean_auc", "mean_shuffled_auc", "mean_balanced_accuracy",
                                             "mean_shuffled_balanced_accuracy")}
        out["features"] = [
            {"id": r.feature_id, "status": r.status, "label": r.label, "description": r.description,
             "auc": r.auc, "balanced_accuracy": r.balanced_accuracy, "shuffled_auc": r.shuffled_auc,
             "shuffled_balanced_accuracy": r.shuffled_balanced_accuracy, "n_scored": len(r.scored),
             "seconds": r.seconds}
            for r in self.results
        ]
        return out


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def select_features(index_path: Path, partition: str, limit: int | None) -> list[tuple[int, str]]:
    """(feature id, view) of the live features to label, in the default ranking order."""
    from xdiff_cli.findings.feature_index import FeatureIndex

    if partition not in PARTITIONS:
        raise XdiffError(f"unknown partition {partition!r}", "use a, b, candidates or all")
    index = FeatureIndex.open(index_path)
    try:
        rows = index.features(partition=partition if partition in ("a", "b") else None,
                              candidates_only=partition == "candidates", alive_only=True, limit=limit)
    finally:
        index.close()
    return [(f.id, f.own_view) for f in rows]


def label_features(
    index_path: Path,
    cache_path: Path,
    backend: Backend,
    features: Sequence[tuple[int, str]],
    evidence_for: Callable[[list[tuple[int, str]]], dict[int, FeatureEvidence]],
    config: LabelConfig = LabelConfig(),
    *,
    force: bool = False,
    on_feature: Callable[[LabelResult, int], None] | None = None,
) -> LabelSummary:
    """Label `features` (skipping ones this model already labelled unless `force`), score each
    label on held-out texts, then refresh the shuffled-label baseline of every label by this model.

    `evidence_for(todo)` is called once, only when some feature still needs labelling: it is
    the pass over the activation store."""
    started = time.perf_counter()
    store = LabelStore(index_path)
    cache = ResponseCache(cache_path)
    cached = CachedBackend(backend, cache)
    try:
        done = set() if force else store.done(backend.name)
        todo = [f for f in features if f[0] not in done]
        evidence = evidence_for(todo) if todo else {}
        new: list[LabelResult] = []
        for feature_id, _ in todo:
            before = cached.requests
            result = label_feature(cached, evidence[feature_id], config)
            if cached.requests == before:
                result.seconds = 0.0
            store.save(backend.name, result)
            new.append(result)
            if on_feature:
                on_feature(result, cached.requests)
        everything = store.results(backend.name)
        for result in shuffled_baseline(cached, everything):
            store.save(backend.name, result)
        wanted = {f for f, _ in features}
        mine = [r for r in store.results(backend.name) if r.feature_id in wanted]
    finally:
        cache.close()
        store.close()
    labelled = [r for r in mine if r.status == "labelled"]
    return LabelSummary(
        model=backend.name, labelled=len(labelled), malformed=sum(r.status == "malformed" for r in mine),
        skipped=len(features) - len(todo), requests=cached.requests, seconds=time.perf_counter() - started,
        mean_auc=_mean([r.auc for r in labelled]), mean_shuffled_auc=_mean([r.shuffled_auc for r in labelled]),
        mean_balanced_accuracy=_mean([r.balanced_accuracy for r in labelled]),
        mean_shuffled_balanced_accuracy=_mean([r.shuffled_balanced_accuracy for r in labelled]),
        results=mine,
    )


# --- backends from CLI options and the run-level entry point --------------------------------


def backend_name(model: str | None, endpoint: str | None) -> str:
    """The labeller's identity in the labels table and the cache: "URL#MODEL" or "local:SPEC"."""
    if endpoint:
        return f"{endpoint.rstrip('/')}#{model}"
    return f"local:{model or DEFAULT_LOCAL_MODEL}"


def make_backend(model: str | None, endpoint: str | None, *, device: str = "auto",
                 api_key_env: str = API_KEY_ENV, settings=None) -> Backend:  # noqa: ANN001 - RunSettings
    """`--endpoint URL --model NAME` → an OpenAI-compatible endpoint; else a local chat model
    (`--model SPEC`, default DEFAULT_LOCAL_MODEL) loaded the way xdiff loads any model."""
    if endpoint:
        if not model:
            raise XdiffError("--endpoint needs --model NAME (the model the server should use)")
        return OpenAIEndpoint(endpoint, model, api_key_env=api_key_env)
    spec = model or DEFAULT_LOCAL_MODEL
    from xdiff_cli.models.loading import load_model
    from xdiff_cli.models.pull import fetch

    fetched = fetch(spec, allow_pickle_weights=bool(getattr(settings, "allow_pickle_weights", False)))
    path = fetched.path
    return LocalChatModel(load_model(path, device=device), name=backend_name(spec, None))


def run_evidence(run, device: str = "cpu", config: LabelConfig = LabelConfig(),  # noqa: ANN001 - runs.Run
                 advance: Callable[[int], None] | None = None) -> Callable[[list[tuple[int, str]]], dict[int, FeatureEvidence]]:
    """An `evidence_for` reading the run's crosscoder and eval split (loaded only when called)."""

    def evidence_for(todo: list[tuple[int, str]]) -> dict[int, FeatureEvidence]:
        from xdiff_cli.dfc.crosscoder import Crosscoder

        crosscoder = Crosscoder.load(run.crosscoder_dir / "final", device=device)
        store = run.open_store()
        return collect_evidence(crosscoder, store.split("eval"), store, todo, config, device=device, advance=advance,
                                explain_split=store.split("train"))

    return evidence_for


def cache_path_for(run) -> Path:  # noqa: ANN001 - runs.Run
    return run.dir / "label_cache.sqlite"


def label_run(
    run,  # noqa: ANN001 - runs.Run
    *,
    model: str | None = None,
    endpoint: str | None = None,
    partition: str = "candidates",
    limit: int | None = 20,
    device: str = "auto",
    api_key_env: str = API_KEY_ENV,
    force: bool = False,
    config: LabelConfig = LabelConfig(),
    on_start: Callable[[int], None] | None = None,
    on_feature: Callable[[LabelResult, int], None] | None = None,
) -> LabelSummary:
    """Label the top `limit` live features of `partition` of an analysed run (`xdiff label`,
    `xdiff run --label`). The labeller is loaded only when something is left to label."""
    from xdiff_cli.models.loading import resolve_device

    features = select_features(run.analysis_path, partition, limit)
    if not features:
        raise XdiffError(f"run {run.id} has no live features in partition {partition!r}")
    if on_start:
        on_start(len(features))
    device = resolve_device(device)
    store = LabelStore(run.analysis_path)
    try:
        done = store.done(backend_name(model, endpoint))
    finally:
        store.close()
    pending = force or any(f not in done for f, _ in features)
    backend: Backend = (make_backend(model, endpoint, device=device, api_key_env=api_key_env, settings=run.settings)
                        if pending else _Unloaded(backend_name(model, endpoint)))
    return label_features(run.analysis_path, cache_path_for(run), backend, features,
                          run_evidence(run, device=device, config=config), config, force=force, on_feature=on_feature)


class _Unloaded:
    """Stands in for a labeller that is not needed (every feature already labelled); the
    shuffled baseline it refreshes comes from the cache."""

    def __init__(self, name: str) -> None:
        self.name = name

    def complete(self, messages: Messages, max_tokens: int, prefill: str = "") -> str:
        raise XdiffError("the labeller was asked for an answer it should have had cached", "rerun with --force")

    def p_yes(self, messages: Messages) -> float:
        raise XdiffError("the labeller was asked for a score it should have had cached", "rerun with --force")
