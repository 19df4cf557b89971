"""The one training loop every stage runs, inside a Ray Train worker or in a plain process.

A stage supplies the model, its frozen helpers (a reference or teacher model and the loss's settings) and
`loss(model, batch, helpers) -> StageLoss`; a context supplies rank, device, batches and the place
checkpoints and metrics go (`cluster.launcher.RayContext` under Ray Train, `cluster.local.LocalContext`
without Ray); `cluster.checkpoint.Checkpointer` saves and restores the run's state. Nothing here touches Ray.
"""
from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.distributed as dist

from .checkpoint import Checkpointer, ModelWeights, OptimizerState, TrainState
from .config import Resolved, TrainConfig
from .metrics import MetricsLogger, flops_per_token
from .strategy import DeepSpeed, Plain


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
                         res.zero_stage, res.dtype, compile=cfg.compile)
    return Plain(model, optimizer, scheduler, cfg.grad_clip, cfg.accumulation_steps, device, compile=cfg.compile)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear weights, the tied embedding) only, not on RMSNorm gains or biases,
    as nanoGPT does: decaying a norm's gain towards 0 only fights the normalisation."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def autocast(device: torch.device, dtype: str):
    if device.type == "cuda" and dtype != "float32":
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def mean_across_workers(values: dict[str, torch.Tensor]) -> dict[str, float]:
    keys = sorted(values)
    stacked = torch.stack([values[k].float() for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(keys, stacked.tolist()))


def token_counts(batch: dict, seq_len: int) -> torch.Tensor:
    """[real tokens, input slots] the model processes for this micro-batch (float64, on the batch's device):
    each row feeds seq_len positions (both sequences of a DPO row), of which `length` (capped) are real
    tokens and the rest padding."""
    sequences = 2 if "chosen_ids" in batch else 1
    length = batch["length"]
    real = length.clamp(max=seq_len * sequences).sum(dtype=torch.float64)
    return torch.stack([real, torch.full_like(real, float(length.shape[0] * seq_len * sequences))])


def validate(stage, model, batches, char_counts, device, dtype, pad_batch=None, pad_to_max=False,
             helpers=None) -> dict:
    """Score every validation row this worker holds and reduce exactly over workers: val_loss is the sum of
    the rows' losses over the sum of their weights (nats per weighted token, or per pair for DPO), and
    val_bits_per_char = nats / ln 2 / characters of the scored text, where the stage defines it.

    Under ZeRO-3 every forward is a collective, so `pad_to_max` runs zero-weight forwards on `pad_batch` until
    every worker has run as many as the busiest one."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # nats, weight, chars, rows with chars undefined
    count = 0
    with torch.no_grad(), autocast(device, dtype):
        for batch in batches:
            out = stage.loss(model, batch, helpers)
            chars = stage.scored_chars(batch, char_counts) if char_counts is not None else None
            sums += torch.stack([out.total.double().cpu(), stage.weight(batch).double().cpu(),
                                 (chars.double().cpu() if chars is not None else torch.tensor(0.0, dtype=torch.float64)),
                                 torch.tensor(float(chars is None), dtype=torch.float64)])
            count += 1
        if pad_to_max and dist.is_initialized():
            most = torch.tensor([count])
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            for _ in range(int(most) - count):
                stage.loss(model, pad_batch, helpers)
    model.train(was_training)
    nats, weight, chars, undefined = all_reduce_sum(sums).tolist()
    if weight == 0:
        return {}
    metrics = {"val_loss": nats / weight}
    if chars > 0 and undefined == 0:
        metrics["val_bits_per_char"] = nats / math.log(2) / chars
    return metrics


def accumulate_gradients(stage, strategy, micro: list[dict], seq_len: int, world: int, device, dtype,
                         helpers=None):
    """Backward over one optimizer step's micro-batches, so that the gradient is that of
    sum(loss sums) / sum(weights) over every micro-batch of every rank (plus the per-batch terms averaged).

    Leaves `strategy.step()` to the caller, so a caller (a test) can read the reduced gradient before the
    optimizer consumes it. Returns (global [weight, real tokens, slots],
    local loss sum, summed per-micro-batch metrics), all still on the device: no host sync here."""
    counts = torch.stack([torch.cat([stage.weight(b).double().reshape(1).to(device),
                                     token_counts(b, seq_len).to(device)]) for b in micro]).sum(0)
    # The one collective of the step outside backward, and its one host sync (gloo reduces on the CPU).
    counts = all_reduce_sum(counts.cpu())
    step_weight = max(float(counts[0]), 1e-8)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    metrics: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro):
        with strategy.no_sync(i == len(micro) - 1), autocast(device, dtype):
            out = stage.loss(strategy.model, batch, helpers)
            term = out.total / step_weight + out.per_batch / (len(micro) * world)
        strategy.backward(term)
        loss_sum = loss_sum + out.total.detach().double()
        for k, v in out.metrics.items():
            metrics[k] = metrics.get(k, 0) + v.detach().float()
    return counts, loss_sum, metrics


def train(cfg: TrainConfig, stage, ctx) -> TrainState:
    """Run `stage` to completion under `ctx`. Returns the final state (the log holds every logged step).

    Each optimizer step sees sum(loss sums) / sum(weights) over the whole global batch: the step's micro-batches
    are drawn first, their weights (stage.weight) summed and all-reduced once, and each micro-batch's loss sum
    is divided by that one number before backward. Token counts ride along in the same all-reduce.
    """
    device, res = ctx.device, ctx.resolved
    torch.manual_seed(cfg.seed)
    model = stage.build_model(cfg).to(device)
    helpers = stage.helpers(cfg, device)
    restore = ctx.restore_dir()
    if restore is not None:
        ModelWeights(model).load(restore)  # before a strategy wraps the model (ZeRO-3 partitions it)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=device.type == "cuda")
    total = total_steps(cfg, ctx.micro_batches_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(total, cfg.warmup, cfg.min_lr_ratio))
    strategy = build_strategy(cfg, res, model, optimizer, scheduler, device)
    state = TrainState()
    checkpoint = Checkpointer(
        model=ModelWeights(strategy.module, strategy.full_state_dict, ctx.tokenizer, base=cfg.init),
        optimizer=OptimizerState(strategy), train_state=state)
    if restore is not None:
        checkpoint.load(restore, "optimizer", "train_state")
        state.restored_from.append(state.step)
        ctx.print(f"restored {restore} at step {state.step} (micro-batch {state.micro_batches})")

    world = ctx.world_size
    logger = MetricsLogger(cfg, ctx, total, flops_per_token(strategy.module.config, cfg.max_seq_len))
    batches = ctx.batches(state.micro_batches)
    validating = ctx.has_validation()
    char_counts = ctx.char_counts() if validating else None
    # Window sums since the last log line: the loss sum (local), and the global weight/token counts.
    sums: dict[str, torch.Tensor] = {}
    window = torch.zeros(3, dtype=torch.float64)  # weight, real tokens, slots (global)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    window_start, window_micro = time.perf_counter(), 0
    while state.step < total:
        micro = [next(batches) for _ in range(cfg.accumulation_steps)]
        counts, step_loss, step_metrics = accumulate_gradients(stage, strategy, micro, cfg.max_seq_len, world,
                                                               device, res.dtype, helpers)
        state.micro_batches += len(micro)
        window_micro += len(micro)
        loss_sum = loss_sum + step_loss
        for k, v in step_metrics.items():
            sums[k] = sums.get(k, 0) + v
        grad_norm = strategy.step()
        state.step += 1
        state.tokens += int(counts[1])
        window += counts
        last = state.step == total
        eval_now = validating and (last or bool(cfg.eval_interval and state.step % cfg.eval_interval == 0))
        log_now = last or eval_now or state.step % cfg.log_interval == 0
        save_now = last or (eval_now if cfg.keep_best_by else
                            bool(cfg.save_interval and state.step % cfg.save_interval == 0))
        if log_now or save_now:
            means = mean_across_workers({**{k: v / window_micro for k, v in sums.items()},
                                         "grad_norm": grad_norm.to(device)})
            means["loss"] = float(all_reduce_sum(loss_sum.reshape(1).clone())[0]) / max(float(window[0]), 1e-8)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - window_start
            extra = {"padding_fraction": 1 - float(window[1]) / max(float(window[2]), 1.0)}
            if eval_now:
                eval_model = strategy.model if res.zero_stage == 3 else strategy.module
                extra.update(validate(stage, eval_model, ctx.val_batches(), char_counts, device, res.dtype,
                                      pad_batch=micro[0], pad_to_max=res.zero_stage == 3, helpers=helpers))
            record = logger.record(state, {**means, **extra}, scheduler.get_last_lr()[0],
                                   float(window[1]) / elapsed)
            state.log.append(record)
            sums, window_micro, window_start = {}, 0, time.perf_counter()
            window.zero_()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            ctx.report(record, (lambda d: checkpoint.save(d, ctx.rank)) if save_now else None)
    logger.close()
    return state
