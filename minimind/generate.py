"""Autoregressive generation with a preallocated KV cache, and the sampling rules it uses.

`stream_generate` yields token ids one by one (a streaming iterator); `generate` collects them.
`process_logits` / `sample_token` are shared with the serving engine, which batches many requests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.85   # <= 0 means greedy
    top_k: int = 0              # 0: off
    top_p: float = 0.85         # 1.0: off
    repetition_penalty: float = 1.0   # > 1 discourages any token already in prompt or output (CTRL-style)
    presence_penalty: float = 0.0     # OpenAI-style: subtracted once from tokens already generated
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None

    @classmethod
    def greedy(cls, max_new_tokens: int = 256, stop_ids: Iterable[int] = ()) -> "SamplingParams":
        return cls(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, stop_ids=tuple(stop_ids))

    def validate(self):
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")


def process_logits(logits: torch.Tensor, params: SamplingParams, prompt_ids: torch.Tensor,
                   output_ids: torch.Tensor) -> torch.Tensor:
    """Apply penalties, temperature, top-k and top-p to one row of logits (V,). Returns fp32 logits."""
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        seen = torch.cat([prompt_ids, output_ids]).unique()
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty,
                                   picked * params.repetition_penalty)
    if params.presence_penalty and output_ids.numel():
        logits[output_ids.unique()] -= params.presence_penalty
    if params.temperature <= 0:
        return logits
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
        drop = probs.cumsum(-1) - probs > params.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """Pick the next token from processed logits (V,)."""
    if params.temperature <= 0:
        return int(logits.argmax())
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(params: SamplingParams, device) -> torch.Generator | None:
    if params.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed)
    return g


@torch.inference_mode()
def stream_generate(model, prompt_ids: list[int], params: SamplingParams, use_cache: bool = True) -> Iterator[int]:
    """Yield generated token ids until a stop id (not yielded) or max_new_tokens.

    With use_cache=False every step recomputes the whole sequence: the reference the cache must match, and
    the baseline of the serving benchmark.
    """
    params.validate()
    if not prompt_ids:
        raise ValueError("prompt is empty")
    limit = model.config.max_position_embeddings
    if len(prompt_ids) >= limit:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in the {limit}-token context")
    device = model.lm_head.weight.device
    max_new = min(params.max_new_tokens, limit - len(prompt_ids))
    prompt = torch.tensor(prompt_ids, device=device)
    output = torch.empty(0, dtype=torch.long, device=device)
    generator = make_generator(params, device)
    stops = set(params.stop_ids)
    cache = model.new_cache(1, len(prompt_ids) + max_new) if use_cache else None
    step_input = prompt[None]
    for _ in range(max_new):
        logits = model(step_input, cache=cache, last_only=True).logits[0, -1]
        token = sample_token(process_logits(logits, params, prompt, output), params, generator)
        if token in stops:
            return
        yield token
        output = torch.cat([output, output.new_tensor([token])])
        step_input = output[-1:][None] if use_cache else torch.cat([prompt, output])[None]


def generate(model, prompt_ids: list[int], params: SamplingParams, use_cache: bool = True) -> list[int]:
    return list(stream_generate(model, prompt_ids, params, use_cache))


@dataclass
class TextStream:
    """Turns a stream of byte-level BPE ids into text pieces without splitting a UTF-8 character.

    Incremental: each token decodes a short window, not the whole output (which made a long output quadratic).
    The window starts at `start`, a token boundary before the last emitted piece; `end` marks where the emitted
    text stops. Bytes of a character cut by the window's start decode the same way in both decodes below, so
    their difference is exactly the new text.
    """
    tokenizer: object
    ids: list[int] = field(default_factory=list)
    start: int = 0   # first id of the decode window
    end: int = 0     # ids up to here are emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        done, text = self._window()
        if text.endswith("\ufffd") or len(text) <= len(done):  # an incomplete character: wait for its bytes
            return ""
        self.start, self.end = self.end, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        done, text = self._window()
        self.start = self.end = len(self.ids)
        return text[len(done):]

    def _window(self) -> tuple[str, str]:
        """(the window's emitted part, the whole window), decoded."""
        return (self.tokenizer.decode(self.ids[self.start:self.end]),
                self.tokenizer.decode(self.ids[self.start:]))
