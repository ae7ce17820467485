"""A student whose tokenizer differs from the teacher's trains from the teacher's cache (`--cross-tokenizer`): its
answers are aligned to the cached ones by bytes; the response rows distil with ULD or the GOLD-style hybrid, the
visual rows with RDist; the export loads and generates."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kd_cli.main import app
from kd_eval.tiny import make_tiny_teacher
from tests.conftest import launcher_env, run_in_group

runner = CliRunner()


@pytest.fixture(scope="module")
def other_student(tmp_path_factory) -> Path:
    """A LLaVA student with its own tokenizer (another vocabulary and segmentation) and the teacher's vision size."""
    return make_tiny_teacher(tmp_path_factory.mktemp("other"), "llava", hidden_size=32, num_layers=1, vocab_size=600,
                             seed=11)


def steps(out: Path) -> list[dict]:
    return [d for d in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if d.get("step") is not None]


def test_another_tokenizer_is_refused_naming_the_option(tmp_path, other_student, tiny_data, llava_cache):
    data, images = tiny_data
    r = runner.invoke(app, ["train", "--student", str(other_student), "--stage", "dft", "--cache", str(llava_cache),
                            "--data", str(data), "--images", str(images), "--out", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 2 and "tokenizer vocabulary differs" in r.output and "--cross-tokenizer" in r.output


@pytest.mark.parametrize("mode", ["uld", "hybrid"])
def test_dft_across_tokenizers(mode, tmp_path, other_student, tiny_data, llava_cache):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    data, images = tiny_data
    out = tmp_path / mode
    r = runner.invoke(app, ["train", "--student", str(other_student), "--stage", "dft", "--cache", str(llava_cache),
                            "--data", str(data), "--images", str(images), "--out", str(out), "--batch-size", "2",
                            "--cross-tokenizer", mode, "--quiet"])
    assert r.exit_code == 0, r.output
    logged = steps(out)
    assert len(logged) == 6 and all(d["mdist_text"] > 0 and d["rdist"] >= 0 for d in logged)
    assert not any("mdist_visual" in d for d in logged)  # off across tokenizers
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["config"]["cross_tokenizer"] == mode and saved["loss"]["mdist_visual_weight"] == 0.0
    model = AutoModelForImageTextToText.from_pretrained(out / "final")
    processor = AutoProcessor.from_pretrained(out / "final")
    ids = processor.tokenizer("hello", return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 3


def test_every_stage_of_the_recipe_across_tokenizers_two_processes(tmp_path, other_student, tiny_data, llava_cache):
    data, images = tiny_data
    out = tmp_path / "recipe"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kd_cli.main", "train",
           "--recipe", "llava-kd", "--student", str(other_student), "--cache", str(llava_cache), "--data", str(data),
           "--images", str(images), "--out", str(out), "--batch-size", "2", "--cross-tokenizer", "hybrid", "--quiet"]
    r = run_in_group(cmd, env=launcher_env(KD_DIST_TIMEOUT="180"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("dpt", "sft", "dft"):
        assert (out / stage / "final" / "config.json").exists()
    assert all(d["mdist_text"] > 0 for d in steps(out / "dft"))
