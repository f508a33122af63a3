"""Cross-tokenizer alignment on hard text, with the tiny models' real (different) tokenizers."""

from __future__ import annotations

import numpy as np
import pytest

from xdiff_cli.data.alignment import align, align_by_windows, token_bytes, token_spans
from xdiff_cli.data.corpus import Document, render_document

HARD_TEXTS = {
    "cjk": "東京は大きな都市です。今日はいい天気ですね",
    "emoji": "Family 👨‍👩‍👧 and flags 🇫🇷🇯🇵 and a thumbs up 👍🏽!",
    "combining": "e\u0301 and n\u0303 — crème brûlée, Åström",
    "smart_quotes": "“Perfect,” she said — it’s ‘fine’…",
    "digits": "In 1989 the price was 12345.67 and in 2024 it was 987654.",
    "whitespace": "Total:\t\t42   items   (whitespace   runs)\n\n\n   end",
    "code": "def add(a, b):\n    return a + b  # 👍\n\nprint(add(1, 2))",
}
PAIRS = [("llama", "qwen3"), ("llama", "gptoss"), ("qwen3", "gptoss")]


@pytest.fixture(scope="module")
def tokenizers(tiny_models):
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(str(path)) for name, path in tiny_models.items()}


def _encode(tokenizer, text):
    enc = tokenizer(text, return_offsets_mapping=True)
    special = np.isin(enc["input_ids"], tokenizer.all_special_ids)
    return enc["input_ids"], token_spans(text, np.array(enc["offset_mapping"]), special)


@pytest.mark.parametrize("kind", sorted(HARD_TEXTS))
@pytest.mark.parametrize("name_a,name_b", PAIRS)
def test_offset_alignment_matches_the_papers_window_algorithm(tokenizers, kind, name_a, name_b):
    text = HARD_TEXTS[kind]
    ids_a, spans_a = _encode(tokenizers[name_a], text)
    ids_b, spans_b = _encode(tokenizers[name_b], text)
    pairs = align(spans_a, spans_b)
    reference = align_by_windows(token_bytes(tokenizers[name_a], ids_a), token_bytes(tokenizers[name_b], ids_b), text)
    assert list(zip(pairs.pos_a.tolist(), pairs.pos_b.tolist(), strict=True)) == reference
    assert len(pairs) > 0


@pytest.mark.parametrize("kind", sorted(HARD_TEXTS))
def test_pairs_end_where_both_token_texts_end(tokenizers, kind):
    """Every kept pair's spans spell the token texts; decoding up to a pair gives the same prefix."""
    text = HARD_TEXTS[kind]
    tok_a, tok_b = tokenizers["llama"], tokenizers["gptoss"]
    ids_a, spans_a = _encode(tok_a, text)
    ids_b, spans_b = _encode(tok_b, text)
    pairs = align(spans_a, spans_b)
    for pa, pb, sa, sb, end in zip(pairs.pos_a, pairs.pos_b, pairs.start_a, pairs.start_b, pairs.end, strict=True):
        # both tokenizations have consumed exactly text[:end] at the paired tokens
        assert tok_a.decode(ids_a[: pa + 1], skip_special_tokens=True) == text[:end]
        assert tok_b.decode(ids_b[: pb + 1], skip_special_tokens=True) == text[:end]
        # and each span is the text of its token, when that token is a whole character run
        for tok, ids, pos, start in ((tok_a, ids_a, pa, sa), (tok_b, ids_b, pb, sb)):
            piece = tok.decode([ids[pos]])
            if "\ufffd" not in piece:
                assert piece.strip() == text[start:end].strip()
            assert text[start:end].strip()  # never a whitespace-only token


def test_digit_run_split_differently_pairs_last_tokens(tokenizers):
    text = "In 1989 it rained."
    ids_a, spans_a = _encode(tokenizers["llama"], text)
    ids_b, spans_b = _encode(tokenizers["gptoss"], text)
    pairs = align(spans_a, spans_b)
    pieces_b = [tokenizers["gptoss"].decode([i]) for i in ids_b]
    assert pieces_b[pieces_b.index(" 1") : pieces_b.index(" 1") + 3] == [" 1", "98", "9"]  # B splits 1989
    end = text.index("1989") + 4
    k = pairs.end.tolist().index(end)
    assert text[pairs.start_a[k] : end] == " 1989"  # A's one token ...
    assert text[pairs.start_b[k] : end] == "9"  # ... pairs with B's last piece
    assert (text.index("1989") + 2) not in pairs.end.tolist()  # no pair in the middle of B's window


def test_multibyte_character_pairs_only_its_last_byte_piece(tokenizers):
    text = "東京"
    ids, spans = _encode(tokenizers["gptoss"], text)
    # gptoss spells each CJK character in three byte pieces sharing that character's offsets
    assert len(ids) == 1 + 6
    assert spans.keep.tolist() == [False, False, False, True, False, False, True]
    _, llama = _encode(tokenizers["llama"], text)
    # llama has a byte piece straddling both characters, so it reaches no boundary after 東
    assert 1 not in llama.end[llama.keep].tolist()
    pairs = align(spans, llama)
    assert pairs.end.tolist() == [2] and pairs.fully_aligned


def test_bos_and_whitespace_tokens_are_never_paired(tokenizers):
    text = "Hello   world\n\n  again"
    ids_a, spans_a = _encode(tokenizers["llama"], text)
    assert ids_a[0] == tokenizers["llama"].bos_token_id and not spans_a.content[0]
    pairs = align(spans_a, _encode(tokenizers["qwen3"], text)[1])
    assert 0 not in pairs.pos_a.tolist()
    assert all(text[s:e].strip() for s, e in zip(pairs.start_a, pairs.end, strict=True))
    assert pairs.aligned_fraction == pytest.approx(1.0)


def test_chat_template_tokens_are_skipped_and_offsets_index_canonical_text(tokenizers):
    messages = [{"role": "user", "content": "Hi there, 東京?"}, {"role": "assistant", "content": "Hello! 1989 👍"}]
    doc = Document(0, "Hi there, 東京?\n\nHello! 1989 👍", messages)
    spans = {}
    for name in ("llama", "qwen3"):
        tok = tokenizers[name]
        rendered = render_document(tok, doc)
        assert "<|" in rendered.string  # the model's own template was used
        enc = tok(rendered.string, add_special_tokens=False, return_offsets_mapping=True)
        special = np.isin(enc["input_ids"], tok.all_special_ids)
        spans[name] = token_spans(rendered.string, np.array(enc["offset_mapping"]), special, rendered.content_spans)
        # every content token maps into the canonical text with the same characters
        for start, end in zip(spans[name].start[spans[name].content], spans[name].end[spans[name].content], strict=True):
            assert 0 <= start < end <= len(doc.text)
        # the template text (role names, markers) is exactly what the content mask leaves out
        template = "".join(tok.decode([i]) for i, c in zip(enc["input_ids"], spans[name].content, strict=True) if not c)
        assert "user" in template and "assistant" in template
        assert "Hello" not in template and "1989" not in template
    pairs = align(spans["llama"], spans["qwen3"])
    texts = [doc.text[s:e] for s, e in zip(pairs.start_a, pairs.end, strict=True)]
    assert "user" not in "".join(texts) and "assistant" not in "".join(texts)
    assert texts[0] == "H" or texts[0] == "Hi"
    assert doc.text[: pairs.end[-1]] == doc.text  # aligned to the very end of the last message
