"""Prefill scheduling of the serving engine: TTFT and throughput with prompts of mixed lengths, per prefill
budget (EngineConfig.prefill_tokens: padded prompt positions one prefill forward may take), in this process.

At each concurrency c, c greedy requests (EOS ignored, --new-tokens each) are submitted at once; prompt lengths
are drawn log-uniformly from --prompt-tokens MIN MAX (random ids, fixed seed), so short and long prompts mix.
TTFT = submission to the first flush after the request's first token (queueing included): the engine's
on_flush is when serve.engine_process ships the Deltas piled up so far to the HTTP side, so this is the first
token as a client of the service can see it. TPOT = (finish - first token) / (tokens - 1); tokens/s = all
output tokens / wall time of the level. Budgets alternate round by round
(best round of each, by wall time), so every budget sees the same machine load.

  python bench/bench_prefill.py                                    # small preset, budgets 64 .. 2048 (~3 min)
  python bench/bench_prefill.py --budgets 512 1024 --concurrency 32 64
Prints a table and writes bench/results/prefill.json.
"""
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from engine_bench import random_checkpoint, run_burst as run_level, write_result  # noqa: E402


@dataclass
class BenchConfig:
    preset: str = field(default="small", metadata={"help": "model preset (random weights)"})
    concurrency: tuple[int, ...] = field(default=(1, 8, 32), metadata={"help": "concurrency levels"})
    budgets: tuple[int, ...] = field(default=(64, 256, 1024, 2048), metadata={
        "help": "prefill_tokens settings to compare (a budget below a prompt's length chunks it)"})
    prompt_tokens: tuple[int, ...] = field(default=(16, 512), metadata={"help": "MIN MAX prompt length"})
    new_tokens: int = field(default=64, metadata={"help": "output tokens per request"})
    rounds: int = field(default=2, metadata={"help": "alternating rounds; each budget keeps its best"})
    threads: int = field(default=2, metadata={"help": "torch threads"})
    out: str = field(default=str(REPO / "bench" / "results" / "prefill.json"), metadata={"help": "JSON output"})


def mixed_lengths(n: int, low: int, high: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return [int(round(low * (high / low) ** x)) for x in u.tolist()]


def main(argv=None):
    from minimind.configcli import parse_config
    from serve.engine import EngineConfig, load_engine
    cfg = parse_config(BenchConfig, argv, description=__doc__.split("\n")[0], prog="bench/bench_prefill.py")
    low, high = cfg.prompt_tokens
    torch.set_num_threads(cfg.threads)
    ckpt, tok = random_checkpoint(cfg.preset)
    top = max(cfg.concurrency)
    g = torch.Generator().manual_seed(2)
    lengths = mixed_lengths(top, low, high)
    prompts = [torch.randint(3, tok.vocab_size, (n,), generator=g).tolist() for n in lengths]
    max_len = high + cfg.new_tokens + 8
    flushes = {b: [] for b in cfg.budgets}  # perf_counter() of every on_flush, per engine (append-only: sorted)
    engines = {b: load_engine(ckpt, EngineConfig(max_batch=top, max_len=max_len, prefill_tokens=b),
                              on_flush=lambda f=flushes[b]: f.append(time.perf_counter())) for b in cfg.budgets}
    result = {"command": " ".join(["python", "bench/bench_prefill.py", *(argv or sys.argv[1:])]),
              "preset": cfg.preset, "threads": cfg.threads, "new_tokens": cfg.new_tokens,
              "prompt_lengths": lengths, "torch": torch.__version__, "rows": []}
    try:
        for budget, engine in engines.items():  # warm-up: first-call allocations out of the timed rounds
            run_level(engine, flushes[budget], prompts[:2], 4)
        for c in cfg.concurrency:
            best = {}
            for _ in range(cfg.rounds):
                for budget, engine in engines.items():
                    r = run_level(engine, flushes[budget], prompts[:c], cfg.new_tokens)
                    if budget not in best or r["wall_s"] < best[budget]["wall_s"]:
                        best[budget] = r
            for budget, r in best.items():
                result["rows"].append({"prefill_tokens": budget, "concurrency": c, **r})
    finally:
        for engine in engines.values():
            engine.shutdown()
    print(f"engine, {cfg.preset} preset (random weights), prompts of {low}..{high} tokens (log-uniform), "
          f"{cfg.new_tokens} greedy tokens per request, {cfg.threads} threads")
    print(f"{'budget':>7}{'conc':>6}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT ms':>9}{'tokens/s':>10}{'prefills':>9}")
    for r in result["rows"]:
        print(f"{r['prefill_tokens']:>7}{r['concurrency']:>6}{r['ttft_p50_ms']:>10.0f}{r['ttft_p99_ms']:>10.0f}"
              f"{r['tpot_ms']:>9.1f}{r['tokens_per_s']:>10.0f}{r['prefill_forwards']:>9}")
    write_result(result, cfg.out)


if __name__ == "__main__":
    main()
