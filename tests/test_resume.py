"""Failures and resume: a killed worker is replaced and the run goes on from the last checkpoint with the
same losses as an uninterrupted run, from DDP files or DeepSpeed ZeRO shards; the failure after the last one
`--max-failures` allows ends the run with the error, and launching it again under the same `--run-name` goes on
from its last checkpoint; `--resume` does the same by hand; `--keep-checkpoints K` keeps exactly K."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from cluster.config import TrainConfig
from cluster.launcher import launch
from minimind.checkpoint import load_model
from stages.pretrain import Pretrain

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]


# A restored DDP run repeats the uninterrupted run's losses bit for bit (same batches, same reductions; measured
# max gap 0.0). ZeRO-2 reduces its gradients in buckets of its own, so it matches DDP to float32 rounding only.
ZERO_VS_DDP = 1e-5  # measured 1e-6: one unit in the 6th decimal the log keeps


def config(tmp_path, project_tokenizer, corpus, **kw) -> TrainConfig:
    # One tokenised cache for every run here, so the runs differ only in how they were interrupted.
    base = dict(preset="tiny", data=(str(corpus),), tokenizer=str(project_tokenizer), num_workers=2,
                max_seq_len=128, batch_size=16, accumulation_steps=2, lr=2e-3, max_steps=24, save_interval=6,
                log_interval=1, seed=3, storage_path=str(tmp_path / "ray"), cache_dir=str(corpus.parent / "cache"),
                out=str(tmp_path / "out"), max_failures=0)
    base.update(kw)
    return TrainConfig(**base)


def log_of(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def corpus(bundled_corpus):
    """The bundled sample 7 times over (~236k tokens): 24 steps of 8,192 tokens without a second epoch."""
    return bundled_corpus(7)


@pytest.fixture(scope="module")
def uninterrupted_run(ray_cluster, project_tokenizer, corpus, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("clean")
    launch(config(tmp, project_tokenizer, corpus, run_name="clean"), Pretrain())
    return tmp


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run) -> dict[int, float]:
    return log_of(uninterrupted_run / "out")


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


def _kill_after_each_new_checkpoint(run_dir: Path, kills: int, killed: list):
    """Kill one train worker each time the run has committed a later checkpoint than it had at the last kill,
    `kills` times, so each kill lands in a worker group that restored and trained on. `killed` gets
    (pid, step of the last committed checkpoint) per kill."""
    deadline = time.time() + 300
    step_at_last_kill = 0
    while time.time() < deadline and len(killed) < kills:
        step = max((c["metrics"]["step"] for c in _registered_checkpoints(run_dir)), default=0)
        if step > step_at_last_kill:
            workers = [w for w in _train_workers() if w.pid not in {pid for pid, _ in killed}]
            if workers:
                os.kill(workers[-1].pid, signal.SIGKILL)
                killed.append((workers[-1].pid, step))
                step_at_last_kill = step
        time.sleep(0.05)


def _steps_of(checkpoints: list[Path]) -> list[int]:
    return [json.loads((c / "trainer_state.json").read_text())["step"] for c in checkpoints]


def test_resume_by_hand_from_a_checkpoint(uninterrupted_run, uninterrupted, project_tokenizer, corpus, tmp_path):
    ckpts = sorted(p for p in (uninterrupted_run / "ray" / "clean").glob("checkpoint_*") if p.is_dir())
    assert _steps_of(ckpts) == [18, 24]  # 4 were saved (every 6 steps); --keep-checkpoints 2 keeps the last 2
    # Resume from the earlier one: the last 6 steps again, in a run of its own.
    again = launch(config(tmp_path, project_tokenizer, corpus, resume=str(ckpts[0])), Pretrain())
    assert json.loads((again / "trainer_state.json").read_text())["restored_from"] == [18]
    log = log_of(again)
    assert sorted(log) == list(range(1, 25))
    for step in range(19, 25):
        assert log[step] == uninterrupted[step], step


def test_the_failure_past_max_failures_ends_the_run_and_its_name_resumes_it(uninterrupted, project_tokenizer,
                                                                             corpus, tmp_path):
    """--max-failures 1: the first killed worker is survived (a new worker group restores the last committed
    checkpoint and trains on), the second ends the run with Ray's error; the same command again (same
    --run-name) restores the checkpoint the second group committed and finishes. Every step is logged once, and
    each of the three pieces (before the first kill, after it, after the relaunch) has the uninterrupted run's
    losses bit for bit."""
    from ray.train import TrainingFailedError
    cfg = config(tmp_path, project_tokenizer, corpus, max_failures=1, run_name="twice")
    run_dir = tmp_path / "ray" / "twice"
    killed: list = []
    killer = threading.Thread(target=_kill_after_each_new_checkpoint, args=(run_dir, 2, killed), daemon=True)
    killer.start()
    with pytest.raises(TrainingFailedError, match="(?i)worker|died|actor") as failed:
        launch(cfg, Pretrain())
    killer.join(timeout=5)
    assert len(killed) == 2, f"the run ended before its second kill ({killed}): {failed.value}"
    assert not (tmp_path / "out").exists()  # a failed run publishes nothing
    (_, first), (_, last) = killed
    assert 6 <= first < last < 24

    out = launch(cfg, Pretrain())  # the same command, the same run name
    state = json.loads((out / "trainer_state.json").read_text())
    # The second group restored `first` (the survived failure) and saved `last`; the new launch restored that.
    assert state["step"] == 24 and state["restored_from"] == [first, last]
    log = log_of(out)
    assert sorted(log) == list(range(1, 25))  # every step exactly once, and the right count
    for step, loss in uninterrupted.items():
        assert log[step] == loss, step


@pytest.fixture(scope="module")
def zero_run(uninterrupted, project_tokenizer, corpus, tmp_path_factory):
    """ZeRO-2 on 2 workers, the uninterrupted run's config, one worker killed after the first checkpoint."""
    tmp = tmp_path_factory.mktemp("zero")
    cfg = config(tmp, project_tokenizer, corpus, zero_stage=2, max_failures=1, run_name="zero")
    killed: list = []
    killer = threading.Thread(target=_kill_after_each_new_checkpoint, args=(tmp / "ray" / "zero", 1, killed),
                              daemon=True)
    killer.start()
    out = launch(cfg, Pretrain())
    killer.join(timeout=5)
    return out, killed


