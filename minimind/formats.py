"""MiniMind's jsonl records turned into fixed-length training rows: validation, packing, chat masks.

Plain Python and numpy (no torch, no Ray), so the Ray Data tasks, the tests and a single-process run all use
the same code. Every row holds `row_len = max_seq_len + 1` tokens: the loop feeds `ids[:-1]`, predicts
`ids[1:]` and weights each prediction by `loss_mask[1:]`. So `loss_mask[i]` is the weight of predicting
token i from the tokens before it: 0 at position 0 and on padding, 1 on trained tokens, `TAG_WEIGHT` on
reasoning tags.

Formats (the record layouts are MiniMind's, unchanged):
  pretrain  {"text": "..."}: documents packed end to end, each followed by a separator token, cut into rows
            (no padding except a block's last row); or, unpacked, MiniMind's `bos + text + eos` padded rows.
            Special-token strings in the text DO become special tokens: MiniMind's pretrain_hq corpus writes
            `<|im_start|>...<|im_end|>` as document structure, and pretraining on it means exactly that.
  chat      {"conversations": [{"role", "content"}, ...]}: the tokenizer's chat template (ChatML), trained
            on the assistant turns only (their content and the <|im_end|> that closes them). Turns alternate
            user/assistant after an optional first system turn. Contents are encoded as plain text
            (`Tokenizer.encode_chat`), so special-token strings inside a turn never become special tokens.
  reason    chat rows whose <think>, </think>, <answer>, </answer> tags weigh TAG_WEIGHT. The tags are found
            as whole strings in the assistant text; MiniMind instead up-weights every occurrence of the
            tags' sub-tokens ("<", "th", "ink", ...) anywhere in the answer, which also hits ordinary text.
  dpo       {"chosen": [...], "rejected": [...]}: two chat rows per record, kept side by side.

A bad record raises `RecordError` (a ValueError) saying what is wrong; the caller adds file and line.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

FORMATS = ("pretrain", "chat", "reason", "dpo")
ROLES = ("system", "user", "assistant")
REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
TAG_WEIGHT = 10.0


class RecordError(ValueError):
    """One input record cannot be used. Ingest skips it and writes it to the rejects file."""


# ------------------------------------------------------------------------------------------- parsing, checks


def parse_line(raw: bytes) -> Any:
    """A jsonl line (bytes, without the newline) as a JSON value."""
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark at the start of a file is not an error
    except UnicodeDecodeError as e:
        raise RecordError(f"invalid UTF-8 at byte {e.start}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"malformed JSON: {e}") from None


def _field(record: Any, name: str, kind: type, what: str) -> Any:
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    if name not in record:
        raise RecordError(f"missing field {name!r} (fields: {sorted(record)[:8]})")
    value = record[name]
    if not isinstance(value, kind):
        raise RecordError(f"field {name!r} is {type(value).__name__}, not {what}")
    return value


def record_text(record: Any, text_field: str = "text") -> str:
    """The document of a pretrain record."""
    text = _field(record, text_field, str, "a string")
    if not text.strip():
        raise RecordError(f"field {text_field!r} is empty")
    return text


def record_conversation(record: Any, name: str = "conversations") -> list[dict]:
    """A conversation: an optional leading system turn, then user/assistant turns, at least one assistant."""
    turns = _field(record, name, list, "a list of turns")
    if not turns:
        raise RecordError(f"field {name!r} is an empty conversation")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"{name}[{i}] is {type(turn).__name__}, not a {{role, content}} object")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise RecordError(f"{name}[{i}] has role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise RecordError(f"{name}[{i}] content is {type(content).__name__}, not a string")
        if role == "system" and i > 0:
            raise RecordError(f"{name}[{i}] is a system turn after the first turn")
        if role == "assistant" and not content:
            raise RecordError(f"{name}[{i}] is an empty assistant turn")
        if i > 0 and role == turns[i - 1].get("role"):
            # ChatML would render two turns of one speaker back to back (and MiniMind's template an assistant
            # header before each user turn): the model would learn from a conversation that cannot happen.
            raise RecordError(f"{name}[{i}] is a second {role} turn in a row; user and assistant turns must "
                              f"alternate")
    first = 1 if turns[0]["role"] == "system" else 0
    if first == len(turns) or turns[first]["role"] != "user":
        raise RecordError(f"{name!r} must start with a user turn (after an optional system turn)")
    if not any(t["role"] == "assistant" for t in turns):
        raise RecordError(f"{name!r} has no assistant turn to train on")
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def record_dpo(record: Any) -> tuple[list[dict], list[dict]]:
    return record_conversation(record, "chosen"), record_conversation(record, "rejected")


# ------------------------------------------------------------------------------------------------- pretrain


@dataclass
class Rows:
    """Fixed-length rows of one block of records: columns of shape (n, row_len), plus bookkeeping."""
    columns: dict[str, np.ndarray]
    lengths: np.ndarray              # (n,) real (non-pad) tokens per row
    truncated: int = 0               # records cut at max_seq_len

    @property
    def num_rows(self) -> int:
        return len(self.lengths)


def pack_documents(docs: Sequence[Sequence[int]], row_len: int, sep_id: int, pad_id: int) -> Rows:
    """Concatenate `doc + [sep]` for every document and cut the stream into rows of `row_len`.

    No token is lost and documents meet only at separators; a document longer than a row simply continues
    in the next one. Only the last row is padded. Its first token has no context, so it is not trained.
    """
    flat: list[int] = []
    for doc in docs:  # list.extend runs at C speed; a per-token generator costs ~10% of tokenising
        flat.extend(doc)
        flat.append(sep_id)
    stream = np.asarray(flat, dtype=np.int32)
    n_rows = -(-len(stream) // row_len)
    ids = np.full(n_rows * row_len, pad_id, dtype=np.int32)
    ids[:len(stream)] = stream
    mask = np.zeros(n_rows * row_len, dtype=np.float32)
    mask[:len(stream)] = 1.0
    mask = mask.reshape(n_rows, row_len)
    mask[:, 0] = 0.0
    lengths = np.full(n_rows, row_len, dtype=np.int32)
    if n_rows:
        lengths[-1] = len(stream) - (n_rows - 1) * row_len
    return Rows({"input_ids": ids.reshape(n_rows, row_len), "loss_mask": mask}, lengths)


def pad_documents(docs: Sequence[Sequence[int]], row_len: int, bos_id: int, eos_id: int, pad_id: int) -> Rows:
    """MiniMind's rows: `bos + text + eos`, the text truncated to fit, padded to `row_len`.

    MiniMind2-era pretraining text already carries the markers (`<|im_start|>...<|im_end|>`, which are bos and
    eos): a document that starts with bos or ends with eos does not get a second one."""
    ids = np.full((len(docs), row_len), pad_id, dtype=np.int32)
    mask = np.zeros((len(docs), row_len), dtype=np.float32)
    lengths = np.zeros(len(docs), dtype=np.int32)
    truncated = 0
    for i, doc in enumerate(docs):
        body = list(doc)
        if body[:1] == [bos_id]:
            body = body[1:]
        if body[-1:] == [eos_id]:
            body = body[:-1]
        truncated += len(body) > row_len - 2
        row = [bos_id, *body[:row_len - 2], eos_id]
        ids[i, :len(row)] = row
        mask[i, 1:len(row)] = 1.0
        lengths[i] = len(row)
    return Rows({"input_ids": ids, "loss_mask": mask}, lengths, truncated)


# ----------------------------------------------------------------------------------------------------- chat


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant turn's content + end token.

    Each span is located by rendering the conversation up to that turn (with the generation prompt) and
    checking that the full text continues with `content + eos`: exact, and independent of what the content
    happens to contain (searching for the content could match the template's own text or an earlier turn).
    """
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    eos = tokenizer.eos_token
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        piece = turn["content"] + eos
        if not (text.startswith(prefix) and text.startswith(piece, len(prefix))):
            raise RecordError(f"the chat template does not render assistant turn {i} as its content followed "
                              f"by {eos!r}; cannot place the loss mask")
        spans.append((len(prefix), len(prefix) + len(piece)))
    return text, spans


