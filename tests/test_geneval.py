"""GenEval's rules on synthetic detections: every tag, counts, colours, the position margin, exclusions, and the
benchmark's summary. (The model path, Mask2Former + CLIP, is tested in test_rewards.py on tiny models.)"""
import math

import pytest

import geneval
from geneval import Detection, evaluate, relative_position, select_objects, summarize


def det(x0, y0, x1, y1, score=0.95, color=None):
    return Detection(box=(x0, y0, x1, y1), score=score, color=color)


def judge(objects, meta):
    return evaluate(select_objects(objects, meta["tag"]), meta)


SINGLE = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}
TWO = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
COUNT3 = {"tag": "counting", "include": [{"class": "clock", "count": 3}], "exclude": [{"class": "clock", "count": 4}]}
RED_CAR = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
DOG_LEFT_OF_CAT = {"tag": "position", "include": [{"class": "cat", "count": 1},
                                                 {"class": "dog", "count": 1, "position": ["left of", 0]}]}
ATTR = {"tag": "color_attr", "include": [{"class": "bench", "count": 1, "color": "red"},
                                         {"class": "umbrella", "count": 1, "color": "green"}]}


def test_single_object_and_confidence_threshold():
    v = judge({"dog": [det(0, 0, 10, 10, 0.5)]}, SINGLE)
    assert v.correct and v.score == 1
    v = judge({"dog": [det(0, 0, 10, 10, 0.3)]}, SINGLE)  # the benchmark keeps score > 0.3 only
    assert not v.correct and v.score == 0 and "found 0" in v.reasons[0]
    assert not judge({"cat": [det(0, 0, 10, 10)]}, SINGLE).correct


def test_two_object_and_extra_objects():
    assert judge({"cat": [det(0, 0, 5, 5)], "dog": [det(9, 9, 20, 20)]}, TWO).correct
    v = judge({"cat": [det(0, 0, 5, 5)]}, TWO)
    assert not v.correct and v.score == pytest.approx(0.5)
    # two dogs: the benchmark only asks for >= 1 (correct); partial credit prices the extra one, as Flow-GRPO does
    v = judge({"cat": [det(0, 0, 5, 5)], "dog": [det(9, 9, 20, 20), det(30, 30, 40, 40, 0.8)]}, TWO)
    assert v.correct and v.score == pytest.approx(0.5)


@pytest.mark.parametrize("n_found, correct, score", [(3, True, 1.0), (4, False, 2 / 3), (2, False, 2 / 3),
                                                     (1, False, 1 / 3), (7, False, 0.0)])
def test_counting_is_exact(n_found, correct, score):
    v = judge({"clock": [det(10 * i, 0, 10 * i + 8, 8) for i in range(n_found)]}, COUNT3)
    assert v.correct == correct and v.score == pytest.approx(score)  # 7 found: 1 - 4/3 floored at 0


def test_counting_uses_its_higher_threshold():
    clocks = {"clock": [det(0, 0, 8, 8, 0.95), det(10, 0, 18, 8, 0.95), det(20, 0, 28, 8, 0.8)]}
    assert not judge(clocks, COUNT3).correct  # 0.8 <= 0.9: only two clocks count
    two = {"tag": "two_object", "include": [{"class": "clock", "count": 3}]}
    assert judge(clocks, two).correct  # the same detections under the 0.3 threshold of the other tags


def test_colors_judged_on_most_confident_objects():
    assert judge({"car": [det(0, 0, 9, 9, color="red")]}, RED_CAR).correct
    v = judge({"car": [det(0, 0, 9, 9, color="blue")]}, RED_CAR)
    assert not v.correct and v.score == pytest.approx(0.5) and "expected red car" in v.reasons[0]
    # the top car is blue, a less confident one is red: the benchmark looks at the top one only
    v = judge({"car": [det(0, 0, 9, 9, 0.9, "blue"), det(20, 0, 29, 9, 0.5, "red")]}, RED_CAR)
    assert not v.correct and v.score == 0


def test_color_attr():
    good = {"bench": [det(0, 0, 9, 9, color="red")], "umbrella": [det(20, 0, 29, 9, color="green")]}
    assert judge(good, ATTR).correct
    swapped = {"bench": [det(0, 0, 9, 9, color="green")], "umbrella": [det(20, 0, 29, 9, color="red")]}
    v = judge(swapped, ATTR)
    assert not v.correct and v.score == pytest.approx(0.5)  # counts (1, 1), colours (0, 0)


