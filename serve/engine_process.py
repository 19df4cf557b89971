"""The Engine in a child process, driven from the server process through a pipe.

Why a process: in a Serve replica the HTTP side (Starlette, Serve's message plumbing) runs Python for every
streamed token. In the same process it takes turns with the scheduler thread for the GIL, and every torch op
of a forward pass needs the GIL back; on a busy 2-core machine a GIL holder that the OS has descheduled stalls
the whole batch (measured here: the Serve replica at concurrency 32 used 25% more CPU than the bare engine but
took 75% longer). With the engine in its own process the two sides only meet at the pipe: the scheduler sends
one message per decode step holding every request's TokenDelta (token ids), and the server fans them out.
vLLM separates its API server from its engine core for the same reason.

The engine process is the core: token ids in, token ids out. `EngineProcess` is the front end (serve.frontend):
it validates each request once, before it crosses the pipe, and turns ids into text and applies stop strings on
the server's side; a stop string sends a `Cancel(reason="stop")` that ends the core request. Every message is
one of the dataclasses below, never an untyped tuple.

The child exits when the pipe closes, so a replica that dies never leaves an engine behind.
"""
import asyncio
import collections
import itertools
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import AsyncIterator, Sequence

from cluster.runtime import pythonpath_with_repo
from minimind.generate import SamplingParams
from serve.engine import EngineBusy, EngineConfig, EngineUnavailable
from serve.frontend import Delta, TextOutput, TokenDelta, validate


# Messages across the pipe (pickled by multiprocessing.connection; both ends import this module).

@dataclass
class Start:            # server -> engine, first: what to load
    model_dir: str
    config: EngineConfig
    lora: str | None
    dtype: str
    device: str
    threads: int


@dataclass
class Submit:           # a request the server validated
    rid: int
    prompt: list[int]
    params: SamplingParams
    ignore_eos: bool
    adapter: str | None


@dataclass
class Cancel:           # the client went away ("abort") or a stop string ended the text ("stop")
    rid: int
    reason: str


@dataclass
class StatsQuery:
    rid: int


@dataclass
class Shutdown:
    pass


@dataclass
class Ready:            # engine -> server, once loaded
    context_len: int


@dataclass
class Failed:           # loading failed; the engine process exits
    error: str


@dataclass
class Deltas:           # every TokenDelta of one scheduler iteration
    items: list[tuple[int, TokenDelta]]


@dataclass
class Stats:
    rid: int
    stats: dict


def _child(conn: Connection):
    import torch

    from serve.engine import load_engine

    start: Start = conn.recv()
    torch.set_num_threads(start.threads)
    send_lock = threading.Lock()
    outbox: list = []  # (request id, TokenDelta) produced during the current scheduler iteration
    requests = {}

    def send(msg):
        with send_lock:
            conn.send(msg)

    def flush():  # the scheduler's on_flush: ship the TokenDeltas emitted since the last flush as one message
        if outbox:
            batch = outbox[:]
            del outbox[:len(batch)]
            send(Deltas(batch))

    def emit_to(rid):
        def emit(delta: TokenDelta):
            outbox.append((rid, delta))
            if delta.finish_reason is not None:
                requests.pop(rid, None)
        return emit

    try:
        # The scheduler runs on this (main) thread, the pipe is read on another: see Engine's own_thread.
        engine = load_engine(start.model_dir, start.config, lora=start.lora, dtype=start.dtype, device=start.device,
                             on_flush=flush, own_thread=False)
    except Exception as e:  # reported to the parent, which raises it where the server is built
        send(Failed(f"{type(e).__name__}: {e}"))
        return

    def read_pipe():
        try:
            while True:
                msg = conn.recv()
                if isinstance(msg, Submit):
                    try:
                        req = requests[msg.rid] = engine.submit(msg.prompt, msg.params, emit_to(msg.rid),
                                                                msg.ignore_eos, msg.adapter)
                    except (ValueError, OSError, EngineBusy) as e:  # a bad adapter, or a race the parent missed
                        send(Deltas([(msg.rid, TokenDelta(finish_reason="error", error=str(e)))]))
                        continue
                    if req.finished:  # it may have finished before the line above stored it
                        requests.pop(msg.rid, None)
                elif isinstance(msg, Cancel):
                    req = requests.get(msg.rid)
                    if req is not None:
                        req.cancel(msg.reason)
                elif isinstance(msg, StatsQuery):
                    send(Stats(msg.rid, engine.snapshot()))
                elif isinstance(msg, Shutdown):
                    break
                else:
                    raise TypeError(f"unknown message {type(msg).__name__}")
        except EOFError:  # the server process is gone
            pass
        finally:
            engine.shutdown()  # ends engine.run() below

    threading.Thread(target=read_pipe, name="minimind-engine-pipe", daemon=True).start()
    send(Ready(engine.context_len))
    engine.run()


