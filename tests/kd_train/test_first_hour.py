"""What a new user meets in the first hour of `kd train`, each seen on an earlier main: a crash on text-only
micro-batches, the documented baseline refused, changed settings silently ignored on a rerun, a corrupt shard not
named, empty steps logged as perfect ones, resumed steps logged twice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kd_cache import open_cache
from kd_cache.build import BuildConfig, build
from kd_cli.main import app
from kd_eval.tiny import make_tiny_teacher
from kd_train.train import TrainConfig, run

from tests.conftest import write_records

runner = CliRunner()


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("student"), "llava", hidden_size=32, num_layers=1, seed=7)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, llava_teacher, tiny_data):
    """(data, images, cache): the tiny records with text-only conversations between them (LLaVA's mix has ~40K),
    and the cache the llava teacher built of them."""
    data, images = tiny_data
    records = json.loads(Path(data).read_text())
    text_only = [{"id": f"text-{i}", "conversations": [{"from": "human", "value": f"Say the number {i}."},
                                                       {"from": "gpt", "value": f"{i}"}]} for i in range(6)]
    mixed = [r for pair in zip(records[:6], text_only) for r in pair] + records[6:]
    root = tmp_path_factory.mktemp("mixed")
    path = write_records(root, mixed)
    out = root / "cache"
    build(BuildConfig(teacher=str(llava_teacher), data=str(path), images=str(images), out=str(out), shard_size=6,
                      progress=False))
    return path, images, out


def steps(out: Path) -> list[dict]:
    return [d for d in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if d.get("step") is not None]


def test_dpt_trains_on_through_micro_batches_with_no_image(tmp_path, student, mixed):
    """With only the projector training, a text-only micro-batch's loss reaches no trainable parameter: the step
    still runs (every rank would still join the gradient all-reduce) instead of failing in backward."""
    data, images, cache = mixed
    out = tmp_path / "dpt"
    [final] = run(TrainConfig(student=str(student), out=str(out), stage="dpt", cache=str(cache), data=str(data),
                              images=str(images), batch_size=1, progress=False, shuffle_buffer=0))
    assert (Path(final) / "config.json").exists()
    assert len(steps(out)) == len(open_cache(str(cache)))  # every micro-batch a step, text-only ones included


def test_the_documented_baseline_needs_no_cache(tmp_path, student, tiny_data):
    data, images = tiny_data
    outs = run(TrainConfig(student=str(student), out=str(tmp_path / "base"), recipe="baseline", data=str(data),
                           images=str(images), batch_size=4, max_steps=1, progress=False))
    assert [Path(o).parent.name for o in outs] == ["dpt", "sft", "dft"]


def test_a_rerun_resumes_the_same_run_or_refuses_other_settings(tmp_path, student, tiny_data, llava_cache):
    data, images = tiny_data
    out = tmp_path / "run"
    argv = ["train", "--student", str(student), "--stage", "dft", "--cache", str(llava_cache), "--data", str(data),
            "--images", str(images), "--batch-size", "4", "--max-steps", "2", "--out", str(out), "--quiet"]
    first = runner.invoke(app, argv)
    assert first.exit_code == 0 and f"student written: {out / 'final'}" in first.output, first.output
    again = runner.invoke(app, argv)  # the same command: nothing to do, and it says so
    assert again.exit_code == 0 and "student written" not in again.output
    assert f"stage dft already finished: {out / 'final'}" in again.output
    saved = (out / "train_config.json").read_text()
    changed = runner.invoke(app, argv[:-3] + ["--max-steps", "3", "--lr", "5e-4", "--out", str(out), "--quiet"])
    assert changed.exit_code == 2, changed.output
    msg = " ".join(changed.output.split())
    assert msg.startswith(f"error: {out} holds a run started with other settings (")
    assert "--lr: the run has None, this command 0.0005" in msg and "--max-steps: the run has 2, this command 3" in msg
    assert "--overwrite" in msg and (out / "train_config.json").read_text() == saved  # the config still tells the truth
    over = runner.invoke(app, argv[:-3] + ["--max-steps", "3", "--out", str(out), "--overwrite", "--quiet"])
    assert over.exit_code == 0, over.output
    assert json.loads((out / "train_config.json").read_text())["config"]["max_steps"] == 3
    assert [d["step"] for d in steps(out)] == [1, 2, 3]


def test_a_corrupt_shard_met_in_training_is_named(tmp_path, student, tiny_data, llava_cache):
    data, images = tiny_data
    cache = tmp_path / "cache"
    shutil.copytree(llava_cache, cache)
    name = open_cache(str(cache)).shards[0].name
    path = cache / name
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3: len(raw) // 3 + 64] = b"\xde\xad\xbe\xef" * 16  # inside the data pages: a CRC failure
    path.write_bytes(bytes(raw))
    r = runner.invoke(app, ["train", "--student", str(student), "--stage", "dft", "--cache", str(cache), "--data",
                            str(data), "--images", str(images), "--out", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 2, r.output
    line = " ".join(r.output.split())
    assert line.startswith(f"error: cache shard {name} is corrupt or unreadable") and "kd cache verify" in line


def test_empty_steps_are_not_counted_and_skips_are_reported_while_training(tmp_path, student, tiny_data, caplog):
    """SFT over records of which some lost their image: at batch 1 a skipped record makes a step with nothing to
    train on; it is neither counted nor logged as a perfect step, and each skip is reported when it happens."""
    data, images = tiny_data
    records = json.loads(Path(data).read_text())
    for r in records[:3]:
        r["image"] = "gone.png"
    path = write_records(tmp_path / "d", records)
    out = tmp_path / "sft"
    with caplog.at_level("WARNING", logger="kd_train"):
        run(TrainConfig(student=str(student), out=str(out), stage="sft", data=str(path), images=str(images),
                        batch_size=1, progress=False))
    logged = steps(out)
    assert [d["step"] for d in logged] == list(range(1, len(records) - 3 + 1))
    assert all(d["text_rows"] > 0 and d["ce"] > 0 for d in logged)
    warned = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len([w for w in warned if "gone.png" in w or "image" in w]) >= 3, warned
    stage = json.loads((out / "final" / "kd_stage.json").read_text())
    assert stage["data_stats"]["skipped_samples"] == 3 and stage["steps"] == len(records) - 3


def test_a_resumed_run_logs_each_step_once(tmp_path, student, tiny_data, llava_cache):
    """A run killed after checkpoint 2 had logged step 3: the resume starts from 2 and step 3 appears once."""
    from kd_train.checkpoint import CHECKPOINT_DIR

    data, images = tiny_data
    cfg = dict(student=str(student), stage="dft", cache=str(llava_cache), data=str(data), images=str(images),
               batch_size=2, progress=False, shuffle_buffer=4, checkpoint_every=2, max_steps=4, keep_checkpoints=5)
    whole = tmp_path / "whole"
    run(TrainConfig(out=str(whole), **cfg))
    out = tmp_path / "killed"
    shutil.copytree(whole, out)
    shutil.rmtree(out / "final")
    for ckpt in sorted((out / CHECKPOINT_DIR).iterdir())[1:]:  # the kill came after step 3's line, before step 4
        shutil.rmtree(ckpt)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    run(TrainConfig(out=str(out), **cfg))
    assert [d["step"] for d in steps(out)] == [1, 2, 3, 4]


def test_two_process_dpt_with_text_only_micro_batches(tmp_path, student, mixed):
    """Under DDP one rank's micro-batch may have no image while the other's has: both ranks still run backward
    over the same parameters (a rank that skipped it would hang the all-reduce), and the run ends."""
    import sys

    from tests.conftest import launcher_env, run_in_group

    data, images, cache = mixed
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kd_cli.main", "train",
           "--stage", "dpt", "--student", str(student), "--cache", str(cache), "--data", str(data), "--images",
           str(images), "--out", str(out), "--batch-size", "1", "--shuffle-buffer", "0", "--quiet"]
    r = run_in_group(cmd, env=launcher_env(KD_DIST_TIMEOUT="180"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(steps(out)) >= 6 and (out / "final" / "config.json").exists()
