"""MiniMind in plain PyTorch: model, tokenizer, generation, losses, LoRA and checkpoint I/O.

Nothing in this package imports Ray. Exports load lazily, so `minimind.tokenizer` and `minimind.formats`
(used by Ray Data tasks) do not pay for importing torch.
"""
__all__ = ["PRESETS", "ModelConfig", "get_preset", "MiniMind", "KVCache"]


def __getattr__(name):
    if name in ("PRESETS", "ModelConfig", "get_preset"):
        from . import config
        return getattr(config, name)
    if name in ("MiniMind", "KVCache"):
        from . import model
        return getattr(model, name)
    raise AttributeError(f"module 'minimind' has no attribute {name!r}")
