"""Data ingest for every stage: jsonl(.gz) in, tokenised Parquet shards cached once, batches streamed to workers.

Prepare (`prepare_dataset`, on the driver):
    input files --Ray Data: read ~4 MiB line blocks--> --map_batches: validate + tokenise (minimind.formats),
    parallel tasks--> the driver writes equal-size Parquet shards (rows of max_seq_len + 1 tokens), a rejects
    file and a manifest. Blocks stream through with backpressure, so memory stays flat whatever the corpus.
    The cache directory is keyed by the input files (path, size, mtime), the spec and the tokenizer's
    fingerprint; a second run with the same inputs reuses it.

Train (inside each Ray Train worker):
    `train_datasets()` gives the trainer a `ShardedDataConfig`; each worker's `get_dataset_shard("train")` is
    a `WorkerShard`, whose Ray Data pipeline reads exactly the rows planned for (seed, epoch, rank, world size):
      * epoch order: a seeded permutation of the shards, each shard's rows permuted too (seeded per shard);
      * the resulting stream is cut into world_size equal contiguous parts of steps * batch_size rows, so
        every worker runs the same number of steps and sees each row at most once per epoch. The remainder,
        fewer than world_size * batch_size rows, is DROPPED; which rows fall in it changes every epoch;
      * resuming skips whole consumed batches by planning from a later row, reading nothing twice.
    Ray's default `streaming_split` hands blocks to whichever worker asks first, so it cannot replay a run;
    this plan can. At prepare time rows are also scattered over a window of shards being filled, so one
    shard (and one batch) mixes documents from far apart in the corpus instead of one author's poems.

Without Ray (tests, a single process), `iter_records` reads the inputs and `iter_local_batches` yields the
same batches as a worker of the same rank would.

Validation (`prepare_splits`): a `val_fraction` of the input lines, chosen by a hash of each line's bytes before
anything is tokenised, becomes a second cache; the training cache holds the rest. `iter_eval_batches` gives each
rank a contiguous share of every validation row (none dropped, none twice), read with pyarrow.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import glob
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.train import DataConfig

from minimind.formats import (FORMATS, SPLITS, Encoder, RecordError, columns_of,  # numpy only, no torch
                              parse_line)

log = logging.getLogger(__name__)

CACHE_VERSION = 2          # bump when the row layout changes, so old caches are not reused (2: no double bos/eos)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


@dataclass
class DataSpec:
    paths: tuple[str, ...]
    format: str                          # pretrain | chat | reason | dpo
    max_seq_len: int
    pack: bool = True                    # pretrain only: pack documents; False pads one per row (MiniMind)
    text_field: str = "text"             # pretrain only: the record field holding the document
    reject_threshold: float = 0.01       # fail when more than this fraction of records is rejected
    seed: int = 0                        # training order; does not change the cache
    separator: str = "<|endoftext|>"     # token between packed documents
    val_fraction: float = 0.0            # share of input lines held out for validation (by a hash of each line)
    split: str = "all"                   # all | train (the lines not held out) | val (the held-out lines)

    def __post_init__(self):
        self.paths = (self.paths,) if isinstance(self.paths, str) else tuple(self.paths)
        if self.format not in FORMATS:
            raise ValueError(f"unknown data format {self.format!r}; choose one of {FORMATS}")
        if not 0 <= self.reject_threshold <= 1:
            raise ValueError(f"reject_threshold must be within [0, 1], got {self.reject_threshold}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be within [0, 1), got {self.val_fraction}")
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; choose one of {SPLITS}")
        if self.split != "all" and not self.val_fraction:
            raise ValueError(f"split {self.split!r} needs a val_fraction above 0")

    def encoder(self, tokenizer) -> Encoder:
        return Encoder(tokenizer, self.format, self.max_seq_len, pack=self.pack, text_field=self.text_field,
                       separator=self.separator, split=self.split, val_fraction=self.val_fraction)


# ------------------------------------------------------------------------------------------------- inputs


def filesystem_of(uri, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """pyarrow's file system and path for a local path or a URI (s3://, gs://, ...), so the same code runs on
    local disk, NFS and object stores. A given `filesystem` (e.g. a Ray `Checkpoint.filesystem`) takes `uri`
    as is."""
    uri = str(uri)
    if filesystem is not None:
        return filesystem, uri
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0] + "://" if "://" in uri else ""


def resolve_paths(paths: Sequence[str]) -> list[tuple[str, int, int]]:
    """Input files as (uri, size, mtime_ns); see `resolve_inputs`."""
    return resolve_inputs(paths)[0]


def resolve_inputs(paths: Sequence[str]) -> tuple[list[tuple[str, int, int]], list[str]]:
    """(files, skipped). Files as (uri, size, mtime_ns): each path a file, a directory (its *.jsonl and
    *.jsonl.gz, not recursive), a glob (`*` in a directory part also crosses '/') or a URI pyarrow reads
    (s3://, gs://, ...). Skipped: what a directory holds besides those (logged, named in the manifest).

    On the local file system each real file counts once, however many paths reach it (symlinks, a file named
    twice), and a glob does not follow a symlink back to a directory above it (a loop).
    """
    found: dict[str, tuple[str, int, int]] = {}   # real path (local) or uri -> file
    skipped: list[str] = []
    twice: list[tuple[str, str]] = []             # (path, the path the same file was first reached by)
    for p in paths:
        fs, path = filesystem_of(str(p))
        scheme = _scheme(str(p))
        local = isinstance(fs, pafs.LocalFileSystem)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            listed = [(info.path, info.size, info.mtime_ns)]
        elif info.type == pafs.FileType.Directory:
            listed = []
            for i in sorted(fs.get_file_info(pafs.FileSelector(path)), key=lambda i: i.path):
                if i.type == pafs.FileType.File and i.path.endswith(JSONL_SUFFIXES):
                    listed.append((i.path, i.size, i.mtime_ns))
                else:
                    skipped.append(scheme + i.path + ("/" if i.type == pafs.FileType.Directory else ""))
            if not listed:
                raise ValueError(f"{p}: directory holds no {' or '.join(JSONL_SUFFIXES)} files")
        elif glob.has_magic(path):
            parts = path.split("/")
            fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
            base = "/".join(parts[:fixed]) or "/"
            deep = fixed < len(parts) - 1
            if local and deep:
                listed = _walk_local(base)
            else:
                listed = [(i.path, i.size, i.mtime_ns) for i in
                          fs.get_file_info(pafs.FileSelector(base, recursive=deep, allow_not_found=True))
                          if i.type == pafs.FileType.File]
            listed = [f for f in listed if fnmatch.fnmatchcase(f[0], path)]
            if not listed:
                raise ValueError(f"{p}: no file matches")
        else:
            raise ValueError(f"{p}: no such file or directory")
        for name, size, mtime in sorted(listed):
            uri = scheme + name if scheme else name
            key = os.path.realpath(name) if local else uri
            if key in found:
                if found[key][0] == uri:
                    log.warning("input %s is named more than once; reading it once", uri)
                else:
                    twice.append((uri, found[key][0]))
                continue
            found[key] = (uri, int(size), int(mtime or 0))
    if twice:
        log.warning("%d input path(s) reach a file already reached through another (symlinks): %s%s; each "
                    "file is read once", len(twice), "; ".join(f"{a} is {b}" for a, b in twice[:3]),
                    "; ..." if len(twice) > 3 else "")
    if skipped:
        log.warning("skipped %d entr%s that are not %s: %s%s", len(skipped), "y" if len(skipped) == 1 else "ies",
                    " or ".join(JSONL_SUFFIXES), ", ".join(skipped[:5]), ", ..." if len(skipped) > 5 else "")
    return list(found.values()), skipped


def _walk_local(base: str) -> list[tuple[str, int, int]]:
    """Every file under local directory `base`, following symlinks except those that lead back to a directory
    above them (pyarrow's recursive listing follows such a loop 40 levels deep, and two loops blow up
    exponentially). Each loop cut is logged, naming the path."""
    files: list[tuple[str, int, int]] = []

    def walk(directory: str, above: dict[str, str]) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return
        for entry in entries:
            if entry.is_dir():
                real = os.path.realpath(entry.path)
                if real in above:
                    log.warning("symlink loop: %s leads back to %s; not followed (its files are read once)",
                                entry.path, above[real])
                    continue
                walk(entry.path, {**above, real: entry.path})
            elif entry.is_file():
                st = entry.stat()
                files.append((entry.path, st.st_size, st.st_mtime_ns))
    walk(base, {os.path.realpath(base): base})
    return files


def iter_chunks(uri: str, block_bytes: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """Whole lines of a jsonl(.gz) file in chunks of about `block_bytes`: (number of the first line, bytes)."""
    fs, path = filesystem_of(uri)
    line, tail = 1, b""
    intact = 0  # complete lines read so far: where a truncated .gz breaks, to the nearest 1 MiB read
    try:
        with fs.open_input_stream(path) as f:  # compression="detect": .gz is decompressed as it streams
            while True:
                pieces, size = [], 0
                while size < block_bytes and (piece := f.read(min(block_bytes, 1 << 20))):
                    pieces.append(piece)
                    size += len(piece)
                    intact += piece.count(b"\n")
                if not pieces:
                    break
                data = tail + b"".join(pieces)
                cut = data.rfind(b"\n") + 1
                if cut:
                    yield line, data[:cut]
                    line += data.count(b"\n", 0, cut)
                tail = data[cut:]
    except (OSError, pa.ArrowException) as e:  # e.g. a truncated .gz: the job stops, no cache is written
        raise ValueError(f"{uri}: cannot read after line {intact}: {e}") from e
    if tail:
        yield line, tail


def split_lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    return lines


def iter_records(paths: Sequence[str], block_bytes: int = 1 << 20) -> Iterator[tuple[str, int, object]]:
    """(file, line number, parsed JSON or a RecordError naming file and line) for every non-blank line."""
    for uri, _, _ in resolve_paths(paths):
        for first, data in iter_chunks(uri, block_bytes):
            for line, raw in enumerate(split_lines(data), first):
                if not raw.strip():
                    continue
                try:
                    yield uri, line, parse_line(raw)
                except RecordError as e:
                    yield uri, line, RecordError(f"{uri}:{line}: {e}")


# ------------------------------------------------------------------------------------- Ray Data: tokenise


def _read_blocks(batch: dict, block_bytes: int) -> Iterator[pa.Table]:
    # One input row per file; a generator, so a file streams out block by block. A file that cannot be read
    # (a truncated .gz) travels on as a message the driver raises: raised here, it would reach the user
    # wrapped in Ray's remote traceback, logged by Ray Data as a bug in Ray.
    for uri in batch["file"]:
        try:
            for first, data in iter_chunks(str(uri), block_bytes):
                yield pa.table({"file": [str(uri)], "first_line": [first], "data": pa.array([data], pa.binary()),
                                "error": [""]})
        except ValueError as e:
            yield pa.table({"file": [str(uri)], "first_line": [0], "data": pa.array([b""], pa.binary()),
                            "error": [str(e)]})


def _encode_blocks(batch: dict, encoder: Encoder) -> pa.Table:
    # One Ray task per block and one thread per task: Ray provides the parallelism, not the tokenizer's pool.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    out: dict[str, list] = {}
    for uri, first, data, error in zip(batch["file"], batch["first_line"], batch["data"], batch["error"]):
        block = encoder.encode_block(str(uri), int(first), split_lines(bytes(data)))
        packet = {"file": str(uri), "error": str(error), "records": block.records, "blank": block.blank,
                  "held_out": block.held_out,
                  "truncated": block.rows.truncated, "lengths": block.rows.lengths.tobytes(),
                  "rejects": "\n".join(r.to_json() for r in block.rejects),
                  **{name: col.tobytes() for name, col in block.rows.columns.items()}}
        for key, value in packet.items():
            out.setdefault(key, []).append(value)
    return pa.table(out)


class _ShardWriter:
    """Writes rows into Parquet shards of exactly `rows_per_shard` rows (the last may be shorter).

    Incoming rows are scattered at random over `window` shards being filled, so each shard samples about
    window * rows_per_shard consecutive rows of the corpus. Memory: about `window` shards.
    """

    def __init__(self, out: Path, columns: Sequence[str], row_len: int, rows_per_shard: int, window: int,
                 seed: int):
        self.out, self.columns, self.row_len = out, tuple(columns), row_len
        self.rows_per_shard, self.window = rows_per_shard, window
        self.rng = np.random.default_rng(seed)
        self.buffers: list[list[dict]] = [[] for _ in range(window)]
        self.counts = [0] * window
        self.shards: list[dict] = []
        self.rows = 0

    def add(self, columns: dict[str, np.ndarray], lengths: np.ndarray) -> None:
        dest = self.rng.integers(self.window, size=len(lengths))
        for j in np.unique(dest):
            keep = dest == j
            self.buffers[j].append({"length": lengths[keep], **{k: v[keep] for k, v in columns.items()}})
            self.counts[j] += int(keep.sum())
            if self.counts[j] >= self.rows_per_shard:
                rest = self._concat(self.buffers[j])
                while rest and len(rest["length"]) >= self.rows_per_shard:
                    rest = self._write(rest)
                self.buffers[j], self.counts[j] = ([rest], len(rest["length"])) if rest else ([], 0)

    def close(self) -> None:
        parts = [p for buf in self.buffers for p in buf]
        rest = self._concat(parts) if parts else None
        while rest:
            rest = self._write(rest)

    @staticmethod
    def _concat(parts: list[dict]) -> dict:
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _write(self, rows: dict) -> dict | None:
        """Write the first rows_per_shard rows (or all, if fewer) as one shard; return the rest."""
        n = min(self.rows_per_shard, len(rows["length"]))
        name = f"shard-{len(self.shards):05d}.parquet"
        table = pa.table({
            "row_id": np.arange(self.rows, self.rows + n, dtype=np.int64),  # global position in the cache
            "length": rows["length"][:n],
            **{k: pa.FixedSizeListArray.from_arrays(pa.array(rows[k][:n].ravel()), self.row_len)
               for k in self.columns}})
        pq.write_table(table, self.out / name)
        self.shards.append({"file": name, "rows": n})
        self.rows += n
        rest = {k: v[n:] for k, v in rows.items()}
        return rest if len(rest["length"]) else None


# -------------------------------------------------------------------------------------------- the cache


@dataclass
class Prepared:
    """A tokenised dataset in the cache: Parquet shards plus manifest.json."""
    path: Path
    manifest: dict

    @property
    def num_rows(self) -> int:
        return self.manifest["rows"]

    @property
    def shard_rows(self) -> tuple[int, ...]:
        return tuple(s["rows"] for s in self.manifest["shards"])

    @property
    def shard_files(self) -> list[str]:
        return [str(self.path / s["file"]) for s in self.manifest["shards"]]

    @classmethod
    def load(cls, path) -> "Prepared":
        path = Path(path)
        return cls(path, json.loads((path / "manifest.json").read_text(encoding="utf-8")))


def cache_key(spec: DataSpec, files, tokenizer, **ingest) -> str:
    """What decides the cache's content; the training seed and the reject threshold do not, nor val_fraction
    when the whole data is used (so caches made before splits existed keep their key)."""
    ignored = ("seed", "reject_threshold") + (("split", "val_fraction") if spec.split == "all" else ())
    fields = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ignored}
    fields["paths"] = files
    payload = json.dumps({"version": CACHE_VERSION, "spec": fields, "tokenizer": tokenizer.fingerprint(),
                          "ingest": ingest}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _check_rejects(manifest: dict, threshold: float, rejects_path: str) -> None:
    rejected, total = manifest["rejects"], manifest["rejects"] + manifest["records"]
    if total == 0:
        files = [f["path"] for f in manifest["files"]]
        if manifest.get("split", "all") != "all":
            raise ValueError(f"the {manifest['split']} split of {files} is empty: val_fraction "
                             f"{manifest['val_fraction']} leaves it no record of {manifest.get('held_out', 0)}; "
                             f"change --val-fraction")
        raise ValueError(f"no records found in {files}")
    if rejected / total > threshold:
        path = Path(rejects_path)
        first = path.read_text(encoding="utf-8").split("\n", 1)[0] if path.is_file() else "(file removed)"
        split = f" of the {manifest['split']} split" if manifest.get("split", "all") != "all" else ""
        raise ValueError(f"{rejected} of {total} records{split} ({rejected / total:.2%}) were rejected, above the "
                         f"threshold of {threshold:.2%} (--reject-threshold); every one is listed in "
                         f"{rejects_path}. First: {first}")


def _accepted_threshold(manifest: dict, threshold: float, path) -> float:
    """The threshold a reused cache is checked against: the higher of this run's and the one it was accepted
    under when it was made (`prepare --reject-threshold 0.1` once, then stages with their default reuse it)."""
    accepted = manifest.get("reject_threshold", 0.0)
    total = manifest["rejects"] + manifest["records"]
    if accepted > threshold and total and manifest["rejects"] / total > threshold:
        log.warning("cache %s holds %d rejected records of %d (%.2f%%), above this run's threshold of %.2f%%, "
                    "but was accepted at %.2f%% when it was prepared: using it", path, manifest["rejects"], total,
                    100 * manifest["rejects"] / total, 100 * threshold, 100 * accepted)
    return max(accepted, threshold)


def prepare_dataset(spec: DataSpec, tokenizer, cache_dir, *, rows_per_shard: int = 1024, window: int = 16,
                    block_bytes: int = 4 << 20) -> Prepared:
    """Tokenise `spec.paths` into `cache_dir` once (Ray Data, parallel), or reuse the cache from last time.

    rows_per_shard: rows per Parquet shard; the unit of shuffling and of work per worker read.
    window: shards filled at once, over which rows are scattered (memory: `window` shards).
    block_bytes: input bytes tokenised per Ray task (fewer, larger tasks cost less CPU: measured 4 MiB vs 1 MiB).
    Raises ValueError when more than `spec.reject_threshold` of the records are rejected (after the pass, or
    early when over half of the first 10,000 are); the rejects file beside the cache lists each one.
    """
    files, skipped = resolve_inputs(spec.paths)
    ingest = {"rows_per_shard": rows_per_shard, "window": window, "block_bytes": block_bytes}
    split = "" if spec.split == "all" else f"-{spec.split}"
    name = f"{spec.format}-{spec.max_seq_len}{split}-{cache_key(spec, files, tokenizer, **ingest)}"
    cache_dir = Path(cache_dir)
    out, rejects_path = cache_dir / name, cache_dir / f"{name}.rejects.jsonl"
    if (out / "manifest.json").is_file():
        prepared = Prepared.load(out)
        threshold = _accepted_threshold(prepared.manifest, spec.reject_threshold, out)
        _check_rejects(prepared.manifest, threshold, str(rejects_path))
        log.info("reusing cache %s (%d rows, %d tokens)", out, prepared.num_rows, prepared.manifest["tokens"])
        return prepared

    encoder = spec.encoder(tokenizer)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        seed = int(name.rsplit("-", 1)[1], 16)  # the scatter order is part of the cache's content
        manifest = _tokenise(files, encoder, tmp, rejects_path, rows_per_shard, window, block_bytes, seed,
                             spec.reject_threshold)
        manifest.update(format=spec.format, max_seq_len=spec.max_seq_len, row_len=encoder.row_len,
                        pack=spec.pack, text_field=spec.text_field, separator=spec.separator,
                        split=spec.split, val_fraction=spec.val_fraction if spec.split != "all" else 0.0,
                        tokenizer=tokenizer.fingerprint(), rejects_file=str(rejects_path),
                        reject_threshold=spec.reject_threshold, skipped=skipped, **ingest)
        _check_rejects(manifest, spec.reject_threshold, str(rejects_path))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
        try:
            os.replace(tmp, out)  # atomic: the cache exists complete or not at all
        except OSError:  # another process finished the same cache first
            if not (out / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prepared = Prepared.load(out)
    m = prepared.manifest
    log.info("tokenised %d records into %d rows (%d tokens, %.1f%% padding) in %.1fs: %s", m["records"],
             m["rows"], m["tokens"], 100 * m["padding_fraction"], m["seconds"], out)
    return prepared


def prepare_splits(spec: DataSpec, tokenizer, cache_dir, **ingest) -> tuple[Prepared, Prepared]:
    """(train, val): `spec`'s data split by `spec.val_fraction` into two caches, each made like
    `prepare_dataset` (same ingest options). A line goes to val iff a hash of its bytes falls below the
    fraction (`minimind.formats.in_val_split`), decided before tokenising: no training row holds a held-out
    document, and the split is the same on every run and for every seed. For pretrain, val rows are packed
    like training rows (documents joined at separators, none split across train and val)."""
    if not 0 < spec.val_fraction < 1:
        raise ValueError(f"a validation split needs 0 < val_fraction < 1, got {spec.val_fraction}")
    train = prepare_dataset(dataclasses.replace(spec, split="train"), tokenizer, cache_dir, **ingest)
    val = prepare_dataset(dataclasses.replace(spec, split="val"), tokenizer, cache_dir, **ingest)
    log.info("validation split: %d of %d records held out (val_fraction %g)", val.manifest["records"],
             val.manifest["records"] + train.manifest["records"], spec.val_fraction)
    return train, val


def quiet_ray_data(context) -> None:
    """Our own progress lines ("ingest: N records ...", the training line) are what the user should see: no Ray
    Data progress bars, execution-plan banners or "Progress bars disabled" notice on the console (Ray's log files
    keep them). `context`: a DataContext (a dataset's, or DataContext.get_current())."""
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def _tokenise(files, encoder: Encoder, out: Path, rejects_path: Path, rows_per_shard: int, window: int,
              block_bytes: int, seed: int, threshold: float) -> dict:
    import ray.data

    from cluster.runtime import init_ray
    init_ray()
    start = time.time()
    columns = columns_of(encoder.format)
    ds = ray.data.from_items([{"file": f[0]} for f in files], override_num_blocks=len(files))
    # Reading is light and each file's task streams for the whole file, so it holds no CPU slot (tokenising
    # takes them all); the pool size bounds how many files are open. Its different num_cpus also keeps Ray
    # from fusing it with the tokenising tasks, which would leave one task per file (one core for one file).
    ds = ds.map_batches(_read_blocks, batch_size=1, fn_kwargs={"block_bytes": block_bytes}, num_cpus=0,
                        compute=ray.data.TaskPoolStrategy(size=min(len(files), 4)))
    ds = ds.map_batches(_encode_blocks, batch_size=1, fn_kwargs={"encoder": encoder}, num_cpus=1)
    ds.context.execution_options.preserve_order = True  # same input, same shards
    quiet_ray_data(ds.context)
    # Ray merges a task's outputs into blocks of up to 128 MiB, and a block goes to one task: a whole file
    # would be tokenised by one task. Small blocks give one tokenising task per chunk read.
    ds.context.target_max_block_size = block_bytes // 2
    # The reader would otherwise run ahead of tokenising into a large share of the object store (30% of RAM
    # by default); this bound keeps memory flat as the corpus grows.
    limits = ds.context.execution_options.resource_limits
    ds.context.execution_options.resource_limits = limits.copy(object_store_memory=128 * block_bytes)

    writer = _ShardWriter(out, columns, encoder.row_len, rows_per_shard, window, seed)
    per_file = {uri: {"path": uri, "size": size, "mtime_ns": mtime, "records": 0, "rejects": 0, "blank": 0,
                      "held_out": 0, "rows": 0} for uri, size, mtime in files}
    totals = {"records": 0, "rejects": 0, "blank": 0, "held_out": 0, "rows": 0, "truncated": 0, "real_tokens": 0}
    last_log = time.time()
    with open(rejects_path, "w", encoding="utf-8") as rejects:
        for packet in ds.iter_rows():
            if packet["error"]:  # one clean line, e.g. "FILE: cannot read after line N: ..." (see _read_blocks)
                raise ValueError(packet["error"])
            lengths = np.frombuffer(packet["lengths"], dtype=np.int32)
            writer.add({k: np.frombuffer(packet[k], dtype=np.float32 if k.endswith("mask") else np.int32)
                        .reshape(len(lengths), encoder.row_len) for k in columns}, lengths)
            if packet["rejects"]:
                rejects.write(packet["rejects"] + "\n")
            counts = {"records": packet["records"], "rejects": packet["rejects"].count("\n") + bool(packet["rejects"]),
                      "blank": packet["blank"], "held_out": packet["held_out"], "rows": len(lengths)}
            for key, value in counts.items():
                per_file[packet["file"]][key] += value
            for key, value in {**counts, "truncated": packet["truncated"], "real_tokens": int(lengths.sum())}.items():
                totals[key] += value
            seen = totals["records"] + totals["rejects"]
            if seen >= 10_000 and totals["rejects"] > max(threshold, 0.5) * seen:
                log.error("over half of the first %d records were rejected; stopping early", seen)
                break  # a wrong format or field mapping: reading the rest would only fill the rejects file
            if time.time() - last_log > 30:
                last_log = time.time()
                log.info("ingest: %d records, %d rejects, %.0f tokens/s", totals["records"], totals["rejects"],
                         totals["real_tokens"] / (last_log - start))
    writer.close()
    if totals["rejects"]:
        log.warning("%d records rejected (%d read); see %s", totals["rejects"],
                    totals["rejects"] + totals["records"], rejects_path)
    slots = writer.rows * encoder.row_len * (2 if encoder.format == "dpo" else 1)
    return {"version": CACHE_VERSION, **totals, "tokens": slots,
            "padding_fraction": 1 - totals["real_tokens"] / slots if slots else 0.0,
            "files": list(per_file.values()), "shards": writer.shards, "seconds": round(time.time() - start, 2)}


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


def read_piece(path: str, piece: Piece, seed: int, epoch: int) -> dict[str, np.ndarray]:
    """One piece's rows as numpy arrays (2-D for the token columns), in its seeded in-shard order."""
    table = pq.read_table(path)
    order = np.random.default_rng([seed, epoch, piece.shard]).permutation(table.num_rows)
    return _arrays(table.take(order[piece.start:piece.stop]))


def _arrays(table: pa.Table) -> dict[str, np.ndarray]:
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            out[name] = col.flatten().to_numpy().reshape(len(col), col.type.list_size)
        else:
            out[name] = col.to_numpy()
    return out


def _read_pieces(batch: dict, files: Sequence[str], seed: int, epoch: int) -> Iterator[dict]:
    for s, a, b in zip(batch["shard"], batch["start"], batch["stop"]):
        yield read_piece(files[s], Piece(int(s), int(a), int(b)), seed, epoch)


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
                            fn_kwargs={"files": self.files, "seed": self.seed, "epoch": epoch})
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
            pending.append(read_piece(self.files[piece.shard], piece, self.seed, epoch))
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
        rows = _arrays(pq.read_table(path).slice(a - (pos - n), b - a))
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
        raise TypeError(f"dataset {name!r} was not set up by cluster.data.train_datasets(); pass its "
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
