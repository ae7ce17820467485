"""One writer per folder and rank: the lock `kd cache build` holds on its cache folder and `kd train` on its --out.

Two builds or two trainings writing the same folder (two teammates, a double-submitted job) would delete each
other's files and interleave their journals, checkpoints and metrics. Each rank of a build or training therefore
holds, for the whole command, an exclusive `fcntl.flock` on `<folder>/.lock-r<RANK>-of-<WORLD>` (for a build to a
URL, in its staging folder), a file that also records who holds it (tool, pid, host, start time, command line) so a
second command is refused with a message naming the first. `BuildLock` and `TrainLock` are `FolderLock` with
their own wording; both use the same file names, so a build and a training in the same folder exclude each other.

* **Per rank, not per folder**: the ranks of one `torchrun` / `accelerate launch` / `srun` launch share the folder,
  so they must not exclude each other; two launches of the *same* rank do. A second launch therefore fails on its
  first rank that is still running in the first launch, and re-running one dead build rank alone
  (`RANK=3 WORLD_SIZE=32 ...`) works while the others keep running. A launch with another number of ranks is
  refused while any rank of this one holds its lock (two launches starting together may both be refused).
* **Taken first**: before the command writes or deletes anything in the folder (`kd train --overwrite` included),
  and held until it ends (success, error, Ctrl-C); the lock file is then removed, and so are the folders the lock
  created if nothing else was written there. Lock files (`is_lock_file`) are not output: the commands' "is this
  folder empty / a run of mine" checks skip them, `--overwrite` keeps them, and nothing copies them (a training's
  `final/` and checkpoints are subfolders; remote builds upload named files only).
* **Stale locks**: the kernel releases a flock when its holder dies, kill -9 included, so a lock file whose lock
  nobody holds is stale whatever it records; the next command takes it over and logs whose it was. Forked children
  (DataLoader workers) close their copy of the descriptor, so a killed command's workers cannot keep it locked.
* Filesystems without flock (some Lustre mounts, old NFS): the file is created with O_CREAT|O_EXCL instead and is
  stale when it names a process of this host that no longer exists; a lock of another host is never broken
  automatically (the message says which file to delete).

The lock is local to the filesystem that holds the folder: two builds of the same `s3://` URL on two machines
have two staging folders and are not excluded by it. For URL outputs each rank therefore also holds a lock object
on the URL, `<url>/.kd-lock-r<RANK>-of-<WORLD>.json` (kd_cache/remote_lock.py): created with a conditional write
on S3 (`If-None-Match: *`), best effort elsewhere, and checked again before each shard upload and before the
manifest, so two writers of one URL are refused at start or, at the latest, never write a manifest. It has no
lease: a lock left by a build that died on another machine is named in the refusal for deletion by hand, while a
rerun on the dead build's own staging folder (holding this flock) takes it over. docs/scaling.md, "Several
writers", says which store gets which guarantee.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shlex
import socket
import sys
import time

log = logging.getLogger("kd_cache")

LOCK_PREFIX = ".lock-"
_LOCK_RE = re.compile(r"^\.lock-r(\d+)-of-(\d+)$")
# flock unsupported by the filesystem: fall back to O_CREAT|O_EXCL plus the pid check
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}

_held_fds: set[int] = set()  # flock descriptors this process holds: closed in forked children


def _close_in_child() -> None:
    for fd in list(_held_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class FolderLocked(ValueError):
    """Another command holds this rank's lock; the message names it (pid, host, start time, command line).

    A ValueError so the CLI prints it as one `error: ...` line (exit 2), like a bad --out."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder or {}


BuildLocked = FolderLocked  # the name kd cache build's callers know


def hostname() -> str:
    return socket.gethostname() or "localhost"


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return True
    try:  # a zombie (killed, not reaped yet) holds nothing any more
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def lock_name(rank: int, world_size: int) -> str:
    return f"{LOCK_PREFIX}r{rank:05d}-of-{world_size:05d}"


def is_lock_file(name: str) -> bool:
    """Whether `name` (a file name in a cache or training folder) is a lock file of this module."""
    return bool(_LOCK_RE.match(os.path.basename(name)))


def command_line() -> str:
    """This process's command line as the user typed it (`kd ...`), for a lock's holder record."""
    argv = list(sys.argv) or [sys.executable]
    if argv and argv[0].endswith(("kd_cli/main.py", "cli/main.py")):
        argv[0] = "kd"
    return " ".join(shlex.quote(a) for a in argv)[:2000]


