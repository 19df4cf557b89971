"""The read side of the data cache: a prepared dataset's shards, and the rows each training worker reads.

`Prepared` is one cache directory (see cluster/ingest.py, which writes it): Parquet shards named
shard-FFFFF-BBBBBB-PPP.parquet (input file, input block, part) and manifest.json, which lists them in name order
with their rows and byte sizes. The shards hold `length` and the token columns; a row's `row_id` (its position
in the whole cache, in manifest order) is computed here as its shard's offset plus its index in the shard.

Train (inside each Ray Train worker):
    `train_datasets()` gives the trainer a `ShardedDataConfig`; each worker's `get_dataset_shard("train")` is
    a `WorkerShard`, whose Ray Data pipeline reads exactly the rows planned for (seed, epoch, rank, world size):
      * epoch order: a seeded permutation of the shards, each shard's rows permuted too (seeded per shard);
      * the resulting stream is cut into world_size equal contiguous parts of steps * batch_size rows, so
        every worker runs the same number of steps and sees each row at most once per epoch. The remainder,
        fewer than world_size * batch_size rows, is DROPPED; which rows fall in it changes every epoch;
      * resuming skips whole consumed batches by planning from a later row, reading nothing twice.
    Ray's default `streaming_split` hands blocks to whichever worker asks first, so it cannot replay a run;
    this plan can. A shard holds rows of one ~4 MiB input block, shuffled at prepare time; the shard
    permutation mixes blocks from all over the corpus within each epoch.

Without Ray (tests, a single process), `iter_local_batches` yields the same batches as a worker of the same
rank would. `iter_eval_batches` gives each rank a contiguous share of every validation row (none dropped, none
twice), read with pyarrow.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.train import DataConfig

from minimind.sources import filesystem_of

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


# -------------------------------------------------------------------------------------------- the cache


@dataclass
class Prepared:
    """A tokenised dataset in the cache: Parquet shards plus manifest.json. `path` is a Path for a local
    directory, the URI string otherwise."""
    path: Path | str
    manifest: dict

    @property
    def num_rows(self) -> int:
        return self.manifest["rows"]

    @property
    def shard_rows(self) -> tuple[int, ...]:
        return tuple(s["rows"] for s in self.manifest["shards"])

    @property
    def shard_files(self) -> list[str]:
        return [f"{self.path}/{s['file']}" for s in self.manifest["shards"]]

    @classmethod
    def load(cls, path) -> "Prepared":
        """The cache at `path`; ValueError unless it is `trusted()` (complete, every shard whole)."""
        prepared = cls.read(path)
        if prepared is None or not prepared.trusted():
            raise ValueError(f"{path} is not a complete prepared dataset (no manifest, or a shard it lists is "
                             f"missing or of the wrong size): prepare it again")
        return prepared

    @classmethod
    def read(cls, path) -> "Prepared | None":
        """The cache at `path` as its manifest describes it, unchecked; None when it has no manifest."""
        fs, root = filesystem_of(path)
        try:
            with fs.open_input_file(f"{root}/{MANIFEST}") as f:
                manifest = json.loads(f.read())
        except FileNotFoundError:
            return None
        return cls(str(path).rstrip("/") if "://" in str(path) else Path(path), manifest)

    def trusted(self) -> bool:
        """Whether every shard the manifest lists exists with its listed byte size. A manifest is written last,
        so a cache with one is complete unless something changed its files since (a cut or deleted shard)."""
        fs, root = filesystem_of(self.path)
        shards = self.manifest.get("shards", [])
        infos = fs.get_file_info([f"{root}/{s['file']}" for s in shards])
        bad = [s["file"] for s, i in zip(shards, infos)
               if i.type != pafs.FileType.File or "bytes" not in s or i.size != s["bytes"]]
        if bad:
            log.warning("cache %s is damaged: %d of its %d shards are missing or of the wrong size (%s%s)",
                        self.path, len(bad), len(shards), ", ".join(bad[:3]), ", ..." if len(bad) > 3 else "")
        return not bad


# ------------------------------------------------------------------------------------- training: the plan


def steps_per_epoch(prepared: Prepared, batch_size: int, world_size: int) -> int:
    """Batches each worker yields per epoch (the last partial round of world_size * batch_size is dropped)."""
    return _batches_per_worker(prepared.num_rows, batch_size, world_size)


def _batches_per_worker(rows: int, batch_size: int, world_size: int) -> int:
    return rows // (batch_size * world_size)


@dataclass(frozen=True)
class Piece:
    shard: int
    start: int  # rows [start, stop) of the shard in its epoch permutation
    stop: int


def plan_epoch(shard_rows: Sequence[int], seed: int, epoch: int, rank: int, world_size: int, batch_size: int,
               skip_batches: int = 0) -> list[Piece]:
    """The pieces of shards worker `rank` reads in `epoch`, in order, after skipping `skip_batches`."""
    per_worker = _batches_per_worker(sum(shard_rows), batch_size, world_size) * batch_size
    lo, hi = rank * per_worker + skip_batches * batch_size, (rank + 1) * per_worker
    pieces, pos = [], 0
    for s in np.random.default_rng([seed, epoch]).permutation(len(shard_rows)):
        a, b = max(lo, pos), min(hi, pos + shard_rows[s])
        if a < b:
            pieces.append(Piece(int(s), a - pos, b - pos))
        pos += shard_rows[s]
        if pos >= hi:
            break
    return pieces


def read_shard(uri: str) -> pa.Table:
    fs, path = filesystem_of(uri)
    return pq.read_table(path, filesystem=fs)


def read_piece(path: str, piece: Piece, seed: int, epoch: int, offset: int = 0) -> dict[str, np.ndarray]:
    """One piece's rows as numpy arrays (2-D for the token columns), in its seeded in-shard order. `offset`:
    the shard's first row in the cache, which makes each row's `row_id`."""
    table = read_shard(path)
    order = np.random.default_rng([seed, epoch, piece.shard]).permutation(table.num_rows)
    rows = order[piece.start:piece.stop]
    return {"row_id": offset + rows.astype(np.int64), **_arrays(table.take(rows))}


def _arrays(table: pa.Table) -> dict[str, np.ndarray]:
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            out[name] = col.flatten().to_numpy().reshape(len(col), col.type.list_size)
        else:
            out[name] = col.to_numpy()
    return out


def shard_offsets(shard_rows: Sequence[int]) -> np.ndarray:
    """Each shard's first row in the cache (manifest order): `row_id` = offset + row index in the shard."""
    return np.concatenate([[0], np.cumsum(shard_rows, dtype=np.int64)[:-1]]).astype(np.int64)


