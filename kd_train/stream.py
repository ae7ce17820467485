"""Training-side stream over a kd cache: split across ranks and DataLoader workers, join with the original
records and their images, shuffle with a seeded buffer, and resume exactly.

Why it is built this way:

* The split is a pure function of (manifest, seed, epoch, rank, world_size, worker, num_workers), so every
  process computes its own share with no coordination, and a resumed run computes the same share.
* The shuffle buffer shuffles *positions* (shard, row_group, offset), which Parquet metadata gives without
  reading data. A resume replays the shuffled order of positions up to what was consumed (no row group is
  read or decoded for that), decodes only the positions still waiting in the buffer, and goes on exactly as
  the first run did.
* A DataLoader prefetches, so what the stream produced is not what the model saw. Every sample carries its
  worker's `stream_index`; the training loop reports what it consumed (`mark_consumed`) and the resume state
  is built from those reports only.

Sharding rule (`split`): the shard order is the manifest order, permuted by (seed, epoch) when
`shuffle_shards`; with at least `world_size` shards, the i-th shard of that order goes to rank
i % world_size; with fewer, the rows of the shards in that order are dealt like cards: the j-th row overall
goes to rank j % world_size. The same rule splits a rank's share across its DataLoader workers (whole
shards when it holds at least num_workers of them, else every num_workers-th row).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from kd_cache.codec import columns, stored_row
from kd_cache.data import RecordSource, SkipSample, load_images, sample_id_of
from kd_cache.errors import DataError
from kd_cache.reader import Cache, Position, open_cache
from kd_cache.shards import READ_ERRORS, CorruptShardError, shard_sha256

log = logging.getLogger("kd_train.stream")

STATE_VERSION = 1

TAG_KEYS = ("position", "next_position", "stream_index", "worker_id", "num_workers", "stream_stats")
"""Keys the stream adds to every yielded sample (after `transform`); `mark_consumed` reads them back."""


# --------------------------------------------------------------------------------------------- errors


class DataMismatchError(ValueError):
    """A cached sample does not match the record it claims to come from: the data file is not the one the
    cache was built from."""


class MissingImageError(DataError):
    """A cached sample's image is missing or unreadable. `sample_id` and `detail` (the path) say which."""

    def __init__(self, sample_id: str, reason: str, detail: str):
        super().__init__(f"cached sample {sample_id!r}: {reason}: {detail}; fix the image root, restore the image, "
                         "or pass skip_missing_images=True to skip such samples")
        self.sample_id = sample_id
        self.reason = reason
        self.detail = detail


def ensure_nonempty(cache: "Cache | CacheStream | str | os.PathLike") -> Cache:
    """Return the cache, or raise ValueError when it holds no samples (a trainer cannot train on nothing)."""
    if isinstance(cache, CacheStream):
        cache = cache.cache
    elif not isinstance(cache, Cache):
        cache = open_cache(str(cache))
    if len(cache) == 0:
        reasons = cache.manifest.skipped_by_reason
        why = f"; the build skipped {cache.manifest.skipped_total} samples ({reasons})" if reasons else ""
        raise ValueError(f"cache {cache.url} holds no samples (got num_samples=0){why}; rebuild it from data "
                         "that yields usable samples")
    return cache


# --------------------------------------------------------------------------------------------- splitting


