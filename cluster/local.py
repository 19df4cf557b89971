"""Running the loop in this process, without Ray Train: for debugging, profiling and baselines.

The data is the same prepared Parquet cache the Ray path reads (tokenising it uses Ray Data once; a
cache already on disk is reused without it), read with pyarrow in the order worker 0 of 1 would see.
Checkpoints go to OUT.checkpoints/step_N (beside OUT); the final one is exported to OUT like the Ray path's.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import Resolved, TrainConfig


class LocalContext:
    rank, world_size, local_rank = 0, 1, 0

    def __init__(self, cfg: TrainConfig, prepared, tokenizer, device: str = "auto"):
        from .data import steps_per_epoch
        self.cfg, self.prepared, self.tokenizer = cfg, prepared, tokenizer
        use_gpu = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
        self.device = torch.device("cuda" if use_gpu else "cpu") if device == "auto" else torch.device(device)
        self.resolved = Resolved(use_gpu=use_gpu, num_workers=1, zero_stage=0,
                                 dtype="bfloat16" if use_gpu else "float32", backend="none")
        self.micro_batches_per_epoch = steps_per_epoch(prepared, cfg.batch_size, 1)
        self.run_name = cfg.run_name or "local"
        self.checkpoints = Path(cfg.out).parent / f"{Path(cfg.out).name}.checkpoints"
        self.scratch_dir = str(self.checkpoints)
        self.last_checkpoint: Path | None = None

    def print(self, msg: str):
        print(msg, flush=True)

    def restore_dir(self) -> Path | None:
        return Path(self.cfg.resume) if self.cfg.resume else None

    def batches(self, start_micro_batch: int):
        from .data import iter_local_batches
        return iter_local_batches(self.prepared, self.cfg.batch_size, epochs=self.cfg.epochs, seed=self.cfg.seed,
                                  skip_batches=start_micro_batch, device=self.device)

    def report(self, metrics: dict, write_checkpoint=None):
        if write_checkpoint is not None:
            directory = self.checkpoints / f"step_{metrics['step']:08d}"
            write_checkpoint(directory)
            self.last_checkpoint = directory


def train_local(cfg: TrainConfig, stage, device: str = "auto") -> Path:
    """Train `stage` in this process; returns --out (the exported final checkpoint)."""
    from .data import prepare_dataset
    from .launcher import data_spec, default_dirs, export_result, resolve_tokenizer
    from .loop import train
    tokenizer = resolve_tokenizer(cfg)
    stage.check(cfg, tokenizer)
    _, cache = default_dirs(cfg)
    prepared = prepare_dataset(data_spec(cfg, stage), tokenizer, cache)
    ctx = LocalContext(cfg, prepared, tokenizer, device)
    train(cfg, stage, ctx)
    return export_result(ctx.last_checkpoint, Path(cfg.out))
