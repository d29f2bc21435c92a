"""The study's measures on hand-made held-out curves (tools/study.py): the AUC integrated alike, the time to a
threshold with the runs that never reach it counted, the reward-hacking columns, and the words a verdict may use."""
import math

import pytest

from tools import study

TASK = study.TASKS["shapes"]
B = dict(run=dict(iterations=40), budgets=[20, 40], thresholds=[0.5])


def run(curve: list[float], rewards: list[float], every: int = 10) -> dict:
    """A finished run's result: the judge / reward / quality every `every` iterations, a training reward each."""
    hist = [dict(iteration=0, **{f"eval/{TASK.judge}": curve[0], f"eval/{TASK.reward}": 0.5,
                                 f"eval/{TASK.quality}": 0.9})]
    for it in range(1, 41):
        row = dict(iteration=it, reward=rewards[min(it - 1, len(rewards) - 1)])
        if it % every == 0:
            row.update({f"eval/{TASK.judge}": curve[it // every], f"eval/{TASK.reward}": 0.5 + it / 100,
                        f"eval/{TASK.quality}": 0.9 - it / 400})
        hist.append(row)
    return dict(history=hist, wall=60.0)


def test_auc_budgets_and_censored_time_to_threshold():
    fast, slow = run([0.2, 0.6, 0.7, 0.8, 0.8], [0.1] * 5 + [0.9] * 35), run([0.2, 0.3, 0.4, 0.45, 0.48], [0.1] * 40)
    # trapezoid over iterations 0..40 / 40: (0.2/2 + 0.6 + 0.7 + 0.8 + 0.8/2) * 10 / 40
    assert study.auc(fast, TASK.judge) == pytest.approx((0.1 + 0.6 + 0.7 + 0.8 + 0.4) / 4)
    assert study.iterations_to(fast, TASK.judge, 0.5) == pytest.approx(7.5)  # interpolated between 0 and 10
    assert study.iterations_to(slow, TASK.judge, 0.5) == math.inf
    d = study.describe(TASK, [fast, slow, fast], B)
    assert d["reach"][0.5]["reached"] == 2 and d["reach"][0.5]["median"] == pytest.approx(7.5)
    assert d["acc"][20]["values"] == [0.7, 0.4, 0.7]
    h = d["hacking"]  # the reward rose, the quality fell: both are in the table, base -> final
    assert h["reward"]["mean"] == pytest.approx(0.4) and h["quality"]["mean"] == pytest.approx(-0.1)
    assert h["reward_first"]["values"] == [0.1, 0.1, 0.1] and h["reward_last"]["values"] == [0.9, 0.1, 0.9]


def test_verdicts_use_only_the_tests():
    a = [run([0.2, 0.6, 0.7, 0.8, 0.8 + k / 1000], [0.5]) for k in range(10)]
    b = [run([0.2, 0.5, 0.6, 0.7, 0.7 + k / 900], [0.5]) for k in range(10)]
    same = [run([0.2, 0.6, 0.7, 0.8, 0.8 + k / 1000 + (-1) ** k * 0.004], [0.5]) for k in range(10)]
    tiny = [run([0.2, 0.6, 0.7, 0.8, 0.8 + k / 1000 - 0.005 + (-1) ** k * 0.001], [0.5]) for k in range(10)]
    higher = study.compare(TASK, a, b, "auc", 40)
    assert study.verdict(higher, higher["p"], higher["tost"]["p"]) == "higher" and higher["wins"] == 10
    level = study.compare(TASK, a, same, "final", 40)
    assert study.verdict(level, level["p"], level["tost"]["p"]) == f"level (within ±{study.MARGIN:g})"
    small = study.compare(TASK, a, tiny, "final", 40)  # significant, and inside the margin: both are said
    assert study.verdict(small, small["p"], small["tost"]["p"]) == f"higher, by less than {study.MARGIN:g}"
    noisy = study.compare(TASK, a[:2], b[:1] + a[1:2], "auc", 40)  # two seeds, one of them equal
    assert study.verdict(noisy, 0.3, 0.4) == "inconclusive"


def test_a_budget_runs_the_primary_and_only_the_groups_it_names(tmp_path):
    b = dict(sizes=[16], report_seeds=[100, 101], run=dict(iterations=4, eval_every=2, eval_per_prompt=2), noise=0)
    tuned = {"cps": 0.3, "flow_sde": 1.2}  # Dance-SDE not tuned: it has no group
    cut = study.groups(study.TASKS["shapes"], dict(b, groups=["cps 0.7"]), tuned, tmp_path)
    assert set(cut) == {study.PRIMARY[1], study.PRIMARY[2], "cps 0.7"}
    assert all(len(js) == 2 for js in cut.values())
    full = study.groups(study.TASKS["digits"], dict(b, sizes=[8]), dict(tuned, dance_sde=0.5), tmp_path)
    assert set(full) >= {a for pair in study.SECONDARY.values() for a in pair} and len(full) == 7
