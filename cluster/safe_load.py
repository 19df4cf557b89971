"""Loading DeepSpeed checkpoint files without unpickling code.

A `.pt` file is a pickle: `torch.load(weights_only=False)` runs whatever callable it names, so a crafted file in a
`--resume` directory (or a shared storage path) runs code as the training user. DeepSpeed 0.19.8 reads every
file of `engine.load_checkpoint` through `engine.checkpoint_engine.load`, which calls
`torch.load(weights_only=False)` (deepspeed/runtime/checkpoint_engine/torch_checkpoint_engine.py).
`weights_only_checkpoints(engine)` swaps that one method, on that engine and for the duration of the load, for a
`torch.load(weights_only=True)` that also accepts the three plain DeepSpeed classes its own files hold
(measured on ZeRO 1/2/3 checkpoints in float32 and bfloat16: the rest is tensors, dicts, lists and numbers).
Those three are rebuilt from their fields only (a dataclass, an object's attributes, an int enum looked up by
value): nothing a file names gets called. The other `torch.load(weights_only=False)` calls in DeepSpeed
(universal checkpoints, zero_to_fp32, ds_to_universal) are not on our resume path.
"""
from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import torch


def deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # the optimizer state's (unused) loss scaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO 1/2: where each parameter's slice lies

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path, map_location=None, safe_globals=()):
    """`torch.load(path, weights_only=True)`, accepting `safe_globals` too; a file that needs anything else is
    refused with a ValueError naming the file and what it holds."""
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            named = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)) or "code"
        except Exception:  # not a zip archive (a legacy or bare pickle): torch cannot list what it names
            named = "code"
        raise ValueError(f"{path}: refused to load: it names {named}, which a weights-only load does not run "
                         f"(a pickled checkpoint can execute code; only tensors and DeepSpeed's own state are "
                         f"accepted)") from e


@contextlib.contextmanager
def weights_only_checkpoints(engine):
    """While inside, `engine` (a DeepSpeedEngine) reads its checkpoint files weights-only."""
    checkpoint_engine = engine.checkpoint_engine
    allowed = deepspeed_safe_globals()

    def load(path: str, map_location=None):
        return load_weights_only(Path(path), map_location, allowed)

    checkpoint_engine.load = load  # an instance attribute: shadows the class's method on this object only
    try:
        yield
    finally:
        del checkpoint_engine.load
