"""Loggers write real, readable files offline (TensorBoard, SwanLab, wandb); the loss plot is a real PNG."""
import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.loggers import RunLoggers
from cluster.plots import plot_loss

RECORDS = [  # what cluster.loop emits: val_loss only on eval steps, a string field that is not a metric
    ({"step": 1, "tokens": 512, "loss": 8.5, "lr": 1e-4, "stage": "pretrain"}, 1),
    ({"step": 2, "tokens": 1024, "loss": 7.25, "lr": 2e-4, "val_loss": 7.5}, 2),
    ({"step": 3, "tokens": 1536, "loss": 6.0, "lr": 3e-4}, 3),
]
CONFIG = {"lr": 3e-4, "out": Path("/tmp/x"), "preset": "tiny"}


def _read_tfevents(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of a TensorBoard event file, read as TFRecords (len, crc, event proto, crc) without tensorflow."""
    from tensorboardX.proto.event_pb2 import Event
    out, data, i = {}, path.read_bytes(), 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        event = Event.FromString(data[i + 12:i + 12 + n])
        i += 12 + n + 4
        for v in event.summary.value:
            if v.HasField("simple_value"):
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
            elif v.HasField("tensor") and v.tensor.float_val:
                out.setdefault(v.tag, []).append((event.step, v.tensor.float_val[0]))
    return out


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    with RunLoggers(["tensorboard"], "run-a", CONFIG, tmp_path) as lg:
        for record, step in RECORDS:
            lg.log(record, step)
    (event_file,) = tmp_path.glob("events.out.tfevents.*")
    assert lg.paths == {"tensorboard": tmp_path}
    scalars = _read_tfevents(event_file)
    assert scalars["loss"] == [(1, 8.5), (2, 7.25), (3, 6.0)]
    assert scalars["val_loss"] == [(2, 7.5)]
    assert [s for s, _ in scalars["tokens"]] == [1, 2, 3]
    assert "stage" not in scalars and "step" not in scalars


def _read_swanlab(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader
    (run_file,) = run_dir.glob("run-*.swanlab")
    reader, out = DataStoreReader(), {}
    reader.open(run_file)
    while (raw := reader.scan()) is not None:
        rec = Record.FromString(raw)
        if rec.HasField("scalar"):
            out.setdefault(rec.scalar.key, []).append((rec.scalar.step, rec.scalar.value.number))
    reader.close()
    return out


def test_swanlab_offline_run_holds_the_metrics(tmp_path):
    with RunLoggers(["swanlab"], "run-b", CONFIG, tmp_path, project="minimind-test") as lg:
        for record, step in RECORDS:
            lg.log(record, step)
    run_dir = lg.paths["swanlab"]
    assert run_dir.parent == tmp_path / "swanlog" and run_dir.is_dir()
    scalars = _read_swanlab(run_dir)
    assert scalars["loss"] == [(1, 8.5), (2, 7.25), (3, 6.0)]
    assert scalars["val_loss"] == [(2, 7.5)]
    assert "stage" not in scalars
    assert "/tmp/x" in (run_dir / "files" / "config.yaml").read_text()


def test_wandb_offline_run_directory(tmp_path):
    assert os.environ.get("WANDB_MODE") == "offline"  # set by conftest: no network
    with RunLoggers(["wandb", "tensorboard"], "run-c", CONFIG, tmp_path) as lg:
        for record, step in RECORDS:
            lg.log(record, step)
    run_dir = lg.paths["wandb"]
    assert run_dir.parent == tmp_path / "wandb" and run_dir.name.startswith("offline-run-")
    assert list(run_dir.glob("run-*.wandb")) and list(tmp_path.glob("events.out.tfevents.*"))


def test_unknown_logger_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown logger 'mlflow'; choose from wandb, tensorboard, swanlab"):
        RunLoggers(["tensorboard", "mlflow"], "r", {}, tmp_path)
    assert not list(tmp_path.glob("events.out.tfevents.*"))  # refused before any tracker started


def _write_metrics(path: Path, with_val: bool) -> Path:
    lines = []
    for step in range(1, 41):
        rec = {"step": step, "tokens": step * 4096, "loss": 9.0 * math.exp(-step / 15) + 2.0, "lr": 1e-3}
        if with_val and step % 10 == 0:
            rec["val_loss"] = rec["loss"] + 0.3
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("with_val", [True, False])
def test_plot_loss_writes_a_png(tmp_path, with_val):
    from PIL import Image
    out = plot_loss(_write_metrics(tmp_path / "metrics.jsonl", with_val), tmp_path / "sub" / "loss.png", "tiny")
    assert out == tmp_path / "sub" / "loss.png"
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] >= 600 and img.size[1] >= 400
        # more than a blank canvas: a drawn curve gives many distinct colours
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 50
    assert out.stat().st_size > 10_000


def test_plot_loss_bad_line_names_file_and_line(tmp_path):
    path = _write_metrics(tmp_path / "metrics.jsonl", False)
    path.write_text(path.read_text() + "{oops\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:41: not valid JSON"):
        plot_loss(path, tmp_path / "loss.png")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no records with tokens and loss"):
        plot_loss(tmp_path / "empty.jsonl", tmp_path / "loss.png")


_WATCHED = """
import sys, time
from cluster.loggers import RunLoggers
lg = RunLoggers(["swanlab", "tensorboard", "wandb"], "net", {{}}, {dir!r})
for step in range(1, 30):
    lg.log({{"loss": 1.0 / step}}, step)
    time.sleep(0.1)
print("LOGGING", flush=True)
time.sleep(2)
lg.close()
"""


def _loopback(host: str) -> bool:
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1") or host.startswith("::ffff:127.")


def test_loggers_open_no_remote_connection(tmp_path):
    """Every tracker offline: while they log, neither the process nor its children (wandb-core) hold an
    internet socket to a non-loopback peer or bound beyond loopback (sampled while it logs)."""
    import psutil
    proc = subprocess.Popen([sys.executable, "-c", _WATCHED.format(dir=str(tmp_path))],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    bad, samples = [], 0
    try:
        while proc.poll() is None:
            try:
                root = psutil.Process(proc.pid)
                for p in [root, *root.children(recursive=True)]:
                    for c in p.net_connections(kind="inet"):
                        if not _loopback(c.laddr.ip) or (c.raddr and not _loopback(c.raddr.ip)):
                            bad.append((p.name(), c))
                samples += 1
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.2)
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == 0 and "LOGGING" in proc.stdout.read()
    assert samples >= 5 and not bad, bad