def _read_info(path: str) -> dict:
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return {}
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


def describe_holder(info: dict) -> str:
    """'pid 123 on host h, started 2026-01-01 10:00:00 UTC (5 min ago), command: kd train ...'"""
    if not info:
        return "a process that has not recorded itself yet"
    parts = [f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"]
    started = info.get("started")
    if isinstance(started, (int, float)):
        ago = max(0.0, time.time() - started)
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))
        parts.append(f"started {when} ({_ago(ago)} ago)")
    if info.get("command"):
        parts.append(f"command: {info['command']}")
    return ", ".join(parts)


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class FolderLock:
    """This rank's lock on a folder: acquired on construction (creating the folder), `release()` when done.

    Raises FolderLocked naming the holder when another live process holds the same rank's lock, or when a launch
    with another number of ranks holds one in the same folder. Subclasses name the command that locks (`tool`, also
    recorded in the file), what a run of it is called (`noun`) and what rerunning it after a stop does (`rerun`).
    """

    tool = "kd"
    noun = kind = "command"
    rerun = "rerunning the command then resumes where it stopped"

    def __init__(self, folder: str, rank: int = 0, world_size: int = 1, *, what: str = "output folder",
                 wait_seconds: float = 10.0):
        self.folder, self.rank, self.world = str(folder), rank, world_size
        self.what = what
        self.path = os.path.join(self.folder, lock_name(rank, world_size))
        self.fd: int | None = None
        self.flock = True
        self.info = {"pid": os.getpid(), "host": hostname(), "started": round(time.time(), 3),
                     "rank": rank, "world_size": world_size, "command": command_line(), "tool": self.tool}
        self.created: list[str] = []  # folders the lock made, deepest first: removed at release if still empty
        self._make_folder()
        try:
            self._acquire(wait_seconds)
            self._check_other_world_sizes()
        except BaseException:
            self.release()
            raise

    def _make_folder(self) -> None:
        missing, path = [], os.path.abspath(self.folder)
        while not os.path.exists(path) and os.path.dirname(path) != path:
            missing.append(path)
            path = os.path.dirname(path)
        os.makedirs(self.folder, exist_ok=True)
        self.created += [p for p in missing if p not in self.created]

    # ---- acquire
    def _acquire(self, wait_seconds: float) -> None:
        t0 = time.monotonic()
        while True:
            holder = self._try_flock() if self.flock else self._try_exclusive_create()
            if holder is None:
                return
            # Held. Retried for half a second (another command probing this lock holds it for an instant), and for
            # up to `wait_seconds` when the recorded holder is a process of this host that is gone: whatever still
            # holds its lock is exiting (a killed command's children).
            gone = holder.get("host") == hostname() and isinstance(holder.get("pid"), int) \
                and not process_alive(holder["pid"])
            if time.monotonic() - t0 < (wait_seconds if gone else 0.5):
                time.sleep(0.1)
                continue
            raise FolderLocked(self._locked_message(holder), holder)

    def _try_flock(self) -> dict | None:
        """None when acquired, else the holder's info."""
        import fcntl  # POSIX only: deferred so that the module (and the reader) imports everywhere

        while True:
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileNotFoundError:  # the folder was removed meanwhile (a failed rank of this launch released it)
                self._make_folder()
                continue
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:  # removed meanwhile by a releasing holder
                    continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return self._holder_info()
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    os.close(fd)
                    raise
                log.info("%s does not support flock (%s); locking with an exclusive file instead", self.folder,
                         e.strerror)
                self.flock = False
                if created:  # created with O_EXCL: already the exclusive file
                    _write_fd(fd, self.info)
                    self.fd = fd
                    return None
                os.close(fd)
                return self._try_exclusive_create()
            # the file may have been removed (a releasing holder) between open and flock: lock the current file
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read_fd(fd)
            if previous:
                log.warning("rank %d: took over the stale %s lock %s of %s: that %s is gone (killed?) and this one "
                            "resumes it", self.rank, self.kind, self.path, describe_holder(previous), self.noun)
            _write_fd(fd, self.info)
            self.fd = fd
            _held_fds.add(fd)
            return None

    def _try_exclusive_create(self) -> dict | None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:  # the folder was removed meanwhile (see _try_flock)
                self._make_folder()
                continue
            except FileExistsError:
                holder = self._holder_info()
                if holder.get("host") == hostname() and isinstance(holder.get("pid"), int) \
                        and not process_alive(holder["pid"]):
                    log.warning("rank %d: removing the stale %s lock %s of %s: that process is gone (killed?)",
                                self.rank, self.kind, self.path, describe_holder(holder))
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path)
                    continue
                return holder
            _write_fd(fd, self.info)
            self.fd = fd
            return None
        return self._holder_info()

    def _holder_info(self) -> dict:
        for _ in range(10):  # a holder that just created the file writes its info right after
            info = _read_info(self.path)
            if info:
                return info
            time.sleep(0.05)
        return {}

    def _check_other_world_sizes(self) -> None:
        """Refuse while a launch with another number of ranks holds a lock here."""
        try:
            names = os.listdir(self.folder)
        except OSError:
            return
        for name in sorted(names):
            m = _LOCK_RE.match(name)
            if not m or int(m.group(2)) == self.world:
                continue
            path = os.path.join(self.folder, name)
            holder = _read_info(path)
            if self.flock:
                held = _flock_held(path)
            else:
                held = bool(holder) and not (holder.get("host") == hostname()
                                             and not process_alive(int(holder.get("pid") or 0)))
            if held:
                raise FolderLocked(
                    f"{self.what} {self.folder} is being written by another `{holder.get('tool') or self.tool}` with "
                    f"{int(m.group(2))} rank(s) (rank {int(m.group(1))} is {describe_holder(holder)}); this one has "
                    f"{self.world}. Wait for it to finish, stop it, or choose another --out", holder)

    def _locked_message(self, holder: dict) -> str:
        rank = f" (rank {self.rank} of {self.world})" if self.world > 1 else ""
        hint = f"Wait for it to finish or stop it (a stopped or killed {self.noun} releases its lock; {self.rerun}), " \
               "or choose another --out"
        if not self.flock:
            hint += f"; if that process is gone, delete {self.path}"
        return (f"{self.what} {self.folder} is already being written by another `{holder.get('tool') or self.tool}`"
                f"{rank}: {describe_holder(holder)}. {hint}")

    # ---- release
    def release(self) -> None:
        """Remove the lock file (if it is still ours) and unlock; remove the folders the lock created too while they
        are empty. Idempotent."""
        fd, self.fd = self.fd, None
        if fd is not None:
            _held_fds.discard(fd)
            try:
                # unlink before unlocking: a waiter that opened the old file sees its inode gone and retries
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    os.remove(self.path)
            except OSError:
                pass  # already gone (a finished remote build removes its staging folder)
            finally:
                os.close(fd)
        created, self.created = self.created, []
        for path in created:
            try:
                os.rmdir(path)
            except FileNotFoundError:
                continue
            except OSError:  # not empty: the command wrote there, or another rank's lock is in it
                break

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class BuildLock(FolderLock):
    """A `kd cache build` rank's lock on its cache (or staging) folder."""

    tool, noun, kind = "kd cache build", "build", "build"
    rerun = "rerunning the command then resumes where it stopped"


