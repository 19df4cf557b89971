"""The MiniMind decoder: a Llama-style transformer in plain PyTorch.

RMSNorm -> RoPE (theta 1e6, Llama's rotate-half layout) -> grouped-query attention through SDPA -> SwiGLU
FFN or a mixture of experts (routed top-k + shared experts, sequence-level balancing loss) -> tied LM head.

Parameter names follow Hugging Face's Llama (`model.layers.0.self_attn.q_proj.weight`, ...), so a dense
checkpoint is a valid `LlamaForCausalLM` and MiniMind2's own `.pth` files load without renaming.

The model returns logits (and the MoE auxiliary loss); losses live in `minimind.losses`.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32:  # one fused op; the same arithmetic as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32 for stability under bf16 autocast, as Llama does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float):
    """cos and signed sin, (L, D) each, in Llama's rotate-half layout (see apply_rope)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (L, D/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x, cos, signed_sin):
    """Llama's x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x2, x1).

    cat(-x2, x1) * cat(s, s) == roll(x, D/2) * cat(-s, s) bit for bit, in two ops instead of five: a small
    model's decode step is weight streaming plus per-op overhead, and only the overhead is ours to cut.
    x: (B, H, T, D); cos/signed_sin: (B or 1, 1, T, D).
    """
    out = x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
    return out if out.dtype == x.dtype else out.to(x.dtype)