@dataclass(frozen=True)
class Slice:
    """Rows start, start+step, start+2*step, ... of one shard (in-shard row numbers)."""

    shard: int
    start: int
    step: int

    def count(self, rows: int) -> int:
        return len(range(self.start, rows, self.step))


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The order shards are dealt in: manifest order, or a (seed, epoch) permutation of it."""
    order = list(range(num_shards))
    if shuffle:
        _rng(seed, epoch, "shards").shuffle(order)
    return order


def split(slices: Sequence[Slice], rows: Sequence[int], n: int, i: int) -> list[Slice]:
    """Part i of n of a sequence of slices.

    Whole slices round-robin when there are at least n of them (each part reads whole shards); otherwise the
    j-th row of the concatenation goes to part j % n, so no part is idle while rows remain.
    """
    if not 0 <= i < n:
        raise ValueError(f"part must be in [0, {n}), got {i}")
    if n == 1:
        return list(slices)
    if len(slices) >= n:
        return list(slices[i::n])
    out, seen = [], 0
    for s in slices:
        c = s.count(rows[s.shard])
        first = (i - seen) % n
        if first < c:
            out.append(Slice(s.shard, s.start + first * s.step, s.step * n))
        seen += c
    return out


def _rng(*parts: Any) -> random.Random:
    """A Python RNG seeded from a hash of `parts`: stable across processes and runs (no hash randomisation)."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class _ShuffleBuffer:
    """Seeded buffer shuffle of a stream. At every yield, `pending` holds exactly the items taken from the
    source and not given out yet: what a resume must restore."""

    def __init__(self, size: int, rng: random.Random):
        self.size = max(1, size)
        self.rng = rng
        self.pending: list = []

    def run(self, source: Iterable) -> Iterator:
        buf = self.pending
        for x in source:
            if len(buf) < self.size:
                buf.append(x)
                continue
            j = self.rng.randrange(self.size)
            out, buf[j] = buf[j], x
            yield out
        self.rng.shuffle(buf)
        while buf:
            yield buf.pop()


# --------------------------------------------------------------------------------------------- state


@dataclass
class ResumeState:
    """Where one rank's stream stands, from what its training loop consumed. JSON-serialisable.

    `consumed[w]` is the number of planned samples of (logical) worker w that are behind the loop (the next
    `stream_index` it will yield); `next_positions[w]` is the (shard, row_group, offset) of that next sample,
    for people reading checkpoints; `next_worker` is the worker the DataLoader polls first on resume, so the
    interleaving of workers continues too.
    """

    epoch: int
    seed: int
    consumed: list[int] = field(default_factory=list)
    next_positions: list[list[int] | None] = field(default_factory=list)
    num_workers: int | None = None
    next_worker: int = 0
    rank: int = 0
    world_size: int = 1
    shuffle_buffer: int = 64
    shuffle_shards: bool = True
    cache_fingerprint: str = ""
    stats: list[dict] = field(default_factory=list)
    version: int = STATE_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ResumeState":
        if not isinstance(d, dict):
            raise ValueError(f"resume state must be a dict, got {type(d).__name__}")
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"resume state version must be {STATE_VERSION}, got {d.get('version')!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"resume state has unknown keys {unknown}")
        s = cls(**d)
        if s.num_workers is not None and (len(s.consumed) != s.num_workers or len(s.next_positions) != s.num_workers):
            raise ValueError(f"resume state for {s.num_workers} workers needs that many consumed/next_positions, "
                             f"got {len(s.consumed)} and {len(s.next_positions)}")
        if any((not isinstance(c, int)) or c < 0 for c in s.consumed):
            raise ValueError(f"resume state consumed counts must be non-negative integers, got {s.consumed}")
        return s

    @classmethod
    def from_json(cls, text: str) -> "ResumeState":
        return cls.from_dict(json.loads(text))


def cache_fingerprint(cache: Cache) -> str:
    """Identity of a cache's content (shard names, rows, sha256), so a state cannot resume another cache."""
    key = [(s.name, s.rows, s.sha256) for s in cache.shards]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


@dataclass
class _Counters:
    skipped_missing_image: int = 0
    skipped_corrupt_rows: int = 0
    corrupt_shards: set = field(default_factory=set)

    def snapshot(self) -> dict:
        return {"skipped_missing_image": self.skipped_missing_image,
                "skipped_corrupt_rows": self.skipped_corrupt_rows,
                "corrupt_shards": sorted(self.corrupt_shards)}

    @classmethod
    def from_snapshot(cls, d: dict | None) -> "_Counters":
        d = d or {}
        return cls(int(d.get("skipped_missing_image", 0)), int(d.get("skipped_corrupt_rows", 0)),
                   set(d.get("corrupt_shards", ())))


# --------------------------------------------------------------------------------------------- reading


class _Bad:
    """Placeholder for a row that could not be read (its shard is corrupt and skipping was asked for)."""


_BAD = _Bad()


def _corrupt_error_types() -> tuple[type, ...]:
    return READ_ERRORS


