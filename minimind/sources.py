"""Where training text comes from: the one reader of jsonl(.gz) inputs for the whole project.

Each input is a file, a directory (its *.jsonl and *.jsonl.gz, not recursive), a glob (`*` in a directory part
also crosses '/') or a URI pyarrow reads (file://, s3://, gs://, ...). `resolve_inputs` turns inputs into files,
`iter_chunks` streams one file as blocks of whole lines (what the Ray ingest tokenises per task), `iter_lines`
streams every line of every file with its number (what the tokenizer trainer and the evaluator read).

pyarrow and the standard library only: no Ray, no torch, so `minimind` can use it.
"""
from __future__ import annotations

import fnmatch
import glob
import logging
import os
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.fs as pafs

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


class MissingInput(FileNotFoundError, ValueError):
    """An input names no file: no such file or directory, no file matches a glob, a directory without jsonl.
    A FileNotFoundError and a ValueError both, so callers catching either keep working."""


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


def scheme_of(uri: str) -> str:
    """"s3://" for "s3://bucket/key", "" for a local path."""
    return uri.split("://", 1)[0] + "://" if "://" in uri else ""


def resolve_paths(paths: Sequence[str]) -> list[tuple[str, int, int]]:
    """Input files as (uri, size, mtime_ns); see `resolve_inputs`."""
    return resolve_inputs(paths)[0]


def resolve_inputs(paths: Sequence[str]) -> tuple[list[tuple[str, int, int]], list[str]]:
    """(files, skipped). Files as (uri, size, mtime_ns): each path a file, a directory (its *.jsonl and
    *.jsonl.gz, not recursive), a glob (`*` in a directory part also crosses '/') or a URI pyarrow reads
    (s3://, gs://, ...). Skipped: what a directory holds besides those (logged, named in the manifest).
    Raises MissingInput for a path that gives no file.

    On the local file system each real file counts once, however many paths reach it (symlinks, a file named
    twice), and a glob does not follow a symlink back to a directory above it (a loop).
    """
    found: dict[str, tuple[str, int, int]] = {}   # real path (local) or uri -> file
    skipped: list[str] = []
    twice: list[tuple[str, str]] = []             # (path, the path the same file was first reached by)
    for p in paths:
        fs, path = filesystem_of(str(p))
        scheme = scheme_of(str(p))
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
                raise MissingInput(f"{p}: directory holds no {' or '.join(JSONL_SUFFIXES)} files")
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
                raise MissingInput(f"{p}: no file matches")
        else:
            raise MissingInput(f"{p}: no such file or directory")
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
    """Whole lines of a jsonl(.gz) file in chunks of about `block_bytes`: (number of the first line, bytes).
    A file that cannot be read to its end (a truncated .gz) raises ValueError "FILE: cannot read after line N"."""
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


def iter_lines(paths: Sequence[str] | str | os.PathLike, block_bytes: int = 1 << 20
               ) -> Iterator[tuple[str, int, bytes]]:
    """(file uri, line number from 1, the line's bytes without its newline) for every line of every input,
    blank ones included, files in `resolve_inputs` order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for uri, _, _ in resolve_paths([str(p) for p in paths]):
        for first, data in iter_chunks(uri, block_bytes):
            yield from ((uri, n, raw) for n, raw in enumerate(split_lines(data), first))
