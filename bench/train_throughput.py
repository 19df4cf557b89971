"""Training throughput: the real path (Ray Data -> Ray Train worker -> cluster.loop) against MiniMind's way.

For each (preset, seq_len) three runs, one after the other, on the same data:

  ray       the real path: `cluster.launcher.launch(TrainConfig(...), Pretrain())`, 1 worker, packed rows;
            on GPU the 4090 profile (bf16 autocast, fused AdamW, --compile). Steady-state tokens/s, MFU and
            peak memory come from the run's metrics.jsonl, over the records after --warmup-steps.
  replica   the same loop (`cluster.loop.train`) in this process, with its batches already on the device:
            the rate with no data path and no Ray at all. GPU idle of the real path is estimated as
            1 - ray / replica (the time the device spent waiting on Ray Data, reports and host syncs).
  naive     MiniMind's trainer (2025-04 release): a Dataset that calls the HF tokenizer per line with
            padding="max_length", a DataLoader, `torch.autocast` without a dtype (fp16) + GradScaler, no
            compile, unfused AdamW, loss masked by labels != pad. Its GPU idle is measured with CUDA events:
            1 - (sum of the step spans) / (span from the first step's start to the last step's end).

Useful tokens are non-padding tokens: naive, the mask fraction of the very batches it trained on; ray and
replica, 1 - the padding fraction of the packed cache (its manifest).

FLOPs per token (cluster.metrics.flops_per_token): 6 * N_active + 12 * layers * hidden * seq_len, the dense
weights' forward + backward plus attention scores and values (PaLM's convention: full, not causal, attention).
MFU = tokens/s * FLOPs per token / the GPU's dense bf16 peak (cluster.metrics.PEAK_FLOPS; H100 989e12).

    python bench/train_throughput.py                      # GPU: small,base x 512,1024
    python bench/train_throughput.py --quick --device cpu # CPU: tiny preset, seq 128, a few steps (~2 min)

Writes --out (JSON) and prints a table. See bench/NOTES.md for the figures and what each change gained.
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

from cluster.config import TrainConfig, resolve  # noqa: E402
from cluster.metrics import flops_per_token, peak_flops  # noqa: E402
from minimind.config import get_preset  # noqa: E402

DATA = REPO.parent / "shared" / "data"
TOKENIZER_DIR = DATA / "minimind"
GPU_MEMORY_4090_GB = 24.0
FLOPS_FORMULA = "6 * N_active + 12 * num_layers * hidden_size * seq_len"
# Real-path micro-batch on GPU: ~64k tokens per step (what gets small models fast, ANCHORS.md). This is the
# 4090 profile's micro-batch whose peak memory the bench reports against 24 GB.
GPU_TOKENS_PER_MICRO_BATCH = 65536
NAIVE_BATCH_SIZE = 32  # MiniMind's pretrain default


# ---------------------------------------------------------------------------------------------- helpers


def steady_rate(records: list[dict], warmup_steps: int) -> tuple[float, list[dict]]:
    """Tokens/s over the records after warm-up: total tokens / total time (each record covers its window)."""
    steady, tokens, seconds, prev_tokens = [], 0.0, 0.0, 0
    for r in sorted(records, key=lambda r: r["step"]):
        window, prev_tokens = r["tokens"] - prev_tokens, r["tokens"]
        if r["step"] > warmup_steps:
            steady.append(r)
            tokens += window
            seconds += window / r["tokens_per_s"]
    if not steady:
        raise ValueError(f"no metrics record after warm-up step {warmup_steps}; raise --steps")
    return tokens / seconds, steady


def mfu(tokens_per_s: float, flops_token: float, device: torch.device) -> float | None:
    peak = peak_flops(device)
    return round(tokens_per_s * flops_token / peak, 4) if peak else None


def peak_mem_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if device.type == "cuda" else None


def corpus_subset(path: Path, max_docs: int, work: Path) -> Path:
    """The first `max_docs` lines of the corpus as a plain jsonl (kept between runs), or the corpus itself."""
    if not max_docs:
        return path
    out = work / f"{path.name.split('.')[0]}-{max_docs}.jsonl"
    if not out.is_file():
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as src:
            tmp = out.with_suffix(".tmp")
            tmp.write_text("".join(itertools.islice(src, max_docs)), encoding="utf-8")
            os.replace(tmp, out)
    return out


def read_texts(path: Path, n: int) -> list[str]:
    from minimind.tokenizer import iter_jsonl_texts

    return list(itertools.islice(iter_jsonl_texts(path), n))


# ------------------------------------------------------------------------------------------- real path


def train_config(args, preset: str, seq: int, batch: int, work: Path, data: Path) -> TrainConfig:
    gpu = args.device == "cuda"
    return TrainConfig(
        preset=preset, data=(str(data),), tokenizer=args.tokenizer, out=str(work / f"out-{preset}-{seq}"),
        profile="4090" if gpu else "cpu", num_workers=1, cpus_per_worker=args.threads if not gpu else 1,
        batch_size=batch, accumulation_steps=1, max_steps=args.steps, max_seq_len=seq, pack=True,
        lr=5e-4, warmup=0.0, log_interval=args.log_interval, save_interval=0, max_failures=0,
        storage_path=str(work / "ray_results"), cache_dir=str(work / "data_cache"),
        run_name=f"bench-{preset}-{seq}-{int(time.time())}", compile=gpu and not args.no_compile)


def run_ray(cfg: TrainConfig, warmup: int) -> dict:
    from cluster.launcher import launch
    from stages.pretrain import Pretrain
    out = launch(cfg, Pretrain())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    rate, steady = steady_rate(records, warmup)
    last = steady[-1]
    return {"tokens_per_s": rate, "mfu_logged": last.get("mfu"), "peak_mem_gb": last.get("peak_mem_gb"),
            "records": len(records), "final_loss": last["loss"]}


class PreloadedContext:
    """A `cluster.loop` context whose batches are already on the device: the loop without any data path."""

    def __init__(self, cfg: TrainConfig, device: torch.device, batches: list[dict]):
        self.cfg, self.device = cfg, device
        self.resolved = resolve(cfg, 1 if device.type == "cuda" else 0)
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.tokenizer, self.run_name = None, "replica"
        self.micro_batches_per_epoch = cfg.max_steps * cfg.accumulation_steps
        self.scratch_dir = tempfile.mkdtemp(prefix="bench-replica-")
        self._batches = batches

    def print(self, msg: str):
        pass

    def restore_dir(self):
        return None

    def has_validation(self):
        return False

    def batches(self, start: int):
        return itertools.cycle(self._batches)

    def report(self, metrics: dict, write_checkpoint=None):
        pass  # no checkpoint: the replica times the steps only


def run_replica(cfg: TrainConfig, prepared, device: torch.device, warmup: int) -> dict:
    from cluster.shards import iter_local_batches
    from cluster.loop import train
    from stages.pretrain import Pretrain
    batches = list(itertools.islice(iter_local_batches(prepared, cfg.batch_size, seed=cfg.seed, device=device),
                                    min(cfg.max_steps, 16)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    state = train(cfg, Pretrain(), PreloadedContext(cfg, device, batches))
    rate, steady = steady_rate(state.log, warmup)
    return {"tokens_per_s": rate, "peak_mem_gb": peak_mem_gb(device), "final_loss": steady[-1]["loss"]}


# ---------------------------------------------------------------------------------------- naive baseline


class NaivePretrainDataset(torch.utils.data.Dataset):
    """MiniMind's PretrainDataset: the texts held in a list, tokenised per item, padded to max length."""

    def __init__(self, texts: list[str], tokenizer, max_length: int):
        self.texts, self.tokenizer, self.max_length = texts, tokenizer, max_length

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        enc = self.tokenizer(self.texts[i], max_length=self.max_length, padding="max_length", truncation=True,
                             return_tensors="pt")
        ids = enc.input_ids.squeeze(0)
        mask = (ids != self.tokenizer.pad_token_id)
        return ids[:-1], ids[1:], mask[1:].long()


