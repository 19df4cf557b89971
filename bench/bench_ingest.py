"""Benchmark the data ingest (cluster/ingest.py) against MiniMind's way and a bare tokenizer loop.

Rows, side by side in one run on the poetry corpus (pretrain format, rows of --seq-len + 1 tokens), each
measurement in a fresh Python process:
  bare loop            one process: gunzip, json.loads and `tokenizers` encode, line by line ("bare encode only":
                       the encode calls alone, i.e. the tokenizer's own speed on one core)
  MiniMind's way       a torch Dataset holding the lines in memory whose __getitem__ calls the Hugging Face
                       tokenizer with max-length padding, through a DataLoader (num_workers=0); on the first
                       --hf-lines lines, as it is slow
  Ray ingest           prepare_dataset into a fresh cache on a local Ray cluster of --cpus CPUs (after a small
                       warm-up run that starts Ray's workers): packed, --no-pack, and packed on the corpus twice
                       over (the same file under a second name), to check that peak memory stays flat; and
                       packed on a 1-CPU cluster, Ray's overhead against the one-process bare loop
  worker read          one training worker's Ray Data iter_torch_batches over the packed cache

tokens/s counts real (non-pad) tokens. tok/CPU-s divides by the CPU time the measurement used (for Ray: the
driver and every Ray process), which a busy shared machine disturbs less than wall time; the 16-CPU projection
uses it. drv CPU-s/Mtok: CPU seconds of the driver process alone (time.process_time) per million tokens, the
part that does not scale out with the cluster (the tasks write the shards; the driver collects their metadata
and writes the manifest). RSS MB: peak RSS of the measuring process (for Ray: the driver). Ray PSS: peak summed
PSS of the driver and all Ray processes (PSS splits shared object-store pages between the processes mapping
them). The load average is recorded because the machine is shared.

Usage: python bench/bench_ingest.py [--corpus FILE] [--seq-len 512] [--hf-lines 50000] [--cpus 2] [--ray-only]
(--ray-only: just the packed Ray ingest rows, on --cpus CPUs and on 1.)
Writes bench/results/ingest.json.
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
TOKENIZER = DATA / "minimind"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------- baselines


def bare_loop(args) -> dict:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    tokens = lines = 0
    encode_s = 0.0
    start, cpu = time.perf_counter(), time.process_time()
    with gzip.open(args.corpus, "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            t = time.perf_counter()
            tokens += len(tok.encode(text, add_special_tokens=False).ids)
            encode_s += time.perf_counter() - t
            lines += 1
    return {"lines": lines, "tokens": tokens, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu, "encode_seconds": encode_s, "peak_rss_mb": _peak_rss_mb()}


def minimind_way(args) -> dict:
    from torch.utils.data import DataLoader, Dataset
    from transformers import AutoTokenizer

    class PretrainDataset(Dataset):
        """MiniMind's pretrain Dataset: all samples in memory, tokenised per item, padded to max_length."""

        def __init__(self, path, tokenizer, max_length, n_lines):
            self.tokenizer, self.max_length = tokenizer, max_length
            with gzip.open(path, "rt", encoding="utf-8") as f:
                self.samples = [json.loads(line) for line in itertools.islice(f, n_lines or None)]

        def __len__(self):
            return len(self.samples)

        def __getitem__(self, index):
            encoding = self.tokenizer(str(self.samples[index]["text"]), max_length=self.max_length,
                                      padding="max_length", truncation=True, return_tensors="pt")
            input_ids = encoding.input_ids.squeeze()
            loss_mask = input_ids != self.tokenizer.pad_token_id
            return input_ids[:-1], input_ids[1:], loss_mask[1:].long()

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    start, cpu = time.perf_counter(), time.process_time()
    ds = PretrainDataset(args.corpus, tok, args.seq_len + 1, args.hf_lines)
    tokens = rows = 0
    for x, y, _ in DataLoader(ds, batch_size=32, num_workers=0):
        tokens += int((x != tok.pad_token_id).sum()) + int((y[:, -1] != tok.pad_token_id).sum())
        rows += len(x)
    return {"lines": rows, "tokens": tokens, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu, "padding_fraction": 1 - tokens / (rows * (args.seq_len + 1)),
            "peak_rss_mb": _peak_rss_mb()}


