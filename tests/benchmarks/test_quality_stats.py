"""The quality study's statistics (benchmarks/quality.py): gated metrics, paired bootstrap intervals, gap ratio."""

from __future__ import annotations

import random

import pytest

from benchmarks import quality


def _ev(per_type: dict) -> dict:
    return {"per_type": {t: {"n": n, "correct": c, "accuracy": c / n, "answer_nll": nll, "answer_tokens": tok}
                         for t, (n, c, nll, tok) in per_type.items()},
            "overall": {"accuracy": sum(c for n, c, _, _ in per_type.values()) / sum(n for n, *_ in per_type.values())}}


def test_gated_metrics_pool_records_and_tokens():
    ev = _ev({"a": (10, 5, 1.0, 30), "b": (30, 30, 0.2, 10), "c": (10, 0, 9.0, 10)})
    assert quality.task_score(ev, ["a", "b"]) == pytest.approx(35 / 40)
    assert quality.gated_nll(ev, ["a", "b"]) == pytest.approx((1.0 * 30 + 0.2 * 10) / 40)


def test_bootstrap_mean_interval_brackets_the_mean_and_shrinks_with_agreement():
    rng = random.Random(0)
    m, lo, hi = quality.bootstrap_mean([0.1, 0.2, 0.3, 0.4, 0.5], rng)
    assert m == pytest.approx(0.3) and lo < m < hi and lo >= 0.1 and hi <= 0.5
    m, lo, hi = quality.bootstrap_mean([0.2] * 5, rng)
    assert lo == hi == m == pytest.approx(0.2)


def test_bootstrap_gap_is_a_ratio_of_means_with_paired_resampling():
    rng = random.Random(0)
    ce, kd = [0.40, 0.42, 0.38, 0.41, 0.39], [0.45, 0.47, 0.43, 0.46, 0.44]  # kd = ce + 0.05 in every seed
    point, lo, hi = quality.bootstrap_gap(kd, ce, 0.50, rng)
    assert point == pytest.approx(0.05 / 0.10)
    assert lo <= point <= hi and hi - lo < 0.2  # paired: the shared seed effect cancels


def test_summarise_pairs_arms_by_seed():
    teacher = _ev({"a": (10, 10, 0.1, 10)})
    runs = [{"n": 200, "arm": arm, "seed": s, "train_seconds": 1.0,
             "eval": _ev({"a": (10, base + s % 2 + (2 if arm == "kd" else 0), 1.0 - 0.1 * (arm == "kd"), 10)})}
            for s in range(4) for arm, base in (("ce", 4), ("kd", 4))]
    sm = quality.summarise(runs, teacher, ["a"], [0, 1, 2, 3])["by_n"]["200"]
    d = sm["vs_ce"]["kd"]
    assert d["task_diff_per_seed"] == pytest.approx([0.2] * 4)
    assert d["nll_diff_per_seed"] == pytest.approx([-0.1] * 4)
    assert d["task_gap"][0] == pytest.approx(0.2 / (1.0 - 0.45))
