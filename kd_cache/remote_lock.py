"""One writer per rank of a remote output: the lock object a `kd cache build --out <URL>` holds on its URL.

The local `BuildLock` (kd_cache/lock.py) is a flock on the staging folder: it excludes a second build on the same
machine, not one on another machine (another staging folder, only the bucket shared). So each rank of a remote
build also holds `<url>/.kd-lock-r<RANK>-of-<WORLD>.json`, an object recording who holds it (pid, host, start time,
command line, staging folder and a random run id), from before it uploads anything until it ends:

* **Created with a conditional write** where the store has one that fsspec exposes (`pipe_file(mode="create")`):
  S3 and S3-compatible stores through s3fs (`PutObject` with `If-None-Match: *`: the store answers 412 when the key
  exists, so of two builds starting together exactly one creates it) and fsspec's memory filesystem. Elsewhere
  (GCS, Azure, the hub, other fsspec stores) the lock is *best effort*: created after a check that it does not
  exist, then read back. A second build is refused with one message naming the holder and the object.
* **Checked again** before each shard upload and before this rank uploads its `done` file and the manifest: the
  object must still hold this run's id, and no lock of a build with another number of ranks may be there. A build
  whose lock was replaced (two builds that passed the existence check together on a store without conditional
  writes, or a lock deleted by hand while its build ran) stops with `RemoteLockLost` naming the other writer, and
  writes no manifest. This is the guarantee on stores without conditional writes: two writers are detected at the
  latest when one of them finalises. (Left open there: a shard upload already under way when the other build took
  the lock; run `kd cache verify` after such a collision.)
* **Released** (deleted, if it still holds this run's id) when the build ends, success or error.
* **No lease**: a store cannot tell whether the holder on another machine is alive, so a lock left by a build that
  died (kill -9, a lost machine) is never broken automatically; the message names the object to delete. One
  exception, provable locally: the build records the run id of the lock it creates in its staging folder
  (`.kd-remote-lock-r<RANK>-of-<WORLD>.json`), and a rerun on that staging folder holds the staging folder's flock,
  so the recorded run is dead; a lock object holding that run id is taken over (deleted, then created again with
  the conditional write). Resuming a crashed build is therefore: rerun the same command on the same machine.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import posixpath
import re
import time
import uuid

from kd_cache.files import atomic_write_text
from kd_cache.lock import BuildLocked, command_line, describe_holder, hostname

log = logging.getLogger("kd_cache")

LOCK_PREFIX = ".kd-lock-"
_LOCK_RE = re.compile(r"^\.kd-lock-r(\d+)-of-(\d+)\.json$")
RECORD_PREFIX = ".kd-remote-lock-"
# fsspec protocols whose `pipe_file(path, data, mode="create")` is an atomic create-if-absent (a conditional write)
CONDITIONAL_CREATE_PROTOCOLS = frozenset({"s3", "s3a", "memory"})


class RemoteLocked(BuildLocked):
    """Another build holds this rank's lock object on the URL (exit 2, one `error:` line naming it)."""


class RemoteLockLost(BuildLocked):
    """This build's lock object was replaced or deleted while it ran: another build writes the same URL."""


def lock_object_name(rank: int, world_size: int) -> str:
    return f"{LOCK_PREFIX}r{rank:05d}-of-{world_size:05d}.json"


def is_lock_object(name: str) -> bool:
    """Whether `name` (an object name or key) is a remote build lock."""
    return bool(_LOCK_RE.match(posixpath.basename(name.rstrip("/"))))