def _read_pieces(batch: dict, files: Sequence[str], offsets: Sequence[int], seed: int, epoch: int
                 ) -> Iterator[dict]:
    for s, a, b in zip(batch["shard"], batch["start"], batch["stop"]):
        yield read_piece(files[s], Piece(int(s), int(a), int(b)), seed, epoch, int(offsets[s]))


@dataclass
class WorkerShard:
    """What one worker trains on: a prepared dataset seen through (seed, rank, world size).

    `ray.train.get_dataset_shard(name)` returns one of these when the trainer got `train_datasets()`.
    """
    files: tuple[str, ...]
    shard_rows: tuple[int, ...]
    seed: int
    rank: int = 0
    world_size: int = 1
    # Reading a shard takes milliseconds next to a training step. Read tasks reserve no CPU, so ingest cannot
    # deadlock behind the training workers' reservations; `readers` bounds how many run at once.
    readers: int = 2

    @cached_property
    def offsets(self) -> np.ndarray:
        return shard_offsets(self.shard_rows)

    def steps_per_epoch(self, batch_size: int) -> int:
        return _batches_per_worker(sum(self.shard_rows), batch_size, self.world_size)

    def plan(self, epoch: int, batch_size: int, skip_batches: int = 0) -> list[Piece]:
        return plan_epoch(self.shard_rows, self.seed, epoch, self.rank, self.world_size, batch_size,
                          skip_batches)

    def dataset(self, epoch: int, batch_size: int, skip_batches: int = 0):
        """This worker's rows of `epoch` as a Ray Dataset, in order (None when nothing is left)."""
        import ray.data
        pieces = self.plan(epoch, batch_size, skip_batches)
        if not pieces:
            return None
        ds = ray.data.from_items([dataclasses.asdict(p) for p in pieces], override_num_blocks=len(pieces))
        ds = ds.map_batches(_read_pieces, batch_size=1, num_cpus=0,
                            compute=ray.data.TaskPoolStrategy(size=min(self.readers, len(pieces))),
                            fn_kwargs={"files": self.files, "offsets": self.offsets.tolist(), "seed": self.seed,
                                       "epoch": epoch})
        ds.context.execution_options.preserve_order = True
        return ds

    def iter_epoch(self, epoch: int, batch_size: int, skip_batches: int = 0, device="auto"):
        """Ray Data's `iter_torch_batches` over this worker's rows of `epoch`: exactly
        `steps_per_epoch(batch_size) - skip_batches` full batches."""
        ds = self.dataset(epoch, batch_size, skip_batches)
        if ds is not None:
            yield from ds.iter_torch_batches(batch_size=batch_size, device="auto" if device is None else device,
                                             prefetch_batches=2)

    def iter_epoch_local(self, epoch: int, batch_size: int, skip_batches: int = 0, device=None):
        """The same batches as `iter_epoch`, read in this process with pyarrow (no Ray)."""
        import torch
        pending: list[dict] = []
        for piece in self.plan(epoch, batch_size, skip_batches):
            pending.append(read_piece(self.files[piece.shard], piece, self.seed, epoch,
                                      int(self.offsets[piece.shard])))
            rows = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
            n = len(rows["row_id"])
            for start in range(0, n - n % batch_size, batch_size):
                yield {k: torch.from_numpy(v[start:start + batch_size]).to(device or "cpu") for k, v in rows.items()}
            pending = [{k: v[n - n % batch_size:] for k, v in rows.items()}] if n % batch_size else []


