"""Multi-process teardown under load (issue 21): consecutive 2-process `kd train` and `kd cache build` launches,
every one exiting with its status within a bound while two busy-loop processes keep both cores busy, and a
2-process training where one rank fails (a corrupt shard only it reads) or hangs (a storage server that stalls
only its shards), which must end the whole launch with an error, no rank left behind. The teardown itself
(kd_train/engine.end_distributed, kd_cache/build._stop_writer) is also checked in-process.

Every launcher runs through tests/conftest.run_in_group: its own process group, killed as a whole past the bound,
and a rank that outlives its launcher fails the test. The exit times of the consecutive launches are written to
`<tmp>/stress_times.json` and printed (`pytest -s` shows them).
"""

from __future__ import annotations

import functools
import gc
import http.server
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import launcher_env, run_in_group

TRAININGS = 20  # consecutive 2-process `kd train` launches (every 5th with the online teacher)
BUILDS = 10  # consecutive 2-process `kd cache build` launches
BOUND = 120.0  # seconds one launch may take, under load, before it counts as hung (typically 10-30 s)
FAIL_BOUND = 150.0  # a launch with a failing or hanging rank: startup + KD_DIST_TIMEOUT (hang case) + margin
HANG_TIMEOUT = 20  # KD_DIST_TIMEOUT of the hang case: the bound on a collective waiting for a hung peer

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kd_cli.main"]


def child_env(dist_timeout: float = 60) -> dict:
    return launcher_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", KD_DIST_TIMEOUT=str(dist_timeout))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny LLaVA teacher, a smaller student with its tokenizer, 8 records and their 4-shard cache."""
    from kd_cache.build import BuildConfig, build
    from kd_eval.tiny import make_tiny_dataset, make_tiny_teacher

    root = tmp_path_factory.mktemp("stress")
    teacher = make_tiny_teacher(root / "teacher", "llava")
    student = make_tiny_teacher(root / "student", "llava", hidden_size=32, num_layers=1, seed=7)
    data, images = make_tiny_dataset(root / "data", n=8, seed=0, kind="instruct")
    cache = root / "cache"
    build(BuildConfig(teacher=str(teacher), data=str(data), images=str(images), out=str(cache), shard_size=2,
                      progress=False))
    return {"teacher": teacher, "student": student, "data": data, "images": images, "cache": cache}


