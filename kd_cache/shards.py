"""Opening a cache shard and checking it against the manifest: one implementation for the reader, `kd cache verify`
and the training stream (which adds skipping and resume on top)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kd_cache import format as fmt
from kd_cache.files import sha256_file


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


def footer_problems(metadata: pq.FileMetaData, entry: dict, manifest: dict, *, strict: bool = False) -> list[str]:
    """What in a shard's footer contradicts the manifest (its `entry` in manifest["shards"]): the row count, and the
    format version, teacher fingerprint and targets repeated in the key-value metadata. A key the footer lacks is a
    problem only when `strict` (`kd cache verify`); the stream reads such shards."""
    problems = []
    if metadata.num_rows != int(entry["rows"]):
        problems.append(f"footer says {metadata.num_rows} rows, the manifest says {entry['rows']}")
    kv = metadata.metadata or {}
    expected = {b"kd.format_version": str(manifest.get("format_version")),
                b"kd.teacher_fingerprint": str(manifest.get("teacher", {}).get("fingerprint", "")),
                b"kd.targets": json.dumps(manifest.get("targets", {}), sort_keys=True)}
    for key, want in expected.items():
        have = kv.get(key)
        if have is None:
            if strict and key != b"kd.targets":
                problems.append(f"footer has no {key.decode()} (the manifest says {want!r})")
            continue
        got = json.dumps(json.loads(have), sort_keys=True) if key == b"kd.targets" else have.decode()
        if got != want:
            problems.append(f"footer {key.decode()} {got!r} does not match the manifest's {want!r}"
                            if key != b"kd.targets" else "footer kd.targets does not match the manifest")
    return problems
