"""The demo's statistics and tables (`kd_eval.report`, `kd_eval.demo.compare` / `headline_lines`)."""

from __future__ import annotations

import math
import random

import pytest

from kd_eval import report
from kd_eval.demo import compare, headline_lines


def _result(correct: int, n: int, nll: float) -> dict:
    return {"overall": {"n": n, "correct": correct, "score": float(correct), "accuracy": correct / n,
                        "answer_nll": nll},
            "per_type": {"colour": {"n": n, "correct": correct, "score": float(correct)}}}


@pytest.mark.parametrize("n", [2, 3, 5, 8, 30, 31, 45, 200])
def test_t_interval_matches_scipy(n):
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(n)
    xs = [rng.gauss(0.5, 2.0) for _ in range(n)]
    got = report.t_interval(xs)
    lo, hi = stats.t.interval(0.95, n - 1, loc=sum(xs) / n, scale=stats.sem(xs))
    assert got["n"] == n and got["mean"] == pytest.approx(sum(xs) / n)
    # the table has 3 decimals; beyond 30 degrees of freedom the expansion is within 1e-4 of the quantile
    half = (hi - lo) / 2
    assert got["hi"] - got["mean"] == pytest.approx(half, rel=2e-4)
    assert got["mean"] - got["lo"] == pytest.approx(half, rel=2e-4)


def test_t_interval_edge_cases():
    one = report.t_interval([0.3])
    assert one["mean"] == 0.3 and one["lo"] is None and one["hi"] is None
    same = report.t_interval([0.1, 0.1, 0.1])
    assert same["lo"] == pytest.approx(0.1) and same["hi"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="at least one value"):
        report.t_interval([])


def test_compare_pairs_seeds_and_the_headline_states_what_the_interval_shows():
    teacher = _result(90, 100, 0.10)
    base = [_result(40, 100, 0.50), _result(44, 100, 0.55), _result(42, 100, 0.48)]
    kd = [_result(45, 100, 0.40), _result(47, 100, 0.44), _result(46, 100, 0.41)]
    c = compare(teacher, base, kd, [0, 1, 2])
    assert c["accuracy"]["per_seed"] == pytest.approx([0.05, 0.03, 0.04])
    assert c["answer_nll"]["per_seed"] == pytest.approx([-0.10, -0.11, -0.07])
    assert c["accuracy"]["mean"] == pytest.approx(0.04)
    half = 4.303 * 0.01 / math.sqrt(3)  # sd of (5, 3, 4) points is 1 point
    assert (c["accuracy"]["lo"], c["accuracy"]["hi"]) == pytest.approx((0.04 - half, 0.04 + half))
    assert c["accuracy"]["gap_recovered"] == pytest.approx((0.46 - 0.42) / (0.90 - 0.42))
    assert c["answer_nll"]["gap_recovered"] == pytest.approx((0.51 - 0.41666667) / (0.51 - 0.10))
    lines = headline_lines(c, "full")
    assert lines[0].startswith("llava-kd - baseline over 3 paired seeds")
    acc, nll = lines[1], lines[2]
    assert acc.split()[:3] == ["accuracy", "+4.0", "points"] and "llava-kd better" in acc
    assert "per seed +5.0 +3.0 +4.0" in acc
    assert nll.split()[:4] == ["answer", "NLL", "-0.093", "nats/token"] and "llava-kd better" in nll
    assert "accuracy 8 %, answer NLL 23 %" in lines[3]
    assert not any("smoke run" in line for line in lines)

    # a difference that changes sign across seeds is not claimed either way; a worse student is called worse
    mixed = compare(teacher, base, [_result(45, 100, 0.60), _result(40, 100, 0.60), _result(43, 100, 0.58)],
                    [0, 1, 2])
    lines = headline_lines(mixed, "quick")
    assert "no difference shown" in lines[1] and "llava-kd worse" in lines[2] and "smoke run" in lines[-1]


def test_format_seed_table_shows_mean_and_sd_over_seeds():
    teacher = _result(90, 100, 0.1)
    table = report.format_seed_table(teacher, {"baseline": [_result(40, 100, 0.5), _result(44, 100, 0.7)],
                                               "llava-kd": [_result(45, 100, 0.4)]})
    lines = table.splitlines()
    assert lines[0].split("  ")[0] == "question type"
    assert "baseline (2 seeds)" in lines[0] and "llava-kd (1 seed)" in lines[0]
    overall = next(line for line in lines if line.startswith("overall (n=100)"))
    assert overall.split()[2:] == ["90.0", "42.0", "±", "2.8", "45.0"]
    nll = next(line for line in lines if line.startswith("answer NLL"))
    assert nll.split()[3:] == ["0.100", "0.600", "±", "0.141", "0.400"]
