"""Multi-node runs and losing a node: a head plus three worker nodes started with `ray start` on loopback
(each its own raylet, i.e. its own Ray node), a pretraining job submitted with `ray job submit`, and one
worker node SIGKILLed after the first checkpoint. The job must restore that checkpoint on the surviving
nodes and finish with every step logged exactly once.

Also here: the deploy manifests parse and name only real flags, and the write-verify-publish protocol of
`cluster.publish` never leaves the `latest` pointer at a half-written checkpoint.

The cluster test drives everything through the `ray` CLI and the dashboard's HTTP API, never `ray.init`,
because the session `ray_cluster` fixture may already hold a Ray connection in this pytest process.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "cluster" / "deploy"
RAY = str(Path(sys.executable).with_name("ray"))


# ---------------------------------------------------------------------------------------------------------
# Manifests: they parse and name real flags.

MANIFESTS = ["ray-cluster.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "runtime_env.yaml"]


def pretrain_flags() -> set[str]:
    help_text = subprocess.run([sys.executable, str(REPO_ROOT / "stages" / "pretrain.py"), "--help"],
                               capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]*", help_text))


def pretrain_commands(text: str) -> list[str]:
    """Every `stages/pretrain.py ...` command line in a manifest or the README (shell continuations joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [m.group(0) for m in re.finditer(r"stages/pretrain\.py[^\n\"'`]*", joined)]


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_parses(name):
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]
    assert docs, f"{name} is empty"
    if name == "runtime_env.yaml":
        assert {"working_dir", "pip"} <= set(docs[0])
    if name.startswith("kuberay"):
        assert docs[0]["apiVersion"].startswith("ray.io/")
        assert docs[0]["kind"] == ("RayJob" if "rayjob" in name else "RayCluster")
    if name == "ray-cluster.yaml":
        types = docs[0]["available_node_types"]
        head = types[docs[0]["head_node_type"]]
        assert head["resources"].get("GPU", 0) == 0
        assert any(t["resources"].get("GPU", 0) > 0 for t in types.values())


def test_manifests_and_readme_use_only_real_flags():
    known = pretrain_flags()
    used = set()
    for path in [*(DEPLOY / n for n in MANIFESTS), REPO_ROOT / "cluster" / "README.md"]:
        commands = pretrain_commands(path.read_text())
        for cmd in commands:
            used |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", cmd))
    assert used, "no `stages/pretrain.py` command found in the manifests"
    assert "--storage-path" in used
    assert used <= known, f"flags not in stages/pretrain.py --help: {sorted(used - known)}"
    rayjob = (DEPLOY / "kuberay-rayjob.yaml").read_text()
    assert pretrain_commands(rayjob), "the RayJob must run stages/pretrain.py"


# ---------------------------------------------------------------------------------------------------------
# Write, verify, then publish: a crash mid-write never moves the pointer.

@pytest.fixture(scope="module")
def tiny_run():
    """What `cluster.loop.write_checkpoint` needs, for the tiny preset on CPU."""
    from cluster.strategy import Plain
    from minimind.config import get_preset
    from minimind.model import MiniMind
    from stages.pretrain import Pretrain
    model = MiniMind(get_preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return Pretrain(), Plain(model, opt, sched, 1.0, 1, torch.device("cpu"))


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
    from cluster.loop import TrainState, write_checkpoint
    from cluster.publish import read_latest, verify_checkpoint
    from minimind.checkpoint import load_model
    stage, strategy = tiny_run
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def good(step):
        return lambda d: write_checkpoint(d, stage, strategy, TrainState(step=step), None, rank=0)

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


# ---------------------------------------------------------------------------------------------------------
# A real multi-node cluster on loopback.

# Every Ray listener on loopback, no token auth, quick detection of a dead node (the GCS otherwise waits
# ~30 s of missed health checks), and the repo importable by every worker (or Train hangs, see
# /work/shared/RAY-ON-CPU.md).
CLUSTER_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "PYTHONPATH": str(REPO_ROOT),
    "WANDB_MODE": "disabled",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}

STEPS, SAVE_EVERY = 32, 8
# 1.5 CPUs per Train worker: one fits on a 2-CPU worker node, none on the 1-CPU head, so the two workers
# must sit on two different worker nodes (Ray Train packs by default). The head's CPU and the spare half
# CPUs run Ray Data. The third worker node is the spare that takes over when one is killed.
# 127.0.0.2, not .1: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 (which `ray start --address` needs) Ray rewrites
# "127.0.0.1" in --address to the machine's external IP, where our GCS does not listen. Any 127/8 address is
# loopback on Linux, and Ray leaves the others alone.
NODE_IP = "127.0.0.2"
HEAD_CPUS, NODE_CPUS, CPUS_PER_WORKER, WORKER_NODES = 1, 2, 1.5, 3


_HANDED_OUT: set[int] = set()


