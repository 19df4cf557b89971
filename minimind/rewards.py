"""Rewards for reinforcement learning: functions of (prompt, completion) -> float, built from `--reward` specs.

A spec names one term, optionally weighted as SPEC=WEIGHT (default 1); several specs add up:
  format            1.0 when the completion is `<think>...</think>` then `<answer>...</answer>` (MiniMind's
                    reasoning template; whitespace around and between the parts allowed), else 0.0
  length:N          closeness to N tokens: max(0, 1 - |n - N| / N), n the completion's tokens (characters when
                    no tokenizer is given)
  regex:PATTERN     1.0 when PATTERN (Python `re`) matches anywhere in the completion, else 0.0
  module:function   any importable callable taking (prompt, completion) and returning a number
e.g. `--reward format=0.5 --reward 'regex:[春秋]=1'`. The weight is the text after the last '=' when it reads
as a number, so a pattern may itself hold '='.
"""
from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

Reward = Callable[[str, str], float]

_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)


def format_reward(prompt: str, completion: str) -> float:
    return 1.0 if _FORMAT.fullmatch(completion) else 0.0


def length_reward(target: int, count: Callable[[str], int] = len) -> Reward:
    if target < 1:
        raise ValueError(f"length:N needs N >= 1, got {target}")

    def reward(prompt: str, completion: str) -> float:
        return max(0.0, 1.0 - abs(count(completion) - target) / target)
    return reward


def regex_reward(pattern: str) -> Reward:
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"regex:{pattern}: not a valid regular expression ({e})") from None

    def reward(prompt: str, completion: str) -> float:
        return 1.0 if compiled.search(completion) else 0.0
    return reward


def callable_reward(path: str) -> Reward:
    module_name, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward {path}: cannot import {attr!r} from {module_name!r} ({e})") from None
    if not callable(fn):
        raise ValueError(f"reward {path}: {attr!r} is not callable")
    return fn


@dataclass(frozen=True)
class RewardTerm:
    name: str      # the spec without its weight, as metrics name it
    weight: float
    fn: Reward


def split_weight(spec: str) -> tuple[str, float]:
    """('regex:a=b', 1.0) for 'regex:a=b'; ('format', 0.5) for 'format=0.5'."""
    head, sep, tail = spec.rpartition("=")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return spec, 1.0
        if not math.isfinite(weight):
            raise ValueError(f"reward {spec}: the weight must be a finite number")
        return head, weight
    return spec, 1.0


def parse_reward(spec: str, count_tokens: Callable[[str], int] | None = None) -> RewardTerm:
    name, weight = split_weight(spec.strip())
    kind, _, arg = name.partition(":")
    if name == "format":
        fn = format_reward
    elif kind == "length":
        try:
            target = int(arg)
        except ValueError:
            raise ValueError(f"reward {spec}: length:N needs an integer N") from None
        fn = length_reward(target, count_tokens or len)
    elif kind == "regex":
        fn = regex_reward(arg)
    elif kind and arg and kind != "model":
        fn = callable_reward(name)
    else:
        raise ValueError(f"unknown reward {spec!r}: use format, length:N, regex:PATTERN or module:function, "
                         f"each optionally =WEIGHT")
    return RewardTerm(name, weight, fn)


class Rewards:
    """The weighted sum of reward terms; `score` also gives every term's value, for per-term metrics."""

    def __init__(self, specs: Sequence[str], count_tokens: Callable[[str], int] | None = None):
        if not specs:
            raise ValueError("no reward given: pass at least one --reward")
        self.terms = [parse_reward(s, count_tokens) for s in specs]

    def score(self, prompt: str, completion: str) -> tuple[float, dict[str, float]]:
        values = {t.name: float(t.fn(prompt, completion)) for t in self.terms}
        for name, value in values.items():
            if not math.isfinite(value):
                raise ValueError(f"reward {name} returned {value} for a completion; rewards must be finite")
        return sum(t.weight * values[t.name] for t in self.terms), values
