"""The mistakes a new user makes in the first hour, each answered with one `error:` line (exit 2) that names the
flag as typed and says what to do, before any model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kd_cli.main import app
from tests.kd_train.test_preflight import no_model_loads  # noqa: F401 - a fixture, used by name

runner = CliRunner()


def refused(argv: list[str]) -> str:
    """The one line `kd` answers `argv` with (exit 2, nothing else printed)."""
    r = runner.invoke(app, argv)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, r.exit_code, r.output)
    return lines[0]


def test_a_cache_folder_that_does_not_exist_is_named_as_such(tmp_path):
    line = refused(["cache", "info", str(tmp_path / "nope")])
    assert line.startswith(f"error: {tmp_path / 'nope'} does not exist") and "incomplete" not in line


def test_info_json_gives_no_k_for_sampled_rows(llava_cache):
    r = runner.invoke(app, ["cache", "info", str(llava_cache), "--json"])
    d = json.loads(r.output)
    assert d["targets"] == {"text": "topk", "visual": "sampled"}
    assert d["k"] == {"text": 64, "visual": None} and d["samples_per_row"]["visual"] == 50


def test_eval_on_a_stage_folder_points_at_its_final(tmp_path, tiny_data, no_model_loads):  # noqa: F811
    data, images = tiny_data
    stage = tmp_path / "runs" / "x" / "dft"
    (stage / "final").mkdir(parents=True)
    (stage / "final" / "config.json").write_text("{}")
    line = refused(["eval", "--model", str(stage), "--data", str(data), "--images", str(images)])
    assert f"it is a `kd train` stage folder; its student is {stage / 'final'}" in line
    line = refused(["eval", "--model", str(stage.parent), "--data", str(data), "--images", str(images)])
    assert f"it is a `kd train` recipe folder; its student is {stage / 'final'}" in line


def test_eval_names_a_missing_data_file_before_loading_the_model(tmp_path, llava_teacher, no_model_loads):  # noqa: F811
    line = refused(["eval", "--model", str(llava_teacher), "--data", str(tmp_path / "none.json")])
    assert line == f"error: data file not found: {tmp_path / 'none.json'}"


def test_compose_with_a_multimodal_llm_says_what_to_pass(tmp_path, llava_teacher):
    line = refused(["student", "compose", "--vision", str(llava_teacher), "--llm", str(llava_teacher), "--out",
                    str(tmp_path / "s")])
    assert "is a multimodal model (llava)" in line and "--llm takes the text-only causal LM" in line
    assert "as --vision" in line


def test_option_errors_name_the_flag_as_typed(tmp_path, tiny_data, llava_cache, llava_teacher):
    data, images = tiny_data
    base = ["train", "--student", str(llava_teacher), "--stage", "dft", "--cache", str(llava_cache), "--data",
            str(data), "--images", str(images), "--out", str(tmp_path / "o")]
    assert refused(base + ["--max-steps", "0"]) == "error: --max-steps must be >= 1 or None, got 0"
    assert refused(base + ["--batch-size", "0"]) == "error: --batch-size must be a positive integer, got 0"
    assert refused(base + ["--keep-best"]).startswith("error: --keep-best needs --val-data and --val-every > 0")
    assert refused(["train", "--student", "s", "--out", "o", "--data", "d"]).startswith(
        "error: give exactly one of --stage (dpt, sft, dft) or --recipe (llava-kd, baseline)")


def test_a_wrong_choice_is_one_line(tmp_path, llava_teacher, tiny_data):
    data, images = tiny_data
    line = refused(["cache", "build", "--teacher", str(llava_teacher), "--data", str(data), "--out",
                    str(tmp_path / "c"), "--targets", "topK"])
    assert line == "error: --targets must be one of topk, sampled, got 'topK'"
    assert refused(["train", "--student", "s", "--out", "o", "--data", "d", "--stage", "DFT"]).startswith(
        "error: --stage must be one of dpt, sft, dft, got 'DFT'")


@pytest.mark.parametrize("extra,says", [(["--bogus"], "No such option: --bogus"),
                                        (["..."], "Got unexpected extra argument(s) (...)")])
def test_usage_errors_of_the_real_command_are_one_line(extra, says, tmp_path):
    """click's own refusals (an unknown option, a stray argument) follow the same policy in the installed `kd`."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "kd_cli.main", "train", "--stage", "sft", *extra], capture_output=True,
                       text=True, timeout=120, env=env, cwd=tmp_path)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], r


def test_ctrl_c_says_how_to_resume(tmp_path, tiny_data, llava_cache, llava_teacher, monkeypatch):
    import kd_train.train

    def interrupted(cfg, report=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(kd_train.train, "run", interrupted)
    data, images = tiny_data
    r = runner.invoke(app, ["train", "--student", str(llava_teacher), "--stage", "dft", "--cache", str(llava_cache),
                            "--data", str(data), "--images", str(images), "--out", str(tmp_path / "o"),
                            "--checkpoint-every", "50"])
    assert r.exit_code == 130
    assert "interrupted; rerun the same command to resume from the last checkpoint (--checkpoint-every 50)" in r.output


def test_no_accelerate_info_lines_per_checkpoint(tmp_path, tiny_data, llava_cache):
    """A run that checkpoints prints its own lines, not accelerate's five INFO lines per checkpoint."""
    from kd_eval.tiny import make_tiny_teacher

    student = make_tiny_teacher(tmp_path / "student", "llava", hidden_size=32, num_layers=1, seed=7)
    data, images = tiny_data
    env = dict(os.environ, OMP_NUM_THREADS="1", KD_PROGRESS="lines")
    r = subprocess.run([sys.executable, "-m", "kd_cli.main", "train", "--student", str(student), "--stage", "dft",
                        "--cache", str(llava_cache), "--data", str(data), "--images", str(images), "--out",
                        str(tmp_path / "o"), "--batch-size", "2", "--max-steps", "3", "--checkpoint-every", "1"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "INFO accelerate" not in r.stderr and Path(tmp_path / "o" / "final" / "config.json").exists()
