"""`kd demo --quick` end to end as users run it (the `kd` CLI in its own process group: it starts one process per
student run): the table over paired seeds, the comparison recomputed from every run's predictions, the report, the
caches, reuse on rerun, more seeds later, and a failing student run."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import run_in_group

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STAGES = ("dpt", "sft", "dft")
RECIPES = ("baseline", "llava-kd")


def kd(*args: str, timeout: float = 600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "KD_PROGRESS": "lines"}
    return run_in_group([sys.executable, "-m", "kd_cli.main", *args], env=env, timeout=timeout)


def _table_header(output: str) -> list[str]:
    line = next(line for line in output.splitlines() if line.startswith("question type"))
    return [c.strip() for c in line[len("question type"):].split("  ") if c.strip()]


def _mean(xs):
    return sum(xs) / len(xs)


def _check_comparison(out: Path, seeds: list[int]) -> dict:
    """results.json's comparison equals one recomputed here from each run's own eval.json (every prediction)."""
    results = json.loads((out / "report" / "results.json").read_text(encoding="utf-8"))
    c = results["comparison"]
    assert c["seeds"] == seeds and results["seeds"] == seeds
    per_seed_acc, per_seed_nll = [], []
    for k in seeds:
        ev = {r: json.loads((out / "runs" / f"seed-{k}" / r / "eval.json").read_text()) for r in RECIPES}
        acc = {r: sum(p["correct"] for p in ev[r]["predictions"]) / len(ev[r]["predictions"]) for r in RECIPES}
        per_seed_acc.append(acc["llava-kd"] - acc["baseline"])
        per_seed_nll.append(ev["llava-kd"]["overall"]["answer_nll"] - ev["baseline"]["overall"]["answer_nll"])
    assert c["accuracy"]["per_seed"] == pytest.approx(per_seed_acc, abs=1e-12)
    assert c["answer_nll"]["per_seed"] == pytest.approx(per_seed_nll, abs=1e-12)
    for key, diffs in (("accuracy", per_seed_acc), ("answer_nll", per_seed_nll)):
        m = _mean(diffs)
        sd = (sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5
        t975 = {2: 12.706, 3: 4.303}[len(diffs)]
        assert c[key]["mean"] == pytest.approx(m, abs=1e-12)
        assert c[key]["lo"] == pytest.approx(m - t975 * sd / len(diffs) ** 0.5, abs=1e-9)
        assert c[key]["hi"] == pytest.approx(m + t975 * sd / len(diffs) ** 0.5, abs=1e-9)
    return results


@pytest.mark.slow
def test_demo_quick_end_to_end_rerun_more_seeds_and_a_failing_run(tmp_path):
    out = tmp_path / "demo"
    r = kd("demo", "--out", str(out), "--quick")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _table_header(r.stdout) == ["teacher", "baseline (2 seeds)", "llava-kd (2 seeds)"]
    for row in ("count", "colour", "spatial", "exists", "choice", "describe", "overall", "answer NLL"):
        assert any(line.startswith(row) for line in r.stdout.splitlines()), row
    assert "llava-kd - baseline over 2 paired seeds" in r.stdout and "95 % t-interval" in r.stdout
    assert "  accuracy " in r.stdout and "  answer NLL " in r.stdout and "smoke run" in r.stdout
    # one progress line per finished student run, each in its own process
    assert sum("[kd demo] seed " in line for line in r.stderr.splitlines()) == 4, r.stderr[-2000:]

    for k in (0, 1):
        assert (out / "students" / f"seed-{k}" / "init" / "config.json").exists()
        for recipe in RECIPES:
            run = out / "runs" / f"seed-{k}" / recipe
            for st in STAGES:
                assert list((run / st / "final").glob("*.safetensors")), (k, recipe, st)
            assert (run / "log.txt").exists() and (run / "result.json").exists()
    # the two seeds' students differ (a seed is an init and a data order, not a copy)
    a, b = (json.loads((out / "runs" / f"seed-{k}" / "baseline" / "eval.json").read_text()) for k in (0, 1))
    assert a["overall"]["answer_nll"] != b["overall"]["answer_nll"]

    results = _check_comparison(out, [0, 1])
    assert results["mode"] == "quick" and set(results["accuracy"]) == {"teacher", *RECIPES}
    assert results["final_losses"]["baseline"]["dft"]["mdist_text"] is None  # the baseline is CE only
    assert "mdist_visual" in results["final_losses"]["llava-kd"]["dpt"]
    assert not any(t["reused"] for t in results["timings"].values())

    report = out / "report"
    md = (report / "report.md").read_text(encoding="utf-8")
    assert "Smoke run" in md and "| **overall** (n=60)" in md and "Per seed (llava-kd − baseline)" in md
    assert "95 % t-interval" in md
    pngs = ["accuracy.png", "losses.png", "loss_teacher_sft.png"] + [f"loss_{r}_{s}.png" for r in RECIPES
                                                                      for s in STAGES]
    for name in pngs:
        assert (report / name).read_bytes()[:8] == PNG_MAGIC, name

    # the caches the demo built are valid kd caches
    for cache in ("caption", "instruct"):
        v = kd("cache", "verify", str(out / "cache" / cache), timeout=120)
        assert v.returncode == 0 and v.stdout.startswith("OK"), v.stdout + v.stderr

    # Rerun into the same folder: everything is reused and the same table comes out.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/result.json")}
    r2 = kd("demo", "--out", str(out), "--quick", "--quiet")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stdout.split("wall time")[0] == r.stdout.split("wall time")[0]
    timings = json.loads((report / "results.json").read_text())["timings"]
    assert all(t["reused"] for name, t in timings.items() if name != "report"), timings

    # A third seed later: only its two runs train; one of them fails (a broken init): exit 1 naming its log,
    # and no process outlives the launcher (run_in_group checks).
    broken = out / "students" / "seed-2" / "init"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{not json")
    r3 = kd("demo", "--out", str(out), "--quick", "--seeds", "3", "--jobs", "1")
    assert r3.returncode == 1, r3.stdout + r3.stderr[-3000:]
    err = r3.stderr.strip().splitlines()
    assert any(line.startswith("error: student run seed 2 baseline failed (exit 1); log: ") for line in err), err
    assert "Traceback" not in r3.stderr.split("error: student run")[0]
    assert not (out / "runs" / "seed-2" / "llava-kd" / "result.json").exists()  # stopped, not started
    import shutil

    shutil.rmtree(out / "students" / "seed-2")
    r4 = kd("demo", "--out", str(out), "--quick", "--seeds", "3")
    assert r4.returncode == 0, r4.stderr[-3000:]
    assert "llava-kd - baseline over 3 paired seeds" in r4.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # seeds 0 and 1 were not rerun
    assert sum("[kd demo] seed 2 " in line for line in r4.stderr.splitlines()) == 2
    _check_comparison(out, [0, 1, 2])

    # A folder holding the quick demo is not mixed with a full run.
    r5 = kd("demo", "--out", str(out), "--quiet", timeout=120)
    assert r5.returncode == 2 and "other settings" in r5.stderr


def test_demo_options_are_validated():
    r = kd("demo", "--seeds", "0", timeout=120)
    assert r.returncode == 2 and "seeds must be a positive integer" in r.stderr
    r = kd("demo", "--jobs", "-1", timeout=120)
    assert r.returncode == 2 and "jobs must be a positive integer" in r.stderr