def eval_slice(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) of the cache that rank `rank` evaluates: contiguous, sizes differing by at most one
    (a rank may get none), together every row exactly once."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    return rank * num_rows // world_size, (rank + 1) * num_rows // world_size


def iter_eval_batches(prepared: Prepared, batch_size: int, rank: int = 0, world_size: int = 1, device=None
                      ) -> Iterator[dict]:
    """Rank `rank`'s share of ALL rows of `prepared` (`eval_slice`), in cache order, as batches of tensors
    like `iter_local_batches` gives (the last may be short; none when the share is empty). Nothing is dropped
    or repeated across ranks, so sums over every rank's batches are sums over the whole set. Read in this
    process with pyarrow, one shard at a time: no Ray Train or Ray Data needed."""
    import torch
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    lo, hi = eval_slice(prepared.num_rows, rank, world_size)
    pending: dict[str, np.ndarray] | None = None
    pos = 0
    for path, n in zip(prepared.shard_files, prepared.shard_rows):
        a, b = max(lo, pos), min(hi, pos + n)
        pos += n
        if a >= b:
            continue
        rows = {"row_id": np.arange(a, b, dtype=np.int64),
                **_arrays(read_shard(path).slice(a - (pos - n), b - a))}
        # A copy either way: arrow's buffers are read-only, which torch.from_numpy warns about.
        rows = {k: np.concatenate([pending[k], v]) if pending is not None else v.copy() for k, v in rows.items()}
        full = len(rows["row_id"]) - len(rows["row_id"]) % batch_size
        for start in range(0, full, batch_size):
            yield {k: torch.from_numpy(v[start:start + batch_size]).to(device or "cpu") for k, v in rows.items()}
        pending = {k: v[full:] for k, v in rows.items()} if full < len(rows["row_id"]) else None
    if pending is not None:
        yield {k: torch.from_numpy(v).to(device or "cpu") for k, v in pending.items()}


