"""Public reader API: `open_cache(path_or_url)`.

Reads local folders or any fsspec URL (http://, s3://, ...). Samples are decoded one Parquet row group at
a time, so memory is bounded by the row-group size, never by the shard or the cache. Remote shards are read with
range requests; with a read-through cache folder (`cache_dir=` or `$KD_CACHE_DIR`) each shard is instead
downloaded once, checked against the manifest's sha256 and read locally from then on.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from kd_cache import format as fmt
from kd_cache.codec import CachedSample, columns, decode_row, row_of
from kd_cache.errors import missing_dependency
from kd_cache.files import sha256_stream

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def _fs_and_root(path_or_url: str):
    try:
        fs, root = fsspec.core.url_to_fs(str(path_or_url))
    except ImportError as e:  # e.g. http:// without aiohttp: name the extra that brings it

        raise missing_dependency(str(path_or_url), e) from None
    return fs, root.rstrip("/")


@dataclass(frozen=True)
class Position:
    """Where a sample sits in the cache: the resume state a trainer saves."""

    shard: int
    row_group: int
    offset: int


class Cache:
    """A complete cache (its manifest exists). `len()` is the number of cached samples."""

    def __init__(self, path_or_url: str, cache_dir: str | os.PathLike | None = None):
        self.url = str(path_or_url)
        self.fs, self.root = _fs_and_root(self.url)
        if cache_dir is None:
            cache_dir = os.environ.get("KD_CACHE_DIR") or None
        # only remote caches go through the read-through cache; a local folder is read in place
        self.cache_dir = None if cache_dir is None or isinstance(self.fs, LocalFileSystem) else str(cache_dir)
        manifest_path = f"{self.root}/{fmt.MANIFEST_NAME}"
        if not self.fs.exists(manifest_path):
            raise FileNotFoundError(
                f"{self.url} is not a complete kd cache: {fmt.MANIFEST_NAME} is missing "
                "(the build may still be running or was interrupted; rerun `kd cache build` to finish it)"
            )
        with self.fs.open(manifest_path, "rb") as f:
            self.manifest: dict = json.load(f)
        self.version = fmt.check_version(self.manifest.get("format_version"), f"{self.url}/{fmt.MANIFEST_NAME}")
        targets = self.manifest["targets"]
        self.text_spec = fmt.TargetSpec.from_dict(targets["text"])
        self.visual_spec = fmt.TargetSpec.from_dict(targets["visual"])
        for name, spec in (("text", self.text_spec), ("visual", self.visual_spec)):
            if spec.kind not in fmt.KNOWN_TARGET_KINDS:
                raise ValueError(
                    f"{self.url}: {name} target kind {spec.kind!r} is not known to this kd "
                    f"(known: {list(fmt.KNOWN_TARGET_KINDS)}); upgrade kd"
                )
        self.shards: list[dict] = self.manifest["shards"]
        self.gram_vocab = int(targets.get("gram", {}).get("vocab_size", self.manifest["vocab_size"]))
        if self.cache_dir is not None:  # sha256 values become local paths: refuse anything but hex digests
            for i in range(len(self.shards)):
                self._sha256(i)

    def __len__(self) -> int:
        return int(self.manifest["num_samples"])

    def __iter__(self) -> Iterator[dict]:
        for _, sample in self.iter_with_positions():
            yield sample

    def __repr__(self) -> str:
        return f"Cache({self.url!r}, samples={len(self)}, shards={len(self.shards)})"

    def shard_url(self, i: int) -> str:
        return f"{self.root}/{self.shards[i]['name']}"

    def shard_location(self, i: int):
        """(filesystem, path) to read shard i from: the cache's own (range requests on remote stores), or with a
        read-through cache folder a local copy, downloaded on first use and checked against the manifest."""
        s = self.shards[i]
        if self.cache_dir is None or not s.get("sha256"):
            return self.fs, self.shard_url(i)

        return LocalFileSystem(), self._cached_copy(i)

    def _sha256(self, i: int) -> str | None:
        """Shard i's sha256 from the manifest (lower-case), None if it has none; a malformed value is refused."""
        sha = self.shards[i].get("sha256")
        if not sha:
            return None
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise ValueError(f"{self.url}/{fmt.MANIFEST_NAME} is malformed: shard {self.shards[i].get('name')!r} has "
                             f"sha256 {sha!r}, not 64 hexadecimal characters")
        return sha.lower()

    def _cached_copy(self, i: int) -> str:
        """Path of shard i in the read-through cache (named by its sha256, so caches share identical shards and a
        changed remote object can never be mistaken for the cached one)."""
        s = self.shards[i]
        sha = self._sha256(i)
        path = os.path.join(self.cache_dir, sha[:2], f"{sha}.parquet")
        if os.path.exists(path) and os.path.getsize(path) == int(s["bytes"]):
            return path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}.{os.urandom(4).hex()}"
        try:
            self.fs.get_file(self.shard_url(i), tmp)
            with open(tmp, "rb+") as f:
                got = sha256_stream(f)
                os.fsync(f.fileno())  # on disk before the rename makes it the cached copy (checked by size only)
            if got != sha:
                raise ValueError(f"{s['name']}: the copy downloaded from {self.url} has sha256 {got}, "
                                 f"the manifest says {sha} (the object changed or is corrupt)")
            os.replace(tmp, path)  # concurrent readers (workers, ranks) may both download; each rename is whole
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @contextlib.contextmanager
    def open_shard(self, i: int) -> Iterator[pq.ParquetFile]:
        """The shard as a ParquetFile over a (range-reading) file handle, closed on exit."""
        fs, path = self.shard_location(i)
        with fs.open(path, "rb") as fh:
            yield pq.ParquetFile(fh, **fmt.READ_OPTIONS)

    def iter_with_positions(self, start: Position | None = None,
                            shards: list[int] | None = None) -> Iterator[tuple[Position, dict]]:
        """Yield (position, sample) from `start` on, over `shards` (default all, in manifest order)."""
        order = list(range(len(self.shards))) if shards is None else list(shards)
        for si in order:
            if start is not None and si < start.shard:
                continue
            with self.open_shard(si) as pf:
                for rg in range(pf.num_row_groups):
                    if start is not None and (si, rg) < (start.shard, start.row_group):
                        continue
                    table = pf.read_row_group(rg)
                    cols = columns(table)
                    first = start.offset if start is not None and (si, rg) == (start.shard, start.row_group) else 0
                    for off in range(first, table.num_rows):
                        yield Position(si, rg, off), self.decode(row_of(cols, off))

    def decode(self, row: dict[str, Any]) -> CachedSample:
        """One stored row -> the documented sample dict of numpy arrays (dequantized, Gram dense)."""
        return decode_row(row, self.text_spec, self.visual_spec, self.version, self.gram_vocab)


def open_cache(path_or_url: str, cache_dir: str | os.PathLike | None = None) -> Cache:
    """Open a complete kd cache from a folder or an fsspec URL. See docs/cache-format.md.

    `cache_dir` (default `$KD_CACHE_DIR`): a local read-through cache for remote shards (see `Cache.shard_location`).
    """
    return Cache(path_or_url, cache_dir=cache_dir)
