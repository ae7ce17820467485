"""Shard writer: encodes targets and writes zstd Parquet shards in a background thread.

A shard is written to `<name>.tmp`, fsynced and renamed, and only then recorded in this rank's progress
journal, so a crash at any point leaves either a complete, recorded shard or nothing that counts.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from kd_cache import format as fmt
from kd_cache.codec import encode_table
from kd_cache.files import fsync_dir, sha256_file
from kd_cache.errors import ShardWriterError, describe
from kd_cache.codec import SampleTargets


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
