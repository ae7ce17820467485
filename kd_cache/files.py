"""Files written whole or not at all, and their checksums: the filesystem rules of builds, manifests, remote
staging, publishing and training checkpoints."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any, BinaryIO

from kd_cache import format as fmt
from kd_cache.lock import _safe_host, stale_temp

BLOCK = 1 << 22  # bytes read per step when hashing


def hash_stream(h: Any, f: BinaryIO, block: int = BLOCK) -> Any:
    """Feed what remains of an open binary file (local or fsspec) to the hash object `h`, in blocks; returns `h`."""
    while chunk := f.read(block):
        h.update(chunk)
    return h


def sha256_stream(f: BinaryIO, block: int = BLOCK) -> str:
    """Hex sha256 of what remains of an open binary file (local or fsspec), read in blocks."""
    return hash_stream(hashlib.sha256(), f, block).hexdigest()


def sha256_file(path: str | os.PathLike, fs: Any = None, block: int = BLOCK) -> str:
    """Hex sha256 of a file: a local path, or a path on the fsspec filesystem `fs`."""
    with (fs.open(path, "rb") if fs is not None else open(path, "rb")) as f:
        return sha256_stream(f, block)


def save_json(path: str, obj: Any) -> None:
    """`obj` as indented, key-sorted JSON, written whole or not at all."""
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str))


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write `path` whole or not at all: `<path>.tmp.<pid>.<host>`, fsync, rename. A failed write (ENOSPC...)
    removes its temporary file; one left by a killed process is removed by the next build (`remove_stale_temps`)."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str, data: bytes) -> None:
    """`atomic_write_text` for bytes."""
    tmp = f"{path}.tmp.{os.getpid()}.{_safe_host()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def remove_stale_temps(out_dir: str, rank: int, world_size: int) -> list[str]:
    """Remove what killed or failed writers left in a cache (or staging) folder; called by a build holding this
    rank's lock, before it writes anything. This rank's own temporary files (its journal and done file, its
    `.parquet.tmp` shards) always go: no live process can own them while the lock is held. Folder-level ones
    (`manifest.json`, the card, the configuration) and other ranks' go when their writer (pid, host in the name)
    is gone, or when they are older than ten minutes. Returns the removed paths."""
    mine = f"rank-{rank:05d}-of-{world_size:05d}."
    removed = []
    for sub in ("", fmt.PROGRESS_DIR, fmt.SHARD_DIR, fmt.TOKENIZER_DIR):
        folder = os.path.join(out_dir, sub) if sub else out_dir
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            path = os.path.join(folder, name)
            if sub == fmt.SHARD_DIR:
                stale = name.endswith(".tmp") and name.startswith(f"shard-r{rank:05d}-")
            else:
                stale = ".tmp." in name and stale_temp(path, own=sub == fmt.PROGRESS_DIR and name.startswith(mine))
            if stale and os.path.isfile(path):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                removed.append(path)
    return removed
