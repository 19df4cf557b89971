"""What every stage shares: the Stage base (model building, export, restore) and the entry-point runner.

A stage is a small object: its data format, its config dataclass (defaults), and
`loss(model, batch) -> (loss, metrics)`. The training loop, Ray and DeepSpeed live in `cluster/`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from cluster.config import BUNDLED_DATA as BUNDLED, TrainConfig  # noqa: F401 (re-exported for stages)
from minimind.checkpoint import load_config, load_model, load_weights_into, read_weights
from minimind.config import get_preset
from minimind.losses import lm_loss
from minimind.model import MiniMind


def load_frozen(path: str, device) -> MiniMind:
    """A reference or teacher model: eval mode, no gradients."""
    model = load_model(path, device=device, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def causal_lm_loss(model, batch):
    """Next-token loss on a fixed-length row: predict ids[1:] from ids[:-1], weighted by loss_mask[1:]."""
    ids = batch["input_ids"].long()
    out = model(ids[:, :-1])
    loss = lm_loss(out.logits, ids[:, 1:], batch["loss_mask"][:, 1:])
    return loss, out


class Stage:
    name = "pretrain"
    data_format = "pretrain"   # pretrain | chat | reason | dpo (see cluster.data)
    config_cls = TrainConfig

    def build_model(self, cfg) -> MiniMind:
        if cfg.init:
            return load_model(cfg.init, dtype=torch.float32)  # fp32 master weights
        return MiniMind(get_preset(cfg.preset or "tiny"))

    def check(self, cfg, tokenizer) -> None:
        """Errors to raise in the driver before any work starts."""
        if cfg.init:
            saved = load_config(cfg.init)
            if cfg.preset and saved.preset_name() != cfg.preset:
                raise ValueError(f"--init {cfg.init} holds preset {saved.preset_name() or 'custom'}, "
                                 f"but --preset {cfg.preset} was asked for")
        vocab = (load_config(cfg.init) if cfg.init else get_preset(cfg.preset or "tiny")).vocab_size
        if tokenizer.vocab_size > vocab:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab}")

    def setup(self, cfg, device) -> None:
        """Load frozen helper models (reference, teacher) onto the worker's device."""

    def loss(self, model, batch):
        """Next-token loss on the row's weights plus the MoE balancing loss (pretrain, SFT, LoRA)."""
        loss, out = causal_lm_loss(model, batch)
        return loss + out.aux_loss, {"aux_loss": out.aux_loss}

    def export(self, module, weights) -> MiniMind:
        """The plain model written as the checkpoint's HF directory."""
        model = MiniMind(module.config)
        model.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in weights.items()})
        return model

    def save_extra(self, module, directory: Path) -> None:
        """Files beside the HF checkpoint (LoRA writes its adapter)."""

    def restore(self, model, directory: Path) -> None:
        load_weights_into(model, read_weights(directory / "model.safetensors"), directory / "model.safetensors")


def run_stage(stage: Stage, argv=None, description: str = ""):
    """Parse the stage's flags (generated from its config dataclass), then train on Ray."""
    from minimind.configcli import parse_config
    cfg = parse_config(stage.config_cls, argv, description=description or stage.__doc__,
                       prog=f"stages/{stage.name}.py")
    try:
        cfg.validate()
        if cfg.ray:
            from cluster.launcher import launch
            out = launch(cfg, stage)
        else:
            from cluster.local import train_local
            out = train_local(cfg, stage)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"done: checkpoint and metrics in {out}")
    return out
