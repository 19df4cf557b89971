"""Built-in experiments: named trial configs that reproduce documented runs, shrinkable to CPU size.

`minimind-pretrain` follows the pretraining comparisons in MiniMind's notes (single GPU, so effective batch =
micro-batch x accumulation):
  - warmup: (bs 80, accum 2, no warmup, lr 5e-4) against (80, 4) with warmup 0.03 and 0.1 at lr 5e-4,
  - learning rate: (80, 4, warmup 0.1) at lr 5e-4 against 5e-5,
  - batch: (80, 4) against (84, 8) at equal lr (5e-4, warmup 0.1),
  - learning rate at effective batch ~160: (80, 2) at lr 4e-3 against 1e-3 (no warmup, like the first run).

`--scale S` multiplies micro-batches and the sequence length by S (accumulation, lr and warmup are kept, so
the ratios between trials' effective batches hold) and swaps the model for the tiny preset when S < 1. The
token budget is the same for every trial, so trials with larger effective batches take fewer steps.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Experiment:
    stage: str
    trials: dict[str, dict]     # trial name -> config fields
    preset: str                 # model at scale 1
    max_seq_len: int            # at scale 1
    budget_steps: int           # token budget = this many steps of `budget_ref` (0: one epoch, no budget)
    budget_ref: str             # the trial whose tokens per step set the budget


def _t(bs, accum, warmup, lr):
    return {"batch_size": bs, "accumulation_steps": accum, "warmup": warmup, "lr": lr}


EXPERIMENTS = {
    "minimind-pretrain": Experiment(
        stage="pretrain",
        trials={
            "bs80-acc2-nowarm-lr5e-4": _t(80, 2, 0.0, 5e-4),
            "bs80-acc4-warm0.03-lr5e-4": _t(80, 4, 0.03, 5e-4),
            "bs80-acc4-warm0.1-lr5e-4": _t(80, 4, 0.1, 5e-4),
            "bs80-acc4-warm0.1-lr5e-5": _t(80, 4, 0.1, 5e-5),
            "bs84-acc8-warm0.1-lr5e-4": _t(84, 8, 0.1, 5e-4),
            "bs80-acc2-nowarm-lr4e-3": _t(80, 2, 0.0, 4e-3),
            "bs80-acc2-nowarm-lr1e-3": _t(80, 2, 0.0, 1e-3),
        },
        preset="small", max_seq_len=512, budget_steps=0, budget_ref="bs80-acc4-warm0.1-lr5e-4"),
}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}")
    return EXPERIMENTS[name]


def scaled_trials(exp: Experiment, scale: float) -> dict[str, dict]:
    if not 0 < scale <= 1:
        raise ValueError("--scale must be in (0, 1]")
    return {name: {**t, "batch_size": max(1, round(t["batch_size"] * scale))} for name, t in exp.trials.items()}


def scaled_base(exp: Experiment, scale: float) -> dict:
    """Config fields every trial shares at this scale."""
    seq = exp.max_seq_len if scale == 1 else max(32, round(exp.max_seq_len * scale / 16) * 16)
    return {"preset": exp.preset if scale == 1 else "tiny", "max_seq_len": seq}
