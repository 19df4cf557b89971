"""Ray Serve application: an OpenAI-compatible chat service over a MiniMind checkpoint directory.

  serve run serve.app:app model=DIR [max_batch=16 lora=ADAPTER_DIR ...]   (args: the ServeConfig fields)
  serve deploy serve/config.yaml                                           (replicas, autoscaling, GPU share)
  python serve/app.py --model DIR [--host 127.0.0.1] [--port 8000]         (starts a local Ray cluster)

Routes: POST /v1/chat/completions, POST /v1/completions (both streamed as SSE or not), GET /v1/models,
GET /health, and a chat page at /. Model ids: the checkpoint's name, and 'NAME:ADAPTER' for every LoRA adapter of
lora_modules / lora_dir (Ray Serve LLM's convention), decoded per request in the same batches as the base.
Generation runs in `serve.engine.Engine` (continuous batching on a preallocated KV cache) in a child process
of the replica (`serve.engine_process`); this file only validates, authorises and formats.

Safe by default: Serve binds 127.0.0.1; when the environment variable named by `api_key_env` (default
MINIMIND_API_KEY) is set where the app is built, /v1 routes, /openapi.json and the engine statistics in /health
require `Authorization: Bearer <key>`, and so does Ray Serve's own `/-/routes` on a cluster started here (its
`/-/healthz` stays open); web pages on other sites cannot drive the API through a browser
(serve/guard.py: POSTs must be application/json, the Host header must name this server, CORS only for
`cors_origins`); bodies and max_tokens are bounded; a prompt that does not fit the context is a 400; message
contents never become special tokens; every client error is an OpenAI-style JSON error with a 4xx status and the
replica keeps serving; every 503 carries Retry-After.
"""
import dataclasses
import hmac
import html
import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.runtime import REPO_ROOT, loopback_env
from serve.engine import EngineBusy, EngineConfig, EngineUnavailable
from serve.engine_process import EngineProcess
from serve.frontend import ContextLengthExceeded
from serve.guard import BrowserGuard, BrowserPolicy, arm_proxy, split_list
from serve.protocol import (SSE_DONE, ApiError, ChatCompletionRequest, CompletionRequest, ThinkSplitter,
                            chat_chunk, chat_response, completion_response, new_id, parse_request, sse, usage,
                            usage_chunk)

STATIC = Path(__file__).resolve().parent / "static"
APP_NAME = "minimind"
HEALTH_CHECK_PERIOD_S = 10
# Seconds a client should wait after a 503: a full queue drains quickly; a dead engine's replica is replaced
# after the next failed health check plus the new replica's start.
RETRY_BUSY_S, RETRY_DEAD_S = 1, 3 * HEALTH_CHECK_PERIOD_S


# Adapter names as they appear in model ids ('BASE:NAME') and as lora_dir subdirectories.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


