"""clip.py: the tensor preprocessing against transformers' own processor, the processor settings read from both of
its on-disk layouts, the OpenCLIP -> transformers mapping against a plain-torch OpenCLIP forward, and that importing
the reward modules builds no transformers image processor (no torchvision warning at start-up)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clip_fixtures import (
    TXT,
    VIS,
    openclip_features,
    openclip_ids,
    openclip_state_dict,
    pil,
    rand_images,
    save_clip_processor,
    tiny_tokenizer,
)

from flow_cps import clip

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "two dogs on a sofa"]


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory):
    return save_clip_processor(tmp_path_factory.mktemp("processor"))


def test_clip_preprocess_matches_the_processor(processor_dir):
    from transformers import CLIPProcessor

    proc = CLIPProcessor.from_pretrained(processor_dir)
    images = rand_images(2, 48, 80, seed=3)
    images = F.avg_pool2d(F.interpolate(images, scale_factor=4), 5, 1, 2)  # smoother than white noise, like a photo
    ours = clip.clip_preprocess(clip.quantise(images), 32, 32, proc.image_processor.image_mean,
                                proc.image_processor.image_std)
    theirs = proc.image_processor(pil(images), return_tensors="pt").pixel_values
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert (ours - theirs).abs().mean() < 0.02  # torch's antialiased bicubic vs PIL's, in normalised units


def test_processor_settings_from_both_layouts(processor_dir, tmp_path):
    expected = dict(size=32, crop=32, mean=clip.CLIP_MEAN, std=clip.CLIP_STD)
    assert clip.load_processor_settings(processor_dir, "pickscore", "processor", "hub/id") == expected
    # the hub repos' layout: preprocessor_config.json with plain ints (laion/CLIP-ViT-H-14-laion2B-s32B-b79K's)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": 224, "crop_size": 224, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25],
         "image_processor_type": "CLIPImageProcessor"}))
    assert clip.load_processor_settings(str(tmp_path), "pickscore", "processor", "hub/id") == dict(
        size=224, crop=224, mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(FileNotFoundError, match=r"hf download hub/id.*\n.*--reward_options"):
        clip.load_processor_settings("/no/such/processor", "pickscore", "processor", "hub/id")


def test_openclip_conversion_details(tmp_path):
    sd = openclip_state_dict(seed=2)
    half = {f"module.{k}": v.half() for k, v in sd.items()}  # a DDP-saved, fp16 ("compressed") bare state dict
    torch.save(half, tmp_path / "bare.pt")
    loaded = clip.load_openclip_state_dict(tmp_path / "bare.pt")
    assert set(loaded) == set(sd) and all(v.dtype == torch.float32 for v in loaded.values())
    model = clip.openclip_to_transformers(loaded, VIS["heads"], TXT["heads"])
    px, ids = torch.randn(2, 3, 32, 32), openclip_ids(PROMPTS)
    image, text = openclip_features(loaded, px, ids)
    with torch.no_grad():
        assert torch.allclose(model.get_image_features(pixel_values=px).pooler_output, image, atol=1e-5)
        hf_ids = tiny_tokenizer(TXT["ctx"])(PROMPTS, padding=True, return_tensors="pt")
        assert torch.allclose(model.get_text_features(**hf_ids).pooler_output, text, atol=1e-5)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-3)
    with pytest.raises(ValueError, match="no transformers CLIP counterpart"):
        clip.openclip_to_transformers({**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(32),
                                       "visual.attn_pool.query": torch.ones(1)}, VIS["heads"], TXT["heads"])
    with pytest.raises(ValueError, match="head counts"):
        clip.openclip_to_transformers(sd)  # width 32 cannot be split into 64-wide heads


def test_hps_resize_pads_to_square():
    img = torch.rand(1, 3, 16, 32)
    out = clip.resize_max_and_pad(img, 32)
    assert out.shape == (1, 3, 32, 32) and torch.equal(out[..., 8:24, :], img)
    assert out[..., :8, :].abs().sum() == 0 and out[..., 24:, :].abs().sum() == 0


def test_importing_the_reward_modules_warns_nothing():
    """A fresh interpreter: importing rewards (which imports clip, geneval, digits) and prompts loads no transformers
    image processor, so nothing about torchvision is printed; the CLIP factories import what they use when built."""
    code = ("import sys, rewards; from flow_cps import prompts, geneval, clip; "
            "print(sorted(m for m in sys.modules if m.startswith('transformers.models')))")
    out = subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torchvision" not in out.stderr.lower() and "warn" not in out.stderr.lower(), out.stderr
    assert out.stdout.strip() == "[]"  # no transformers model module (and so no image processor) imported


def test_to_uint8_rounds_and_clamps_as_numpy():
    """The one image -> 8-bit conversion (image grids, JPEG and OCR rewards, GenEval's JPEG round trip)."""
    img = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1  # some out of [0, 1]
    arr = clip.to_uint8(img)
    assert arr.shape == (2, 5, 7, 3) and arr.dtype == np.uint8
    assert (arr == np.rint(np.clip(img.numpy(), 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)).all()
    exact = torch.arange(256.0).div(255).reshape(1, 1, 16, 16)
    assert clip.to_uint8(exact).flatten().tolist() == list(range(256))  # k / 255 -> k, never k - 1