def decode_attention(q, k, v, mask):
    """One new token per row against its row's cached keys, as two batched matmuls.

    q: (B, H, 1, D); k, v: (B, Hkv, S, D); mask: (B, 1, 1, S), True where a key is visible. Query heads
    g*H/Hkv .. (g+1)*H/Hkv - 1 share kv head g, as in SDPA's enable_gqa. On CPU this is ~2x faster than SDPA
    with a mask for a batch of decoding rows at different lengths (32 rows, 90 keys: 0.38 vs 0.84 ms a layer
    in isolation; 2-4% of a whole decode step of the small preset).
    """
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    scores = q.reshape(B, Hkv, H // Hkv, D) @ k.transpose(-1, -2) * D ** -0.5  # (B, Hkv, H/Hkv, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).reshape(B, H, 1, D)


class KVCache:
    """Preallocated keys and values of every layer, with a per-row fill length.

    Rows are independent slots: a row can be reset (`lengths[row] = 0`) and refilled while the other rows
    keep decoding, which is what a continuous-batching server needs. Positions past a row's length hold
    stale values and are masked out. `lengths` lives on the host whatever the cache's device: the forward
    pass plans its reads and writes from it without waiting on the device.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long)
        self.max_len = max_len

    def reset(self, rows=None):
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[rows] = 0


class CacheView(NamedTuple):
    """How one forward pass reads and writes a KVCache, planned on the host before the layers run.

    The common cases take views instead of gathers: a batch whose rows are consecutive slots reads
    `k[first:last + 1]`, and rows that all start at the same position write one slice. Decode with one
    request (and any batch whose rows are at the same length) needs no mask at all.
    """
    cache: KVCache
    slots: list[int]            # cache slot of each batch row (host)
    rows: torch.Tensor | slice  # the same as a device index, or as the slice they form
    positions: torch.Tensor     # (B, T) absolute positions of the new tokens
    start: int | None           # the first new position when every row has the same one
    mask: torch.Tensor | None   # (B, 1, T, S) True where a query may attend to a key; None: see `causal`
    causal: bool                # no mask needed beyond causality among the new tokens (rows start at 0)
    span: int                   # S: keys read back, up to the furthest filled position


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, layer: int, view: CacheView | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)     # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)     # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if view is None:
            # Training / full recompute: causal flash-style SDPA; GQA without copying K/V per head.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            ck, cv = view.cache.k[layer], view.cache.v[layer]  # (Bmax, Hkv, Lmax, D)
            if k.dtype != ck.dtype:
                k, v = k.to(ck.dtype), v.to(cv.dtype)
            if view.start is not None and isinstance(view.rows, slice):
                end = view.start + T
                ck[view.rows, :, view.start:end] = k  # (B, Hkv, T, D) into one slice
                cv[view.rows, :, view.start:end] = v
            else:
                slots = view.rows if torch.is_tensor(view.rows) else torch.tensor(view.slots, device=ck.device)
                ck[slots[:, None], :, view.positions] = k.transpose(1, 2)  # (B, T, Hkv, D) scattered
                cv[slots[:, None], :, view.positions] = v.transpose(1, 2)
            k = ck[view.rows, :, : view.span]  # (B, Hkv, S, D): a view when rows is a slice
            v = cv[view.rows, :, : view.span]
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
            if T == 1 and view.mask is not None and q.device.type == "cpu":
                out = decode_attention(q, k, v, view.mask)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=view.mask, is_causal=view.causal,
                                                     enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    """Softmax router with normalised top-k weights and DeepSeek's sequence-level balancing loss."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_experts = cfg.num_experts_per_tok, cfg.num_experts
        self.alpha, self.norm_topk = cfg.aux_loss_alpha, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))

    def forward(self, x):
        B, T, C = x.shape
        scores = F.linear(x.reshape(-1, C), self.weight).float().softmax(-1)  # (N, E)
        weights, experts = scores.topk(self.top_k, dim=-1)                     # (N, k)
        if self.norm_topk and self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        aux = scores.new_zeros(())
        if self.training and self.alpha > 0:
            # Per sequence: load_e = fraction of routed slots that chose e, times E (1.0 when balanced);
            # loss = alpha * sum_e load_e * mean router prob of e, averaged over sequences.
            chosen = experts.view(B, T * self.top_k)
            load = scores.new_zeros(B, self.n_experts).scatter_add_(1, chosen, scores.new_ones(chosen.shape))
            load = load * self.n_experts / (T * self.top_k)
            aux = (load * scores.view(B, T, -1).mean(1)).sum(1).mean() * self.alpha
        return weights.to(x.dtype), experts, aux


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = MoEGate(cfg)
        self.experts = nn.ModuleList(FeedForward(cfg) for _ in range(cfg.num_experts))
        self.shared_experts = nn.ModuleList(FeedForward(cfg) for _ in range(cfg.num_shared_experts))

    def forward(self, x):
        B, T, C = x.shape
        weights, experts, aux = self.gate(x)                 # (N, k), (N, k)
        flat = x.reshape(-1, C)                              # (N, C)
        k = experts.shape[1]
        # Dispatch by sorting the N*k (token, expert) slots by expert: one gather, one matmul group per
        # expert, one scatter-add back. The only loop is over experts; every expert runs (possibly on zero
        # rows) so DDP always sees its parameters used.
        slot_expert = experts.reshape(-1)                    # (N*k,)
        order = slot_expert.argsort()
        slot_token = order // k                              # token index of each sorted slot
        counts = torch.bincount(slot_expert, minlength=len(self.experts)).tolist()
        routed = flat[slot_token]                            # (N*k, C)
        outs = [expert(chunk) for expert, chunk in zip(self.experts, routed.split(counts))]
        routed_out = torch.cat(outs) * weights.reshape(-1)[order, None]
        y = torch.zeros_like(flat).index_add_(0, slot_token, routed_out)
        for shared in self.shared_experts:
            y = y + shared(flat)
        return y.view(B, T, C), aux


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe else FeedForward(cfg)

    def forward(self, x, cos, sin, layer, view):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, view)
        h = self.mlp(self.post_attention_layernorm(x))
        if isinstance(h, tuple):
            h, aux = h
        else:
            aux = None
        return x + h, aux


