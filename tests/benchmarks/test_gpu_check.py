"""benchmarks/gpu_check.py --smoke: every phase of the GPU check runs on the CPU at tiny sizes and reports numbers.

The full run needs a GPU (docs/benchmarks.md, "GPU check"); this runs the same code paths: the real
`kd_cache.build.build()` against forward-only, kd_train's engine steps (SFT, DFT from the cache, online teacher),
the two RDist forms, and `accelerate launch ... -m kd_cli.main train` through the kd_cli shim.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import launcher_env

REPO = Path(__file__).resolve().parents[2]


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and x >= 0


@pytest.mark.slow
def test_smoke_run_reports_every_phase(tmp_path):
    env = launcher_env(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(out),
                        "--work", str(tmp_path / "work")], cwd=str(REPO), env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()

    meta = res["meta"]
    assert meta["smoke"] is True
    for key in ("card", "driver", "torch", "transformers", "accelerate", "date_utc", "seconds_total"):
        assert key in meta
    assert res["setup"]["status"] == "ok"
    assert res["setup"]["tokenizer_tokens"] == 32001 and res["setup"]["vocab_rows"] == 32064
    phases = res["phases"]
    assert set(phases) == {"build", "train", "rdist", "chunked", "accelerate"}
    for name, p in phases.items():
        assert p["status"] == "ok", (name, p.get("status"), p.get("traceback", "")[-2000:])

    b = phases["build"]
    for key in ("build_over_forward", "build_loop_over_forward", "forward_seconds", "build_wall_seconds",
                "build_samples_per_second", "forward_samples_per_second", "bytes_per_sample"):
        assert _number(b[key]) and b[key] > 0, key
    assert b["cache"]["samples"] == res["setup"]["data"]["samples"]
    assert _number(b["no_gram"]["over_forward"]) and b["no_gram"]["bytes_per_sample"] < b["bytes_per_sample"]
    assert all(_number(v) for v in b["one_batch_breakdown_seconds"].values())
    assert b["gpu_util_source"] == "n/a"  # CPU: no utilisation to sample

    t = phases["train"]
    for mode in ("sft", "dft", "online"):
        assert _number(t[mode]["median_step_seconds"]) and t[mode]["tokens_per_second"] > 0
        assert len(t[mode]["step_seconds"]) == t["timed_steps"]
    assert _number(t["dft_over_sft"]) and _number(t["online_over_dft"])
    assert t["batch"]["visual_rows"] > 0 and t["batch"]["gram_samples"] > 0

    r4 = phases["rdist"]
    assert [v["V"] for v in r4["vocabs"]] == [32064, 151936]
    for v in r4["vocabs"]:
        for key in ("naive_seconds", "cheap_precomputed_seconds", "naive_fwd_bwd_seconds", "cheap_fwd_bwd_seconds",
                    "speedup_precomputed", "speedup_per_step", "speedup_fwd_bwd"):
            assert _number(v[key]) and v[key] > 0, key
        assert v["rel_err"] < 1e-4

    c = phases["chunked"]
    assert [x["chunk"] for x in c["runs"]] == [0, 4] and c["rows"] == 16
    assert all(_number(x["seconds"]) and x["seconds"] > 0 for x in c["runs"])
    assert c["runs"][1]["loss"] == pytest.approx(c["runs"][0]["loss"], rel=1e-5)  # chunked = unchunked value

    runs = {Path(x["config"]).name: x for x in phases["accelerate"]["runs"]}
    assert set(runs) == {p.name for p in (REPO / "configs" / "accelerate").glob("*.yaml")}
    for name in ("fsdp.yaml", "ddp_8gpu.yaml"):
        assert runs[name]["status"] == "pass", runs[name].get("tail", "")[-2000:]
        assert _number(runs[name]["step_seconds"]) and runs[name]["final_written"]
        assert runs[name]["accelerate_state"]["distributed_type"].endswith("MULTI_CPU")  # no GPU: plain CPU DDP
    assert any("Qwen2DecoderLayer,CLIPEncoderLayer" in c for c in runs["fsdp.yaml"]["adjusted"])

    assert "| phase | measure | value | goal | status |" in md
    for label in ("1 build", "2 DFT vs SFT", "3 cache vs online", "4 RDist", "4b loss", "5 accelerate"):
        assert f"| {label} |" in md
