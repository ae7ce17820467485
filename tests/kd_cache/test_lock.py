"""One writer per cache rank (kd_cache/lock.py) and the stale temporary files a killed build leaves.

The builds racing as real processes (a second build refused while the first holds the folder, kill -9 then a
rerun) are in test_resume_multiproc.py; here the lock itself, in-process and with small helper processes.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kd_cache import format as fmt
from kd_cache import lock as lockmod
from kd_cache.lock import BuildLock, BuildLocked, is_lock_file, lock_name
from kd_cache.files import atomic_write_text, remove_stale_temps

HOST = lockmod._safe_host()


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_held_rank_is_refused_naming_its_holder_and_released_at_the_end(tmp_path):
    folder = tmp_path / "cache"
    first = BuildLock(str(folder), 0, 1)
    path = folder / lock_name(0, 1)
    info = json.loads(path.read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["command"]
    with pytest.raises(BuildLocked) as e:
        BuildLock(str(folder), 0, 1)
    msg = str(e.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in msg and "started " in msg and "ago" in msg
    assert f"command: {info['command']}" in msg and str(folder) in msg and "Wait for it to finish" in msg
    assert isinstance(e.value, ValueError)  # the CLI prints one `error:` line, exit 2
    first.release()
    assert not path.exists()  # nothing left in the cache
    BuildLock(str(folder), 0, 1).release()  # free again
    first.release()  # idempotent


def test_ranks_of_one_launch_share_the_folder_but_not_a_rank_and_not_another_world_size(tmp_path):
    r0, r1 = BuildLock(str(tmp_path), 0, 2), BuildLock(str(tmp_path), 1, 2)
    with pytest.raises(BuildLocked, match=r"\(rank 1 of 2\)"):
        BuildLock(str(tmp_path), 1, 2)  # the same rank launched twice
    with pytest.raises(BuildLocked, match="with 2 rank"):
        BuildLock(str(tmp_path), 0, 1)  # a one-process build while the 2-process one runs
    assert sorted(os.listdir(tmp_path)) == [lock_name(0, 2), lock_name(1, 2)]
    r0.release()
    r1.release()
    BuildLock(str(tmp_path), 0, 1).release()
    assert os.listdir(tmp_path) == []
    assert is_lock_file(lock_name(3, 8)) and not is_lock_file("manifest.json")


def test_a_lock_file_nobody_holds_is_stale_and_taken_over_with_a_log_line(tmp_path, caplog):
    gone = {"pid": dead_pid(), "host": socket.gethostname(), "started": time.time() - 60, "command": "kd cache build x"}
    (tmp_path / lock_name(0, 1)).write_text(json.dumps(gone))  # what kill -9 leaves: the file, no flock
    with caplog.at_level("WARNING", logger="kd_cache"):
        lock = BuildLock(str(tmp_path), 0, 1)
    assert f"took over the stale build lock" in caplog.text and f"pid {gone['pid']}" in caplog.text
    assert json.loads((tmp_path / lock_name(0, 1)).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_killed_builds_forked_children_do_not_keep_its_lock(tmp_path):
    """flock is shared with forked children (DataLoader workers); they close their copy, so kill -9 of the build
    frees the lock at once even while its children live on."""
    child_pid = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import os, signal, time
        from kd_cache.lock import BuildLock
        lock = BuildLock({str(tmp_path / 'cache')!r}, 0, 1)
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        open({str(child_pid)!r}, "w").write(str(pid))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd(), timeout=60)
    assert proc.returncode == -signal.SIGKILL
    pid = int(child_pid.read_text())
    try:
        assert lockmod.process_alive(pid)  # the child still runs...
        t0 = time.monotonic()
        BuildLock(str(tmp_path / "cache"), 0, 1, wait_seconds=0).release()  # ... and the lock is free
        assert time.monotonic() - t0 < 1
    finally:
        os.kill(pid, signal.SIGKILL)


def test_without_flock_an_exclusive_file_is_used_and_only_dead_local_holders_are_broken(tmp_path, monkeypatch, caplog):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = BuildLock(str(tmp_path), 0, 1)
    assert not lock.flock
    with pytest.raises(BuildLocked, match=f"pid {os.getpid()}.*if that process is gone, delete"):
        BuildLock(str(tmp_path), 0, 1, wait_seconds=0)
    lock.release()
    path = tmp_path / lock_name(0, 1)
    assert not path.exists()
    path.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "started": time.time()}))
    with caplog.at_level("WARNING", logger="kd_cache"):
        BuildLock(str(tmp_path), 0, 1).release()  # a dead process of this host: stale
    assert "removing the stale build lock" in caplog.text
    path.write_text(json.dumps({"pid": 1, "host": "another-host", "started": time.time()}))
    with pytest.raises(BuildLocked, match="another-host"):
        BuildLock(str(tmp_path), 0, 1, wait_seconds=0)  # another host's: never broken automatically


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / fmt.MANIFEST_NAME
    target.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(str(target), "new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == [fmt.MANIFEST_NAME]


def test_stale_temporary_files_are_those_of_this_rank_of_dead_writers_or_old(tmp_path):
    (tmp_path / fmt.PROGRESS_DIR).mkdir()
    (tmp_path / fmt.SHARD_DIR).mkdir()
    gone, alive = dead_pid(), os.getpid()
    old = time.time() - 3600
    files = {
        f"{fmt.MANIFEST_NAME}.tmp.{gone}.{HOST}": True,  # a writer of this host that is gone
        f"{fmt.CARD_NAME}.tmp.{alive}.{HOST}": False,  # a live writer
        f"{fmt.MANIFEST_NAME}.tmp.{alive}.other-host": False,  # another host's, recent: maybe writing right now
        f"{fmt.CONFIG_NAME}.tmp.{alive}.other-host": True,  # ... but not for an hour
        f"{fmt.MANIFEST_NAME}.tmp.{alive}": False,  # older kd (no host in the name), recent
        f"{fmt.PROGRESS_DIR}/rank-00000-of-00002.jsonl.tmp.{alive}.{HOST}": True,  # this rank's: the lock is ours
        f"{fmt.PROGRESS_DIR}/rank-00000-of-00002.done.json.tmp.{alive}.other-host": True,
        f"{fmt.PROGRESS_DIR}/rank-00001-of-00002.jsonl.tmp.{alive}.{HOST}": False,  # rank 1's, running
        f"{fmt.PROGRESS_DIR}/rank-00001-of-00002.jsonl.tmp.{gone}.{HOST}": True,
        f"{fmt.SHARD_DIR}/shard-r00000-of-00002-000003.parquet.tmp": True,
        f"{fmt.SHARD_DIR}/shard-r00001-of-00002-000003.parquet.tmp": False,  # rank 1 is writing it
        f"{fmt.MANIFEST_NAME}": False,
        f"{fmt.PROGRESS_DIR}/rank-00000-of-00002.jsonl": False,
    }
    for name in files:
        (tmp_path / name).write_text("x")
    os.utime(tmp_path / f"{fmt.CONFIG_NAME}.tmp.{alive}.other-host", (old, old))
    removed = {os.path.relpath(p, tmp_path) for p in remove_stale_temps(str(tmp_path), 0, 2)}
    assert removed == {name for name, stale in files.items() if stale}
    assert all((tmp_path / name).exists() != stale for name, stale in files.items())


def test_a_rerun_after_a_failed_manifest_write_cleans_up_and_completes(tmp_path, llava_teacher, tiny_data, monkeypatch):
    """ENOSPC (or a kill) while the manifest is written: the rerun resumes, finishes the manifest and leaves no
    temporary file behind; a stale lock file of the dead build does not stop it either."""
    from kd_cache import manifest as manifest_mod
    from kd_cache.build import BuildConfig, build
    from kd_cache.verify import verify

    data, images = tiny_data
    out = tmp_path / "cache"
    cfg = BuildConfig(teacher=str(llava_teacher), data=str(data), images=str(images), out=str(out), batch_size=6,
                      shard_size=5, progress=False)
    real = manifest_mod.atomic_write_text
    gone = dead_pid()

    def out_of_space(path, text):
        if path.endswith(fmt.MANIFEST_NAME):  # what the killed writer of an older kd left, and then ENOSPC
            Path(f"{path}.tmp.{gone}.{HOST}").write_text(text[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text)

    monkeypatch.setattr(manifest_mod, "atomic_write_text", out_of_space)
    with pytest.raises(OSError, match="No space left"):
        build(cfg)
    monkeypatch.setattr(manifest_mod, "atomic_write_text", real)
    assert not (out / fmt.MANIFEST_NAME).exists() and not (out / lock_name(0, 1)).exists()
    (out / fmt.PROGRESS_DIR / f"rank-00000-of-00001.jsonl.tmp.{gone}.{HOST}").write_text("{")
    (out / fmt.SHARD_DIR / "shard-r00000-of-00001-000007.parquet.tmp").write_text("torn")
    (out / lock_name(0, 1)).write_text(json.dumps({"pid": gone, "host": socket.gethostname(), "started": 0}))
    manifest = build(cfg)
    assert manifest is not None and verify(str(out)) == []
    # the rerun loads no teacher: the manifest still says what the shards were written with
    assert manifest["targets"]["teacher_dtype"] == "float32" and "header" not in manifest["build"]["ranks"][0]
    left = [str(p.relative_to(out)) for p in out.rglob("*") if ".tmp" in p.name or is_lock_file(p.name)]
    assert left == []
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [fmt.CARD_NAME, fmt.CONFIG_NAME, fmt.MANIFEST_NAME, fmt.PROGRESS_DIR, fmt.SHARD_DIR, fmt.TOKENIZER_DIR])