def _is_transport_error(e: BaseException) -> bool:
    """Network trouble is not corruption: it must surface, never be skipped as a bad shard."""
    if isinstance(e, (TimeoutError, ConnectionError)):
        return True
    mod = type(e).__module__ or ""
    return mod.split(".")[0] in ("aiohttp", "requests", "urllib3", "botocore", "gcsfs", "s3fs")


def _owned(sample: dict) -> dict:
    """Copy arrays that are views of Arrow buffers, so a buffered sample does not pin its whole row group."""
    for k, v in sample.items():
        if isinstance(v, np.ndarray):
            base = v
            while isinstance(base, np.ndarray) and base.base is not None:
                base = base.base
            if not isinstance(base, np.ndarray):
                sample[k] = v.copy()
    return sample


class _ShardReader:
    """One open shard and one row group's columns at a time: memory is bounded by a row group."""

    def __init__(self, cache: Cache, skip_corrupt: bool, counters: _Counters, verify_checksums: bool = False):
        self.cache = cache
        self.skip_corrupt = skip_corrupt
        self.verify_checksums = verify_checksums
        self._verified: dict[int, str | None] = {}
        self.counters = counters
        self._errors = _corrupt_error_types()
        self._rg_rows: dict[int, list[int] | None] = {}
        self._bad: set[tuple[int, int]] = set()
        self._shard: int | None = None
        self._fh = None
        self._pf = None
        self._rg: int | None = None
        self._cols: dict[str, Any] = {}
        self._whole_file = False

    def close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except Exception:  # noqa: BLE001 - closing a read handle must not mask the real error
                pass
        self._fh = self._pf = self._shard = self._rg = None
        self._cols = {}

    def _name(self, shard: int) -> str:
        return self.cache.shards[shard].name

    def _corrupt(self, shard: int, e: BaseException, where: str) -> None:
        """Raise CorruptShardError, or (skipping) log and count the shard once per worker."""
        if isinstance(e, CorruptShardError) or _is_transport_error(e):
            raise e
        if not self.skip_corrupt:
            raise CorruptShardError(self._name(shard), f"{where}: {type(e).__name__}: {e}",
                                    "rebuild or re-download the shard, or pass skip_corrupt_shards=True to skip it") from e
        if shard not in self.counters.corrupt_shards:
            log.warning("skipping corrupt cache shard %s (%s: %s: %s)", self._name(shard), where, type(e).__name__, e)
        self.counters.corrupt_shards.add(shard)

    def _open(self, shard: int) -> None:
        self.close()
        # remote, or a local copy in the read-through cache; its footer checked against the manifest
        self._fh, self._pf = self.cache.open_shard_file(shard, whole_file=self._whole_file)
        self._shard = shard

    def _ranged(self, fn: Callable[[], Any]) -> Any:
        """Run fn; if the server ignores HTTP Range requests (e.g. `python -m http.server`), switch to reading
        whole shards (memory: one shard instead of one row group) and run it again."""
        try:
            return fn()
        except ValueError as e:
            if self._whole_file or "support range requests" not in str(e):
                raise
            log.warning("%s does not serve byte ranges; reading whole shards (memory: one shard)", self.cache.url)
        self._whole_file = True
        self.close()
        return fn()

    def row_groups(self, shard: int) -> list[int] | None:
        """Row counts of the shard's row groups (footer only), or None for a skipped corrupt shard."""
        if shard not in self._rg_rows:
            try:
                self._ranged(lambda: self._open(shard))
                md = self._pf.metadata
                self._rg_rows[shard] = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
            except self._errors as e:
                self.close()
                self._corrupt(shard, e, "footer")
                self._rg_rows[shard] = None
        return self._rg_rows[shard]

    def positions(self, slices: Iterable[Slice]) -> Iterator[Position]:
        """Positions of the slices' rows, in order, from footers alone."""
        for sl in slices:
            counts = self.row_groups(sl.shard)
            if counts is None:
                continue
            ends = list(itertools.accumulate(counts))
            rg = 0
            for k in range(sl.start, ends[-1] if ends else 0, sl.step):
                while k >= ends[rg]:
                    rg += 1
                yield Position(sl.shard, rg, k - (ends[rg - 1] if rg else 0))

    def _verify(self, shard: int) -> None:
        """Compare the shard's sha256 with the manifest's, once per shard: a few corruptions (in dictionary
        pages, in zstd literals) still decode, to wrong targets, and only a checksum sees them."""
        if shard not in self._verified:
            want = self.cache.shards[shard].sha256
            fs, url = self.cache.shard_location(shard)
            got = shard_sha256(fs, url, whole_file=self._whole_file)
            ok = not want or got == want
            self._verified[shard] = None if ok else f"sha256 {got} differs from the manifest's {want}"
        if self._verified[shard] is not None:
            raise ValueError(self._verified[shard])

    def _load(self, shard: int, rg: int) -> None:
        def read():
            if self.verify_checksums:
                self._verify(shard)
            if self._shard != shard:
                self._open(shard)
            return self._pf.read_row_group(rg)

        table = self._ranged(read)
        counts = self._rg_rows.get(shard)
        if counts is not None and table.num_rows != counts[rg]:
            raise ValueError(f"row group {rg} holds {table.num_rows} rows, its metadata says {counts[rg]}")
        self._rg, self._cols = rg, columns(table)

    def fetch(self, pos: Position) -> dict | _Bad:
        """The decoded sample at `pos` (its own arrays), or _BAD for a row of a skipped corrupt shard."""
        if (pos.shard, pos.row_group) in self._bad:
            return _BAD
        try:
            if self._shard != pos.shard or self._rg != pos.row_group:
                self._load(pos.shard, pos.row_group)
        except self._errors as e:
            self.close()
            self._corrupt(pos.shard, e, f"row group {pos.row_group}")
            self._bad.add((pos.shard, pos.row_group))
            return _BAD
        try:
            return _owned(self.cache.decode(stored_row(self._cols, pos.offset)))
        except self._errors as e:
            self._corrupt(pos.shard, e, f"row group {pos.row_group} row {pos.offset}")
            return _BAD


