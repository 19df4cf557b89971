"""Data ingest for every stage: jsonl(.gz) in, tokenised Parquet shards written once into a cache by parallel
tasks, so ingest scales with the cluster rather than with the driver.

Prepare (`prepare_dataset`, on the driver):
    input files --Ray Data: read ~4 MiB line blocks (minimind.sources.iter_chunks)--> --map_batches, one task per
    block: validate + tokenise (minimind.formats), shuffle the block's rows, write them as Parquet shards of at
    most `rows_per_shard` rows straight into the cache (pyarrow file system: a local path or a URI such as
    file:// or s3://)--> each task returns only metadata: counts, rejects, its shards' names, rows and byte
    sizes. No token goes through the driver; it writes the rejects file and, last, the manifest.
    Blocks stream through with backpressure, so memory stays flat whatever the corpus.

    Shard names are shard-FFFFF-BBBBBB-PPP.parquet (input file, block within it, part of the block), and the
    manifest lists them sorted by name, i.e. in corpus order, so a row's `row_id` (its shard's offset in that
    order plus its index, computed by cluster.shards) is global and deterministic. A block's rows are shuffled
    with a seed made of (cache key, file, block): the same inputs give byte-identical shards and the same
    manifest whatever order the tasks finish in. Rows mix within a block (~4 MiB of text), not across blocks;
    the training plan (cluster.shards) permutes the shards every epoch, which mixes blocks.

    The cache directory is keyed by the input files (path, size, mtime), the spec and the tokenizer's
    fingerprint; a second run with the same inputs reuses it. Commit: on a file system the cache is written
    into a hidden temp directory, manifest last, then renamed into place (atomic); on an object store it is
    written in place and the manifest, written last in one PUT, is the commit marker. A cache is used only if it
    is `Prepared.trusted()`: manifest present, every listed shard there with its listed byte size; anything
    else (a crash, a cut shard) is made again. A failed prepare leaves no cache.

Without Ray (tests, a single process), `iter_records` reads the inputs.

Validation (`prepare_splits`): a `val_fraction` of the input lines, chosen by a hash of each line's bytes before
anything is tokenised, becomes a second cache; the training cache holds the rest.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cluster.shards import MANIFEST, Prepared
from cluster.storage import commit_dir, filesystem_of, remove_dir, staging_dir, write_atomic
from minimind.formats import (FORMATS, SPLITS, Encoder, RecordError, columns_of,  # numpy only, no torch
                              parse_line)
from minimind.sources import iter_chunks, iter_lines, resolve_inputs, split_lines

log = logging.getLogger(__name__)

# Bump when the row layout changes, so old caches are not reused (2: no double bos/eos; 3: shards written by
# the tokenising tasks, one block's shuffled rows each, no row_id column, byte sizes in the manifest).
CACHE_VERSION = 3


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


def iter_records(paths: Sequence[str], block_bytes: int = 1 << 20) -> Iterator[tuple[str, int, object]]:
    """(file, line number, parsed JSON or a RecordError naming file and line) for every non-blank line."""
    for uri, line, raw in iter_lines(paths, block_bytes):
        if not raw.strip():
            continue
        try:
            yield uri, line, parse_line(raw)
        except RecordError as e:
            yield uri, line, RecordError(f"{uri}:{line}: {e}")


# --------------------------------------------------------------------------- Ray Data: tokenise and write


def _read_blocks(batch: dict, block_bytes: int) -> Iterator[pa.Table]:
    # One input row per file; a generator, so a file streams out block by block. A file that cannot be read
    # (a truncated .gz) travels on as a message the driver raises: raised here, it would reach the user
    # wrapped in Ray's remote traceback, logged by Ray Data as a bug in Ray.
    for uri, index in zip(batch["file"], batch["index"]):
        block = 0
        try:
            for first, data in iter_chunks(str(uri), block_bytes):
                yield pa.table({"file": [str(uri)], "index": [int(index)], "block": [block], "first_line": [first],
                                "data": pa.array([data], pa.binary()), "error": [""]})
                block += 1
        except ValueError as e:
            yield pa.table({"file": [str(uri)], "index": [int(index)], "block": [block], "first_line": [0],
                            "data": pa.array([b""], pa.binary()), "error": [str(e)]})


def shard_name(file_index: int, block: int, part: int) -> str:
    return f"shard-{file_index:05d}-{block:06d}-{part:03d}.parquet"


def _encode_and_write(batch: dict, encoder: Encoder, filesystem: pafs.FileSystem, out: str, rows_per_shard: int,
                      seed: int) -> pa.Table:
    """Tokenise one block, shuffle its rows and write them as shards into `out`; return what the driver needs
    to know (one row of counts, rejects and the shards' names, rows and byte sizes)."""
    # One Ray task per block and one thread per task: Ray provides the parallelism, not the tokenizer's pool.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    columns, L = columns_of(encoder.format), encoder.row_len
    packets: dict[str, list] = {}
    for uri, index, b, first, data, error in zip(batch["file"], batch["index"], batch["block"],
                                                 batch["first_line"], batch["data"], batch["error"]):
        index, b = int(index), int(b)
        packet = {"file": str(uri), "error": str(error), "records": 0, "blank": 0, "held_out": 0, "truncated": 0,
                  "rows": 0, "real_tokens": 0, "rejects": "", "shards": "[]"}
        if not error:
            block = encoder.encode_block(str(uri), int(first), split_lines(bytes(data)))
            rows, n = block.rows, block.rows.num_rows
            # The order within the block is part of the cache's content: seeded by what names the block.
            order = np.random.default_rng([seed, index, b]).permutation(n)
            cols = {k: np.asarray(rows.columns[k], np.float32 if k.endswith("mask") else np.int32).reshape(n, L)
                    for k in columns}
            lengths = np.asarray(rows.lengths, np.int32)
            shards = []
            for part, lo in enumerate(range(0, n, rows_per_shard)):
                take = order[lo:lo + rows_per_shard]
                table = pa.table({"length": lengths[take],
                                  **{k: pa.FixedSizeListArray.from_arrays(pa.array(v[take].ravel()), L)
                                     for k, v in cols.items()}})
                sink = pa.BufferOutputStream()
                pq.write_table(table, sink)
                body = sink.getvalue()
                name = shard_name(index, b, part)
                # On a file system a task still running after a failed prepare finds the staging directory
                # gone and fails; on an object store its object lands where no manifest names it.
                with filesystem.open_output_stream(f"{out}/{name}") as f:
                    f.write(body)
                shards.append({"file": name, "rows": len(take), "bytes": body.size})
            packet.update(records=block.records, blank=block.blank, held_out=block.held_out,
                          truncated=rows.truncated, rows=n, real_tokens=int(lengths.sum()),
                          rejects="\n".join(r.to_json() for r in block.rejects), shards=json.dumps(shards))
        for key, value in packet.items():
            packets.setdefault(key, []).append(value)
    return pa.table(packets)


# -------------------------------------------------------------------------------------------- the cache


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
        first = _first_line(rejects_path)
        split = f" of the {manifest['split']} split" if manifest.get("split", "all") != "all" else ""
        raise ValueError(f"{rejected} of {total} records{split} ({rejected / total:.2%}) were rejected, above the "
                         f"threshold of {threshold:.2%} (--reject-threshold); every one is listed in "
                         f"{rejects_path}. First: {first}")


def _first_line(uri: str) -> str:
    fs, path = filesystem_of(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read(1 << 16).decode("utf-8", "replace").split("\n", 1)[0]
    except FileNotFoundError:
        return "(file removed)"


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




def prepare_dataset(spec: DataSpec, tokenizer, cache_dir, *, rows_per_shard: int = 1024,
                    block_bytes: int = 4 << 20) -> Prepared:
    """Tokenise `spec.paths` into `cache_dir` (a local path or a pyarrow URI) once, in parallel Ray tasks that
    each write their own shards, or reuse the cache from last time if it is whole (`Prepared.trusted`).

    rows_per_shard: at most this many rows per Parquet shard (each input block's rows fill shards of exactly
    this many, the last shorter); the unit of shuffling and of work per worker read.
    block_bytes: input bytes tokenised per Ray task (fewer, larger tasks cost less CPU: measured 4 MiB vs 1 MiB);
    rows are shuffled within a block.
    Raises ValueError when more than `spec.reject_threshold` of the records are rejected (after the pass, or
    early when over half of the first 10,000 are); the rejects file beside the cache lists each one. A failed
    prepare leaves no cache behind, only the rejects file.
    """
    files, skipped = resolve_inputs(spec.paths)
    ingest = {"rows_per_shard": rows_per_shard, "block_bytes": block_bytes}
    split = "" if spec.split == "all" else f"-{spec.split}"
    name = f"{spec.format}-{spec.max_seq_len}{split}-{cache_key(spec, files, tokenizer, **ingest)}"
    base = str(cache_dir).rstrip("/") if "://" in str(cache_dir) else str(Path(cache_dir))
    out_uri, rejects_uri = f"{base}/{name}", f"{base}/{name}.rejects.jsonl"
    fs, root = filesystem_of(base)
    out = f"{root}/{name}"
    found = Prepared.read(out_uri)
    if found is not None and found.trusted():
        threshold = _accepted_threshold(found.manifest, spec.reject_threshold, out_uri)
        _check_rejects(found.manifest, threshold, rejects_uri)
        log.info("reusing cache %s (%d rows, %d tokens)", out_uri, found.num_rows, found.manifest["tokens"])
        return found
    if fs.get_file_info(out).type != pafs.FileType.NotFound:
        log.warning("cache %s is incomplete or damaged (an interrupted prepare, a cut shard): making it again",
                    out_uri)
        remove_dir(out, fs)

    encoder = spec.encoder(tokenizer)
    fs.create_dir(root, recursive=True)
    tmp = staging_dir(out, fs)
    committed = False
    try:
        seed = int(name.rsplit("-", 1)[1], 16)  # the in-block order is part of the cache's content
        manifest = _tokenise(files, encoder, fs, tmp, rejects_uri, rows_per_shard, block_bytes, seed,
                             spec.reject_threshold)
        manifest.update(format=spec.format, max_seq_len=spec.max_seq_len, row_len=encoder.row_len,
                        pack=spec.pack, text_field=spec.text_field, separator=spec.separator,
                        split=spec.split, val_fraction=spec.val_fraction if spec.split != "all" else 0.0,
                        tokenizer=tokenizer.fingerprint(), rejects_file=rejects_uri,
                        reject_threshold=spec.reject_threshold, skipped=skipped, **ingest)
        _check_rejects(manifest, spec.reject_threshold, rejects_uri)
        # Last: on an object store the manifest is the commit marker.
        write_atomic(f"{tmp}/{MANIFEST}", json.dumps(manifest, indent=1, ensure_ascii=False), fs)
        if not commit_dir(tmp, out, fs):
            log.info("another process finished %s first; using its cache", out_uri)
        committed = True
    finally:
        if tmp != out or not committed:
            remove_dir(tmp, fs)
    prepared = Prepared.load(out_uri)
    m = prepared.manifest
    log.info("tokenised %d records into %d rows (%d tokens, %.1f%% padding) in %.1fs: %s", m["records"],
             m["rows"], m["tokens"], 100 * m["padding_fraction"], m["seconds"], out_uri)
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


def _tokenise(files, encoder: Encoder, fs: pafs.FileSystem, out: str, rejects_uri: str, rows_per_shard: int,
              block_bytes: int, seed: int, threshold: float) -> dict:
    """Run the pipeline into staging directory `out` (a path of `fs`); return the manifest's counts and shards."""
    import ray.data

    from cluster.runtime import init_ray
    init_ray()
    start = time.time()
    ds = ray.data.from_items([{"file": f[0], "index": i} for i, f in enumerate(files)],
                             override_num_blocks=len(files))
    # Reading is light and each file's task streams for the whole file, so it holds no CPU slot (tokenising
    # takes them all); the pool size bounds how many files are open. Its different num_cpus also keeps Ray
    # from fusing it with the tokenising tasks, which would leave one task per file (one core for one file).
    ds = ds.map_batches(_read_blocks, batch_size=1, fn_kwargs={"block_bytes": block_bytes}, num_cpus=0,
                        compute=ray.data.TaskPoolStrategy(size=min(len(files), 4)))
    ds = ds.map_batches(_encode_and_write, batch_size=1, num_cpus=1,
                        fn_kwargs={"encoder": encoder, "filesystem": fs, "out": out,
                                   "rows_per_shard": rows_per_shard, "seed": seed})
    # The shards do not depend on it (names and seeds do); the rejects file's order and the early stop do.
    ds.context.execution_options.preserve_order = True
    quiet_ray_data(ds.context)
    # Ray merges a task's outputs into blocks of up to 128 MiB, and a block goes to one task: a whole file
    # would be tokenised by one task. Small blocks give one tokenising task per chunk read.
    ds.context.target_max_block_size = block_bytes // 2
    # The reader would otherwise run ahead of tokenising into a large share of the object store (30% of RAM
    # by default); this bound keeps memory flat as the corpus grows.
    limits = ds.context.execution_options.resource_limits
    ds.context.execution_options.resource_limits = limits.copy(object_store_memory=128 * block_bytes)

    per_file = {uri: {"path": uri, "size": size, "mtime_ns": mtime, "records": 0, "rejects": 0, "blank": 0,
                      "held_out": 0, "rows": 0} for uri, size, mtime in files}
    totals = {"records": 0, "rejects": 0, "blank": 0, "held_out": 0, "rows": 0, "truncated": 0, "real_tokens": 0}
    shards: list[dict] = []
    last_log = time.time()
    rejects_fs, rejects_path = filesystem_of(rejects_uri)
    with rejects_fs.open_output_stream(rejects_path) as rejects:
        for packet in ds.iter_rows():
            if packet["error"]:  # one clean line, e.g. "FILE: cannot read after line N: ..." (see _read_blocks)
                raise ValueError(packet["error"])
            if packet["rejects"]:
                rejects.write(packet["rejects"].encode("utf-8") + b"\n")
            shards += json.loads(packet["shards"])
            counts = {"records": packet["records"], "rejects": packet["rejects"].count("\n") + bool(packet["rejects"]),
                      "blank": packet["blank"], "held_out": packet["held_out"], "rows": packet["rows"]}
            for key, value in counts.items():
                per_file[packet["file"]][key] += value
            counts.update(truncated=packet["truncated"], real_tokens=packet["real_tokens"])
            for key, value in counts.items():
                totals[key] += value
            seen = totals["records"] + totals["rejects"]
            if seen >= 10_000 and totals["rejects"] > max(threshold, 0.5) * seen:
                log.error("over half of the first %d records were rejected; stopping early", seen)
                break  # a wrong format or field mapping: reading the rest would only fill the rejects file
            if time.time() - last_log > 30:
                last_log = time.time()
                log.info("ingest: %d records, %d rejects, %.0f tokens/s", totals["records"], totals["rejects"],
                         totals["real_tokens"] / (last_log - start))
    if totals["rejects"]:
        log.warning("%d records rejected (%d read); see %s", totals["rejects"],
                    totals["rejects"] + totals["records"], rejects_uri)
    # Corpus order, whatever order the tasks finished in: name order, also past the names' zero padding.
    shards.sort(key=lambda s: [int(x) for x in s["file"][len("shard-"):-len(".parquet")].split("-")])
    assert sum(s["rows"] for s in shards) == totals["rows"]
    slots = totals["rows"] * encoder.row_len * (2 if encoder.format == "dpo" else 1)
    return {"version": CACHE_VERSION, **totals, "tokens": slots,
            "padding_fraction": 1 - totals["real_tokens"] / slots if slots else 0.0,
            "files": list(per_file.values()), "shards": shards, "seconds": round(time.time() - start, 2)}
