"""One writer per rank of a remote URL across machines (kd_cache/remote_lock.py), against moto's S3 server on
loopback through s3fs: a second build from another staging folder (another machine) is refused naming the first;
the lock object is gone when a build ends; a killed build resumed from its staging folder takes its own lock over;
the conditional write (`If-None-Match: *`, 412 from the server) decides two builds starting together; without it,
two writers are detected before the manifest and none is written."""

from __future__ import annotations

import json
import logging
import os

import pytest
from typer.testing import CliRunner

from kd_cache import format as fmt
from kd_cache.build import build
from kd_cache.verify import verify
from kd_cli.main import app
from tests.kd_cache.test_remote import (assert_same_samples, build_args, config, local_files, moto_s3,
                                       relative_files)

s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[dev]')")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[dev]')")

runner = CliRunner()
BUCKET = "kd-locks"  # moto's state is per process: not test_remote.py's bucket
LOCK = ".kd-lock-r00000-of-00001.json"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_s3(tmp_path_factory, BUCKET) as fs:
        yield fs


def lock_of(s3, root: str) -> dict | None:
    s3.invalidate_cache()
    try:
        return json.loads(s3.cat_file(f"{root}/{LOCK}"))
    except FileNotFoundError:
        return None


def test_a_second_build_of_the_url_from_another_machine_is_refused_naming_the_first(
        s3, tmp_path, llava_teacher, tiny_data, llava_cache, monkeypatch):
    from kd_cache.teacher import Teacher

    url, root = f"s3://{BUCKET}/two-machines", f"{BUCKET}/two-machines"
    first, second = tmp_path / "machine-a", tmp_path / "machine-b"
    real_targets = Teacher.targets
    seen = {}

    def second_build_meanwhile(self, samples, opts):
        if not seen:  # the first build holds its lock (taken before it loaded the teacher) and has the configuration up
            holder = lock_of(s3, root)
            seen["holder"] = holder
            seen["before"] = {p: s3.info(f"{root}/{p}")["ETag"] for p in relative_files(s3, root)}
            seen["result"] = runner.invoke(app, build_args(llava_teacher, tiny_data, url, "--staging", str(second)))
            seen["after"] = {p: s3.info(f"{root}/{p}")["ETag"] for p in relative_files(s3, root)}
        return real_targets(self, samples, opts)

    monkeypatch.setattr(Teacher, "targets", second_build_meanwhile)
    manifest = build(config(llava_teacher, tiny_data, url, staging=str(first)))
    monkeypatch.setattr(Teacher, "targets", real_targets)

    holder, r = seen["holder"], seen["result"]
    assert holder["pid"] == os.getpid() and holder["staging"] == str(first) and len(holder["run_id"]) == 32
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    assert errors[0].startswith(f"error: {url} is already being written by another `kd cache build`: pid "
                                f"{os.getpid()} on host {holder['host']}, started "), errors[0]
    assert f"staging folder {first}." in errors[0] and f"delete {url}/{LOCK} (`aws s3 rm {url}/{LOCK}`)" in errors[0]
    assert seen["after"] == seen["before"]  # the refused build changed nothing on the bucket

    # the first build completed unhindered; its cache verifies and its lock object went with it
    assert manifest is not None and manifest["num_samples"] == 12
    assert verify(url) == [] and lock_of(s3, root) is None
    assert relative_files(s3, root) == local_files(llava_cache)
    assert_same_samples(url, llava_cache)
    assert not first.exists()


def test_a_failed_build_deletes_its_lock_object_and_the_next_build_from_anywhere_proceeds(
        s3, tmp_path, llava_teacher, tiny_data, monkeypatch):
    from kd_cache.teacher import Teacher

    url, root = f"s3://{BUCKET}/failed", f"{BUCKET}/failed"

    def failing(self, samples, opts):
        assert lock_of(s3, root) is not None
        raise RuntimeError("simulated teacher failure")

    monkeypatch.setattr(Teacher, "targets", failing)
    with pytest.raises(RuntimeError, match="simulated teacher failure"):
        build(config(llava_teacher, tiny_data, url, staging=str(tmp_path / "machine-a")))
    assert lock_of(s3, root) is None
    assert not (tmp_path / "machine-a" / ".kd-remote-lock-r00000-of-00001.json").exists()
    monkeypatch.undo()
    manifest = build(config(llava_teacher, tiny_data, url, staging=str(tmp_path / "machine-b")))
    assert manifest["num_samples"] == 12 and verify(url) == [] and lock_of(s3, root) is None


