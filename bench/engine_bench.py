"""What the in-process engine benchmarks share: a random-weight checkpoint to serve, a wait for a burst of
requests that does not poll, the timing of a burst, and writing the result JSON."""
import bisect
import json
import statistics
import time
import tempfile
import threading
from pathlib import Path


def random_checkpoint(preset: str) -> tuple[Path, object]:
    """A checkpoint of `preset` with seed-0 random weights and the default tokenizer: (directory, tokenizer)."""
    import torch

    from minimind.__main__ import default_tokenizer
    from minimind.checkpoint import save_checkpoint
    from minimind.config import PRESETS
    from minimind.model import MiniMind
    torch.manual_seed(0)
    tok = default_tokenizer()
    ckpt = Path(tempfile.mkdtemp()) / preset
    save_checkpoint(MiniMind(PRESETS[preset]), ckpt, tokenizer=tok)
    return ckpt, tok


class AllFinished:
    """An emit callback that sets an event when `n` requests have finished. Waiting on it, not polling the
    requests: a polling thread takes the GIL from the scheduler thread at every torch op that releases it."""

    def __init__(self, n: int):
        self.left, self.event, self.lock = n, threading.Event(), threading.Lock()

    def emit(self, delta):
        if delta.finish_reason is not None:
            with self.lock:
                self.left -= 1
                if self.left == 0:
                    self.event.set()

    def wait(self):
        self.event.wait()


def run_burst(engine, flushes: list[float], prompts, new_tokens) -> dict:
    """Submit every prompt at once (greedy, EOS ignored, `new_tokens` each) and time the burst.

    flushes: perf_counter() of every engine on_flush, appended by the engine's callback. TTFT = submission to
    the first flush after the request's first token (queueing included): on_flush is when
    serve.engine_process ships the Deltas piled up so far to the HTTP side, so this is the first token as a
    client of the service can see it. TPOT = (finish - first token) / (tokens - 1); tokens/s = all output
    tokens / wall time."""
    from minimind.generate import SamplingParams
    forwards, positions = engine.stats["prefill_forwards"], engine.stats["prefill_positions"]
    done = AllFinished(len(prompts))
    start = time.perf_counter()
    reqs = [engine.submit(p, SamplingParams.greedy(new_tokens), done.emit, ignore_eos=True) for p in prompts]
    done.wait()
    wall = time.perf_counter() - start
    shipped = [bisect.bisect_left(flushes, r.first_token_at) for r in reqs]
    ttft = sorted((flushes[i] if i < len(flushes) else r.finished_at) - r.submitted_at for r, i in zip(reqs, shipped))
    tpot = [(r.finished_at - r.first_token_at) / (len(r.output) - 1) for r in reqs]
    return {"wall_s": wall, "tokens_per_s": sum(len(r.output) for r in reqs) / wall,
            "ttft_p50_ms": statistics.median(ttft) * 1e3,
            "ttft_p99_ms": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] * 1e3,
            "tpot_ms": statistics.mean(tpot) * 1e3, "prefill_forwards": engine.stats["prefill_forwards"] - forwards,
            "prefill_positions": engine.stats["prefill_positions"] - positions}


def write_result(result: dict, out) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