class Decoder(nn.Module):
    """Embeddings, blocks and final norm: the `model.` prefix of Llama's parameter names."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Output(NamedTuple):
    logits: torch.Tensor    # (B, T, V), or (B, 1, V) with last_only
    aux_loss: torch.Tensor  # scalar; zero for dense models and in eval mode


class MiniMind(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, MoEGate):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def forward(self, input_ids, cache: KVCache | None = None, rows=None, last_only: bool = False,
                new_tokens: Sequence[int] | None = None) -> Output:
        """new_tokens (with a cache): how many of each row's T tokens are real, the rest being right padding.
        A ragged batch (prompts of different lengths prefilled together) then advances each cache row by its
        own count, and last_only returns each row's last real position. Padding is harmless without a mask of
        its own: it sits after the real tokens (causality hides it from them) at positions past the row's
        length (masked from every later query, and overwritten by the row's next tokens)."""
        B, T = input_ids.shape
        if new_tokens is not None and (cache is None or len(new_tokens) != B
                                       or not all(0 < n <= T for n in new_tokens)):
            raise ValueError(f"new_tokens needs a cache and one count in 1..{T} per row, got {list(new_tokens)}")
        view = None
        if cache is None:
            if T > self.config.max_position_embeddings:
                raise ValueError(f"sequence of {T} tokens exceeds max_position_embeddings "
                                 f"{self.config.max_position_embeddings}")
            cos = self.rope_cos[:T][None, None]  # (1, 1, T, D)
            sin = self.rope_sin[:T][None, None]
        else:
            view = self._cache_view(cache, rows, B, T, input_ids.device)
            cos = self.rope_cos[view.positions][:, None]  # (B, 1, T, D)
            sin = self.rope_sin[view.positions][:, None]
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        aux_total = x.new_zeros((), dtype=torch.float32)
        for i, block in enumerate(self.model.layers):
            x, aux = block(x, cos, sin, i, view)
            if aux is not None:
                aux_total = aux_total + aux
        x = self.model.norm(x)
        ragged = new_tokens is not None and any(n != T for n in new_tokens)
        if last_only:
            x = x[torch.arange(B, device=x.device), torch.tensor(new_tokens, device=x.device) - 1][:, None] \
                if ragged else x[:, -1:]  # (B, 1, C)
        if view is not None:
            cache.lengths[view.slots] += torch.tensor(new_tokens) if ragged else T
        return Output(self.lm_head(x), aux_total)

    def _cache_view(self, cache: KVCache, rows, B: int, T: int, device) -> CacheView:
        slots = list(range(B)) if rows is None else rows.tolist() if torch.is_tensor(rows) else list(rows)
        if len(slots) != B:
            raise ValueError(f"{len(slots)} cache rows given for a batch of {B}")
        lengths = cache.lengths.tolist()
        starts = [lengths[r] for r in slots]
        span = max(starts) + T
        if span > min(cache.max_len, self.config.max_position_embeddings):
            raise ValueError(f"KV cache holds {cache.max_len} positions; {span} needed")
        first = slots[0]
        consecutive = slots == list(range(first, first + B))
        start = starts[0] if all(s == starts[0] for s in starts) else None
        positions = (torch.tensor(starts)[:, None] + torch.arange(T)).to(device, non_blocking=True)  # (B, T)
        mask, causal = None, False
        if start is None or (T > 1 and start > 0):
            # Each query sees its row's keys up to its own position.
            mask = (torch.arange(span, device=device)[None, None, :] <= positions[:, :, None])[:, None]  # (B,1,T,S)
        elif T > 1:
            causal = True  # every row starts empty: plain causal attention over the new tokens
        # (start given and T == 1: one new token per row that sees all of its row's keys, no mask)
        row_index = slice(first, first + B) if consecutive else torch.tensor(slots, device=device)
        return CacheView(cache, slots, row_index, positions, start, mask, causal, span)

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len or self.config.max_position_embeddings,
                       device=p.device, dtype=dtype or p.dtype)
