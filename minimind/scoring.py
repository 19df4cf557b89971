"""Scoring documents with a causal LM: per-token log-probs in strided windows, the per-document sums an
evaluation adds up, DPO preference margins and the reasoning-format check. Plain torch (no Ray): the Ray Data
actors of `cluster.evaluate` and a single process run exactly this code.

Each document is scored on its own, never packed with another. Its token sequence is what the model was
trained on: pretrain `sep + text + sep` (packed training puts a separator before and after every document;
`pack=False` gives MiniMind's `bos + text + eos`); chat, reason and dpo the ChatML rendering with the loss
mask of `minimind.formats.chat_tokens` (assistant content and its closing end token). Reasoning's x10 tag
weights are a training device and are left out here, so every format's loss is plain nats per scored token.

A sequence longer than the window is scored in strided windows, the usual sliding-window perplexity (Hugging
Face's "Perplexity of fixed-length models"): window k feeds ids[k*s : k*s + W] (W = window, s = W // 2) and
scores only the targets no earlier window scored, so every token is predicted exactly once, with at least
s tokens of context after the first window.

Every window is its own batch-of-one forward at its exact length: the numbers then depend on the document
alone, not on which documents shared a batch (a padded batch changes the matmul shapes, and with them the
float rounding), so a run spread over Ray actors gives bit-identical sums to a run in one process.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .formats import REASONING_TAGS, RecordError, chat_tokens, record_conversation, record_dpo, record_text
from .generate import SamplingParams, generate
from .losses import dpo_loss, token_logprobs

FORMATS = ("pretrain", "chat", "reason", "dpo")


# ------------------------------------------------------------------------------------------------- windows


def windows(n: int, window: int) -> list[tuple[int, int, int]]:
    """The forward passes that score a sequence of `n` ids with inputs of at most `window` tokens.

    Each is (begin, end, first): feed ids[begin:end], whose logits predict ids[begin + 1:end + 1], and keep
    the targets at positions first..end. Together the windows score positions 1..n-1, each exactly once.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1 token, got {window}")
    last = n - 1                       # position of the last target
    stride = max(1, window // 2)
    out, begin, scored = [], 0, 0      # scored: every target up to this position is done
    while scored < last:
        end = min(begin + window, last)
        out.append((begin, end, scored + 1))
        scored = end
        begin += stride                # <= the previous end, so no target is skipped
    return out


@torch.inference_mode()
def target_logprobs(model, ids: Sequence[int], window: int) -> torch.Tensor:
    """(n - 1,) fp32 on the CPU: log p(ids[p] | up to `window` ids before it) for p = 1..n-1."""
    device = model.lm_head.weight.device
    seq = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    out = torch.empty(max(len(seq) - 1, 0), dtype=torch.float32)
    for begin, end, first in windows(len(seq), window):
        piece = seq[begin:end + 1].to(device)[None]                  # (1, end - begin + 1)
        logits = model(piece[:, :-1]).logits                        # (1, end - begin, V)
        lp = token_logprobs(logits, piece[:, 1:])[0]                 # log p of targets begin+1 .. end
        out[first - 1:end] = lp[first - 1 - begin:].float().cpu()
    return out


def masked_nats(logprobs: torch.Tensor, mask: np.ndarray) -> tuple[float, int]:
    """(nats, tokens) over the targets where `mask` (one entry per target) is true. math.fsum: the sum is
    exact-rounded, so it does not depend on how a runtime orders or splits it."""
    picked = logprobs[torch.from_numpy(np.asarray(mask, dtype=bool))]
    return -math.fsum(picked.double().tolist()), int(picked.numel())


# ------------------------------------------------------------------------------------------------ records


def parse_record(fmt: str, record: Any, text_field: str = "text"):
    """The usable part of one record: a document (pretrain), a conversation (chat, reason) or a (chosen,
    rejected) pair (dpo). Raises RecordError, like ingest, for a record that cannot be scored."""
    if fmt == "pretrain":
        return record_text(record, text_field)
    if fmt == "dpo":
        return record_dpo(record)
    if fmt in ("chat", "reason"):
        return record_conversation(record)
    raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")


def conversation_tokens(tokenizer, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, 0/1 weights) of a conversation, the weights on assistant content and its end token."""
    try:
        return chat_tokens(tokenizer, messages)
    except RecordError:
        raise
    except ValueError as e:  # the chat template refused the conversation (raise_exception)
        raise RecordError(str(e)) from None


def document_tokens(tokenizer, text: str, pack: bool = True) -> np.ndarray:
    """A pretrain document as trained on: special-token strings in it become special tokens (see formats)."""
    start, end = ("<|endoftext|>",) * 2 if pack else (tokenizer.bos_token, tokenizer.eos_token)
    ids = [tokenizer.token_to_id(start), *tokenizer.encode(text), tokenizer.token_to_id(end)]
    return np.asarray(ids, dtype=np.int64)


# ------------------------------------------------------------------------------------------------- scorer


@dataclass
class Scorer:
    """Scores records of one format with a model (and, for dpo, a reference). All fields are plain objects,
    so one Scorer lives in each Ray actor, or in the driver.

    Each result is a dict of numbers: tokens, nats, chars (the characters the scored targets cover, summed from
    `Tokenizer.token_char_counts`, as training's validation counts them); chat and reason add all_tokens and
    all_nats (every target of the conversation); dpo scores the chosen replies as the document and adds the
    rejected replies' sums, the four length-averaged sequence log-probs, margin, dpo_loss and correct.
    """
    model: Any
    tokenizer: Any
    fmt: str
    window: int
    reference: Any = None
    beta: float = 0.1
    pack: bool = True
    text_field: str = "text"

    def __post_init__(self):
        self.char_counts = self.tokenizer.token_char_counts()

    def _sums(self, ids: np.ndarray, mask: np.ndarray, model=None) -> tuple[torch.Tensor, float, int, int]:
        lp = target_logprobs(model or self.model, ids, self.window)
        nats, tokens = masked_nats(lp, mask)
        chars = int(self.char_counts[ids[1:]][mask].sum())
        return lp, nats, tokens, chars

    def score(self, record: Any) -> dict:
        item = parse_record(self.fmt, record, self.text_field)
        if self.fmt == "pretrain":
            ids = document_tokens(self.tokenizer, item, self.pack)
            _, nats, tokens, chars = self._sums(ids, np.ones(len(ids) - 1, dtype=bool))
            return {"tokens": tokens, "nats": nats, "chars": chars}
        if self.fmt in ("chat", "reason"):
            ids, weights = conversation_tokens(self.tokenizer, item)
            lp, nats, tokens, chars = self._sums(ids, weights[1:] > 0)
            all_nats, all_tokens = masked_nats(lp, np.ones(len(lp), dtype=bool))
            return {"tokens": tokens, "nats": nats, "chars": chars, "all_tokens": all_tokens, "all_nats": all_nats}
        return self._score_pair(*item)

    def _score_pair(self, chosen: list[dict], rejected: list[dict]) -> dict:
        out, logps = {}, {}
        for name, messages in (("chosen", chosen), ("rejected", rejected)):
            ids, weights = conversation_tokens(self.tokenizer, messages)
            mask = weights[1:] > 0
            _, nats, tokens, chars = self._sums(ids, mask)
            # MiniMind's DPO sequence log-prob (losses.sequence_logprob): the mean over the masked targets.
            logps[f"policy_{name}"] = -nats / max(tokens, 1)
            if self.reference is not None:
                _, ref_nats, _, _ = self._sums(ids, mask, self.reference)
                logps[f"ref_{name}"] = -ref_nats / max(tokens, 1)
            else:  # no reference: the margin compares the policy's own log-probs (a reference-free preference)
                logps[f"ref_{name}"] = 0.0
            prefix = "" if name == "chosen" else "rejected_"
            out.update({f"{prefix}tokens": tokens, f"{prefix}nats": nats, f"{prefix}chars": chars})
        t = {k: torch.tensor([v], dtype=torch.float64) for k, v in logps.items()}
        loss, metrics = dpo_loss(t["policy_chosen"], t["policy_rejected"], t["ref_chosen"], t["ref_rejected"],
                                 beta=self.beta, reduction="sum")
        margin = float(metrics["reward_margin"])
        return {**out, **logps, "margin": margin, "dpo_loss": float(loss), "correct": int(margin > 0)}


# ------------------------------------------------------------------------------------------------ generate


_WELL_FORMED = re.compile(r"\s*<think>(.*)</think>\s*<answer>(.*)</answer>\s*", re.DOTALL)


def well_formed(text: str) -> bool:
    """`<think>...</think>` then `<answer>...</answer>` and nothing else outside them but whitespace; no tag
    may appear again inside either part (an answer that reopens `<think>` is not the format)."""
    match = _WELL_FORMED.fullmatch(text)
    return bool(match) and not any(tag in part for part in match.groups() for tag in REASONING_TAGS)


def prompt_messages(record: Any) -> list[dict]:
    """The prompt of a generation: `{"prompt": "..."}` as one user turn, or a chat record's turns before its
    last assistant turn. Raises RecordError."""
    if isinstance(record, dict) and "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise RecordError("field 'prompt' must be a non-empty string")
        return [{"role": "user", "content": prompt}]
    turns = record_conversation(record)
    last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
    return turns[:last]


def greedy_reply(model, tokenizer, messages: list[dict], max_new_tokens: int) -> dict:
    """Greedy KV-cached generation of the assistant's reply to `messages`: prompt and reply text, whether it
    ended with the end token (else it ran out of tokens), and whether it is well formed."""
    ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
    if len(ids) >= model.config.max_position_embeddings:
        raise RecordError(f"prompt of {len(ids)} tokens leaves no room in the model's "
                          f"{model.config.max_position_embeddings}-token context")
    room = min(max_new_tokens, model.config.max_position_embeddings - len(ids))
    out = generate(model, ids, SamplingParams.greedy(max_new_tokens, stop_ids=[tokenizer.eos_id]))
    text = tokenizer.decode(out)
    return {"prompt": messages[-1]["content"], "output": text, "new_tokens": len(out),
            "finished": int(len(out) < room), "well_formed": int(well_formed(text))}
