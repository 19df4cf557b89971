"""One Tune trial: the stage's config for the sampled hyperparameters, trained by the cluster launcher.

Each trial is a function trainable that calls `cluster.launcher.launch`, so a trial is a `TorchTrainer` with
its own workers; `TuneReportCallback` forwards every Train report (step, tokens, loss, ...) to Tune.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib
import math
import os
from pathlib import Path

from stages.common import Stage

TRIAL_KEY = "trial"   # param_space key naming a built-in experiment's trial


def load_stage(name: str) -> Stage:
    """The Stage object of `stages/<name>.py`."""
    try:
        module = importlib.import_module(f"stages.{name}")
    except ModuleNotFoundError:
        module = None
    for obj in vars(module).values() if module else ():
        if isinstance(obj, type) and issubclass(obj, Stage) and obj is not Stage and obj.name == name:
            return obj()
    raise ValueError(f"unknown stage {name!r}: no stages/{name}.py defining a Stage named {name!r}")


def absolute_paths(cfg):
    """Tune runs each trial in its own working directory, so relative paths that exist here are made
    absolute before trials start."""
    def fix(value: str) -> str:
        p = Path(value)
        return str(p.resolve()) if value and not p.is_absolute() and (p.exists() or glob.glob(value)) else value
    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, str):
            changes[f.name] = fix(value)
        elif isinstance(value, tuple) and all(isinstance(v, str) for v in value):
            changes[f.name] = tuple(fix(v) for v in value)
    return cfg.replace(**changes)


def trial_params(config: dict, named_trials: dict[str, dict]) -> dict:
    """The config fields a trial changes: its built-in experiment entry, then the sampled values."""
    config = dict(config)
    named = named_trials[config.pop(TRIAL_KEY)] if TRIAL_KEY in config else {}
    return {**named, **config}


def workers(cfg) -> int:
    from cluster.config import resolve
    return resolve(cfg).num_workers


def tokens_per_step(cfg) -> int:
    """Effective batch in tokens: micro-batch x accumulation x workers x sequence length."""
    return cfg.batch_size * cfg.accumulation_steps * workers(cfg) * cfg.max_seq_len


def trial_out(sweep_dir: Path, trial_id: str) -> Path:
    """Where a trial's final model goes: in the sweep's storage, not Tune's local per-trial scratch directory
    (under /tmp/ray, which Tune does not copy back). Its trainer_state.json says the trial ran to its end."""
    return sweep_dir / "models" / trial_id


def trial_config(base, params: dict, sweep_dir: Path, trial_id: str, token_budget: int = 0,
                 gpus_per_trial: float = 0.0):
    """The full config one trial trains with. With a token budget, every trial sees the same number of
    tokens whatever its effective batch (max_steps is derived from it)."""
    cfg = base.replace(**params, out=str(trial_out(sweep_dir, trial_id)), storage_path=str(sweep_dir / "train"),
                       run_name=trial_id)
    if token_budget:
        cfg = cfg.replace(max_steps=max(1, math.ceil(token_budget / tokens_per_step(cfg))))
    if gpus_per_trial:
        # The trial's workers split its GPU share, so several small trials pack onto one GPU.
        if not any(f.name == "gpus_per_worker" for f in dataclasses.fields(cfg)):
            raise ValueError("--gpus-per-trial needs a `gpus_per_worker` field in TrainConfig, honoured by "
                             "cluster/launcher.py (fractional GPUs per Train worker); it has none yet")
        cfg = cfg.replace(use_gpu=True, gpus_per_worker=gpus_per_trial / workers(cfg))
    cfg.validate()
    return cfg


def make_trainable(stage_name: str, base, named_trials: dict[str, dict], sweep_dir: Path,
                   token_budget: int = 0, gpus_per_trial: float = 0.0, keeper_name: str = "",
                   start_timeout_s: str = ""):
    """The function Tune runs per trial. `base` must already have absolute paths. `keeper_name` names the
    sweep's TrialStarts actor (tune/placement.py), told of every start of the trial's workers;
    `start_timeout_s`, the sweep driver's RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, reaches the trial's
    Train controller through this process (Train passes it on from the process that calls fit)."""

    def run_trial(config: dict) -> None:
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        from cluster.launcher import launch
        from tune.placement import RecordStarts
        trial_id = tune.get_context().get_trial_id()
        if start_timeout_s:
            os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = start_timeout_s
        # The Train run is named after the trial: a trial resumed by Tuner.restore picks up its own Train
        # run's last checkpoint instead of starting over.
        cfg = trial_config(base, trial_params(config, named_trials), sweep_dir, trial_id, token_budget,
                           gpus_per_trial)
        from cluster.publish import read_latest
        latest = read_latest(Path(cfg.storage_path) / trial_id)
        if latest is not None and not cfg.resume:
            # A trial rerun by `--resume` after its driver died: Ray Train's own auto-resume needs its snapshot
            # file, which a driver killed right after a checkpoint had not written (measured: the trial started
            # over from step 0). Our `latest` pointer names the last checkpoint that verified.
            cfg = cfg.replace(resume=latest["path"])
        callbacks = [TuneReportCallback()] + ([RecordStarts(keeper_name, trial_id)] if keeper_name else [])
        launch(cfg, load_stage(stage_name), callbacks=callbacks)

    run_trial.__name__ = f"{stage_name}_trial"  # names the trials in Tune's output
    return run_trial
