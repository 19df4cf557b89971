"""The OpenAI wire format: request validation, response and stream-chunk bodies, errors, reasoning split.

Requests are validated strictly (a string where a number belongs is a 400, not silently coerced) and every
failure becomes OpenAI's error body `{"error": {"message", "type", "param", "code"}}`. Fields we cannot honour
(n > 1, logprobs, top_logprobs, logit_bias, frequency_penalty, tools, tool_choice, response_format, echo, ...)
are refused rather than ignored. Extensions that vLLM also
accepts: top_k, repetition_penalty, ignore_eos.

Reference: https://platform.openai.com/docs/api-reference/chat and /completions.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from minimind.generate import SamplingParams


class ApiError(Exception):
    """An error the client caused (or a busy server): becomes an HTTP status and OpenAI's error body.

    retry_after: seconds a client should wait before trying again, sent as `Retry-After`; every 503 has one.
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after if retry_after is not None or status != 503 else 1

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------- requests

class _Strict(BaseModel):
    # Unknown fields are ignored (clients send extras such as `user`), known ones must have the right type.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Sampling(_Strict):
    """Fields shared by chat and text completions. None means the checkpoint's default."""
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2 ** 63, lt=2 ** 64)  # what torch.Generator.manual_seed accepts
    repetition_penalty: float = Field(1.0, gt=0)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    n: int = Field(1, ge=1)
    logprobs: bool | int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    # Accepted by OpenAI's API and not implemented here: any value that would change the answer is refused.
    logit_bias: dict | None = None
    top_logprobs: int | None = None

    def check_supported(self):
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias")
        if self.top_logprobs is not None:
            raise ApiError(400, "top_logprobs is not supported (no logprobs are returned)", param="top_logprobs")
        if self.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        if self.frequency_penalty:
            raise ApiError(400, "frequency_penalty is not supported; use presence_penalty or repetition_penalty",
                           param="frequency_penalty")
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        if len(self.stop_strings()) > 4:
            raise ApiError(400, "at most 4 stop sequences are allowed", param="stop")

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, default_max_tokens: int, defaults: dict) -> SamplingParams:
        temperature = self.temperature if self.temperature is not None else defaults.get("temperature", 1.0)
        top_p = self.top_p if self.top_p is not None else defaults.get("top_p", 1.0)
        return SamplingParams(
            max_new_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
            temperature=temperature, top_k=self.top_k, top_p=top_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty, seed=self.seed)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None        # the older form of tools
    function_call: str | dict | None = None
    response_format: dict | None = None

    def check_supported(self):
        super().check_supported()
        # An empty tool list, "none"/"auto" without tools and a text format are what no field at all means.
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise ApiError(400, f"{name} are not supported: this model cannot call tools", param=name)
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none", "auto"):
                raise ApiError(400, f"{name} is not supported: this model cannot call tools", param=name)
        if self.response_format not in (None, {"type": "text"}):
            raise ApiError(400, "response_format is not supported; only {\"type\": \"text\"} is",
                           param="response_format")


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self):
        super().check_supported()
        if self.echo or self.suffix or (self.best_of or 1) != 1:
            raise ApiError(400, "echo, suffix and best_of are not supported")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            raise ApiError(400, "only one prompt per request is supported", param="prompt")


def parse_request(cls: type[_Sampling], body: bytes) -> _Sampling:
    """Validate a JSON body into `cls`, turning the first problem into a 400 that names the field."""
    try:
        req = cls.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON: {err['msg']}") from None
        param = ".".join(str(p) for p in err["loc"]) or None
        where = f" at '{param}'" if param else ""
        raise ApiError(400, f"invalid request{where}: {err['msg']}", param=param) from None
    req.check_supported()
    return req


# --------------------------------------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def chat_response(rid: str, model: str, content: str, reasoning: str, finish_reason: str, usage_: dict) -> dict:
    message = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning_content"] = reasoning
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage_}


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def completion_response(rid: str, model: str, text: str, finish_reason: str | None,
                        usage_: dict | None = None) -> dict:
    out = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def usage_chunk(rid: str, model: str, obj: str, usage_: dict) -> dict:
    """The extra last chunk of a stream with stream_options.include_usage: no choices, only usage."""
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage_}


# ------------------------------------------------------------------------------------- reasoning models

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


class ThinkSplitter:
    """Splits a streamed answer into reasoning (inside <think>...</think>) and content, piece by piece.

    mode "auto": an output that starts with <think> is a reasoning output; "on": the output starts inside the
    thinking part (a template that already opened <think>); "off": everything is content, tags included.
    MiniMind's reasoning template wraps the reply in <answer>...</answer>; in "auto" and "on" the content is
    the reply without that wrapper and without the newlines just inside it. Text that could be the start of a
    tag is held back until the next piece decides, so a tag split across tokens never leaks.
    """

    def __init__(self, mode: str = "auto"):
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"reasoning mode must be auto, on or off, got {mode!r}")
        # start -> [think ->] reply (is it wrapped in <answer>?) -> answer;  "off": plain throughout
        self.state = "plain" if mode == "off" else "start"
        self.mode = mode
        self.buf = ""
        self.after_think = False     # the newline(s) a model writes right after </think> are dropped
        self.strip_newlines = False  # ... and those right after <answer>
        self.wrapped = False         # inside <answer>: its </answer> and the newlines before it are dropped

    def push(self, text: str) -> tuple[str, str]:
        """Returns (reasoning, content) ready to send."""
        self.buf += text
        reasoning = ""
        if self.state == "start":
            head = self.buf.lstrip()
            if head.startswith(THINK_OPEN):
                self.buf, self.state = head[len(THINK_OPEN):], "think"
            elif THINK_OPEN.startswith(head) or ANSWER_OPEN.startswith(head):
                return "", ""  # still possibly "<thi..." or "<ans..."
            else:
                self.state = "think" if self.mode == "on" else "reply"
        if self.state == "think":
            end = self.buf.find(THINK_CLOSE)
            if end < 0:
                keep = _partial_suffix(self.buf, THINK_CLOSE)
                reasoning, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                return reasoning, ""
            reasoning, self.buf = self.buf[:end], self.buf[end + len(THINK_CLOSE):]
            self.state, self.after_think = "reply", True
        if self.state == "reply":
            head = self.buf.lstrip()
            if head.startswith(ANSWER_OPEN):
                self.buf, self.wrapped, self.strip_newlines = head[len(ANSWER_OPEN):], True, True
            elif ANSWER_OPEN.startswith(head):
                return reasoning, ""  # nothing visible yet, or a partial "<ans"
            else:
                self.strip_newlines = self.after_think
            self.state = "answer"
        if self.state == "answer":
            if self.strip_newlines:
                self.buf = self.buf.lstrip("\n")
                self.strip_newlines = not self.buf
            if self.wrapped:
                end = self.buf.find(ANSWER_CLOSE)
                if end >= 0:
                    self.wrapped = False
                    return reasoning, self.buf[:end].rstrip("\n") + self._take(end + len(ANSWER_CLOSE))
                # Hold back what may still turn out to be the closing tag, or newlines just before it.
                partial = _partial_suffix(self.buf, ANSWER_CLOSE)
                before = self.buf[:len(self.buf) - partial]
                keep = partial + len(before) - len(before.rstrip("\n"))
                content, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                return reasoning, content
        return reasoning, self._take(0)

    def _take(self, start: int) -> str:
        rest, self.buf = self.buf[start:], ""
        return rest

    def flush(self) -> tuple[str, str]:
        rest, self.buf = self.buf, ""
        return (rest, "") if self.state == "think" else ("", rest)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
