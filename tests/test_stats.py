"""The study's statistics (tools/stats.py) against hand-computed values and closed forms."""
import math

import numpy as np
import pytest
from scipy import stats as sp

from tools import stats


def test_paired_difference_interval_and_tests_by_hand():
    a, b = [0.91, 0.93, 0.90, 0.95], [0.90, 0.90, 0.91, 0.92]
    d = np.array(a) - np.array(b)  # +0.01, +0.03, -0.01, +0.03: mean 0.015, sd 0.019149
    out = stats.paired(a, b)
    se = 0.0191485 / 2
    assert out["diff"] == pytest.approx(0.015) and out["sd"] == pytest.approx(0.0191485, rel=1e-5)
    assert out["lo"] == pytest.approx(0.015 - 3.182446 * se, rel=1e-5)  # t(0.975, 3) = 3.182446
    assert out["p"] == pytest.approx(2 * sp.t.sf(0.015 / se, 3), rel=1e-5)
    assert out["wins"] == 3 and out["sign_p"] == pytest.approx(2 * 5 / 16)  # P(X >= 3 or X <= 1), X ~ Bin(4, 1/2)
    assert out["diffs"] == pytest.approx(d.tolist())


def test_the_smallest_sign_test_p_of_ten_seeds():
    out = stats.paired([1.0 + k for k in range(10)], [0.5 + k for k in range(10)])
    assert out["sign_p"] == pytest.approx(2 / 1024)  # all 10 seeds one way; n = 6 could not go below 0.031


def test_tost_equivalence_and_its_failure():
    rng = np.random.default_rng(0)
    b = rng.normal(0.9, 0.01, 10)
    level = stats.tost(list(b + rng.normal(0, 0.003, 10)), list(b), margin=0.02)
    far = stats.tost(list(b + 0.05 + rng.normal(0, 0.003, 10)), list(b), margin=0.02)
    assert level["p"] < 1e-6 and far["p"] > 0.99
    # by hand: the larger of the two one-sided p-values
    d = np.array([0.004, -0.002, 0.006, 0.001, -0.003])
    se = d.std(ddof=1) / math.sqrt(5)
    expected = max(sp.t.sf((d.mean() + 0.01) / se, 4), sp.t.cdf((d.mean() - 0.01) / se, 4))
    assert stats.tost(list(d), [0.0] * 5, 0.01)["p"] == pytest.approx(expected, rel=1e-9)


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.03, 0.5 -> x4, x3, x2, x1 = 0.04, 0.06, 0.06 (running max), 0.5
    out = stats.holm({"a": 0.03, "b": 0.01, "c": 0.5, "d": 0.02, "e": math.nan})
    assert out["b"] == pytest.approx(0.04) and out["d"] == pytest.approx(0.06) and out["a"] == pytest.approx(0.06)
    assert out["c"] == pytest.approx(0.5) and math.isnan(out["e"])
    assert stats.holm({"x": 0.4, "y": 0.45})["x"] == pytest.approx(0.8) and stats.holm({"x": 0.9, "y": 0.8})["x"] == 1


def test_time_to_threshold_counts_the_runs_that_never_reach_it():
    out = stats.time_to([10.0, 20.0, 30.0, math.inf, math.inf], horizon=80)
    # Kaplan-Meier: S = 4/5 after 10, 3/5 after 20, 2/5 after 30: the median is 30 (the mean of reached runs is 20)
    assert out["median"] == 30.0 and out["reached"] == 3 and out["fraction"] == 0.6 and out["mean_reached"] == 20.0
    assert stats.time_to([12.0, math.inf, math.inf], horizon=80)["median"] == math.inf  # fewer than half reached
    assert stats.time_to([math.inf] * 3, horizon=80)["reached"] == 0
