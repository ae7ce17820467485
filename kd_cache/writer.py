"""Shard writer: encodes targets and writes zstd Parquet shards in a background thread.

A shard is written to `<name>.tmp`, fsynced and renamed, and only then recorded in this rank's progress
journal, so a crash at any point leaves either a complete, recorded shard or nothing that counts.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
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

log = logging.getLogger("kd_cache")
_SHA256 = re.compile(r"[0-9a-f]{64}")


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


JOURNAL_REMEDY = "the journal is damaged: restore it, or delete it to rebuild this rank's shards from the start"


def read_journal(path: str, *, where: str | None = None, rank: int | None = None, world_size: int | None = None,
                 n_local: int | None = None) -> list[dict]:
    """Entries of a progress journal, each checked (`parse_journal`); a torn last line (crash mid-append) is
    ignored and logged. [] when the file does not exist."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        return parse_journal(f.read(), where or path, rank=rank, world_size=world_size, n_local=n_local)


def parse_journal(data: bytes | str, where: str = "progress journal", *, rank: int | None = None,
                  world_size: int | None = None, n_local: int | None = None) -> list[dict]:
    """The entries of a journal's bytes, checked as untrusted input (docs/cache-format.md, "Resume files").

    Each line is one JSON entry; entries follow each other from local sample 0 (`start` = the previous `end`),
    name a shard under `shards/` (a relative path, each shard once) or none, and carry counts that add up
    (`rows` + skips = `end` - `start`; skipped indices belong to this rank's range when `rank`/`world_size` are
    given; no `end` past `n_local`). The last line only may be torn (a crash mid-append: not JSON): it is ignored
    with a warning. Anything else raises ProgressFileError naming `where`, the line and the field."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out: list[dict] = []
    pos, shards = 0, set()
    for n, line in enumerate(lines, start=1):
        try:
            e = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:  # RecursionError: deeply nested garbage
            if n == len(lines):
                log.warning("%s: ignored 1 torn line at its end (line %d: a crash mid-append); resuming after the "
                            "last whole entry", where, n)
                break
            raise fmt.ProgressFileError(f"{where} line {n}: not a JSON entry ({type(err).__name__}); "
                                        f"{JOURNAL_REMEDY}") from None
        except RecursionError:
            raise fmt.ProgressFileError(f"{where} line {n}: not a journal entry (nested too deeply); "
                                        f"{JOURNAL_REMEDY}") from None
        out.append(_check_entry(e, f"{where} line {n}", pos, shards, rank, world_size, n_local))
        pos = e["end"]
    return out


def _check_entry(e: Any, where: str, pos: int, shards: set, rank: int | None, world: int | None,
                 n_local: int | None) -> dict:
    """One journal entry, checked (see `parse_journal`)."""
    def bad(problem: str) -> fmt.ProgressFileError:
        return fmt.ProgressFileError(f"{where}: {problem}; {JOURNAL_REMEDY}")

    def count(d: dict, key: str, what: str = "") -> int:
        v = d.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise bad(f"{what}{key} must be an integer >= 0, got {v!r}")
        return v

    if not isinstance(e, dict):
        raise bad(f"an entry must be a JSON object, got {type(e).__name__}")
    start, end = count(e, "start"), count(e, "end")
    if start != pos:
        raise bad(f"start is {start}, but the entry before ends at {pos} (entries follow each other from 0)")
    if end <= start:
        raise bad(f"end must be > start ({start}), got {end}")
    if n_local is not None and end > n_local:
        raise bad(f"end {end} is past this rank's {n_local} samples")
    skipped = e.get("skipped")
    if not isinstance(skipped, list):
        raise bad(f"skipped must be a list, got {skipped!r}")
    for j, s in enumerate(skipped):
        if not isinstance(s, dict):
            raise bad(f"skipped[{j}] must be a JSON object, got {s!r}")
        index = count(s, "index", f"skipped[{j}].")
        if world is not None and rank is not None and (index % world != rank or not start <= index // world < end):
            raise bad(f"skipped[{j}].index {index} is not one of this rank's samples {start}-{end - 1}")
        for key in ("sample_id", "reason"):
            if not isinstance(s.get(key), str):
                raise bad(f"skipped[{j}].{key} must be a string, got {s.get(key)!r}")
        if not isinstance(s.get("detail", ""), str):
            raise bad(f"skipped[{j}].detail must be a string, got {s.get('detail')!r}")
    shard = e.get("shard")
    rows = 0
    if shard is not None:
        try:
            fmt.check_relative_name(shard, "shard", where, error=fmt.ProgressFileError)
        except fmt.ProgressFileError as err:
            raise fmt.ProgressFileError(f"{err}; {JOURNAL_REMEDY}") from None
        if not (shard.startswith(fmt.SHARD_DIR + "/") and shard.endswith(".parquet")):
            raise bad(f"shard {shard!r} must be a {fmt.SHARD_DIR}/*.parquet file")
        if shard in shards:
            raise bad(f"shard {shard!r} is recorded twice")
        shards.add(shard)
        for key in ("rows", "bytes", "text_rows", "visual_rows", "gram_samples"):
            count(e, key)
        rows = e["rows"]
        if rows < 1:
            raise bad(f"rows must be >= 1 for an entry with a shard, got {rows}")
        sha = e.get("sha256")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise bad(f"sha256 must be 64 hexadecimal characters, got {sha!r}")
    if rows + len(skipped) != end - start:
        raise bad(f"rows ({rows}) + skipped ({len(skipped)}) must equal end - start ({end - start})")
    return e