@dataclass
class ServeConfig:
    """Arguments of the application builder (`serve run serve.app:app key=value ...`, config.yaml `args`)."""
    model: str = field(default="", metadata={"help": "checkpoint directory (required); a relative path is "
                                                        "looked up in the cwd, then in the project root"})
    name: str = field(default="", metadata={"help": "model id clients send; default: the directory's name"})
    lora: str = field(default="", metadata={"help": "LoRA adapter directory merged into the weights at load"})
    lora_modules: str = field(default="", metadata={
        "help": "comma list of NAME=DIR LoRA adapters (PEFT format, e.g. a stages/lora.py output) served per "
                "request: a request for model 'BASE:NAME' decodes with that adapter, in the same batches as the rest"})
    lora_dir: str = field(default="", metadata={
        "help": "directory whose subdirectories are LoRA adapters, served as 'BASE:SUBDIR'; each is read on its "
                "first request, and one added later is found too"})
    dtype: str = field(default="float32", metadata={"help": "weights and KV cache dtype",
                                                     "choices": ["float32", "bfloat16", "float64"]})
    device: str = field(default="auto", metadata={"help": "auto (cuda when the replica has a GPU), cpu, cuda"})
    max_batch: int = field(default=16, metadata={"help": "KV-cache slots: requests decoded together"})
    max_len: int = field(default=2048, metadata={"help": "context per request (prompt + completion)"})
    max_tokens: int = field(default=1024, metadata={"help": "largest max_tokens a request may ask (and default)"})
    max_waiting: int = field(default=256, metadata={"help": "queued requests beyond which the server answers 503"})
    prefill_tokens: int = field(default=512, metadata={
        "help": "prompt positions one prefill forward takes: new prompts are prefilled together up to this, a "
                "longer one in chunks of it between decode steps"})
    prefix_cache_tokens: int = field(default=4096, metadata={
        "help": "tokens of prompt-prefix K/V kept for reuse by later prompts that start alike (the chat "
                "template, a shared system prompt); 0: off"})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "largest request body accepted"})
    reasoning: str = field(default="auto", metadata={"help": "split <think>...</think> into reasoning_content",
                                                      "choices": ["auto", "on", "off"]})
    api_key_env: str = field(default="MINIMIND_API_KEY",
                             metadata={"help": "environment variable holding the API key (unset: no auth)"})
    num_replicas: int = field(default=1, metadata={
        "help": "replicas behind the one HTTP ingress, each with its own engine (serve deploy: config.yaml's "
                "num_replicas or autoscaling_config instead)"})
    num_cpus: float = field(default=1.0, metadata={"help": "CPUs reserved per replica"})
    num_gpus: float = field(default=0.0, metadata={"help": "GPU share per replica (e.g. 0.5)"})
    threads: int = field(default=0, metadata={"help": "torch threads of the engine; 0: floor(num_cpus)"})
    kv_cache: bool = field(default=True, metadata={"help": "use the KV cache (off: recompute, for benchmarks)"})
    access_log: bool = field(default=True, metadata={"help": "log every request in the replica's log"})
    stream_interval_ms: int = field(default=0, metadata={"help": "least ms between two streamed chunks of a "
                                                                 "request; tokens in between are merged"})
    allowed_hosts: str = field(default="", metadata={
        "help": "comma list of extra Host header values accepted (name or name:port; '*': any), for a server "
                "reached by a name, e.g. behind a reverse proxy; the bound address is always accepted"})
    cors_origins: str = field(default="", metadata={
        "help": "comma list of web origins (https://app.example.com) allowed to call the API from a browser "
                "(CORS); default none"})

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if "choices" in f.metadata and getattr(self, f.name) not in f.metadata["choices"]:
                raise ValueError(f"{f.name} must be one of {f.metadata['choices']}, got {getattr(self, f.name)!r}")
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {self.num_replicas}")
        if not self.model:
            raise ValueError("the checkpoint directory is required: model=DIR (or --model DIR)")
        path = Path(os.path.expanduser(self.model))
        if not path.is_absolute() and not path.exists():
            # `serve deploy` builds the app in a worker whose cwd is not the user's: fall back to the project root.
            path = REPO_ROOT / path
        path = path.resolve()
        if not (path / "config.json").is_file():
            raise ValueError(f"model={self.model}: {path} is not a checkpoint directory (no config.json)")
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"model={self.model}: {path} has no tokenizer.json; the server needs it for prompts")
        self.model = str(path)  # replicas run elsewhere: pass an absolute path
        self.name = self.name or path.name
        if self.lora:
            self.lora = str(Path(os.path.expanduser(self.lora)).resolve())
        modules = {}
        for item in split_list(self.lora_modules):
            name, sep, directory = (part.strip() for part in item.partition("="))
            if not sep or not ADAPTER_NAME.fullmatch(name) or not directory:
                raise ValueError(f"lora_modules: {item!r} is not NAME=DIR (NAME of letters, digits, '.', '_', '-')")
            path = Path(os.path.expanduser(directory)).resolve()
            if not (path / "adapter_config.json").is_file():
                raise ValueError(f"lora_modules: {name}={directory}: {path} has no adapter_config.json")
            modules[name] = str(path)
        self.lora_modules = ",".join(f"{k}={v}" for k, v in modules.items())  # absolute: replicas run elsewhere
        if self.lora_dir:
            path = Path(os.path.expanduser(self.lora_dir)).resolve()
            if not path.is_dir():
                raise ValueError(f"lora_dir={self.lora_dir}: {path} is not a directory")
            self.lora_dir = str(path)
        for origin in split_list(self.cors_origins):
            parts = urlsplit(origin)
            if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/")):
                raise ValueError(f"cors_origins: {origin!r} is not an origin like https://app.example.com")
        for host in split_list(self.allowed_hosts):
            if host != "*" and ("/" in host or urlsplit("//" + host).hostname is None):
                raise ValueError(f"allowed_hosts: {host!r} is not a host name like chat.example.com[:port]")


    def named_adapters(self) -> dict[str, str]:
        """{name: directory} of lora_modules (normalised by __post_init__ to NAME=/absolute/dir)."""
        return dict(item.split("=", 1) for item in split_list(self.lora_modules))

    def adapters(self) -> dict[str, str]:
        """{adapter name: directory} of every adapter served per request (lora_dir scanned now)."""
        found = {}
        if self.lora_dir:
            found = {d.name: str(d) for d in sorted(Path(self.lora_dir).iterdir())
                     if ADAPTER_NAME.fullmatch(d.name) and (d / "adapter_config.json").is_file()}
        return {**found, **self.named_adapters()}

    def adapter(self, name: str) -> str | None:
        """The directory of adapter `name`, or None; a lora_dir entry is looked up without scanning."""
        named = self.named_adapters()
        if name in named:
            return named[name]
        if self.lora_dir and ADAPTER_NAME.fullmatch(name):  # a plain name: never a path out of lora_dir
            path = Path(self.lora_dir) / name
            if (path / "adapter_config.json").is_file():
                return str(path)
        return None



