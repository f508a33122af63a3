"""Corpus readers: .txt, .jsonl (text or chat), builtin:smoke, mixes, and bad input."""

from __future__ import annotations

import json

import pytest

from xdiff_cli.data.corpus import MESSAGE_SEPARATOR, check_corpus, iter_documents, render_chat
from xdiff_cli.errors import XdiffError


def test_txt_is_one_document_per_nonempty_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first doc\n\nsecond doc\n", encoding="utf-8")
    docs = list(iter_documents(str(path)))
    assert [(d.doc_id, d.text, d.messages) for d in docs] == [(0, "first doc", None), (1, "second doc", None)]


def test_jsonl_reads_text_and_chat_messages(tmp_path):
    path = tmp_path / "c.jsonl"
    chat = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    sharegpt = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    path.write_text(
        "\n".join(json.dumps(r) for r in ({"text": "plain"}, {"messages": chat}, {"conversations": sharegpt})),
        encoding="utf-8",
    )
    docs = list(iter_documents(str(path)))
    assert docs[0].text == "plain" and not docs[0].is_chat
    assert docs[1].text == "Hi?" + MESSAGE_SEPARATOR + "Hello." and docs[1].messages == chat
    assert docs[2].messages == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_builtin_smoke_mixes_web_text_and_chats():
    docs = list(iter_documents("builtin:smoke"))
    assert len(docs) == 1000
    assert sum(d.is_chat for d in docs) == 200


def test_comma_separated_sources_interleave_round_robin(tmp_path):
    web, chat = tmp_path / "web.txt", tmp_path / "chat.jsonl"
    web.write_text("w0\nw1\nw2\n", encoding="utf-8")
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "c0"}]}) + "\n", encoding="utf-8")
    docs = list(iter_documents(f"{web},{chat}"))
    assert [d.text for d in docs] == ["w0", "c0", "w1", "w2"]
    assert [d.doc_id for d in docs] == [0, 1, 2, 3]
    # resuming skips documents but keeps their ids
    assert [(d.doc_id, d.text) for d in iter_documents(f"{web},{chat}", start=2)] == [(2, "w1"), (3, "w2")]


@pytest.mark.parametrize(
    "spec,content,message",
    [
        ("missing.txt", None, "not found"),
        ("c.csv", "a,b", "unsupported corpus file type"),
        ("c.jsonl", '{"title": "no text"}', "neither a 'text'"),
        ("c.jsonl", "{not json", "not valid JSON"),
        ("builtin:nope", None, "unknown built-in corpus"),
    ],
)
def test_bad_corpus_is_a_one_line_user_error(tmp_path, spec, content, message):
    if content is not None:
        (tmp_path / spec).write_text(content + "\n", encoding="utf-8")
    with pytest.raises(XdiffError, match=message):
        list(iter_documents(str(tmp_path / spec) if not spec.startswith("builtin:") else spec))


def test_check_corpus_fails_fast_on_missing_file(tmp_path):
    with pytest.raises(XdiffError, match="not found"):
        check_corpus(f"builtin:smoke,{tmp_path / 'gone.jsonl'}")
    check_corpus("builtin:smoke")


def test_chat_rendering_locates_each_message_in_the_models_template(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_models["qwen3"]))
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    rendered = render_chat(tok, messages)
    assert rendered.string.startswith("<|im_start|>user\n")
    canonical = "Hi there" + MESSAGE_SEPARATOR + "Hello!"
    for span, message in zip(rendered.content_spans, messages, strict=True):
        assert rendered.string[span.r_start : span.r_end] == message["content"]
        assert canonical[span.c_start : span.c_start + len(message["content"])] == message["content"]
