"""scoring.py: the weighted combination of rewards, per-sample failure isolation, loud failures (RewardError,
warnings once per cause with counts, non-finite images never scored), group keys, --reward_options checked against
the factories, and the command line that scores image files."""
import math
import types
import warnings

import pytest
import torch
from test_rewards import ocr, pil, render  # noqa: F401 (ocr: the RapidOCR fixture, used by argument name)

import rewards
from flow_cps import digits, evaluation, geneval, scoring, session
from flow_cps.scoring import RewardError, RewardModel, RewardWarning
from rewards import NORMALISERS, REGISTRY, Normaliser


# -- combination, normalisation, failure isolation ---------------------------------------------------------------
def _const(values):
    return lambda device="cpu", **_: (lambda images, prompts, metadata=None: torch.tensor(values[:len(prompts)]))


def test_combination_normalises_each_component(monkeypatch):
    monkeypatch.setitem(REGISTRY, "t_a", _const([1.0, 2.0, 3.0]))
    monkeypatch.setitem(REGISTRY, "t_b", _const([10.0, 30.0, 20.0]))
    monkeypatch.setitem(NORMALISERS, "t_a", Normaliser(2.0, 0.5))
    monkeypatch.setitem(NORMALISERS, "t_b", Normaliser(20.0, 10.0))
    out = RewardModel("t_a:2,t_b:0.5")(torch.zeros(3, 3, 8, 8), ["x"] * 3)
    expected = 2 * (torch.tensor([1.0, 2, 3]) - 2) / 0.5 + 0.5 * (torch.tensor([10.0, 30, 20]) - 20) / 10
    assert torch.allclose(out.total, expected) and out.valid.all()
    assert out.components["t_a"].tolist() == [1, 2, 3] and out.components["t_b"].tolist() == [10, 30, 20]  # raw
    single = RewardModel("t_b:0.5")(torch.zeros(3, 3, 8, 8), ["x"] * 3)
    assert single.total.tolist() == [5, 15, 10]  # one reward trains on its own scale


def test_a_failing_sample_only_invalidates_itself(monkeypatch):
    def fragile(device="cpu", **_):
        def fn(images, prompts, metadata=None):
            if "bad" in prompts:
                raise RuntimeError("cannot score this one")
            return images.flatten(1).mean(1)
        return fn

    monkeypatch.setitem(REGISTRY, "t_fragile", fragile)
    monkeypatch.setitem(REGISTRY, "t_const", _const([1.0, 1.0, 1.0]))
    images = torch.stack([torch.full((1, 4, 4), v) for v in (0.2, 0.5, 0.8)])
    with pytest.warns(RewardWarning, match="reward t_fragile: 1 of 3 samples failed: RuntimeError: cannot score"):
        out = (model := RewardModel("t_fragile,t_const"))(images, ["ok", "bad", "fine"])
    assert out.valid.tolist() == [True, False, True] and math.isnan(out.total[1])
    assert out.components["t_fragile"][[0, 2]].tolist() == pytest.approx([0.2, 0.8])
    assert out.components["t_const"].tolist() == [1, 1, 1]  # the other reward is untouched
    sums = scoring.GroupedSums()
    sums.count(model, out, [None] * 3)  # the logged means leave the unscored sample out
    assert scoring.GroupedSums.means([sums]) == pytest.approx({"t_fragile": 0.5, "t_const": 1.0})


def _raising(rules):
    """A reward that raises rules[p] for prompts p in rules, else scores the image mean."""
    def factory(device="cpu"):
        def fn(images, prompts, metadata=None):
            for p in prompts:
                if p in rules:
                    raise rules[p]
            return images.flatten(1).mean(1)
        return fn
    return factory


def test_each_distinct_failure_is_reported_once_and_counted(monkeypatch):
    monkeypatch.setitem(REGISTRY, "t_flaky", _raising({"a": ValueError("bad a"), "b": RuntimeError("bad b")}))
    model = RewardModel("t_flaky")
    images = torch.rand(4, 1, 4, 4)
    with pytest.warns(RewardWarning) as caught:
        out = model(images, ["a", "b", "a", "ok"])
    assert sorted(str(w.message).split(" (reported")[0] for w in caught) == [
        "reward t_flaky: 1 of 4 samples failed: RuntimeError: bad b",
        "reward t_flaky: 2 of 4 samples failed: ValueError: bad a"]
    assert out.valid.tolist() == [False, False, False, True]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second batch with the same causes: counted, not printed again
        model(images, ["a", "ok", "ok", "b"])
    assert model.failures == {"t_flaky: ValueError: bad a": 3, "t_flaky: RuntimeError: bad b": 2}