@dataclass
class LaunchConfig(ServeConfig):
    """`python serve/app.py`: the builder's arguments plus where to listen."""
    host: str = field(default="127.0.0.1", metadata={"help": "HTTP address (0.0.0.0 exposes it to the network)"})
    port: int = field(default=8000, metadata={"help": "HTTP port"})


# ------------------------------------------------------------------------------------------ HTTP layer

# No open schema or docs pages: /openapi.json is a route below that asks for the key like /v1 does.
api = FastAPI(title="MiniMind OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)


def _replica_policy() -> BrowserPolicy:
    # The guard is attached at import time, the config arrives with the replica: ask the replica (one per process).
    return serve.get_replica_context().servable_object.browser_policy


def _error_body(status: int, message: str, code: str) -> dict:
    return ApiError(status, message, code=code).body()


class ReplicaHeader:
    """Pure ASGI middleware: every response names the replica that made it (`x-minimind-replica`), so a client
    or an operator behind the one ingress can tell replicas apart (a slow one, a log to read)."""

    def __init__(self, app):
        self.app = app
        self.value: bytes | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.value is None:
            self.value = serve.get_replica_context().replica_id.unique_id.encode()

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-minimind-replica", self.value)]}
            await send(message)
        return await self.app(scope, receive, send_with_header)


# Before @serve.ingress below, which freezes a copy of the app.
api.add_middleware(BrowserGuard, policy=_replica_policy, error_body=_error_body)
api.add_middleware(ReplicaHeader)  # outermost: refusals by the guard are labelled too


@api.exception_handler(ApiError)
async def _api_error(_request, e: ApiError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request, e: StarletteHTTPException):
    # Unknown routes and wrong methods: OpenAI's error shape instead of FastAPI's {"detail": ...}.
    return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)


@api.exception_handler(Exception)
async def _server_error(_request, e: Exception):
    return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}", type="server_error").body(),
                        status_code=500)


# Module-level helpers the routes call must be defined above the class: @serve.ingress pickles the routes
# (with the globals they name) when the class is decorated.
def _sse_response(events) -> StreamingResponse:
    # no-cache / X-Accel-Buffering: proxies in front must pass each event on at once, not buffer the stream.
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _unavailable(e: EngineUnavailable) -> ApiError:
    return ApiError(503, f"{e}; retry later", type="server_error", code="engine_unavailable",
                    retry_after=RETRY_DEAD_S)


async def _collect(stream) -> tuple[str, str, dict]:
    """Run a request to the end: (text, finish_reason, usage)."""
    parts = []
    try:
        async for d in stream:
            if d.error:
                raise ApiError(500, f"generation failed: {d.error}", type="server_error")
            parts.append(d.text)
    except EngineUnavailable as e:  # the engine process died mid-generation
        raise _unavailable(e) from None
    return "".join(parts), d.finish_reason, usage(d.prompt_tokens, d.completion_tokens)


