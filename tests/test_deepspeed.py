"""DeepSpeed ZeRO inside Ray Train workers, on CPU (gloo): the same loop and stage, sharded optimizer state.

DeepSpeed JIT-compiles its shared-memory comm op on first use (~30 s on 2 cores, cached afterwards).
"""
import json
from pathlib import Path

import pytest

from cluster.config import TrainConfig
from cluster.launcher import launch
from minimind.checkpoint import load_model
from stages.pretrain import Pretrain

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


# ZeRO-2 trains, checkpoints its shards and restores them in tests/test_resume.py (killed worker, compared
# with DDP step by step); ZeRO-3, which also partitions the weights, here.
@pytest.mark.parametrize("zero_stage", [3])
def test_zero_trains_and_checkpoints(ray_cluster, project_tokenizer, tmp_path, zero_stage):
    cfg = TrainConfig(preset="tiny", tokenizer=str(project_tokenizer), num_workers=2, zero_stage=zero_stage,
                      max_seq_len=64, batch_size=8, accumulation_steps=2, lr=3e-3, max_steps=12, log_interval=1,
                      max_failures=0, out=str(tmp_path / "out"), storage_path=str(tmp_path / "ray"),
                      cache_dir=str(tmp_path / "cache"))
    out = launch(cfg, Pretrain())
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert log[-1]["loss"] < log[0]["loss"] - 0.5
    model = load_model(out)  # gathered full weights, HF layout, even when ZeRO-3 partitioned them
    assert model.num_parameters() == 508_224
    # Every rank's optimizer shard was merged into the reported checkpoint.
    ckpt = json.loads((out / "run.json").read_text())["checkpoint"]
    shards = sorted(p.name for p in Path(ckpt).glob("deepspeed/state/*optim_states.pt"))
    assert len(shards) == 2, shards


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this runs `touch marker`
        import os
        return os.system, (f"touch {self.marker}",)


def test_zero_resume_is_weights_only_and_continues(ray_cluster, project_tokenizer, tmp_path):
    """Two ranks under Ray: a planted pickle in one rank's optimizer shard stops the resume at once (no retry)
    and runs nothing; the untouched checkpoint resumes where it stopped."""
    import shutil

    import torch

    def config(name, **kw):
        return TrainConfig(**{**dict(preset="tiny", tokenizer=str(project_tokenizer), num_workers=2,
                                     zero_stage=2, max_seq_len=64, batch_size=8, accumulation_steps=1, lr=3e-3,
                                     log_interval=1, max_failures=1, out=str(tmp_path / name / "out"),
                                     storage_path=str(tmp_path / name / "ray"), cache_dir=str(tmp_path / "cache")),
                              **kw})

    first = launch(config("first", max_steps=4), Pretrain())
    ckpt = Path(json.loads((first / "run.json").read_text())["checkpoint"])
    shard = next((ckpt / "deepspeed" / "state").glob("*rank_1_*optim_states.pt"))
    kept, marker = tmp_path / "kept.pt", tmp_path / "pwned"
    shutil.copy2(shard, kept)
    torch.save({"optimizer_state_dict": _Payload(marker)}, shard)
    with pytest.raises(ValueError, match=rf"stopped without retrying: .*{shard.name}: refused to load"):
        launch(config("planted", max_steps=6, resume=str(ckpt)), Pretrain())
    assert not marker.exists()

    shutil.copy2(kept, shard)
    again = launch(config("again", max_steps=6, resume=str(ckpt)), Pretrain())
    assert json.loads((again / "trainer_state.json").read_text())["restored_from"] == [4]
    log = [json.loads(line) for line in (again / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