class TrainLock(FolderLock):
    """A `kd train` rank's lock on its --out folder."""

    tool, noun, kind = "kd train", "run", "training"
    rerun = "rerunning the command then resumes from its last checkpoint"


def _flock_held(path: str) -> bool:
    """Whether some process holds the flock on `path` (probed without blocking; released at once)."""
    import fcntl  # POSIX only (see FolderLock._try_flock)

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def _read_fd(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        info = json.loads(data.decode()) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _write_fd(fd: int, info: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(info, sort_keys=True) + "\n").encode())
    with contextlib.suppress(OSError):
        os.fsync(fd)


def stale_temp(path: str, *, own: bool = False, max_age: float = 600.0) -> bool:
    """Whether `<file>.tmp.<pid>[.<host>]` (left by `atomic_write_text`) is stale: `own` (this rank's file, and this
    rank's lock is held, so no live writer can own it), or written by a process of this host that is gone, or older
    than `max_age` seconds (an atomic write takes milliseconds; covers other hosts and old names without a host)."""
    m = re.search(r"\.tmp\.(\d+)(?:\.([^/\\]+))?$", path)
    if not m:
        return False
    if own:
        return True
    pid, host = int(m.group(1)), m.group(2)
    if host == _safe_host() and not process_alive(pid):
        return True
    try:
        return time.time() - os.path.getmtime(path) > max_age
    except OSError:
        return False


def _safe_host() -> str:
    """The host as it appears in temporary file names (no path separators)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", hostname())
