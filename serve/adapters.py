"""Several LoRA adapters served at once over one base model: each request picks its adapter, and requests with
different adapters (or none) share every forward pass.

Every linear layer some loaded adapter targets is wrapped in a `BatchedLoRALinear`: the base output plus
((x A_all^T) * mask) B_all^T, where A_all (n r, in) and B_all (out, n r) hold every loaded adapter side by side
(ranks padded to the largest) and the (B, 1, n r) mask keeps, for each row, only its own adapter's r columns.
Four dense ops per projection whatever the mix of adapters in the batch; rows without an adapter add nothing,
and a batch without any skips the adapter math. Their cost grows with the number of adapters loaded (n r
columns), so this suits a handful. (Measured slower: gathering each row's own A and B for a batched matmul,
and per-adapter row groups with index_add_; bench/NOTES.md, "LoRA adapters per request".)
Ranks may differ between adapters (padded with zeros to the largest), and so may their target modules (a
module an adapter does not target holds zeros for it). The scale alpha / r is folded into B when stacked.

The scheduler thread owns the pool: `install` (at admission of a request naming an adapter not yet loaded)
and `select` (before each forward) are called from it only. Reading an adapter's files (`read_adapter`,
which checks them) happens at submission, in the caller's thread, so that a bad adapter fails its request
before it is queued.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from minimind.lora import read_adapter


class BatchedLoRALinear(nn.Module):
    """y = base(x) + B[a] A[a] x for the adapter a of each batch row (x: (B, T, in))."""

    def __init__(self, base: nn.Module, pool: "AdapterPool"):
        super().__init__()
        self.base, self.pool = base, pool
        self.in_features, self.out_features = base.in_features, base.out_features
        weight = base.weight
        # Adapter k (1-based) holds rows/columns (k - 1) r .. k r of these; the scale alpha / r is in B.
        self.A = torch.zeros(0, self.in_features, dtype=weight.dtype, device=weight.device)   # (n r, in)
        self.B = torch.zeros(self.out_features, 0, dtype=weight.dtype, device=weight.device)  # (out, n r)

    @property
    def weight(self):  # what callers of the base linear read (dtype, device, parameter counts)
        return self.base.weight

    def forward(self, x):
        y = self.base(x)
        mask = self.pool.mask
        if mask is None or self.A.shape[0] == 0:
            return y
        if x.dim() != 3 or x.shape[0] != mask.shape[0] or self.A.shape[0] != mask.shape[-1]:
            raise RuntimeError(f"multi-LoRA serving needs (batch, time, features) inputs with one adapter per "
                               f"row; got {tuple(x.shape)} for a mask of {tuple(mask.shape)}")
        return y.add_(((x @ self.A.t()) * mask) @ self.B.t())  # (B, T, n r) -> (B, T, out)

    def restack(self, a: torch.Tensor | None, b: torch.Tensor | None, n: int, old_width: int, width: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacks for n adapters at `width` ranks each: the n - 1 held now (at `old_width`) and a new last
        one (A (r, in), B (out, r), scale folded in; None: zeros, it skips this layer). Built aside, so that a
        failure halfway through an install leaves every layer as it was."""
        A = torch.zeros(n, width, self.in_features, dtype=self.A.dtype, device=self.A.device)
        B = torch.zeros(self.out_features, n, width, dtype=self.B.dtype, device=self.B.device)
        if n > 1 and old_width:
            A[:n - 1, :old_width] = self.A.view(n - 1, old_width, self.in_features)
            B[:, :n - 1, :old_width] = self.B.view(self.out_features, n - 1, old_width)
        if a is not None:
            A[n - 1, :a.shape[0]], B[:, n - 1, :b.shape[1]] = a, b
        return A.view(n * width, self.in_features), B.view(self.out_features, n * width)


class AdapterPool:
    """The adapters loaded into one model, by directory; index 0 is the base model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.index: dict[str, int] = {}          # resolved adapter directory -> its number (1, 2, ...)
        self.layers: dict[str, BatchedLoRALinear] = {}
        self.width = 0                            # ranks per adapter in the stacks: the largest rank loaded
        self.mask: torch.Tensor | None = None     # (B, 1, n width) for the next forward; None: no adapter in it

    def __len__(self) -> int:
        return len(self.index)

    @staticmethod
    def key(directory) -> str:
        return str(Path(directory).resolve())

    def read(self, directory) -> tuple[str, dict]:
        """Read and check an adapter directory against the model (any thread); returns (key, its tensors)."""
        key = self.key(directory)
        rank, alpha, targets, sd = read_adapter(key)
        linears = {name: m for name, m in self.model.named_modules()
                   if name.rsplit(".", 1)[-1] in targets and isinstance(m, (nn.Linear, BatchedLoRALinear))}
        if not linears:
            raise ValueError(f"{key}: the adapter targets {list(targets)}; the model has no such linear layer")
        tensors, scale = {}, alpha / rank
        for name, m in linears.items():
            a, b = sd.get(f"{name}.lora_A"), sd.get(f"{name}.lora_B")
            if a is None or b is None:
                raise ValueError(f"{key}: the adapter has no weights for {name}")
            if tuple(a.shape) != (rank, m.in_features) or tuple(b.shape) != (m.out_features, rank):
                raise ValueError(f"{key}: {name} has A {tuple(a.shape)} and B {tuple(b.shape)}; the model needs "
                                 f"({rank}, {m.in_features}) and ({m.out_features}, {rank})")
            if ".experts." in name:
                raise ValueError(f"{key}: {name} is an MoE expert; adapters on experts are merged at load "
                                 f"(lora=DIR), not served per request")
            tensors[name] = (a, b * scale, rank)
        return key, tensors

    def install(self, key: str, tensors: dict) -> int:
        """Stack a read adapter into the wrapped layers (scheduler thread); returns its index."""
        if key in self.index:
            return self.index[key]
        weight = next(iter(self.model.parameters()))
        for name in tensors:
            if name not in self.layers:
                parent_name, _, child = name.rpartition(".")
                parent = self.model.get_submodule(parent_name)
                wrapped = BatchedLoRALinear(getattr(parent, child), self)
                # The adapters loaded before skip this layer: zeros in their place.
                wrapped.A = torch.zeros(len(self.index) * self.width, wrapped.in_features, dtype=weight.dtype,
                                        device=weight.device)
                wrapped.B = torch.zeros(wrapped.out_features, len(self.index) * self.width, dtype=weight.dtype,
                                        device=weight.device)
                setattr(parent, child, wrapped)
                self.layers[name] = wrapped
        n = len(self.index) + 1
        width = max([self.width] + [rank for _, _, rank in tensors.values()])
        stacks = {}
        for name, layer in self.layers.items():
            a, b, _ = tensors.get(name, (None, None, 0))
            stacks[name] = layer.restack(None if a is None else a.to(weight.device, layer.A.dtype),
                                         None if b is None else b.to(weight.device, layer.B.dtype), n, self.width,
                                         width)
        for name, (A, B) in stacks.items():
            self.layers[name].A, self.layers[name].B = A, B
        self.index[key], self.width = n, width
        return self.index[key]

    def select(self, adapters: Sequence[int], device) -> None:
        """Set the adapter of each row of the next forward (0: none)."""
        if not any(adapters):
            self.mask = None
            return
        dtype = next(iter(self.layers.values())).A.dtype
        columns = torch.arange(len(self.index) * self.width) // self.width + 1  # adapter number of each column
        self.mask = (columns[None, None, :] == torch.tensor(adapters)[:, None, None]).to(device, dtype)
