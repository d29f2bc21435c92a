"""The shapes task's world (flow_cps/scenes.py): the grammar, the held-out compositions, native rendering, and the
analytic judge, checked against scenes built by hand."""
import itertools
import random

import numpy as np
import pytest
import torch

from flow_cps import prompts, scenes, shapes
from flow_cps.scenes import Obj, Placed


def test_every_prompt_parses_back_to_its_scene():
    for tag, ss in scenes.all_scenes().items():
        for s in ss:
            assert scenes.parse(scenes.text(s)) == s, tag
    assert scenes.text(scenes.parse("two  Red squares")) == "two red squares"
    with pytest.raises(ValueError, match="not a shapes prompt; write e.g. 'two red squares'"):
        scenes.parse("a purple square")
    with pytest.raises(ValueError, match="two different single objects"):
        scenes.parse("two red squares above a blue circle")


def test_held_out_compositions_never_reach_training_and_every_test_prompt_holds_one():
    train, test = prompts.load("shapes", "train")[0], prompts.load("shapes", "test")[0]

    def compositions(text):
        s = scenes.parse(text)
        if s.tag == "counting":
            return {(s.objects[0].count, s.objects[0].shape)}
        return {frozenset((o.colour, o.shape) for o in s.objects)} if len(s.objects) == 2 else set()
    held = {(n, s) for n, s in scenes.HELD_OUT_COUNTS} | {
        frozenset(((a.colour, a.shape), (b.colour, b.shape))) for a, b in itertools.combinations(
            [Obj(c, s) for c in scenes.COLOURS for s in scenes.SHAPES], 2) if scenes.held_out_pair(a, b)}
    assert len(held) > 2 + 10
    assert not set().union(*map(compositions, set(train))) & held
    assert all(compositions(t) & held for t in test) and not set(train) & set(test)
    assert len(test) == 24 and {scenes.parse(t).tag for t in test} == {"counting", "two_object", "position"}
    # every word of a held-out prompt is a trained word: only the composition is new
    trained_words = {w for t in train for w in t.split()}
    assert {w for t in test for w in t.split()} <= trained_words
    tags = [m["tag"] for m in prompts.load("shapes", "train")[1]]
    assert {tags.count(t) for t in scenes.TAGS} == {len(tags) // 4}  # the four tags equally often



def test_fresh_prompts_are_new_strings_of_trained_compositions():
    train, fresh = prompts.load("shapes", "train")[0], prompts.load("shapes", "fresh")
    texts, meta = fresh
    pretrain = {scenes.text(s) for ss in scenes.scenes("train").values() for s in ss}  # what pre-training draws
    assert not set(texts) & (set(train) | pretrain | set(prompts.load("shapes", "test")[0]))
    assert [m["tag"] for m in meta] == ["counting"] * 4 + ["two_object"] * 8 + ["position"] * 8
    trained = {scenes.composition(scenes.parse(t)) for t in train if scenes.parse(t).tag != "single"}
    fresh_comps = [scenes.composition(scenes.parse(t)) for t in texts]
    assert set(fresh_comps) <= trained and len(set(fresh_comps)) == len(texts)  # trained; one prompt each
    assert not any(scenes.is_held_out(scenes.parse(t)) for t in texts)
    # the split is a fixed function of the grammar: the same list on every call (crc32, not hash())
    assert prompts.load("shapes", "fresh", seed=5)[0] == texts and texts[0] == "two red circles"
    with pytest.raises(ValueError, match="split"):
        prompts.load("digits", "fresh")

def test_the_encoder_reads_words_so_a_new_composition_conditions_differently():
    enc = shapes.PromptEncoder()
    train = sorted(set(prompts.load("shapes", "train")[0]))
    new = prompts.load("shapes", "test")[0][0]
    seq, pooled, ids = enc(train + [new])
    assert seq.shape == (len(train) + 1, shapes.MAX_WORDS, shapes.EMBED_DIM) and ids.shape == (shapes.MAX_WORDS, 3)
    assert (pooled[:-1] - pooled[-1]).abs().amax(1).min() > 1e-3  # distinct from every training prompt's encoding
    # built from the trained words: each position holds its word's vector, the same rows training prompts use
    word = new.split()[1]
    torch.testing.assert_close(seq[-1, 1], enc.word.weight[shapes.VOCAB.index(word)] + enc.position.weight[1])


def test_rendering_is_native_and_antialiased():
    p = Placed("red", "square", 8.0, 8.0, 3.0)
    img = scenes.render([p], 16)
    assert img.shape == (3, 16, 16)
    np.testing.assert_allclose(img[:, 5:11, 5:11], np.broadcast_to(np.array(scenes.COLOURS["red"])[:, None, None],
                                                                   (3, 6, 6)))
    assert img[:, :5].max() == 0 and img[:, 11:].max() == 0
    circle = scenes.coverage("circle", 8.0, 8.0, 3.0, 16)
    assert circle.sum() == pytest.approx(np.pi * 9, rel=0.02) and 0 < circle[5, 7] < 1  # partial edge pixels
    # a 32x32 render of the same scene is drawn again, not upsampled: it holds detail the 16x16 one does not
    big = scenes.render([Placed("red", "circle", 16.0, 16.0, 6.0)], 32)
    small = scenes.render([Placed("red", "circle", 8.0, 8.0, 3.0)], 16)
    upsampled = small.repeat(2, 1).repeat(2, 2)
    assert np.abs(big - upsampled).max() > 0.2
    np.testing.assert_allclose(big.reshape(3, 16, 2, 16, 2).mean((2, 4)), small, atol=0.05)


@pytest.mark.parametrize("size", scenes.SIZES)
def test_the_judge_is_exact_on_rendered_scenes(size):
    rng = random.Random(size)
    for ss in scenes.all_scenes().values():
        for s in rng.sample(ss, min(len(ss), 12)):
            image = scenes.render(scenes.layout(s, size, rng), size)
            assert scenes.judge(image, s), (size, scenes.text(s))
            assert all(f.misfit < 0.2 for f in scenes.detect(image))


def test_the_judge_rejects_each_kind_of_mistake():
    size = 24
    a, b = Placed("red", "square", 6.0, 6.0, 3.5), Placed("blue", "circle", 6.0, 18.0, 3.5)
    image = scenes.render([a, b], size)
    ask = lambda text: scenes.judge(image, scenes.parse(text))  # noqa: E731
    assert ask("a red square above a blue circle") and ask("a blue circle below a red square")
    assert ask("a red square and a blue circle")
    assert not ask("a red square below a blue circle")  # relation
    assert not ask("a red circle above a blue circle")  # shape
    assert not ask("a green square above a blue circle")  # colour
    assert not ask("a red square")  # an extra object
    assert not ask("two red squares")  # count
    # partial credit, by hand: each kind's count credit, nothing extra, the relation
    credit = lambda text: scenes.credit(scenes.detect(image), scenes.parse(text))  # noqa: E731
    assert credit("a red square above a blue circle") == 1.0
    assert credit("a red square below a blue circle") == pytest.approx(3 / 4)  # counts 1, 1, nothing extra, relation 0
    assert credit("two red squares") == pytest.approx((0.5 + 0) / 2)  # 1 of 2 found; a blue circle is extra
    assert credit("a red circle above a blue circle") == pytest.approx((0 + 1 + 0 + 0) / 4)
    triangle = scenes.render([Placed("yellow", "triangle", 12.0, 12.0, 5.0)], size)
    assert [(f.colour, f.shape) for f in scenes.detect(triangle)] == [("yellow", "triangle")]
    assert scenes.detect(np.zeros((3, size, size))) == []
