"""One trainer per output folder: `kd train` holds kd_cache/lock.py's lock on --out (issue 21).

A live holder is a real process (a small script taking the lock through `TrainLock`); a second `kd train` is refused
naming it and leaves --out as it was, `--overwrite` included; after the holder is killed with SIGKILL the next run
takes the stale lock over. The ranks of one 2-process launch not excluding each other is test_train.py's
test_two_process_ddp_run; here a 2-process launch whose rank 1 alone is held shows each rank locks its own file.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kd_cache.lock import FolderLocked, TrainLock, is_lock_file, lock_name
from kd_cli.main import app
from kd_eval.tiny import make_tiny_teacher
from kd_train.train import TrainConfig, launch_rank, run
from tests.conftest import launcher_env, run_in_group

runner = CliRunner()
HOLD_SECONDS = 300  # a holder the test forgets (it should not) exits by itself


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("student"), "llava", hidden_size=32, num_layers=1, seed=7)


def child_env() -> dict:
    return launcher_env(KD_DIST_TIMEOUT="180", PYTHONPATH=os.getcwd())


class Holder:
    """A process of its own holding `TrainLock(out, rank, world)` for each (rank, world) given, until killed."""

    def __init__(self, folder: Path, tmp_path: Path, *ranks: tuple[int, int]):
        script = tmp_path / "hold_train_lock.py"
        script.write_text(textwrap.dedent(f"""
            import sys, time
            from kd_cache.lock import TrainLock
            locks = [TrainLock(sys.argv[1], r, w) for r, w in {list(ranks or [(0, 1)])!r}]
            print("held", flush=True)
            time.sleep({HOLD_SECONDS})
        """))
        self.proc = subprocess.Popen([sys.executable, str(script), str(folder), "--marker"], env=child_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "held":
            self.kill()
            raise AssertionError(f"the holder did not take the lock within 60 s: {line!r} {self.proc.stderr.read()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc.stdout.close()
        self.proc.stderr.close()


def train_argv(student, tiny_data, cache, out, *extra) -> list[str]:
    data, images = tiny_data
    return ["train", "--stage", "dft", "--student", str(student), "--cache", str(cache), "--data", str(data),
            "--images", str(images), "--out", str(out), "--batch-size", "4", "--max-steps", "1", "--quiet", *extra]


def snapshot(folder: Path) -> dict[str, tuple[int, int] | str]:
    """Every file under `folder` with its size and modification time (a lock file: its content): equal snapshots,
    nothing written or deleted."""
    return {str(p.relative_to(folder)): p.read_text() if is_lock_file(p.name) else (p.stat().st_size,
                                                                                    p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(r) -> str:
    return " ".join(r.output.split())


def lock_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if is_lock_file(p.name))


def test_a_second_train_on_a_held_out_is_refused_naming_the_holder_and_touches_nothing(
        tmp_path, student, tiny_data, llava_cache):
    out = tmp_path / "run"
    first = runner.invoke(app, train_argv(student, tiny_data, llava_cache, out))
    assert first.exit_code == 0, first.output
    before = snapshot(out)
    assert "final/config.json" in before and "train_config.json" in before and not lock_files(out)
    holder = Holder(out, tmp_path)
    try:
        before = snapshot(out)  # with the holder's lock file
        holder_command = json.loads((out / lock_name(0, 1)).read_text())["command"]
        assert "--marker" in holder_command
        refused = runner.invoke(app, train_argv(student, tiny_data, llava_cache, out))
        assert refused.exit_code == 2, refused.output
        msg = one_line(refused)
        assert msg.startswith(f"error: output folder {out} is already being written by another `kd train`: "
                              f"pid {holder.pid} on host {socket.gethostname()}, started "), msg
        assert f"command: {holder_command}." in msg and "Wait for it to finish" in msg and msg.count("error:") == 1
        assert snapshot(out) == before

        # --overwrite (with other settings) must not delete the live run's files either
        over = runner.invoke(app, train_argv(student, tiny_data, llava_cache, out, "--overwrite", "--lr", "5e-4"))
        assert over.exit_code == 2, over.output
        assert f"pid {holder.pid} on host {socket.gethostname()}" in one_line(over)
        assert snapshot(out) == before

        # a launch with another number of ranks is refused while the 1-process holder runs
        refused_r1 = runner.invoke(app, train_argv(student, tiny_data, llava_cache, out),
                                   env={"RANK": "1", "WORLD_SIZE": "2"})
        assert refused_r1.exit_code == 2, refused_r1.output
        msg = one_line(refused_r1)
        assert f"is being written by another `kd train` with 1 rank(s) (rank 0 is pid {holder.pid} on host " in msg
        assert "this one has 2" in msg and snapshot(out) == before
    finally:
        holder.kill()


def test_a_killed_holders_lock_is_taken_over_and_the_run_succeeds(tmp_path, student, tiny_data, llava_cache,
                                                                   caplog):
    out = tmp_path / "run"
    first = runner.invoke(app, train_argv(student, tiny_data, llava_cache, out))
    assert first.exit_code == 0, first.output
    holder = Holder(out, tmp_path)
    holder.kill()  # SIGKILL: no cleanup runs
    lock = out / lock_name(0, 1)
    assert json.loads(lock.read_text())["pid"] == holder.pid  # what kill -9 leaves: the file, not the flock
    # the next run takes the stale lock over; --overwrite deletes the earlier run but not the (taken over) lock
    with caplog.at_level("WARNING", logger="kd_cache"):
        again = runner.invoke(app, train_argv(student, tiny_data, llava_cache, out, "--overwrite", "--max-steps",
                                              "2"))
    assert again.exit_code == 0, again.output
    assert f"student written: {out / 'final'}" in again.output
    assert "took over the stale training lock" in caplog.text and f"pid {holder.pid} on host" in caplog.text
    assert json.loads((out / "train_config.json").read_text())["config"]["max_steps"] == 2
    assert json.loads((out / "final" / "kd_stage.json").read_text())["steps"] == 2
    assert lock_files(out) == []


def test_a_stale_lock_alone_does_not_make_out_look_like_another_folder(tmp_path, student, tiny_data, llava_cache):
    """--overwrite refuses a folder holding files that are not a kd train run; a killed run's lock file (or this
    run's own) is not such a file."""
    out = tmp_path / "run"
    holder = Holder(out, tmp_path)  # creates `out`, holding nothing else
    holder.kill()
    gone = {"pid": holder.pid, "host": socket.gethostname(), "started": time.time() - 60, "tool": "kd train",
            "command": "kd train --out run"}
    (out / lock_name(1, 2)).write_text(json.dumps(gone))  # and a killed 2-process launch's rank 1
    assert sorted(os.listdir(out)) == [lock_name(0, 1), lock_name(1, 2)]
    r = runner.invoke(app, train_argv(student, tiny_data, llava_cache, out, "--overwrite"))
    assert r.exit_code == 0, r.output
    assert (out / "final" / "config.json").exists()
    assert lock_files(out) == [lock_name(1, 2)]  # another launch's stale lock: left alone, ignored
    (out / "notes.txt").write_text("mine")
    (out / "train_config.json").unlink()
    r = runner.invoke(app, train_argv(student, tiny_data, llava_cache, out, "--overwrite"))
    assert r.exit_code == 2 and "holds files but no train_config.json" in one_line(r), r.output
    assert (out / "notes.txt").exists() and (out / "final" / "config.json").exists()


