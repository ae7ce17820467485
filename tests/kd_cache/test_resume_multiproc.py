"""Real processes: a build killed with SIGKILL and rerun, and a 2-process `accelerate launch` build.

On a machine without GPUs `accelerate launch --multi_gpu` starts torchrun-style CPU processes (gloo);
`--cpu --num_processes 2` would silently start one process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kd_cache import format as fmt
from kd_cache import open_cache
from kd_eval.tiny import make_tiny_dataset
from kd_cache.verify import verify

pytestmark = pytest.mark.slow

from tests.conftest import run_in_group


def build_cmd(teacher, data, images, out, *extra):
    return [sys.executable, "-m", "kd_cli.main", "cache", "build", "--teacher", str(teacher), "--data", str(data),
            "--images", str(images), "--out", str(out), "--quiet", *extra]


def env():
    e = dict(os.environ)
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    e["OMP_NUM_THREADS"] = "1"
    return e


def samples_by_index(cache_dir: Path) -> dict[int, dict]:
    return {s["sample_index"]: s for s in open_cache(str(cache_dir))}


def assert_same_cache(a: dict[int, dict], b: dict[int, dict]) -> None:
    """Same samples with the same targets: ids, positions and sampled draws exactly, floats to rounding."""
    assert sorted(a) == sorted(b)
    for i in a:
        assert sorted(a[i]) == sorted(b[i]), i
        assert "visual_sample_ids" in a[i]  # the default: sampled visual targets (seeded per sample, not per rank)
        for key, va in a[i].items():
            vb = b[i][key]
            if isinstance(va, np.ndarray) and va.dtype.kind == "f":
                assert np.allclose(va, vb, rtol=1e-5, atol=1e-4, equal_nan=True), (i, key)
            elif isinstance(va, np.ndarray):
                assert np.array_equal(va, vb), (i, key)
            else:
                assert va == vb, (i, key)


@pytest.fixture(scope="module")
def bigger_data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("bigdata"), n=60, seed=1, kind="instruct")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, llava_teacher, bigger_data):
    out = tmp_path_factory.mktemp("ref") / "cache"
    data, images = bigger_data
    subprocess.run(build_cmd(llava_teacher, data, images, out, "--shard-size", "4", "--batch-size", "1"),
                   check=True, env=env(), capture_output=True)
    return out


def test_killed_build_resumes_to_the_same_cache(tmp_path, llava_teacher, bigger_data, reference):
    data, images = bigger_data
    out = tmp_path / "cache"
    journal = out / fmt.PROGRESS_DIR / "rank-00000-of-00001.jsonl"
    kills = 0
    for _ in range(3):  # kill it mid-build a few times, each time after at least one more shard landed
        before = len(journal.read_text().splitlines()) if journal.exists() else 0
        proc = subprocess.Popen(build_cmd(llava_teacher, data, images, out, "--shard-size", "4", "--batch-size", "1"),
                                env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if journal.exists() and len(journal.read_text().splitlines()) >= before + 2:
                break
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        if (out / fmt.MANIFEST_NAME).exists():
            break
    assert kills >= 1, "the build finished before it could be killed; make the dataset larger"
    assert not (out / fmt.MANIFEST_NAME).exists() or kills
    subprocess.run(build_cmd(llava_teacher, data, images, out, "--shard-size", "4", "--batch-size", "3"),
                   check=True, env=env(), capture_output=True)
    assert verify(str(out)) == []
    assert not list((out / fmt.SHARD_DIR).glob("*.tmp"))
    resumed, ref = samples_by_index(out), samples_by_index(reference)
    assert_same_cache(resumed, ref)  # every sample exactly once (dict keys) with the same targets
    m = json.loads((out / fmt.MANIFEST_NAME).read_text())
    assert m["num_samples"] == len(ref) == sum(s["rows"] for s in m["shards"])


def test_two_process_build_matches_single_process(tmp_path, llava_teacher, bigger_data, reference):
    data, images = bigger_data
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kd_cli.main", "cache", "build",
           "--teacher", str(llava_teacher), "--data", str(data), "--images", str(images), "--out", str(out),
           "--shard-size", "4", "--batch-size", "2", "--quiet"]
    r = run_in_group(cmd, env=env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / fmt.MANIFEST_NAME).read_text())
    assert m["build"]["world_size"] == 2 and {s["rank"] for s in m["shards"]} == {0, 1}
    assert verify(str(out)) == []
    two = samples_by_index(out)
    assert_same_cache(two, samples_by_index(reference))
    # ranks hold disjoint, deterministic slices: index % world_size == rank
    for s in m["shards"]:
        with open_cache(str(out)).open_shard(m["shards"].index(s)) as pf:
            idx = pf.read(columns=["sample_index"]).column(0).to_pylist()
        assert all(i % 2 == s["rank"] for i in idx)


def test_rerunning_one_rank_rewrites_the_same_manifest(tmp_path, llava_teacher, bigger_data):
    """Ranks finish at different times; the last one writes the manifest, and a rerun of any rank is harmless."""
    data, images = bigger_data
    out = tmp_path / "cache"
    for rank in (1, 0):  # rank 1 first: no manifest until rank 0 is done too
        e = env() | {"RANK": str(rank), "WORLD_SIZE": "2"}
        subprocess.run(build_cmd(llava_teacher, data, images, out, "--shard-size", "8"), check=True, env=e,
                       capture_output=True)
        assert (out / fmt.MANIFEST_NAME).exists() == (rank == 0)
    first = json.loads((out / fmt.MANIFEST_NAME).read_text())
    e = env() | {"RANK": "1", "WORLD_SIZE": "2"}
    subprocess.run(build_cmd(llava_teacher, data, images, out, "--shard-size", "8"), check=True, env=e,
                   capture_output=True)
    again = json.loads((out / fmt.MANIFEST_NAME).read_text())
    assert again == first
    assert verify(str(out)) == []


def test_a_second_build_of_the_same_folder_is_refused_naming_the_first_and_a_rerun_after_kill_resumes(
        tmp_path, llava_teacher, bigger_data, reference):
    """Two `kd cache build` processes on one --out: the second is refused at start, naming the first (pid, host,
    start time, command line), and touches nothing; after kill -9 of the first, a rerun takes the stale lock over
    and resumes to the reference cache, shard numbers without gaps."""
    import socket

    from kd_cache.lock import lock_name

    data, images = bigger_data
    out = tmp_path / "cache"
    journal = out / fmt.PROGRESS_DIR / "rank-00000-of-00001.jsonl"
    cmd = build_cmd(llava_teacher, data, images, out, "--shard-size", "4", "--batch-size", "1")
    first = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:
            if journal.exists() and journal.read_text().count("\n") >= 1:
                break
            time.sleep(0.005)
        assert first.poll() is None, "the first build ended before the second started"
        first.send_signal(signal.SIGSTOP)  # holds its lock while stopped: the second build finds it running
        while open(f"/proc/{first.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
            time.sleep(0.005)  # the signal is delivered asynchronously: wait until every thread stands still
        before = {p.name: p.read_bytes() for p in (out / fmt.SHARD_DIR).iterdir()} | {"journal": journal.read_bytes()}
        second = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        err = " ".join(second.stderr.split())
        assert "error: output folder" in err and "already being written by another `kd cache build`" in err
        assert f"pid {first.pid} on host {socket.gethostname()}, started " in err
        assert f"--out {out} --quiet" in err and "cache build --teacher" in err  # the first one's command line
        after = {p.name: p.read_bytes() for p in (out / fmt.SHARD_DIR).iterdir()} | {"journal": journal.read_bytes()}
        assert after == before  # the refused build deleted and wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / lock_name(0, 1)).exists() and not (out / fmt.MANIFEST_NAME).exists()  # what kill -9 leaves
    rerun = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"took over the stale build lock {out / lock_name(0, 1)} of pid {first.pid}" in rerun.stderr
    assert verify(str(out)) == [] and not (out / lock_name(0, 1)).exists()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert_same_cache(samples_by_index(out), samples_by_index(reference))
    names = sorted(p.name for p in (out / fmt.SHARD_DIR).iterdir())
    assert names == [f"shard-r00000-of-00001-{i:06d}.parquet" for i in range(len(names))]  # no skipped numbers
