"""The study's measures and rules (tools/study.py) on hand-made records: the AUC leaves the shared base point out, a
comparison is computed only on complete groups, the secondary family only whole (Holm), "level" only with a margin
the pilots allowed, the mechanism's prediction as a difference of differences (against scipy), and the design's
groups, seeds and argv."""
import math

import pytest
from scipy import stats as sps

from tools import study

TASK = study.TASKS["digits"]


def record(curve: list[float], rewards=(0.5,), every: int = 10) -> dict:
    """A finished run's record: the judge / reward / quality at iterations 0, every, 2 every, ..."""
    evals = [{"iteration": k * every, f"eval/{TASK.judge}": v, f"eval/{TASK.reward}": 0.5 + k / 100,
              f"eval/{TASK.quality}": 0.9 - k / 400} for k, v in enumerate(curve)]
    last = (len(curve) - 1) * every
    return dict(evals=evals, training={"reward": [rewards[min(i, len(rewards) - 1)] for i in range(last)]},
                measured={"residual": 0.1}, wall=60.0)


def test_auc_leaves_the_base_point_out():
    r = record([0.2, 0.6, 0.7, 0.8, 0.8])
    assert study.auc(r, TASK.judge) == pytest.approx((0.6 + 0.7 + 0.8 + 0.8) / 4)
    assert study.at(r, TASK.judge, 20) == 0.7 and math.isnan(study.at(r, TASK.judge, 25))
    d = study.describe(TASK, [r, record([0.2, 0.3, 0.4, 0.45, 0.48], rewards=(0.1, 0.9))], 40)
    assert d["at"][40]["values"] == [0.8, 0.48] and d["base"]["mean"] == pytest.approx(0.2)
    h = d["hacking"]  # the reward rose, the quality fell: both in the table, base -> final
    assert h["reward"]["mean"] == pytest.approx(0.04) and h["quality"]["mean"] == pytest.approx(-0.01)
    assert h["reward_first"]["values"] == [0.5, pytest.approx(0.74)] and h["reward_last"]["values"] == [0.5, 0.9]


def test_verdicts_use_only_the_tests_and_a_margin_only_where_allowed():
    a = [record([0.2, 0.6, 0.7, 0.8, 0.8 + k / 1000]) for k in range(10)]
    b = [record([0.2, 0.5, 0.6, 0.7, 0.7 + k / 900]) for k in range(10)]
    same = [record([0.2, 0.6, 0.7, 0.8, 0.8 + k / 1000 + (-1) ** k * 0.004]) for k in range(10)]
    higher = study.compare(TASK, a, b, None)
    assert study.verdict(higher, higher["p"], None) == "higher" and higher["wins"] == 10
    level = study.compare(TASK, a, same, 0.02)
    assert study.verdict(level, level["p"], 0.02) == "level (within ±0.02)"
    no_margin = study.compare(TASK, a, same, None)  # the same data without an allowed margin: no "level"
    assert no_margin["tost"] is None and study.verdict(no_margin, no_margin["p"], None) == "inconclusive"


def test_the_prediction_is_a_difference_of_differences():
    hi_a = [record([0.2, 0.5 + k / 50, 0.6]) for k in range(6)]
    hi_b = [record([0.2, 0.4, 0.5 - k / 100]) for k in range(6)]
    lo_a = [record([0.2, 0.45, 0.5 + k / 200]) for k in range(6)]
    lo_b = [record([0.2, 0.44, 0.5]) for _ in range(6)]
    d = study.difference_of_differences(TASK, (hi_a, hi_b), (lo_a, lo_b))
    gap = lambda a, b: [study.auc(x, TASK.judge) - study.auc(y, TASK.judge) for x, y in zip(a, b)]  # noqa: E731
    hi, lo = gap(hi_a, hi_b), gap(lo_a, lo_b)
    assert d["diff"] == pytest.approx(sum(h - low for h, low in zip(hi, lo)) / 6)
    assert d["p_greater"] == pytest.approx(sps.ttest_rel(hi, lo, alternative="greater").pvalue)


def test_analyse_reports_only_complete_comparisons():
    d = study.design(TASK, 20, 10, 2, None, seeds=(5, 6))
    recs = {}
    for i, g in enumerate(d.groups):
        for k in d.seeds:
            recs[f"digits/{g.slug}/seed{k}"] = record([0.2, 0.3 + i / 100 + k / 1000, 0.4 + i / 50])
    full = study.analyse(d, recs)
    assert full["runs"] == full["of"] == len(d.groups) * 2 and full["pending"] == []
    assert full["primary"]["label"] == d.primary.label and full["prediction"] is not None
    assert list(full["secondary"]) == [c.label for c in d.secondary]
    assert all(s["p_holm"] >= s["p"] or math.isnan(s["p"]) for s in full["secondary"].values())
    missing = dict(recs)
    missing.pop(f"digits/{d.secondary[-1].a.slug}/seed6")  # one run of one secondary group has not finished
    part = study.analyse(d, missing)
    assert part["primary"] == full["primary"] and part["secondary"] == {}  # Holm needs the whole family
    assert d.secondary[-1].label in part["pending"] and part["runs"] == part["of"] - 1
    primary_run = dict(recs)
    primary_run.pop(f"digits/{d.primary.a.slug}/seed5")
    assert study.analyse(d, primary_run)["primary"] is None


def test_the_design_groups_seeds_and_argv():
    d = study.DESIGNS["digits"]
    assert set(study.DESIGNS) == {"digits"} and set(study.NOT_TRAINED) == {"shapes"}  # docs/STUDY.md, "Pilots"
    assert d.groups[:2] == [d.primary.a, d.primary.b]  # a study run in parts finishes the primary first
    assert len(d.groups) == len(set(g.slug for g in d.groups)) == 8
    assert set(study.REPORT_SEEDS).isdisjoint({0, 1, 2, 7, 42, 999, 7000, 7001, *range(100, 110), *range(200, 210),
                                               *study.PILOT_SEEDS})  # never used before (docs/STUDY.md)
    argv = " ".join(d.primary.a.argv(d.task, 3001, 80, 10, 50))
    assert "--eval_split test" in argv and "--reward_image x0_hat" in argv and "--log_prob cps" in argv
    assert "--sampler flow_sde --eta 1.4" in argv and "--model digits" in argv
    dance = " ".join(study.DANCE.argv(d.task, 1, 4, 2, 2))  # DanceGRPO as run: its recipe, rewarding x0_hat
    assert dance.count("--advantage dance") == 1 and "--reward_image x0_hat" in dance
    jobs = d.jobs()
    assert len(jobs) == 80 and jobs[0].name == f"digits/{d.primary.a.slug}/seed3001"
