"""File helpers every writer shares: content hashes, durable and atomic writes.

A durable write is flushed to disk before it returns; an atomic one replaces its target in a
single rename, so a reader sees the old file or the new one, never half of either.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync(path: str | Path) -> None:
    """Flush a file (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str | Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str | Path, text: str, concurrent: bool = False) -> None:
    """``text`` into ``path`` through ``path.tmp`` and a rename; the directory entry is synced.
    ``concurrent``: other processes may write ``path`` at the same time (the same content,
    last rename wins): each writes through its own ``path.<pid>.tmp``."""
    path = Path(path)
    tmp = path.with_name(path.name + (f".{os.getpid()}" if concurrent else "") + ".tmp")
    write_durable(tmp, text)
    os.replace(tmp, path)
    fsync(path.parent)


def commit_file(tmp: str | Path, path: str | Path) -> None:
    """Publish a finished file written at ``tmp``: flush it, rename it onto ``path``, sync the
    directory entry (a reader sees no file or the whole file)."""
    fsync(tmp)
    os.replace(tmp, path)
    fsync(Path(path).parent)


def create_once(path: str | Path, text: str) -> bool:
    """Write ``path`` atomically unless it exists (safe between processes); True if this call
    created it. The text goes to a private temporary file, which is hard-linked into place."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write_durable(tmp, text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    fsync(path.parent)
    return True
