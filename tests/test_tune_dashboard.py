"""`tune/sweep.py --dashboard`, end to end: a one-trial sweep (a subprocess) on a dedicated one-node cluster with
the dashboard on 127.0.0.1, loaded in headless Chromium, showing the sweep's trials and the metrics their
workers printed.

Dedicated, started with `ray start` and ports of its own: `ray.init` gives every embedded cluster the
dashboard agent port 52365, so a second one on the machine (the session cluster of this very pytest run)
leaves the newcomer without the agent that serves logs ("Agent for node id ... doesn't exist", measured).
The head runs under `timeout`, in its own session: it ends with the test, or by itself."""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from cluster.config import BUNDLED_DATA
from loopback_cluster import CLUSTER_ENV, RAY, free_ports
from test_serve import Browser, chromium  # noqa: F401  (the Chromium driver and its fixture)

REPO = Path(__file__).resolve().parents[1]


def start_head(tmp: Path) -> tuple[subprocess.Popen, str, str]:
    """A one-node cluster with 4 CPUs and the dashboard; returns (process, GCS address, dashboard URL)."""
    gcs, dash, client, listen, grpc, metrics, rt_env = free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="rtd-", dir="/tmp")  # Ray's socket paths must stay short
    cmd = ["timeout", "600", RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--num-cpus=4", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={listen}", f"--dashboard-agent-grpc-port={grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}", f"--temp-dir={temp_dir}",
           "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env={**os.environ, **CLUSTER_ENV}, stdout=open(tmp / "head.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, (tmp / "head.log").read_text()
        try:
            if httpx.get(f"{url}/api/v0/nodes", timeout=5).json()["data"]["result"]["result"]:
                return proc, f"127.0.0.1:{gcs}", url
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        assert time.monotonic() < deadline, (tmp / "head.log").read_text()
        time.sleep(1)


def start_sweep(tmp: Path, project_tokenizer: Path, address: str) -> subprocess.Popen:
    poems = BUNDLED_DATA / "sample_corpus.jsonl"
    cmd = [sys.executable, str(REPO / "tune" / "sweep.py"), "--dashboard", "--linger", "120",
           "--stage", "pretrain", "--param", "lr=grid:1e-3", "--storage-path", str(tmp / "runs"),
           "--name", "dash", "--set", "preset=tiny", "max_seq_len=64", "batch_size=8", "accumulation_steps=1",
           "num_workers=2", "cpus_per_worker=0.5", "max_steps=2", "log_interval=1", "max_failures=0",
           f"data={poems}", f"tokenizer={project_tokenizer}", f"cache_dir={tmp / 'cache'}"]
    return subprocess.Popen(cmd, cwd=tmp, env={**os.environ, **CLUSTER_ENV, "RAY_ADDRESS": address},
                            stdout=open(tmp / "sweep.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_line(log: Path, proc: subprocess.Popen, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found
        assert proc.poll() is None, f"the sweep exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"no {pattern!r} in the sweep's output:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, first=signal.SIGINT) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, first)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever it started and left
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.mark.timeout(400)
def test_sweep_dashboard_shows_trials_and_their_metrics(project_tokenizer, chromium, tmp_path):  # noqa: F811
    head, address, dashboard = start_head(tmp_path)
    proc, browser = None, None
    try:
        proc = start_sweep(tmp_path, project_tokenizer, address)
        url = wait_for_line(tmp_path / "sweep.log", proc, r"Ray dashboard: (http://[\d.:]+)", 120).group(1)
        assert url == dashboard
        wait_for_line(tmp_path / "sweep.log", proc, r"the dashboard stays up", 240)  # the sweep is over
        results = json.loads((tmp_path / "runs" / "dash" / "results.json").read_text())
        assert [r["status"] for r in results] == ["done"]

        # The actors the page lists, as its own REST call returns them: each trial, and its Train workers.
        actors = httpx.get(f"{url}/logical/actors", timeout=30).json()["data"]["actors"].values()
        trials = [a for a in actors if a["reprName"] == "pretrain_trial"]  # Tune's trainable, by its name
        workers = [a for a in actors if a["actorClass"] == "RayTrainWorker"]
        assert len(trials) == 1 and len(workers) == 2

        browser = Browser(chromium, tmp_path / "profile")
        page = "document.readyState === 'complete' && document.body && document.body.innerText"
        browser.call("Page.navigate", url=f"{url}/#/actors")
        listed = browser.wait_for(page.replace("document.body.innerText", "document.body.innerText.includes("
                                               "'RayTrainWorker') && document.body.innerText"), timeout=90)
        assert "TrainController" in listed or "ImplicitFunc" in listed or "RayTrainWorker" in listed
        # Each trial's page (Tune's trainable, named after the stage), and a worker's page with its log:
        # the progress lines that carry each step's loss.
        for a in trials:
            browser.call("Page.navigate", url=f"{url}/#/actors/{a['actorId']}")
            shown = browser.wait_for(page.replace("document.body.innerText", "document.body.innerText.includes("
                                                  "'pretrain_trial') && document.body.innerText"), timeout=60)
            (tmp_path / f"trial_{a['actorId']}.txt").write_text(shown)
        seen = []
        for w in workers:
            browser.call("Page.navigate", url=f"{url}/#/actors/{w['actorId']}")
            browser.wait_for("[...document.querySelectorAll('[role=tab], button')]"
                             ".some(e => e.innerText.trim() === 'STDOUT')", timeout=60)
            browser.eval("[...document.querySelectorAll('[role=tab], button')]"
                         ".find(e => e.innerText.trim() === 'STDOUT').click()")
            # Rank 0 prints the progress lines; the other rank's log has none, so its wait is short.
            try:
                seen.append(browser.wait_for(page.replace("document.body.innerText", "/2\\/2 loss/.test("
                                                          "document.body.innerText) && document.body.innerText"),
                                             timeout=8))
            except AssertionError:
                seen.append(browser.eval(page))
        progress = [line for text in seen for line in text.splitlines() if re.search(r"\] 2/2 loss \d", line)]
        assert len(progress) == 1, seen  # rank 0 printed its last step
    finally:
        if browser is not None:
            browser.close()
        if proc is not None:
            stop(proc)  # SIGINT ends --linger
        stop(head, signal.SIGTERM)
    assert proc.returncode == 0, (tmp_path / "sweep.log").read_text()[-3000:]
