"""Remote build output: `kd cache build --out s3://bucket/prefix` (any writable fsspec URL).

The build runs unchanged in a local *staging* folder (shards written to a temporary file, fsynced and renamed;
per-rank journals). This module mirrors that folder to the remote so that a reader of the remote never sees a
partial cache:

* a shard is uploaded as soon as it is complete locally and recorded in its rank's journal: straight to its final
  key on stores where one upload is atomic (S3 - multipart uploads too -, GCS, Azure, the Hugging Face hub: the
  object appears whole or not at all), else to a temporary key that is then moved. Its remote size is checked, the
  staged copy is deleted (staging holds only what is not uploaded yet) and then the journal is uploaded, so a
  remote journal never names a shard the remote lacks;
* a finishing rank uploads its `done` file, reads every rank's journal from the remote, checks that each shard
  they record is there with the recorded size, and uploads the dataset card and then the manifest, last;
* a rank that starts unfinished first deletes the `done` file an earlier run of it left on the remote (its shards
  may have been lost, its journal is about to be shortened): a finishing rank must never pair it with a shortened
  journal and write a short manifest.

One writer per rank across machines (kd_cache/remote_lock.py): besides the flock on its staging folder, each rank
holds the object `<url>/.kd-lock-r<RANK>-of-<WORLD>.json`, created before anything is uploaded (with a conditional
write on S3: `If-None-Match: *`) and deleted when the build ends; a second build of the URL is refused naming the
first. The object must still be this run's before each shard upload and before the `done` file and the manifest,
so two writers that got past it (stores without conditional writes) never write a manifest.

Resume: rerun the same command. Each rank takes its journal from staging or from the remote, whichever reaches
further once entries whose shard is in neither place are dropped; staged shards the remote lacks are uploaded
first. A lost staging folder (another machine, a wiped disk) therefore only costs the shards not uploaded yet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import uuid

import fsspec

from kd_cache import format as fmt
from kd_cache.errors import StorageError, describe, storage_errors
from kd_cache.files import atomic_write_text
from kd_cache.manifest import done_path, parse_done, try_finalize
from kd_cache.remote_lock import RemoteLock, is_lock_object
from kd_cache.writer import journal_path, parse_journal, read_journal

log = logging.getLogger("kd_cache")

# Stores where one upload is atomic: the object becomes visible complete or not at all.
ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "hf"})
READ_ONLY_PROTOCOLS = frozenset({"http", "https"})


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is an fsspec URL of something other than the local filesystem."""

    return fsspec.utils.get_protocol(str(path)) not in ("file", "local")


def default_staging(url: str) -> str:
    """A staging folder derived from the URL alone, so a rerun of the same command finds it again:
    `$KD_STAGING_DIR` (default `~/.cache/kd/staging`) / `<readable tail>-<sha256(url)[:12]>`."""
    url = str(url).rstrip("/")
    base = os.environ.get("KD_STAGING_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kd", "staging")
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1])[-64:].strip("_") or "cache"
    return os.path.join(base, f"{tail}-{hashlib.sha256(url.encode()).hexdigest()[:12]}")


def _rel_journal(rank: int, world: int) -> str:
    return f"{fmt.PROGRESS_DIR}/{os.path.basename(journal_path('', rank, world))}"


def _rel_done(rank: int, world: int) -> str:
    return f"{fmt.PROGRESS_DIR}/{os.path.basename(done_path('', rank, world))}"


def _end(entries: list[dict]) -> int:
    return entries[-1]["end"] if entries else 0


