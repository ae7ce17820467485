"""benchmarks/gram_factors.py on the CPU (smoke sizes): it times every part and compares a baseline exactly."""

from __future__ import annotations

import json

import kd_cache.targets
from benchmarks.gram_factors import main


def test_gram_factors_benchmark_reports_every_part(tmp_path):
    out = tmp_path / "gf.json"
    res = main(["--baseline", kd_cache.targets.__file__, "--out", str(out), "--repeats", "1"])
    assert json.loads(out.read_text()) == res
    assert res["identical_to_baseline"] is True and len(res["ranks"]) == res["samples"]
    for key in ("gram_factors_seconds", "baseline_seconds", "gram_products_seconds", "eigh_float64_each_seconds",
                "eigh_float64_batched_seconds", "eigh_float32_each_seconds", "eigh_float64_on_host_seconds"):
        assert res[key] > 0, key
