"""Low-rank adapters (Hu et al. 2021) applied to a built model's linear layers.

`apply_lora` wraps the chosen projections in place: y = W x + (alpha / r) * B(A(x)), with A random and B zero
so the wrapped model starts equal to the base. Only A and B require grad. Adapters save and load on their
own (`lora_state_dict`) and merge into the base weights (`merge_lora`) for a plain checkpoint.

An adapter directory is in PEFT's format, so `peft.PeftModel.from_pretrained(AutoModelForCausalLM
.from_pretrained(base), adapter_dir)` loads it onto the base checkpoint:
  ADAPTER_CONFIG   PEFT's LoraConfig as JSON (peft_type "LORA", r, lora_alpha, target_modules, ...; plain LoRA:
                   scale alpha / r, no rslora, DoRA, biases or per-layer patterns)
  ADAPTER_WEIGHTS  the A and B of every wrapped layer under PEFT's saved names: our module path (which is the
                   Hugging Face one, `model.layers.0.self_attn.q_proj`) behind `base_model.model.`, then
                   `.lora_A.weight` (r, in) and `.lora_B.weight` (out, r)
`save_adapter` writes one (the LoRA stage), `merge_adapter` folds one into a model (the merge-lora CLI, the
server at load time). Both readers also take this toolkit's earlier format ({"rank", "alpha", "targets"} and
tensors named `model.layers.0.self_attn.q_proj.lora_A`), and adapters PEFT itself trained with plain LoRA.
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
PEFT_PREFIX = "base_model.model."  # PeftModel wraps a LoraModel (base_model) that wraps the model (.model)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        self.rank, self.alpha = rank, alpha
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
    """A and B of every wrapped layer, under our names (`model.layers.0.self_attn.q_proj.lora_A`)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if k.endswith((".lora_A", ".lora_B"))}


def peft_name(name: str) -> str:
    """`model.layers.0.self_attn.q_proj.lora_A` -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    return PEFT_PREFIX + name + ".weight"


def own_name(key: str) -> str:
    """The inverse of peft_name; a name already in our form is returned as it is."""
    if key.startswith(PEFT_PREFIX) and key.endswith((".lora_A.weight", ".lora_B.weight")):
        return key[len(PEFT_PREFIX):-len(".weight")]
    return key


def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source="adapter") -> None:
    """Load A and B into a wrapped model; `sd` may use PEFT's names or ours."""
    sd = {own_name(k): v for k, v in sd.items()}
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


def peft_config(rank: int, alpha: float, targets, base: str | None = None) -> dict:
    """PEFT's LoraConfig (as saved by `LoraConfig.save_pretrained`) for plain LoRA at scale alpha / rank."""
    alpha = float(alpha)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if base is None else str(base),
        "revision": None,
        "inference_mode": True,
        "r": int(rank),
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_bias": False,
    }


