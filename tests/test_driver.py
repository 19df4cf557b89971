"""What the driver settles before any worker starts, and what a worker error that a retry cannot cure does:
relative paths, Ray-job working dirs, preset mismatch on --resume, empty data, a full disk."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from cluster.config import TrainConfig
from cluster.launcher import check_resume, launch
from minimind.checkpoint import save_checkpoint
from minimind.config import get_preset
from minimind.model import MiniMind
from stages.common import run_stage
from stages.pretrain import Pretrain
from stages.sft import SFT

pytestmark = pytest.mark.timeout(300)


def tiny_checkpoint(directory: Path, preset: str = "tiny") -> Path:
    from minimind.__main__ import default_tokenizer
    torch.manual_seed(0)
    save_checkpoint(MiniMind(get_preset(preset)), directory, tokenizer=default_tokenizer())
    return directory


def test_path_flags_become_absolute_against_the_callers_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(init="out/pretrain", out="out/sft", data=("a.jsonl", "s3://bucket/x.jsonl", "/abs/b.jsonl"),
                      val_data=("v/*.jsonl",), storage_path="runs", cache_dir="", resume="")
    fixed = cfg.for_driver()
    assert fixed.init == str(tmp_path / "out/pretrain") and fixed.out == str(tmp_path / "out/sft")
    assert fixed.data == (str(tmp_path / "a.jsonl"), "s3://bucket/x.jsonl", "/abs/b.jsonl")
    assert fixed.val_data == (str(tmp_path / "v/*.jsonl"),) and fixed.storage_path == str(tmp_path / "runs")
    assert (fixed.cache_dir, fixed.resume, fixed.preset) == ("", "", "")


def test_stage_specific_path_flags_too(tmp_path, monkeypatch):
    from stages.distill import DistillConfig
    from stages.dpo import DPOConfig
    monkeypatch.chdir(tmp_path)
    assert DPOConfig(reference="ref").for_driver().reference == str(tmp_path / "ref")
    assert DistillConfig(teacher="t").for_driver().teacher == str(tmp_path / "t")


def test_under_a_ray_job_relative_outputs_go_to_storage_or_fail(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"}}))
    with pytest.raises(ValueError, match="relative --out out/pretrain would be written into Ray's temporary copy"):
        TrainConfig(out="out/pretrain").for_driver()
    shared = tmp_path / "shared"
    (shared / "out" / "pretrain").mkdir(parents=True)  # the previous stage's relative --out, in storage
    cfg = TrainConfig(out="out/sft", init="out/pretrain", storage_path=str(shared)).for_driver()
    assert cfg.out == str(shared / "out/sft") and cfg.init == str(shared / "out/pretrain")
    assert TrainConfig(out=str(tmp_path / "abs")).for_driver().out == str(tmp_path / "abs")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}}))  # no working dir
    assert TrainConfig(out="o").for_driver().out == str(tmp_path / "o")


def test_resume_from_another_preset_says_preset_mismatch(tmp_path):
    ckpt = tmp_path / "ckpt"
    tiny_checkpoint(ckpt / "model", "tiny-base")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 3}))
    with pytest.raises(ValueError, match="preset mismatch: the checkpoint holds tiny-base, this run builds tiny"):
        check_resume(TrainConfig(preset="tiny", resume=str(ckpt)), Pretrain())
    check_resume(TrainConfig(preset="tiny-base", resume=str(ckpt)), Pretrain())  # the same preset is fine
    with pytest.raises(ValueError, match="not a training checkpoint"):
        check_resume(TrainConfig(resume=str(ckpt / "model")), Pretrain())


@pytest.mark.ray
def test_no_step_of_data_fails_in_the_driver(ray_cluster, tmp_path):
    cfg = TrainConfig(preset="tiny", out=str(tmp_path / "out"), num_workers=2, batch_size=4096, max_seq_len=32,
                      storage_path=str(tmp_path / "ray"), cache_dir=str(tmp_path / "cache"), max_failures=2)
    start = time.time()
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        launch(cfg, Pretrain())
    assert not (tmp_path / "ray").exists(), "a TorchTrainer was started"
    assert time.time() - start < 60


@pytest.mark.ray
def test_relative_init_runs_from_the_callers_directory(ray_cluster, tmp_path, monkeypatch, capsys):
    """The README's chain uses relative paths (`--init out/pretrain`); Ray workers run elsewhere."""
    monkeypatch.chdir(tmp_path)
    tiny_checkpoint(tmp_path / "out" / "pretrain")
    out = run_stage(SFT(), ["--init", "out/pretrain", "--out", "out/sft", "--max-steps", "1", "--batch-size", "2",
                            "--num-workers", "1", "--max-seq-len", "64", "--max-failures", "0"])
    assert Path(out) == tmp_path / "out" / "sft" and (tmp_path / "out/sft/model.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "tokenizer: " in printed and "(--init)" in printed
    assert "sft done in" in printed and "next: python stages/dpo.py --init " + str(tmp_path / "out/sft") in printed
    assert (tmp_path / "out/sft/loss.png").stat().st_size > 1000
    assert list((tmp_path / "out/sft/tensorboard").glob("events.out.tfevents.*"))


@pytest.fixture
def tiny_disk(tmp_path):
    """A 3 MiB tmpfs: the first checkpoint (tiny weights + optimizer state, ~5 MB) does not fit."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.ray
def test_full_disk_stops_at_once_and_leaves_no_torn_checkpoint(ray_cluster, tmp_path, tiny_disk):
    cfg = TrainConfig(preset="tiny", out=str(tmp_path / "out"), num_workers=2, batch_size=2, max_seq_len=32,
                      max_steps=2, storage_path=str(tiny_disk), cache_dir=str(tmp_path / "cache"),
                      max_failures=3, run_name="full")
    start = time.time()
    with pytest.raises(ValueError, match="stopped without retrying: no space left on the device"):
        launch(cfg, Pretrain())
    elapsed = time.time() - start
    run_dir = tiny_disk / "full"
    leftovers = [p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint_")] if run_dir.exists() else []
    assert leftovers == [], f"torn checkpoint directories left in storage: {leftovers}"
    assert not (tmp_path / "out").exists()
    assert elapsed < 120, f"{elapsed:.0f}s: the run was retried"


def test_a_run_directory_stands_for_the_checkpoint_latest_names(tmp_path, capsys):
    """--resume/--init/--reference given a run directory read its `latest` pointer, not the newest directory
    (here the newest, step 6, was never published: a crash mid-checkpoint)."""
    from cluster.publish import follow_latest, publish_latest
    from stages.dpo import DPOConfig
    run = tmp_path / "storage" / "pretrain-run"
    for step in (3, 6):
        ckpt = run / f"checkpoint_{step:06d}"
        tiny_checkpoint(ckpt / "model")
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
        (ckpt / "metrics.jsonl").write_text(json.dumps({"step": step, "loss": 1.0}) + "\n")
        torch.save({"optimizer": {}, "scheduler": {}}, ckpt / "optimizer.pt")
    publish_latest(run, run / "checkpoint_000003")
    good = run / "checkpoint_000003"
    cfg = follow_latest(TrainConfig(init=str(run), resume=str(run)))
    assert (cfg.init, cfg.resume) == (str(good / "model"), str(good))
    assert "--resume" in capsys.readouterr().out
    assert follow_latest(DPOConfig(reference=str(run))).reference == str(good / "model")
    plain = TrainConfig(init=str(good / "model"))
    assert follow_latest(plain) is plain  # a checkpoint directory is taken as it is
    # End to end, without Ray: SFT from the run directory starts from the published weights.
    out = tmp_path / "sft"
    run_stage(SFT(), ["--init", str(run), "--no-ray", "--max-steps", "1", "--batch-size", "2",
                      "--max-seq-len", "64", "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    said = capsys.readouterr().out
    assert f"--init {run}: its latest checkpoint (step 3)" in said, said


def test_without_tokenizer_flags_a_run_uses_the_bundled_sample_tokenizer(tmp_path, project_tokenizer):
    """`make demo` (`python stages/pretrain.py`, no flags): the tokenizer is the one trained on the bundled
    sample, the same every time and named so on the first line; an --init checkpoint's tokenizer comes before
    it, and --tokenizer before both."""
    from cluster.launcher import resolve_tokenizer
    from minimind.tokenizer import Tokenizer
    bundled = Tokenizer.from_dir(project_tokenizer)
    tok, source = resolve_tokenizer(TrainConfig())
    assert (tok.fingerprint(), tok.vocab_size) == (bundled.fingerprint(), 2257)
    assert source == "trained on the bundled sample corpus (give --tokenizer for your own)"
    from minimind.tokenizer import train_tokenizer
    own = train_tokenizer(["a checkpoint with a tokenizer of its own"] * 20, vocab_size=300)
    torch.manual_seed(0)
    save_checkpoint(MiniMind(get_preset("tiny")), tmp_path / "init", tokenizer=own)
    tok, source = resolve_tokenizer(TrainConfig(init=str(tmp_path / "init")))
    assert tok.fingerprint() == own.fingerprint() != bundled.fingerprint()
    assert source == f"{tmp_path / 'init'} (--init)"
    tok, source = resolve_tokenizer(TrainConfig(init=str(tmp_path / "init"), tokenizer=str(project_tokenizer)))
    assert (tok.fingerprint(), source) == (bundled.fingerprint(), str(project_tokenizer))
    with pytest.raises(ValueError, match=r"--tokenizer .*/nowhere: no such file or directory"):
        resolve_tokenizer(TrainConfig(tokenizer=str(tmp_path / "nowhere")))