@serve.deployment(name="MiniMind", max_ongoing_requests=256, health_check_period_s=HEALTH_CHECK_PERIOD_S)
@serve.ingress(api)
class MiniMindServer:
    def __init__(self, config: dict, api_key: str | None):
        from minimind.checkpoint import GENERATION_CONFIG, load_tokenizer

        self.cfg = ServeConfig(**config)
        self.tokenizer = load_tokenizer(self.cfg.model)
        # The engine runs in a child process so that HTTP work here never holds up a forward pass (GIL).
        self.engine = EngineProcess(self.cfg.model, EngineConfig(self.cfg.max_batch, self.cfg.max_len,
                                                                 self.cfg.kv_cache, self.cfg.max_waiting,
                                                                 prefill_tokens=self.cfg.prefill_tokens,
                                                                 prefix_cache_tokens=self.cfg.prefix_cache_tokens),
                                    lora=self.cfg.lora or None, dtype=self.cfg.dtype, device=self.cfg.device,
                                    threads=self.cfg.threads or max(1, math.floor(self.cfg.num_cpus)),
                                    stream_interval=self.cfg.stream_interval_ms / 1000, tokenizer=self.tokenizer)
        self.api_key = api_key
        self.browser_policy = BrowserPolicy(split_list(self.cfg.allowed_hosts), split_list(self.cfg.cors_origins))
        gen_config = Path(self.cfg.model) / GENERATION_CONFIG
        defaults = json.loads(gen_config.read_text(encoding="utf-8")) if gen_config.is_file() else {}
        # Unset temperature / top_p take the checkpoint's recommendation, as transformers' generate does.
        self.defaults = {k: defaults[k] for k in ("temperature", "top_p") if k in defaults}
        self.created = int(time.time())
        page = (STATIC / "index.html").read_text(encoding="utf-8")
        self.page = page.replace("{{MODEL}}", html.escape(self.cfg.name, quote=True))
        # Adapters are checked here against a weightless copy of the model (shapes only) before a request naming
        # one is queued: a bad adapter is a 400 naming it, not an error halfway through a stream.
        import torch

        from minimind.checkpoint import load_config
        from minimind.model import MiniMind
        from serve.adapters import AdapterPool
        with torch.device("meta"):
            self._adapter_check = AdapterPool(MiniMind(load_config(self.cfg.model)))
        self._adapters_ok: dict[str, tuple] = {}  # adapter directory -> the file times it was checked at

    def check_health(self):
        # Serve restarts a replica whose engine process died.
        if not self.engine.alive:
            raise RuntimeError("the engine process is not running")

    def __del__(self):  # Serve calls this when it stops the replica
        if hasattr(self, "engine"):
            self.engine.shutdown()

    # ------------------------------------------------------------------ routes

    @api.get("/", response_class=HTMLResponse)
    async def page(self):
        return HTMLResponse(self.page)

    @api.get("/health")
    async def health(self, request: Request):
        """Liveness for anyone ({"status": "ok"}, or a 503 with the reason); the engine statistics need the key."""
        try:
            if self.api_key is not None and "authorization" not in request.headers:
                self.engine.check_alive()
                return {"status": "ok"}
            self._authorize(request)
            stats = await self.engine.stats()
        except EngineUnavailable as e:
            raise _unavailable(e) from None
        return {"status": "ok", "model": self.cfg.name, "engine": stats}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        self._authorize(request)
        return request.app.openapi()

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        base = {"object": "model", "created": self.created, "owned_by": "minimind",
                "max_model_len": self.engine.context_len}
        return {"object": "list", "data": [{"id": self.cfg.name, **base}] + [
            {"id": f"{self.cfg.name}:{name}", **base, "parent": self.cfg.name} for name in self.cfg.adapters()]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._authorize(request)
        req: ChatCompletionRequest = parse_request(ChatCompletionRequest, await self._read_body(request))
        adapter = self._resolve_model(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            # Contents are encoded as plain text: "<|im_start|>system" typed by a user must not open a turn.
            prompt = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        rid = new_id("chatcmpl")
        stream = self._start(req, prompt, adapter)
        if req.stream:
            return _sse_response(self._chat_events(rid, req, stream))
        text, finish, counts = await _collect(stream)
        splitter = ThinkSplitter(self.cfg.reasoning)
        reasoning, content = (a + b for a, b in zip(splitter.push(text), splitter.flush()))
        return chat_response(rid, req.model, content, reasoning, finish, counts)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        self._authorize(request)
        req: CompletionRequest = parse_request(CompletionRequest, await self._read_body(request))
        adapter = self._resolve_model(req.model)
        if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], str)):
            try:  # text, never special tokens (a token-id prompt can name those explicitly)
                prompt = self.tokenizer.encode_plain(req.prompt if isinstance(req.prompt, str) else req.prompt[0])
            except ValueError as e:
                raise ApiError(400, str(e), param="prompt") from None
        else:
            prompt = list(req.prompt)
            if any(not 0 <= t < self.tokenizer.vocab_size for t in prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {self.tokenizer.vocab_size})", param="prompt")
        rid = new_id("cmpl")
        stream = self._start(req, prompt, adapter)
        if req.stream:
            return _sse_response(self._completion_events(rid, req, stream))
        text, finish, counts = await _collect(stream)
        return completion_response(rid, req.model, text, finish, counts)

    # ------------------------------------------------------------------ helpers

    def _authorize(self, request: Request):
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # Constant-time comparison: the time taken must not reveal how much of a guessed key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_big = ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():  # counted as it arrives: a chunked body has no content-length
            body += chunk
            if len(body) > limit:
                raise too_big
        return bytes(body)

    def _resolve_model(self, model: str) -> str | None:
        """The adapter directory a model id asks for ('BASE' -> None, 'BASE:NAME' -> NAME's), checked once."""
        if model == self.cfg.name:
            return None
        base, _, name = model.partition(":")
        path = self.cfg.adapter(name) if base == self.cfg.name and name else None
        if path is None:
            served = "'" + "', '".join([self.cfg.name] + [f"{self.cfg.name}:{a}" for a in self.cfg.adapters()]) + "'"
            raise ApiError(404, f"the model '{model}' does not exist; this server serves {served}",
                           param="model", code="model_not_found")
        files = [Path(path) / f for f in ("adapter_config.json", "adapter_model.safetensors")]
        stamp = tuple(f.stat().st_mtime_ns if f.exists() else None for f in files)
        if self._adapters_ok.get(path) != stamp:
            try:
                self._adapter_check.read(path)
            except (ValueError, OSError) as e:
                raise ApiError(400, f"the adapter '{name}' cannot be served: {e}", param="model") from None
            self._adapters_ok[path] = stamp
        return path

    def _start(self, req, prompt: list[int], adapter: str | None = None):
        """Check the token budget and submit to the engine; every refusal here is a 4xx/503 before streaming."""
        asked = req.max_completion_tokens or req.max_tokens
        if asked is not None and asked > self.cfg.max_tokens:
            raise ApiError(400, f"max_tokens is {asked}; this server allows at most {self.cfg.max_tokens}",
                           param="max_tokens")
        room = self.engine.context_len - len(prompt)
        if room < 1:
            raise ApiError(400, f"this model's maximum context length is {self.engine.context_len} tokens; the "
                                f"prompt has {len(prompt)}", param="messages", code="context_length_exceeded")
        params = req.sampling_params(min(self.cfg.max_tokens, room), self.defaults)
        try:
            return self.engine.stream(prompt, params, stop=req.stop_strings(), ignore_eos=req.ignore_eos,
                                      adapter=adapter)
        except ContextLengthExceeded as e:
            raise ApiError(400, str(e), code="context_length_exceeded") from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        except EngineBusy as e:
            raise ApiError(503, f"the server is busy ({e}); retry later", type="server_error",
                           code="server_busy", retry_after=RETRY_BUSY_S) from None
        except EngineUnavailable as e:  # the health check replaces this replica
            raise _unavailable(e) from None

    async def _chat_events(self, rid: str, req: ChatCompletionRequest, stream):
        name = req.model
        splitter = ThinkSplitter(self.cfg.reasoning)
        yield sse(chat_chunk(rid, name, {"role": "assistant", "content": ""}))
        try:
            async for d in stream:
                if d.error:
                    yield sse(ApiError(500, d.error, type="server_error").body())
                    break
                reasoning, content = splitter.push(d.text)
                if d.finish_reason:
                    reasoning, content = (a + b for a, b in zip((reasoning, content), splitter.flush()))
                delta = {k: v for k, v in (("reasoning_content", reasoning), ("content", content)) if v}
                if delta:
                    yield sse(chat_chunk(rid, name, delta))
                if d.finish_reason:
                    yield sse(chat_chunk(rid, name, {}, d.finish_reason))
                    if req.include_usage():
                        yield sse(usage_chunk(rid, name, "chat.completion.chunk",
                                              usage(d.prompt_tokens, d.completion_tokens)))
        except EngineUnavailable as e:  # the stream's status (200) is sent: the error event says 503 and why
            yield sse(_unavailable(e).body())
        finally:
            await stream.aclose()  # a client that hung up cancels its request and frees the slot now
        yield SSE_DONE

    async def _completion_events(self, rid: str, req: CompletionRequest, stream):
        name = req.model
        try:
            async for d in stream:
                if d.error:
                    yield sse(ApiError(500, d.error, type="server_error").body())
                    break
                if d.text or d.finish_reason:
                    yield sse(completion_response(rid, name, d.text, d.finish_reason))
                if d.finish_reason and req.include_usage():
                    yield sse(usage_chunk(rid, name, "text_completion",
                                          usage(d.prompt_tokens, d.completion_tokens)))
        except EngineUnavailable as e:
            yield sse(_unavailable(e).body())
        finally:
            await stream.aclose()
        yield SSE_DONE