def test_a_component_that_fails_everywhere_raises(monkeypatch):
    monkeypatch.setitem(REGISTRY, "t_broken", _raising({p: OSError("weights vanished") for p in "abc"}))
    monkeypatch.setitem(REGISTRY, "t_const", _const([1.0, 1.0, 1.0]))
    with pytest.raises(RewardError, match=r"reward 't_broken' failed for all 3 samples of the batch \(3 x OSError: "
                                          r"weights vanished\)\. Check its options") as err:
        RewardModel("t_const,t_broken")(torch.rand(3, 1, 4, 4), ["a", "b", "c"])
    assert isinstance(err.value.__cause__, OSError)  # the first failure's traceback comes with it
    nan = lambda device="cpu": lambda images, prompts, metadata=None: torch.full((len(prompts),), float("nan"))  # noqa: E731
    monkeypatch.setitem(REGISTRY, "t_nan", nan)
    with pytest.raises(RewardError, match="returned NaN for all 2 .*would train on nothing"):
        RewardModel("t_nan")(torch.rand(2, 1, 4, 4), ["x", "y"])
    assert RewardModel("t_nan")(torch.rand(0, 1, 4, 4), []).total.numel() == 0  # an empty batch is not a failure


def test_ocr_on_prompts_without_quotes_raises(ocr):  # noqa: F811
    with pytest.raises(RewardError, match="reward 'ocr' returned NaN for all 2 .*text in double quotes"):
        RewardModel("ocr")(render("HELLO").expand(2, -1, -1, -1), ["a sign", "another sign"])


def test_non_finite_images_are_never_scored(monkeypatch):
    seen = []

    def spy(device="cpu"):
        def fn(images, prompts, metadata=None):
            seen.append((images.clone(), list(prompts), metadata))
            return images.flatten(1).mean(1)
        return fn
    monkeypatch.setitem(REGISTRY, "t_spy", spy)
    images, labels = digits.load("test")
    images = images[:4].clone()
    images[1, 0, 0, 0], images[3] = float("nan"), float("inf")
    prompts = [f"a handwritten digit {int(d)}" for d in labels[:4]]
    model = RewardModel("t_spy,digit_judge_accuracy")
    with pytest.warns(RewardWarning, match="inputs: 2 of 4 images not finite"):
        out = model(images, prompts, [{"i": i} for i in range(4)])
    (got, got_prompts, got_meta), = seen
    assert torch.equal(got, images[[0, 2]]) and got_prompts == [prompts[0], prompts[2]] and got_meta == [{"i": 0},
                                                                                                        {"i": 2}]
    for v in out.components.values():  # NaN for every component (the judge's argmax on NaN would say 0.1)
        assert v.isnan().tolist() == [False, True, False, True]
    assert out.valid.tolist() == [True, False, True, False] and model.failures[
        "inputs: images with NaN/inf values, not scored"] == 2
    with pytest.raises(RewardError, match="all 4 images contain NaN or inf: the model diverged"):
        model(torch.full((4, 1, 8, 8), float("nan")), prompts)


def test_group_keys(monkeypatch):
    def grouped(device="cpu"):
        fn = lambda images, prompts, metadata=None: images.flatten(1).mean(1)  # noqa: E731
        fn.group_key = lambda m: m.get("tag") if m else None
        return fn
    monkeypatch.setitem(REGISTRY, "t_grouped", grouped)
    monkeypatch.setitem(REGISTRY, "t_const", _const([1.0, 1.0]))
    keys = RewardModel("t_grouped,t_const").group_keys([{"tag": "counting"}, None])
    assert keys == {"t_grouped": ["counting", None], "t_const": [None, None]}
    assert REGISTRY["geneval_overall"].forwards_to is geneval.Options  # the GenEval rewards key by tag (end-to-end)


