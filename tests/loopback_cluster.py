"""A multi-node Ray cluster on loopback, for tests: `LoopbackCluster` starts a head and worker nodes with
`ray start` (each its own raylet, i.e. its own Ray node) on 127.0.0.2 with ports of their own, can SIGKILL a
node like a machine losing power, and stops only its own processes; the `loopback_cluster` fixture yields a
started one. Also the helpers that go with it: `free_ports`, `http_json`, the dashboard's job status and logs,
and the checkpoints the Ray Train controller has registered. Not a test module (no tests here): test files
import the fixture and helpers from it. Everything goes through the `ray` CLI and the dashboard's HTTP API,
never `ray.init`, because the session `ray_cluster` fixture may already hold a Ray connection in the pytest
process."""
from __future__ import annotations

import json
import os
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

REPO_ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


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
