"""Incremental detokenization: what turning output ids into streamed text costs per token, by output length.

Two detokenizers on the same ids (a real text's tokens, repeated to the longest length measured):
  full-redecode  the previous TextStream: every token decodes the whole output so far (quadratic);
  incremental    minimind.generate.TextStream: every token decodes a window of a few tokens.
Per length L, the cost of the tokens from L-100 to L (microseconds per token, best of --rounds).

Then the serving engine itself (serve.engine, in this process, random-weight --preset, one greedy request with
EOS ignored): time per output token over the first and the last 100 tokens of a --long-output run, with each
detokenizer; a flat TPOT means the end of a long answer streams as fast as its start.

  python bench/bench_detokenize.py                 # tiny preset, 1,900-token output (~1 min)
Prints a table and writes bench/results/detokenize.json.
"""
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from minimind.generate import SamplingParams, TextStream  # noqa: E402


@dataclass
class FullRedecode:
    """The previous algorithm, kept here as the baseline: decode everything, emit what is new."""
    tokenizer: object
    ids: list = field(default_factory=list)
    emitted: int = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


@dataclass
class BenchConfig:
    lengths: tuple[int, ...] = field(default=(100, 1000, 4000), metadata={"help": "output lengths measured"})
    rounds: int = field(default=3, metadata={"help": "best of this many passes"})
    preset: str = field(default="tiny", metadata={"help": "model preset of the engine run (tiny: a ~1 ms step, "
                                                         "so the detokenizer's share is visible)"})
    long_output: int = field(default=1900, metadata={"help": "output tokens of the engine run (0: skip it); "
                                                           "tiny's context is 2,048"})
    threads: int = field(default=1, metadata={"help": "torch threads of the engine"})
    tokenizer: str = field(default=str(REPO.parent / "shared" / "data" / "minimind"),
                           metadata={"help": "tokenizer directory; missing: the one trained on the bundled sample"})
    out: str = field(default=str(REPO / "bench" / "results" / "detokenize.json"), metadata={"help": "JSON output"})


def load_tokenizer(path: str):
    from minimind.tokenizer import Tokenizer
    if Path(path).is_dir():
        return Tokenizer.from_dir(path), path
    from minimind.__main__ import default_tokenizer
    return default_tokenizer(), "trained on the bundled sample"


def detokenizer_cost(tok, ids: list[int], cls, lengths, rounds) -> dict[int, float]:
    """Microseconds per token over the 100 tokens before each length (lengths >= 100), best of `rounds`."""
    best = {n: float("inf") for n in lengths}
    for _ in range(rounds):
        stream, stamps = cls(tok), [time.perf_counter()]
        for token in ids[:max(lengths)]:
            stream.push(token)
            stamps.append(time.perf_counter())
        for n in lengths:
            best[n] = min(best[n], (stamps[n] - stamps[n - 100]) / 100 * 1e6)
    return best


def engine_tpot(tok, preset: str, n_tokens: int, threads: int, cls) -> dict:
    """One greedy request of n_tokens through the engine: ms per token over the first and the last 100."""
    import serve.engine as engine_mod
    import serve.frontend as frontend
    from minimind.config import PRESETS
    from minimind.model import MiniMind
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    frontend.TextStream = cls  # the front end's detokenizer for this run
    engine = engine_mod.Engine(MiniMind(PRESETS[preset]).eval(), tok,
                               engine_mod.EngineConfig(max_batch=1, max_len=n_tokens + 64))
    try:
        prompt = tok.encode("床前明月光，")
        arrivals, count = [], 0
        for delta in engine.stream_sync(prompt, SamplingParams.greedy(n_tokens), ignore_eos=True):
            count += len(delta.token_ids)
            arrivals.extend([time.perf_counter()] * len(delta.token_ids))
    finally:
        engine.shutdown()
        frontend.TextStream = TextStream
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"tokens": count, "tpot_ms_first_100": statistics.mean(gaps[:100]) * 1e3,
            "tpot_ms_last_100": statistics.mean(gaps[-100:]) * 1e3}


def main(argv=None):
    from minimind.configcli import parse_config
    cfg = parse_config(BenchConfig, argv, description=__doc__.split("\n")[0], prog="bench/bench_detokenize.py")
    tok, source = load_tokenizer(cfg.tokenizer)
    from cluster.config import BUNDLED_DATA
    text = (BUNDLED_DATA / "sample_corpus.jsonl").read_text(encoding="utf-8")
    ids = tok.encode(text)
    while len(ids) < max(cfg.lengths):
        ids += ids
    result = {"command": " ".join(["python", "bench/bench_detokenize.py", *(argv or sys.argv[1:])]),
              "tokenizer": source, "torch": torch.__version__, "detokenizer_us_per_token": {}, "engine": {}}
    for name, cls in (("full-redecode", FullRedecode), ("incremental", TextStream)):
        result["detokenizer_us_per_token"][name] = detokenizer_cost(tok, ids, cls, cfg.lengths, cfg.rounds)
    if cfg.long_output:
        for name, cls in (("full-redecode", FullRedecode), ("incremental", TextStream)):
            result["engine"][name] = engine_tpot(tok, cfg.preset, cfg.long_output, cfg.threads, cls)
        result["engine"]["preset"], result["engine"]["threads"] = cfg.preset, cfg.threads

    print(f"detokenizer, us per token over the 100 tokens before each output length ({source})")
    print(f"{'':16}" + "".join(f"{n:>10,}" for n in cfg.lengths))
    for name, row in result["detokenizer_us_per_token"].items():
        print(f"{name:16}" + "".join(f"{row[n]:>10.1f}" for n in cfg.lengths))
    if cfg.long_output:
        print(f"engine, {cfg.preset} preset, {cfg.long_output}-token greedy output, ms per token")
        for name in ("full-redecode", "incremental"):
            e = result["engine"][name]
            print(f"{name:16} first 100: {e['tpot_ms_first_100']:.2f}   last 100: {e['tpot_ms_last_100']:.2f}")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