def run_naive(preset: str, seq: int, steps: int, warmup: int, device: torch.device, data: Path,
              loader_workers: int, tokenizer_dir: str) -> dict:
    from transformers import AutoTokenizer

    from minimind.model import MiniMind
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # seq + 1 tokens per row, so the model sees seq positions, like the real path. Loading is not timed.
    dataset = NaivePretrainDataset(read_texts(data, NAIVE_BATCH_SIZE * steps), tokenizer, seq + 1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=NAIVE_BATCH_SIZE, shuffle=True, drop_last=True,
                                         num_workers=loader_workers, pin_memory=device.type == "cuda")
    torch.manual_seed(0)
    model = MiniMind(get_preset(preset)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    ctx = torch.autocast("cuda") if cuda else torch.autocast("cpu", enabled=False)  # no dtype: fp16 on GPU
    loss_fct = torch.nn.CrossEntropyLoss(reduction="none")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    spans, real, slots, loss = [], 0, 0, None
    t0 = None
    for step, (x, y, mask) in enumerate(loader):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        if step >= warmup:
            real += int(mask.sum())  # counted on the host copy: no device sync
            slots += mask.numel()
        x, y, mask = x.to(device), y.to(device), mask.to(device)
        if step >= warmup and cuda:
            spans.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            spans[-1][0].record()
        with ctx:
            logits = model(x).logits
            loss = loss_fct(logits.view(-1, logits.size(-1)).float(), y.view(-1)).view(y.size())
            loss = (loss * mask).sum() / mask.sum()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup and cuda:
            spans[-1][1].record()
    if t0 is None:
        raise ValueError(f"naive loop ran fewer than {warmup} warm-up steps; raise --steps")
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    idle = None
    if spans:
        busy = sum(a.elapsed_time(b) for a, b in spans)
        idle = max(0.0, 1 - busy / spans[0][0].elapsed_time(spans[-1][1]))
    rate = slots / seconds
    return {"tokens_per_s": rate, "useful_tokens_per_s": rate * real / slots, "padding_fraction": 1 - real / slots,
            "peak_mem_gb": peak_mem_gb(device), "gpu_idle_fraction": idle, "final_loss": loss.item(),
            "batch_size": NAIVE_BATCH_SIZE}


# -------------------------------------------------------------------------------------------------- main


def bench_one(args, preset: str, seq: int, work: Path, data: Path) -> list[dict]:
    from cluster.ingest import prepare_dataset
    from cluster.launcher import data_spec, resolve_tokenizer
    from stages.pretrain import Pretrain

    device = torch.device(args.device)
    batch = args.batch_size or (GPU_TOKENS_PER_MICRO_BATCH // seq if device.type == "cuda" else NAIVE_BATCH_SIZE)
    cfg = train_config(args, preset, seq, batch, work, data)
    cfg.validate()
    fpt = flops_per_token(get_preset(preset), seq)
    # Prepared here (cached), so the real path's launch reuses it and we can read its padding fraction.
    prepared = prepare_dataset(data_spec(cfg, Pretrain()), resolve_tokenizer(cfg)[0], cfg.cache_dir)
    packed_padding = prepared.manifest["padding_fraction"]
    common = {"preset": preset, "seq_len": seq, "flops_per_token": fpt}
    rows = []
    if "ray" in args.paths:
        r = run_ray(cfg, args.warmup_steps)
        rows.append({**common, "path": "ray", "batch_size": batch, **r, "padding_fraction": packed_padding,
                     "mem_margin_4090_gb": (round(GPU_MEMORY_4090_GB - r["peak_mem_gb"], 2)
                                            if r["peak_mem_gb"] is not None else None)})
    if "replica" in args.paths:
        r = run_replica(cfg.replace(run_name="replica"), prepared, device, args.warmup_steps)
        rows.append({**common, "path": "replica", "batch_size": batch, **r, "padding_fraction": packed_padding})
    if "naive" in args.paths:
        r = run_naive(preset, seq, args.steps, args.warmup_steps, device, data, args.loader_workers,
                      args.tokenizer)
        rows.append({**common, "path": "naive", **r})
    by_path = {r["path"]: r for r in rows}
    for r in rows:
        r["tokens_per_s"] = round(r["tokens_per_s"], 1)
        r.setdefault("useful_tokens_per_s", r["tokens_per_s"] * (1 - r["padding_fraction"]))
        r["useful_tokens_per_s"] = round(r["useful_tokens_per_s"], 1)
        r["mfu"] = mfu(r["tokens_per_s"], fpt, device)
        if "naive" in by_path:
            r["speedup_useful_vs_naive"] = round(r["useful_tokens_per_s"] / by_path["naive"]["useful_tokens_per_s"], 2)
    if "ray" in by_path and "replica" in by_path:
        # Time the device would not have spent had the batches been waiting on it already (Ray Data, the
        # report barrier). On a shared CPU this is noise-level; it is the GPU idle estimate on a GPU.
        wait = round(max(0.0, 1 - by_path["ray"]["tokens_per_s"] / by_path["replica"]["tokens_per_s"]), 4)
        by_path["ray"]["wait_fraction_vs_replica"] = wait
        by_path["ray"]["gpu_idle_fraction"] = wait if device.type == "cuda" else None
    return rows


def print_table(rows: list[dict]) -> None:
    def fmt(v, spec):
        width = int(spec[1:].split(".")[0])
        return f"{'-':>{width}}" if v is None else format(v, spec)
    header = (f"{'preset':<7} {'seq':>5} {'path':<8} {'batch':>5} {'tok/s':>11} {'useful tok/s':>13} {'MFU':>6} "
              f"{'peak GB':>8} {'idle':>6} {'speed-up':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['preset']:<7} {r['seq_len']:>5} {r['path']:<8} {r['batch_size']:>5} "
              f"{r['tokens_per_s']:>11,.0f} {r['useful_tokens_per_s']:>13,.0f} {fmt(r['mfu'], '>6.1%')} "
              f"{fmt(r['peak_mem_gb'], '>8.2f')} {fmt(r.get('gpu_idle_fraction'), '>6.1%')} "
              f"{fmt(r.get('speedup_useful_vs_naive'), '>7.2f')}x")
    print("useful = non-padding tokens; idle (GPU): ray = 1 - ray/replica tok/s, naive = CUDA-event gaps; "
          "speed-up = useful tok/s over naive's")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="small,base", help="comma-separated model presets")
    p.add_argument("--seq-lens", default="512,1024", help="comma-separated max_seq_len values")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (warm-up included)")
    p.add_argument("--warmup-steps", type=int, default=20, help="steps left out of the steady state")
    p.add_argument("--log-interval", type=int, default=10, help="loop log interval (a host sync each)")
    p.add_argument("--batch-size", type=int, default=0,
                   help=f"real-path micro-batch rows (0: {GPU_TOKENS_PER_MICRO_BATCH} tokens / seq on GPU, "
                        f"on CPU the naive batch, {NAIVE_BATCH_SIZE})")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--data", default=str(DATA / "poetry" / "poems.train.jsonl.gz"))
    p.add_argument("--tokenizer", default=str(TOKENIZER_DIR), help="tokenizer directory (MiniMind's by default)")
    p.add_argument("--max-docs", type=int, default=0, help="use only the first N documents (0: all)")
    p.add_argument("--paths", default="ray,replica,naive", help="which of ray, replica, naive to run")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU only: torch threads in this process and CPUs of the Ray worker (same for all paths)")
    p.add_argument("--loader-workers", type=int, default=1, help="naive DataLoader workers (MiniMind: 1)")
    p.add_argument("--no-compile", action="store_true", help="GPU: run the real path without torch.compile")
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "minimind-train-throughput"),
                   help="data subset, tokenised cache, Ray storage (kept between runs)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "train_throughput.json"))
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke size: tiny preset, seq 128, 12 steps (4 warm-up), 5,000 documents")
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        # Smaller defaults; flags given on the command line still win.
        p.set_defaults(presets="tiny", seq_lens="128", steps=12, warmup_steps=4, log_interval=2, max_docs=5000)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.presets = [s for s in args.presets.split(",") if s]
    args.seq_lens = [int(s) for s in args.seq_lens.split(",") if s]
    args.paths = [s for s in args.paths.split(",") if s]
    if args.warmup_steps % args.log_interval or args.steps <= args.warmup_steps:
        raise SystemExit("--warmup-steps must be a multiple of --log-interval and below --steps")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)  # Ray gives its worker OMP_NUM_THREADS = its CPUs: same here
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = corpus_subset(Path(args.data), args.max_docs, work)
    import ray
    owns_ray = not ray.is_initialized()
    rows = []
    try:
        for preset, seq in itertools.product(args.presets, args.seq_lens):
            rows += bench_one(args, preset, seq, work, data)
    finally:
        if owns_ray and ray.is_initialized():
            ray.shutdown()
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else f"main({argv})",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s))",
        "torch": torch.__version__, "ray": ray.__version__, "flops_per_token_formula": FLOPS_FORMULA,
        "peak_flops": peak_flops(device), "settings": {k: v for k, v in vars(args).items()}, "results": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_table(rows)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
