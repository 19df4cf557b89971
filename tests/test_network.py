"""Every process of a cluster started on this machine listens on loopback only: while training, while a Serve
app is deployed on the shared cluster, and under the README's `serve run serve.app:app model=DIR`.

A Ray cluster started here is a tree of processes below its driver (gcs_server, raylet, dashboard, and the
workers below the raylet), so the sockets to check are those owned by this process tree. Before
cluster.loopback, rank 0's torch rendezvous store listened on [::] during training and the Serve replica's
gRPC server on [::]; `serve run` put 14 listeners on the external address and [::].
"""
import ipaddress
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 is loopback too


def listeners(root: int) -> dict[tuple[str, int], str]:
    """{(ip, port): process command line} for every listening TCP socket of `root` and its descendants."""
    try:
        top = psutil.Process(root)
        tree = {p.pid: p for p in [top, *top.children(recursive=True)]}
    except psutil.NoSuchProcess:
        return {}
    found = {}
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in tree:
            try:
                name = " ".join(tree[conn.pid].cmdline())[:100]
            except psutil.Error:  # exited in between
                name = "?"
            found[(conn.laddr.ip, conn.laddr.port)] = name
    return found


class Watch:
    """Samples the listeners of a process tree in a thread until stopped: catches short-lived ones. Keeps
    every command line seen on an address: a Ray worker's title changes (ray::IDLE, then its actor's name)
    while its gRPC port stays."""

    def __init__(self, root: int):
        self.root, self._stop = root, threading.Event()
        self.seen: dict[tuple[str, int], set[str]] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        for address, name in listeners(self.root).items():
            self.seen.setdefault(address, set()).add(name)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def assert_loopback_only(self, expect: str):
        exposed = [f"{ip}:{port} {' | '.join(sorted(names))}" for (ip, port), names in sorted(self.seen.items())
                   if not is_loopback(ip)]
        assert not exposed, "listening beyond loopback:\n" + "\n".join(exposed)
        # Not vacuous: the processes under test were seen listening (on loopback)
        names = sorted({n for group in self.seen.values() for n in group})
        assert any(expect in name for name in names), (expect, [n for n in names if n.startswith("ray::")])


@pytest.fixture(scope="module")
def tiny_checkpoint(project_tokenizer, tmp_path_factory) -> Path:
    from minimind.checkpoint import save_checkpoint
    from minimind.config import PRESETS
    from minimind.model import MiniMind
    from minimind.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("net") / "tiny"
    save_checkpoint(MiniMind(PRESETS["tiny"]), out, tokenizer=Tokenizer.from_dir(project_tokenizer))
    return out


def test_training_listens_on_loopback_only(ray_cluster, project_tokenizer, tmp_path):
    from cluster.config import TrainConfig
    from cluster.launcher import launch
    from stages.pretrain import Pretrain

    cfg = TrainConfig(preset="tiny", tokenizer=str(project_tokenizer), num_workers=2, max_seq_len=64,
                      batch_size=4, accumulation_steps=1, max_steps=3, log_interval=1, max_failures=0,
                      out=str(tmp_path / "out"), storage_path=str(tmp_path / "ray"),
                      cache_dir=str(tmp_path / "cache"))
    with Watch(os.getpid()) as watch:
        launch(cfg, Pretrain())
    watch.assert_loopback_only("RayTrainWorker")  # rank 0 hosts torch's rendezvous store


def test_serve_listens_on_loopback_only(ray_cluster, tiny_checkpoint):
    from ray import serve

    from serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Watch(os.getpid()) as watch:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            serve.run(build_app({"model": str(tiny_checkpoint), "num_cpus": "1"}), name="network-test",
                      route_prefix="/")
            assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
        finally:
            serve.shutdown()
    watch.assert_loopback_only("ServeReplica")  # its inter-deployment gRPC server


@pytest.mark.timeout(240)
def test_serve_run_from_the_readme_listens_on_loopback_only(tiny_checkpoint):
    """`serve run` imports ray before serve.app (which sets the loopback switches), then starts its own cluster.
    With MINIMIND_API_KEY set, the proxy's own /-/routes needs the key too."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.skip("port 8000, which `serve run` always binds, is taken")
    # A fresh shell's environment, plus the API key the README's security section sets.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "__RAY_", "MINIMIND_"))}
    env["MINIMIND_API_KEY"] = key = "sk-network-test"
    serve_cli = Path(sys.executable).with_name("serve")
    proc = subprocess.Popen([str(serve_cli), "run", "serve.app:app", f"model={tiny_checkpoint}", "num_cpus=1"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        with Watch(proc.pid) as watch:
            deadline = time.monotonic() + 180
            while True:
                assert proc.poll() is None, "serve run exited"
                assert time.monotonic() < deadline, "serve run did not answer in 180 s"
                try:
                    if httpx.get("http://127.0.0.1:8000/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(1)
            # Ray Serve's proxy answers /-/routes itself; serve.guard's proxy middleware puts it behind the key.
            routes = httpx.get("http://127.0.0.1:8000/-/routes", timeout=10)
            assert routes.status_code == 401 and routes.json()["error"]["code"] == "invalid_api_key", routes.text
            assert httpx.get("http://127.0.0.1:8000/-/routes", headers={"Authorization": "Bearer nope"},
                             timeout=10).status_code == 401
            assert httpx.get("http://127.0.0.1:8000/-/routes", headers={"Authorization": f"Bearer {key}"},
                             timeout=10).json() == {"/": "default"}  # serve run names the app
            assert httpx.get("http://127.0.0.1:8000/-/healthz", timeout=10).text == "success"  # stays open
    finally:
        os.killpg(proc.pid, 15)  # the CLI takes its cluster down on SIGTERM
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
    watch.assert_loopback_only("ServeReplica")
