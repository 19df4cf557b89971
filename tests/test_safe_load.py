"""Resuming never unpickles code: a real ZeRO checkpoint with one of DeepSpeed's files replaced by a pickle
whose payload would create a marker file is refused, and nothing runs; an untouched one resumes exactly.

DeepSpeed runs in this process on a one-rank gloo group (a FileStore: no port). Its checkpoint engine calls
`torch.load(weights_only=False)`; cluster.safe_load makes the strategy's resume load weights-only.
"""
import os
import pickle

import pytest
import torch
import torch.distributed as dist

from cluster.strategy import DeepSpeed, Plain
from minimind.config import PRESETS
from minimind.model import MiniMind

pytestmark = pytest.mark.timeout(300)


class Payload:
    """Unpickling this runs `touch marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def gloo(tmp_path_factory):
    assert not dist.is_initialized()
    store = tmp_path_factory.mktemp("gloo") / "store"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1"}.items():
            mp.setenv(key, value)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        yield
        dist.destroy_process_group()


def build(zero_stage: int, seed: int = 0) -> DeepSpeed:
    torch.manual_seed(seed)
    model = MiniMind(PRESETS["tiny"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    return DeepSpeed(model, optimizer, scheduler, grad_clip=1.0, accumulation_steps=1, micro_batch=2,
                     zero_stage=zero_stage, dtype="float32")


def train_and_save(zero_stage, directory) -> DeepSpeed:
    strategy = build(zero_stage)
    ids = torch.randint(0, PRESETS["tiny"].vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        loss = strategy.model(ids).logits.float().logsumexp(-1).mean()
        strategy.backward(loss)
        strategy.step()
    strategy.save_state(directory, rank=0)
    return strategy


def tensors(state) -> list[torch.Tensor]:
    """Every tensor in a nested state dict, in a fixed order."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in tensors(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in tensors(item)]
    return []


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_untouched_zero_checkpoint_resumes_to_identical_state(gloo, tmp_path, zero_stage):
    saved = train_and_save(zero_stage, tmp_path)
    resumed = build(zero_stage, seed=1)  # different initial weights: the load must replace them
    resumed.load_state(tmp_path)
    before, after = tensors(saved.optimizer.state_dict()), tensors(resumed.optimizer.state_dict())
    assert len(before) == len(after) > 0
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert resumed.scheduler.state_dict() == saved.scheduler.state_dict()
    assert resumed.engine.global_steps == saved.engine.global_steps == 2
    full = resumed.full_state_dict()
    assert all(torch.equal(full[k], v) for k, v in saved.full_state_dict().items())


@pytest.mark.parametrize("planted", ["optim_states", "model_states"])
def test_planted_pickle_in_a_zero_checkpoint_is_refused_and_never_runs(gloo, tmp_path, planted):
    train_and_save(2, tmp_path)
    [target] = (tmp_path / "deepspeed" / "state").glob(f"*{planted}.pt")
    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": Payload(marker)}, target)  # a valid .pt archive, as an attacker writes
    with pytest.raises(ValueError, match=rf"{target.name}: refused to load: it names posix\.system"):
        build(2).load_state(tmp_path)
    assert not marker.exists()


def test_a_bare_pickle_is_refused_too(gloo, tmp_path):
    train_and_save(2, tmp_path)
    [target] = (tmp_path / "deepspeed" / "state").glob("*optim_states.pt")
    marker = tmp_path / "pwned"
    target.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match=f"{target.name}: refused to load"):
        build(2).load_state(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("missing", ["*optim_states.pt", "*"])
def test_missing_zero_state_is_an_error_not_a_fresh_start(gloo, tmp_path, missing):
    train_and_save(2, tmp_path)
    for path in (tmp_path / "deepspeed" / "state").glob(missing):
        path.unlink()
    with pytest.raises(ValueError, match="no DeepSpeed checkpoint to resume from"):
        build(2).load_state(tmp_path)


def test_plain_resume_loads_weights_only(tmp_path):
    model = MiniMind(PRESETS["tiny"])
    optimizer = torch.optim.AdamW(model.parameters())
    strategy = Plain(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), 1.0, 1,
                     torch.device("cpu"))
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Payload(marker), "scheduler": {}}, tmp_path / "optimizer.pt")
    # A ValueError naming the file: the launcher's fatal class (no retry), like the ZeRO path's refusal.
    with pytest.raises(ValueError, match=r"optimizer\.pt: refused to load: it names posix\.system"):
        strategy.load_state(tmp_path)
    assert not marker.exists()
