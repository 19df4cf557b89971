"""The front end of a generation request: what happens to it outside the engine core, once.

The core (`serve.engine.Engine`) schedules, runs forwards and samples on token ids only: it takes a request that
is already valid and emits `TokenDelta`s. Everything about text lives here, on the side that talks to the
client (the Serve replica's process, or the caller's thread for an in-process engine), so none of it runs on
the scheduler thread between two forward passes:
  * `validate`: the request fits the sampling rules and the context (raised before anything is queued);
  * `TextOutput`: incremental detokenization that never splits a UTF-8 character, and stop strings. A stop
    string ends the client's output at once; the caller then cancels the core request with reason "stop", which
    frees its slot (the core may have produced a token or two more by then; they are dropped here).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from minimind.generate import SamplingParams, TextStream


@dataclass
class TokenDelta:
    """What the core emits for one request: token ids since its last TokenDelta, and how it ended."""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (a stop id), "length", "abort" or "error" on the last one
    prompt_tokens: int = 0
    completion_tokens: int = 0        # tokens generated so far, not counting a stop id
    error: str | None = None

    def merge(self, later: "TokenDelta") -> "TokenDelta":
        return TokenDelta(self.token_ids + later.token_ids, later.finish_reason, later.prompt_tokens,
                          later.completion_tokens, later.error)


@dataclass
class Delta:
    """New output of one request since the last Delta its client received: text and the ids that made it."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (stop id or stop string), "length", "abort" or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0        # tokens up to here, not counting a stop id
    error: str | None = None

    def merge(self, later: "Delta") -> "Delta":
        """One Delta carrying both: a slow consumer gets a single chunk instead of a backlog."""
        return Delta(self.text + later.text, self.token_ids + later.token_ids, later.finish_reason,
                     later.prompt_tokens, later.completion_tokens, later.error)


class ContextLengthExceeded(ValueError):
    """Prompt plus max_tokens do not fit the context (HTTP 400, code context_length_exceeded)."""


def validate(prompt_ids: Sequence[int], params: SamplingParams, context_len: int) -> None:
    """Raise ValueError when a request cannot run: the server turns it into a 400 before streaming."""
    params.validate()
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if params.max_new_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    if len(prompt_ids) + params.max_new_tokens > context_len:
        raise ContextLengthExceeded(
            f"this model's maximum context length is {context_len} tokens; the request needs "
            f"{len(prompt_ids) + params.max_new_tokens} ({len(prompt_ids)} in the prompt, {params.max_new_tokens} "
            f"for the completion)")


class TextOutput:
    """One request's text: `push` each TokenDelta from the core, hand on the Delta it returns (if any).

    A stop string may straddle tokens, so the last len(longest stop) - 1 characters wait until the next token
    decides; a character whose bytes are not all in yet waits too (TextStream). After a stop string or the
    core's last TokenDelta, `done` is True and the Delta returned is the last one; `stopped` tells the first case,
    where the caller must cancel the core request (reason "stop").
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.stream = TextStream(tokenizer)
        self.stop = tuple(s for s in stop if s)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""       # decoded output, already cut at a stop string
        self.sent = 0        # characters of `text` handed on
        self.tokens = 0      # output tokens taken in (a stop string's last token included)
        self.unsent_ids: list[int] = []
        self.done = False
        self.stopped = False  # a stop string ended the text: the core request is still running, cancel it

    def push(self, core: TokenDelta) -> Delta | None:
        if self.done:
            return None  # tokens the core made before it heard of the stop string
        for token in core.token_ids:
            self.tokens += 1
            self.unsent_ids.append(token)
            before = len(self.text)
            self.text += self.stream.push(token)
            if self.stop:
                # Only text that arrived with this token (plus a stop string's length before it) can hold a match.
                start = max(0, before - self.holdback)
                hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
                if hits:
                    self.text = self.text[:min(hits)]
                    self.stopped = True
                    return self._last("stop", core)
        if core.finish_reason is not None:
            self.text += self.stream.flush()
            return self._last(core.finish_reason, core)
        ready = len(self.text) - self.holdback
        if ready <= self.sent:
            return None
        return self._delta(self.text[self.sent:ready], core)

    def _last(self, reason: str, core: TokenDelta) -> Delta:
        self.done = True
        return self._delta(self.text[self.sent:], core, reason, core.error if reason == core.finish_reason else None)

    def _delta(self, text: str, core: TokenDelta, reason: str | None = None, error: str | None = None) -> Delta:
        delta = Delta(text, self.unsent_ids, reason, core.prompt_tokens, self.tokens, error)
        self.sent += len(text)
        self.unsent_ids = []
        return delta
