"""Prefix caching: keys and values of prompt prefixes already computed, reused by later prompts that start alike.

Every chat request through the service starts with the same template text (the system turn, the user turn's
opening), and an application's long system prompt repeats in every request. Their K/V depend only on the
tokens before them (causal attention; RoPE positions count from 0 in every slot) and on the weights, so a
prefix computed once can be copied into a new request's KV-cache slot instead of being prefilled again.

Prompts are cut into blocks of `block` tokens. Block i is stored under a key that names the whole prefix up
to its end: sha256 of (the key of block i - 1, the LoRA adapter the request decodes with, block i's tokens),
chained as in vLLM's automatic prefix caching. A cryptographic hash, because a collision would hand one
request another's K/V: with Python's `hash`, whose value for a tuple of ints is the same in every process, a
client could craft a prompt that collides. The adapter is part of the key because it changes every K/V.

Entries are evicted least recently used beyond `capacity` tokens. Lookup takes the longest run of leading
blocks present, and always leaves at least one prompt token to prefill (its forward gives the first token's
logits). Cached blocks are copied, not shared: each slot keeps its own contiguous K/V, so the attention code
and the decode path are unchanged.
"""
from __future__ import annotations

import collections
import hashlib
from typing import Sequence

import numpy as np
import torch


class PrefixCache:
    def __init__(self, cache, block: int = 16, capacity: int = 4096):
        """cache: the engine's `minimind.model.KVCache`; capacity: tokens of K/V kept (a multiple of block)."""
        if block < 1 or capacity < block:
            raise ValueError(f"prefix cache needs block >= 1 and capacity >= block, got {block}, {capacity}")
        self.cache, self.block, self.max_blocks = cache, block, capacity // block
        # key -> (k, v), each (layers, kv heads, block, head dim); oldest first
        self.blocks: collections.OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = collections.OrderedDict()
        self.stats = {"lookups": 0, "lookup_tokens": 0, "hit_tokens": 0, "stored_blocks": 0, "evicted_blocks": 0}

    def _keys(self, prompt: Sequence[int], adapter: str | None, blocks: int) -> list[bytes]:
        ids = np.asarray(prompt[: blocks * self.block], dtype=np.int64)
        keys, parent = [], (adapter or "").encode()
        for i in range(blocks):
            parent = hashlib.sha256(parent + ids[i * self.block:(i + 1) * self.block].tobytes()).digest()
            keys.append(parent)
        return keys

    def load(self, prompt: Sequence[int], adapter: str | None, slot: int) -> int:
        """Copy the longest cached prefix of `prompt` into `slot` (whose length must be 0); returns its tokens."""
        usable = (len(prompt) - 1) // self.block  # at least one token is left to prefill
        self.stats["lookups"] += 1
        self.stats["lookup_tokens"] += len(prompt)
        found = []
        for key in self._keys(prompt, adapter, usable):
            entry = self.blocks.get(key)
            if entry is None:
                break
            self.blocks.move_to_end(key)
            found.append(entry)
        if not found:
            return 0
        n = len(found) * self.block
        self.cache.k[:, slot, :, :n] = torch.cat([k for k, _ in found], dim=2)
        self.cache.v[:, slot, :, :n] = torch.cat([v for _, v in found], dim=2)
        self.cache.lengths[slot] = n
        self.stats["hit_tokens"] += n
        return n

    def store(self, prompt: Sequence[int], adapter: str | None, slot: int) -> None:
        """Keep the whole blocks of `prompt`, whose K/V are in `slot` now (its prefill just completed)."""
        for i, key in enumerate(self._keys(prompt, adapter, len(prompt) // self.block)):
            if key in self.blocks:
                self.blocks.move_to_end(key)
                continue
            span = slice(i * self.block, (i + 1) * self.block)
            self.blocks[key] = (self.cache.k[:, slot, :, span].clone(), self.cache.v[:, slot, :, span].clone())
            self.stats["stored_blocks"] += 1
        while len(self.blocks) > self.max_blocks:
            self.blocks.popitem(last=False)
            self.stats["evicted_blocks"] += 1

    def clear(self) -> None:
        self.blocks.clear()

    @property
    def tokens(self) -> int:
        return len(self.blocks) * self.block
