"""tools/mechanism.py and tools/ocr_noise.py: the estimator against a hand count of pairs and against scipy, the rule
for constant groups, the claim that advantages rank as rewards do, CPS's distortion of exactly 1 on a real rollout,
the grid check against the step's formula, the report's tables, and the OCR table on real RapidOCR."""
import itertools
import json
import math
import random

import numpy as np
import pytest
import torch
from scipy import stats

import grpo
from flow_cps import models, scoring
from tools import mechanism, ocr_noise, report, study


def tau_b_by_hand(x, y) -> float:
    """Kendall's tau-b from its definition: (concordant - discordant) / sqrt((n0 - ties in x)(n0 - ties in y))."""
    conc = disc = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        tx += dx == 0
        ty += dy == 0
        conc += dx * dy > 0
        disc += dx * dy < 0
    n0 = len(x) * (len(x) - 1) / 2
    return (conc - disc) / math.sqrt((n0 - tx) * (n0 - ty))


@pytest.mark.parametrize("x, y, expected", [
    ([1, 2, 3, 4], [1, 3, 2, 4], 4 / 6),  # one swapped pair of six
    ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
    ([0.2, 0.5, 0.5, 0.9], [0, 1, 1, 1], None),  # ties in both: a reward against a 0/1 judge
    ([0.1, 0.4, 0.3, 0.8, 0.8, 0.2, 0.6, 0.7], [0.15, 0.3, 0.35, 0.9, 0.7, 0.2, 0.6, 0.75], None),
])
def test_tau_b_is_kendalls_tau_b(x, y, expected):
    ref = tau_b_by_hand(np.array(x, float), np.array(y, float))
    assert mechanism.tau_b(x, y) == pytest.approx(ref, abs=1e-12)
    assert mechanism.tau_b(x, y) == pytest.approx(stats.kendalltau(x, y, variant="b").statistic, abs=1e-12)
    if expected is not None:
        assert ref == pytest.approx(expected)


def test_constant_groups_are_left_out_and_counted_by_kind():
    xs = [[1, 2, 3], [1, 1, 1], [1, 2, 3], [5, 5, 5], [3, 2, 1]]
    ys = [[1, 2, 3], [1, 2, 3], [2, 2, 2], [0, 0, 0], [1, 2, 3]]
    d = mechanism.distortion(xs, ys)
    assert (d["n"], d["groups"], d["neither"], d["x_only"], d["y_only"]) == (2, 5, 1, 1, 1)
    assert d["mean"] == pytest.approx(0.0) and math.isnan(d["taus"][1]) and d["taus"][4] == pytest.approx(-1)
    same = mechanism.distortion([[1, 2, 3]] * 4, [[1, 2, 3]] * 4)
    assert (same["mean"], same["lo"], same["hi"]) == (1.0, 1.0, 1.0)  # CPS: the degenerate interval


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.uniform(0.3, 1.0, 30), rng.uniform(0.3, 1.0, 300)
    lo, hi = mechanism.bootstrap_interval(list(small))
    assert lo < small.mean() < hi
    lo2, hi2 = mechanism.bootstrap_interval(list(large))
    assert hi2 - lo2 < (hi - lo) * 0.6  # ~1/sqrt(10) as wide
    assert all(math.isnan(v) for v in mechanism.bootstrap_interval([0.5, 0.7]))