def _wrapped(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_layout(model: nn.Module) -> tuple[int, float, tuple[str, ...]] | None:
    """(rank, alpha, target module names) of `model`'s adapters, as `apply_lora` would be called to rebuild
    them; None when the model has none. Raises ValueError when layers differ in rank or alpha (PEFT's plain
    format has one of each)."""
    wrapped = _wrapped(model)
    if not wrapped:
        return None
    ranks = {m.rank for m in wrapped.values()}
    alphas = {float(m.alpha) for m in wrapped.values()}
    if len(ranks) > 1 or len(alphas) > 1:
        raise ValueError(f"one LoRA rank and alpha for all layers needed, found ranks {sorted(ranks)}, "
                         f"alphas {sorted(alphas)}")
    return ranks.pop(), alphas.pop(), tuple(sorted({name.rsplit(".", 1)[-1] for name in wrapped}))


def save_adapter(model: nn.Module, directory, config: dict | None = None) -> None:
    """Write `model`'s adapters as a PEFT adapter directory.

    Rank, alpha and target modules come from the wrapped model; `config` may name them too ("rank", "alpha",
    "targets": they must agree with the model) and "base", the base checkpoint (PEFT's base_model_name_or_path).
    """
    from safetensors.torch import save_file

    from .tokenizer import default_file_mode
    config = dict(config or {})
    unknown = set(config) - {"rank", "alpha", "targets", "base"}
    if unknown:
        raise ValueError(f"save_adapter: unknown adapter config fields {sorted(unknown)}")
    layout = adapter_layout(model)
    if layout is None:
        raise ValueError("save_adapter: the model has no LoRA layers (call apply_lora first)")
    rank, alpha, targets = layout
    targets = set(targets)
    if "rank" in config and int(config["rank"]) != rank:
        raise ValueError(f"save_adapter: config says rank {config['rank']}, the model's adapters have {rank}")
    if "alpha" in config and float(config["alpha"]) != alpha:
        raise ValueError(f"save_adapter: config says alpha {config['alpha']}, the model's adapters have {alpha}")
    if "targets" in config and not targets <= set(config["targets"]):
        raise ValueError(f"save_adapter: config says targets {list(config['targets'])}, the model wraps "
                         f"{sorted(targets)}")
    directory = Path(directory)
    weights = {peft_name(k): v for k, v in lora_state_dict(model).items()}
    save_file(weights, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_WEIGHTS).chmod(default_file_mode())  # safetensors writes 0600
    (directory / ADAPTER_CONFIG).write_text(
        json.dumps(peft_config(rank, alpha, targets, config.get("base")), indent=2) + "\n")


# PEFT LoraConfig fields that change the arithmetic away from plain W + alpha/r * B A; an adapter using any
# of them (value other than the one given here) is refused rather than merged wrongly.
_PLAIN_LORA = {"use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none",
               "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
               "modules_to_save": None, "exclude_modules": None, "target_parameters": None,
               "trainable_token_indices": None, "layer_replication": None}


def read_adapter(adapter_dir) -> tuple[int, float, tuple[str, ...], dict[str, torch.Tensor]]:
    """(rank, alpha, target module names, tensors under our names) of an adapter directory, PEFT's format or
    this toolkit's earlier one."""
    from .checkpoint import read_weights

    path = Path(adapter_dir)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{path}: a LoRA adapter directory needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        cfg = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / ADAPTER_CONFIG}: not valid JSON ({e})") from e
    if "peft_type" in cfg:
        if cfg["peft_type"] != "LORA":
            raise ValueError(f"{path / ADAPTER_CONFIG}: peft_type {cfg['peft_type']!r}; only LORA adapters merge")
        for key, plain in _PLAIN_LORA.items():
            value = cfg.get(key, plain)
            if value != plain and not (plain is None and value in ({}, [])):
                raise ValueError(f"{path / ADAPTER_CONFIG}: {key} = {value!r} is not supported (plain LoRA only)")
        targets = cfg.get("target_modules")
        if not isinstance(targets, list) or not targets:
            raise ValueError(f"{path / ADAPTER_CONFIG}: target_modules must be a list of module names, "
                             f"got {targets!r}")
        rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    else:  # this toolkit's earlier format
        rank, alpha = int(cfg["rank"]), float(cfg["alpha"])
        targets = cfg.get("targets", DEFAULT_TARGETS)
    sd = {own_name(k): v for k, v in read_weights(path / ADAPTER_WEIGHTS).items()}
    return rank, alpha, tuple(targets), sd


def merge_adapter(model: nn.Module, adapter_dir) -> nn.Module:
    """Fold an adapter directory into `model`'s weights; returns the plain model."""
    rank, alpha, targets, sd = read_adapter(adapter_dir)
    apply_lora(model, rank=rank, alpha=alpha, targets=targets)
    load_lora_state_dict(model, sd, source=Path(adapter_dir) / ADAPTER_WEIGHTS)
    return merge_lora(model)
