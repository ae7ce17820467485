"""Opening a cache shard and checking it against the manifest: one implementation for the reader, `kd cache verify`
and the training stream (which adds skipping and resume on top)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kd_cache import format as fmt
from kd_cache.errors import DataError
from kd_cache.files import sha256_file
from kd_cache.format import Manifest, ShardEntry


READ_ERRORS = (OSError, ValueError, KeyError, IndexError, EOFError, pa.ArrowException)
"""What reading a damaged shard raises (pyarrow's page CRC check: OSError; a bad footer: ValueError / ArrowException)."""


class CorruptShardError(DataError, ValueError):
    """A shard could not be read or does not match the manifest. `shard` is its name in the cache."""

    def __init__(self, shard: str, detail: str, remedy: str = "rebuild or re-download the shard"):
        detail = " ".join(str(detail).split())  # one line: arrow's messages may end in a newline
        super().__init__(f"cache shard {shard} is corrupt or unreadable ({detail}); run `kd cache verify` on the "
                         f"cache, {remedy}")
        self.shard = shard
        self.detail = detail


def open_parquet(fs: Any, path: str, *, whole_file: bool = False) -> tuple[Any, pq.ParquetFile]:
    """(file handle, ParquetFile) of a shard on the fsspec filesystem `fs`: read by ranges (memory: what is read), or
    with `whole_file` fetched in one request into memory (servers that ignore Range requests). The caller closes
    the handle."""
    fh = pa.BufferReader(fs.cat_file(path)) if whole_file else fs.open(path, "rb")
    try:
        return fh, pq.ParquetFile(fh, **fmt.READ_OPTIONS)
    except BaseException:
        fh.close()
        raise


def shard_sha256(fs: Any, path: str, *, whole_file: bool = False) -> str:
    """Hex sha256 of a shard's bytes (streamed; in one request with `whole_file`)."""
    if whole_file:
        return hashlib.sha256(fs.cat_file(path)).hexdigest()
    return sha256_file(path, fs)


def footer_problems(metadata: pq.FileMetaData, entry: ShardEntry, manifest: Manifest, *,
                    strict: bool = False) -> list[str]:
    """What in a shard's footer contradicts the manifest (its `entry` in `manifest.shards`): the row count, and the
    format version, teacher fingerprint and targets repeated in the key-value metadata. A key the footer lacks is a
    problem only when `strict` (`kd cache verify`); the reader and the stream read such shards."""
    problems = []
    if metadata.num_rows != entry.rows:
        problems.append(f"footer says {metadata.num_rows} rows, the manifest says {entry.rows}")
    kv = metadata.metadata or {}
    expected = {b"kd.format_version": str(manifest.version),
                b"kd.teacher_fingerprint": manifest.teacher_fingerprint,
                b"kd.targets": manifest.targets_metadata}
    for key, want in expected.items():
        have = kv.get(key)
        if have is None:
            if strict and key != b"kd.targets":
                problems.append(f"footer has no {key.decode()} (the manifest says {want!r})")
            continue
        try:
            got = json.dumps(json.loads(have), sort_keys=True) if key == b"kd.targets" else have.decode()
        except (UnicodeDecodeError, json.JSONDecodeError):
            got = None
        if got != want:
            problems.append(f"footer {key.decode()} {got!r} does not match the manifest's {want!r}"
                            if key != b"kd.targets" else "footer kd.targets does not match the manifest")
    return problems


def open_checked(fs: Any, path: str, entry: ShardEntry, manifest: Manifest, *, whole_file: bool = False,
                 verify_checksum: bool = False) -> tuple[Any, pq.ParquetFile]:
    """`open_parquet`, then the footer checked against the manifest (and with `verify_checksum` the bytes against
    its sha256): the one way every reader of a cache opens a shard. ValueError naming what differs; the caller
    closes the handle."""
    if verify_checksum and entry.sha256:
        got = shard_sha256(fs, path, whole_file=whole_file)
        if got != entry.sha256:
            raise ValueError(f"{entry.name}: sha256 {got} differs from the manifest's {entry.sha256}")
    fh, pf = open_parquet(fs, path, whole_file=whole_file)
    problems = footer_problems(pf.metadata, entry, manifest)
    if problems:
        fh.close()
        raise ValueError(f"{entry.name}: " + "; ".join(problems))
    return fh, pf
