"""The serving engine with and without packed linears (serve.engine.PackedLinear: the blocks' weights reordered
once for oneDNN, as vLLM's CPU backend does), on one random-weight checkpoint of --preset, in this process.

At each concurrency c, c greedy requests (EOS ignored, --new-tokens each, --prompt-tokens random ids) are
submitted at once; tokens/s = all output tokens / wall time (prefills included), ms/step = wall time / decode
steps. The two settings alternate round by round (best of --rounds each), so both see the same machine load.

  python bench/bench_packed_linear.py         # small preset, c = 1, 8, 32, 64 tokens (~2 min)
Prints a table and writes bench/results/packed_linear.json.
"""
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from engine_bench import random_checkpoint, write_result  # noqa: E402


@dataclass
class BenchConfig:
    preset: str = field(default="small", metadata={"help": "model preset (random weights)"})
    concurrency: tuple[int, ...] = field(default=(1, 8, 32), metadata={"help": "concurrency levels"})
    new_tokens: int = field(default=64, metadata={"help": "output tokens per request"})
    prompt_tokens: int = field(default=32, metadata={"help": "prompt tokens per request"})
    rounds: int = field(default=3, metadata={"help": "alternating rounds; the best of each setting is kept"})
    threads: int = field(default=2, metadata={"help": "torch threads"})
    out: str = field(default=str(REPO / "bench" / "results" / "packed_linear.json"), metadata={"help": "JSON output"})


def run(engine, prompts, new_tokens) -> tuple[float, int, int]:
    from minimind.generate import SamplingParams
    steps = engine.stats["steps"]
    start = time.perf_counter()
    reqs = [engine.submit(p, SamplingParams.greedy(new_tokens), lambda d: None, ignore_eos=True) for p in prompts]
    while any(not r.finished for r in reqs):
        time.sleep(0.0005)
    return time.perf_counter() - start, sum(len(r.output) for r in reqs), engine.stats["steps"] - steps


def main(argv=None):
    from minimind.configcli import parse_config
    from minimind.generate import SamplingParams
    from serve.engine import EngineConfig, load_engine
    cfg = parse_config(BenchConfig, argv, description=__doc__.split("\n")[0], prog="bench/bench_packed_linear.py")
    torch.set_num_threads(cfg.threads)
    ckpt, tok = random_checkpoint(cfg.preset)
    g = torch.Generator().manual_seed(1)
    top = max(cfg.concurrency)
    prompts = [torch.randint(3, tok.vocab_size, (cfg.prompt_tokens,), generator=g).tolist() for _ in range(top)]
    max_len = cfg.prompt_tokens + cfg.new_tokens + 8
    engines = {name: load_engine(ckpt, EngineConfig(max_batch=top, max_len=max_len, packed_linears=packed))
               for name, packed in (("F.linear", False), ("packed", True))}
    result = {"command": " ".join(["python", "bench/bench_packed_linear.py", *(argv or sys.argv[1:])]),
              "preset": cfg.preset, "threads": cfg.threads, "new_tokens": cfg.new_tokens, "torch": torch.__version__,
              "rows": []}
    try:
        agree = {n: e.generate(prompts[0], SamplingParams.greedy(32), ignore_eos=True).token_ids
                 for n, e in engines.items()}
        result["greedy_equal"] = agree["F.linear"] == agree["packed"]
        for c in cfg.concurrency:
            best = {}
            for _ in range(cfg.rounds):
                for name, engine in engines.items():
                    r = run(engine, prompts[:c], cfg.new_tokens)
                    if name not in best or r[0] < best[name][0]:
                        best[name] = r
            for name, (seconds, tokens, steps) in best.items():
                result["rows"].append({"linear": name, "concurrency": c, "tokens_per_s": tokens / seconds,
                                       "ms_per_step": seconds / steps * 1e3})
    finally:
        for engine in engines.values():
            engine.shutdown()
    print(f"engine, {cfg.preset} preset (random weights), {cfg.new_tokens} greedy tokens per request, "
          f"{cfg.threads} threads; greedy outputs equal: {result['greedy_equal']}")
    print(f"{'linear':10}{'conc':>6}{'tokens/s':>10}{'ms/step':>10}")
    for r in result["rows"]:
        print(f"{r['linear']:10}{r['concurrency']:>6}{r['tokens_per_s']:>10.0f}{r['ms_per_step']:>10.2f}")
    write_result(result, cfg.out)


if __name__ == "__main__":
    main()