def test_the_lock_is_held_through_the_run_in_no_output_and_removed_at_its_end(tmp_path, student, tiny_data,
                                                                             llava_cache):
    """... an --overwrite run included: what it deletes of the earlier run is not its own lock."""
    data, images = tiny_data
    out = tmp_path / "run"
    common = dict(student=str(student), out=str(out), stage="dft", cache=str(llava_cache), data=str(data),
                  images=str(images), batch_size=2, checkpoint_every=1, progress=False)
    run(TrainConfig(max_steps=1, **common))
    cfg = TrainConfig(max_steps=3, overwrite=True, **common)
    seen = {}

    def report(stage: str, final: str, trained: bool) -> None:  # the stage is written; the run has not ended
        seen["locks"] = lock_files(out)
        seen["holder"] = json.loads((out / lock_name(0, 1)).read_text())
        with pytest.raises(FolderLocked, match=f"pid {os.getpid()} on host"):
            TrainLock(str(out), 0, 1, wait_seconds=0)
        with pytest.raises(FolderLocked, match="with 1 rank"):
            TrainLock(str(out), 1, 2, wait_seconds=0)

    [final] = run(cfg, report=report)
    assert json.loads((Path(final) / "kd_stage.json").read_text())["steps"] == 3
    assert seen["locks"] == [lock_name(0, 1)]  # only the one in --out: none in final/ or checkpoints/
    assert seen["holder"]["pid"] == os.getpid() and seen["holder"]["tool"] == "kd train"
    assert (Path(final) / "config.json").exists() and list((out / "checkpoints").glob("step-*/*"))
    assert lock_files(out) == []


def test_a_refused_run_creates_no_out_folder(tmp_path, student, tiny_data, llava_cache):
    """The lock creates --out; a run refused before writing anything (here: a missing data file) removes it again."""
    out = tmp_path / "new" / "run"
    argv = train_argv(student, tiny_data, llava_cache, out)
    argv[argv.index("--data") + 1] = str(tmp_path / "missing.json")
    r = runner.invoke(app, argv)
    assert r.exit_code == 2 and "missing.json" in r.output, r.output
    assert not (tmp_path / "new").exists()


def test_the_rank_comes_from_the_launchers_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                 "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert launch_rank() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert launch_rank() == (0, 1)  # a bare srun: separate runs, which must exclude each other
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert launch_rank() == (3, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_rank() == (1, 2)  # accelerate launch / torchrun
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK must be in \[0, WORLD_SIZE\), got RANK=2 WORLD_SIZE=2"):
        launch_rank()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="RANK must be an integer, got 'one'"):
        launch_rank()


@pytest.mark.slow
def test_each_rank_of_a_launch_locks_its_own_file(tmp_path, student, tiny_data, llava_cache):
    """A 2-process `accelerate launch` whose rank 1 is held elsewhere: rank 1 is refused naming the holder, rank 0
    (its own file, free) is not."""
    out = tmp_path / "ddp"
    data, images = tiny_data
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kd_cli.main",
           *train_argv(student, tiny_data, llava_cache, out)]
    holder = Holder(out, tmp_path, (1, 2))
    try:
        r = run_in_group(cmd, env=child_env(), timeout=300)
    finally:
        holder.kill()
    assert r.returncode != 0
    err = " ".join(r.stderr.split())
    assert (f"error: output folder {out} is already being written by another `kd train` (rank 1 of 2): "
            f"pid {holder.pid} on host {socket.gethostname()}") in err, r.stderr[-3000:]
    assert "(rank 0 of 2)" not in err
    assert not (out / "final").exists()
