"""The one training loop every stage runs, inside a Ray Train worker or in a plain process.

A stage supplies the model and `loss(model, batch) -> (loss, metrics)`; a context supplies rank, device,
batches and the place checkpoints and metrics go (`cluster.launcher.RayContext` under Ray Train,
`cluster.local.LocalContext` without Ray). Nothing here touches Ray.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from minimind.checkpoint import save_checkpoint

from .config import Resolved, TrainConfig
from .metrics import MetricsLogger, flops_per_token
from .strategy import DeepSpeed, Plain


@dataclass
class TrainState:
    step: int = 0            # optimizer steps taken
    micro_batches: int = 0   # micro-batches this worker consumed: the data position to resume from
    tokens: int = 0          # tokens processed by all workers
    restored_from: list = field(default_factory=list)  # the step of every checkpoint this run restored
    log: list = field(default_factory=list)  # every logged metrics record so far

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "log"}


def total_steps(cfg: TrainConfig, micro_batches_per_epoch: int) -> int:
    steps = cfg.epochs * micro_batches_per_epoch // cfg.accumulation_steps
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps) if steps else cfg.max_steps
    if steps < 1:
        raise ValueError(f"the data gives {micro_batches_per_epoch} micro-batches per worker per epoch, fewer "
                         f"than one optimizer step of {cfg.accumulation_steps}; lower --batch-size or "
                         f"--accumulation-steps, or add data")
    return steps


def lr_schedule(total: int, warmup: float, min_ratio: float):
    """Linear warmup, then cosine decay to min_ratio * lr (MiniMind decays to lr/10, without warmup)."""
    warm = int(warmup * total) if warmup < 1 else int(warmup)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def build_strategy(cfg: TrainConfig, res: Resolved, model, optimizer, scheduler, device):
    if res.zero_stage:
        return DeepSpeed(model, optimizer, scheduler, cfg.grad_clip, cfg.accumulation_steps, cfg.batch_size,
                         res.zero_stage, res.dtype)
    return Plain(model, optimizer, scheduler, cfg.grad_clip, cfg.accumulation_steps, device)


def autocast(device: torch.device, dtype: str):
    if device.type == "cuda" and dtype != "float32":
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


def mean_across_workers(values: dict[str, torch.Tensor]) -> dict[str, float]:
    keys = sorted(values)
    stacked = torch.stack([values[k].float() for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(keys, stacked.tolist()))


def write_checkpoint(directory: Path, stage, strategy, state: TrainState, tokenizer, rank: int):
    """Everything a restore needs: HF model directory, optimizer/scheduler, step and data position, the log."""
    weights = strategy.full_state_dict()  # collective under ZeRO-3: every rank calls it
    directory.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        model = stage.export(strategy.module, weights)
        save_checkpoint(model, directory / "model", tokenizer=tokenizer)
        stage.save_extra(strategy.module, directory / "model")
        (directory / "trainer_state.json").write_text(json.dumps(state.to_json(), indent=2))
        with open(directory / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in state.log)
    strategy.save_state(directory, rank)


def read_trainer_state(directory: Path) -> TrainState:
    state = TrainState(**json.loads((directory / "trainer_state.json").read_text()))
    log_path = directory / "metrics.jsonl"
    if log_path.is_file():
        state.log = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    return state


def train(cfg: TrainConfig, stage, ctx) -> TrainState:
    """Run `stage` to completion under `ctx`. Returns the final state (the log holds every logged step)."""
    device, res = ctx.device, ctx.resolved
    torch.manual_seed(cfg.seed)
    model = stage.build_model(cfg).to(device)
    stage.setup(cfg, device)
    restore = ctx.restore_dir()
    if restore is not None:
        stage.restore(model, restore / "model")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    total = total_steps(cfg, ctx.micro_batches_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(total, cfg.warmup, cfg.min_lr_ratio))
    strategy = build_strategy(cfg, res, model, optimizer, scheduler, device)
    state = TrainState()
    if restore is not None:
        strategy.load_state(restore)
        state = read_trainer_state(restore)
        state.restored_from.append(state.step)
        ctx.print(f"restored {restore} at step {state.step} (micro-batch {state.micro_batches})")
    if cfg.compile:
        strategy.model = torch.compile(strategy.model)

    tokens_per_micro = cfg.batch_size * cfg.max_seq_len * ctx.world_size
    logger = MetricsLogger(cfg, ctx, total, flops_per_token(strategy.module.config, cfg.max_seq_len))
    batches = ctx.batches(state.micro_batches)
    sums: dict[str, torch.Tensor] = {}
    window_start, window_tokens, window_micro = time.perf_counter(), 0, 0
    while state.step < total:
        for i in range(cfg.accumulation_steps):
            batch = next(batches)
            with strategy.no_sync(i == cfg.accumulation_steps - 1), autocast(device, res.dtype):
                loss, metrics = stage.loss(strategy.model, batch)
            strategy.backward(loss)
            strategy.micro_step()
            state.micro_batches += 1
            window_micro += 1
            # Accumulate on the device: no host sync until a log step.
            for k, v in {"loss": loss.detach(), **metrics}.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
        grad_norm = strategy.step()
        state.step += 1
        state.tokens += tokens_per_micro * cfg.accumulation_steps
        window_tokens += tokens_per_micro * cfg.accumulation_steps
        last = state.step == total
        log_now = last or state.step % cfg.log_interval == 0
        save_now = last or bool(cfg.save_interval and state.step % cfg.save_interval == 0)
        if log_now or save_now:
            means = mean_across_workers({**{k: v / window_micro for k, v in sums.items()},
                                         "grad_norm": grad_norm.to(device)})
            if device.type == "cuda":
                torch.cuda.synchronize()
            rate = window_tokens / (time.perf_counter() - window_start)
            record = logger.record(state, means, scheduler.get_last_lr()[0], rate)
            state.log.append(record)
            sums, window_start, window_tokens, window_micro = {}, time.perf_counter(), 0, 0
            ctx.report(record, (lambda d: write_checkpoint(d, stage, strategy, state, ctx.tokenizer, ctx.rank))
                       if save_now else None)
    logger.close()
    return state
