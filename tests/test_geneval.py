"""GenEval's rules on synthetic detections: every tag, counts, colours, the position margin, exclusions, and the
benchmark's summary. (The model path, Mask2Former + CLIP, is tested in test_rewards.py on tiny models.)"""
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flow_cps import geneval
from flow_cps.geneval import Detection, evaluate, relative_position, select_objects, summarize


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


# -- comparisons as the official code makes them (float32, argsort order) ----------------------------------------
def test_scores_are_compared_in_float32():
    # mmdet's scores are a float32 array and `scores > 0.3` stays float32: float32(0.3) is not above the threshold
    # (in float64 it is: 0.30000001192... > 0.3)
    at = float(np.float32(0.3))
    assert at > 0.3 and not judge({"dog": [det(0, 0, 10, 10, at)]}, SINGLE).correct
    assert not judge({"dog": [det(0, 0, 10, 10, 0.3 + 1e-9)]}, SINGLE).correct  # rounds to float32(0.3)
    above = float(np.nextafter(np.float32(0.3), np.float32(1)))
    assert judge({"dog": [det(0, 0, 10, 10, above)]}, SINGLE).correct
    clocks = {"clock": [det(10 * i, 0, 10 * i + 8, 8, float(np.float32(0.9))) for i in range(3)]}
    assert not judge(clocks, COUNT3).correct  # the counting threshold likewise


def test_equal_scores_keep_the_benchmarks_order():
    # argsort(scores)[::-1]: equal scores come out last-first, so the benchmark judges the colour of the *later* car
    red, blue = det(0, 0, 9, 9, 0.8, "red"), det(20, 0, 29, 9, 0.8, "blue")
    kept = select_objects({"car": [red, blue]}, "colors")["car"]
    assert kept == [blue, red]
    assert not judge({"car": [red, blue]}, RED_CAR).correct and judge({"car": [blue, red]}, RED_CAR).correct
    # float32 ties: two float64 scores that round to the same float32 are equal for the benchmark
    a, b = det(0, 0, 9, 9, 0.7, "red"), det(20, 0, 29, 9, 0.7 + 1e-12, "blue")
    assert select_objects({"car": [b, a]}, "colors")["car"] == [a, b]
    # otherwise most confident first, whatever the list order
    hi, lo = det(0, 0, 9, 9, 0.9), det(20, 0, 29, 9, 0.5)
    assert select_objects({"car": [lo, hi]}, "colors")["car"] == [hi, lo]


def test_position_is_float32_arithmetic():
    # a box edge below float32 resolution: in float64, b's right edge is 2e-9 px left of 2.5, so the offset beats
    # the margin by a hair (dx = 0.5 + 7e-10 -> "right of"); in float32 the edge is 2.5 and dx is exactly 0.5
    a, b = (1.0, 0.0, 3.5, 10.0), (0.0, 0.0, 2.5 - 2e-9, 10.0)
    assert relative_position(a, b) == set()
    assert relative_position(a, (0.0, 0.0, 2.4, 10.0)) == {"right of"}


# -- Flow-GRPO's reward server rule (geneval.evaluate_flow_grpo), hand-worked ------------------------------------
def flow(objects, meta):
    return geneval.evaluate_flow_grpo(select_objects(objects, meta["tag"]), meta)


def test_flow_grpo_counts_are_exact_and_unfloored():
    v = flow({"dog": [det(0, 0, 10, 10)]}, SINGLE)
    assert v.correct and v.score == 1
    two_dogs = {"cat": [det(0, 0, 5, 5)], "dog": [det(9, 9, 20, 20), det(30, 30, 40, 40, 0.8)]}
    v = flow(two_dogs, TWO)  # credits: cat 1, dog 1 - |1 - 2| / 1 = 0
    assert not v.correct and v.score == 0.5 and "expected dog==1, found 2" in v.reasons
    v = flow({"clock": [det(10 * i, 0, 10 * i + 8, 8) for i in range(7)]}, COUNT3)
    assert v.score == pytest.approx(1 - 4 / 3)  # negative: not floored (the project's `geneval` floors it at 0)


def test_flow_grpo_colour_needs_the_exact_count():
    assert flow({"car": [det(0, 0, 9, 9, color="red")]}, RED_CAR).score == 1
    assert flow({"car": [det(0, 0, 9, 9, color="blue")]}, RED_CAR).score == 0.5  # count 1, colour 0
    # two red cars for "a red car": count credit 0, and the colour is not judged: one 0 (the project's rule: 1/2)
    v = flow({"car": [det(0, 0, 9, 9, color="red"), det(20, 0, 29, 9, 0.5, "red")]}, RED_CAR)
    assert v.score == 0 and not v.correct
    # colour_attr with the umbrella missing: bench (count 1, colour 1), umbrella (count 0, one 0) -> 2 / 4
    v = flow({"bench": [det(0, 0, 9, 9, color="red")]}, ATTR)
    assert v.score == 0.5 and not v.correct


def test_flow_grpo_failed_relation_credits_zero_and_one():
    right = {"cat": [det(50, 0, 60, 10)], "dog": [det(0, 0, 10, 10)]}
    assert flow(right, DOG_LEFT_OF_CAT).score == 1 and flow(right, DOG_LEFT_OF_CAT).correct
    wrong = {"cat": [det(0, 0, 10, 10)], "dog": [det(50, 0, 60, 10)]}
    v = flow(wrong, DOG_LEFT_OF_CAT)  # credits: cat 1, dog 1, relation 0 and then 1 (the server's quirk) -> 3 / 4
    assert v.score == 0.75 and not v.correct
    v = flow({"dog": [det(0, 0, 10, 10)]}, DOG_LEFT_OF_CAT)  # cat 0; dog 1; no target -> 0: 1 / 3
    assert v.score == pytest.approx(1 / 3) and "no target for dog to be left of" in v.reasons


def test_flow_grpo_ignores_excludes():
    meta = {"tag": "custom", "include": [{"class": "cat", "count": 1}], "exclude": [{"class": "dog", "count": 1}]}
    v = flow({"cat": [det(0, 0, 5, 5)], "dog": [det(9, 9, 20, 20)]}, meta)
    assert v.correct and v.score == 1  # the benchmark's rule and the project's `geneval` both fail this image
    assert flow({}, {"tag": "custom", "exclude": [{"class": "dog", "count": 1}]}).score == 0  # no credits: 0


def test_jpeg_roundtrip_is_pils_default_jpeg():
    g = torch.Generator().manual_seed(0)
    images = F.interpolate(torch.rand(2, 3, 8, 8, generator=g), size=32, mode="bilinear")  # smooth, photo-like
    out = geneval.jpeg_roundtrip(images)
    for img, got in zip(images, out):
        buf = io.BytesIO()  # what Flow-GRPO's client does: uint8 -> PIL -> save(format="JPEG"), PIL's default quality
        Image.fromarray((img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(buf, "JPEG")
        ref = torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1).float() / 255
        assert torch.equal(got, ref)
    assert 0 < (out - images).abs().mean() < 0.05  # lossy (4:2:0 chroma), but close
    assert geneval.jpeg_roundtrip(images[:, :1]).shape == (2, 3, 32, 32)  # grey images go through as RGB


def test_tag_is_the_group_key():
    assert geneval.tag_of(COUNT3) == "counting" and geneval.tag_of(None) is None and geneval.tag_of({}) is None
