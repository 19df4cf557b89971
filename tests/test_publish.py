"""The write-verify-publish protocol of `cluster.publish`: a checkpoint is verified before it leaves the
worker and again in storage before the `latest` pointer moves to it, so a crash mid-write, a short write, a
missing optimizer state, a torn trainer_state.json or a copy damaged in storage never leaves `latest` at a
half-written checkpoint; and a non-zero rank may write nothing or shards only, while rank 0 must write the model."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch


# ---------------------------------------------------------------------------------------------------------
# Write, verify, then publish: a crash mid-write never moves the pointer.

@pytest.fixture(scope="module")
def tiny_run():
    """A tiny-preset model and its strategy on CPU: what `cluster.checkpoint.Checkpointer` saves."""
    from cluster.strategy import Plain
    from minimind.config import get_preset
    from minimind.model import MiniMind
    model = MiniMind(get_preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return Plain(model, opt, sched, 1.0, 1, torch.device("cpu"))


def commit(run_dir: Path, name: str, write, rank: int = 0) -> Path:
    """What the launcher does for one checkpoint, with Ray's upload replaced by a copy into storage."""
    import shutil

    from cluster.publish import publish_latest, write_verified
    with tempfile.TemporaryDirectory() as d:
        write_verified(Path(d), write, rank)          # raises before anything leaves the worker
        dest = run_dir / name
        shutil.copytree(d, dest)                     # stands in for ray.train.report's upload
    publish_latest(run_dir, dest)                    # verifies the stored copy, then swaps the pointer
    return dest


def test_crash_mid_write_keeps_pointer_at_last_good_checkpoint(tiny_run, tmp_path):
    from cluster.checkpoint import Checkpointer, ModelWeights, OptimizerState, TrainState
    from cluster.publish import read_latest, verify_checkpoint
    from minimind.checkpoint import load_model
    strategy = tiny_run
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def good(step):
        parts = Checkpointer(model=ModelWeights(strategy.module, strategy.full_state_dict),
                             optimizer=OptimizerState(strategy), train_state=TrainState(step=step))
        return lambda d: parts.save(d, rank=0)

    first = commit(run_dir, "checkpoint_000000", good(5))
    assert read_latest(run_dir) == {"path": str(first), "step": 5}

    def crash_halfway(d: Path):
        good(10)(d)
        (d / "optimizer.pt").unlink()                 # the process died before the optimizer state
        raise RuntimeError("killed while writing")

    def truncated_weights(d: Path):
        good(10)(d)
        w = d / "model" / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])   # a short write that did not raise

    def missing_optimizer(d: Path):
        good(10)(d)
        (d / "optimizer.pt").unlink()

    def torn_state(d: Path):
        good(10)(d)
        (d / "trainer_state.json").write_text('{"step": 1')

    with pytest.raises(RuntimeError, match="killed"):
        commit(run_dir, "checkpoint_000001", crash_halfway)
    refusals = [(truncated_weights, r"model/model\.safetensors: .*truncated"),
                (missing_optimizer, r"incomplete: missing optimizer\.pt or deepspeed/"),
                (torn_state, r"trainer_state\.json: not valid JSON")]
    for i, (bad, message) in enumerate(refusals, start=2):
        with pytest.raises(ValueError, match=message):
            commit(run_dir, f"checkpoint_00000{i}", bad)
        assert not (run_dir / f"checkpoint_00000{i}").exists()
    assert read_latest(run_dir) == {"path": str(first), "step": 5}

    # A stored copy damaged after the upload (a storage hiccup) is also refused at publish time.
    from cluster.publish import publish_latest
    import shutil
    broken = run_dir / "checkpoint_000009"
    shutil.copytree(first, broken)
    (broken / "model" / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(ValueError, match="truncated"):
        publish_latest(run_dir, broken)
    assert read_latest(run_dir)["path"] == str(first)

    second = commit(run_dir, "checkpoint_000010", good(10))
    assert read_latest(run_dir) == {"path": str(second), "step": 10}
    verify_checkpoint(second)
    load_model(second / "model")
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")], "temp pointer files left behind"


def test_non_zero_rank_may_write_nothing_or_shards_only(tmp_path):
    from cluster.publish import write_verified
    assert write_verified(tmp_path / "a", lambda d: d.mkdir(parents=True, exist_ok=True), rank=1) is False
    with pytest.raises(ValueError, match="model"):
        write_verified(tmp_path / "b", lambda d: d.mkdir(parents=True, exist_ok=True), rank=0)