class TreeMonitor:
    """Samples this process and its descendants (the local Ray cluster): peak RSS of this process, peak PSS of
    the whole tree (PSS shares the object store's pages out fairly; summed RSS would count them once per
    process), and the CPU seconds the tree used meanwhile."""

    def __init__(self, interval: float = 1.0):
        import psutil
        self.proc, self.interval = psutil.Process(), interval
        self.driver_rss = self.tree_pss = 0
        self.own_cpu = 0.0
        self._start_cpu = self._cpu()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self):
        return [self.proc] + self.proc.children(recursive=True)

    def _cpu(self) -> dict:
        out = {}
        for p in self._tree():
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except Exception:  # exited meanwhile
                pass
        return out

    def _run(self):
        start = time.thread_time()
        while not self._stop.is_set():
            pss = 0
            for p in self._tree():
                try:
                    pss += p.memory_full_info().pss
                except Exception:
                    pass
            self.driver_rss = max(self.driver_rss, self.proc.memory_info().rss)
            self.tree_pss = max(self.tree_pss, pss)
            self.own_cpu = time.thread_time() - start  # reading /proc/*/smaps is not the pipeline's work
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        end = self._cpu()
        self.cpu_seconds = sum(t - self._start_cpu.get(pid, 0.0) for pid, t in end.items()) - self.own_cpu


