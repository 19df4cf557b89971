"""Low-rank adapters (Hu et al. 2021) applied to a built model's linear layers.

`apply_lora` wraps the chosen projections in place: y = W x + (alpha / r) * B(A(x)), with A random and B zero
so the wrapped model starts equal to the base. Only A and B require grad. Adapters save and load on their
own (`lora_state_dict`) and merge into the base weights (`merge_lora`) for a plain checkpoint.

An adapter directory holds ADAPTER_CONFIG ({"rank", "alpha", "targets"}) and ADAPTER_WEIGHTS (the tensors of
`lora_state_dict`): `save_adapter` writes one (the LoRA stage), `merge_adapter` folds one into a model (the
merge-lora CLI, the server at load time).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t().to(x.dtype) @ self.lora_B.t().to(x.dtype)) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + (self.lora_B @ self.lora_A).to(self.base.weight.dtype) * self.scale


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets=DEFAULT_TARGETS) -> list[str]:
    """Freeze `model` and wrap every nn.Linear whose attribute name is in `targets`. Returns wrapped names."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(parent, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    if not wrapped:
        raise ValueError(f"no linear layer named any of {list(targets)} in the model")
    return wrapped


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if k.endswith((".lora_A", ".lora_B"))}


def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source="adapter") -> None:
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source}: adapter does not match the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{source}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=False)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and unwrap it, leaving a plain model."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                child.base.weight.copy_(child.merged_weight())
                setattr(parent, child_name, child.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save_adapter(model: nn.Module, directory, config: dict) -> None:
    """Write `model`'s adapters and `config` (rank, alpha, targets, ...) as an adapter directory."""
    from safetensors.torch import save_file

    from .tokenizer import default_file_mode
    directory = Path(directory)
    save_file(lora_state_dict(model), str(directory / ADAPTER_WEIGHTS))
    (directory / ADAPTER_WEIGHTS).chmod(default_file_mode())  # safetensors writes 0600
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def merge_adapter(model: nn.Module, adapter_dir) -> nn.Module:
    """Fold an adapter directory into `model`'s weights; returns the plain model."""
    from .checkpoint import read_weights

    path = Path(adapter_dir)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{path}: a LoRA adapter directory needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    cfg = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    apply_lora(model, rank=int(cfg["rank"]), alpha=float(cfg["alpha"]),
               targets=tuple(cfg.get("targets", DEFAULT_TARGETS)))
    load_lora_state_dict(model, read_weights(path / ADAPTER_WEIGHTS), source=path / ADAPTER_WEIGHTS)
    return merge_lora(model)