def test_train_and_eval_metrics_are_one_rule(monkeypatch):
    """train/geneval_overall (Session.train_metrics, on the training samples) and eval/geneval_overall (the held-out
    evaluation's streamed sums) are the same rule on the same images: GenEval's overall score, the mean over tags of
    the tag means (geneval.summarize), not the mean over images (4/6 here). The detector is a stand-in that passes
    the images the metadata marks."""
    class Passes:
        def __call__(self, images, metadata, rule, swap_red_blue):
            return [geneval.Verdict(correct=bool(m["passes"]), score=float(m["passes"])) for m in metadata]
    monkeypatch.setattr(geneval, "shared_scorer", lambda *args, **options: Passes())
    tags = ["counting", "counting", "counting", "colors", "position", "position"]
    passes = [1, 0, 0, 1, 1, 0]
    meta = [{"tag": t, "include": [{"class": "cat", "count": 1}], "passes": ok} for t, ok in zip(tags, passes)]
    images, texts = torch.rand(6, 3, 8, 8), [f"prompt {i}" for i in range(6)]
    metrics = RewardModel("geneval_overall")
    train = session.Session.train_metrics(types.SimpleNamespace(metrics=metrics), images, texts, meta)
    held_out = evaluation.HeldOut(texts, meta, metrics, steps=1, per_prompt=1, micro_batch=4)
    sums = held_out.sums()
    for pairs in held_out.batches():  # streamed, in micro-batches, as train.evaluate feeds it
        sums.add(pairs, images[[p for _, p in pairs]])
    held = sums.result().metrics
    assert train == {"train/geneval_overall": held["geneval_overall"]}
    assert held["geneval_overall"] == pytest.approx(geneval.summarize(tags, passes)["overall"])
    assert held["geneval_overall"] == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)


# -- options, checked at config time -----------------------------------------------------------------------------
USED = ["digit_judge", "ocr", "geneval_partial", "geneval_flow_grpo"]


@pytest.mark.parametrize("text, message", [
    ('{"ocr": {"det_limit_side_len": 960}', r"--reward_options is not valid JSON: Expecting ',' delimiter at line 1 "
                                            r"column 36 \(char 35\)"),
    ('["ocr"]', r"--reward_options must be a JSON object \{reward name: \{option: value\}\}.* got a JSON array"),
    ('{"pickscore": {"model": "/x"}}', r"options for 'pickscore', which this run does not use; its rewards are: "
                                       r"digit_judge, ocr, geneval_partial, geneval_flow_grpo"),
    ('{"digit_judge": 5}', r"the value for 'digit_judge' must be a JSON object of options, .* got a JSON number: 5"),
    ('{"ocr": {"det_limit": 960}}', r"reward 'ocr' has no option 'det_limit'; its options are: det_limit_side_len"),
    ('{"geneval_partial": {"jpeg_quality": 90}}', r"reward 'geneval_partial' has no option 'jpeg_quality'; its "
                                                  r"options are: clip, counting_threshold, detector, detector_size, "
                                                  r"dtype, max_objects, max_overlap, max_per_image, position_margin, "
                                                  r"threshold"),
])
def test_parse_options_errors(text, message):
    with pytest.raises(ValueError, match=message):
        scoring.parse_options(text, USED)


def test_parse_options_accepts_what_factories_take():
    text = '{"ocr": {"det_limit_side_len": 320}, "geneval_flow_grpo": {"jpeg_quality": 90, "detector_size": 512}}'
    assert scoring.parse_options(text, USED) == {"ocr": {"det_limit_side_len": 320},
                                                 "geneval_flow_grpo": {"jpeg_quality": 90, "detector_size": 512}}
    assert scoring.parse_options("{}", USED) == {}
    assert scoring._parameters("clean_background") == {}  # it takes no options
    with pytest.raises(ValueError, match="reward 'clean_background' has no option 'scale'; its options are: "
                                         r"\(none\)"):
        RewardModel("clean_background", clean_background={"scale": 2})  # not a TypeError deep in the factory


def test_score_files_cli(tmp_path, capsys):
    path = tmp_path / "sign.png"
    pil(render("OPEN LATE"))[0].save(path)
    rewards.main(["ocr,clean_background:0", str(path), "--prompt", 'A sign that says "OPEN LATE"'])
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(path)) and "ocr 1.0000" in line and "total 1.6667" in line  # (1 - 0.5) / 0.3