def test_advantages_rank_as_rewards_do():
    """docs/STUDY.md: within a group, GRPO's advantage is an increasing affine map of the reward, so tau-b of two
    advantage vectors equals tau-b of the rewards (for every advantage rule the study uses)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        a, b = torch.rand(8, generator=g), torch.rand(8, generator=g)
        a[3] = a[5]  # a tie
        groups = torch.zeros(8, dtype=torch.long)
        for rule in grpo.ADVANTAGES.values():
            assert mechanism.tau_b(rule(a, groups).numpy(), rule(b, groups).numpy()) == \
                pytest.approx(mechanism.tau_b(a.numpy(), b.numpy()), abs=1e-12)


def test_check_reads_each_steps_noise_coefficient_off_the_sampler():
    grid = torch.linspace(1, 0, 11)
    # Dance-SDE eta 0.7, b = t' - eta^2 dt / (2t): step 8 (t 0.2 -> 0.1): 0.1 - 0.49 * 0.1 / 0.4 < 0; step 7 > 0
    assert mechanism.check("dance_sde", 0.7, grid) == dict(defined=True, problem="", negative_b=[8])
    assert mechanism.check("cps", 0.9, grid)["negative_b"] == []
    bad = mechanism.check("cps", 1.2, grid)
    assert not bad["defined"] and "eta in [0, 1]" in bad["problem"]


@pytest.fixture(scope="module")
def digits():
    task = study.TASKS["digits"]
    return task, models.load_builtin_backbone("digits"), (scoring.RewardModel(task.reward),
                                                          scoring.RewardModel(task.judge))


def test_cps_distortion_is_exactly_one_and_an_sde_leaves_noise(digits):
    task, bb, metrics = digits
    cps = mechanism.measure(bb, task, "cps", 0.7, 1, metrics=metrics)
    assert cps["identical"] and cps["residual"] == 0.0  # the final sample IS the last x0_hat (Eq. 12 at t' = 0)
    assert cps["d_reward"]["mean"] == 1.0 and cps["d_reward"]["n"] + cps["d_reward"]["neither"] == 8
    assert cps["d_judge"]["taus"] == cps["b_judge"]["taus"] or all(
        (math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(cps["d_judge"]["taus"], cps["b_judge"]["taus"]))
    sde = mechanism.measure(bb, task, "dance_sde", 0.9, 1, metrics=metrics)
    assert not sde["identical"] and sde["residual"] > 0.3  # Dance-SDE's ~0.5 excess noise level on the last step
    assert sde["d_reward"]["groups"] == 8 and sde["d_reward"]["mean"] < 1.0


def test_report_writes_the_tables():
    row = dict(sampler="flow_sde", eta=1.2, residual=0.146, r_final=0.8, r_clean=0.85, check=dict(
        defined=True, problem="", negative_b=[3]), d_reward=dict(mean=0.82, lo=0.78, hi=0.86, n=120),
        d_judge=dict(mean=0.5, n=90), b_judge=dict(mean=0.52, n=90), judge_shift=dict(diff=-0.02, lo=-0.05,
                                                                                     hi=0.01, n=88))
    tab = dict(reward="digit_judge", judge="digit_svm_accuracy", groups=128, group_size=8, seconds=60,
               model_info=dict(steps=150, base_accuracy=0.82), rows=[row])
    ocr = dict(size=256, groups=48, group_size=8, rows={"0.1": dict(score=0.9, lo=0.88, hi=0.92, exact=0.7, tau=dict(
        mean=0.95, lo=0.9, hi=0.97, n=40, neither=6, x_only=1, y_only=1))})
    text = "\n".join(report.mechanism_tables(dict(mechanism=dict(digits=tab), ocr_noise=ocr)))
    assert "| Flow-SDE | 1.2 | 0.146 | 0.820 [0.780, 0.860] (120) | 0.500 (90) | 0.520 (90) | -0.020 [-0.050, " \
           "+0.010] (88) | 0.800 / 0.850 | steps 3 |" in text
    assert "| 0.1 | 0.900 [0.880, 0.920] | 0.700 | 0.950 [0.900, 0.970] (40) | 6 / 1 / 1 |" in text
    assert report.mechanism_tables({}) == []


def test_ocr_signs_fit_and_the_reward_is_deterministic():
    rng = random.Random(0)
    for text in ("OPEN", "Mountain Champion Gallery"):
        im = ocr_noise.render(text, 256, rng)
        assert im.shape == (3, 256, 256) and 0 <= im.min() and im.max() <= 1
        edge = np.concatenate([im[:, :, :4], im[:, :, -4:]], 2)
        assert np.ptp(edge) < 1e-6  # no ink at the left or right edge: the text fits on one line
    res = ocr_noise.sensitivity(2, [0.5], size=128)
    assert res["images"] == 2 * 8 * 2 and set(res["rows"]) == {"0.0", "0.5"}
    t = res["rows"]["0.5"]["tau"]
    assert t["n"] + t["neither"] + t["x_only"] + t["y_only"] == t["groups"] == 2
    assert 0 <= res["rows"]["0.5"]["score"] <= res["rows"]["0.0"]["score"] + 0.2


def test_a_table_is_the_same_in_worker_processes(digits):
    task = digits[0]
    grid = {"flow_sde": [0.7], "cps": [0.5]}
    serial, parallel = (mechanism.task_table(task, grid, 8, workers=w) for w in (1, 2))
    assert json.dumps(serial["rows"]) == json.dumps(parallel["rows"])  # NaN (undefined taus) written alike
    assert len(serial["rows"]) == 2 and serial["base_judge"] is None