class EngineProcess:
    """Runs `load_engine(model_dir, ...)` in a child process; `stream` works as `Engine.stream` does."""

    def __init__(self, model_dir, config: EngineConfig, lora: str | None = None, dtype: str = "float32",
                 device: str = "auto", threads: int = 1, stream_interval: float = 0.0, start_timeout: float = 300,
                 tokenizer=None):
        """stream_interval: least seconds between two Deltas of one request (the first is never held back);
        tokens arriving in between are merged, which saves the HTTP side work per token.
        tokenizer: the checkpoint's, if the caller has it loaded already (the text is made on this side)."""
        self.stream_interval = stream_interval
        # A fresh interpreter (`python -m serve.engine_process FD`), not multiprocessing's spawn: spawn would
        # re-run the parent's main script first, which inside a Ray worker is Ray's own worker entry point.
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": pythonpath_with_repo(os.environ.get("PYTHONPATH", ""))}
        self._proc = subprocess.Popen([sys.executable, "-m", "serve.engine_process", str(theirs.fileno())],
                                      pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send(Start(str(model_dir), config, lora, dtype, device, threads))
        if not self._conn.poll(start_timeout):
            self._proc.kill()
            raise RuntimeError(f"the engine process did not start within {start_timeout} s")
        reply = self._conn.recv()
        if not isinstance(reply, Ready):
            self._proc.wait()
            raise RuntimeError(f"the engine process failed to load {model_dir}: {reply.error}")
        self.context_len = reply.context_len
        if tokenizer is None:
            from minimind.checkpoint import load_tokenizer
            tokenizer = load_tokenizer(model_dir)
        self.tokenizer = tokenizer  # the front end's: text is made on this side
        self.capacity = config.max_batch + config.max_waiting
        self._send_lock = threading.Lock()
        self._ids = itertools.count()
        self._inboxes: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._dead = False  # set by the reader when the pipe closes, before it fails the open requests
        self._reader = threading.Thread(target=self._read, name="minimind-engine-reader", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return not self._dead and self._proc.poll() is None and self._reader.is_alive()

    def check_alive(self):
        """Raise EngineUnavailable, with the reason, when the engine process is gone."""
        if not self.alive:
            raise self._unavailable()

    def _unavailable(self) -> EngineUnavailable:
        code = self._proc.poll()
        why = f"exited with code {code}" if code is not None else "stopped answering"
        return EngineUnavailable(f"the engine process {why}; this replica is being replaced")

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams, stop: Sequence[str] = (),
               ignore_eos: bool = False, adapter: str | None = None) -> AsyncIterator[Delta]:
        """Validate and submit now (errors raise here), then iterate Deltas; merged when several piled up.
        adapter: a LoRA adapter directory for this request (Engine.submit); one that fails to load ends the
        request with an error Delta."""
        validate(prompt_ids, params, self.context_len)
        self.check_alive()
        if len(self._inboxes) >= self.capacity:
            raise EngineBusy(f"{len(self._inboxes)} requests are in the engine")
        rid = next(self._ids)
        inbox: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self._inboxes[rid] = (asyncio.get_running_loop(), inbox)
        self._send(Submit(rid, list(prompt_ids), params, ignore_eos, adapter))
        return self._drain(rid, inbox, TextOutput(self.tokenizer, stop))

    async def stats(self) -> dict:
        self.check_alive()
        rid = next(self._ids)
        inbox: asyncio.Queue = asyncio.Queue(maxsize=1)
        self._inboxes[rid] = (asyncio.get_running_loop(), inbox)
        self._send(StatsQuery(rid))
        try:
            stats = await asyncio.wait_for(inbox.get(), timeout=30)
        finally:
            self._inboxes.pop(rid, None)
        if isinstance(stats, TokenDelta):  # the error of a dead engine process
            raise self._unavailable()
        return stats

    def shutdown(self, timeout: float = 10):
        try:
            self._send(Shutdown())
        except RuntimeError:
            pass
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._conn.close()

    async def _drain(self, rid: int, inbox: asyncio.Queue, text: TextOutput) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        last = -float("inf")
        try:
            while not text.done:
                core = await inbox.get()
                # Gather what arrives until stream_interval after the last chunk, or until the request ends.
                while core.finish_reason is None:
                    if not inbox.empty():
                        core = core.merge(inbox.get_nowait())
                        continue
                    remaining = last + self.stream_interval - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        core = core.merge(await asyncio.wait_for(inbox.get(), remaining))
                    except asyncio.TimeoutError:
                        break
                if core.error is not None and self._dead:
                    # The process died under this request: the same typed error as a new request gets (503)
                    raise self._unavailable()
                delta = text.push(core)
                if delta is not None:
                    last = loop.time()
                    yield delta
        finally:
            self._inboxes.pop(rid, None)
            if (text.stopped or not text.done) and self.alive:
                try:  # a stop string ended the text, or the client went away: free the slot now
                    self._send(Cancel(rid, "stop" if text.stopped else "abort"))
                except RuntimeError:
                    pass

    def _send(self, msg):
        try:
            with self._send_lock:
                self._conn.send(msg)
        except OSError:  # the engine process is gone (the reader thread fails the open streams)
            raise self._unavailable() from None

    def _read(self):
        """Reader thread: route each message's items to their requests' event loops, one wake-up per loop."""
        try:
            while True:
                msg = self._conn.recv()
                items = [(msg.rid, msg.stats)] if isinstance(msg, Stats) else msg.items
                by_loop = collections.defaultdict(list)
                for rid, item in items:
                    target = self._inboxes.get(rid)
                    if target is not None:
                        by_loop[target[0]].append((target[1], item))
                for loop, puts in by_loop.items():
                    _call_soon(loop, _put_all, puts)
        except (EOFError, OSError):  # the engine process died: fail whatever is still waiting
            self._dead = True
            dead = TokenDelta(finish_reason="error", error="the engine process exited")
            for loop, inbox in list(self._inboxes.values()):
                _call_soon(loop, inbox.put_nowait, dead)


def _put_all(puts):
    for inbox, item in puts:
        inbox.put_nowait(item)


def _call_soon(loop, fn, *args):
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that event loop is closed: its requests have no one left to read them
        pass


if __name__ == "__main__":
    # As `serve.engine_process`, not `__main__`: the messages it sends must unpickle by that name in the server.
    from serve.engine_process import _child as child
    child(Connection(int(sys.argv[1])))
