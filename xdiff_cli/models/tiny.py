"""Tiny real-architecture model pairs, built offline, with planted differences.

Used by the test-suite and by the `tiny` preset (`xdiff run --preset tiny`): it needs no
network, yet every code path is the real one — real `LlamaForCausalLM`/`Qwen3ForCausalLM`/
`GptOssForCausalLM` classes, real byte-level BPE tokenizers (trained here on local text,
with *different* vocabularies), chat templates, `save_pretrained` directories that the Auto
classes load under `HF_HUB_OFFLINE=1`.

Planted differences make the pipeline's answer checkable: every token that spells an
ANIMALS word gets one extra direction added to its input embedding in model B only (a
B-exclusive concept), and every COLORS token gets a direction in *both* models (a shared
concept). `planted.json` in each model directory records which token ids were touched.

The *contextual* pair (`llama-ctx`, `qwen3-ctx`, see `CONTEXTUAL`) adds topics that live in
context, not in a token: an attention head of layer 0 looks back for a topic's trigger words
and writes a topic direction into every later position. Model A carries one topic alone,
model B another, both carry a third. Whether a position is "in" a topic is known from the
text alone (`topic_spans`), so a benchmark can check which features found which topic.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ANIMALS = ("cat", "dog", "horse", "tiger", "rabbit", "eagle", "whale", "wolf", "mouse", "bear")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
_NAMES = ("Anna", "Bruno", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Jun")
_PLACES = ("the river", "the market", "the old house", "the forest", "the station", "the school", "the hill")
_OBJECTS = ("a book", "the letter", "a small box", "the key", "some bread", "a lamp", "the map", "a coin")
_VERBS = ("saw", "found", "painted", "carried", "followed", "watched", "bought", "sold", "drew", "lost")
_ADVERBS = ("quietly", "again", "yesterday", "at noon", "before dinner", "in the rain", "twice", "slowly")
_TOPICS = ("the weather", "a recipe", "the train times", "an old song", "the garden", "the budget", "a poem")
# Text the tokenizers must survive: CJK, emoji, combining marks, smart quotes, digit runs, code.
_HARD_SNIPPETS = (
    "東京は大きな都市です。",
    "今日はいい天気ですね 🌞",
    "The café served crème brûlée — “perfect”, she said.",
    "e\u0301 and n\u0303 are combining marks.",
    "In 1989 the price was 12345.67 and in 2024 it was 987654.",
    "def add(a, b):\n    return a + b  # 👍",
    "Total:\t\t42   items   (whitespace   runs)",
    "Emoji family: 👨‍👩‍👧 and flags 🇫🇷🇯🇵.",
)


# Contextual topics: trigger words (single tokens in every tiny tokenizer) -> carried from
# the trigger to the end of the document by the models listed in TinySpec.contextual.
CONTEXTUAL = {
    "topic_a": ("weather", "garden"),  # carried by model A only
    "topic_b": ("recipe", "budget"),  # carried by model B only
    "topic_shared": ("poem", "song"),  # carried by both
}


def _sentence(rng: random.Random) -> str:
    name, verb, adverb = rng.choice(_NAMES), rng.choice(_VERBS), rng.choice(_ADVERBS)
    kind = rng.random()
    if kind < 0.3:
        return f"{name} {verb} a {rng.choice(ANIMALS)} near {rng.choice(_PLACES)} {adverb}."
    if kind < 0.55:
        return f"{name} {verb} {rng.choice(_OBJECTS)} painted {rng.choice(COLORS)} {adverb}."
    if kind < 0.7:
        return f"The {rng.choice(COLORS)} {rng.choice(ANIMALS)} {verb} {rng.choice(_OBJECTS)}."
    if kind < 0.9:
        return f"{name} {verb} {rng.choice(_OBJECTS)} at {rng.choice(_PLACES)} {adverb}."
    return f"We talked about {rng.choice(_TOPICS)} for {rng.randint(2, 59)} minutes."


def synthetic_documents(n_docs: int, seed: int = 0, hard_text: bool = True) -> Iterator[str]:
    """Deterministic plain-text documents of 3–8 sentences over a small vocabulary."""
    rng = random.Random(seed)
    for _ in range(n_docs):
        sentences = [_sentence(rng) for _ in range(rng.randint(3, 8))]
        if hard_text and rng.random() < 0.15:
            sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(_HARD_SNIPPETS))
        yield " ".join(sentences)


def synthetic_chats(n_chats: int, seed: int = 1) -> Iterator[list[dict[str, str]]]:
    """Deterministic two-turn chats (user, assistant) in the `messages` format."""
    rng = random.Random(seed)
    for _ in range(n_chats):
        question = f"Can you tell me about {rng.choice(_TOPICS)} and the {rng.choice(ANIMALS)}?"
        answer = " ".join(_sentence(rng) for _ in range(rng.randint(2, 4)))
        yield [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# --- tokenizers -------------------------------------------------------------------------

_LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_HARMONY_TEMPLATE = (
    "{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant<|message|>{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """One tiny model: architecture, width, tokenizer vocabulary and special tokens."""

    name: str
    arch: str  # "llama" | "qwen3" | "gpt_oss"
    hidden_size: int
    num_layers: int
    vocab_size: int
    bos: str | None
    eos: str
    pad: str
    extra_specials: tuple[str, ...]
    chat_template: str
    plants_exclusive: bool  # does this model carry the B-exclusive ANIMALS direction?
    contextual: tuple[str, ...] = ()  # CONTEXTUAL topics an attention head carries forward


TINY_SPECS = {
    "llama": TinySpec(
        "llama", "llama", 64, 4, 1000, "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
        ("<|start_header_id|>", "<|end_header_id|>"), _LLAMA_TEMPLATE, plants_exclusive=False,
    ),
    "qwen3": TinySpec(
        "qwen3", "qwen3", 48, 4, 760, None, "<|im_end|>", "<|endoftext|>",
        ("<|im_start|>",), _CHATML_TEMPLATE, plants_exclusive=True,
    ),
    "gptoss": TinySpec(
        "gptoss", "gpt_oss", 32, 4, 600, "<|startoftext|>", "<|return|>", "<|endoftext|>",
        ("<|start|>", "<|message|>", "<|end|>"), _HARMONY_TEMPLATE, plants_exclusive=True,
    ),
}
# The contextual pair: the same tokenizers as llama/qwen3 (same seeds), plus topic heads.
TINY_SPECS["llama-ctx"] = TinySpec(
    "llama-ctx", "llama", 64, 4, 1000, "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
    ("<|start_header_id|>", "<|end_header_id|>"), _LLAMA_TEMPLATE, plants_exclusive=False,
    contextual=("topic_a", "topic_shared"),
)
TINY_SPECS["qwen3-ctx"] = TinySpec(
    "qwen3-ctx", "qwen3", 48, 4, 760, None, "<|im_end|>", "<|endoftext|>",
    ("<|im_start|>",), _CHATML_TEMPLATE, plants_exclusive=True, contextual=("topic_b", "topic_shared"),
)


def _tokenizer_training_text(seed: int) -> list[str]:
    docs = list(synthetic_documents(1500, seed=seed))
    docs += [" ".join(m["content"] for m in chat) for chat in synthetic_chats(300, seed=seed + 1)]
    docs += list(_HARD_SNIPPETS) * 3
    return docs


def build_tokenizer(spec: TinySpec, seed: int = 0):
    """A byte-level BPE tokenizer trained on local text, wrapped as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in (spec.bos, spec.eos, spec.pad, *spec.extra_specials) if t]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_training_text(seed), trainer=trainer)
    if spec.bos:
        bos_id = tok.token_to_id(spec.bos)
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B", special_tokens=[(spec.bos, bos_id)]
                ),
            ]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        additional_special_tokens=list(spec.extra_specials),
    )
    hf_tok.chat_template = spec.chat_template
    return hf_tok