def test_position_rule_and_margin():
    a = (0, 0, 10, 10)  # centre x 5, width 10; margin 0.1 x (10 + 10) = 2 per axis
    assert relative_position(a, (2, 0, 12, 10)) == set()  # offset 2: shrunk to 0 on both axes
    assert relative_position(a, (4, 0, 14, 10)) == set()  # offset 4 -> 2, dx = -0.5: not < -0.5
    assert relative_position(a, (5, 0, 15, 10)) == {"left of"}  # offset 5 -> 3, dx = -0.6
    assert relative_position((5, 0, 15, 10), a) == {"right of"}
    assert relative_position(a, (0, 30, 10, 40)) == {"above"}  # image y grows downwards
    assert relative_position((0, 30, 10, 40), a) == {"below"}
    assert relative_position(a, (20, 20, 30, 30)) == {"left of", "above"}  # diagonal: dx = dy = -0.64
    assert relative_position(a, (5, 0, 15, 10), margin=0.3) == set()  # a wider margin: offset 5 - 6 -> 0
    assert relative_position(a, a) == set()


def test_position_verdicts():
    left = {"cat": [det(50, 0, 60, 10)], "dog": [det(0, 0, 10, 10)]}
    assert judge(left, DOG_LEFT_OF_CAT).correct
    v = judge({"cat": [det(0, 0, 10, 10)], "dog": [det(50, 0, 60, 10)]}, DOG_LEFT_OF_CAT)
    assert not v.correct and v.score == pytest.approx(2 / 3)  # counts right, relation wrong
    v = judge({"dog": [det(0, 0, 10, 10)]}, DOG_LEFT_OF_CAT)  # no cat: no target
    assert not v.correct and v.score == pytest.approx(1 / 3) and any("found 0" in r for r in v.reasons)


def test_exclusions():
    meta = {"tag": "custom", "include": [{"class": "cat", "count": 1}], "exclude": [{"class": "dog", "count": 1}]}
    assert judge({"cat": [det(0, 0, 5, 5)]}, meta).correct
    v = judge({"cat": [det(0, 0, 5, 5)], "dog": [det(9, 9, 20, 20)]}, meta)
    assert not v.correct and v.score == pytest.approx(0.5) and "expected dog<1" in v.reasons[0]
    assert judge({"cat": [det(0, 0, 5, 5)], "dog": [det(9, 9, 20, 20, 0.2)]}, meta).correct  # unconfident dog


def test_select_objects_caps_sorts_and_optionally_suppresses():
    many = {"cup": [det(i, 0, i + 5, 5, score=0.31 + i / 100) for i in range(30)]}
    kept = select_objects(many, "two_object")["cup"]
    assert len(kept) == geneval.MAX_OBJECTS and kept[0].score == max(d.score for d in many["cup"])
    assert [d.score for d in kept] == sorted((d.score for d in kept), reverse=True)
    overlapping = {"cup": [det(0, 0, 10, 10, 0.9), det(1, 0, 11, 10, 0.8), det(50, 50, 60, 60, 0.7)]}
    assert len(select_objects(overlapping, "two_object")["cup"]) == 3  # the benchmark's default: no NMS
    assert len(select_objects(overlapping, "two_object", max_overlap=0.5)["cup"]) == 2


def test_metadata_errors():
    with pytest.raises(ValueError, match="include"):
        evaluate({}, {"tag": "x"})
    bad = {"tag": "position", "include": [{"class": "dog", "count": 1, "position": ["left of", 0]}]}
    with pytest.raises(ValueError, match="earlier include"):
        evaluate({"dog": [det(0, 0, 1, 1)]}, bad)


def test_summarize_is_the_benchmarks_mean_over_tags():
    tags = ["single_object"] * 4 + ["counting"] * 2 + ["position"]
    out = summarize(tags, [1, 1, 1, 0, 1, 0, float("nan")])
    assert out == {"single_object": 0.75, "counting": 0.5, "overall": 0.625}  # NaN (unscored) left out
    assert list(summarize(["position", "colors"], [True, False])) == ["colors", "position", "overall"]
    assert math.isnan(summarize([], [])["overall"])