def _with_next(it: Iterator) -> Iterator[tuple[Any, Any]]:
    """(item, the item after it or None): the next position is known when a sample is yielded."""
    cur = next(it, None)
    while cur is not None:
        nxt = next(it, None)
        yield cur, nxt
        cur = nxt


def _pos_list(p: Position | None) -> list[int] | None:
    return None if p is None else [p.shard, p.row_group, p.offset]


# --------------------------------------------------------------------------------------------- the stream


class CacheStream(torch.utils.data.IterableDataset):
    """Samples of one rank's share of a kd cache, joined with their records and images, shuffled, resumable.

    Yields the cache sample dict (numpy arrays, see `kd_cache.reader.Cache.decode`) plus `images` (PIL) and
    the tags in `TAG_KEYS`, passed through `transform` (run in the DataLoader worker) if given.
    The loop must call `mark_consumed(batch)` for what it used; `state_dict()` is built from those reports.
    Corruption is found where it breaks decoding or contradicts the manifest (footer, row counts, kd metadata);
    `verify_checksums=True` also hashes each shard before its first row group is read (one more sequential read
    per shard and epoch) and catches the rest.
    With DataLoader workers use `persistent_workers=False`, so each epoch's workers see `set_epoch` and the
    resume point (workers hold a copy of the stream made when the loader is iterated).
    """

    def __init__(self, cache: "Cache | str | os.PathLike", *, records: Any = None,
                 image_root: str | os.PathLike | None = None, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 64, shuffle_shards: bool = True, epoch: int = 0,
                 skip_missing_images: bool = False, skip_corrupt_shards: bool = False,
                 transform: Callable[[dict], dict] | None = None, verify_checksums: bool = False):
        super().__init__()
        for name, v, lo in (("world_size", world_size, 1), ("rank", rank, 0), ("seed", seed, 0),
                            ("shuffle_buffer", shuffle_buffer, 0), ("epoch", epoch, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if rank >= world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if transform is not None and not callable(transform):
            raise ValueError(f"transform must be callable or None, got {type(transform).__name__}")
        # an opened Cache is used as it is (the trainer opens each cache once per process); a URL is opened here
        self.cache_url = cache.url if isinstance(cache, Cache) else str(cache)
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.shuffle_buffer, self.shuffle_shards = shuffle_buffer, bool(shuffle_shards)
        self.skip_missing_images, self.skip_corrupt_shards = bool(skip_missing_images), bool(skip_corrupt_shards)
        self.transform = transform
        self.verify_checksums = bool(verify_checksums)
        self.image_root = None if image_root is None else str(image_root)
        self._cache: Cache | None = cache if isinstance(cache, Cache) else open_cache(self.cache_url)
        self._cache_pid = os.getpid()
        self.fingerprint = cache_fingerprint(self._cache)
        self.records = self._records(records)
        self._reset_progress()

    def _records(self, records: Any):
        """A RecordSource (paths are opened); warns early when the data file is not the one built from."""
        if records is None:
            return None

        if not isinstance(records, RecordSource):
            records = RecordSource(records)
        built = self.cache.manifest.data_fingerprint
        have = getattr(records, "fingerprint", None)
        if built and have and built != have:
            log.warning("data %s differs from the data the cache was built from (%s); every sample is checked "
                        "by id", records.description, self.cache.manifest.data_source)
        return records

    # ---- DataLoader workers re-open the cache (once each): fsspec filesystems (their event loops) and file handles are per process,
    # and a forked worker inherits this object without pickling, so the owner's pid is checked too.
    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_cache"] = None
        d["_live"] = {}
        return d

    @property
    def cache(self) -> Cache:
        if self._cache is None or self._cache_pid != os.getpid():
            self._cache = open_cache(self.cache_url)
            self._cache_pid = os.getpid()
        return self._cache

    # ---- progress tracking (main process)
    def _reset_progress(self) -> None:
        self._consumed: dict[int, int] = {}
        self._next_pos: dict[int, list[int] | None] = {}
        self._snap: dict[int, dict] = {}
        self._live: dict[int, _Counters] = {}
        self._num_workers: int | None = None
        self._next_worker = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shard permutation and shuffle). A new epoch starts from its beginning; the current
        one keeps its position, so a resumed loop may call this unconditionally."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        if epoch != self.epoch:
            self.epoch = epoch
            self._reset_progress()

    def mark_consumed(self, batch: Any) -> None:
        """Report samples the training loop has used: a sample, a list of samples, or a dict of tag lists
        (see `collate_tags`). Per worker, consumption must move forward (a sample reported twice is an error)."""
        tags = _tags(batch)
        by_worker: dict[int, list[dict]] = {}
        for t in tags:
            nw = int(t["num_workers"])
            if self._num_workers is None:
                self._num_workers = nw
            elif nw != self._num_workers:
                raise ValueError(f"samples come from {nw} DataLoader workers, earlier ones from {self._num_workers}")
            w = int(t["worker_id"])
            if not 0 <= w < nw:
                raise ValueError(f"worker_id must be in [0, {nw}), got {w}")
            by_worker.setdefault(w, []).append(t)
        for w, ts in by_worker.items():
            idx = sorted(int(t["stream_index"]) for t in ts)
            done = self._consumed.get(w, 0)
            if idx[0] < done or len(set(idx)) != len(idx):
                raise ValueError(f"worker {w}: got stream_index {idx} but samples before {done} were already "
                                 "reported as consumed (a sample reported twice?)")
            last = max(ts, key=lambda t: int(t["stream_index"]))
            self._consumed[w] = idx[-1] + 1
            self._next_pos[w] = _pos_list(_as_position(last.get("next_position")))
            if "stream_stats" in last:
                self._snap[w] = dict(last["stream_stats"])
        if tags:
            self._next_worker = (int(tags[-1]["worker_id"]) + 1) % self._num_workers

    def state_dict(self) -> dict:
        """The resume state (a JSON-serialisable dict of `ResumeState`) from what `mark_consumed` reported."""
        nw = self._num_workers
        workers = range(nw) if nw is not None else range(0)
        return ResumeState(
            epoch=self.epoch, seed=self.seed, consumed=[self._consumed.get(w, 0) for w in workers],
            next_positions=[self._next_pos.get(w) for w in workers], num_workers=nw, next_worker=self._next_worker,
            rank=self.rank, world_size=self.world_size, shuffle_buffer=self.shuffle_buffer,
            shuffle_shards=self.shuffle_shards, cache_fingerprint=self.fingerprint,
            stats=[_Counters.from_snapshot(self._snap.get(w)).snapshot() for w in workers],
        ).to_dict()

    def load_state_dict(self, state: dict | ResumeState) -> None:
        """Resume: the next iteration yields exactly what the saved run had not consumed, in the same order."""
        s = state if isinstance(state, ResumeState) else ResumeState.from_dict(state)
        mine = {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "shuffle_buffer": self.shuffle_buffer, "shuffle_shards": self.shuffle_shards,
                "cache_fingerprint": self.fingerprint}
        diff = [f"{k}: state has {getattr(s, k)!r}, got {v!r}" for k, v in mine.items() if getattr(s, k) != v]
        if diff:
            raise ValueError("resume state does not belong to this stream (" + "; ".join(diff) + ")")
        self.epoch = int(s.epoch)
        self._reset_progress()
        self._num_workers = s.num_workers
        self._next_worker = int(s.next_worker)
        for w in range(s.num_workers or 0):
            self._consumed[w] = int(s.consumed[w])
            self._next_pos[w] = s.next_positions[w]
            if w < len(s.stats):
                self._snap[w] = dict(s.stats[w])

    @property
    def stats(self) -> dict:
        """Skip counters over workers: `skipped_missing_image`, `skipped_corrupt_rows`, `corrupt_shards`.

        Iterating in this process (num_workers=0) they are live; with DataLoader workers they arrive with the
        consumed samples (`mark_consumed`)."""
        workers = set(self._snap) | set(self._live)
        cs = [self._worker_stats(w) for w in sorted(workers)]
        return {"skipped_missing_image": sum(c.skipped_missing_image for c in cs),
                "skipped_corrupt_rows": sum(c.skipped_corrupt_rows for c in cs),
                "corrupt_shards": len(set().union(*(c.corrupt_shards for c in cs))) if cs else 0}

    def _worker_stats(self, w: int) -> _Counters:
        return self._live[w] if w in self._live else _Counters.from_snapshot(self._snap.get(w))

    # ---- the split
    def rank_slices(self, rank: int | None = None) -> list[Slice]:
        """This rank's (or `rank`'s) share of the cache for the current epoch."""
        rows = [s.rows for s in self.cache.shards]
        order = shard_order(len(rows), self.seed, self.epoch, self.shuffle_shards)
        return split([Slice(s, 0, 1) for s in order], rows, self.world_size, self.rank if rank is None else rank)

    def num_samples(self, rank: int | None = None) -> int:
        """Cached samples in this rank's (or `rank`'s) share this epoch (before skips), from the manifest: lets a
        trainer equalise steps across ranks, whose shares may differ by a shard."""
        rows = [s.rows for s in self.cache.shards]
        return sum(s.count(rows[s.shard]) for s in self.rank_slices(rank))

    # ---- iteration
    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        loader_worker, nw = (0, 1) if info is None else (info.id, info.num_workers)
        saved_nw = self._num_workers
        if saved_nw is not None and saved_nw != nw and any(self._consumed.values()):
            raise ValueError(f"this epoch was partly consumed with {saved_nw} DataLoader workers (num_workers=0 "
                             f"counts as 1), got {nw}; resume with the same num_workers")
        # Rotate worker roles so the DataLoader's round-robin continues with the worker the saved run would
        # have polled next.
        worker = (loader_worker + self._next_worker) % nw
        counters = _Counters.from_snapshot(self._snap.get(worker))
        if info is None:
            self._live[worker] = counters
        return self._iter_share(worker, nw, self._consumed.get(worker, 0), counters)

    def _iter_share(self, worker: int, nw: int, skip: int, counters: _Counters) -> Iterator[dict]:
        cache = self.cache
        rows = [s.rows for s in cache.shards]
        slices = split(self.rank_slices(), rows, nw, worker)
        reader = _ShardReader(cache, self.skip_corrupt_shards, counters, self.verify_checksums)
        store: dict[Position, Any] = {}
        decoding = skip == 0

        def source() -> Iterator[Position]:
            for p in reader.positions(slices):
                if decoding:
                    store[p] = reader.fetch(p)
                yield p

        buf = _ShuffleBuffer(self.shuffle_buffer,
                             _rng(self.seed, self.epoch, self.rank, self.world_size, worker, nw, "buffer"))
        plan = buf.run(source())
        try:
            if skip:
                done = sum(1 for _ in itertools.islice(plan, skip))
                if done < skip:
                    raise ValueError(f"resume state says worker {worker} consumed {skip} samples, but its share of "
                                     f"{cache.url} holds {done}; the state belongs to another cache or configuration")
                for p in sorted(buf.pending, key=lambda q: (q.shard, q.row_group, q.offset)):
                    store[p] = reader.fetch(p)
                decoding = True
            for index, (pos, nxt) in enumerate(_with_next(plan), start=skip):
                item = store.pop(pos)
                if item is _BAD:
                    counters.skipped_corrupt_rows += 1
                    continue
                sample = self._join(item, pos, counters)
                if sample is None:
                    continue
                sample["position"] = pos
                out = sample if self.transform is None else self.transform(sample)
                if not isinstance(out, dict):
                    raise ValueError(f"transform must return a dict, got {type(out).__name__}")
                out.update(position=pos, next_position=nxt, stream_index=index, worker_id=worker, num_workers=nw,
                           stream_stats=counters.snapshot())
                yield out
        finally:
            reader.close()

    def _mismatch(self, what: str) -> DataMismatchError:
        built = self.cache.manifest.data_source
        return DataMismatchError(f"{what}: the data file {self.records.description} differs from the one the cache "
                                 f"was built from ({built}); pass the original data")

    def _join(self, s: dict, pos: Position, counters: _Counters) -> dict | None:
        """Attach the record's images after checking the record is the one the cache was built from."""

        sid, i = s["sample_id"], int(s["sample_index"])
        if self.records is None:
            if len(s["visual_positions"]):
                raise ValueError(f"cached sample {sid!r} has {len(s['visual_positions'])} visual positions, got "
                                 "records=None; pass the original data (records=) so its images can be joined")
            s["images"] = []
            return s
        if not 0 <= i < len(self.records):
            raise self._mismatch(f"cached sample {sid!r} is record {i}, but the data holds {len(self.records)} records")
        try:
            record = self.records[i]
        except SkipSample as e:
            raise self._mismatch(f"cached sample {sid!r} is record {i}, which is unreadable now ({e})") from None
        have = sample_id_of(record, i)
        if have != sid:
            raise self._mismatch(f"cached sample at {pos} has sample_id {sid!r} (record {i}), but record {i} of the "
                                 f"data has id {have!r}")
        try:
            s["images"] = load_images(record, self.image_root)
        except SkipSample as e:
            if not self.skip_missing_images:
                raise MissingImageError(sid, e.reason, e.detail) from None
            counters.skipped_missing_image += 1
            log.warning("skipping cached sample %r: %s: %s", sid, e.reason, e.detail)
            return None
        return s


# --------------------------------------------------------------------------------------------- tags


def collate_tags(samples: Sequence[dict]) -> dict[str, list]:
    """The stream tags of a list of samples as lists, to keep in a collated batch for `mark_consumed`."""
    return {k: [s[k] for s in samples] for k in TAG_KEYS if samples and k in samples[0]}


def _as_position(p: Any) -> Position | None:
    if p is None or isinstance(p, Position):
        return p
    return Position(*(int(x) for x in p))


def _scalar(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) or (isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 0)


def _tags(batch: Any) -> list[dict]:
    """Normalise what `mark_consumed` accepts to one tag dict per sample."""
    if isinstance(batch, dict):
        missing = [k for k in ("stream_index", "worker_id", "num_workers") if k not in batch]
        if missing:
            raise ValueError(f"consumed samples must carry the stream tags {list(TAG_KEYS)}, missing {missing}; "
                             "keep them through collate (see collate_tags)")
        if _scalar(batch["stream_index"]):
            return [{k: batch[k] for k in TAG_KEYS if k in batch}]
        n = len(batch["stream_index"])
        cols = {k: list(batch[k]) for k in TAG_KEYS if k in batch}
        bad = {k: len(v) for k, v in cols.items() if len(v) != n}
        if bad:
            raise ValueError(f"stream tag lists must all have {n} entries, got {bad}")
        return [{k: v[j] for k, v in cols.items()} for j in range(n)]
    if isinstance(batch, (list, tuple)):
        return [t for s in batch for t in _tags(s)]
    raise ValueError(f"mark_consumed takes a sample, a list of samples or a dict of tag lists, "
                     f"got {type(batch).__name__}")
