"""Shard writer: encodes targets and writes zstd Parquet shards in a background thread.

A shard is written to `<name>.tmp`, fsynced and renamed, and only then recorded in this rank's progress
journal, so a crash at any point leaves either a complete, recorded shard or nothing that counts.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kd_cache import format as fmt
from kd_cache.files import fsync_dir, sha256_file
from kd_cache.errors import ShardWriterError, describe
from kd_cache.targets import SampleTargets


def _list_array(chunks: list[np.ndarray], dtype: pa.DataType) -> pa.ListArray:
    """Arrow list column from per-sample 1-D arrays without a Python loop over elements."""
    lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
    offsets = np.zeros(len(chunks) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(chunks) if chunks else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, type=dtype))


def encode_table(samples: list[SampleTargets], sch: pa.Schema) -> pa.Table:
    """Samples -> one Arrow table in the v2 schema `sch` (log-probs as delta codes, Gram low-rank or dense)."""
    cols: dict[str, Any] = {
        "sample_id": pa.array([s.sample_id for s in samples], pa.string()),
        "sample_index": pa.array([s.sample_index for s in samples], pa.int64()),
        "input_ids": _list_array([s.input_ids.astype(np.int32) for s in samples], pa.int32()),
    }
    for prefix in ("text", "visual"):
        cols[f"{prefix}_positions"] = _list_array(
            [getattr(s, f"{prefix}_positions").astype(np.int32) for s in samples], pa.int32())
        t = [getattr(s, prefix) for s in samples]
        for name in sch.names:
            if not name.startswith(prefix + "_") or name == f"{prefix}_positions":
                continue
            key = name[len(prefix) + 1:]
            typ = sch.field(name).type.value_type
            if key == "topk_codes":
                chunks = [fmt.encode_logprobs(d["topk_logprobs"]).ravel() for d in t]
            elif key == "sample_ids":
                chunks = [fmt.ids_to_gaps(d["sample_ids"], d["sample_row_lengths"]) for d in t]
            else:
                chunks = [np.asarray(d[key]).ravel() for d in t]
            cols[name] = _list_array([c.astype(typ.to_pandas_dtype()) for c in chunks], typ)
    grams = [s.gram or {} for s in samples]
    empty = np.zeros(0, np.float32)
    cols["gram"] = _list_array([fmt.gram_to_upper(g["dense"]) if "dense" in g else empty for g in grams], pa.float32())
    for name, key in (("gram_mean", "mean"), ("gram_eigvals", "eigvals"), ("gram_eigvec_scales", "scales")):
        cols[name] = _list_array([g[key].astype(np.float32) if key in g else empty for g in grams], pa.float32())
    packed = [fmt.eigvec_codes_to_bytes(g["eigvecs"]) if "eigvecs" in g else (b"", b"") for g in grams]
    cols["gram_eigvecs_hi"] = pa.array([p[0] for p in packed], pa.binary())
    cols["gram_eigvecs"] = pa.array([p[1] for p in packed], pa.binary())
    return pa.table(cols, schema=sch)


def _sample_bytes_estimate(s: SampleTargets) -> int:
    n = s.input_ids.nbytes + sum(v.nbytes for v in s.text.values()) + sum(v.nbytes for v in s.visual.values())
    return n + sum(v.nbytes for v in (s.gram or {}).values())


@dataclass
class _Pending:
    """A shard being filled: the local positions it covers, its samples and the skips among them."""

    start: int
    end: int = -1
    samples: list[SampleTargets] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.end < 0:
            self.end = self.start


class ShardWriter:
    """Collects results in local order and writes shards of `shard_size` positions from a background thread.

    A shard covers a contiguous range of this rank's sample sequence (skipped samples included), so a resumed
    build restarts exactly after the last recorded range.
    """

    def __init__(self, out_dir: str, rank: int, world_size: int, *, start: int, shard_size: int,
                 teacher_fingerprint: str, targets: dict, schema: pa.Schema, row_group_bytes: int = 32 << 20,
                 compression_level: int = 3, max_queue: int = 4,
                 on_shard: Callable[[dict], None] | None = None):
        self.out_dir = out_dir
        self.on_shard = on_shard  # called from the writer thread after each journal entry (remote upload)
        self.rank, self.world_size = rank, world_size
        self.shard_size = shard_size
        self.row_group_bytes = row_group_bytes
        self.compression_level = compression_level
        self.metadata = fmt.shard_metadata(teacher_fingerprint, targets)
        self.schema = schema
        self.journal_path = journal_path(out_dir, rank, world_size)
        os.makedirs(os.path.join(out_dir, fmt.SHARD_DIR), exist_ok=True)
        self._pending = _Pending(start=start)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._error: BaseException | None = None
        self._failed_on = ""  # which shard the error came from, for the message
        self.encode_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name=f"kd-shard-writer-{rank}", daemon=True)
        self._thread.start()

    # ---- called from the main thread
    def add(self, local_pos: int, result: SampleTargets | None = None, skip: dict | None = None) -> None:
        """Record local position `local_pos` (which must be the next one) as a result or a skip."""
        self._raise_if_failed()
        p = self._pending
        if local_pos != p.end:
            raise RuntimeError(f"shard writer got local position {local_pos}, expected {p.end}")
        if result is not None:
            p.samples.append(result)
        if skip is not None:
            p.skipped.append(skip)
        p.end += 1
        if p.end - p.start >= self.shard_size:
            self._submit()

    def close(self) -> None:
        """Flush the last partial shard and wait until everything is on disk."""
        if self._pending.end > self._pending.start:
            self._submit()
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def _submit(self) -> None:
        p = self._pending
        self._pending = _Pending(start=p.end)
        while True:  # put with a timeout so a dead writer thread surfaces instead of blocking forever
            self._raise_if_failed()
            try:
                self._queue.put(p, timeout=1.0)
                return
            except queue.Full:
                continue

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise ShardWriterError(f"shard writer failed on {self._failed_on}: {describe(self._error)}") \
                from self._error

    # ---- background thread
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue
            try:
                self._write(item)
            except BaseException as e:  # noqa: BLE001 - surfaced on the main thread
                self._failed_on = (f"{fmt.SHARD_DIR}/{self._shard_name(item)}" if item.samples else
                                   "a journal entry without a shard") + \
                                  f" (rank {self.rank}, local samples {item.start}-{item.end - 1})"
                self._error = e

    def _write(self, p: _Pending) -> None:
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"start": p.start, "end": p.end, "skipped": p.skipped, "shard": None}
        if p.samples:
            name = self._shard_name(p)
            rel = f"{fmt.SHARD_DIR}/{name}"
            path = os.path.join(self.out_dir, rel)
            tmp = path + ".tmp"
            writer = pq.ParquetWriter(tmp, self.schema, **fmt.parquet_write_options(self.schema, self.compression_level))
            try:
                group: list[SampleTargets] = []
                size = 0
                for s in p.samples:
                    group.append(s)
                    size += _sample_bytes_estimate(s)
                    if size >= self.row_group_bytes:
                        writer.write_table(encode_table(group, self.schema), row_group_size=len(group))
                        group, size = [], 0
                if group:
                    writer.write_table(encode_table(group, self.schema), row_group_size=len(group))
                writer.add_key_value_metadata(self.metadata)
            finally:
                writer.close()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(os.path.dirname(path))
            entry.update(
                shard=rel,
                rows=len(p.samples),
                bytes=os.path.getsize(path),
                sha256=sha256_file(path),
                text_rows=int(sum(len(s.text_positions) for s in p.samples)),
                visual_rows=int(sum(len(s.visual_positions) for s in p.samples)),
                gram_samples=int(sum(s.gram is not None for s in p.samples)),
            )
        self.encode_seconds += time.perf_counter() - t0
        entry["write_seconds"] = round(time.perf_counter() - t0, 4)
        with open(self.journal_path, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.on_shard is not None:
            self.on_shard(entry)

    def _shard_name(self, p: _Pending) -> str:
        return shard_name(self.rank, self.world_size, p.start // self.shard_size)


def shard_name(rank: int, world_size: int, index: int) -> str:
    return f"shard-r{rank:05d}-of-{world_size:05d}-{index:06d}.parquet"


def journal_path(out_dir: str, rank: int, world_size: int) -> str:
    return os.path.join(out_dir, fmt.PROGRESS_DIR, f"rank-{rank:05d}-of-{world_size:05d}.jsonl")


def read_journal(path: str) -> list[dict]:
    """Entries of a progress journal; a torn last line (crash mid-append) is ignored."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return parse_journal(f.read())


def parse_journal(text: str) -> list[dict]:
    """The chained entries of a journal's text (see `read_journal`)."""
    out = []
    for line in text.splitlines(keepends=True):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    # keep only the contiguous prefix: entries must chain start -> end
    chained, pos = [], out[0]["start"] if out else 0
    for e in out:
        if e["start"] != pos:
            break
        chained.append(e)
        pos = e["end"]
    return chained
