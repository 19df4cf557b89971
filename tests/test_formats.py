"""minimind.formats: record checks, packing, padded rows, chat loss masks, reasoning tag weights, DPO pairs.

The masks are checked against conversations written out by hand piece by piece, with the real MiniMind
tokenizer (its chat template is ChatML with a default system prompt).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from minimind.formats import (TAG_WEIGHT, Encoder, RecordError, chat_tokens, pack_documents, pad_documents,
                              parse_line, record_conversation, record_dpo, record_text)
from minimind.tokenizer import Tokenizer

SYSTEM = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"


@pytest.fixture(scope="module")
def tok(shared_data) -> Tokenizer:
    return Tokenizer.from_dir(shared_data / "minimind")


def expected(tok, pieces):
    """ids and per-token weights from (text, weight) pieces, each piece encoded on its own."""
    ids, weights = [], []
    for text, w in pieces:
        piece = tok.encode(text)
        ids += piece
        weights += [w] * len(piece)
    weights[0] = 0.0
    return ids, weights


# ------------------------------------------------------------------------------------------------ checks


@pytest.mark.parametrize("raw, message", [
    (b'{"text": "caf\xe9"}', "invalid UTF-8"),
    (b'{"text": "x"', "malformed JSON"),
    (b'[1, 2]', None),
])
def test_parse_line(raw, message):
    if message is None:
        assert parse_line(raw) == [1, 2]
    else:
        with pytest.raises(RecordError, match=message):
            parse_line(raw)


@pytest.mark.parametrize("record, message", [
    ({"txt": "a"}, "missing field 'text'"),
    ({"text": 3}, "field 'text' is int, not a string"),
    ({"text": "  \n"}, "field 'text' is empty"),
    ([{"text": "a"}], "expected a JSON object, got list"),
])
def test_record_text_rejects(record, message):
    with pytest.raises(RecordError, match=message):
        record_text(record)


def test_record_text_field_mapping():
    assert record_text({"body": "诗", "text": 1}, text_field="body") == "诗"


@pytest.mark.parametrize("turns, message", [
    ("hi", "not a list of turns"),
    ([], "empty conversation"),
    ([{"role": "user", "content": "a"}], "no assistant turn"),
    ([{"role": "assistant", "content": "a"}], "must start with a user turn"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "has role 'tool'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}], "content is int"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}], "empty assistant turn"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
      {"role": "assistant", "content": "b"}], "system turn after the first"),
    ([{"role": "user", "content": "a"}, "b"], r"conversations\[1\] is str"),
])
def test_record_conversation_rejects(turns, message):
    with pytest.raises(RecordError, match=message):
        record_conversation({"conversations": turns})


def test_record_dpo_needs_both_sides():
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert record_dpo({"chosen": good, "rejected": good}) == (good, good)
    with pytest.raises(RecordError, match="missing field 'rejected'"):
        record_dpo({"chosen": good})


# ------------------------------------------------------------------------------------------------ pretrain


def test_packing_loses_nothing_and_joins_documents_only_at_separators():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(3, 100, size=n)) for n in rng.integers(1, 40, size=50)]
    row_len, sep = 17, 0
    rows = pack_documents(docs, row_len, sep_id=sep, pad_id=0)
    ids, mask = rows.columns["input_ids"], rows.columns["loss_mask"]
    stream = [t for doc in docs for t in doc + [sep]]
    assert ids.shape == (-(-len(stream) // row_len), row_len) and ids.dtype == np.int32
    assert rows.lengths.sum() == len(stream) and (rows.lengths[:-1] == row_len).all()
    flat = ids.reshape(-1)
    assert flat[:len(stream)].tolist() == stream           # every token, in order, once
    assert (flat[len(stream):] == 0).all()                 # only the final row is padded
    # Splitting the stream at separators gives back the documents: they touch nowhere else.
    assert [list(d) for d in np.split(flat[:len(stream)], np.flatnonzero(flat[:len(stream)] == sep) + 1)[:-1]] \
        == [d + [sep] for d in docs]
    expected_mask = np.ones(len(flat), np.float32)
    expected_mask[len(stream):] = 0
    expected_mask = expected_mask.reshape(-1, row_len)
    expected_mask[:, 0] = 0                                # no context for a row's first token
    assert (mask == expected_mask).all()


def test_padded_rows_are_minimind_style():
    rows = pad_documents([[5, 6, 7], list(range(10, 30))], row_len=8, bos_id=1, eos_id=2, pad_id=0)
    assert rows.columns["input_ids"].tolist() == [[1, 5, 6, 7, 2, 0, 0, 0], [1, 10, 11, 12, 13, 14, 15, 2]]
    assert rows.columns["loss_mask"].tolist() == [[0, 1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1]]
    assert rows.lengths.tolist() == [5, 8] and rows.truncated == 1


def test_pretrain_encoder_rows(tok):
    enc = Encoder(tok, "pretrain", max_seq_len=8)
    texts = ["床前明月光", "疑是地上霜，举头望明月"]
    block = enc.encode_block("poems.jsonl", 1, [json.dumps({"text": t}).encode() for t in texts])
    stream = tok.encode(texts[0]) + [tok.pad_id] + tok.encode(texts[1]) + [tok.pad_id]
    assert block.records == 2 and block.rows.lengths.sum() == len(stream)
    assert block.rows.columns["input_ids"].reshape(-1)[:len(stream)].tolist() == stream


# ------------------------------------------------------------------------------------------------ chat


def test_chat_mask_single_turn(tok):
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hello! 我是 MiniMind。"}]
    ids, weights = chat_tokens(tok, messages)
    want_ids, want_w = expected(tok, [
        (SYSTEM + "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n", 0.0),
        ("Hello! 我是 MiniMind。<|im_end|>", 1.0),
        ("\n", 0.0)])
    assert ids.tolist() == want_ids and weights.tolist() == want_w
    assert tok.decode(ids[weights > 0].tolist()) == "Hello! 我是 MiniMind。<|im_end|>"


def test_chat_mask_multi_turn_with_system(tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": " 6\n"}]
    ids, weights = chat_tokens(tok, messages)
    want_ids, want_w = expected(tok, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("4<|im_end|>", 1.0),
        ("\n<|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n", 0.0),
        (" 6\n<|im_end|>", 1.0),
        ("\n", 0.0)])
    assert ids.tolist() == want_ids and weights.tolist() == want_w


def test_chat_mask_is_not_fooled_by_repeated_text(tok):
    # The reply repeats the user's words and the template's: only the assistant turn is trained.
    messages = [{"role": "user", "content": "assistant"}, {"role": "assistant", "content": "assistant"}]
    ids, weights = chat_tokens(tok, messages)
    assert tok.decode(ids[weights > 0].tolist()) == "assistant<|im_end|>"
    assert weights.sum() == len(tok.encode("assistant<|im_end|>"))


def test_reasoning_tags_weigh_ten_as_whole_strings(tok):
    answer = "<think>\n比较 a < b</think>\n<answer>\nanswer</answer>"
    messages = [{"role": "user", "content": "<think>?</think>"}, {"role": "assistant", "content": answer}]
    ids, weights = chat_tokens(tok, messages, tag_weight=TAG_WEIGHT)
    head = SYSTEM + "<|im_start|>user\n<think>?</think><|im_end|>\n<|im_start|>assistant\n"
    want_ids, want_w = expected(tok, [
        (head, 0.0),
        ("<think>", TAG_WEIGHT), ("\n比较 a < b", 1.0), ("</think>", TAG_WEIGHT), ("\n", 1.0),
        ("<answer>", TAG_WEIGHT), ("\nanswer", 1.0), ("</answer>", TAG_WEIGHT),
        ("<|im_end|>", 1.0), ("\n", 0.0)])
    assert ids.tolist() == want_ids
    assert weights.tolist() == want_w  # the '<' in 'a < b' and the word 'answer' weigh 1; user tags 0


def test_chat_rows_truncate_and_pad(tok):
    enc = Encoder(tok, "chat", max_seq_len=12)
    short = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    block = enc.encode_block("sft.jsonl", 7, [json.dumps(short).encode()])
    ids, mask = block.rows.columns["input_ids"], block.rows.columns["loss_mask"]
    full_ids, full_w = chat_tokens(tok, short["conversations"])
    assert ids.shape == (1, 13) and ids[0].tolist() == full_ids[:13].tolist()
    assert mask[0].tolist() == full_w[:13].tolist() and block.rows.truncated == 1
    enc = Encoder(tok, "chat", max_seq_len=len(full_ids) + 3)
    row = enc.encode_block("sft.jsonl", 7, [json.dumps(short).encode()]).rows
    assert row.columns["input_ids"][0].tolist() == full_ids.tolist() + [tok.pad_id] * 4
    assert row.columns["loss_mask"][0].tolist() == full_w.tolist() + [0.0] * 4
    assert row.lengths.tolist() == [len(full_ids)]


def test_dpo_rows_keep_the_pair_together(tok):
    q = {"role": "user", "content": "12*11?"}
    record = {"chosen": [q, {"role": "assistant", "content": "132"}],
              "rejected": [q, {"role": "assistant", "content": "134"}]}
    rows = Encoder(tok, "dpo", max_seq_len=64).encode_block("dpo.jsonl", 1, [json.dumps(record).encode()]).rows
    assert set(rows.columns) == {"chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"}
    for side, reply in (("chosen", "132"), ("rejected", "134")):
        ids, mask = rows.columns[f"{side}_ids"][0], rows.columns[f"{side}_mask"][0]
        assert ids.shape == (65,) and tok.decode(ids[mask > 0].tolist()) == reply + "<|im_end|>"


def test_encoder_rejects_bad_lines_with_their_line_numbers(tok):
    good = json.dumps({"conversations": [{"role": "user", "content": "q"},
                                         {"role": "assistant", "content": "a"}]}).encode()
    lines = [good, b"{oops", b"", json.dumps({"conversations": [{"role": "user", "content": "q"}]}).encode(),
             b'{"conversations": "\xff"}', good]
    block = Encoder(tok, "chat", max_seq_len=32).encode_block("sft.jsonl", 10, lines)
    assert block.records == 2 and block.blank == 1 and block.rows.num_rows == 2
    assert [(r.file, r.line) for r in block.rejects] == [("sft.jsonl", 11), ("sft.jsonl", 13), ("sft.jsonl", 14)]
    assert "malformed JSON" in block.rejects[0].error and "no assistant turn" in block.rejects[1].error
    assert "invalid UTF-8" in block.rejects[2].error


def test_encoder_checks_its_arguments(tok):
    with pytest.raises(ValueError, match="unknown data format 'sft'"):
        Encoder(tok, "sft", 16)
