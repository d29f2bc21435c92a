"""The shapes task's models and rewards (flow_cps/shapes.py, rewards.py), and the digits task's independent judge:
the generator is a real FLUX transformer behind the same adapter as FLUX.1, the reward sees residual noise, the judge
is exact, and neither judge shares a model with its task's reward."""
import random

import numpy as np
import torch

from flow_cps import digits, models, prompts, scenes, shapes
from flow_cps.scoring import RewardModel
from rewards import REGISTRY
from tools import shapes_pilot


def test_the_shapes_model_is_a_flux_transformer_on_packed_rgb_pixels():
    bb = models.load_builtin_backbone("shapes")  # pre-trained once into the test cache
    assert type(bb.transformer).__name__ == "FluxTransformer2DModel" and bb.kind == "flux"
    assert bb.latent_shape == ((shapes.SIZE // 2) ** 2, 12)
    images = torch.rand(2, 3, shapes.SIZE, shapes.SIZE)
    torch.testing.assert_close(bb.decode(bb.encode_images(images)), images)  # pixels are the latents, 2x2-packed
    bb.check_prompts(["a blue circle above a red square"])
    try:
        bb.check_prompts(["a handwritten digit 7"])
        raise AssertionError("the shapes model accepted a digits prompt")
    except ValueError as e:
        assert "not a shapes prompt" in str(e)


def test_scene_reward_sees_scenes_as_the_judge_does_and_falls_with_noise():
    """The learned detector (another model than the judge) gives renders of the held-out scenes nearly full credit;
    the credit falls as added noise grows (how much, per size: report section 5)."""
    fn = REGISTRY["scene_reward"]()
    rng = random.Random(3)
    texts = prompts.load("shapes", "test")[0] * 4
    right = torch.tensor(np.stack([scenes.render(scenes.layout(scenes.parse(t), 16, rng), 16) for t in texts]),
                         dtype=torch.float32)
    assert float(fn(right, texts).mean()) > 0.85
    assert float(fn(right.flip(0), texts).mean()) < 0.7  # other scenes' renders
    g = torch.Generator().manual_seed(0)
    means = [float(fn((right + s / 2 * torch.randn(right.shape, generator=g)).clamp(0, 1), texts).mean())
             for s in (0.0, 0.2, 0.4)]
    assert means == sorted(means, reverse=True) and means[0] - means[-1] > 0.1, means


def test_scene_judge_scores_renders_one_and_is_grouped_by_tag():
    texts, meta = prompts.load("shapes", "test")
    rng = random.Random(0)
    images = torch.tensor(np.stack([scenes.render(scenes.layout(scenes.parse(t), 24, rng), 24) for t in texts]),
                          dtype=torch.float32)
    judge = RewardModel("scene_judge")
    assert judge(images, texts, meta).total.tolist() == [1.0] * len(texts)
    assert judge(images.flip(0), texts, meta).total.mean() < 0.3
    # every held-out prompt holds a composition never trained on, so none is a lone object ('single')
    assert set(judge.group_keys(meta)["scene_judge"]) == set(scenes.TAGS) - {"single"}


def test_the_digits_judge_is_independent_of_the_digits_reward():
    x, y = digits.load("train")  # the reward's training data, unseen by the SVM
    prompts_ = [f"a handwritten digit {int(d)}" for d in y]
    assert float(REGISTRY["digit_svm_accuracy"]()(x, prompts_).mean()) > 0.97
    svm, judge = digits.train_svm(), digits.load_judge()
    xt, yt = digits.load("test")  # the SVM's training data, unseen by the reward's MLP
    assert float((judge(xt).argmax(1) == yt).float().mean()) > 0.9
    assert (svm.predict(digits.svm_features(xt)) == yt.numpy()).mean() == 1.0  # its own data: fitted exactly


def test_a_pilot_snapshot_is_exactly_the_shorter_pre_training(tmp_path, monkeypatch):
    """tools/shapes_pilot.py installs step k of a long pre-training as the k-step model: at a constant lr the two
    are the same weights, bit for bit (same batches, noises and updates), and the longer run has moved on."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    monkeypatch.setattr(shapes, "judge_accuracy", lambda *a, **k: 0.0)  # the weights are what is checked
    snap = {}

    def on_step(k, seconds, backbone, transformer, encoder):
        if k == 3:
            snap["t"] = {n: p.clone() for n, p in transformer.state_dict().items()}
            snap["e"] = {n: p.clone() for n, p in encoder.state_dict().items()}
    shapes._build(tmp_path / "long", models.shapes_backbone, False, 16, 5, on_step)
    shapes._build(tmp_path / "short", models.shapes_backbone, False, 16, 3)
    short = FluxTransformer2DModel.from_pretrained(tmp_path / "short", subfolder="transformer").state_dict()
    long = FluxTransformer2DModel.from_pretrained(tmp_path / "long", subfolder="transformer").state_dict()
    assert all(torch.equal(short[n], snap["t"][n]) for n in short)
    assert any(not torch.equal(short[n], long[n]) for n in short)
    enc = load_file(tmp_path / "short" / "prompt_encoder.safetensors")
    assert all(torch.equal(enc[n], snap["e"][n]) for n in enc)
    assert shapes.pretrain_steps(16) == 200 and shapes.cooldown_steps(16) == 0  # conftest's short pre-training
    # a cooldown from the saved 3-step model (tools/shapes_pilot.py --cool) is exactly the 3 + 2 build
    shapes._build(tmp_path / "cooled", models.shapes_backbone, False, 16, 3, cooldown=2)
    bb, tr, en = shapes_pilot.load_snapshot(tmp_path / "short")
    shapes.cool(bb, tr, en, 16, 2, progress=False)
    cooled = FluxTransformer2DModel.from_pretrained(tmp_path / "cooled", subfolder="transformer").state_dict()
    assert all(torch.equal(cooled[n], p) for n, p in tr.state_dict().items())
    assert any(not torch.equal(cooled[n], short[n]) for n in short)
    assert shapes.model_path(16, 3, 2) != shapes.model_path(16, 3, 0)
