"""Sampling in the serving engine: one batched pass for all rows vs the previous row-by-row loop.

The engine (serve.engine, in this process, random-weight --preset) decodes --concurrency requests at once, all
sampled with the same settings, EOS ignored, --new-tokens each. Two samplers on the same engine:
  per-row   the previous Engine._advance: for every sampled row, rebuild a tensor of its whole output, then
            penalties (cat + unique over prompt and output), temperature, top-k, its own sort for top-p, its
            own softmax and multinomial;
  batched   serve.engine as it is: penalty masks kept up to date per token, one process_rows (one sort) and
            one sample_rows (one softmax, one inverse-CDF draw per row) for the whole batch.
For each setting: the sampler alone on the logits of one decode step of all rows (ms, best of 20 passes: the
figure that does not move with the machine's load), then output tokens per second over a whole engine run
(prefills included) and milliseconds per decode step, best of --rounds. A greedy run of the same engine gives the forward pass alone; the difference
is what sampling costs.

  python bench/bench_sampling.py                  # small preset, 32 requests x 64 tokens (~2 min)
Prints a table and writes bench/results/sampling.json.
"""
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from minimind.generate import SamplingParams, make_generator  # noqa: E402

SETTINGS = {
    "greedy": SamplingParams.greedy(),
    "t0.85 top-p0.85": SamplingParams(temperature=0.85, top_p=0.85),
    "t0.85 top-p0.85 top-k40 rep1.1": SamplingParams(temperature=0.85, top_p=0.85, top_k=40, repetition_penalty=1.1),
}


@dataclass
class BenchConfig:
    preset: str = field(default="small", metadata={"help": "model preset (random weights)"})
    concurrency: int = field(default=32, metadata={"help": "requests decoded together"})
    new_tokens: int = field(default=64, metadata={"help": "output tokens per request"})
    prompt_tokens: int = field(default=32, metadata={"help": "prompt tokens per request"})
    sharpen: float = field(default=8.0, metadata={"help": "scale of the final norm's weight: random weights give "
                                                          "near-uniform next-token distributions (a nucleus of "
                                                          "thousands of tokens); 8 gives a trained model's few nats"})
    rounds: int = field(default=2, metadata={"help": "best of this many runs per setting and sampler"})
    threads: int = field(default=2, metadata={"help": "torch threads"})
    out: str = field(default=str(REPO / "bench" / "results" / "sampling.json"), metadata={"help": "JSON output"})


