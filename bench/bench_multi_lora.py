"""The cost of serving LoRA adapters per request (serve.adapters): decode throughput of one engine whose batch
rows use no adapter, or alternate between two adapters, on a random-weight checkpoint of --preset.

At each concurrency c, c greedy requests (EOS ignored, --new-tokens each, --prompt-tokens random ids) are
submitted at once; tokens/s = all output tokens / wall time (prefills included). Rows with adapters pay, per
wrapped projection, two thin matmuls over all loaded adapters' ranks and a mask (serve/adapters.py) on top of
the base linear; a merged adapter (`lora=DIR` at load) pays nothing, so "base" is also what one merged adapter
costs. The settings alternate round by round (best of --rounds each) on the same engine, whose scheduler runs
on the main thread as in a Serve replica's engine process.

  python bench/bench_multi_lora.py         # small preset, rank 16 on q/k/v/o, c = 1, 8, 32 (~2 min)
Prints a table and writes bench/results/multi_lora.json.
"""
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from engine_bench import AllFinished, random_checkpoint, write_result  # noqa: E402


@dataclass
class BenchConfig:
    preset: str = field(default="small", metadata={"help": "model preset (random weights)"})
    concurrency: tuple[int, ...] = field(default=(1, 8, 32), metadata={"help": "concurrency levels"})
    new_tokens: int = field(default=64, metadata={"help": "output tokens per request"})
    prompt_tokens: int = field(default=32, metadata={"help": "prompt tokens per request"})
    rank: int = field(default=16, metadata={"help": "adapter rank"})
    rounds: int = field(default=3, metadata={"help": "alternating rounds; the best of each setting is kept"})
    threads: int = field(default=2, metadata={"help": "torch threads"})
    out: str = field(default=str(REPO / "bench" / "results" / "multi_lora.json"), metadata={"help": "JSON output"})


def run(engine, prompts, adapters, new_tokens) -> tuple[float, int]:
    from minimind.generate import SamplingParams
    done = AllFinished(len(prompts))
    start = time.perf_counter()
    reqs = [engine.submit(p, SamplingParams.greedy(new_tokens), done.emit, ignore_eos=True, adapter=a)
            for p, a in zip(prompts, adapters)]
    done.wait()
    return time.perf_counter() - start, sum(len(r.output) for r in reqs)


def make_adapter(ckpt: Path, out: Path, rank: int, seed: int) -> str:
    from minimind.checkpoint import load_model
    from minimind.lora import apply_lora, save_adapter
    model = load_model(ckpt)
    apply_lora(model, rank=rank, alpha=2.0 * rank)
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            p.data.normal_(0, 0.02)
    out.mkdir(parents=True)
    save_adapter(model, out)
    return str(out)


def main(argv=None):
    from minimind.configcli import parse_config
    from serve.engine import EngineConfig, load_engine
    cfg = parse_config(BenchConfig, argv, description=__doc__.split("\n")[0], prog="bench/bench_multi_lora.py")
    torch.set_num_threads(cfg.threads)
    ckpt, tok = random_checkpoint(cfg.preset)
    two = [make_adapter(ckpt, ckpt.parent / f"adapter-{i}", cfg.rank, i) for i in (1, 2)]
    g = torch.Generator().manual_seed(1)
    top = max(cfg.concurrency)
    prompts = [torch.randint(3, tok.vocab_size, (cfg.prompt_tokens,), generator=g).tolist() for _ in range(top)]
    # The scheduler on this main thread, as in the engine process of a Serve replica (Engine's own_thread);
    # the requests come from a second thread.
    engine = load_engine(ckpt, EngineConfig(max_batch=top, max_len=cfg.prompt_tokens + cfg.new_tokens + 8),
                         own_thread=False)
    settings = {"base": [None] * top, "2 adapters": [two[i % 2] for i in range(top)]}
    result = {"command": " ".join(["python", "bench/bench_multi_lora.py", *(argv or sys.argv[1:])]),
              "preset": cfg.preset, "rank": cfg.rank, "threads": cfg.threads, "new_tokens": cfg.new_tokens,
              "torch": torch.__version__, "rows": []}
    failure = []

    def measure():
        try:
            for adapters in settings.values():  # warm-up, and the adapters' first-use load out of the rounds
                run(engine, prompts[:2], adapters[:2], 4)
            for c in cfg.concurrency:
                best = {}
                for _ in range(cfg.rounds):
                    for name, adapters in settings.items():
                        r = run(engine, prompts[:c], adapters[:c], cfg.new_tokens)
                        if name not in best or r[0] < best[name][0]:
                            best[name] = r
                for name, (seconds, tokens) in best.items():
                    result["rows"].append({"setting": name, "concurrency": c, "tokens_per_s": tokens / seconds})
        except BaseException as e:  # re-raised on the main thread
            failure.append(e)
        finally:
            engine.shutdown()

    client = threading.Thread(target=measure)
    client.start()
    engine.run()
    client.join()
    if failure:
        raise failure[0]
    print(f"engine, {cfg.preset} preset (random weights), adapters of rank {cfg.rank} on q/k/v/o, "
          f"{cfg.new_tokens} greedy tokens per request, {cfg.threads} threads")
    print(f"{'setting':12}{'conc':>6}{'tokens/s':>10}")
    for r in result["rows"]:
        print(f"{r['setting']:12}{r['concurrency']:>6}{r['tokens_per_s']:>10.0f}")
    write_result(result, cfg.out)


if __name__ == "__main__":
    main()
