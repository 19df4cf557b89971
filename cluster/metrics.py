"""What users see while a run trains: a progress line with ETA, MFU on GPU, and the run loggers.

`tokens` and tokens/s count the real (non-padding) tokens the model processed, both sequences of a DPO row
included; `padding_fraction` says what share of the input slots was padding. MFU uses those tokens and
FLOPs per token = 6 * N_active + 12 * layers * hidden * seq_len (forward + backward of the dense weights, plus
attention scores and values), over the GPU's dense bf16 peak.
"""
from __future__ import annotations

import time

import torch

from minimind.config import ModelConfig

# Dense bf16 peak FLOP/s by device name fragment (vendor figures).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "4090": 165e12, "A10": 125e12, "L4": 121e12}


def active_parameters(cfg: ModelConfig) -> int:
    from minimind.model import MiniMind
    with torch.device("meta"):
        total = MiniMind(cfg).num_parameters()
    if not cfg.is_moe:
        return total
    expert = 3 * cfg.hidden_size * cfg.intermediate_size
    return total - cfg.num_layers * (cfg.num_experts - cfg.num_experts_per_tok) * expert


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 6 * active_parameters(cfg) + 12 * cfg.num_layers * cfg.hidden_size * seq_len


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def format_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class MetricsLogger:
    def __init__(self, cfg, ctx, total_steps: int, flops_token: float):
        self.ctx, self.total, self.flops_token = ctx, total_steps, flops_token
        self.peak = peak_flops(ctx.device)
        self.start = time.perf_counter()
        self.start_step = None  # the step the ETA's clock started from (a restored run starts late)
        self.loggers = None
        if cfg.loggers and ctx.rank == 0:
            import dataclasses
            from pathlib import Path

            from .loggers import RunLoggers
            directory = Path(cfg.out).parent / "logs" / ctx.run_name
            self.loggers = RunLoggers(cfg.loggers, ctx.run_name, dataclasses.asdict(cfg), directory,
                                      project=cfg.wandb_project)

    def record(self, state, means: dict, lr: float, tokens_per_s: float) -> dict:
        if self.start_step is None:
            # Steps since this logger started, not since the previous log line: the first ETA used one
            # step's worth of the clock for log_interval steps and came out that many times too long.
            self.start_step = state.restored_from[-1] if state.restored_from else 0
        rec = {"step": state.step, "tokens": state.tokens, **{k: round(v, 6) for k, v in means.items()},
               "lr": lr, "tokens_per_s": round(tokens_per_s, 1)}
        if self.peak:
            rec["mfu"] = round(tokens_per_s * self.flops_token / (self.peak * self.ctx.world_size), 4)
        if self.ctx.device.type == "cuda":
            rec["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(self.ctx.device) / 2 ** 30, 2)
        elapsed = time.perf_counter() - self.start
        done = state.step - self.start_step
        eta = elapsed / max(done, 1) * (self.total - state.step)
        if self.ctx.rank == 0:
            width = 20
            filled = int(width * state.step / self.total)
            extra = "".join(f" | {k} {rec[k]:.4g}" for k in means if k not in ("loss", "grad_norm"))
            self.ctx.print(f"[{'#' * filled}{'.' * (width - filled)}] {state.step}/{self.total} "
                           f"loss {rec['loss']:.4f} | lr {lr:.2e} | gnorm {rec['grad_norm']:.3f}{extra} | "
                           f"{tokens_per_s:,.0f} tok/s" + (f" | MFU {rec['mfu']:.1%}" if "mfu" in rec else "")
                           + f" | ETA {format_seconds(eta)}")
            if self.loggers is not None:
                self.loggers.log(rec, step=state.step)
        return rec

    def close(self):
        if self.loggers is not None:
            self.loggers.close()
