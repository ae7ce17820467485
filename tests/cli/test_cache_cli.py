"""`kd cache build|info|verify` through the real typer app (`kd demo`: tests/kd_eval/test_demo.py)."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from kd_cli.main import app

runner = CliRunner()


def test_help_lists_commands():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "cache" in r.output and "demo" in r.output
    r = runner.invoke(app, ["cache", "build", "--help"])
    assert r.exit_code == 0
    for flag in ("--teacher", "--data", "--images", "--out", "--top-k", "--visual-top-k", "--batch-size",
                 "--max-length", "--shard-size", "--device", "--config"):
        assert flag in r.output


def test_build_from_config_file_with_flag_override(tmp_path, llava_teacher, tiny_data):
    data, images = tiny_data
    cfg = tmp_path / "build.yaml"
    cfg.write_text(yaml.safe_dump({"teacher": str(llava_teacher), "data": str(data), "images": str(images),
                                   "top_k": 16, "visual_top_k": 4, "shard_size": 100}))
    out = tmp_path / "cache"
    r = runner.invoke(app, ["cache", "build", "--config", str(cfg), "--top-k", "8", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "cache complete" in r.output
    saved = json.loads((out / "build_config.json").read_text())
    assert saved["top_k"] == 8 and saved["visual_top_k"] == 4  # flag beat file; file beat default

    r = runner.invoke(app, ["cache", "info", str(out), "--json"])
    assert r.exit_code == 0
    d = json.loads(r.output)
    assert d["k"] == {"text": 8, "visual": None} and d["bytes_per_text_row"] > 0  # visual rows: sampled, no k
    assert d["targets"] == {"text": "topk", "visual": "sampled"} and d["samples_per_row"]["visual"] == 50
    r = runner.invoke(app, ["cache", "info", str(out)])
    assert r.exit_code == 0 and "bytes/row" in r.output
    assert "(top-8)" in r.output and "(sampled, 50 draws)" in r.output, r.output
    assert "serves students of other tokenizers (kd train --cross-tokenizer)" in r.output and d["self_contained"]

    r = runner.invoke(app, ["cache", "verify", str(out)])
    assert r.exit_code == 0 and r.output.startswith("OK")
    shard = next((out / "shards").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-10])
    r = runner.invoke(app, ["cache", "verify", str(out)])
    assert r.exit_code == 1 and shard.name in r.output


def test_bad_arguments_exit_2_with_a_message(tmp_path, llava_teacher, tiny_data):
    data, images = tiny_data
    r = runner.invoke(app, ["cache", "build", "--teacher", str(tmp_path / "nope"), "--data", str(data),
                            "--images", str(images), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["cache", "build", "--teacher", str(llava_teacher), "--data", str(data),
                            "--images", str(images), "--out", str(tmp_path / "o"), "--top-k", "0"])
    assert r.exit_code == 2 and "error: --top-k must be a positive integer, got 0" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: x\nbogus_key: 1\n")
    r = runner.invoke(app, ["cache", "build", "--config", str(bad)])
    assert r.exit_code == 2 and "bogus_key" in r.output