class RemoteOutput:
    """One rank's view of a remote output: its staging folder and the upload/finalize steps of `build()`."""

    def __init__(self, url: str, staging: str | None, rank: int, world_size: int):
        url = str(url).rstrip("/")
        if "::" in url:
            raise ValueError(f"out must be a plain URL to write to, not the chained URL {url!r}")
        protocol = fsspec.utils.get_protocol(url)
        if protocol in READ_ONLY_PROTOCOLS:
            raise ValueError(f"cannot write a cache to {url}: {protocol}:// is read-only; build to a folder, "
                             "s3://, gs://, hf://... and serve that")
        try:
            self.fs, root = fsspec.core.url_to_fs(url)
        except ImportError as e:
            raise ValueError(f"cannot write to {url}: {e} (for s3:// install the remote extra: "
                             "pip install 'kd-offline[remote]')") from None
        self.url, self.root = url, root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.atomic_put = bool(set(protocols) & ATOMIC_PUT_PROTOCOLS)
        self.staging = os.path.abspath(staging or default_staging(url))
        self.rank, self.world = rank, world_size
        self.lock: RemoteLock | None = None

    # ---- one writer per rank (kd_cache/remote_lock.py)
    def acquire_lock(self) -> None:
        """Take this rank's lock object on the URL (the caller holds the staging folder's flock); refuses, naming
        it, another build that holds it."""
        try:
            self.lock = RemoteLock(self.fs, self.root, self.url, self.staging, self.rank, self.world).acquire()
        except storage_errors() as e:
            if isinstance(e, StorageError):
                raise
            raise StorageError(f"cannot create the build lock at {self.url}: {describe(e)}") from e

    def release_lock(self) -> None:
        """Delete the lock object if it is still this run's (never raises)."""
        lock, self.lock = self.lock, None
        if lock is not None:
            lock.release()

    def _check_lock(self, what: str) -> None:
        if self.lock is not None:
            self.lock.check(what)

    def key(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    # ---- what is there
    def probe(self) -> tuple[dict | None, dict | None]:
        """(saved build configuration, manifest), each None when absent. Refuses a prefix that holds something
        other than a kd cache."""
        try:
            return self._probe()
        except storage_errors() as e:
            if isinstance(e, StorageError):
                raise
            raise StorageError(f"cannot read {self.url}: {describe(e)}") from e

    def _probe(self) -> tuple[dict | None, dict | None]:
        self.fs.invalidate_cache()
        # listed before the configuration is read: every rank uploads it before anything else, so a prefix another
        # rank starts writing meanwhile is either still empty here or has its configuration
        try:
            listed = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            listed = []
        # all a new hub repo holds, and the lock objects of builds that have not uploaded anything yet
        if all(posixpath.basename(p.rstrip("/")) == ".gitattributes" or is_lock_object(p) for p in listed):
            return None, None
        try:
            saved = json.loads(self.fs.cat_file(self.key(fmt.CONFIG_NAME)))
        except FileNotFoundError:
            raise ValueError(f"{self.url} is not empty and holds no kd cache; choose an empty prefix") from None
        try:
            manifest = json.loads(self.fs.cat_file(self.key(fmt.MANIFEST_NAME)))
        except FileNotFoundError:
            manifest = None
        return saved, manifest

    def shard_sizes(self) -> dict[str, int]:
        """{'shards/<name>.parquet': bytes} of the shard objects on the remote, from one listing."""
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(self.key(fmt.SHARD_DIR), detail=True)
        except FileNotFoundError:
            return {}
        return {f"{fmt.SHARD_DIR}/{posixpath.basename(p)}": int(info["size"]) for p, info in found.items()
                if p.endswith(".parquet") and info.get("type", "file") == "file"}

    def _staged(self, entry: dict) -> bool:
        path = os.path.join(self.staging, entry["shard"])
        return os.path.exists(path) and os.path.getsize(path) == entry["bytes"]

    # ---- uploads
    def put(self, local: str, rel: str) -> None:
        """Upload one file so that `rel` on the remote is either absent, the old object, or the whole new one;
        then check its size."""
        dst = self.key(rel)
        want = os.path.getsize(local)
        try:
            if self.atomic_put:
                self.fs.put_file(local, dst)
            else:
                self.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
                tmp = f"{dst}.tmp-{uuid.uuid4().hex[:12]}"
                self.fs.put_file(local, tmp)
                self.fs.mv(tmp, dst)
            self.fs.invalidate_cache(dst)
            have = self.fs.size(dst)
        except Exception as e:  # noqa: BLE001 - any failure of the store: name the file and where it was going
            raise StorageError(f"could not upload {rel} to {self.url}/{rel}: {describe(e)}") from e
        if have != want:
            raise StorageError(f"uploaded {rel} to {self.url}/{rel} but the object holds {have} bytes, not {want}")

    def _put_shard(self, entry: dict) -> None:
        local = os.path.join(self.staging, entry["shard"])
        if not self._staged(entry):
            raise StorageError(f"{entry['shard']} is recorded in {self.staging} but is neither staged there nor "
                               f"uploaded to {self.url}; rerun the build")
        self.put(local, entry["shard"])
        os.remove(local)

    def shard_written(self, entry: dict) -> None:
        """ShardWriter hook (writer thread), after the journal entry: upload the shard, then the journal."""
        if entry["shard"] is not None:
            self._check_lock(entry["shard"])
            self._put_shard(entry)
        self.put(journal_path(self.staging, self.rank, self.world), _rel_journal(self.rank, self.world))

    def sync(self) -> None:
        """Upload every shard this rank's staging journal records that the remote lacks, then the journal."""
        jpath = journal_path(self.staging, self.rank, self.world)
        sizes = self.shard_sizes()
        for e in read_journal(jpath, rank=self.rank, world_size=self.world):
            if e["shard"] is None:
                continue
            if sizes.get(e["shard"]) == e["bytes"]:
                if os.path.exists(os.path.join(self.staging, e["shard"])):
                    os.remove(os.path.join(self.staging, e["shard"]))
            else:
                self._put_shard(e)
        if os.path.exists(jpath):
            self.put(jpath, _rel_journal(self.rank, self.world))

    # ---- the build's steps
    def start(self, n_local: int) -> None:
        """Before this rank writes a shard (the staging folder holds the build configuration; the rank has
        `n_local` samples): no done file of an earlier run is left if the rank is not finished, the configuration
        is on the remote, this rank's staging journal is the furthest usable one, and everything it records is
        uploaded."""
        jpath = journal_path(self.staging, self.rank, self.world)
        local = read_journal(jpath, rank=self.rank, world_size=self.world, n_local=n_local)
        rel = _rel_journal(self.rank, self.world)
        try:
            remote = parse_journal(self.fs.cat_file(self.key(rel)), f"{self.url}/{rel}", rank=self.rank,
                                   world_size=self.world, n_local=n_local)
        except FileNotFoundError:
            remote = []
        sizes = self.shard_sizes()

        def usable(entries: list[dict]) -> list[dict]:
            kept = []
            for e in entries:
                if e["shard"] is not None and sizes.get(e["shard"]) != e["bytes"] and not self._staged(e):
                    log.warning("rank %d: %s is neither staged in %s nor at %s; resuming before it", self.rank,
                                e["shard"], self.staging, self.url)
                    break
                kept.append(e)
            return kept

        mine, theirs = usable(local), usable(remote)
        chosen = mine if _end(mine) >= _end(theirs) else theirs
        if _end(chosen) < n_local:  # not finished: before anything is uploaded (the shortened journal above all)
            self._remove_done()
        if not self.fs.exists(self.key(fmt.CONFIG_NAME)):
            self.put(os.path.join(self.staging, fmt.CONFIG_NAME), fmt.CONFIG_NAME)
        if chosen != local:
            if chosen is theirs:
                log.info("rank %d resumes from the journal at %s (%d samples done)", self.rank, self.url,
                         _end(chosen))
            atomic_write_text(jpath, "".join(json.dumps(e, sort_keys=True) + "\n" for e in chosen))
            done = done_path(self.staging, self.rank, self.world)
            if chosen is theirs and not os.path.exists(done):
                try:
                    data = self.fs.cat_file(self.key(_rel_done(self.rank, self.world)))
                    parse_done(data, self.rank, f"{self.url}/{_rel_done(self.rank, self.world)}")  # checked
                    atomic_write_text(done, data.decode())
                except FileNotFoundError:
                    pass
        self.sync()

    def _remove_done(self) -> None:
        """Delete this rank's done file on the remote and in staging (left by a run that had finished)."""
        key = self.key(_rel_done(self.rank, self.world))
        if self.fs.exists(key):
            log.warning("rank %d is not finished any more (shards lost?): removing its done file at %s", self.rank,
                        self.url)
            try:
                self.fs.rm_file(key)
            except FileNotFoundError:
                pass
            except Exception as e:  # noqa: BLE001
                raise StorageError(f"could not delete {_rel_done(self.rank, self.world)} at {self.url}: "
                                   f"{describe(e)}") from e
            self.fs.invalidate_cache(key)
        local = done_path(self.staging, self.rank, self.world)
        if os.path.exists(local):
            os.remove(local)

    def _cat(self, rel: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.key(rel))
        except FileNotFoundError:
            return None

    def complete(self, header: dict) -> dict | None:
        """After this rank's done file is in staging: upload what is left and, once every rank is done, the
        dataset card and then the manifest (only after checking every shard it lists is on the remote with the
        recorded size). Returns the manifest, or None while another rank is still running."""
        self._check_lock(f"its {_rel_done(self.rank, self.world)}")
        self.sync()
        self.put(done_path(self.staging, self.rank, self.world), _rel_done(self.rank, self.world))
        work = os.path.join(self.staging, f"_finalize-r{self.rank:05d}")
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(os.path.join(work, fmt.PROGRESS_DIR))
        self.fs.invalidate_cache()
        dones: dict[str, bytes | None] = {}
        for r in range(self.world):
            # done file first: it is uploaded after the rank's final journal, so the journal read next is final
            for rel in (_rel_done(r, self.world), _rel_journal(r, self.world)):
                data = self._cat(rel)
                if rel == _rel_done(r, self.world):
                    dones[rel] = data
                if data is not None:
                    with open(os.path.join(work, rel), "wb") as f:
                        f.write(data)
        # ... unless the rank was rerun meanwhile: it deletes its done file before it uploads a shortened journal,
        # so done files that are all there and unchanged after the journals were read pair with final journals
        if all(dones.values()):
            self.fs.invalidate_cache()
            changed = [rel for rel, data in dones.items() if self._cat(rel) != data]
            if changed:
                log.info("rank %d: %s changed while the journals were read (a rank restarted or finished); "
                         "that rank writes the manifest", self.rank, ", ".join(changed))
                shutil.rmtree(work, ignore_errors=True)
                return None
        sizes = self.shard_sizes()
        manifest = try_finalize(work, self.world, header, shard_present=lambda name, size: sizes.get(name) == size,
                                where=self.url)
        if manifest is None:
            shutil.rmtree(work, ignore_errors=True)
            return None
        self._check_lock(fmt.MANIFEST_NAME)  # two writers of this rank (stores without conditional writes): no manifest
        for entry in header.get("tokenizer_files", []):  # the teacher's tokenizer, written by every rank at its start
            self.put(os.path.join(self.staging, entry["name"]), entry["name"])
        self.put(os.path.join(work, fmt.CARD_NAME), fmt.CARD_NAME)
        self.put(os.path.join(work, fmt.MANIFEST_NAME), fmt.MANIFEST_NAME)
        shutil.rmtree(work, ignore_errors=True)
        if self.world == 1:  # the remote is complete; staging holds only journals (other ranks may share it)
            shutil.rmtree(self.staging, ignore_errors=True)
        return manifest
