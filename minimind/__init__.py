"""MiniMind in plain PyTorch: model, tokenizer, generation, losses, LoRA and checkpoint I/O.

Nothing in this package imports Ray; `cluster/`, `stages/`, `tune/` and `serve/` build on it.
"""
from .config import PRESETS, ModelConfig, get_preset
from .model import KVCache, MiniMind

__all__ = ["PRESETS", "ModelConfig", "get_preset", "MiniMind", "KVCache"]