def conditional_create(fs) -> bool:
    """Whether kd creates lock objects on `fs` with a conditional write (see CONDITIONAL_CREATE_PROTOCOLS)."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool(set(protocols) & CONDITIONAL_CREATE_PROTOCOLS)


class RemoteLock:
    """This rank's lock object on a remote output: `acquire()`, `check(what)` while writing, `release()` at the end.

    `fs`/`root`: the store and the output's root key; `url`: the output URL (for messages); `staging`: this build's
    staging folder, whose flock the caller holds."""

    def __init__(self, fs, root: str, url: str, staging: str, rank: int = 0, world_size: int = 1):
        self.fs, self.root, self.url, self.staging = fs, root.rstrip("/"), url.rstrip("/"), staging
        self.rank, self.world = rank, world_size
        name = lock_object_name(rank, world_size)
        self.key, self.object_url = f"{self.root}/{name}", f"{self.url}/{name}"
        self.record = os.path.join(staging, f"{RECORD_PREFIX}r{rank:05d}-of-{world_size:05d}.json")
        self.conditional = conditional_create(fs)
        self.info = {"run_id": uuid.uuid4().hex, "pid": os.getpid(), "host": hostname(),
                     "started": round(time.time(), 3), "rank": rank, "world_size": world_size,
                     "command": command_line(), "staging": staging}
        self.held = False

    @property
    def run_id(self) -> str:
        return self.info["run_id"]

    # ---- acquire
    def acquire(self) -> "RemoteLock":
        previous = self._read_record()  # the run id of this staging folder's earlier run (dead: we hold its flock)
        for _ in range(5):
            holder = self._read()
            if holder is not None:
                if not previous or holder.get("run_id") != previous:
                    raise RemoteLocked(self._locked_message(holder), holder)
                log.warning("rank %d: taking over the remote build lock %s left by %s: the earlier run of this "
                            "staging folder, which is gone (killed?); this one resumes it", self.rank,
                            self.object_url, describe_holder(holder))
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self.key)
                self._invalidate()
            self._write_record()  # before the object: a crash right after creating it leaves a lock we can take over
            try:
                self._create()
            except FileExistsError:  # created by another build since we looked: named on the next pass
                continue
            mine = self._read()
            if (mine or {}).get("run_id") != self.run_id:  # a store that ignored the condition, or a race without one
                raise RemoteLocked(f"two builds started writing {self.url} at once; {self.object_url} now holds "
                                   f"the other one's lock ({describe_holder(mine or {})}), so this one stops. "
                                   f"{self._hint()}", mine)
            self.held = True
            try:
                self._check_world_sizes()
            except BaseException:
                self.release()
                raise
            return self
        raise RemoteLocked(f"could not create {self.object_url}: it keeps being created and deleted by other "
                           f"builds of {self.url}. {self._hint()}")

    def _create(self) -> None:
        data = (json.dumps(self.info, sort_keys=True) + "\n").encode()
        if self.conditional:
            try:
                self.fs.pipe_file(self.key, data, mode="create")
                return
            except FileExistsError:
                raise
            except (NotImplementedError, OSError) as e:
                if isinstance(e, OSError) and e.errno == errno.EINVAL and self._read() is not None:
                    raise FileExistsError(self.key) from e  # s3fs: a 412 that does not name its condition
                if isinstance(e, OSError) and e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                log.warning("%s does not support conditional writes (%s): its build lock is best effort (checked "
                            "before it is written and read back)", self.url, e)
                self.conditional = False
        self.fs.pipe_file(self.key, data)  # best effort: `acquire` found no object just before
        self._invalidate()

    def _check_world_sizes(self) -> None:
        """Refuse while a build with another number of ranks holds a lock on the URL."""
        self._invalidate()
        try:
            names = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return
        for path in sorted(names):
            m = _LOCK_RE.match(posixpath.basename(path.rstrip("/")))
            if not m or int(m.group(2)) == self.world:
                continue
            holder = self._read(path) or {}
            raise RemoteLocked(
                f"{self.url} is being built by another `kd cache build` with {int(m.group(2))} rank(s) (rank "
                f"{int(m.group(1))} is {describe_holder(holder)}); this one has {self.world}. Wait for it to finish "
                f"or stop it; if it is gone, delete {self.url}/{posixpath.basename(path.rstrip('/'))}", holder)

    # ---- while writing
    def check(self, what: str) -> None:
        """Before writing `what` (a shard, the manifest): this rank's lock object must still be this run's, and no
        build with another number of ranks may hold one. Raises RemoteLockLost otherwise."""
        if not self.held:
            return
        holder = self._read()
        if holder is not None and holder.get("run_id") == self.run_id:
            try:
                self._check_world_sizes()
            except RemoteLocked as e:
                raise RemoteLockLost(f"{e}; not writing {what}", e.holder) from None
            return
        self.held = False  # not ours any more: never deleted by this build
        if holder is None:
            why = (f"its lock object {self.object_url} was deleted while it ran (by hand, or by another build), so "
                   "another build may be writing there too")
        else:
            why = (f"{describe_holder(holder)} replaced its lock object {self.object_url} (staging folder "
                   f"{holder.get('staging', '?')}): two builds are writing it")
        raise RemoteLockLost(f"this build of {self.url} (rank {self.rank} of {self.world}) stops before writing "
                             f"{what}: {why}. Stop the other build (or wait for it to finish), then rerun this "
                             "command; run `kd cache verify` on the result", holder)

    # ---- release
    def release(self) -> None:
        """Delete the lock object if it still holds this run's id, then the staging record. Never raises (it runs
        while an error may be propagating); a lock it could not delete is named in the log."""
        if not self.held:
            return
        self.held = False
        try:
            holder = self._read()
            if holder is not None and holder.get("run_id") == self.run_id:
                self.fs.rm_file(self.key)
                self._invalidate()
            elif holder is not None:
                log.warning("rank %d: %s now holds the lock of %s; left in place", self.rank, self.object_url,
                            describe_holder(holder))
        except Exception as e:  # noqa: BLE001 - keep the record: a rerun on this staging folder takes the lock over
            log.warning("rank %d: could not delete the build lock %s (%s); a rerun of this command on this machine "
                        "takes it over, or delete it by hand", self.rank, self.object_url, e)
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.record)

    def __enter__(self) -> "RemoteLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- helpers
    def _invalidate(self) -> None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self.root)

    def _read(self, key: str | None = None) -> dict | None:
        """The lock object's JSON ({} when unreadable), None when absent."""
        try:
            data = self.fs.cat_file(key or self.key)
        except FileNotFoundError:
            return None
        try:
            info = json.loads(data)
        except ValueError:
            return {}
        return info if isinstance(info, dict) else {}

    def _read_record(self) -> str | None:
        try:
            with open(self.record) as f:
                return json.load(f).get("run_id")
        except (OSError, ValueError, AttributeError):
            return None

    def _write_record(self) -> None:
        os.makedirs(self.staging, exist_ok=True)
        atomic_write_text(self.record, json.dumps({"run_id": self.run_id, "url": self.url, "lock": self.object_url},
                                                  sort_keys=True))

    def _hint(self) -> str:
        how = f" (`aws s3 rm {self.object_url}`)" if self.object_url.startswith(("s3://", "s3a://")) else ""
        return (f"If that build is gone (killed, its machine lost), delete {self.object_url}{how} and rerun; "
                "rerunning the command on the machine and staging folder of that build instead resumes it and takes "
                "its lock over")

    def _locked_message(self, holder: dict) -> str:
        rank = f" (rank {self.rank} of {self.world})" if self.world > 1 else ""
        staging = f", staging folder {holder['staging']}" if holder.get("staging") else ""
        return (f"{self.url} is already being written by another `kd cache build`{rank}: {describe_holder(holder)}"
                f"{staging}. Wait for it to finish or stop it (a build deletes its lock object {self.object_url} when "
                f"it ends, on an error or Ctrl-C too; a killed one leaves it). {self._hint()}")
