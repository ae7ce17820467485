"""`kd demo --quick` end to end through the real typer app: table, report folder, every model, reuse on rerun."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from kd_cli.main import app

runner = CliRunner()

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STAGE_FINALS = ["teacher/sft/final"] + [f"runs/{r}/{s}/final" for r in ("baseline", "llava-kd")
                                        for s in ("dpt", "sft", "dft")]


def _table_header(output: str) -> list[str]:
    line = next(line for line in output.splitlines() if line.startswith("question type"))
    return line.split()[2:]


@pytest.mark.slow
def test_demo_quick_end_to_end_then_rerun_reuses_every_step(tmp_path):
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    r = runner.invoke(app, ["demo", "--out", str(out), "--quick"])
    first = time.perf_counter() - t0
    assert r.exit_code == 0, r.output
    assert _table_header(r.output) == ["teacher", "baseline", "llava-kd"]
    for row in ("count", "colour", "spatial", "exists", "choice", "describe", "overall"):
        assert any(line.startswith(row) for line in r.output.splitlines()), row
    assert "gap recovered" in r.output and "smoke run" in r.output

    for final in STAGE_FINALS:
        assert (out / final / "config.json").exists(), final
        assert list((out / final).glob("*.safetensors")), final
    for cache in ("caption", "instruct"):
        assert (out / "cache" / cache / "manifest.json").exists()

    report = out / "report"
    md = (report / "report.md").read_text(encoding="utf-8")
    assert "Smoke run" in md and "| **overall**" in md and "![accuracy" in md
    pngs = ["accuracy.png", "losses.png", "loss_teacher_sft.png"] + [
        f"loss_{r}_{s}.png" for r in ("baseline", "llava-kd") for s in ("dpt", "sft", "dft")]
    for name in pngs:
        assert (report / name).read_bytes()[:8] == PNG_MAGIC, name
        assert f"]({name})" in md or name in ("losses.png",)
    results = json.loads((report / "results.json").read_text(encoding="utf-8"))
    assert results["mode"] == "quick" and set(results["accuracy"]) == {"teacher", "baseline", "llava-kd"}
    for name, acc in results["accuracy"].items():
        assert 0.0 <= acc["overall"] <= 1.0, name
        assert results["results"][name]["n"] == results["settings"]["n_test"]
    assert "mdist_visual" in results["final_losses"]["llava-kd"]["dpt"]
    assert results["final_losses"]["baseline"]["dft"]["mdist_text"] is None  # the baseline is CE only
    assert not any(t["reused"] for t in results["timings"].values())
    assert results["wall_seconds"] > 0

    # Rerun into the same folder: every step is reused, the same table comes out, and it is fast.
    t0 = time.perf_counter()
    r2 = runner.invoke(app, ["demo", "--out", str(out), "--quick", "--quiet"])
    second = time.perf_counter() - t0
    assert r2.exit_code == 0, r2.output
    assert r2.output.split("wall time")[0] == r.output[r.output.index("question type"):].split("wall time")[0]
    timings = json.loads((report / "results.json").read_text(encoding="utf-8"))["timings"]
    assert all(t["reused"] for name, t in timings.items() if name != "report"), timings
    assert second < first / 2, (first, second)

    # A folder holding the quick demo is not mixed with a full run.
    r3 = runner.invoke(app, ["demo", "--out", str(out), "--quiet"])
    assert r3.exit_code == 2 and "other settings" in r3.output
