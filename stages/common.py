"""What every stage shares: the Stage base (a recipe) and the entry-point runner.

A stage is a recipe and holds no state of a run: its data format, its config dataclass (defaults),
`build_model(cfg)`, `helpers(cfg, device)` (frozen models and loss settings, passed back to `loss`),
`weight(batch)` (how many units the micro-batch's loss is a sum over: weighted target tokens, or DPO pairs) and
`loss(model, batch, helpers) -> StageLoss` (that sum). The loop divides once by the whole step's weight, all
micro-batches and ranks together. The training loop, checkpoints (`cluster.checkpoint`: the export for
inference, a LoRA model's merge and adapter included), Ray and DeepSpeed live in `cluster/`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from cluster.config import BUNDLED_DATA as BUNDLED, TrainConfig  # noqa: F401 (re-exported for stages)
from minimind.checkpoint import load_config, load_model
from minimind.config import get_preset
from minimind.losses import lm_loss
from minimind.model import MiniMind


@dataclass
class ChatTrainConfig(TrainConfig):
    """The training config of the conversation stages: pretraining's packing fields are not theirs, so
    they are no flags of these stages."""
    pack: bool = field(default=True, metadata={"cli": False})
    text_field: str = field(default="text", metadata={"cli": False})


def load_frozen(path: str, device) -> MiniMind:
    """A reference or teacher model: eval mode, no gradients."""
    model = load_model(path, device=device, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class StageLoss(NamedTuple):
    """One micro-batch's loss terms.

    total: the loss summed over the micro-batch's `Stage.weight` units (the loop divides by the step's sum).
    per_batch: terms that are already a per-micro-batch mean (the MoE balancing loss); the loop averages
        them over the step's micro-batches and ranks.
    metrics: scalar tensors to log, each a per-micro-batch mean.
    """
    total: torch.Tensor
    per_batch: torch.Tensor
    metrics: dict


def causal_lm_loss(model, batch):
    """Next-token loss SUM on a fixed-length row: predict ids[1:] from ids[:-1], weighted by loss_mask[1:]."""
    ids = batch["input_ids"].long()
    out = model(ids[:, :-1])
    loss = lm_loss(out.logits, ids[:, 1:], batch["loss_mask"][:, 1:], reduction="sum")
    return loss, out


class Stage:
    name = "pretrain"
    data_format = "pretrain"   # pretrain | chat | reason | dpo (see cluster.ingest)
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

    def helpers(self, cfg, device):
        """What `loss` needs besides the model being trained: frozen models (DPO's reference, distillation's
        teacher) loaded onto the worker's device and the loss's settings. The loop holds them and passes them
        to every `loss` call; the stage object keeps nothing. None when the loss needs nothing."""
        return None

    def weight(self, batch) -> torch.Tensor:
        """The denominator's share of this micro-batch: the summed loss-mask weights of the targets."""
        return batch["loss_mask"][:, 1:].sum(dtype=torch.float64)

    def scored_chars(self, batch, char_counts: torch.Tensor) -> torch.Tensor | None:
        """Characters of text the scored targets cover (for bits per character); None where the weights are
        not 0/1 (DPO pairs, reasoning's x10 tags), so nats per character would not be defined."""
        targets = batch["input_ids"][:, 1:].long()
        return (char_counts[targets] * (batch["loss_mask"][:, 1:] > 0)).sum(dtype=torch.float64)

    def loss(self, model, batch, helpers=None) -> StageLoss:
        """Next-token loss on the row's weights plus the MoE balancing loss (pretrain, SFT, LoRA)."""
        total, out = causal_lm_loss(model, batch)
        return StageLoss(total, out.aux_loss, {"aux_loss": out.aux_loss})


# What a user runs after each stage (MiniMind's chain); {out} is this run's output directory.
NEXT_COMMAND = {
    "pretrain": "python stages/sft.py --init {out} --data sft_mini_512.jsonl --config stages/configs/sft_512.yaml",
    "sft": "python stages/dpo.py --init {out} --data dpo.jsonl",
    "dpo": "python stages/reason.py --init {out} --data r1_mix_1024.jsonl",
    "reason": "python stages/evaluate.py --model {out} --data r1_mix_1024.jsonl --format reason --generate 32",
    "lora": "python serve/app.py --model {out}",
    "distill": "python stages/evaluate.py --model {out} --data sft_mini_512.jsonl --format chat",
}


def summarize(stage: Stage, out: Path, seconds: float) -> str:
    """The run's closing lines: what it did, how well, where it went, what to run next. Also draws
    OUT/loss.png and writes OUT's TensorBoard event file from OUT/metrics.jsonl."""
    import json
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    state = json.loads((out / "trainer_state.json").read_text())
    last = records[-1] if records else {}
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    lines = [f"{stage.name} done in {seconds:,.0f} s: {state['step']} steps, {state['tokens']:,} tokens, "
             f"final train loss {last.get('loss', float('nan')):.4f}"
             + (f", val loss best {min(vals):.4f} / last {vals[-1]:.4f}" if vals else "")]
    try:
        from cluster.plots import plot_loss
        from cluster.loggers import RunLoggers
        plot_loss(out / "metrics.jsonl", out / "loss.png", title=f"{stage.name}: {out.name}")
        board = RunLoggers(["tensorboard"], run_name=out.name, config={}, directory=out / "tensorboard")
        for r in records:
            board.log(r, step=r["step"])
        board.close()
        lines.append(f"checkpoint: {out}  (loss.png, tensorboard/, metrics.jsonl beside it)")
    except ImportError as e:  # a plotting/board package missing must not lose the finished run
        lines.append(f"checkpoint: {out}  (no plot: {e})")
    if stage.name in NEXT_COMMAND:
        lines.append("next: " + NEXT_COMMAND[stage.name].format(out=out))
    return "\n".join(lines)


def run_stage(stage: Stage, argv=None, description: str = ""):
    """Parse the stage's flags (generated from its config dataclass), then train on Ray."""
    import time
    from minimind.configcli import parse_config
    cfg = parse_config(stage.config_cls, argv, description=description or stage.__doc__,
                       prog=f"stages/{stage.name}.py")
    start = time.perf_counter()
    try:
        cfg = cfg.for_driver()  # absolute paths, before anything runs elsewhere
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
    print(summarize(stage, Path(out), time.perf_counter() - start), flush=True)
    return out
