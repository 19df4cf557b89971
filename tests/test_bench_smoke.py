"""The training-throughput benchmark in its tiniest CPU mode: it runs all three paths and writes its JSON.
Not a timed test: the figures are not checked, only that every field is there."""
import importlib.util
import json
from pathlib import Path

import pytest

from cluster.config import BUNDLED_DATA

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "train_throughput.py"


def test_train_throughput_quick_cpu(ray_cluster, project_tokenizer, tmp_path):
    spec = importlib.util.spec_from_file_location("train_throughput", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "result.json"
    bench.main(["--quick", "--device", "cpu", "--steps", "4", "--warmup-steps", "2", "--max-docs", "1000",
                "--loader-workers", "0", "--work-dir", str(tmp_path / "work"), "--out", str(out),
                "--data", str(BUNDLED_DATA / "sample_corpus.jsonl"),
                "--tokenizer", str(project_tokenizer)])
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


def test_serve_bench_tiny_without_http(project_tokenizer, tmp_path):
    """The serving benchmark's in-process systems on the tiny preset (the HTTP levels need their own Serve
    instance and are left to the real run): every system of every level is there, greedy output agrees with
    transformers, and the decode floor is measured."""
    spec = importlib.util.spec_from_file_location("bench_serve", BENCH.with_name("bench_serve.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "serve.json"
    bench.main(["--preset", "tiny", "--concurrency", "1", "2", "--max-tokens", "6", "--rounds", "1",
                "--no-serve", "--tokenizer", str(project_tokenizer),
                "--prompts", str(BUNDLED_DATA / "sample_sft.jsonl"), "--out", str(out)])
    result = json.loads(out.read_text())
    got = {(r["system"], r["concurrency"]) for r in result["rows"]}
    assert got == {("hf", 1), ("engine", 1), ("engine-nokv", 1), ("hf-batch", 2), ("engine", 2), ("engine-nokv", 2)}
    for r in result["rows"]:
        assert r["output_tokens"] == 6 * r["requests"] and r["tokens_per_s"] > 0 and r["ttft_ms_mean"] > 0
    assert result["greedy_agreement_tokens"] == 6  # all 6 (--max-tokens); exact logit parity is test_checkpoint's
    assert result["decode_floor_ms_per_token"] > 0 and result["linear_weights_mb"] > 0
    assert "engine c=2 / best hf sequential" in result["ratios"]


def test_prefix_cache_bench_tiny(tmp_path):
    """The prefix-cache benchmark as a user runs it, on the tiny preset: with the cache on, the chats that share
    a system prompt prefill only what follows it (its whole blocks come from the cache)."""
    import subprocess
    import sys
    out = tmp_path / "prefix.json"
    subprocess.run([sys.executable, "bench/bench_prefix_cache.py", "--preset", "tiny", "--concurrency", "1", "3",
                    "--system-tokens", "0", "128", "--new-tokens", "4", "--rounds", "1", "--out", str(out)],
                   cwd=REPO, check=True, timeout=240)
    rows = {(r["system_tokens"], r["concurrency"], r["prefix_cache"]): r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 8
    for system in (0, 128):
        alone = rows[system, 1, "on"]  # one chat: it prefilled its prompt less the cached system prompt's blocks
        assert alone["prefill_positions"] <= alone["prompt_tokens_mean"] - alone["shared_prefix"] // 16 * 16
        assert rows[system, 1, "off"]["prefill_positions"] == rows[system, 1, "off"]["prompt_tokens_mean"]
        assert rows[system, 3, "on"]["prefill_positions"] < rows[system, 3, "off"]["prefill_positions"]
    assert rows[128, 3, "on"]["shared_prefix"] > 128