def test_zero_shards_restore_after_a_killed_worker(zero_run, uninterrupted):
    """The replacement group loads every rank's optimizer shard and the run ends with the losses of the
    uninterrupted DDP run (same batches, same loop; ZeRO reduces in another order, hence ZERO_VS_DDP)."""
    out, killed = zero_run
    assert killed, "no worker was killed: the run ended before its first checkpoint"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["step"] == 24 and state["restored_from"] == [killed[0][1]]  # from the shards committed
    ckpt = Path(json.loads((out / "run.json").read_text())["checkpoint"])
    assert len(list(ckpt.glob("deepspeed/state/*optim_states.pt"))) == 2  # one optimizer shard per rank
    assert load_model(out).num_parameters() == 508_224  # full weights, gathered from the shards
    log = log_of(out)
    assert sorted(log) == list(range(1, 25))
    gaps = {step: abs(log[step] - loss) for step, loss in uninterrupted.items()}
    assert max(gaps.values()) < ZERO_VS_DDP, gaps


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this runs `touch marker`
        return os.system, (f"touch {self.marker}",)


def test_zero_resume_is_weights_only_and_continues(zero_run, project_tokenizer, corpus, tmp_path):
    """A planted pickle in one rank's optimizer shard stops the resume at once (no retry) and runs nothing;
    the untouched checkpoint resumes where it stopped."""
    import shutil

    import torch
    ckpt = tmp_path / "ckpt"
    shutil.copytree(json.loads((zero_run[0] / "run.json").read_text())["checkpoint"], ckpt)
    shard = next((ckpt / "deepspeed" / "state").glob("*rank_1_*optim_states.pt"))
    kept, marker = tmp_path / "kept.pt", tmp_path / "pwned"
    shutil.copy2(shard, kept)
    torch.save({"optimizer_state_dict": _Payload(marker)}, shard)

    def resumed(name):
        return config(tmp_path / name, project_tokenizer, corpus, zero_stage=2, max_failures=1, max_steps=26,
                      resume=str(ckpt))
    with pytest.raises(ValueError, match=rf"stopped without retrying: .*{shard.name}: refused to load"):
        launch(resumed("planted"), Pretrain())
    assert not marker.exists()

    shutil.copy2(kept, shard)
    again = launch(resumed("again"), Pretrain())
    assert json.loads((again / "trainer_state.json").read_text())["restored_from"][-1] == 24
    assert sorted(log_of(again)) == list(range(1, 27))
