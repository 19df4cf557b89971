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

    def __init__(self, cfg: TrainConfig, prepared, tokenizer, device: str = "auto", val=None):
        from .shards import steps_per_epoch
        self.cfg, self.prepared, self.tokenizer, self.val = cfg, prepared, tokenizer, val
        use_gpu = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
        self.device = torch.device("cuda" if use_gpu else "cpu") if device == "auto" else torch.device(device)
        self.resolved = Resolved(use_gpu=use_gpu, num_workers=1, zero_stage=0,
                                 dtype="bfloat16" if use_gpu else "float32", backend="none")
        self.micro_batches_per_epoch = steps_per_epoch(prepared, cfg.batch_size, 1)
        self.run_name = cfg.run_name or "local"
        self.checkpoints = Path(cfg.out).parent / f"{Path(cfg.out).name}.checkpoints"
        self.scratch_dir = str(self.checkpoints)
        self.last_checkpoint: Path | None = None
        self.scores: dict[Path, float] = {}  # checkpoint -> --keep-best-by metric

    def print(self, msg: str):
        print(msg, flush=True)

    def restore_dir(self) -> Path | None:
        return Path(self.cfg.resume) if self.cfg.resume else None

    def has_validation(self) -> bool:
        return self.val is not None

    def val_batches(self):
        from .shards import iter_eval_batches
        return iter_eval_batches(self.val, self.cfg.batch_size, 0, 1, self.device)

    def char_counts(self):
        return torch.from_numpy(self.tokenizer.token_char_counts()).to(self.device)

    def best_checkpoint(self) -> Path | None:
        return min(self.scores, key=self.scores.get) if self.scores else None

    def batches(self, start_micro_batch: int):
        from .shards import iter_local_batches
        return iter_local_batches(self.prepared, self.cfg.batch_size, epochs=self.cfg.epochs, seed=self.cfg.seed,
                                  skip_batches=start_micro_batch, device=self.device)

    def report(self, metrics: dict, write_checkpoint=None):
        if write_checkpoint is not None:
            directory = self.checkpoints / f"step_{metrics['step']:08d}"
            write_checkpoint(directory)
            self.last_checkpoint = directory
            self._retain(directory, metrics)

    def _retain(self, newest: Path, metrics: dict):
        """Keep the last checkpoint and the --keep-checkpoints best by --keep-best-by (else the last K),
        as Ray Train's CheckpointConfig does on the Ray path."""
        import shutil
        keep_by, k = self.cfg.keep_best_by, self.cfg.keep_checkpoints
        if keep_by:
            self.scores[newest] = metrics[keep_by]
            ranked = sorted(self.scores, key=self.scores.get)
        else:
            ranked = sorted(p for p in self.checkpoints.iterdir() if p.name.startswith("step_"))[::-1]
        for old in ranked[k:]:
            if old != newest:
                shutil.rmtree(old, ignore_errors=True)
                self.scores.pop(old, None)


def train_local(cfg: TrainConfig, stage, device: str = "auto") -> Path:
    """Train `stage` in this process; returns --out (the exported final checkpoint)."""
    from .launcher import check_resume, default_dirs, export_result, prepare_data, resolve_tokenizer
    from .loop import train
    from .publish import follow_latest
    cfg = follow_latest(cfg)  # a run directory given as --resume/--init/...: the checkpoint `latest` names
    tokenizer, source = resolve_tokenizer(cfg)
    print(f"tokenizer: {tokenizer.vocab_size} tokens, {source}", flush=True)
    stage.check(cfg, tokenizer)
    check_resume(cfg, stage)
    _, cache = default_dirs(cfg)
    prepared, val = prepare_data(cfg, stage, tokenizer, cache)
    ctx = LocalContext(cfg, prepared, tokenizer, device, val)
    train(cfg, stage, ctx)
    best = ctx.best_checkpoint()
    if best is not None:
        print(f"{cfg.out} receives the best checkpoint by {cfg.keep_best_by} ({ctx.scores[best]:.4f}, {best.name})",
              flush=True)
    return export_result(best or ctx.last_checkpoint, Path(cfg.out))