def _iter_epochs(shard: WorkerShard, batch_size: int, epochs: int, skip_batches: int, local: bool, device):
    steps = shard.steps_per_epoch(batch_size)
    if steps == 0:
        raise ValueError(f"{sum(shard.shard_rows)} rows cannot give {shard.world_size} worker(s) one batch of "
                         f"{batch_size}; lower the batch size or add data")
    first, skip = divmod(skip_batches, steps)
    for epoch in range(first, epochs):
        it = shard.iter_epoch_local if local else shard.iter_epoch
        yield from it(epoch, batch_size, skip if epoch == first else 0, device)


# --------------------------------------------------------------------------------- training: Ray Train


class ShardedDataConfig(DataConfig):
    """Gives each worker a `WorkerShard` of the prepared datasets named here; any other dataset (say, a
    validation set) goes whole to every worker. Ray's DataConfig returns DataIterators; Train hands whatever
    `configure` returns to `get_dataset_shard` unchanged, so a worker gets its WorkerShard."""

    def __init__(self, prepared: dict[str, Prepared], seed: int = 0):
        super().__init__(datasets_to_split=list(prepared))
        self._shards = {name: (tuple(p.shard_files), p.shard_rows) for name, p in prepared.items()}
        self._seed = seed

    def configure(self, datasets, world_size, worker_handles=None, worker_node_ids=None, **kwargs):
        others = {k: v for k, v in datasets.items() if k not in self._shards}
        out = super().configure(others, world_size, worker_handles, worker_node_ids, **kwargs) if others \
            else [{} for _ in range(world_size)]
        for name in datasets:
            if name in self._shards:
                files, rows = self._shards[name]
                for rank in range(world_size):
                    out[rank][name] = WorkerShard(files, rows, self._seed, rank, world_size)
        return out


def train_datasets(prepared: Prepared, num_workers: int, epochs: int = 1, seed: int = 0):
    """`(datasets, dataset_config)` for `TorchTrainer(datasets=..., dataset_config=...)`.

    The dataset handed to Train only lists the shards; the config decides which rows each worker reads (see
    the module docstring). `epochs` is not needed here: workers plan each epoch as they reach it.
    """
    import ray.data
    if prepared.num_rows < num_workers:
        raise ValueError(f"{prepared.num_rows} rows cannot feed {num_workers} workers")
    listing = ray.data.from_items([{"file": f, "rows": n} for f, n in zip(prepared.shard_files, prepared.shard_rows)])
    return {"train": listing}, ShardedDataConfig({"train": prepared}, seed)


def iter_train_batches(batch_size: int, epochs: int = 1, seed: int | None = None, skip_batches: int = 0,
                       device="auto", name: str = "train") -> Iterator[dict]:
    """In a Ray Train worker: this worker's batches for `epochs` epochs, after skipping the first
    `skip_batches` (counted across epochs, e.g. from a checkpoint). Each batch is a dict of tensors:
    input_ids/loss_mask (or chosen_*/rejected_*) of shape (batch_size, max_seq_len + 1), row_id, length."""
    import ray.train
    shard = ray.train.get_dataset_shard(name)
    if not isinstance(shard, WorkerShard):
        raise TypeError(f"dataset {name!r} was not set up by cluster.shards.train_datasets(); pass its "
                        f"dataset_config to the trainer")
    if seed is not None and seed != shard.seed:
        shard = dataclasses.replace(shard, seed=seed)
    yield from _iter_epochs(shard, batch_size, epochs, skip_batches, local=False, device=device)


def iter_local_batches(prepared: Prepared, batch_size: int, epochs: int = 1, seed: int = 0,
                       skip_batches: int = 0, device=None, rank: int = 0, world_size: int = 1
                       ) -> Iterator[dict]:
    """Without Ray: the batches worker `rank` of `world_size` would get from `iter_train_batches`."""
    shard = WorkerShard(tuple(prepared.shard_files), prepared.shard_rows, seed, rank, world_size)
    yield from _iter_epochs(shard, batch_size, epochs, skip_batches, local=True, device=device)