def test_a_killed_build_keeps_its_lock_until_rerun_from_its_own_staging_folder(
        s3, tmp_path, llava_teacher, tiny_data, llava_cache, monkeypatch, caplog):
    from kd_cache.remote_lock import RemoteLock, RemoteLocked
    from kd_cache.teacher import Teacher

    url, root = f"s3://{BUCKET}/killed", f"{BUCKET}/killed"
    staging = tmp_path / "machine-a"

    def killed(self, samples, opts):
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(Teacher, "targets", killed)
    monkeypatch.setattr(RemoteLock, "release", lambda self: None)  # kill -9: no cleanup ran
    with pytest.raises(KeyboardInterrupt):
        build(config(llava_teacher, tiny_data, url, staging=str(staging)))
    monkeypatch.undo()
    stale = lock_of(s3, root)
    record = json.loads((staging / ".kd-remote-lock-r00000-of-00001.json").read_text())
    assert stale is not None and record["run_id"] == stale["run_id"]

    # another machine: the holder cannot be proven dead from there, so the lock stands and the message says what to do
    with pytest.raises(RemoteLocked, match=rf"already being written by another `kd cache build`: pid {os.getpid()} "
                                           rf".*If that build is gone .* delete {url}/{LOCK}"):
        build(config(llava_teacher, tiny_data, url, staging=str(tmp_path / "machine-b")))
    assert lock_of(s3, root) == stale

    # the same machine and staging folder: the rerun holds the staging folder's flock, so the recorded run is dead
    with caplog.at_level(logging.WARNING, logger="kd_cache"):
        manifest = build(config(llava_teacher, tiny_data, url, staging=str(staging)))
    assert f"taking over the remote build lock {url}/{LOCK}" in caplog.text
    assert manifest["num_samples"] == 12 and verify(url) == []
    assert lock_of(s3, root) is None and relative_files(s3, root) == local_files(llava_cache)
    assert_same_samples(url, llava_cache)


def test_the_conditional_write_decides_two_builds_starting_together(s3, tmp_path, monkeypatch):
    """Both builds looked before either created the lock: the store's 412 on `If-None-Match: *` refuses the second."""
    from kd_cache.remote import RemoteOutput
    from kd_cache.remote_lock import RemoteLock, RemoteLocked

    url, root = f"s3://{BUCKET}/together", f"{BUCKET}/together"
    a = RemoteOutput(url, str(tmp_path / "a"), 0, 1)
    a.acquire_lock()
    assert a.lock.conditional and lock_of(s3, root)["run_id"] == a.lock.run_id
    assert a.probe() == (None, None)  # a prefix holding only lock objects is still empty (the lock comes first)

    creates = []
    real_pipe = s3.pipe_file  # the s3fs instance every RemoteOutput shares

    def pipe_file(path, value, *args, **kw):
        creates.append(kw.get("mode"))
        return real_pipe(path, value, *args, **kw)

    monkeypatch.setattr(s3, "pipe_file", pipe_file)
    real_read = RemoteLock._read
    looks = []

    def missed_it_once(self, key=None):
        looks.append(key)
        return None if len(looks) == 1 else real_read(self, key)

    monkeypatch.setattr(RemoteLock, "_read", missed_it_once)
    b = RemoteOutput(url, str(tmp_path / "b"), 0, 1)
    with pytest.raises(RemoteLocked, match=rf"{url} is already being written by .*staging folder {tmp_path / 'a'}"):
        b.acquire_lock()
    assert creates == ["create"] and lock_of(s3, root)["run_id"] == a.lock.run_id  # one PUT, answered 412
    monkeypatch.setattr(RemoteLock, "_read", real_read)

    # a build with another number of ranks is refused while this one holds a lock there
    with pytest.raises(RemoteLocked, match=r"another `kd cache build` with 1 rank\(s\) \(rank 0 is pid"):
        RemoteOutput(url, str(tmp_path / "c"), 1, 2).acquire_lock()
    assert lock_of(s3, root)["run_id"] == a.lock.run_id
    assert [p.rsplit("/", 1)[1] for p in s3.ls(root)] == [LOCK]  # the refused one removed its own
    a.release_lock()
    assert lock_of(s3, root) is None and not s3.find(root)


