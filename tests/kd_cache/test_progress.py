"""Progress in logs: with stderr not a terminal, `kd cache build` / `kd train` / `kd eval` write plain lines every
KD_PROGRESS_INTERVAL seconds and at the end, never tqdm's `\\r` frames (kd_cache/progress.py)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from kd_cache.progress import LineProgress, progress

LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] (?P<desc>[^:]+): (?P<rest>.*)$")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def progress_lines(text: str, desc: str) -> list[str]:
    return [m.group("rest") for line in text.splitlines() if (m := LINE.match(line)) and m.group("desc") == desc]


@pytest.fixture
def restore_library_bars(monkeypatch):
    """transformers' own bars restored after a test that ran with stderr not a terminal."""
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("KD_PROGRESS", raising=False)
    was = hf_logging.is_progress_bar_enabled()
    yield
    if was:
        hf_logging.enable_progress_bar()


def test_lines_every_interval_and_at_the_end():
    now = [0.0]
    out = io.StringIO()
    p = LineProgress(1000, 50, "kd train dft", "step", stream=out, interval=30, clock=lambda: now[0])
    for i in range(950):  # 950 steps over 95 s (resumed at 50): a line at 30, 60 and 90 s, one when closed
        now[0] = (i + 1) / 10
        p.update(1)
        p.set_postfix({"loss": "1.25"})
    p.close()
    p.close()
    lines = progress_lines(out.getvalue(), "kd train dft")
    assert "\r" not in out.getvalue() and len(lines) == 4 == p.lines
    assert lines[0] == "350/1000 step (35%), 10 step/s, elapsed 0:00:30, eta 0:01:05, loss=1.25"
    assert lines[-1] == "1000/1000 step (100%), 10 step/s, elapsed 0:01:35, loss=1.25"
    again = LineProgress(5, 0, "x", stream=out, interval=1, clock=lambda: now[0])
    now[0] += 1
    again.update(5)
    again.close()  # nothing new since the last line: no second one
    assert again.lines == 1
    stopped = LineProgress(10, 0, "eval", "sample", stream=out, clock=lambda: now[0])
    stopped.update(3)
    stopped.close()  # closed early (an error): said so
    assert progress_lines(out.getvalue(), "eval")[-1].endswith("(stopped)")


def test_a_bar_on_a_terminal_lines_elsewhere_nothing_when_disabled(monkeypatch):
    from tqdm import tqdm

    monkeypatch.delenv("KD_PROGRESS", raising=False)
    bar = progress(10, desc="x", stream=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress(10, desc="x", stream=io.StringIO()), LineProgress)
    assert progress(10, enabled=False) is None
    monkeypatch.setenv("KD_PROGRESS", "lines")
    assert isinstance(progress(10, stream=Terminal()), LineProgress)
    monkeypatch.setenv("KD_PROGRESS", "bar")
    bar = progress(10, stream=io.StringIO())
    assert isinstance(bar, tqdm)
    bar.close()


def test_build_train_and_eval_write_lines_not_frames_to_a_log(tmp_path, restore_library_bars, monkeypatch,
                                                               llava_teacher, tiny_data):
    from kd_cache.build import BuildConfig, build
    from kd_eval.evaluate import evaluate
    from kd_train.train import TrainConfig, run

    data, images = tiny_data
    log_stderr = io.StringIO()  # sys.stderr as a log file would be: not a terminal (set here: pytest resets it)
    monkeypatch.setattr(sys, "stderr", log_stderr)
    build(BuildConfig(teacher=str(llava_teacher), data=str(data), images=str(images), out=str(tmp_path / "c"),
                      batch_size=4, shard_size=5, progress=True))  # 12 samples, 3 batches, default interval
    run(TrainConfig(student=str(llava_teacher), out=str(tmp_path / "t"), stage="sft", data=str(data),
                    images=str(images), batch_size=2, max_steps=3, progress=True))
    monkeypatch.setenv("KD_PROGRESS_INTERVAL", "0")  # a line per update
    evaluate(llava_teacher, str(data), str(images), batch_size=4, max_new_tokens=2, progress=True)
    text = log_stderr.getvalue()
    assert "\r" not in text  # neither kd's bars nor transformers' weight-loading bars
    assert progress_lines(text, "kd cache build") == ["12/12 sample (100%), " + progress_lines(
        text, "kd cache build")[0].split(", ", 1)[1]]  # a short run: only the closing line
    assert progress_lines(text, "kd cache build")[0].endswith("skipped=0")
    train = progress_lines(text, "kd train sft")
    assert len(train) == 1 and train[0].startswith("3/3 step (100%)") and "loss=" in train[0]
    ev = progress_lines(text, "eval")
    assert len(ev) == 12 and ev[-1].startswith("12/12 sample (100%)")  # the last update's line ends it


@pytest.mark.slow
def test_a_cli_build_logged_to_a_file(tmp_path, llava_teacher, tiny_data):
    """The real thing: `kd cache build` with stderr redirected to a file."""
    data, images = tiny_data
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "KD_PROGRESS")}
    env.update(OMP_NUM_THREADS="1", KD_PROGRESS_INTERVAL="0")
    with open(tmp_path / "build.log", "w") as log:
        r = subprocess.run([sys.executable, "-m", "kd_cli.main", "cache", "build", "--teacher", str(llava_teacher),
                            "--data", str(data), "--images", str(images), "--out", str(tmp_path / "c"),
                            "--batch-size", "1"], stderr=log, stdout=subprocess.DEVNULL, env=env, timeout=300)
    text = (tmp_path / "build.log").read_text()
    assert r.returncode == 0, text[-3000:]
    assert "\r" not in text
    lines = progress_lines(text, "kd cache build")
    assert len(lines) == 12 and lines[-1].startswith("12/12 sample (100%)")
    assert len(text.splitlines()) <= len(lines) + 10  # the log holds little else
