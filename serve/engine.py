"""A continuous-batching generation engine for MiniMind: pure PyTorch, no Ray, no HTTP.

One scheduler thread owns the model and a preallocated KV cache of `max_batch` slots. Each iteration it
  1. admits waiting requests into free slots, copying into each slot the K/V of the longest prompt prefix
     already computed for an earlier request (prefix caching, serve/prefix_cache.py),
  2. prefills the rest of the pending prompts together, in one right-padded forward of at most
     `prefill_tokens` positions (a longer prompt goes in chunks of that size, one per iteration, so the
     requests already decoding wait at most one chunk's forward for their next token),
  3. runs ONE decode forward for every active request together (input (B, 1), rows = their slots),
  4. samples a token per row with that request's SamplingParams (one batched pass), detects stop ids and
     max_tokens, hands each request's new token id to its consumer, and frees finished requests' slots.
The engine core handles token ids only. Validation, detokenization and stop strings are the front end's
(serve/frontend.py: `Engine.stream`/`generate` here, `serve.engine_process.EngineProcess` in a Serve replica), so
none of that runs on the scheduler thread between two forward passes.
Requests therefore join and leave a running batch at token granularity (Orca's iteration-level scheduling,
Yu et al. OSDI'22; vLLM's continuous batching), and N concurrent streams share each decode pass.

Rows are independent: the model masks each row to its own cache length, so a prompt's cache entries and tokens
do not depend on what else is running, except that a batched matmul may round differently from a single-row
one in the last bit of fp32; see tests/test_engine.py for how equality is checked.

`kv_cache=False` recomputes every sequence in full each step (one forward per request): the benchmark's
no-cache baseline, and a reference the cached path must reproduce.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import heapq
import logging
import queue
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimind.generate import SamplingParams, make_generator, process_rows, sample_rows, token_mask
from serve.adapters import AdapterPool
from serve.frontend import Delta, TextOutput, TokenDelta, validate
from serve.prefix_cache import PrefixCache

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class EngineConfig:
    max_batch: int = 16      # KV-cache slots: the most requests decoded together
    max_len: int = 2048      # positions per slot (prompt + output); capped by the model's context
    kv_cache: bool = True    # False: recompute whole sequences each step (benchmark baseline)
    max_waiting: int = 256   # queued requests beyond which submit() raises EngineBusy
    # CPU, fp32: run the blocks' linear layers on weights reordered once for oneDNN (see PackedLinear).
    packed_linears: bool = True
    # Prompt positions (padding included) one prefill forward may take. New prompts are prefilled together up
    # to this many; a longer one goes in chunks of it, one chunk per scheduler iteration, so the requests
    # already decoding wait at most one chunk's forward for their next token.
    prefill_tokens: int = 512
    # Prefix caching (serve.prefix_cache): K/V of prompt prefixes kept in blocks of prefix_block tokens, at
    # most prefix_cache_tokens of them (0: off), and copied into the slot of a later prompt that starts alike.
    prefix_cache_tokens: int = 4096
    prefix_block: int = 16

    def __post_init__(self):
        if self.max_batch < 1 or self.max_len < 2 or self.max_waiting < 0 or self.prefill_tokens < 1:
            raise ValueError(f"invalid engine config {self}")
        if self.prefix_block < 1 or self.prefix_cache_tokens < 0 or (
                self.prefix_cache_tokens and self.prefix_cache_tokens < self.prefix_block):
            raise ValueError(f"invalid engine config {self}: prefix_cache_tokens must be 0 or at least "
                             f"prefix_block ({self.prefix_block})")


class EngineBusy(RuntimeError):
    """The waiting queue is full; the caller should retry later (HTTP 503)."""


class EngineUnavailable(RuntimeError):
    """The engine is shut down or its process has died; a new replica takes over (HTTP 503)."""


class Request:
    """Scheduler-side state of one generation: token ids only. Only the scheduler thread mutates it, except
    `cancel`, which any thread may call."""

    def __init__(self, prompt: list[int], params: SamplingParams, stop_ids: set[int],
                 emit: Callable[[TokenDelta], None], device, vocab_size: int):
        self.prompt, self.params, self.stop_ids, self.emit = prompt, params, stop_ids, emit
        self.generator = make_generator(params, device)
        # Penalty state, kept up to date token by token (not rebuilt from the whole output every step).
        self.seen = self.generated = None
        if params.repetition_penalty != 1.0 or params.presence_penalty:
            self.generated = token_mask(vocab_size, [], device)
            self.seen = token_mask(vocab_size, torch.tensor(prompt, device=device), device)
        self.output: list[int] = []
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens already in the KV cache
        self.adapter_key: str | None = None  # LoRA adapter directory, installed at admission
        self.adapter = 0                      # its index in the engine's AdapterPool (0: the base model)
        self.cancel_reason: str | None = None
        self.finished = False
        # perf_counter() at submission, first output token and finish: TTFT and TPOT as the engine sees them.
        self.submitted_at = time.perf_counter()
        self.first_token_at = self.finished_at = None

    def cancel(self, reason: str = "abort") -> None:
        """End the request at the next scheduler iteration, finishing with `reason` ("abort": the client went
        away; "stop": the front end found a stop string). A no-op once it has finished."""
        if self.cancel_reason is None:
            self.cancel_reason = reason

    @property
    def cancelled(self) -> bool:
        return self.cancel_reason is not None

    @property
    def plain_greedy(self) -> bool:
        p = self.params
        return p.temperature <= 0 and p.repetition_penalty == 1.0 and not p.presence_penalty


class PackedLinear(nn.Linear):
    """Inference-only nn.Linear for the CPU: the weight reordered once into oneDNN's blocked layout, so each
    batched matmul skips the reorder that F.linear pays on every call (vLLM's CPU backend does the same).

    A single row (one request decoding) is a matrix-vector product bound by reading the weight from memory; it
    runs as x @ W^T on the weight stored transposed, (in, out) contiguous, which streams it faster than both
    F.linear and the packed kernel: all of `small`'s block linears at one row, from DRAM, 1 thread, took 6.6 ms
    with F.linear, 5.0 packed, 4.2 transposed (a decode step fell from 7.9 to 6.1 ms). `weight` is a view of
    that storage, so nothing is held twice but the packed copy. fp32 results differ from F.linear's by float
    rounding (summation order) only."""

    def __init__(self, linear: nn.Linear, batch_hint: int):
        nn.Module.__init__(self)  # an nn.Linear to whoever counts parameters or layers; its own forward
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = linear.weight.detach().t().contiguous()  # (in, out)
        self.weight = nn.Parameter(self.weight_t.t(), requires_grad=False)  # (out, in) view of the same storage
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)

    def forward(self, x):
        if x.numel() == self.in_features:
            out = x @ self.weight_t
            return out if self.bias is None else out + self.bias
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module, batch_hint: int) -> int:
    """Swap every linear layer inside the transformer blocks for a PackedLinear (CPU, fp32 only; the tied LM
    head stays as it is, it shares its weight with the embedding). Returns how many were swapped."""
    swapped = 0
    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child, batch_hint))
                swapped += 1
    return swapped


def can_pack(model: nn.Module) -> bool:
    w = model.lm_head.weight
    return (w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class Engine:
    """Continuous batching over a MiniMind model. Thread-safe `submit`; async `stream`; blocking `generate`."""

    def __init__(self, model, tokenizer, config: EngineConfig | None = None, eos_ids: Sequence[int] | None = None,
                 on_flush: Callable[[], None] | None = None, own_thread: bool = True):
        """on_flush: called by the scheduler thread whenever the Deltas emitted so far should leave: after the
        prefills of an iteration (first tokens go out without waiting for the decode) and after its decode.
        serve.engine_process sends each such batch to the server process as one message.

        own_thread=False: no scheduler thread is started; the caller runs the scheduler with `run()`, which
        returns after `shutdown()`. The engine process does this from its main thread, because on the CPU an
        OpenMP parallel region costs ~10 us there and ~100 us on a thread that is neither the main thread nor
        the first to use OpenMP (libgomp; measured on this machine: 8.4 vs 102 us for an (8, 512) x (512, 32)
        matmul, 12.2 vs 15.7 ms for a decode step of `small` at 8 rows)."""
        self.model = model.eval()
        self.on_flush = on_flush
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.device = model.lm_head.weight.device
        limit = model.config.max_position_embeddings
        self.context_len = min(self.config.max_len, limit) if self.config.kv_cache else limit
        self.eos_ids = set(eos_ids if eos_ids is not None else [tokenizer.eos_id])
        self.adapters = AdapterPool(model)
        self._read_adapters: dict[str, dict] = {}  # read at submission, installed by the scheduler at admission
        self.cache = model.new_cache(self.config.max_batch, self.context_len) if self.config.kv_cache else None
        self.prefixes = (PrefixCache(self.cache, self.config.prefix_block, self.config.prefix_cache_tokens)
                         if self.cache is not None and self.config.prefix_cache_tokens else None)
        # A heap: the lowest free slot goes first, which keeps busy slots packed at the front of the cache.
        self._free = list(range(self.config.max_batch))
        self._active: list[Request] = []
        self._waiting: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self.stats = {"steps": 0, "prefills": 0, "prefill_forwards": 0, "prefill_positions": 0,
                      "decoded_tokens": 0, "errors": 0,
                      "batch_sizes": collections.Counter(), "finish_reasons": collections.Counter()}
        self._running = threading.Event()  # set while the scheduler loop runs, whichever thread it is on
        self._thread = threading.Thread(target=self.run, name="minimind-engine", daemon=True) if own_thread else None
        if self._thread is not None:
            self._thread.start()
        # A scheduler thread still alive when the interpreter exits makes torch abort the process ("terminate
        # called without an active exception"): stop it first, unless the owner already has.
        atexit.register(_shutdown_at_exit, weakref.ref(self))

    # ------------------------------------------------------------------ public interface

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, emit: Callable[[TokenDelta], None],
               ignore_eos: bool = False, adapter: str | None = None) -> Request:
        """Queue a request the front end has validated (`serve.frontend.validate`); `emit` is called from the
        scheduler thread with each TokenDelta, the last one finished.

        adapter: a LoRA adapter directory (PEFT format) this request decodes with; read on its first use and
        shared by every later request naming it. A bad adapter raises ValueError here."""
        stop_ids = set(params.stop_ids) | (set() if ignore_eos else self.eos_ids)
        req = Request(list(prompt_ids), params, stop_ids, emit, self.device, self.model.config.vocab_size)
        if adapter:
            key = self.adapters.key(adapter)
            with self._cv:
                known = key in self.adapters.index or key in self._read_adapters
            if not known:
                key, tensors = self.adapters.read(adapter)  # file reads outside the lock
                with self._cv:
                    self._read_adapters.setdefault(key, tensors)
            req.adapter_key = key
        with self._cv:
            if self._stopping:
                raise EngineUnavailable("the engine is shut down")
            if len(self._waiting) >= self.config.max_waiting:
                raise EngineBusy(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(req)
            self._cv.notify()
        return req

    # The in-process front end: validation, text and stop strings on the caller's side (serve.frontend).

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams, stop: Sequence[str] = (),
               ignore_eos: bool = False, adapter: str | None = None) -> AsyncIterator[Delta]:
        """Validate and submit now (so a bad or refused request raises here, before any response starts) and
        return an async iterator of Deltas; whatever piled up since the last one arrives merged into one.

        Leaving the iteration early (client disconnect, task cancelled) cancels the request and frees its slot.
        """
        validate(prompt_ids, params, self.context_len)
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[TokenDelta] = asyncio.Queue()
        req = self.submit(prompt_ids, params, lambda d: loop.call_soon_threadsafe(inbox.put_nowait, d),
                          ignore_eos, adapter)
        return self._drain(req, inbox, TextOutput(self.tokenizer, stop))

    @staticmethod
    async def _drain(req: Request, inbox: asyncio.Queue, text: TextOutput) -> AsyncIterator[Delta]:
        try:
            while True:
                core = await inbox.get()
                while core.finish_reason is None and not inbox.empty():
                    core = core.merge(inbox.get_nowait())
                delta = text.push(core)
                if delta is not None:
                    yield delta
                if text.done:
                    return
        finally:
            req.cancel("stop" if text.stopped else "abort")  # a no-op when the request already finished

    def stream_sync(self, prompt_ids: Sequence[int], params: SamplingParams, stop: Sequence[str] = (),
                    ignore_eos: bool = False, timeout: float | None = None,
                    adapter: str | None = None) -> Iterator[Delta]:
        """The blocking counterpart of `stream`, for callers without an event loop (CLI, benchmarks)."""
        validate(prompt_ids, params, self.context_len)
        inbox: queue.Queue[TokenDelta] = queue.Queue()
        req = self.submit(prompt_ids, params, inbox.put, ignore_eos, adapter)
        text = TextOutput(self.tokenizer, stop)

        def deltas():
            try:
                while not text.done:
                    delta = text.push(inbox.get(timeout=timeout))
                    if delta is not None:
                        yield delta
            finally:
                req.cancel("stop" if text.stopped else "abort")

        return deltas()

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, stop: Sequence[str] = (),
                 ignore_eos: bool = False, timeout: float | None = None, adapter: str | None = None) -> Delta:
        """Block until the request finishes; returns all of its output as one Delta."""
        out = Delta()
        for delta in self.stream_sync(prompt_ids, params, stop, ignore_eos, timeout, adapter):
            out = out.merge(delta)
        return out

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() if self._thread is not None else self._running.is_set()

    def snapshot(self) -> dict:
        with self._cv:
            return {**self.stats, "batch_sizes": dict(self.stats["batch_sizes"]),
                    "finish_reasons": dict(self.stats["finish_reasons"]), "active": len(self._active),
                    "waiting": len(self._waiting), "max_batch": self.config.max_batch,
                    "context_len": self.context_len, "kv_cache": self.config.kv_cache, "adapters": len(self.adapters),
                    "prefix_cache": {**self.prefixes.stats, "tokens": self.prefixes.tokens}
                    if self.prefixes is not None else None,
                    "dtype": str(self.model.lm_head.weight.dtype).removeprefix("torch.")}

    def shutdown(self, timeout: float = 10.0):
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ scheduler thread

    def run(self):
        """The scheduler loop, until shutdown(): on the engine's own thread, or on the caller's (own_thread=False)."""
        self._running.set()
        try:
            self._loop()
        finally:
            self._running.clear()

    def _loop(self):
        # Grad mode is per thread: this thread must enter inference mode itself.
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._stopping or self._active or self._waiting):
                        self._cv.wait()
                    if self._stopping:
                        break
                    admitted = self._admit()
                try:
                    self._step(admitted)
                except Exception:  # a bug or OOM must fail these requests, not kill the server
                    log.exception("engine step failed")
                    with self._cv:
                        self.stats["errors"] += 1
                    message = traceback.format_exc(limit=1).strip().splitlines()[-1]
                    for req in list(self._active):
                        self._finish(req, "error", error=message)
                self._flush()
        for req in list(self._active) + list(self._waiting):
            self._finish(req, "abort")
        self._flush()

    def _flush(self):
        if self.on_flush:
            self.on_flush()

    def _admit(self) -> list[Request]:
        """Move waiting requests into free slots (called with the lock held)."""
        for req in [r for r in self._active if r.cancelled]:
            self._finish(req, req.cancel_reason)
        admitted = []
        while self._waiting and self._free:
            req = self._waiting.popleft()
            if req.cancelled:
                self._finish(req, req.cancel_reason)
                continue
            if req.adapter_key is not None:
                try:
                    if req.adapter_key not in self.adapters.index:
                        self.adapters.install(req.adapter_key, self._read_adapters.pop(req.adapter_key))
                    req.adapter = self.adapters.index[req.adapter_key]
                except Exception as e:  # e.g. out of memory: this request fails, the engine goes on
                    log.exception("installing adapter %s failed", req.adapter_key)
                    self._finish(req, "error", error=f"loading the adapter failed: {type(e).__name__}: {e}")
                    continue
            req.slot = heapq.heappop(self._free)
            self._active.append(req)
            admitted.append(req)
        return admitted

    def _step(self, admitted: list[Request]):
        if not self.config.kv_cache:
            # Baseline: every request recomputes its whole sequence, one forward each.
            logits = torch.cat([self._forward([r], torch.tensor([r.prompt + r.output], device=self.device))
                                for r in self._active])
            self.stats["prefills"] += len(admitted)
            self._advance(list(self._active), logits)
            return
        if admitted:
            self.cache.reset([r.slot for r in admitted])
            if self.prefixes is not None:
                for req in admitted:
                    req.prefilled = self.prefixes.load(req.prompt, req.adapter_key, req.slot)
        pending = [r for r in self._active if r.prefilled < len(r.prompt)]  # in arrival order
        if pending:
            self._prefill(pending)
            self._flush()  # first tokens go out before the decode step
        # Every request past its prompt holds a sampled token that is not in the cache yet: feed them all at
        # once. In slot order: when the busy slots are consecutive the model reads the cache as a view.
        batch = sorted((r for r in self._active if r.prefilled == len(r.prompt)), key=lambda r: r.slot)
        if not batch:
            return
        tokens = torch.tensor([[r.output[-1]] for r in batch], device=self.device)  # (B, 1)
        self._advance(batch, self._forward(batch, tokens))

    def _forward(self, reqs: list[Request], ids: torch.Tensor, new_tokens: list[int] | None = None) -> torch.Tensor:
        """Last-position logits (B, V) of one forward over `ids` (B, T), row i being reqs[i] (its cache slot
        and its adapter)."""
        self.adapters.select([r.adapter for r in reqs], self.device)
        if self.cache is None:
            return self.model(ids, last_only=True).logits[:, -1]
        return self.model(ids, cache=self.cache, rows=[r.slot for r in reqs], last_only=True,
                          new_tokens=new_tokens).logits[:, -1]

    def _plan_prefill(self, pending: list[Request]) -> list[tuple[Request, int]]:
        """(request, prompt tokens to feed) for one forward of at most `prefill_tokens` padded positions.

        Oldest first; a row's chunk is cut to the budget. Right padding takes cache positions past a row's own
        chunk, so a row whose padded chunk would run past the context waits for a later forward.
        """
        budget, plan, width, top = self.config.prefill_tokens, [], 0, 0
        for req in pending:
            n = min(len(req.prompt) - req.prefilled, budget)
            w, t = max(width, n), max(top, req.prefilled)
            if plan and ((len(plan) + 1) * w > budget or t + w > self.context_len):
                continue
            plan.append((req, n))
            width, top = w, t
        return plan

    def _prefill(self, pending: list[Request]):
        """One forward over the next chunk of the pending prompts; those it completes get their first token."""
        plan = self._plan_prefill(pending)
        width = max(n for _, n in plan)
        ids = torch.zeros(len(plan), width, dtype=torch.long)  # right padding: any id, its K/V are never read
        for i, (req, n) in enumerate(plan):
            ids[i, :n] = torch.as_tensor(req.prompt[req.prefilled:req.prefilled + n])
        logits = self._forward([r for r, _ in plan], ids.to(self.device), new_tokens=[n for _, n in plan])
        done = []
        for i, (req, n) in enumerate(plan):
            req.prefilled += n
            if req.prefilled == len(req.prompt):
                done.append(i)
                if self.prefixes is not None:
                    self.prefixes.store(req.prompt, req.adapter_key, req.slot)
        with self._cv:
            self.stats["prefills"] += len(done)
            self.stats["prefill_forwards"] += 1
            self.stats["prefill_positions"] += len(plan) * width
        if done:
            self._advance([plan[i][0] for i in done],
                          logits if len(done) == len(plan) else logits[torch.tensor(done, device=logits.device)])

    def _advance(self, batch: list[Request], logits: torch.Tensor):
        """Sample one token per row of `logits` (B, V) and append it to its request."""
        with self._cv:  # snapshot() copies these from other threads
            self.stats["steps"] += 1
            self.stats["batch_sizes"][len(batch)] += 1
            self.stats["decoded_tokens"] += len(batch)
        # Rows without penalties or temperature share one argmax. The cast to fp32 matches process_rows, so a
        # request picks the same token whichever path it takes. The other rows are processed and sampled
        # together: one sort, one softmax for the lot, not one per row.
        tokens = logits.float().argmax(-1).tolist() if any(r.plain_greedy for r in batch) else [0] * len(batch)
        rest = [i for i, r in enumerate(batch) if not r.plain_greedy]
        if rest:
            reqs = [batch[i] for i in rest]
            params = [r.params for r in reqs]
            seen = generated = None
            if any(r.seen is not None for r in reqs):
                none = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                seen = torch.stack([none if r.seen is None else r.seen for r in reqs])
                generated = torch.stack([none if r.generated is None else r.generated for r in reqs])
            rows = logits[torch.tensor(rest, device=logits.device)] if len(rest) < len(batch) else logits
            for i, token in zip(rest, sample_rows(process_rows(rows, params, seen, generated), params,
                                                  [r.generator for r in reqs])):
                tokens[i] = token
        for req, token in zip(batch, tokens):
            self._append(req, token)

    def _append(self, req: Request, token: int):
        if req.cancelled:
            self._finish(req, req.cancel_reason)
            return
        if token in req.stop_ids:
            self._finish(req, "stop")
            return
        req.output.append(token)
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        if req.seen is not None:
            req.seen[token] = req.generated[token] = True
        if len(req.output) >= req.params.max_new_tokens:
            self._finish(req, "length", last=[token])
            return
        self._emit(req, TokenDelta([token], None, len(req.prompt), len(req.output)))

    def _emit(self, req: Request, delta: TokenDelta):
        try:
            req.emit(delta)
        except RuntimeError:  # e.g. the consumer's event loop is closed: nobody is listening any more
            req.cancel()

    def _finish(self, req: Request, reason: str, error: str | None = None, last: list[int] | None = None):
        req.finished_at = time.perf_counter()
        req.finished = True
        if req in self._active:
            self._active.remove(req)
            heapq.heappush(self._free, req.slot)
        if req in self._waiting:
            self._waiting.remove(req)
        with self._cv:
            self.stats["finish_reasons"][reason] += 1
        self._emit(req, TokenDelta(last or [], reason, len(req.prompt), len(req.output), error))


def _shutdown_at_exit(ref):
    engine = ref()
    if engine is not None and engine.alive:
        engine.shutdown()


# ---------------------------------------------------------------------- loading a checkpoint to serve

def load_engine(model_dir, config: EngineConfig | None = None, lora: str | None = None, dtype: str = "float32",
                device: str = "auto", on_flush: Callable[[], None] | None = None, own_thread: bool = True) -> Engine:
    """An Engine over a checkpoint directory (which must carry its tokenizer), optionally with a LoRA merged."""
    from minimind.checkpoint import load_checkpoint
    from minimind.lora import merge_adapter

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_checkpoint(model_dir, device=device)
    if tokenizer is None:
        raise ValueError(f"{model_dir}: has no tokenizer.json; the server cannot encode prompts")
    if lora:
        # Merged once at load time, the adapter is free at serving time: the batched forward is the plain model's.
        merge_adapter(model, lora)
    model = model.to(DTYPES[dtype])
    config = config or EngineConfig()
    if config.packed_linears and can_pack(model):
        pack_linears(model.eval(), config.max_batch)  # this model is ours alone: packed in place
    return Engine(model, tokenizer, config, on_flush=on_flush, own_thread=own_thread)
