"""MiniMind MoE for transformers (remote code: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`).

The same arithmetic as minimind/model.py, written out plainly for readers of a checkpoint directory:

    embed -> N x [x + attn(rmsnorm(x)); x + moe(rmsnorm(x))] -> rmsnorm -> lm_head (tied to the embedding)

  attention  grouped-query attention (num_key_value_heads < num_attention_heads), RoPE in Llama's rotate-half
             layout with theta `rope_theta`, no biases, softmax scale 1/sqrt(head_dim)
  moe        router: softmax over the experts of x @ gate.T (in fp32), top-k experts per token, their weights
             renormalised to sum to 1 (norm_topk_prob, k > 1); output = sum_k w_k * expert_k(x)
             + sum of the shared experts (no gate); every expert is SwiGLU: down(silu(gate(x)) * up(x))

Parameter names are the ones the checkpoint stores (`model.layers.0.mlp.experts.1.up_proj.weight`,
`model.layers.0.mlp.shared_experts.0.down_proj.weight`, `model.layers.0.mlp.gate.weight`, ...), so the
checkpoint's model.safetensors loads as it is. Inference only: the router's load-balancing loss, which training
adds, is not computed here (a `labels` argument gives the plain next-token cross-entropy).

Shapes: B batch, T new tokens, S keys (cached + new), C hidden_size, H / Hkv query / key-value heads, D head_dim,
N = B * T tokens, E experts, k experts per token, V vocab_size.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_minimind_moe import MiniMindMoEConfig


def _cache_field(output_cls) -> str:
    """transformers 5 names a model output's cache field `cache`, earlier versions `past_key_values`."""
    return "cache" if "cache" in output_cls.__dataclass_fields__ else "past_key_values"


def _with_cache(output_cls, cache, **fields):
    return output_cls(**fields, **{_cache_field(output_cls): cache})


class MiniMindMoERMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # (..., C) -> (..., C), normalised in fp32
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """cos and sin of the rotary angles, (B, 1, T, D) each, for absolute positions (B, T)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (D/2,)
    angles = positions.float()[..., None] * inv_freq.to(positions.device)                      # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)                                               # (B, T, D)
    return angles.cos()[:, None], angles.sin()[:, None]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):  # x: (B, H, T, D)
    out = x * cos + rotate_half(x) * sin
    return out.to(x.dtype)


class MiniMindMoEAttention(nn.Module):
    def __init__(self, config: MiniMindMoEConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                  config.head_dim)
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, is_causal: bool, cache: Cache | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)     # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)     # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)                                # (B, Hkv, S, D)
        # Query heads h*Hkv/H share key-value head h // (H / Hkv) (enable_gqa: no copy of K and V per head).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             enable_gqa=self.n_kv != self.n_heads)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))                   # (B, T, C)


class MiniMindMoEMLP(nn.Module):
    """One SwiGLU expert: down(silu(gate(x)) * up(x)), (..., C) -> (..., C)."""

    def __init__(self, config: MiniMindMoEConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MiniMindMoESparseBlock(nn.Module):
    def __init__(self, config: MiniMindMoEConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # router, weight (E, C)
        self.experts = nn.ModuleList(MiniMindMoEMLP(config) for _ in range(config.num_experts))
        self.shared_experts = nn.ModuleList(MiniMindMoEMLP(config) for _ in range(config.num_shared_experts))

    def forward(self, x):
        B, T, C = x.shape
        flat = x.reshape(-1, C)                                     # (N, C)
        probs = self.gate(flat).float().softmax(dim=-1)             # (N, E) router probabilities, fp32
        weights, chosen = probs.topk(self.top_k, dim=-1)            # (N, k) each
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(flat)                                # (N, C)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)                  # the tokens routed to e, and which of their k
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        for shared in self.shared_experts:                          # every token, weight 1
            out = out + shared(flat)
        return out.view(B, T, C)


class MiniMindMoEDecoderLayer(nn.Module):
    def __init__(self, config: MiniMindMoEConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = MiniMindMoERMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MiniMindMoEAttention(config, layer_idx)
        self.post_attention_layernorm = MiniMindMoERMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MiniMindMoESparseBlock(config)

    def forward(self, x, cos, sin, mask, is_causal, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class MiniMindMoEPreTrainedModel(PreTrainedModel):
    config_class = MiniMindMoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["MiniMindMoEDecoderLayer"]
    _supports_sdpa = True
    supports_gradient_checkpointing = False

    def _init_weights(self, module):  # for weights a checkpoint lacks: MiniMind's own initialisation
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, MiniMindMoERMSNorm):
            nn.init.ones_(module.weight)


def _attention_mask(attention_mask, B: int, T: int, past: int, S: int, device):
    """The SDPA mask for T new queries (cache positions past .. past+T-1) over S keys, and whether plain causal
    attention can replace it. Returns (mask or None, is_causal); a bool mask is (B, 1, T, S), True = visible."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask, False                                # already built by the caller
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded:
        if past == 0:
            return None, T > 1                                      # a fresh prompt: causal over itself
        if T == 1:
            return None, False                                      # one new token sees every cached key
    keys = torch.arange(S, device=device)                           # (S,)
    queries = past + torch.arange(T, device=device)                 # (T,)
    mask = (keys[None, :] <= queries[:, None])[None, None]          # (1, 1, T, S) causal
    if padded:
        valid = attention_mask.bool()                               # (B, S'), S' <= S (a static cache is longer)
        if valid.shape[-1] < S:
            valid = F.pad(valid, (0, S - valid.shape[-1]), value=True)
        mask = mask & valid[:, None, None, :S]                      # (B, 1, T, S)
        mask = mask | ~mask.any(dim=-1, keepdim=True)               # a padding query with no visible key: any
    return mask.expand(B, 1, T, S), False


class MiniMindMoEModel(MiniMindMoEPreTrainedModel):
    def __init__(self, config: MiniMindMoEConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MiniMindMoEDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MiniMindMoERMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, use_cache: bool | None = None, **kwargs):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)  # transformers < 5 passes the cache under this name
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds   # (B, T, C)
        B, T, _ = x.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        elif not use_cache:
            cache = None
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (past + torch.arange(T, device=x.device))[None].expand(B, T)  # (B, T)
        if past + T > self.config.max_position_embeddings:
            raise ValueError(f"{past + T} positions exceed max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)  # (B, 1, T, D)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        mask, is_causal = _attention_mask(attention_mask, B, T, past, past + T, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, is_causal, cache)
        return _with_cache(BaseModelOutputWithPast, cache, last_hidden_state=self.norm(x))


class MiniMindMoEForCausalLM(MiniMindMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniMindMoEConfig):
        super().__init__(config)
        self.model = MiniMindMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, labels=None, use_cache: bool | None = None, logits_to_keep: int = 0,
                **kwargs):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache)
        hidden = out.last_hidden_state                                   # (B, T, C)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)                                    # (B, T', V)
        loss = None
        if labels is not None:  # next-token cross-entropy, -100 ignored
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        cache = getattr(out, _cache_field(type(out)))
        return _with_cache(CausalLMOutputWithPast, cache, loss=loss, logits=logits)
