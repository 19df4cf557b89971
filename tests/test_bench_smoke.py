"""The training-throughput benchmark in its tiniest CPU mode: it runs all three paths and writes its JSON.
Not a timed test: the figures are not checked, only that every field is there."""
import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train_throughput.py"


def test_train_throughput_quick_cpu(ray_cluster, shared_data, tmp_path):
    spec = importlib.util.spec_from_file_location("train_throughput", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "result.json"
    bench.main(["--quick", "--device", "cpu", "--steps", "4", "--warmup-steps", "2", "--max-docs", "1000",
                "--loader-workers", "0", "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"command", "device", "torch", "flops_per_token_formula", "results"} <= set(result)
    rows = {r["path"]: r for r in result["results"]}
    assert set(rows) == {"ray", "replica", "naive"}
    for r in rows.values():
        assert {"preset", "seq_len", "tokens_per_s", "useful_tokens_per_s", "mfu", "peak_mem_gb",
                "speedup_useful_vs_naive", "flops_per_token"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["useful_tokens_per_s"] <= r["tokens_per_s"]
    assert rows["ray"]["final_loss"] == rows["replica"]["final_loss"]  # same loop, same batches
    assert 0 < rows["naive"]["padding_fraction"] < 1
    assert "gpu_idle_fraction" in rows["ray"] and "wait_fraction_vs_replica" in rows["ray"]