def ray_ingest(args) -> dict:
    """prepare_dataset into a fresh cache, after a small warm-up run that starts Ray's worker processes."""
    import ray.data

    from cluster.ingest import DataSpec, prepare_dataset
    from cluster.runtime import init_ray
    from minimind.tokenizer import Tokenizer
    init_ray(num_cpus=args.cpus)
    ray.data.DataContext.get_current().enable_progress_bars = False
    tok = Tokenizer.from_dir(TOKENIZER)
    cache = Path(args.cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    warm = cache.parent / "warmup.jsonl"
    with gzip.open(args.corpus, "rt", encoding="utf-8") as f:
        warm.write_text("".join(itertools.islice(f, 2000)), encoding="utf-8")
    prepare_dataset(DataSpec((str(warm),), "pretrain", args.seq_len), tok, cache.parent / "warmup")
    paths = [args.corpus]
    for i in range(1, args.copies):  # the same file under other names: a corpus k times as large
        alias = cache.parent / f"copy{i}-{Path(args.corpus).name}"
        alias.unlink(missing_ok=True)
        alias.symlink_to(Path(args.corpus).resolve())
        paths.append(str(alias))
    with TreeMonitor() as mon:
        start, driver_cpu = time.perf_counter(), time.process_time()
        prepared = prepare_dataset(DataSpec(tuple(paths), "pretrain", args.seq_len, pack=args.pack), tok, cache)
        seconds, driver_cpu = time.perf_counter() - start, time.process_time() - driver_cpu
    m = prepared.manifest
    result = {"lines": m["records"], "tokens": m["real_tokens"], "seconds": seconds, "cpu_seconds": mon.cpu_seconds,
              "driver_cpu_seconds": driver_cpu, "shards": len(m["shards"]),
              "rows": m["rows"], "padding_fraction": m["padding_fraction"],
              "peak_rss_mb": mon.driver_rss / 2**20, "cluster_peak_pss_mb": mon.tree_pss / 2**20,
              "path": str(prepared.path)}
    ray.shutdown()
    return result


def worker_read(args) -> dict:
    """One training worker's batches (Ray Data iter_torch_batches) over the dataset ray_ingest wrote."""
    import ray.data

    from cluster.shards import Prepared, WorkerShard
    from cluster.runtime import init_ray
    init_ray(num_cpus=args.cpus)
    ray.data.DataContext.get_current().enable_progress_bars = False
    prepared = Prepared.load(args.cache)
    shard = WorkerShard(tuple(prepared.shard_files), prepared.shard_rows, seed=0)
    list(shard.iter_epoch(1, 32, skip_batches=shard.steps_per_epoch(32) - 1))  # start the read workers
    start = time.perf_counter()
    tokens = rows = 0
    for batch in shard.iter_epoch(0, 32):
        tokens += int(batch["length"].sum())
        rows += len(batch["length"])
    result = {"rows": rows, "tokens": tokens, "seconds": time.perf_counter() - start}
    ray.shutdown()
    return result


WORKERS = {"bare": bare_loop, "minimind": minimind_way, "ray": ray_ingest, "read": worker_read}


def run(kind: str, args, **extra) -> dict:
    """Run one measurement in a fresh Python process, so that memory and warm state do not carry over."""
    flags = {"corpus": args.corpus, "seq_len": args.seq_len, "hf_lines": args.hf_lines, "cpus": args.cpus,
             **extra}
    cmd = [sys.executable, __file__, "--worker", kind]
    for k, v in flags.items():
        if isinstance(v, bool):
            cmd.append(f"--{k.replace('_', '-')}" if v else f"--no-{k.replace('_', '-')}")
        else:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------- main


def _add_rates(results: dict) -> None:
    for r in results.values():
        r.pop("path", None)  # a temporary directory, gone now
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        if "cpu_seconds" in r:
            r["tokens_per_cpu_s"] = r["tokens"] / r["cpu_seconds"]
        if "driver_cpu_seconds" in r:
            r["driver_cpu_s_per_mtok"] = r["driver_cpu_seconds"] / r["tokens"] * 1e6


def _print_table(results: dict) -> None:
    print(f"\n{'':44s} {'lines':>8s} {'tokens':>11s} {'wall s':>7s} {'tokens/s':>10s} {'tok/CPU-s':>10s} "
          f"{'padding':>7s} {'RSS MB':>7s} {'Ray PSS':>8s} {'drv CPU-s/Mtok':>14s}")
    for name, r in results.items():
        cell = lambda key, fmt: format(r[key], fmt) if key in r else ""  # noqa: E731
        pad = f"{100 * r['padding_fraction']:.1f}%" if "padding_fraction" in r else ""
        print(f"{name:44s} {cell('lines', ',d'):>8s} {r['tokens']:>11,d} {r['seconds']:>7.1f} "
              f"{r['tokens_per_s']:>10,.0f} {cell('tokens_per_cpu_s', ',.0f'):>10s} {pad:>7s} "
              f"{cell('peak_rss_mb', '.0f'):>7s} {cell('cluster_peak_pss_mb', '.0f'):>8s} "
              f"{cell('driver_cpu_s_per_mtok', '.3f'):>14s}")


def _report(results: dict, args) -> None:
    """--ray-only: the table and the JSON, no comparison with the baselines."""
    _add_rates(results)
    _print_table(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:])
    Path(args.out).write_text(json.dumps({"results": results, "summary": {"command": command,
                                                                          "load_average": os.getloadavg()}},
                                         indent=1) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=str(DATA / "poetry" / "poems.train.jsonl.gz"))
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--hf-lines", type=int, default=50_000, help="lines for MiniMind's way (0: all)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--ray-only", action="store_true", help="only the packed Ray ingest, on --cpus CPUs and on 1")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "ingest.json"))
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--copies", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return

    load_before = os.getloadavg()
    hf_name = f"MiniMind's way ({args.hf_lines:,} lines)" if args.hf_lines else "MiniMind's way"
    ray_name = f"Ray ingest, {args.cpus} CPUs"
    results = {}
    if not args.ray_only:
        results["bare loop (read + parse + encode)"] = run("bare", args)
        bare = results["bare loop (read + parse + encode)"]
        results["bare encode only"] = {"lines": bare["lines"], "tokens": bare["tokens"],
                                       "seconds": bare["encode_seconds"]}
        results[hf_name] = run("minimind", args)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        results[f"{ray_name}, packed"] = run("ray", args, cache=f"{tmp}/packed/cache")
        results["Ray ingest, 1 CPU, packed"] = run("ray", args, cache=f"{tmp}/one/cache", cpus=1)
        if args.ray_only:
            _report(results, args)
            return
        results[f"{ray_name}, --no-pack"] = run("ray", args, cache=f"{tmp}/padded/cache", pack=False)
        results[f"{ray_name}, packed, corpus x2"] = run("ray", args, cache=f"{tmp}/twice/cache", copies=2)
        packed_path = results[f"{ray_name}, packed"]["path"]
        results["worker read (iter_torch_batches, 1 worker)"] = run("read", args, cache=packed_path)
    _add_rates(results)

    ray_packed = results[f"{ray_name}, packed"]
    summary = {
        "speedup_vs_minimind": ray_packed["tokens_per_s"] / results[hf_name]["tokens_per_s"],
        "ray_wall_vs_bare_loop": ray_packed["tokens_per_s"] / bare["tokens_per_s"],
        "ray_cpu_efficiency_vs_bare_loop": ray_packed["tokens_per_cpu_s"] / bare["tokens_per_cpu_s"],
        "ray_1cpu_wall_vs_bare_loop": results["Ray ingest, 1 CPU, packed"]["tokens_per_s"] / bare["tokens_per_s"],
        "projected_16_cpu_tokens_per_s": 16 * ray_packed["tokens_per_cpu_s"],
        "h100_26m_train_tokens_per_s": 1.3e6,
        "padding_fraction": {"packed": ray_packed["padding_fraction"],
                             "no_pack": results[f"{ray_name}, --no-pack"]["padding_fraction"]},
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:]),
    }
    _print_table(results)
    print(f"\nRay ingest: {summary['speedup_vs_minimind']:.1f}x MiniMind's way; "
          f"{summary['ray_wall_vs_bare_loop']:.2f}x the one-process bare loop in wall time "
          f"(1 CPU: {summary['ray_1cpu_wall_vs_bare_loop']:.2f}x) and "
          f"{summary['ray_cpu_efficiency_vs_bare_loop']:.0%} of its tokens per CPU-second, so 16 CPUs give "
          f"~{summary['projected_16_cpu_tokens_per_s'] / 1e6:.1f}M tokens/s (an H100 trains the 26M model at "
          f"~1.3M). Load average {load_before[0]:.1f} -> {summary['load_average_after'][0]:.1f} on "
          f"{os.cpu_count()} CPUs.")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"results": results, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