def test_two_writers_are_detected_before_the_manifest_where_the_store_has_no_conditional_write(
        s3, tmp_path, llava_teacher, tiny_data, monkeypatch):
    """Conditional writes disabled (a store without them): a second build on another machine that checked for the
    lock at the same moment as the first writes its own over it. The first finds out before its manifest."""
    import kd_cache.remote
    import kd_cache.remote_lock
    from kd_cache.remote import RemoteOutput
    from kd_cache.remote_lock import RemoteLock, RemoteLockLost

    monkeypatch.setattr(kd_cache.remote_lock, "CONDITIONAL_CREATE_PROTOCOLS", frozenset())
    url, root = f"s3://{BUCKET}/no-conditional", f"{BUCKET}/no-conditional"
    other = RemoteOutput(url, str(tmp_path / "machine-b"), 0, 1)
    real_finalize, real_read = kd_cache.remote.try_finalize, RemoteLock._read

    def racing_second_build(*args, **kw):  # just before the first build's manifest
        first = lock_of(s3, root)
        looks = []

        def missed_it(self, key=None):  # the second build looked before the first created its lock
            looks.append(key)
            return None if len(looks) == 1 else real_read(self, key)

        monkeypatch.setattr(RemoteLock, "_read", missed_it)
        other.acquire_lock()
        monkeypatch.setattr(RemoteLock, "_read", real_read)
        assert not other.lock.conditional and lock_of(s3, root)["run_id"] == other.lock.run_id != first["run_id"]
        return real_finalize(*args, **kw)

    monkeypatch.setattr(kd_cache.remote, "try_finalize", racing_second_build)
    with pytest.raises(RemoteLockLost) as e:
        build(config(llava_teacher, tiny_data, url, staging=str(tmp_path / "machine-a")))
    msg = str(e.value)
    assert msg.startswith(f"this build of {url} (rank 0 of 1) stops before writing {fmt.MANIFEST_NAME}: pid "
                          f"{os.getpid()} on host "), msg
    assert f"replaced its lock object {url}/{LOCK} (staging folder {tmp_path / 'machine-b'}): two builds are " \
           "writing it" in msg and "run `kd cache verify`" in msg
    names = relative_files(s3, root)
    assert fmt.MANIFEST_NAME not in names and fmt.CARD_NAME not in names  # no manifest from a collided build
    assert lock_of(s3, root)["run_id"] == other.lock.run_id  # the first build left the other's lock alone
    other.release_lock()
    assert lock_of(s3, root) is None

    # a lock deleted by hand while its build runs: another build may be writing, so no shard or manifest either
    monkeypatch.setattr(kd_cache.remote, "try_finalize", real_finalize)
    url, root = f"s3://{BUCKET}/deleted-lock", f"{BUCKET}/deleted-lock"
    real_written = RemoteOutput.shard_written

    def delete_lock_then_upload(self, entry):
        s3.rm(f"{root}/{LOCK}")
        return real_written(self, entry)

    monkeypatch.setattr(RemoteOutput, "shard_written", delete_lock_then_upload)
    with pytest.raises(RuntimeError, match=rf"stops before writing {fmt.SHARD_DIR}/shard-r00000-of-00001-000000"
                                           rf"\.parquet: its lock object {url}/{LOCK} was deleted while it ran"):
        build(config(llava_teacher, tiny_data, url, staging=str(tmp_path / "machine-c")))
    assert not [n for n in relative_files(s3, root) if n.startswith(fmt.SHARD_DIR)]
    assert lock_of(s3, root) is None
