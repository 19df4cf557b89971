"""Prefix caching in the serving engine: TTFT and throughput of chats that share a system prompt, with the
prefix cache on and off (EngineConfig.prefix_cache_tokens), in this process.

Each request is a chat through the real template: the same system prompt (the template's default one, or one
of --system-tokens tokens of real text from the bundled SFT sample) and a user question no other request of
the run asks (numbered), so the cache can only reuse the shared system prompt. At each
concurrency c, c greedy requests (EOS ignored, --new-tokens each) are submitted at once. Both engines are warmed
with one chat first, so the "on" engine holds the system prompt as a long-running server would. The two
engines alternate round by round (best round of each by wall time). TTFT, TPOT and tokens/s as in
bench/engine_bench.run_burst; "prefilled" = prompt positions the prefill forwards computed for the level.

  python bench/bench_prefix_cache.py                        # small preset, system prompts 0 / 256 / 1024 (~3 min)
  python bench/bench_prefix_cache.py --system-tokens 512 --concurrency 1 8
Prints a table and writes bench/results/prefix_cache.json.
"""
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from engine_bench import random_checkpoint, run_burst, write_result  # noqa: E402


@dataclass
class BenchConfig:
    preset: str = field(default="small", metadata={"help": "model preset (random weights)"})
    concurrency: tuple[int, ...] = field(default=(1, 8, 32), metadata={"help": "concurrency levels"})
    system_tokens: tuple[int, ...] = field(default=(0, 256, 1024), metadata={
        "help": "system prompt lengths in tokens; 0: the chat template's default system text"})
    new_tokens: int = field(default=32, metadata={"help": "output tokens per request"})
    rounds: int = field(default=2, metadata={"help": "alternating rounds; each setting keeps its best"})
    threads: int = field(default=2, metadata={"help": "torch threads"})
    out: str = field(default=str(REPO / "bench" / "results" / "prefix_cache.json"), metadata={"help": "JSON output"})


def sample_texts() -> list[str]:
    """User and assistant turns of the bundled SFT sample, in file order."""
    from cluster.config import BUNDLED_DATA
    texts = []
    for line in (BUNDLED_DATA / "sample_sft.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            texts += [t["content"] for t in json.loads(line)["conversations"]]
    return texts


def system_prompt(tok, tokens: int, texts: list[str]) -> str | None:
    """Real text of about `tokens` tokens (None: the template's default system turn)."""
    if tokens == 0:
        return None
    text = ""
    for t in texts:
        text += t + "\n"
        if len(tok.encode(text)) >= tokens:
            break
    return tok.decode(tok.encode(text)[:tokens])


def chats(tok, system: str | None, questions: list[str]) -> list[list[int]]:
    head = [] if system is None else [{"role": "system", "content": system}]
    return [tok.apply_chat_template(head + [{"role": "user", "content": q}], tokenize=True) for q in questions]


def main(argv=None):
    from minimind.configcli import parse_config
    from serve.engine import EngineConfig, load_engine
    cfg = parse_config(BenchConfig, argv, description=__doc__.split("\n")[0], prog="bench/bench_prefix_cache.py")
    torch.set_num_threads(cfg.threads)
    ckpt, tok = random_checkpoint(cfg.preset)
    top = max(cfg.concurrency)
    texts = sample_texts()
    # User turns cut to a short question, numbered so that no burst repeats a prompt another burst sent: the
    # "on" engine may reuse only what chats really share (the system prompt), never a whole earlier prompt.
    base = [t[:60] for t in texts[::2]]
    fresh = (f"{i}. {base[i % len(base)]}" for i in range(10 ** 6))
    result = {"command": " ".join(["python", "bench/bench_prefix_cache.py", *(argv or sys.argv[1:])]),
              "preset": cfg.preset, "threads": cfg.threads, "new_tokens": cfg.new_tokens,
              "torch": torch.__version__, "rows": []}
    for tokens in cfg.system_tokens:
        system = system_prompt(tok, tokens, texts)
        # One list per (round, level, setting) and the warm-up: every burst its own questions.
        need = 1 + cfg.rounds * len(cfg.concurrency) * 2
        bursts = [chats(tok, system, [next(fresh) for _ in range(top)]) for _ in range(need)]
        shared = next(i for i, ids in enumerate(zip(*(b[0] for b in bursts))) if len(set(ids)) > 1)
        max_len = max(len(p) for b in bursts for p in b) + cfg.new_tokens + 8
        flushes = {s: [] for s in ("off", "on")}
        engines = {s: load_engine(ckpt, EngineConfig(max_batch=top, max_len=max_len,
                                                     prefix_cache_tokens=0 if s == "off" else 8192),
                                  on_flush=lambda f=flushes[s]: f.append(time.perf_counter())) for s in flushes}
        try:
            warm = bursts.pop()
            for s, engine in engines.items():  # warm-up, and the "on" engine learns the system prompt
                run_burst(engine, flushes[s], warm[:1], 4)
            for c in cfg.concurrency:
                best = {}
                for _ in range(cfg.rounds):
                    for s, engine in engines.items():
                        prompts = bursts.pop()[:c]
                        r = run_burst(engine, flushes[s], prompts, cfg.new_tokens)
                        r["prompt_tokens_mean"] = sum(map(len, prompts)) / c
                        if s not in best or r["wall_s"] < best[s]["wall_s"]:
                            best[s] = r
                for s, r in best.items():
                    result["rows"].append({"system_tokens": tokens, "shared_prefix": shared,
                                           "prefix_cache": s, "concurrency": c, **r})
        finally:
            for engine in engines.values():
                engine.shutdown()
    print(f"engine, {cfg.preset} preset (random weights), chats sharing a system prompt, {cfg.new_tokens} greedy "
          f"tokens per request, {cfg.threads} threads")
    print(f"{'system':>7}{'shared':>7}{'prompt':>7}{'cache':>6}{'conc':>5}{'TTFT p50':>10}{'TTFT p99':>10}"
          f"{'TPOT ms':>9}{'tokens/s':>10}{'prefilled':>10}")
    for r in result["rows"]:
        print(f"{r['system_tokens']:>7}{r['shared_prefix']:>7}{r['prompt_tokens_mean']:>7.0f}{r['prefix_cache']:>6}"
              f"{r['concurrency']:>5}{r['ttft_p50_ms']:>10.1f}{r['ttft_p99_ms']:>10.1f}{r['tpot_ms']:>9.1f}"
              f"{r['tokens_per_s']:>10.0f}{r['prefill_positions']:>10}")
    write_result(result, cfg.out)


if __name__ == "__main__":
    main()
