"""SFT data: formats, one BOS, trained end token, padding, response-only labels, packing."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from gemmakit.errors import GemmakitError
from gemmakit.training import data as d

ROW = {"text": "### Human: What is 2+2?### Assistant: 2 + 2 = 4."}


@pytest.fixture(scope="module")
def tok(bundled):
    return bundled.tokenizer


def test_shipped_dataset_is_guanaco_rows():
    rows = d.read_rows(d.shipped_dataset())
    assert len(rows) >= 300
    for i, row in enumerate(rows):
        turns = d.parse_guanaco(row["text"])
        assert turns and turns[0][0] == "user" and turns[-1][0] == "assistant", i
        assert all(content for _, content in turns)
    assert len({r["text"] for r in rows}) == len(rows)


def test_guanaco_turns_and_segments():
    text = "### Human: Hi### Assistant: Hello.### Human: Capital of France?### Assistant: Paris."
    assert d.parse_guanaco(text) == [("user", "Hi"), ("assistant", "Hello."), ("user", "Capital of France?"),
                                     ("assistant", "Paris.")]  # fmt: skip
    segs = d.format_row({"text": text})
    assert "".join(s for s, _ in segs) == text  # the guanaco text, unchanged
    assert [s for s, r in segs if r] == [" Hello.", " Paris."]
    chat = d.format_row({"text": text}, chat_template=True)
    assert "".join(s for s, _ in chat) == (
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>"
        "\n<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\nParis.<end_of_turn>"
    )
    assert [s for s, r in chat if r] == ["Hello.<end_of_turn>", "Paris.<end_of_turn>"]


def test_the_three_row_shapes_agree(tok):
    rows = [
        ROW,
        {"prompt": "What is 2+2?", "completion": "2 + 2 = 4."},
        {
            "messages": [
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "2 + 2 = 4."},
            ]
        },
    ]
    for chat in (False, True):
        ex, dropped = d.build_examples(rows, tok, 128, chat_template=chat)
        assert dropped == 0 and ex[0].input_ids == ex[1].input_ids == ex[2].input_ids


def test_one_bos_end_token_trained_and_response_only_labels(tok):
    (ex,), _ = d.build_examples([{"text": "<bos>" + ROW["text"]}], tok, 128, responses_only=True)
    assert ex.input_ids[0] == tok.bos_id and ex.input_ids.count(tok.bos_id) == 1
    assert ex.input_ids[-1] == tok.eos_id and ex.labels[-1] == tok.eos_id
    trained = [t for t in ex.labels if t != d.IGNORE]
    assert tok.decode(trained, skip_special=False) == " 2 + 2 = 4.<eos>"
    # The prompt's tokens are exactly what generation sees after "### Assistant:".
    prompt = tok.encode(d.prompt_text("What is 2+2?"))
    assert ex.input_ids[: len(prompt)] == prompt
    (chat,), _ = d.build_examples([ROW], tok, 128, chat_template=True, responses_only=True)
    assert chat.input_ids[-1] == tok.end_of_turn_id and chat.labels[-1] == tok.end_of_turn_id
    assert chat.input_ids.count(tok.bos_id) == 1 and tok.eos_id not in chat.input_ids
    assert (
        tok.decode([t for t in chat.labels if t != d.IGNORE], skip_special=False) == "2 + 2 = 4.<end_of_turn>"
    )
    assert (
        chat.input_ids
        == tok.encode(
            tok.apply_chat_template(
                [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2 + 2 = 4."}],
                add_generation_prompt=False,
            )
        )[:-1]
    )  # fmt: skip  (the template's trailing "\n" is not trained)


def test_truncation_and_dropping(tok):
    (full,), _ = d.build_examples([ROW], tok, 512)
    (cut,), _ = d.build_examples([ROW], tok, 6)
    assert cut.input_ids == full.input_ids[:6] and tok.eos_id not in cut.input_ids  # a cut row did not end
    ex, dropped = d.build_examples([ROW], tok, 6, responses_only=True)  # only prompt tokens left
    assert ex == [] and dropped == 1


def test_collate_pads_right_with_pad_never_eos(tok):
    ex, _ = d.build_examples([ROW, {"prompt": "Hi", "completion": "Hello."}], tok, 128)
    b = d.collate(ex, tok.pad_id)
    n0, n1 = len(ex[0]), len(ex[1])
    assert tok.pad_id == 0 and n1 < n0
    assert b["input_ids"][1, n1:].eq(0).all() and b["labels"][1, n1:].eq(d.IGNORE).all()
    assert b["attention_mask"][1].tolist() == [True] * n1 + [False] * (n0 - n1)
    assert b["input_ids"][1, n1 - 1] == tok.eos_id and b["labels"][1, n1 - 1] == tok.eos_id
    assert d.target_count(b["labels"]) == (n0 - 1) + (n1 - 1)


def test_split_is_deterministic_and_disjoint():
    rows = [{"text": str(i)} for i in range(100)]
    a_train, a_eval = d.split_rows(rows, 0.1, seed=3)
    b_train, b_eval = d.split_rows(rows, 0.1, seed=3)
    assert a_eval == b_eval and len(a_eval) == 10 and len(a_train) == 90
    assert not {r["text"] for r in a_train} & {r["text"] for r in a_eval}
    assert d.split_rows(rows, 0.1, seed=4)[1] != a_eval


def test_packing_keeps_every_token_and_never_trains_bos(tok):
    rows = d.read_rows(d.shipped_dataset())[:40]
    ex, _ = d.build_examples(rows, tok, 64)
    packed = d.pack(ex, 64)
    assert len(packed) < len(ex) and all(len(p) <= 64 for p in packed)
    assert sorted(t for p in packed for t in p.input_ids) == sorted(t for e in ex for t in e.input_ids)
    for p in packed:
        for i, t in enumerate(p.input_ids):
            if t == tok.bos_id:
                assert p.labels[i] == d.IGNORE


def test_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(GemmakitError, match=r"bad.jsonl:2"):
        d.read_rows(bad)
    with pytest.raises(GemmakitError, match="needs 'text'"):
        d.format_row({"question": "x"}, index=3)
    with pytest.raises(GemmakitError, match="chat template"):
        d.format_row({"text": "plain text"}, chat_template=True)
    with pytest.raises(GemmakitError, match="no such file"):
        d.read_rows(tmp_path / "missing.jsonl")


def test_hub_names_go_through_datasets(monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        if name == "offline/nope":
            raise ConnectionError("Couldn't reach the Hub")
        return [{"text": "### Human: a### Assistant: b"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert d.read_rows("timdettmers/openassistant-guanaco") == [{"text": "### Human: a### Assistant: b"}]
    d.read_rows("timdettmers/openassistant-guanaco:test")
    assert calls == [
        ("timdettmers/openassistant-guanaco", "train"),
        ("timdettmers/openassistant-guanaco", "test"),
    ]
    with pytest.raises(GemmakitError, match="Offline"):
        d.read_rows("offline/nope")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(GemmakitError, match="pip install datasets"):
        d.read_rows("timdettmers/openassistant-guanaco")


def test_json_list_files(tmp_path):
    f = tmp_path / "rows.json"
    f.write_text(json.dumps([ROW, ROW]))
    assert d.read_rows(f) == [ROW, ROW]
    assert isinstance(d.collate(d.build_examples([ROW], types.SimpleNamespace(
        bos_id=2, eos_id=1, encode=lambda t, add_bos: [5] * len(t)), 64)[0])["input_ids"], torch.Tensor)  # fmt: skip
