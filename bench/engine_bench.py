"""What the in-process engine benchmarks share: a random-weight checkpoint to serve, a wait for a burst of
requests that does not poll, and writing the result JSON."""
import json
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


def write_result(result: dict, out) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
