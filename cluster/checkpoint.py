"""A training checkpoint as one container of stateful parts, each saved and restored by its own component.

    <checkpoint>/
        model/               the model for inference: an HF directory (config.json, model.safetensors, the
                             tokenizer); a LoRA model's adapters merged in, and the adapter alone beside it
                             (adapter_config.json + adapter_model.safetensors, PEFT's format)
        trainer_state.json   step, data position (micro-batches this worker consumed), tokens, restores
        metrics.jsonl        every logged record so far
        optimizer.pt         optimizer + LR scheduler (DDP, one process), or
        deepspeed/state/     ZeRO's per-rank model and optimizer shards

`Checkpointer(model=..., optimizer=..., train_state=...)` saves its parts in order and restores them by name, as
torchtitan's CheckpointManager does over Stateful objects: the loop knows `save(directory, rank)` and
`load(directory, *names)`, nothing of the files. A part is anything with `save(directory, rank)` (every rank
calls it: gathering ZeRO-3 weights is a collective) and `load(directory)`.

The inference export (the HF directory, the LoRA merge and the adapter) is the model part's job and depends
only on the model, so no stage takes part in saving or restoring: a stage is a recipe (build the model and its
frozen helpers, turn a batch into a loss) and holds no state of the run.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from minimind.checkpoint import WEIGHTS, load_weights_into, read_weights, save_checkpoint
from minimind.lora import (ADAPTER_WEIGHTS, adapter_layout, apply_lora, load_lora_state_dict, merge_lora,
                           save_adapter)
from minimind.model import MiniMind

STATE_FILE = "trainer_state.json"
LOG_FILE = "metrics.jsonl"
MODEL_DIR = "model"


class Part(Protocol):
    def save(self, directory: Path, rank: int) -> None: ...
    def load(self, directory: Path) -> None: ...


@dataclass
class TrainState:
    """The loop's counters: a part of the checkpoint like the model and the optimizer."""
    step: int = 0            # optimizer steps taken
    micro_batches: int = 0   # micro-batches this worker consumed: the data position to resume from
    tokens: int = 0          # tokens processed by all workers
    restored_from: list = field(default_factory=list)  # the step of every checkpoint this run restored
    log: list = field(default_factory=list)  # every logged metrics record so far

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "log"}

    def save(self, directory: Path, rank: int) -> None:
        if rank == 0:
            (directory / STATE_FILE).write_text(json.dumps(self.to_json(), indent=2))
            with open(directory / LOG_FILE, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.log)

    def load(self, directory: Path) -> None:
        saved = json.loads((directory / STATE_FILE).read_text())
        log_path = directory / LOG_FILE
        log = [json.loads(line) for line in log_path.read_text().splitlines() if line] if log_path.is_file() else []
        for name, value in {**saved, "log": log}.items():
            setattr(self, name, value)


def inference_model(module: MiniMind, weights: dict[str, torch.Tensor]) -> MiniMind:
    """A plain fp32 CPU MiniMind holding `weights` (the full state dict of `module`, gathered), with any
    LoRA adapters merged. Built afresh from the config, so it works when `module`'s own parameters are
    ZeRO-3 partitions."""
    with torch.random.fork_rng(devices=[]):  # building initialises weights: leave the training RNG as it was
        model = MiniMind(module.config)
        layout = adapter_layout(module)
        if layout is not None:
            rank, alpha, targets = layout
            apply_lora(model, rank, alpha, targets)
    model.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in weights.items()})
    return model


class ModelWeights:
    """The model part: written as model/ for inference, read back into the model being trained.

    gather: returns the full state dict (the strategy's `full_state_dict`; a collective under ZeRO-3).
    base: the checkpoint a LoRA run started from, recorded in its adapter config.
    """

    def __init__(self, module: MiniMind, gather: Callable[[], dict] | None = None, tokenizer=None, base: str = ""):
        self.module, self.tokenizer, self.base = module, tokenizer, base
        self.gather = gather or module.state_dict

    def save(self, directory: Path, rank: int) -> None:
        weights = self.gather()  # every rank calls it
        if rank != 0:
            return
        model = inference_model(self.module, weights)
        target = directory / MODEL_DIR
        if adapter_layout(model) is None:
            save_checkpoint(model, target, tokenizer=self.tokenizer)
            return
        save_checkpoint(merge_lora(copy.deepcopy(model)), target, tokenizer=self.tokenizer)
        save_adapter(model, target, {"base": self.base} if self.base else None)

    def load(self, directory: Path) -> None:
        """Into the plain model, before a strategy wraps it (ZeRO-3 partitions the parameters at wrap time).
        A LoRA model restores its adapters over the frozen base it was built from."""
        target = directory / MODEL_DIR
        if adapter_layout(self.module) is not None:
            load_lora_state_dict(self.module, read_weights(target / ADAPTER_WEIGHTS), target / ADAPTER_WEIGHTS)
        else:
            load_weights_into(self.module, read_weights(target / WEIGHTS), target / WEIGHTS)


class OptimizerState:
    """Optimizer and LR scheduler, in the strategy's own format (optimizer.pt, or DeepSpeed's shards)."""

    def __init__(self, strategy):
        self.strategy = strategy

    def save(self, directory: Path, rank: int) -> None:
        self.strategy.save_state(directory, rank)

    def load(self, directory: Path) -> None:
        self.strategy.load_state(directory)


class Checkpointer:
    """The parts of a run that one checkpoint holds, saved in the order given and restored by name."""

    def __init__(self, **parts: Part):
        self.parts = parts

    def save(self, directory: Path, rank: int) -> None:
        """Every rank calls it; rank 0 writes the shared files, each rank its own shards."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for part in self.parts.values():
            part.save(directory, rank)

    def load(self, directory: Path, *names: str) -> None:
        """Restore the parts named (all when none are), in the order they were given."""
        unknown = set(names) - set(self.parts)
        if unknown:
            raise KeyError(f"no checkpoint part named {sorted(unknown)}; parts: {list(self.parts)}")
        for name, part in self.parts.items():
            if not names or name in names:
                part.load(Path(directory))