def per_row_advance(self, batch, logits):
    """The engine's previous _advance, kept here as the baseline (penalties from the whole output each step)."""
    self.stats["steps"] += 1
    for i, req in enumerate(batch):
        p = req.params
        if req.plain_greedy:
            token = int(logits[i].float().argmax())
        else:
            out = torch.tensor(req.output, dtype=torch.long, device=self.device)
            row = logits[i].float()
            if p.repetition_penalty != 1.0:
                seen = torch.cat([req.prompt_t, out]).unique()
                picked = row[seen]
                row[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
            if p.presence_penalty and out.numel():
                row[out.unique()] -= p.presence_penalty
            row = row / p.temperature
            if p.top_k and p.top_k < row.numel():
                row = row.masked_fill(row < row.topk(p.top_k).values[-1], float("-inf"))
            if p.top_p < 1.0:
                ranked, order = row.sort(descending=True)
                probs = ranked.softmax(-1)
                drop = probs.cumsum(-1) - probs > p.top_p
                row = row.masked_fill(drop.scatter(0, order, drop), float("-inf"))
            token = int(torch.multinomial(row.softmax(-1), 1, generator=req.generator))
        self._append(req, token)


class _Row:
    """What per_row_advance reads of a request, for timing the sampler alone."""
    def __init__(self, prompt, output, params):
        self.prompt_t, self.output, self.params, self.generator = torch.tensor(prompt), output, params, None
        self.plain_greedy = False


class _Sink:
    """A stand-in engine for the sampler-only timing: counts steps, drops the tokens."""
    device = "cpu"

    def __init__(self):
        self.stats = {"steps": 0}

    def _append(self, req, token):
        pass


def sampler_ms(logits, prompts, outputs, params) -> dict:
    """ms to pick one token for every row of `logits`, per-row vs batched, best of 20."""
    from minimind.generate import process_rows, sample_rows, token_mask
    V = logits.shape[-1]
    rows = [_Row(p, o, params) for p, o in zip(prompts, outputs)]
    generated = torch.stack([token_mask(V, o) for o in outputs])
    seen = generated | torch.stack([token_mask(V, p) for p in prompts])
    plist = [params] * len(rows)

    def per_row():
        per_row_advance(_Sink(), rows, logits)

    def batched():
        sample_rows(process_rows(logits, plist, seen, generated), plist, [None] * len(rows))
    out = {}
    for name, f in (("per-row", per_row), ("batched", batched)):
        f()
        times = []
        for _ in range(20):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        out[name] = min(times) * 1e3
    return out


def run(engine, prompts, params) -> tuple[float, int, int]:
    engine.stats["steps"] = 0
    start = time.perf_counter()
    reqs = [engine.submit(p, params, lambda d: None, ignore_eos=True) for p in prompts]
    while any(not r.finished for r in reqs):
        time.sleep(0.001)
    return time.perf_counter() - start, sum(len(r.output) for r in reqs), engine.stats["steps"]


def main(argv=None):
    import serve.engine as engine_mod
    from minimind.__main__ import default_tokenizer
    from minimind.config import PRESETS
    from minimind.configcli import parse_config
    from minimind.model import MiniMind
    cfg = parse_config(BenchConfig, argv, description=__doc__.split("\n")[0], prog="bench/bench_sampling.py")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    tok = default_tokenizer()
    model = MiniMind(PRESETS[cfg.preset]).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(cfg.sharpen)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, tok.vocab_size, (cfg.prompt_tokens,), generator=g).tolist()
               for _ in range(cfg.concurrency)]
    with torch.no_grad():
        step_logits = model(torch.tensor(prompts), last_only=True).logits[:, -1]     # (B, V)
    logp = step_logits.float().log_softmax(-1)
    entropy = float(-(logp.exp() * logp).sum(-1).mean())
    outputs = [torch.randint(3, tok.vocab_size, (cfg.new_tokens,), generator=g).tolist() for _ in prompts]
    batched_advance = engine_mod.Engine._advance
    result = {"command": " ".join(["python", "bench/bench_sampling.py", *(argv or sys.argv[1:])]),
              "preset": cfg.preset, "concurrency": cfg.concurrency, "new_tokens": cfg.new_tokens,
              "threads": cfg.threads, "sharpen": cfg.sharpen, "next_token_entropy_nats": entropy,
              "torch": torch.__version__, "sampler_ms": {}, "runs": {}}
    engine = engine_mod.Engine(model, tok, engine_mod.EngineConfig(max_batch=cfg.concurrency,
                                                                   max_len=cfg.prompt_tokens + cfg.new_tokens + 8))
    try:
        run(engine, prompts[:2], SamplingParams.greedy(4))  # warm-up
        for name, base in SETTINGS.items():
            params = SamplingParams(**{**base.__dict__, "max_new_tokens": cfg.new_tokens})
            samplers = ("batched",) if name == "greedy" else ("per-row", "batched")
            if name != "greedy":
                result["sampler_ms"][name] = sampler_ms(step_logits, prompts, outputs, params)
            for sampler in samplers:
                engine_mod.Engine._advance = per_row_advance if sampler == "per-row" else batched_advance
                best = min((run(engine, prompts, params) for _ in range(cfg.rounds)), key=lambda r: r[0])
                seconds, tokens, steps = best
                result["runs"][f"{name} / {sampler}"] = {"tokens_per_s": tokens / seconds,
                                                         "ms_per_step": seconds / steps * 1e3, "tokens": tokens}
    finally:
        engine_mod.Engine._advance = batched_advance
        engine.shutdown()
    print(f"engine, {cfg.preset} preset, {cfg.concurrency} requests x {cfg.new_tokens} sampled tokens, "
          f"{cfg.threads} threads, next-token entropy {entropy:.2f} nats")
    print(f"sampler alone, ms per step of {cfg.concurrency} rows ({cfg.new_tokens} output tokens each)")
    for key, r in result["sampler_ms"].items():
        print(f"{key:36}per-row {r['per-row']:8.2f}   batched {r['batched']:8.2f}")
    print(f"{'setting / sampler':44}{'tokens/s':>10}{'ms/step':>10}")
    for key, r in result["runs"].items():
        print(f"{key:44}{r['tokens_per_s']:>10.0f}{r['ms_per_step']:>10.2f}")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