# ---------------------------------------------------------------------------------- application builder

def parse_args(args: dict) -> ServeConfig:
    """Builder arguments (strings from `serve run k=v`, typed values from config.yaml) to a ServeConfig."""
    known = {f.name for f in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown application arguments {unknown}; known: {sorted(known)}")
    from minimind.configcli import coerce  # the conversion the stages' flags and config files use

    try:
        values = coerce(ServeConfig, args)
    except ValueError as e:
        raise ValueError(f"application argument {e}") from None
    return ServeConfig(**values)


def build_app(args: dict) -> serve.Application:
    """The Serve application builder: `serve run serve.app:app model=DIR` calls it with the key=value args."""
    cfg = args if isinstance(args, ServeConfig) else parse_args(args)
    api_key = os.environ.get(cfg.api_key_env) or None
    import ray
    if not ray.is_initialized():
        # `serve run` calls this builder before it starts its own cluster: the environment set here reaches
        # that cluster (loopback only, this project importable by its workers) and its proxy (the key).
        loopback_env()
        arm_proxy(cfg.api_key_env)
    options = {"num_cpus": cfg.num_cpus}
    if cfg.num_gpus:
        options["num_gpus"] = cfg.num_gpus
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ServeConfig)}
    # Set only when asked: a config.yaml deployment with autoscaling_config must not also get num_replicas.
    replicas = {"num_replicas": cfg.num_replicas} if cfg.num_replicas != 1 else {}
    return MiniMindServer.options(ray_actor_options=options, **replicas,
                                  logging_config={"enable_access_log": cfg.access_log}).bind(fields, api_key)


