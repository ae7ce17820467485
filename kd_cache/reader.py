"""Public reader API: `open_cache(path_or_url)`.

Reads local folders or any fsspec URL (http://, s3://, ...). Samples are decoded one Parquet row group at
a time, so memory is bounded by the row-group size, never by the shard or the cache. Remote shards are read with
range requests; with a read-through cache folder (`cache_dir=` or `$KD_CACHE_DIR`) each shard is instead
downloaded once, checked against the manifest's sha256 and read locally from then on.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from kd_cache import format as fmt
from kd_cache.codec import CachedSample, columns, decode_row, stored_row
from kd_cache.errors import missing_dependency
from kd_cache.files import atomic_write_bytes, sha256_stream
from kd_cache.format import Manifest, ShardEntry
from kd_cache.shards import READ_ERRORS, CorruptShardError, open_checked


def fs_and_root(path_or_url: str):
    """(fsspec filesystem, root path without a trailing slash) of a cache folder or URL."""
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
        self.fs, self.root = fs_and_root(self.url)
        if cache_dir is None:
            cache_dir = os.environ.get("KD_CACHE_DIR") or None
        # only remote caches go through the read-through cache; a local folder is read in place ("" turns it off)
        self.cache_dir = str(cache_dir) if cache_dir and not isinstance(self.fs, LocalFileSystem) else None
        try:
            self.manifest = Manifest.load(self.fs, self.root, where=f"{self.url}/{fmt.MANIFEST_NAME}")
        except FileNotFoundError:
            if isinstance(self.fs, LocalFileSystem) and not os.path.exists(self.root):
                raise FileNotFoundError(f"{self.url} does not exist: give the folder (or URL) of a kd cache, "
                                        "as `kd cache build --out` wrote it") from None
            raise FileNotFoundError(
                f"{self.url} is not a complete kd cache: {fmt.MANIFEST_NAME} is missing (the cache is incomplete: "
                "the build may still be running or was interrupted; rerun `kd cache build` to finish it)"
            ) from None
        self.version = self.manifest.version
        self.shards: tuple[ShardEntry, ...] = self.manifest.shards

    @property
    def text_spec(self) -> fmt.TargetSpec:
        return self.manifest.text

    @property
    def visual_spec(self) -> fmt.TargetSpec:
        return self.manifest.visual

    def __len__(self) -> int:
        return self.manifest.num_samples

    def __iter__(self) -> Iterator[dict]:
        for _, sample in self.iter_with_positions():
            yield sample

    def __repr__(self) -> str:
        return f"Cache({self.url!r}, samples={len(self)}, shards={len(self.shards)})"

    def shard_url(self, i: int) -> str:
        return f"{self.root}/{self.shards[i].name}"

    def shard_location(self, i: int):
        """(filesystem, path) to read shard i from: the cache's own (range requests on remote stores), or with a
        read-through cache folder a local copy, downloaded on first use and checked against the manifest."""
        if self.cache_dir is None or not self.shards[i].sha256:
            return self.fs, self.shard_url(i)
        return LocalFileSystem(), self._cached_copy(i)

    def _cached_copy(self, i: int) -> str:
        """Path of shard i in the read-through cache (named by its sha256, so caches share identical shards and a
        changed remote object can never be mistaken for the cached one)."""
        s = self.shards[i]
        sha = s.sha256  # checked as 64 hex digits by the manifest: safe as a local file name
        path = os.path.join(self.cache_dir, sha[:2], f"{sha}.parquet")
        if os.path.exists(path) and os.path.getsize(path) == s.bytes:
            return path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}.{os.urandom(4).hex()}"
        try:
            self.fs.get_file(self.shard_url(i), tmp)
            with open(tmp, "rb+") as f:
                got = sha256_stream(f)
                os.fsync(f.fileno())  # on disk before the rename makes it the cached copy (checked by size only)
            if got != sha:
                raise ValueError(f"{s.name}: the copy downloaded from {self.url} has sha256 {got}, "
                                 f"the manifest says {sha} (the object changed or is corrupt)")
            os.replace(tmp, path)  # concurrent readers (workers, ranks) may both download; each rename is whole
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    def open_shard_file(self, i: int, *, whole_file: bool = False,
                        verify_checksum: bool = False) -> tuple[Any, pq.ParquetFile]:
        """(file handle, ParquetFile) of shard i, its footer checked against the manifest (and with
        `verify_checksum` its sha256): `kd_cache.shards.open_checked`. The caller closes the handle."""
        fs, path = self.shard_location(i)
        return open_checked(fs, path, self.shards[i], self.manifest, whole_file=whole_file,
                            verify_checksum=verify_checksum)

    @contextlib.contextmanager
    def open_shard(self, i: int, *, verify_checksum: bool = False) -> Iterator[pq.ParquetFile]:
        """Shard i as a checked ParquetFile over a (range-reading) file handle, closed on exit."""
        fh, pf = self.open_shard_file(i, verify_checksum=verify_checksum)
        with fh:
            yield pf

    def iter_with_positions(self, start: Position | None = None,
                            shards: list[int] | None = None) -> Iterator[tuple[Position, dict]]:
        """Yield (position, sample) from `start` on, over `shards` (default all, in manifest order)."""
        order = list(range(len(self.shards))) if shards is None else list(shards)
        for si in order:
            if start is not None and si < start.shard:
                continue
            with self._named(si, "footer"):
                fh, pf = self.open_shard_file(si)
            with fh:
                for rg in range(pf.num_row_groups):
                    if start is not None and (si, rg) < (start.shard, start.row_group):
                        continue
                    with self._named(si, f"row group {rg}"):
                        cols = columns(pf.read_row_group(rg))
                    first = start.offset if start is not None and (si, rg) == (start.shard, start.row_group) else 0
                    for off in range(first, len(cols["sample_id"])):
                        with self._named(si, f"row group {rg} row {off}"):
                            sample = self.decode(stored_row(cols, off))
                        yield Position(si, rg, off), sample

    @contextlib.contextmanager
    def _named(self, i: int, where: str) -> Iterator[None]:
        """Errors of reading shard i become CorruptShardError naming the shard (a page CRC failure alone does not)."""
        try:
            yield
        except CorruptShardError:
            raise
        except READ_ERRORS as e:
            raise CorruptShardError(self.shards[i].name, f"{where}: {type(e).__name__}: {e}") from e

    def teacher_tokenizer_folder(self, dest: str | os.PathLike | None = None) -> str:
        """A local folder holding the teacher's tokenizer files the cache carries (format v3), each checked against
        the manifest's sha256: `transformers.AutoTokenizer.from_pretrained(folder)` decodes the cached ids without
        the teacher's repository. A local cache's own folder is returned as it is; a remote one's files are
        downloaded into `dest` (default: a new temporary folder)."""
        files = self.manifest.tokenizer_files
        if not files:
            raise ValueError(f"{self.url} carries no teacher tokenizer (format v{self.version}; kd writes it from format "
                             "v3 on): pass the teacher's tokenizer folder yourself, or rebuild the cache")
        if isinstance(self.fs, LocalFileSystem) and dest is None:
            folder = f"{self.root}/{fmt.TOKENIZER_DIR}"
            for f in files:
                got = sha256_stream(open(f"{self.root}/{f.name}", "rb"))
                if got != f.sha256:
                    raise ValueError(f"{f.name}: sha256 {got} differs from the manifest's {f.sha256}")
            return folder
        out = os.path.join(str(dest) if dest is not None else tempfile.mkdtemp(prefix="kd-teacher-tokenizer-"),
                           fmt.TOKENIZER_DIR)
        os.makedirs(out, exist_ok=True)
        for f in files:
            data = self.fs.cat_file(f"{self.root}/{f.name}")
            if hashlib.sha256(data).hexdigest() != f.sha256:
                raise ValueError(f"{f.name}: the copy downloaded from {self.url} differs from the manifest's sha256")
            atomic_write_bytes(os.path.join(out, f.name.split("/", 1)[1]), data)
        return out

    def decode(self, row: dict[str, Any]) -> CachedSample:
        """One stored row -> the documented sample dict of numpy arrays (dequantized, Gram dense)."""
        return decode_row(row, self.manifest.text, self.manifest.visual, self.version, self.manifest.gram_vocab)


def open_cache(path_or_url: str, cache_dir: str | os.PathLike | None = None) -> Cache:
    """Open a complete kd cache from a folder or an fsspec URL. See docs/cache-format.md.

    `cache_dir` (default `$KD_CACHE_DIR`): a local read-through cache for remote shards (see `Cache.shard_location`).
    """
    return Cache(path_or_url, cache_dir=cache_dir)
