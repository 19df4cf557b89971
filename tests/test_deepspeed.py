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
                      max_seq_len=64, batch_size=8, accumulation_steps=2, lr=3e-3, max_steps=8, log_interval=1,
                      max_failures=0, out=str(tmp_path / "out"), storage_path=str(tmp_path / "ray"),
                      cache_dir=str(tmp_path / "cache"))
    out = launch(cfg, Pretrain())
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))
    assert log[-1]["loss"] < log[0]["loss"] - 0.5
    model = load_model(out)  # gathered full weights, HF layout, even when ZeRO-3 partitioned them
    assert model.num_parameters() == 508_224
    # Every rank's optimizer shard was merged into the reported checkpoint.
    ckpt = json.loads((out / "run.json").read_text())["checkpoint"]
    shards = sorted(p.name for p in Path(ckpt).glob("deepspeed/state/*optim_states.pt"))
    assert len(shards) == 2, shards
