"""Autoregressive generation with a preallocated KV cache, and the sampling rules it uses.

`stream_generate` yields token ids one by one (a streaming iterator); `generate` collects them.
`process_rows` / `sample_rows` are the sampling rules for a batch of rows, each with its own parameters; the
serving engine calls them once per step for all its requests, `generate` with a batch of one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch


NUCLEUS_HEAD = 64  # tokens ranked by topk before a row falls back to a full sort (see process_rows)


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


def process_rows(logits: torch.Tensor, params: Sequence[SamplingParams], seen: torch.Tensor | None = None,
                 generated: torch.Tensor | None = None) -> torch.Tensor:
    """Penalties, temperature, top-k and top-p for a batch of rows at once. Returns fp32 logits (B, V), -inf
    where a row may not sample.

    logits: (B, V); params: one per row; seen: (B, V) bool, the tokens of each row's prompt and output (for
    repetition_penalty); generated: (B, V) bool, its output only (for presence_penalty). One sort serves
    top-k and top-p of every row; a row whose setting is off is left as it is, bit for bit.
    """
    logits = logits.float()
    B, V = logits.shape
    dev = logits.device
    rep = torch.tensor([p.repetition_penalty for p in params], device=dev)[:, None]     # (B, 1)
    if seen is not None and bool((rep != 1.0).any()):
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen & (rep != 1.0), penalised, logits)
    presence = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]  # (B, 1)
    if generated is not None and bool(presence.any()):
        logits = logits - generated * presence
    temperature = torch.tensor([p.temperature for p in params], device=dev)[:, None]   # (B, 1)
    sampled = temperature > 0
    if not bool(sampled.any()):
        return logits
    logits = torch.where(sampled, logits / torch.where(sampled, temperature, 1.0), logits)
    top_k = torch.tensor([p.top_k if 0 < p.top_k < V else 0 for p in params], device=dev)[:, None]
    top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
    cut_k, cut_p = sampled & (top_k > 0), sampled & (top_p < 1.0)
    if not bool((cut_k | cut_p).any()):
        return logits
    # The kept tokens are a short head of each row: rank the top NUCLEUS_HEAD (or top-k) tokens with topk,
    # a fraction of a full sort's cost, and sort whole rows only when their nucleus reaches past that head.
    head = min(V, max(NUCLEUS_HEAD, int(top_k.max())))
    ranked, order = logits.topk(head, dim=-1)                                            # (B, head) descending
    kth = ranked.gather(1, (top_k - 1).clamp(min=0))                                     # (B, 1)
    keep_k = ~cut_k | (logits >= kth)      # ties with the k-th value stay, as with a per-row threshold
    allowed = logits.masked_fill(~keep_k, float("-inf"))
    ranked = ranked.masked_fill(cut_k & (ranked < kth), float("-inf"))
    probs = (ranked - allowed.logsumexp(-1, keepdim=True)).exp()                           # (B, head)
    before = probs.cumsum(-1) - probs      # probability of the tokens ranked above each one
    # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
    drop = cut_p & (before > top_p)
    keep = keep_k & ~cut_p
    keep |= torch.zeros_like(keep).scatter(1, order, ~drop & (ranked > float("-inf"))) & cut_p
    # A row whose head ends inside its nucleus (every head token kept, top-p on) needs its whole ranking.
    spill = (cut_p & ~drop[:, -1:] & (head < V))[:, 0]
    if bool(spill.any()):
        rows = spill.nonzero()[:, 0]
        full, full_order = allowed[rows].sort(-1, descending=True)
        p_full = full.softmax(-1)
        full_drop = (p_full.cumsum(-1) - p_full > top_p[rows]) | (full == float("-inf"))
        keep[rows] = torch.zeros_like(full_drop).scatter(1, full_order, ~full_drop)
    return logits.masked_fill(~keep, float("-inf"))


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row of processed logits (B, V): argmax for greedy rows, else an inverse-CDF draw.

    Each sampled row draws one uniform number from its own generator (or the global one when unseeded), so a
    seeded request gets the same tokens whatever else shares its batch.
    """
    B, V = logits.shape
    picked = logits.argmax(-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return picked.tolist()
    rows = torch.tensor(sampled, device=logits.device)
    cdf = logits[rows].softmax(-1).cumsum(-1)                                           # (b, V)
    total = cdf[:, -1:]
    u = torch.cat([torch.rand(1, generator=generators[i], device=logits.device) for i in sampled])
    # Strictly below the total, so `right=True` lands on a token of positive probability.
    x = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    picked[rows] = torch.searchsorted(cdf, x, right=True)[:, 0].clamp(max=V - 1)
    return picked.tolist()


def token_mask(vocab_size: int, ids: torch.Tensor | Sequence[int], device=None) -> torch.Tensor:
    """(V,) bool, True at `ids`."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[torch.as_tensor(ids, dtype=torch.long, device=device)] = True
    return mask


def process_logits(logits: torch.Tensor, params: SamplingParams, prompt_ids: torch.Tensor,
                   output_ids: torch.Tensor) -> torch.Tensor:
    """`process_rows` for one row of logits (V,), given the prompt's and the output's ids."""
    V = logits.shape[-1]
    generated = token_mask(V, output_ids, logits.device)
    seen = generated | token_mask(V, prompt_ids, logits.device)
    return process_rows(logits[None], [params], seen[None], generated[None])[0]


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """Pick the next token from processed logits (V,)."""
    return sample_rows(logits[None], [params], [generator])[0]


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
    V = model.config.vocab_size
    generated = token_mask(V, [], device)[None]                   # (1, V)
    seen = token_mask(V, prompt, device)[None]
    stops = set(params.stop_ids)
    cache = model.new_cache(1, len(prompt_ids) + max_new) if use_cache else None
    step_input = prompt[None]
    for _ in range(max_new):
        logits = model(step_input, cache=cache, last_only=True).logits[0, -1]
        token = sample_rows(process_rows(logits[None], [params], seen, generated), [params], [generator])[0]
        if token in stops:
            return
        yield token
        seen[0, token] = generated[0, token] = True
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