@pytest.fixture(scope="module")
def busy_cores():
    """Two pure-Python busy loops (one per core of this machine), for the whole module; killed at its end."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        yield loops
    finally:
        for p in loops:
            p.kill()
        for p in loops:
            p.wait()


def train_cmd(t: dict, out: Path, *, cache: Path | None = None, online: bool = False) -> list[str]:
    source = ["--online-teacher", str(t["teacher"])] if online else ["--cache", str(cache or t["cache"])]
    return [*LAUNCH, "train", "--stage", "dft", "--student", str(t["student"]), *source, "--data", str(t["data"]),
            "--images", str(t["images"]), "--out", str(out), "--batch-size", "1", "--max-steps", "2", "--quiet"]


def build_cmd(t: dict, out: Path) -> list[str]:
    return [*LAUNCH, "cache", "build", "--teacher", str(t["teacher"]), "--data", str(t["data"]), "--images",
            str(t["images"]), "--out", str(out), "--shard-size", "2", "--quiet"]


def timed(cmd: list[str], env: dict, bound: float) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = run_in_group(cmd, env=env, timeout=bound)  # AssertionError past the bound or when a rank outlives it
    return r, time.monotonic() - t0


def summary(times: list[float]) -> dict:
    return {"n": len(times), "min": round(min(times), 2), "median": round(statistics.median(times), 2),
            "max": round(max(times), 2), "seconds": [round(t, 2) for t in times]}


def rank_shards(cache: Path, rank: int, world: int = 2) -> list[Path]:
    """The shard files `rank` of `world` reads in epoch 0 under the default seed (kd_train/stream.py `split`)."""
    from kd_cache.reader import Cache
    from kd_train.stream import CacheStream

    c = Cache(str(cache))
    return [cache / c.manifest.shards[s.shard].name
            for s in CacheStream(c, rank=rank, world_size=world, seed=0).rank_slices()]


@pytest.mark.slow
def test_consecutive_two_process_launches_exit_within_the_bound(tmp_path, tiny, busy_cores):
    env = child_env()
    times: dict[str, list[float]] = {"train": [], "train_online": [], "build": []}
    t_all = time.monotonic()
    for i in range(TRAININGS):
        online = i % 5 == 4
        out = tmp_path / f"train-{i:02d}"
        r, seconds = timed(train_cmd(tiny, out, online=online), env, BOUND)
        assert r.returncode == 0, f"training {i} (online={online}): exit {r.returncode}\n{r.stderr[-3000:]}"
        assert (out / "final" / "config.json").exists(), i
        times["train_online" if online else "train"].append(seconds)
    for i in range(BUILDS):
        out = tmp_path / f"build-{i:02d}"
        r, seconds = timed(build_cmd(tiny, out), env, BOUND)
        assert r.returncode == 0, f"build {i}: exit {r.returncode}\n{r.stderr[-3000:]}"
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["num_samples"] == 8 and {s["rank"] for s in manifest["shards"]} == {0, 1}
        times["build"].append(seconds)
    assert all(p.poll() is None for p in busy_cores), "a busy loop died: the launches did not run under load"
    report = {kind: summary(ts) for kind, ts in times.items()}
    report["train_all"] = summary(times["train"] + times["train_online"])
    report["total_seconds"] = round(time.monotonic() - t_all, 1)
    path = tmp_path / "stress_times.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"\nstress exit times ({path}):\n" + json.dumps({k: {x: y for x, y in v.items() if x != "seconds"}
                                                         if isinstance(v, dict) else v for k, v in report.items()}))


@pytest.mark.slow
def test_a_failing_rank_ends_the_launch(tmp_path, tiny, busy_cores):
    """Rank 1 reads a corrupt shard (only it does) and fails: rank 0, waiting for it in a collective, fails too
    (connection closed by peer; torchrun stops it as well), long before KD_DIST_TIMEOUT (600 s here), and no rank
    is left behind."""
    import shutil

    bad = tmp_path / "cache"
    shutil.copytree(tiny["cache"], bad)
    mine = rank_shards(bad, 1)
    assert mine and not set(mine) & set(rank_shards(bad, 0))
    for shard in mine:  # the footer gone: "corrupt or unreadable" when rank 1 opens it
        with open(shard, "r+b") as f:
            f.truncate(1000)
    r, seconds = timed(train_cmd(tiny, tmp_path / "out", cache=bad), child_env(dist_timeout=600), FAIL_BOUND)
    print(f"\nfailing rank: the launch ended with exit {r.returncode} after {seconds:.1f} s")
    assert r.returncode != 0
    assert "corrupt or unreadable" in r.stderr and any(p.name in r.stderr for p in mine), r.stderr[-3000:]
    assert not (tmp_path / "out" / "final").exists()


class _StallingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, but a request for one of `stall` waits until `release` is set (a stalled storage server)."""

    stall: set[str] = set()
    release = threading.Event()

    def do_GET(self):
        if any(self.path.endswith(name) for name in self.stall):
            self.release.wait(300)
            return
        super().do_GET()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_a_hanging_rank_ends_the_launch_after_the_collective_timeout(tmp_path, tiny, busy_cores):
    """Rank 1 hangs reading its shards from a server that never answers for them; rank 0 waits in a collective
    for KD_DIST_TIMEOUT, fails, and the launch ends with an error (torchrun stops the hung rank)."""
    handler = type("Handler", (_StallingHandler,), {"stall": {p.name for p in rank_shards(tiny["cache"], 1)},
                                                    "release": threading.Event()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler,
                                                                               directory=str(tiny["cache"].parent)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{tiny['cache'].name}"
        cmd = train_cmd(tiny, tmp_path / "out")
        cmd[cmd.index("--cache") + 1] = url
        r, seconds = timed(cmd, child_env(dist_timeout=HANG_TIMEOUT), FAIL_BOUND)
    finally:
        handler.release.set()
        server.shutdown()
        server.server_close()
    print(f"\nhanging rank (KD_DIST_TIMEOUT={HANG_TIMEOUT}): the launch ended with exit {r.returncode} after "
          f"{seconds:.1f} s")
    assert r.returncode != 0
    assert "Timed out" in r.stderr or "timed out" in r.stderr, r.stderr[-3000:]
    assert seconds > HANG_TIMEOUT  # it was the collective's timeout that ended it
    assert not (tmp_path / "out" / "final").exists()


# ---------------------------------------------------------------------------------------------- in-process


@pytest.fixture
def gloo_group(tmp_path):
    """A one-process gloo group in this process (destroyed at the end if the test left it)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield dist
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _live_ddp() -> int:
    from torch.nn.parallel import DistributedDataParallel

    gc.collect()
    return sum(issubclass(type(o), DistributedDataParallel) for o in gc.get_objects())


def _fail_with_a_ddp_model():
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))  # held by this frame's locals
    raise RuntimeError(f"rank failed holding a {type(model).__name__}")


def _record_teardown(dist, monkeypatch) -> list:
    """[(call, live DDP models at that moment)] of the barrier and destroy calls the teardown makes."""
    calls = []
    for name in ("barrier", "destroy_process_group"):
        real = getattr(dist, name)

        def recorded(*a, _real=real, _name=name, **kw):
            calls.append((_name, _live_ddp()))
            return _real(*a, **kw)

        monkeypatch.setattr(dist, name, recorded)
    return calls


def test_end_distributed_after_a_failure_releases_the_model_then_destroys_the_group(gloo_group, monkeypatch):
    from kd_train.engine import end_distributed

    calls = _record_teardown(gloo_group, monkeypatch)
    with pytest.raises(RuntimeError, match="rank failed"):
        try:
            _fail_with_a_ddp_model()
        finally:
            assert _live_ddp() == 1  # the traceback's frame holds it (and through it the process group)
            end_distributed(finished=False)
    # no barrier (a failed rank's peers may never reach one); the model was gone when the group was destroyed
    assert calls == [("destroy_process_group", 0)]
    assert not gloo_group.is_initialized()


def test_end_distributed_after_a_finished_run(gloo_group, monkeypatch):
    from kd_train.engine import end_distributed

    calls = _record_teardown(gloo_group, monkeypatch)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
    model(torch.ones(1, 2)).sum().backward()
    del model
    end_distributed()
    assert calls == [("barrier", 0), ("destroy_process_group", 0)] and not gloo_group.is_initialized()
    end_distributed()  # no group: nothing to do


def test_a_failed_build_stops_its_shard_writer(tmp_path, tiny, monkeypatch):
    """The teacher fails on its third batch: the build raises, its writer thread has written the whole shards it
    was handed (journaled: a rerun resumes after them) and stopped, and a rerun completes the cache."""
    from kd_cache import format as fmt
    from kd_cache.build import BuildConfig, build
    from kd_cache.teacher import Teacher

    real, calls = Teacher.targets, []

    def failing(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("teacher failed")
        return real(self, *a, **kw)

    monkeypatch.setattr(Teacher, "targets", failing)
    cfg = BuildConfig(teacher=str(tiny["teacher"]), data=str(tiny["data"]), images=str(tiny["images"]),
                      out=str(tmp_path / "cache"), shard_size=2, batch_size=2, progress=False)
    with pytest.raises(RuntimeError, match="teacher failed"):
        build(cfg)
    assert not [t for t in threading.enumerate() if t.name.startswith("kd-shard-writer")]
    journal = next((tmp_path / "cache" / fmt.PROGRESS_DIR).glob("rank-*.jsonl")).read_text().splitlines()
    assert [json.loads(line)["end"] for line in journal] == [2, 4]
    monkeypatch.setattr(Teacher, "targets", real)
    assert build(cfg)["num_samples"] == 8
