"""`kd train --trackers`: jsonl plus any tracker accelerate supports by name, refused before training when unknown or
not installed; every tracker gets the same per-step values (each loss term, the loss, rows, lr, tokens/s). Checked
with TensorBoard (event files read back) and MLflow with a local file store (read back with MlflowClient)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kd_cli.main import app
from kd_eval.tiny import make_tiny_teacher
from kd_train.tracking import ACCELERATE_TRACKERS, check_trackers, mlflow_local_uri, parse_trackers

runner = CliRunner()

# what every logged training step carries (docs/training.md, "Trackers and logged metrics")
STEP_KEYS = ("ce", "mdist_text", "mdist_visual", "rdist", "loss", "text_rows", "visual_rows", "lr",
             "tokens_per_second")


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("student"), "llava", hidden_size=32, num_layers=1, seed=7)


def argv(student, tiny_data, cache, out, *extra) -> list[str]:
    data, images = tiny_data
    return ["train", "--stage", "dft", "--student", str(student), "--cache", str(cache), "--data", str(data),
            "--images", str(images), "--out", str(out), "--batch-size", "4", "--quiet", *extra]


def steps(out: Path) -> dict[int, dict]:
    return {d["step"]: d for d in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if d.get("step") is not None}


def test_tracker_names_are_parsed_and_checked_without_accelerate():
    assert parse_trackers(" jsonl, TensorBoard ,jsonl,,") == ["jsonl", "tensorboard"]
    assert check_trackers("jsonl,tensorboard") == ["jsonl", "tensorboard"]
    assert set(ACCELERATE_TRACKERS) >= {"tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive",
                                        "swanlab", "trackio"}
    from accelerate.utils import LoggerType

    assert {str(t.value) for t in LoggerType} - {"all"} <= set(ACCELERATE_TRACKERS)  # the table covers accelerate's


@pytest.mark.parametrize("value,needle", [("jsonl,nosuch", "'nosuch'"), ("all", "all is not accepted")])
def test_an_unknown_tracker_is_refused_before_training(value, needle, tmp_path, student, tiny_data, llava_cache):
    out = tmp_path / "o"
    r = runner.invoke(app, argv(student, tiny_data, llava_cache, out, "--trackers", value))
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "--trackers" in lines[0] and needle in lines[0], r.output
    assert not (out / "metrics.jsonl").exists()


def test_a_tracker_whose_package_is_missing_is_refused_naming_the_package(tmp_path, student, tiny_data, llava_cache):
    missing = next((n for n, (mods, _) in ACCELERATE_TRACKERS.items()
                    if not any(importlib.util.find_spec(m) for m in mods)), None)
    if missing is None:
        pytest.skip("every tracker accelerate knows is installed here")
    out = tmp_path / "o"
    r = runner.invoke(app, argv(student, tiny_data, llava_cache, out, "--trackers", f"jsonl,{missing}"))
    assert r.exit_code == 2, r.output
    [line] = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert "--trackers" in line and f"pip install {ACCELERATE_TRACKERS[missing][1]}" in line, line
    assert not (out / "metrics.jsonl").exists()


def _tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # accelerate's TensorBoard tracker logs to <out>/<project> (the hyperparameters in a subfolder of their own)
    assert list(folder.glob("events.out.tfevents*")), sorted(map(str, folder.rglob("*")))
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _mlflow_metrics(uri: str) -> dict[str, dict[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    [exp] = [e for e in client.search_experiments() if e.name == "kd-dft"]
    [run] = client.search_runs([exp.experiment_id])
    return {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            for key in run.data.metrics}


def test_tensorboard_and_mlflow_log_what_metrics_jsonl_logs(tmp_path, monkeypatch, student, tiny_data, llava_cache):
    pytest.importorskip("mlflow")
    uri = "file:" + str(tmp_path / "mlruns")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # a local file store: works offline
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps it in maintenance mode, behind this opt-in
    out = tmp_path / "run"
    r = runner.invoke(app, argv(student, tiny_data, llava_cache, out, "--max-steps", "3",
                                "--trackers", "jsonl,tensorboard,mlflow"))
    assert r.exit_code == 0, r.output
    logged = steps(out)
    assert sorted(logged) == [1, 2, 3]
    for d in logged.values():
        assert set(STEP_KEYS) <= set(d), sorted(d)
        assert d["mdist_visual"] > -0.5 and d["tokens_per_second"] > 0 and d["visual_rows"] > 0
    scalars = {"tensorboard": _tensorboard_scalars(out / "kd-dft"), "mlflow": _mlflow_metrics(uri)}
    for name, got in scalars.items():
        numeric = {k for d in logged.values() for k, v in d.items() if k != "step" and isinstance(v, (int, float))}
        assert numeric <= set(got), (name, sorted(numeric - set(got)))
        for key in numeric:
            want = {s: float(d[key]) for s, d in logged.items() if key in d}
            assert sorted(got[key]) == sorted(want), (name, key)  # the same steps
            for s, v in want.items():  # TensorBoard stores float32
                assert math.isclose(got[key][s], v, rel_tol=1e-6, abs_tol=1e-9), (name, key, s, got[key][s], v)


def test_mlflow_without_a_tracking_uri_writes_a_local_store_under_out(tmp_path, monkeypatch, student, tiny_data,
                                                                      llava_cache):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    r = runner.invoke(app, argv(student, tiny_data, llava_cache, out, "--max-steps", "1", "--trackers", "mlflow"))
    assert r.exit_code == 0, r.output
    assert not (out / "metrics.jsonl").exists()  # jsonl not asked for
    got = _mlflow_metrics(mlflow_local_uri(str(out)))
    assert str(out) in mlflow_local_uri(str(out))
    assert set(STEP_KEYS) <= set(got) and got["loss"].keys() == {1}
