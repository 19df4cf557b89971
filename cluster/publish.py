"""Write, verify, then publish: a crash while writing a checkpoint never leaves `latest` at a partial one.

A checkpoint goes through three steps:
  1. `write_verified`: the loop writes it into a worker-local scratch directory, then every file is read
     back (safetensors header and byte ranges, JSON parses, torch zip archives end in their central
     directory) before anything is handed to `ray.train.report`. A crash or a short write raises here.
  2. Ray Train uploads it to `--storage-path` (a local/NFS path or a pyarrow URI such as s3://).
  3. `publish_latest`: after every rank's upload (a barrier), rank 0 re-verifies the stored copy and only
     then replaces `<storage>/<run>/latest` with one atomic step: `os.replace` of a temp file on a file
     system; a single PUT on an object store, where an object is never visible half-written.

Ray Train itself restores from its own checkpoint index; `latest` is for everything outside Ray (`--resume`,
`--init` of the next stage, serving, an operator's `ls`), which must never pick up a torn directory.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pyarrow.fs as pafs

from cluster.storage import filesystem_of, write_atomic
from minimind.checkpoint import check_safetensors

POINTER = "latest"
# What rank 0 always writes (cluster.checkpoint.Checkpointer); the optimizer state is optimizer.pt (DDP) or
# per-rank DeepSpeed shards under deepspeed/.
REQUIRED = ("model/config.json", "model/model.safetensors", "trainer_state.json", "metrics.jsonl")


def _check_file(fs: pafs.FileSystem, path: str, rel: str, size: int):
    if rel.endswith(".safetensors"):
        with fs.open_input_file(path) as f:
            check_safetensors(f, size, rel)
    elif rel.endswith(".json"):
        with fs.open_input_file(path) as f:
            try:
                json.loads(f.read())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{rel}: not valid JSON ({e})") from e
    elif rel.endswith(".jsonl"):
        with fs.open_input_file(path) as f:
            for i, line in enumerate(f.read().splitlines(), 1):
                try:
                    json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ValueError(f"{rel}: line {i} is not valid JSON ({e})") from e
    elif rel.endswith((".pt", ".pth")):
        # torch.save writes a zip archive whose central directory comes last: a cut file has none.
        with fs.open_input_file(path) as f:
            if not zipfile.is_zipfile(f):
                raise ValueError(f"{rel}: truncated or corrupt torch archive ({size} bytes)")


def verify_checkpoint(directory, complete: bool = True, filesystem=None) -> list[str]:
    """Raise ValueError naming the first damaged or missing file; return the files checked.

    complete=False checks only the files present: a non-zero rank writes nothing (DDP) or only its own
    DeepSpeed shard.
    """
    fs, root = filesystem_of(directory, filesystem)
    infos = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
             if i.type == pafs.FileType.File]
    files = {os.path.relpath(i.path, root): i for i in infos}
    if complete:
        missing = [f for f in REQUIRED if f not in files]
        if not any(f == "optimizer.pt" or f.startswith("deepspeed/") for f in files):
            missing.append("optimizer.pt or deepspeed/")
        if missing:
            raise ValueError(f"checkpoint {directory} is incomplete: missing {', '.join(missing)}")
    for rel, info in sorted(files.items()):
        _check_file(fs, info.path, rel, info.size)
    return sorted(files)


def write_verified(directory: Path, write, rank: int) -> bool:
    """Call write(directory), then verify what it wrote. Returns whether this rank wrote any file (Ray
    Train wants no checkpoint at all from a rank with nothing to add)."""
    write(directory)
    files = verify_checkpoint(directory, complete=rank == 0)
    return bool(files)


def publish_latest(run_dir, checkpoint, step: int | None = None, filesystem=None) -> None:
    """Point `<run_dir>/latest` at `checkpoint` once the stored copy verifies; atomic on every backend.
    Under Ray: `publish_latest(posixpath.dirname(c.path), c.path, step, c.filesystem)` for a Checkpoint c."""
    verify_checkpoint(checkpoint, filesystem=filesystem)
    fs, root = filesystem_of(run_dir, filesystem)
    _, ckpt = filesystem_of(checkpoint, filesystem)
    if step is None:
        with fs.open_input_file(f"{ckpt}/trainer_state.json") as f:
            step = json.loads(f.read())["step"]
    location = str(checkpoint) if "://" in str(checkpoint) else ckpt
    # Readers see the old pointer or the new one, never a mix.
    write_atomic(f"{root}/{POINTER}", json.dumps({"path": location, "step": step}), fs)


def read_latest(run_dir) -> dict | None:
    """{"path": ..., "step": ...} of the last published checkpoint, or None before the first."""
    fs, root = filesystem_of(run_dir)
    if fs.get_file_info(f"{root}/{POINTER}").type != pafs.FileType.File:
        return None
    with fs.open_input_file(f"{root}/{POINTER}") as f:
        return json.loads(f.read())


# Flags that name a checkpoint, and what of a training checkpoint each one reads: its model directory, or all
# of it (--resume). `teacher` and `reference` belong to the distillation and DPO configs.
CHECKPOINT_INPUTS = {"init": "model", "teacher": "model", "reference": "model", "resume": ""}


def follow_latest(cfg):
    """`cfg` with each checkpoint flag that names a run directory (one holding `latest`) replaced by the
    checkpoint that pointer names: never the newest directory, which may be one a crash left unfinished."""
    changes = {}
    for name, part in CHECKPOINT_INPUTS.items():
        value = getattr(cfg, name, "")
        if not value or (latest := read_latest(value)) is None:
            continue
        changes[name] = f"{latest['path']}/{part}" if part else latest["path"]
        print(f"--{name} {value}: its latest checkpoint (step {latest['step']}), {changes[name]}", flush=True)
    return cfg.replace(**changes) if changes else cfg


def remove_torn_checkpoints(run_dir) -> list[str]:
    """After a run stopped for good (say, a full disk), delete its checkpoint directories that do not verify,
    so storage holds only whole checkpoints; `latest` already names the last good one. Returns the removed."""
    fs, root = filesystem_of(run_dir)
    entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    removed = []
    for info in entries:
        name = os.path.basename(info.path)
        if info.type != pafs.FileType.Directory or not name.startswith("checkpoint_"):
            continue
        try:
            verify_checkpoint(info.path, filesystem=fs)
        except (ValueError, OSError):
            fs.delete_dir(info.path)
            removed.append(info.path)
    return removed
