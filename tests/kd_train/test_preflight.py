"""What `kd train` / `kd eval` / `kd cache build` can check without a model fails before any model is loaded, with
a message naming the real problem (a missing model folder is not answered with the hub's repo-id rule)."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from kd_cache import format as fmt
from kd_cache.paths import ModelNotFoundError, check_model_path, looks_like_path
from kd_cli.main import app

runner = CliRunner()
OFFLINE_HINT = "a hub id like org/name needs the hub, which is unreachable offline"


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any attempt to load weights fails the test: the checks must come first."""
    import transformers

    import kd_eval.evaluate  # noqa: F401 - modules that bind load_student are imported before the patch,
    import kd_train.engine  # noqa: F401   so that none of them keeps the patched loader after the test
    import kd_train.student

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(kd_train.student, "load_student", forbidden)
    for cls in (transformers.AutoModelForImageTextToText, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", forbidden)


def one_line(r) -> str:
    return " ".join(r.output.split())


def test_what_looks_like_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("/nonexistent", "./model", "../model", "~/model", "runs/a/final", ".", "students/qwen"):
        if name == "students/qwen":
            (tmp_path / "students").mkdir()
        assert looks_like_path(name), name
    for name in ("org/name", "gpt2", "HuggingFaceTB/SmolLM2-135M"):
        assert not looks_like_path(name), name
        check_model_path(name)  # hub ids pass unchecked
    with pytest.raises(ModelNotFoundError) as e:
        check_model_path("/nonexistent")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    assert str(e.value) == f"model folder /nonexistent does not exist ({OFFLINE_HINT}: HF_HUB_OFFLINE=1)"
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_model_path("weights.bin")


def test_missing_model_folders_are_named_by_every_command(tmp_path, tiny_data, no_model_loads):
    data, images = tiny_data
    r = runner.invoke(app, ["train", "--student", "/nonexistent", "--stage", "sft", "--data", str(data),
                            "--images", str(images), "--out", str(tmp_path / "run")])
    assert r.exit_code == 2, r.output
    assert "error: student folder /nonexistent does not exist" in one_line(r) and OFFLINE_HINT in one_line(r)
    assert "Repo id" not in r.output and not (tmp_path / "run").exists()
    r = runner.invoke(app, ["eval", "--model", "/nonexistent", "--data", str(data), "--images", str(images)])
    assert r.exit_code == 2, r.output
    assert "error: model folder /nonexistent does not exist" in one_line(r) and "Repo id" not in r.output
    r = runner.invoke(app, ["cache", "build", "--teacher", "/nonexistent", "--data", str(data), "--images",
                            str(images), "--out", str(tmp_path / "cache")])
    assert r.exit_code == 2, r.output
    assert "error: model folder /nonexistent does not exist" in one_line(r) and not (tmp_path / "cache").exists()


def test_compose_names_a_missing_llm_folder_before_loading_the_tower(tmp_path, llava_teacher, no_model_loads):
    from kd_train.student import compose_student

    with pytest.raises(ModelNotFoundError, match="llm folder /nonexistent/llm does not exist"):
        compose_student(tmp_path / "s", vision=str(llava_teacher), llm="/nonexistent/llm")


def test_train_fails_fast_on_missing_or_incomplete_inputs(tmp_path, llava_teacher, tiny_data, no_model_loads):
    data, images = tiny_data
    base = ["train", "--student", str(llava_teacher), "--images", str(images), "--batch-size", "2"]
    out = tmp_path / "run"

    def refused(*args: str) -> str:
        r = runner.invoke(app, base + list(args))
        assert r.exit_code == 2, r.output
        assert r.output.lstrip().startswith("error: ") and "Traceback" not in r.output
        assert not out.exists()  # nothing written
        return one_line(r)

    assert f"error: cache {tmp_path / 'nope'} does not exist" in refused(
        "--stage", "dft", "--data", str(data), "--cache", str(tmp_path / "nope"), "--out", str(out))
    partial = tmp_path / "partial"  # a build still running (or killed): no manifest yet
    (partial / fmt.SHARD_DIR).mkdir(parents=True)
    (partial / fmt.CONFIG_NAME).write_text("{}")
    assert f"{partial} is not a complete kd cache: {fmt.MANIFEST_NAME} is missing" in refused(
        "--stage", "dft", "--data", str(data), "--cache", str(partial), "--out", str(out))
    assert f"error: data file {tmp_path / 'none.json'} does not exist" in refused(
        "--stage", "sft", "--data", str(tmp_path / "none.json"), "--out", str(out))
    msg = refused("--recipe", "llava-kd", "--data", str(data), "--cache", str(tmp_path / "nope"), "--out", str(out))
    assert f"cache (stage dpt) {tmp_path / 'nope'} does not exist" in msg
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert f"output folder {blocker / 'run'} cannot be created: {blocker} is a file" in refused(
        "--stage", "sft", "--data", str(data), "--out", str(blocker / "run"))
    assert f"image folder {tmp_path / 'pics'} does not exist" in one_line(runner.invoke(app, [
        "train", "--student", str(llava_teacher), "--images", str(tmp_path / "pics"), "--stage", "sft", "--data",
        str(data), "--out", str(out)]))


def test_a_finished_stage_needs_its_inputs_no_more(tmp_path, llava_teacher, tiny_data, llava_cache, monkeypatch):
    """A recipe rerun after DPT finished does not ask for DPT's cache any more (only the stages still to run)."""
    from kd_train import train

    data, images = tiny_data
    out = tmp_path / "run"
    (out / "dpt" / "final").mkdir(parents=True)
    (out / "dpt" / "final" / "config.json").write_text("{}")
    cfg = train.TrainConfig(student="/gone", out=str(out), recipe="llava-kd", data=str(data), images=str(images),
                            cache=str(llava_cache), dpt_cache=str(tmp_path / "deleted"), progress=False)
    train.preflight(cfg)  # neither the deleted DPT cache nor the gone initial student is needed any more
    os.remove(out / "dpt" / "final" / "config.json")
    with pytest.raises(FileNotFoundError, match="student folder /gone does not exist"):
        train.preflight(cfg)
