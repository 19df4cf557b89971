"""Model configuration: one dataclass and the named presets.

The `small`, `base` and `moe` presets reproduce MiniMind2-small (25.8M), MiniMind2 (104M, the distillation
teacher) and MiniMind2-MoE (145M). The FFN width follows MiniMind's rule: 8/3 of hidden, rounded up to 64.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


def ffn_width(hidden_size: int) -> int:
    return 64 * ((int(hidden_size * 8 / 3) + 63) // 64)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 6400
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 2
    intermediate_size: int = 0  # 0: derive from hidden_size with MiniMind's rule
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    # Mixture of experts; num_experts == 0 means a dense SwiGLU FFN.
    num_experts: int = 0
    num_experts_per_tok: int = 2
    num_shared_experts: int = 1
    aux_loss_alpha: float = 0.1
    norm_topk_prob: bool = True

    def __post_init__(self):
        if self.intermediate_size == 0:
            object.__setattr__(self, "intermediate_size", ffn_width(self.hidden_size))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in 1..{self.num_experts}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**d)

    def preset_name(self) -> str | None:
        """The preset this config equals, or None for a custom one."""
        return next((name for name, cfg in PRESETS.items() if cfg == self), None)


PRESETS: dict[str, ModelConfig] = {
    # MiniMind2-small: 25,829,888 parameters.
    "small": ModelConfig(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2),
    # MiniMind2: 104,030,976 parameters; the white-box distillation teacher.
    "base": ModelConfig(hidden_size=768, num_layers=16, num_heads=8, num_kv_heads=2),
    # MiniMind2-MoE: 4 routed experts (top-2) + 1 shared expert, 145,029,760 parameters.
    "moe": ModelConfig(hidden_size=640, num_layers=8, num_heads=8, num_kv_heads=2, num_experts=4),
    # Test presets: a few hundred thousand parameters, real vocab so real tokenizers fit.
    "tiny": ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=2048),
    "tiny-moe": ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                            max_position_embeddings=2048),
    # The tiny teacher for distillation tests: wider and deeper than `tiny`, same vocab.
    "tiny-base": ModelConfig(hidden_size=96, num_layers=3, num_heads=4, num_kv_heads=2, max_position_embeddings=2048),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
