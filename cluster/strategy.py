"""How a built model is wrapped for data-parallel training: none (one process), DDP, or DeepSpeed ZeRO.

Every strategy has the same interface, with one meaning per method:
    model       what the loop calls forward on (the DDP/DeepSpeed wrapper, compiled when asked)
    module      the plain model underneath (parameters, config, state dict)
    no_sync(last_micro_step)  context for one micro-batch's forward + backward
    backward(term)            add the gradient of `term`, as it is, to the step's global gradient
    step() -> grad norm       apply the step's gradient: clip, optimizer, scheduler, zero the gradient
    save_state / load_state / full_state_dict   optimizer and scheduler state, gathered weights
A step is any number of `backward` calls followed by one `step`; after the last `backward` the gradient is
complete (reduced over ranks), so a caller (a test) may read it before `step` consumes it.

The loop already divided each micro-batch's loss sum by the whole step's weight (all micro-batches, all
ranks), so `backward` only undoes the averaging its all-reduce does.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist


class Plain:
    """Single process, or DDP when a process group with more than one rank exists."""

    def __init__(self, model, optimizer, scheduler, grad_clip: float, accumulation_steps: int,
                 device: torch.device, compile: bool = False):
        self.optimizer, self.scheduler = optimizer, scheduler
        self.grad_clip, self.accumulation_steps = grad_clip, accumulation_steps
        self.module = model
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        else:
            self.model = model
        if compile:
            self.model = torch.compile(self.model)

    def no_sync(self, last_micro_step: bool):
        # Skip DDP's all-reduce on the micro-batches before the last one of an accumulation step.
        if last_micro_step or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, term):
        # DDP averages gradients over ranks; the global objective is their sum.
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        (term * world).backward()

    def step(self) -> torch.Tensor:
        params = [p for p in self.module.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save_state(self, directory: Path, rank: int):
        if rank == 0:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       directory / "optimizer.pt")

    def load_state(self, directory: Path):
        from .safe_load import load_weights_only
        # A file that needs unpickling is refused with a ValueError naming it (a configuration error: not retried)
        state = load_weights_only(directory / "optimizer.pt", map_location="cpu")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self):
        return self.module.state_dict()


class DeepSpeed:
    """DeepSpeed ZeRO 1/2/3 on the process group Ray Train (or torchrun) already set up.

    The client optimizer is a torch AdamW, which avoids JIT-compiling DeepSpeed's fused Adam on machines
    without CUDA. DeepSpeed owns accumulation and clipping, and wants `engine.step()` after every
    micro-batch's backward: it counts micro-batches there and steps the optimizer only at the accumulation
    boundary. So `backward` first makes the previous micro-batch's (non-boundary) engine step, and `step`
    makes the boundary one: the same interface as `Plain`.
    """

    def __init__(self, model, optimizer, scheduler, grad_clip: float, accumulation_steps: int,
                 micro_batch: int, zero_stage: int, dtype: str, compile: bool = False):
        import deepspeed
        if not dist.is_initialized():
            deepspeed.init_distributed()
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": accumulation_steps,
            "gradient_clipping": grad_clip,
            "zero_optimization": {"stage": zero_stage},
            "bf16": {"enabled": dtype == "bfloat16"},
            "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.model = torch.compile(self.engine) if compile else self.engine
        self.module = self.engine.module
        self.zero_stage = zero_stage
        self._engine_step_owed = False  # a backward ran whose engine.step() is still to come

    def no_sync(self, last_micro_step: bool):
        return contextlib.nullcontext()  # DeepSpeed defers the reduction itself

    def backward(self, term):
        if self._engine_step_owed:
            self.engine.step()  # not a boundary: only counts the micro-batch
        # DeepSpeed averages over data-parallel ranks; scale_wrt_gas=False stops its 1/accumulation scaling.
        self.engine.backward(term * dist.get_world_size(), scale_wrt_gas=False)
        self._engine_step_owed = True

    def step(self) -> torch.Tensor:
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(f"step() after fewer than {self.engine.gradient_accumulation_steps()} backward() "
                               f"calls: DeepSpeed would not step the optimizer")
        self.engine.step()  # the boundary: clip, optimizer, scheduler, zero the gradient
        self._engine_step_owed = False
        norm = self.engine.get_global_grad_norm()
        return torch.tensor(float(norm) if norm is not None else float("nan"))

    def save_state(self, directory: Path, rank: int):
        # Every rank writes its own optimizer shard; Ray Train merges the ranks' directories.
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False)

    def load_state(self, directory: Path):
        from .safe_load import weights_only_checkpoints
        state = directory / "deepspeed" / "state"
        # Without these DeepSpeed asserts (no model states) or, missing optimizer shards, only logs a warning
        # and carries on with a fresh optimizer.
        if not (any(state.glob("*model_states.pt")) and any(state.glob("*optim_states.pt"))):
            raise ValueError(f"{state}: no DeepSpeed checkpoint to resume from (model and optimizer states)")
        with weights_only_checkpoints(self.engine):  # DeepSpeed's own load would unpickle code in the files
            self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state", load_module_strict=False)

    def full_state_dict(self):
        if self.zero_stage == 3:
            # Gathers the partitioned parameters; every rank must call it.
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict()