app = build_app  # `serve run serve.app:app model=DIR`: Serve passes arguments only to builder functions


def main(argv=None):
    from minimind.configcli import parse_config

    cfg = parse_config(LaunchConfig, argv, prog="python serve/app.py",
                       description="Serve a MiniMind checkpoint with an OpenAI-compatible API on a local Ray cluster.")
    from cluster.runtime import init_ray

    external = bool(os.environ.get("RAY_ADDRESS"))
    arm_proxy(cfg.api_key_env)  # reaches the proxy of the cluster started next, not one already running
    ray = init_ray()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    base = ServeConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ServeConfig)})
    serve.run(build_app(base), name=APP_NAME, route_prefix="/")
    auth = f"API key from ${cfg.api_key_env}" if os.environ.get(cfg.api_key_env) else "no API key"
    print(f"Serving '{cfg.name}' at http://{cfg.host}:{cfg.port}/ (OpenAI API under /v1, {auth}). Ctrl-C stops.",
          flush=True)
    # SIGTERM (kill, timeout, systemd) must also take the cluster down, not orphan its processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if external:
            serve.delete(APP_NAME)  # leave a shared cluster's Serve instance running
        else:
            serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    from serve.app import main as _main  # as `serve.app`, not `__main__`, so replicas unpickle it by name
    _main()