def tag_spans(text: str, spans: list[tuple[int, int]], tags: Sequence[str] = REASONING_TAGS
              ) -> list[tuple[int, int]]:
    """Character spans of every whole occurrence of `tags` inside the given spans."""
    found = []
    for start, end in spans:
        for tag in tags:
            at = text.find(tag, start, end)
            while at >= 0:
                found.append((at, at + len(tag)))
                at = text.find(tag, at + len(tag), end)
    return found


def _weights_from_spans(offsets: np.ndarray, spans, weight: float, out: np.ndarray) -> None:
    # A token is in a span when its characters overlap it. Byte-level BPE can merge a tag's "<" with a
    # neighbouring space or punctuation, or split one character over two tokens; both cases count as inside.
    for start, end in spans:
        out[(offsets[:, 0] < end) & (offsets[:, 1] > start)] = weight


def chat_tokens(tokenizer, messages: list[dict], tag_weight: float | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the rendered conversation and each token's loss weight.

    Weight 1 on assistant content and its closing end token, 0 elsewhere (system, user, role headers);
    with `tag_weight`, the reasoning tags inside assistant turns get that weight instead.
    """
    text, spans = assistant_spans(tokenizer, messages)
    # Contents are plain text: a "<|im_end|>\n<|im_start|>system" typed into a turn stays characters.
    encoded_text, token_ids, token_offsets = tokenizer.encode_chat_offsets(messages, add_generation_prompt=False)
    assert encoded_text == text, "encode_chat_offsets and apply_chat_template rendered different text"
    ids = np.asarray(token_ids, dtype=np.int32)
    offsets = np.asarray(token_offsets, dtype=np.int64).reshape(-1, 2)
    weights = np.zeros(len(ids), dtype=np.float32)
    _weights_from_spans(offsets, spans, 1.0, weights)
    if tag_weight is not None:
        _weights_from_spans(offsets, tag_spans(text, spans), tag_weight, weights)
    weights[:1] = 0.0  # the first token is never predicted
    return ids, weights


def fit_row(ids: np.ndarray, weights: np.ndarray, row_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Truncate or pad one sequence to `row_len` (MiniMind truncates SFT rows at max_seq_len too)."""
    row = np.full(row_len, pad_id, dtype=np.int32)
    mask = np.zeros(row_len, dtype=np.float32)
    n = min(len(ids), row_len)
    row[:n], mask[:n] = ids[:n], weights[:n]
    return row, mask


# ------------------------------------------------------------------------------------------------- encoder


@dataclass
class Reject:
    file: str
    line: int
    error: str
    text: str  # the start of the offending line, for the rejects file

    def to_json(self) -> str:
        return json.dumps({"file": self.file, "line": self.line, "error": self.error, "text": self.text},
                          ensure_ascii=False)


@dataclass
class Block:
    """What one block of input lines became."""
    rows: Rows
    records: int = 0                 # lines that became training data
    blank: int = 0                   # empty lines, skipped
    held_out: int = 0                # lines of the other split (train/val), skipped unread
    rejects: list[Reject] = field(default_factory=list)


SPLITS = ("all", "train", "val")


def in_val_split(raw: bytes, val_fraction: float) -> bool:
    """Whether a jsonl line belongs to the held-out validation split: a hash of its bytes (whitespace at the
    ends stripped) read as a number in [0, 1) is below `val_fraction`. Decided by the line alone, so the same
    record (and every exact duplicate of it) always falls on the same side, whatever the seed, order or files."""
    digest = hashlib.blake2b(raw.strip(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


def columns_of(fmt: str) -> tuple[str, ...]:
    return ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask") if fmt == "dpo" else \
        ("input_ids", "loss_mask")


class Encoder:
    """Turns blocks of raw jsonl lines into rows for one format. Picklable (it holds a picklable tokenizer)."""

    def __init__(self, tokenizer, fmt: str, max_seq_len: int, pack: bool = True, text_field: str = "text",
                 separator: str = "<|endoftext|>", tag_weight: float = TAG_WEIGHT, split: str = "all",
                 val_fraction: float = 0.0):
        if fmt not in FORMATS:
            raise ValueError(f"unknown data format {fmt!r}; choose one of {FORMATS}")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        self.split, self.val_fraction = split, val_fraction
        self.tokenizer, self.format, self.pack, self.text_field = tokenizer, fmt, pack, text_field
        self.row_len = max_seq_len + 1
        self.sep_id = tokenizer.token_to_id(separator)
        self.tag_weight = tag_weight if fmt == "reason" else None

    def encode_block(self, file: str, first_line: int, raws: Sequence[bytes]) -> Block:
        """Encode consecutive lines `raws` of `file`, the first being line `first_line` (1-based).
        Bad lines become rejects; blank lines are counted and skipped. With a train or val split, the lines of
        the other split are dropped before anything else (so no packed row mixes the two)."""
        block = Block(Rows({}, np.zeros(0, np.int32)))
        items = []
        for line, raw in enumerate(raws, first_line):
            if not raw.strip():
                block.blank += 1
                continue
            if self.split != "all" and in_val_split(raw, self.val_fraction) != (self.split == "val"):
                block.held_out += 1
                continue
            try:
                items.append(self._validate(parse_line(raw)))
            except RecordError as e:
                block.rejects.append(Reject(file, line, str(e), raw[:200].decode("utf-8", "replace")))
        block.records = len(items)
        block.rows = self._rows(items)
        return block

    def _validate(self, record):
        # Everything that can fail on one record happens here, so a bad record never spoils its block.
        if self.format == "pretrain":
            return record_text(record, self.text_field)  # encoded later, a block at a time
        conversations = record_dpo(record) if self.format == "dpo" else [record_conversation(record)]
        try:
            return [chat_tokens(self.tokenizer, c, self.tag_weight) for c in conversations]
        except RecordError:
            raise
        except ValueError as e:  # the chat template's raise_exception(): it refuses this conversation
            raise RecordError(str(e)) from None

    def _rows(self, items: list) -> Rows:
        tok, L = self.tokenizer, self.row_len
        if self.format == "pretrain":
            docs = [tok.encode(text) for text in items]  # measured: faster than encode_batch on one thread
            if self.pack:
                return pack_documents(docs, L, self.sep_id, tok.pad_id)
            return pad_documents(docs, L, tok.bos_id, tok.eos_id, tok.pad_id)
        sequences = [seq for item in items for seq in item]  # dpo: chosen, rejected, chosen, ...
        ids = np.full((len(sequences), L), tok.pad_id, dtype=np.int32)
        masks = np.zeros((len(sequences), L), dtype=np.float32)
        lengths = np.zeros(len(sequences), dtype=np.int32)
        truncated = 0
        for i, (seq, weights) in enumerate(sequences):
            ids[i], masks[i] = fit_row(seq, weights, L, tok.pad_id)
            lengths[i] = min(len(seq), L)
            truncated += len(seq) > L
        if self.format != "dpo":
            return Rows({"input_ids": ids, "loss_mask": masks}, lengths, truncated)
        # One training row holds both sequences of a pair, so a batch never separates them.
        return Rows({"chosen_ids": ids[0::2], "chosen_mask": masks[0::2],
                     "rejected_ids": ids[1::2], "rejected_mask": masks[1::2]},
                    lengths[0::2] + lengths[1::2], truncated)
