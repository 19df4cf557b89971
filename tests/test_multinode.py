"""Multi-node runs and losing a node: a head plus three worker nodes started with `ray start` on loopback
(each its own raylet, i.e. its own Ray node), a pretraining job submitted with `ray job submit`, and one
worker node SIGKILLed after the first checkpoint. The job must restore that checkpoint on the surviving
nodes and finish with every step logged exactly once.

The cluster harness lives in tests/loopback_cluster.py; the manifest checks are in tests/test_manifests.py and
the publish-protocol tests in tests/test_publish.py.

The cluster test drives everything through the `ray` CLI and the dashboard's HTTP API, never `ray.init`,
because the session `ray_cluster` fixture may already hold a Ray connection in this pytest process.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from loopback_cluster import CPUS_PER_WORKER, RAY, REPO_ROOT, job_logs, job_status, registered_checkpoints
# A fixture: pytest looks it up by name in this module, so it is imported although no code here calls it.
from loopback_cluster import loopback_cluster  # noqa: F401


# ---------------------------------------------------------------------------------------------------------
# A real multi-node cluster on loopback.

STEPS, SAVE_EVERY = 32, 8


@pytest.mark.timeout(420)
def test_job_survives_losing_a_worker_node(loopback_cluster, project_tokenizer, tmp_path):
    cluster = loopback_cluster
    storage, out, run = tmp_path / "shared-storage", tmp_path / "out", "multinode"
    cmd = [sys.executable, str(REPO_ROOT / "stages" / "pretrain.py"),
           "--num-workers", "2", "--cpus-per-worker", str(CPUS_PER_WORKER), "--max-steps", str(STEPS),
           "--save-interval", str(SAVE_EVERY), "--max-failures", "2", "--keep-checkpoints", "100",
           "--storage-path", str(storage), "--run-name", run, "--out", str(out),
           "--cache-dir", str(tmp_path / "cache"), "--epochs", "4",
           "--max-seq-len", "64", "--batch-size", "8", "--accumulation-steps", "1", "--log-interval", "1",
           "--tokenizer", str(project_tokenizer)]
    job_id = f"multinode-{os.getpid()}-{int(time.time())}"
    t0 = time.time()
    submit = subprocess.run([RAY, "job", "submit", "--address", cluster.dashboard, "--submission-id", job_id,
                             "--no-wait", "--", *cmd],
                            env=cluster.env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr

    # Wait for the first checkpoint in shared storage, then kill a worker node that hosts a Train worker.
    run_dir = storage / run
    names = cluster.node_names()
    victim, placement = None, []
    end = time.time() + 200
    while time.time() < end:
        status = job_status(cluster, job_id)
        assert status in ("PENDING", "RUNNING", "UNKNOWN"), f"job {status} before the kill:\n{job_logs(cluster, job_id)}"
        workers = cluster.train_workers()
        # Kill only once the controller has registered a checkpoint (its snapshot lists it): a checkpoint_*
        # folder may still be uploading, and a report the controller has not polled yet dies with the node;
        # either way Ray rightly restarts from scratch.
        if registered_checkpoints(run_dir) and len(workers) == 2:
            placement = sorted(names.get(w["node_id"], "?") for w in workers)
            victim = placement[-1]
            cluster.kill_node(victim)
            break
        time.sleep(0.2)
    assert victim, f"no checkpoint appeared before the deadline:\n{job_logs(cluster, job_id)}"
    t_kill = time.time()
    print(f"\nTrain workers on {placement} (first checkpoint after {t_kill - t0:.1f} s); killed node {victim}")
    assert len(set(placement)) == 2 and "head" not in placement, f"workers did not span two worker nodes: {placement}"

    end = time.time() + 240
    while (status := job_status(cluster, job_id)) not in ("SUCCEEDED", "FAILED", "STOPPED") and time.time() < end:
        time.sleep(1)
    logs = job_logs(cluster, job_id)
    (tmp_path / "job.log").write_text(logs)
    assert status == "SUCCEEDED", f"job {status}:\n{logs[-6000:]}"
    print(f"job finished {time.time() - t_kill:.1f} s after the kill, {time.time() - t0:.1f} s in all")

    # Which step was restored, and how far the run had got before the kill.
    restored = [int(s) for s in re.findall(r"restored \S+ at step (\d+)", logs)]
    assert restored, f"the job never restored a checkpoint:\n{logs[-6000:]}"
    restore_at = logs.index("restored ")
    before = [int(s) for s in re.findall(rf"\] (\d+)/{STEPS} ", logs[:restore_at])]
    assert before, "no progress lines before the restore"
    recomputed = max(before) - restored[0]
    # cluster/README.md: what is lost is at most --save-interval steps.
    assert 0 <= recomputed <= SAVE_EVERY, (before, restored)
    assert restored[0] > 0 and restored[0] % SAVE_EVERY == 0
    print(f"restored step {restored[0]}, last step logged before the kill {max(before)}; "
          f"recomputed steps: {recomputed}")

    # The result: every step exactly once, the right count.
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert json.loads((out / "trainer_state.json").read_text())["step"] == STEPS

    # No checkpoint lost or half-written: every kept one is complete and loads, and the steps saved are
    # exactly the save points (the one in flight at the kill is either whole or absent).
    from cluster.publish import verify_checkpoint
    from minimind.checkpoint import load_model
    ckpts = sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    saved = []
    for c in ckpts:
        verify_checkpoint(c)
        load_model(c / "model")
        saved.append(json.loads((c / "trainer_state.json").read_text())["step"])
    assert sorted(set(saved)) == list(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)), saved
    assert not list(run_dir.rglob("*.tmp-*")), "temporary files left in storage"
    # The launcher publishes after every checkpoint (cluster/publish.py): `latest` must name a complete one.
    from cluster.publish import read_latest
    latest = read_latest(run_dir)
    assert latest is not None, "the launcher never published a `latest` pointer"
    verify_checkpoint(latest["path"])
    assert latest["step"] == STEPS
