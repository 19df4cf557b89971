"""Validation during training: a held-out split scored on every worker and reduced exactly, val_loss and
bits per character in the log, the best checkpoint kept and exported to --out."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cluster.config import TrainConfig
from cluster.shards import iter_eval_batches
from cluster.launcher import launch, prepare_data, resolve_tokenizer
from minimind.checkpoint import load_model
from stages.pretrain import Pretrain

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def test_validation_is_exact_and_the_best_checkpoint_is_exported(ray_cluster, tmp_path):
    cfg = TrainConfig(preset="tiny", out=str(tmp_path / "out"), num_workers=2, batch_size=4, max_seq_len=64,
                      max_steps=6, lr=3e-3, val_fraction=0.2, eval_interval=2, keep_best_by="val_loss",
                      keep_checkpoints=1, log_interval=1, max_failures=0, storage_path=str(tmp_path / "ray"),
                      cache_dir=str(tmp_path / "cache"))
    stage = Pretrain()
    out = launch(cfg, stage)
    log = records(out)
    evals = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(r["val_bits_per_char"] > 0 for r in evals)
    best = min(evals, key=lambda r: r["val_loss"])
    assert json.loads((out / "trainer_state.json").read_text())["step"] == best["step"]

    # The exported model re-scored in this process, over every validation row at once, gives the logged
    # figure: the 2 workers' shards (of unequal size) were reduced as one sum over one count.
    tokenizer, _ = resolve_tokenizer(cfg)
    _, val = prepare_data(cfg, stage, tokenizer, cfg.cache_dir)
    model = load_model(out, dtype=torch.float32).eval()
    table = torch.from_numpy(tokenizer.token_char_counts())
    nats = weight = chars = 0.0
    with torch.no_grad():
        for batch in iter_eval_batches(val, 7, 0, 1):
            nats += float(stage.loss(model, batch).total)
            weight += float(stage.weight(batch))
            chars += float(stage.scored_chars(batch, table))
    assert best["val_loss"] == pytest.approx(nats / weight, rel=1e-5)
    assert best["val_bits_per_char"] == pytest.approx(nats / math.log(2) / chars, rel=1e-5)

    # Ray kept the best checkpoint and the last one, no more.
    run_dir = next(p for p in (tmp_path / "ray").iterdir() if p.is_dir())
    kept = sorted(json.loads((c / "trainer_state.json").read_text())["step"]
                  for c in run_dir.iterdir() if c.is_dir() and c.name.startswith("checkpoint_"))
    assert kept == sorted({best["step"], 6})


def test_validation_rows_are_never_trained_on(tmp_path):
    from cluster.shards import iter_local_batches
    cfg = TrainConfig(preset="tiny", out=str(tmp_path / "out"), max_seq_len=64, val_fraction=0.2,
                      cache_dir=str(tmp_path / "cache"))
    tokenizer, _ = resolve_tokenizer(cfg)
    train, val = prepare_data(cfg, Pretrain(), tokenizer, cfg.cache_dir)
    assert val.num_rows > 0 and train.num_rows > 0
    rows = lambda batches: {tuple(r.tolist()) for b in batches for r in b["input_ids"]}  # noqa: E731
    assert not rows(iter_local_batches(train, 4)) & rows(iter_eval_batches(val, 4))
