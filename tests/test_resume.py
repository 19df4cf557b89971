"""Failures and resume: a killed worker is replaced and the run goes on from the last checkpoint with the
same losses as an uninterrupted run; `--resume` does the same by hand."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from cluster.config import TrainConfig
from cluster.launcher import launch
from stages.pretrain import Pretrain

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]


def config(tmp_path, shared_data, corpus, **kw) -> TrainConfig:
    # One tokenised cache for every run here, so the runs differ only in how they were interrupted.
    base = dict(preset="tiny", data=(str(corpus),), tokenizer=str(shared_data / "minimind"), num_workers=2,
                max_seq_len=128, batch_size=16, accumulation_steps=2, lr=2e-3, max_steps=24, save_interval=6,
                log_interval=1, seed=3, storage_path=str(tmp_path / "ray"), cache_dir=str(corpus.parent / "cache"),
                out=str(tmp_path / "out"), max_failures=0)
    base.update(kw)
    return TrainConfig(**base)


def log_of(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory):
    import gzip
    import itertools
    path = tmp_path_factory.mktemp("corpus") / "poems.jsonl"
    with gzip.open(shared_data / "poetry" / "poems.train.jsonl.gz", "rt", encoding="utf-8") as src:
        path.write_text("".join(itertools.islice(src, 6000)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, shared_data, corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    return log_of(launch(config(tmp, shared_data, corpus), Pretrain()))


def _train_workers() -> list:
    """Ray Train worker processes of this test session's cluster: descendants of this process (the
    embedded cluster's raylet is our child), titled `ray::RayTrainWorker...`."""
    import psutil
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.cmdline() and proc.cmdline()[0].startswith("ray::RayTrainWorker"):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _registered_checkpoints(run_dir: Path) -> list:
    """Checkpoints the Ray Train controller has committed (its snapshot file); a checkpoint_* folder alone
    may still be uploading, and a kill then rightly restarts from scratch."""
    try:
        return json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []


def _kill_a_worker_after_first_checkpoint(run_dir: Path, killed: list):
    deadline = time.time() + 300
    while time.time() < deadline and not killed:
        if _registered_checkpoints(run_dir):
            workers = _train_workers()
            if workers:
                os.kill(workers[-1].pid, signal.SIGKILL)
                killed.append(workers[-1].pid)
                return
        time.sleep(0.05)


def test_killed_worker_restores_and_matches_uninterrupted_run(uninterrupted, shared_data, corpus, tmp_path):
    cfg = config(tmp_path, shared_data, corpus, max_failures=2, run_name="killed")
    killed: list = []
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint,
                              args=(tmp_path / "ray" / "killed", killed), daemon=True)
    killer.start()
    out = launch(cfg, Pretrain())
    killer.join(timeout=5)
    assert killed, "no worker was killed: the run ended before its first checkpoint"
    resumed = log_of(out)
    assert sorted(resumed) == list(range(1, 25))  # every step exactly once, and the right count
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["step"] == 24
    assert len(state["restored_from"]) == 1 and state["restored_from"][0] % 6 == 0  # restored, not restarted
    for step, loss in uninterrupted.items():
        assert resumed[step] == pytest.approx(loss, abs=2e-4), step


def test_resume_by_hand_from_a_checkpoint(uninterrupted, shared_data, corpus, tmp_path):
    first = config(tmp_path / "a", shared_data, corpus, run_name="first", max_steps=24)
    launch(first, Pretrain())
    ckpts = sorted(p for p in (tmp_path / "a" / "ray" / "first").glob("checkpoint_*") if p.is_dir())
    assert ckpts, "no checkpoints kept"
    # Take the earliest kept checkpoint (keep_checkpoints=2 keeps steps 18 and 24) and resume from it.
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    again = launch(config(tmp_path / "b", shared_data, corpus, resume=str(ckpts[0])), Pretrain())
    assert json.loads((again / "trainer_state.json").read_text())["restored_from"] == [state["step"]]
    log = log_of(again)
    last = first.max_steps
    assert sorted(log) == list(range(1, last + 1))
    # The restore must come before the last step, or the comparison below would loop over nothing.
    assert 0 < state["step"] < last, (state["step"], last)
    compared = range(state["step"] + 1, last + 1)
    assert len(compared) > 0
    for step in compared:
        assert log[step] == pytest.approx(uninterrupted[step], abs=2e-4), step