# --- models -----------------------------------------------------------------------------


def _config(spec: TinySpec, tokenizer):
    from transformers import GptOssConfig, LlamaConfig, Qwen3Config

    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "max_position_embeddings": 512,
        "num_hidden_layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "tie_word_embeddings": False,
    }
    if spec.arch == "llama":
        return LlamaConfig(intermediate_size=spec.hidden_size * 2, num_attention_heads=4, num_key_value_heads=2, **ids)
    if spec.arch == "qwen3":
        return Qwen3Config(
            intermediate_size=spec.hidden_size * 2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
            **ids,
        )
    if spec.arch == "gpt_oss":
        return GptOssConfig(
            intermediate_size=spec.hidden_size * 2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            num_local_experts=4, num_experts_per_tok=2, sliding_window=64,
            layer_types=["sliding_attention", "full_attention"] * (spec.num_layers // 2),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **ids,
        )
    raise ValueError(f"unknown tiny arch {spec.arch}")


def _word_token_ids(tokenizer, words) -> dict[str, list[int]]:
    """Token ids whose text is exactly one of `words` (with or without a leading space)."""
    found: dict[str, list[int]] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in tokenizer.all_special_ids:
            continue
        text = tokenizer.convert_tokens_to_string([token]).strip().lower()
        if text in words:
            found.setdefault(text, []).append(token_id)
    return found


def _plant(embedding, token_ids: list[int], direction, strength: float) -> None:
    import torch

    with torch.no_grad():
        embedding.weight[token_ids] += strength * direction


def build_tiny_model(spec: TinySpec, out_dir: Path, seed: int = 0) -> Path:
    """Build, plant and save one tiny model + tokenizer into `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(spec, seed=seed)
    config = _config(spec, tokenizer)
    model = AutoModelForCausalLM.from_config(config)
    # Random init leaves logits near-uniform; a larger init gives the tiny model
    # non-trivial, input-dependent activations and generations.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    embedding = model.get_input_embeddings()
    typical_norm = float(embedding.weight.detach().norm(dim=-1).median())
    generator = torch.Generator().manual_seed(seed + 1000 + spec.hidden_size)
    planted: dict[str, dict] = {}
    concepts = [("shared", COLORS)]
    if spec.plants_exclusive:
        concepts.append(("exclusive", ANIMALS))
    for label, words in concepts:
        direction = torch.randn(spec.hidden_size, generator=generator)
        direction /= direction.norm()
        ids_by_word = _word_token_ids(tokenizer, set(words))
        all_ids = sorted({i for ids in ids_by_word.values() for i in ids})
        # Strong enough to dominate the token's own identity, weak enough to stay under the
        # harvest's 2x-median outlier cut.
        _plant(embedding, all_ids, direction, strength=1.2 * typical_norm)
        planted[label] = {"words": sorted(ids_by_word), "token_ids": all_ids, "direction": direction.tolist()}
    if spec.contextual:
        planted.update(_plant_topic_heads(model, spec, tokenizer, generator, typical_norm))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "planted.json").write_text(json.dumps(planted, indent=1))
    return out_dir


def _plant_topic_heads(model, spec: TinySpec, tokenizer, generator, typical_norm: float) -> dict[str, dict]:  # noqa: ANN001
    """Layer 0, one KV head per topic: the head attends to the latest trigger token of its
    topic and writes the topic direction into the current position.

    Every token embedding gets a constant direction u, so a query that reads u is the same
    at every position; the key and value read the trigger words' embedding directions. The
    slowest rotary pair (dim head_dim/2 − 1) carries the query·key product, so the score
    barely depends on distance: the topic holds until the end of the document. For Qwen3's
    per-head q/k RMSNorm the key also reads u into its other dims (a steady norm) and the
    norm weights of the slow dim carry the gain."""
    import torch

    cfg = model.config
    attn = model.model.layers[0].self_attn
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    slow = head_dim // 2 - 1
    emb = model.get_input_embeddings().weight
    planted = {}
    with torch.no_grad():
        u = torch.randn(spec.hidden_size, generator=generator)
        u /= u.norm()
        raw = emb.detach().clone()
        emb += 3.0 * u  # ~3 sigma: the query's sign is the same at every position
        qk_norm = hasattr(attn, "q_norm")
        for kv, topic in enumerate(spec.contextual):
            if kv >= cfg.num_key_value_heads:
                raise ValueError(f"{spec.name}: more topics than key/value heads")
            ids = sorted({i for found in _word_token_ids(tokenizer, set(CONTEXTUAL[topic])).values() for i in found})
            trig = raw[ids] / raw[ids].norm(dim=-1, keepdim=True)
            reader = trig.sum(0)  # projection ~ |e| on a trigger, ~N(0, 1) elsewhere
            reader -= (reader @ u) * u  # blind to u: no topic signal where no trigger was seen
            direction = torch.randn(spec.hidden_size, generator=generator)
            direction /= direction.norm()
            q_rows = slice(kv * group * head_dim, (kv + 1) * group * head_dim)
            kv_rows = slice(kv * head_dim, (kv + 1) * head_dim)
            attn.q_proj.weight[q_rows] = 0.0
            attn.k_proj.weight[kv_rows] = 0.0
            attn.v_proj.weight[kv_rows] = 0.0
            attn.o_proj.weight[:, q_rows] = 0.0
            q_head = kv * group * head_dim  # the first query head of the group; the others stay silent
            attn.v_proj.weight[kv * head_dim] = reader / typical_norm
            attn.o_proj.weight[:, q_head] = 1.2 * typical_norm * direction
            if qk_norm:
                attn.q_proj.weight[q_head + slow] = u
                attn.k_proj.weight[kv * head_dim + slow] = reader / typical_norm
                for j in range(head_dim):
                    if j != slow:
                        attn.k_proj.weight[kv * head_dim + j] = u
                # q/k norms are shared by all heads: the slow dim's gain goes there. Scores come
                # out like the Llama branch's: ~15 on a trigger, noise sd ~3 elsewhere.
                attn.q_norm.weight[slow] = 4.5
                attn.k_norm.weight[slow] = 9.6
            else:
                # score = q·k/√hd ≈ 2 (trigger projection in units of the typical norm) · gain
                attn.q_proj.weight[q_head + slow] = u * (2.0 * head_dim**0.5 / 3.0)
                attn.k_proj.weight[kv * head_dim + slow] = reader
            planted[topic] = {"words": list(CONTEXTUAL[topic]), "token_ids": ids, "direction": direction.tolist()}
        if qk_norm:
            # Other heads do not use the slow dim (its norm gain would swamp them).
            for head in range(cfg.num_attention_heads):
                if head % group or head // group >= len(spec.contextual):
                    attn.q_proj.weight[head * head_dim + slow] = 0.0
    return planted


def topic_spans(text: str, words) -> list[tuple[int, int]]:  # noqa: ANN001
    """Character spans of `text` inside a topic: from the first trigger word to the end."""
    import re

    found = re.search(r"\b(" + "|".join(map(re.escape, words)) + r")\b", text, flags=re.IGNORECASE)
    return [(found.start(), len(text))] if found else []


def contextual_documents(n_docs: int, seed: int = 0) -> Iterator[str]:
    """Short documents (2-5 sentences); about half bring up one topic at a random sentence."""
    rng = random.Random(seed)
    triggers = [w for words in CONTEXTUAL.values() for w in words]
    for _ in range(n_docs):
        sentences = [_sentence(rng) for _ in range(rng.randint(2, 5))]
        sentences = [s for s in sentences if not any(w in s for w in triggers)] or ["Anna saw a cat."]
        if rng.random() < 0.6:
            topic = rng.choice(triggers)
            line = rng.choice((f"We talked about the {topic} for {rng.randint(2, 59)} minutes.", f"Then the {topic} came up."))
            sentences.insert(rng.randrange(len(sentences)), line)
        yield " ".join(sentences)


def write_contextual_corpus_jsonl(path: Path, n_docs: int = 2000, seed: int = 0) -> Path:
    """Plain-text documents for the contextual pair, in xdiff's .jsonl format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for text in contextual_documents(n_docs, seed=seed):
            fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def build_tiny_models(root: Path, names=("llama", "qwen3", "gptoss"), seed: int = 0) -> dict[str, Path]:
    """Build the named tiny models under `root/<name>` (skipping complete ones)."""
    root = Path(root)
    paths = {}
    for index, name in enumerate(names):
        target = root / name
        if not (target / "planted.json").exists():
            build_tiny_model(TINY_SPECS[name], target, seed=seed + index)
        paths[name] = target
    return paths


def write_corpus_jsonl(path: Path, n_docs: int = 400, n_chats: int = 100, seed: int = 0) -> Path:
    """A mixed web-text + chat corpus in xdiff's .jsonl format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for text in synthetic_documents(n_docs, seed=seed):
            fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        for messages in synthetic_chats(n_chats, seed=seed + 1):
            fh.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path