def free_ports(n: int) -> list[int]:
    """n free ports, none handed out before in this run: once closed, a port can come back from the OS on a
    later call, and `ray start` refuses two components on one port (seen once in CI: a node's agent port equal
    to the head's port picked a call earlier)."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            ports.append(port)
    return ports


def http_json(url: str, data: dict | None = None, timeout: float = 10):
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class LoopbackCluster:
    """`ray start` processes, each `--block`ed in its own session so one SIGKILL to the process group takes
    the whole node down (raylet, object store, agents and its workers), like a machine losing power."""

    def __init__(self, tmp: Path):
        self.env = {**os.environ, **CLUSTER_ENV}
        # Short: Ray's unix socket paths live under it and must stay under 107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="rmn-", dir="/tmp")
        self.logs = tmp / "ray-start-logs"
        self.logs.mkdir()
        self.procs: dict[str, subprocess.Popen] = {}
        self.gcs_port, self.dash_port, self.client_port = free_ports(3)
        self.address = f"{NODE_IP}:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"

    def _start(self, name: str, args: list[str], env: dict | None = None):
        # Each node gets its own agent and metrics ports: all nodes share one IP, and the defaults collide
        # with each other and with any other Ray on this machine.
        listen, grpc, metrics, rt_env = free_ports(4)
        cmd = [RAY, "start", "--block", f"--node-ip-address={NODE_IP}", f"--temp-dir={self.temp_dir}",
               f"--dashboard-agent-listen-port={listen}", f"--dashboard-agent-grpc-port={grpc}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
               "--disable-usage-stats", *args]
        log = open(self.logs / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(cmd, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=REPO_ROOT)

    def start(self):
        self._start("head", ["--head", f"--port={self.gcs_port}", f"--num-cpus={HEAD_CPUS}", "--num-gpus=0",
                             "--resources={\"head\": 1}", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash_port}",
                             f"--ray-client-server-port={self.client_port}"])
        self.wait_for_nodes(1, deadline=120)
        # One node at a time, retried once: `ray start` gives a raylet 30 s (hard-coded) to register, which a
        # loaded 2-core machine can miss when several start together.
        for i in range(WORKER_NODES):
            for attempt in range(2):
                self._start(f"w{i}", [f"--address={self.address}", f"--num-cpus={NODE_CPUS}", "--num-gpus=0",
                                      f"--resources={{\"w{i}\": 1}}"],
                            # `ray start --address` refuses to join with this at 0 (it also means "single-node
                            # only"); the explicit loopback --node-ip-address keeps the node on loopback.
                            env={"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"})
                try:
                    self.wait_for_nodes(2 + i, deadline=120)
                    break
                except AssertionError:
                    if attempt:
                        raise
                    with_suppressed(os.killpg, self.procs[f"w{i}"].pid, signal.SIGKILL)

    def nodes(self) -> list[dict]:
        try:
            body = http_json(f"{self.dashboard}/api/v0/nodes?detail=1&limit=100")
        except OSError:
            return []
        return body["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.nodes() if n["state"] == "ALIVE"]

    def wait_for_nodes(self, n: int, deadline: float):
        end = time.time() + deadline
        while time.time() < end:
            for name, p in self.procs.items():
                assert p.poll() is None, f"`ray start` for {name} exited:\n{(self.logs / f'{name}.log').read_text()}"
            if len(self.alive_nodes()) >= n:
                return
            time.sleep(1)
        raise TimeoutError(f"{n} Ray nodes did not come up in {deadline} s")

    def node_names(self) -> dict[str, str]:
        """node_id -> 'head' / 'w0' / ..."""
        out = {}
        for n in self.nodes():
            res = n.get("resources_total", {})
            out[n["node_id"]] = next((k for k in ["head", *(f"w{i}" for i in range(WORKER_NODES))] if k in res),
                                     "?")
        return out

    def train_workers(self) -> list[dict]:
        q = urllib.parse.urlencode([("filter_keys", "class_name"), ("filter_predicates", "="),
                                    ("filter_values", "RayTrainWorker"), ("filter_keys", "state"),
                                    ("filter_predicates", "="), ("filter_values", "ALIVE"), ("detail", "1")])
        try:
            return http_json(f"{self.dashboard}/api/v0/actors?{q}")["data"]["result"]["result"]
        except OSError:
            return []

    def kill_node(self, name: str):
        """Lose the node: its `ray start`, raylet and every worker process it spawned (workers can sit in
        process groups of their own, so the whole process tree is killed, not only the group)."""
        import psutil
        root = psutil.Process(self.procs[name].pid)
        tree = [root, *root.children(recursive=True)]
        with_suppressed(os.killpg, root.pid, signal.SIGKILL)
        for proc in tree:
            with_suppressed(proc.kill)
        self.procs[name].wait(timeout=30)

    def stop(self):
        # Workers first, then the head; SIGTERM lets `ray start --block` take its children down, SIGKILL
        # to the process group catches anything left. Only our own process groups: never `ray stop`, which
        # would also kill every other Ray on this machine.
        for name in [n for n in self.procs if n != "head"] + ["head"]:
            p = self.procs[name]
            if p.poll() is None:
                with_suppressed(os.killpg, p.pid, signal.SIGTERM)
        end = time.time() + 5
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, end - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs.values():
            with_suppressed(os.killpg, p.pid, signal.SIGKILL)
            with_suppressed(p.wait, timeout=10)
        import shutil
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def registered_checkpoints(run_dir: Path) -> list:
    """Checkpoints the Ray Train controller has committed for this run (its own snapshot file)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return snapshot.get("checkpoint_results", [])


def with_suppressed(fn, *args, **kw):
    import psutil
    try:
        fn(*args, **kw)
    except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired, psutil.Error):
        pass


@pytest.fixture
def loopback_cluster(tmp_path):
    cluster = LoopbackCluster(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def job_logs(cluster: LoopbackCluster, job_id: str) -> str:
    try:
        return http_json(f"{cluster.dashboard}/api/jobs/{job_id}/logs")["logs"]
    except OSError:
        return ""


def job_status(cluster: LoopbackCluster, job_id: str) -> str:
    try:
        return http_json(f"{cluster.dashboard}/api/jobs/{job_id}")["status"]
    except OSError:
        return "UNKNOWN"


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
