"""Writing where readers may look at any moment: the data cache and the checkpoint pointer, on a local or NFS
path or a pyarrow URI (file://, s3://, gs://, ...).

  * `write_atomic`: one file replaced in one step: a temp file, fsync, `os.replace` on a file system; a single
    PUT on an object store, where an object is never visible half-written.
  * `staging_dir` + `commit_dir`: a directory written whole, then published. On a file system it is written
    into a hidden sibling and renamed into place (atomic). An object store has no rename: the directory is
    written in place and the caller writes its marker file (a manifest) last, with `write_atomic`; readers
    trust a directory only when the marker is there and names every file with its size.
"""
from __future__ import annotations

import os
import posixpath
import uuid

import pyarrow.fs as pafs

from minimind.sources import filesystem_of

__all__ = ["filesystem_of", "is_local", "write_atomic", "staging_dir", "commit_dir", "remove_dir"]


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def _hidden_sibling(path: str) -> str:
    """A fresh temp name beside `path`, hidden from globs and listings (a leading dot)."""
    return posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")


def write_atomic(uri, data: bytes | str, filesystem: pafs.FileSystem | None = None) -> None:
    """Replace the file at `uri` with `data` (str is written as UTF-8): readers see the old file or the new
    one, never a mix."""
    fs, path = filesystem_of(uri, filesystem)
    body = data.encode("utf-8") if isinstance(data, str) else data
    if not is_local(fs):
        with fs.open_output_stream(path) as f:  # one PUT: visible whole or not at all
            f.write(body)
        return
    tmp = _hidden_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def staging_dir(uri, filesystem: pafs.FileSystem | None = None) -> str:
    """A fresh, empty directory to write what `commit_dir(staging, uri)` then publishes as `uri` (a path of
    `filesystem_of(uri, filesystem)`'s file system): a hidden sibling on a file system; on an object store
    `uri` itself, emptied of anything an earlier, unfinished attempt left there."""
    fs, path = filesystem_of(uri, filesystem)
    if not is_local(fs):
        remove_dir(path, fs)
        return path
    tmp = _hidden_sibling(path)
    fs.create_dir(tmp)
    return tmp


def commit_dir(tmp: str, final, filesystem: pafs.FileSystem | None = None) -> bool:
    """Publish staging directory `tmp` as `final`. False when `final` already exists (another writer got there
    first; `tmp` is left for the caller to remove). On an object store `tmp` is `final` and the caller's marker,
    written last, is the commit."""
    fs, path = filesystem_of(final, filesystem)
    if tmp == path:
        return True
    try:
        os.replace(tmp, path)  # atomic: the directory exists complete or not at all
    except OSError:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise
        return False
    return True


def remove_dir(uri, filesystem: pafs.FileSystem | None = None) -> None:
    """Delete directory `uri` and everything under it; nothing when it does not exist."""
    fs, path = filesystem_of(uri, filesystem)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)
