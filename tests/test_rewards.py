"""rewards.py: OCR on real rendered text (real RapidOCR); PickScore, HPSv2.1 and GenEval on tiny random-weight
models saved in the public checkpoints' on-disk formats and loaded through the same code path as the real ones,
checked against hand computations; missing weights; the built-in rewards; combination and failure isolation."""
import inspect
import math
import os

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
    tiny_clip,
    tiny_tokenizer,
)
from PIL import Image, ImageDraw, ImageFont

import rewards
import train
from flow_cps import clip, digits, geneval
from flow_cps.scoring import RewardModel
from rewards import REGISTRY

# FLOW_CPS_TEST_DEVICE=cuda runs the model-based rewards on a GPU (references stay on the CPU)
DEVICE = os.environ.get("FLOW_CPS_TEST_DEVICE", "cpu")
if DEVICE != "cpu":
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32


# -- helpers -----------------------------------------------------------------------------------------------------
def render(text: str, size=(256, 64), font_size=32) -> torch.Tensor:
    """Black text on white, as (1, 3, H, W) in [0, 1]."""
    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).text((10, 10), text, fill="black", font=ImageFont.load_default(size=font_size))
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]


# -- OCR: real RapidOCR on rendered text -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ocr():
    return REGISTRY["ocr"]()


def test_ocr_score_formula():
    assert rewards.ocr_score("Hello World!", "hello") == 1.0  # contained, case and spaces ignored
    assert rewards.ocr_score("helo", "hello") == pytest.approx(1 - 1 / 5)
    assert rewards.ocr_score("", "open late") == 0.0  # nothing read: distance = len(target)
    assert rewards.ocr_score("zzzzzzzzzz", "ab") == 0.0  # floored at 0
    assert math.isnan(rewards.ocr_score("abc", "  "))


def test_ocr_reads_rendered_text(ocr):
    texts = ["OPEN LATE", "HELLO WORLD", "Fresh Bread"]
    scores = ocr(torch.cat([render(t) for t in texts]), [f'A sign that says "{t}"' for t in texts])
    assert (scores >= 0.9).all(), scores


def test_ocr_wrong_word_scores_by_edit_distance(ocr):
    img = render("BREAD")
    assert float(ocr(img, ['A sign that says "BREAK"'])[0]) == pytest.approx(1 - 1 / 5)  # bread vs break: 1 edit
    # bread vs broadway: e->o and 3 insertions = 4 edits over 8 letters
    assert float(ocr(img, ['A poster titled "BROAD WAY"'])[0]) == pytest.approx(1 - 4 / 8)


def test_ocr_blank_and_noise_score_zero(ocr):
    blank, noise = torch.ones(1, 3, 64, 256), rand_images(1, 64, 256)
    assert ocr(torch.cat([blank, noise]), ['A sign that says "OPEN"'] * 2).tolist() == [0.0, 0.0]


def test_ocr_needs_quoted_text(ocr):
    img = render("HELLO").expand(3, -1, -1, -1)
    out = ocr(img, ["a sign without quotes", "a sign", 'a sign "HELLO"'], [None, {"text": "HELLO"}, None])
    assert math.isnan(out[0]) and out[1] == 1 and out[2] == 1  # metadata "text" overrides the prompt
    assert rewards.ocr_target('say \u201cHI THERE\u201d and "NO"') == "HI THERE"


def test_ocr_target_and_spaces_as_flow_grpo():
    # the first pair of quotes, never text across two pairs; an empty first pair is no target (NaN), not ' on a '
    assert rewards.ocr_target('say "" on a "sign"') is None and rewards.ocr_target('a "  " sign') is None
    assert rewards.ocr_target('a "first" and a "second"') == "first"
    assert rewards.ocr_target('an unclosed "quote') is None
    # Flow-GRPO removes spaces (U+0020) only: a newline or tab between words is one edit
    assert rewards.ocr_score("HELLO WORLD", "hello world") == 1.0
    assert rewards.ocr_score("HELLO\nWORLD", "hello world") == pytest.approx(1 - 1 / 10)
    assert rewards.ocr_score("hello\tworld", "helloworld") == pytest.approx(1 - 1 / 10)


def test_ocr_reads_small_text_at_paddleocrs_detection_size(ocr):
    assert inspect.signature(REGISTRY["ocr"]).parameters["det_limit_side_len"].default == 960  # PaddleOCR 2.9's
    im = Image.new("RGB", (512, 512), "white")  # 12-px text on a 512-px image: read at full size (no shrinking)
    ImageDraw.Draw(im).text((300, 400), "FRESH BREAD", fill="black", font=ImageFont.load_default(size=12))
    img = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    assert ocr(img, ['A sign that says "FRESH BREAD"']).tolist() == [1.0]


# -- PickScore: a tiny CLIP in PickScore_v1's layout --------------------------------------------------------------
@pytest.fixture(scope="module")
def pickscore_dirs(tmp_path_factory):
    """PickScore_v1's layout: a CLIPModel folder and a separate CLIPProcessor folder (laion's CLIP-ViT-H-14)."""
    root = tmp_path_factory.mktemp("pickscore")
    tiny_clip(seed=1).save_pretrained(root / "model")
    return dict(model=str(root / "model"), processor=save_clip_processor(root / "processor"))


PROMPTS = ["a red cat", "two dogs on a sofa", "a sign that says hi"]


def test_pickscore_is_logit_scale_times_cosine(pickscore_dirs):
    from transformers import CLIPModel, CLIPProcessor

    images = rand_images(3, 32, 32)
    got = REGISTRY["pickscore"](DEVICE, **pickscore_dirs)(images, PROMPTS)
    # hand computation: transformers' own CLIP forward on the processor's PIL inputs;
    # logits_per_image = logit_scale.exp() * cos(image, text)
    model, proc = CLIPModel.from_pretrained(pickscore_dirs["model"]), CLIPProcessor.from_pretrained(
        pickscore_dirs["processor"])
    inp = proc(images=pil(images), text=PROMPTS, return_tensors="pt", padding=True, truncation=True, max_length=16)
    with torch.no_grad():
        out = model(**inp)
    cos = F.cosine_similarity(out.image_embeds, out.text_embeds)
    assert torch.allclose(got, out.logits_per_image.diag(), atol=1e-4)
    assert torch.allclose(got, model.logit_scale.exp() * cos, atol=1e-4)
    flow_grpo = REGISTRY["pickscore"](DEVICE, **pickscore_dirs, scale="flow_grpo")
    assert torch.allclose(flow_grpo(images, PROMPTS), got / 26, atol=1e-5)
    assert flow_grpo.normaliser.shift == pytest.approx(22 / 26)  # a combination normalises on that scale


# -- HPSv2.1: an OpenCLIP state dict converted to transformers' CLIP ---------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip_tokenizer")
    tiny_tokenizer(TXT["ctx"]).save_pretrained(path)
    return str(path)


def test_hpsv2_matches_an_openclip_forward(tmp_path, tokenizer_dir):
    sd = openclip_state_dict()
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": sd, "epoch": 1}, ckpt)  # the released file's layout
    fn = REGISTRY["hpsv2"](DEVICE, model=str(ckpt), tokenizer=tokenizer_dir, vision_heads=VIS["heads"],
                           text_heads=TXT["heads"])
    images = rand_images(3, 32, 32)
    got = fn(images, PROMPTS)
    px = (clip.quantise(images) - torch.tensor(clip.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        clip.CLIP_STD).view(1, 3, 1, 1)
    image, text = openclip_features(sd, px, openclip_ids(PROMPTS))
    assert torch.allclose(got, F.cosine_similarity(image, text), atol=1e-5)
    assert got.abs().max() <= 1


# -- GenEval: tiny Mask2Former + tiny CLIP -----------------------------------------------------------------------
DOG = geneval.COCO_CLASSES.index("dog")


@pytest.fixture(scope="module")
def geneval_dirs(tmp_path_factory):
    """The two models in their hub layouts: a Mask2Former folder (80 COCO classes) and a CLIP folder holding the
    model and its tokenizer (as openai/clip-vit-large-patch14 does). The class head is biased towards "dog", so
    every query is a confident dog and the rules have something to judge."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    root = tmp_path_factory.mktemp("geneval")
    torch.manual_seed(0)
    swin = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, image_size=64,
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=swin, num_labels=80, hidden_dim=32, mask_feature_size=32,
                            feature_size=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                            dim_feedforward=64, num_queries=10, encoder_feedforward_dim=64, common_stride=4)
    det = Mask2FormerForUniversalSegmentation(cfg).eval()
    with torch.no_grad():
        det.class_predictor.bias[DOG] += 12
    det.save_pretrained(root / "detector")
    tiny_clip(seed=4, max_len=77).save_pretrained(root / "clip")
    tiny_tokenizer(77).save_pretrained(root / "clip")
    return dict(detector=str(root / "detector"), clip=str(root / "clip"), detector_size=64)


@pytest.fixture(scope="module")
def scorer(geneval_dirs):
    return geneval.Scorer(geneval.Options(**geneval_dirs), device=DEVICE)


def test_geneval_detections_match_hand_postprocessing(scorer):
    images = rand_images(2, 48, 48, seed=5)
    dets = scorer.detect(images, min_score=0.3)
    # by hand: 48 -> 64 px, ImageNet normalisation, Mask2Former; per query: class softmax without "no object",
    # mask logits -> 64 px -> 48 px, mask > 0, score = p(class) x mean sigmoid inside, box = the mask's extent
    x = F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)
    with torch.no_grad():
        out = scorer.detector(pixel_values=x.to(scorer.device))
    cls_logits, mask_logits = out.class_queries_logits.cpu(), out.masks_queries_logits.cpu()
    for b in range(2):
        expected = []
        for q in range(10):
            p = cls_logits[b, q].softmax(-1)[:-1]
            logit = F.interpolate(mask_logits[b, q][None, None], size=(64, 64), mode="bilinear")
            logit = F.interpolate(logit, size=(48, 48), mode="bilinear")[0, 0]
            mask = logit > 0
            if p.argmax() != DOG or not mask.any():
                continue
            ys, xs = mask.nonzero(as_tuple=True)
            box = (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)
            expected.append((box, float(p[DOG] * logit.sigmoid()[mask].mean())))
        got = sorted((tuple(int(v) for v in d.box), d.score) for d in dets[b].get("dog", []))
        expected = sorted(expected)
        assert [g[0] for g in got] == [e[0] for e in expected] and len(got) > 0
        assert [g[1] for g in got] == pytest.approx([e[1] for e in expected], abs=1e-4)
        assert set(dets[b]) == {"dog"}  # every other class is far below 0.3


def test_geneval_colours_are_clip_zero_shot_on_masked_crops(scorer, geneval_dirs):
    from transformers import AutoTokenizer, CLIPModel

    image = rand_images(1, 48, 48, seed=6)[0]
    mask = torch.zeros(48, 48, dtype=torch.bool)
    mask[10:30, 5:45] = True
    d = geneval.Detection(box=(5, 10, 45, 30), score=0.9, mask=mask)
    got = scorer.colours(image, [d, geneval.Detection(box=(0, 0, 48, 48), score=0.9)], "dog")
    # by hand: per colour, the mean of the three templates' normalised text embeddings; each object masked onto
    # "#999" grey and cropped to its box (no mask: the plain crop); CLIP's argmax
    model, tok = CLIPModel.from_pretrained(geneval_dirs["clip"]), AutoTokenizer.from_pretrained(geneval_dirs["clip"])
    with torch.no_grad():
        texts = [t.format(color=c, cls="dog") for c in geneval.COLORS for t in geneval.COLOR_TEMPLATES]
        emb = model.get_text_features(**tok(texts, padding=True, return_tensors="pt")).pooler_output
        classifier = F.normalize(F.normalize(emb, dim=-1).view(10, 3, -1).mean(1), dim=-1)
        expected = []
        for crop in (torch.where(mask, image, 0x99 / 255)[:, 10:30, 5:45], image):
            px = clip.clip_preprocess(crop[None], 32, 32)
            feat = F.normalize(model.get_image_features(pixel_values=px).pooler_output, dim=-1)
            expected.append(geneval.COLORS[int((feat @ classifier.T).argmax())])
    assert got == expected


def test_geneval_rewards_end_to_end(geneval_dirs, scorer):
    opts = {"geneval_partial": geneval_dirs, "geneval_overall": geneval_dirs}
    model = RewardModel("geneval_partial,geneval_overall", DEVICE, **opts)
    shared = [k for k in geneval._SCORERS if k[1].detector == geneval_dirs["detector"]]
    assert len(shared) == 1  # geneval_partial and geneval_overall share one loaded Scorer
    images = rand_images(4, 48, 48, seed=7)
    meta = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
            {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
            {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a red dog"},
            None]
    with pytest.warns(UserWarning, match="without GenEval metadata"):
        out = model(images, [m["prompt"] if m else "a dog" for m in meta], meta)
    strict, score = out.components["geneval_overall"], out.components["geneval_partial"]
    assert strict[0] == 1 and strict[1] == 0 and score[1] == 0
    # the dog detections of image 0 are the real thing, so the verdict must equal the rules on them
    objects = geneval.select_objects(scorer.detect(images[:1], 0.3)[0], "single_object")
    assert score[0] == pytest.approx(geneval.evaluate(objects, meta[0]).score)
    colour_ok = scorer.colours(images[2], geneval.select_objects(scorer.detect(images[2:3], 0.3)[0], "colors")["dog"][
        :1], "dog") == ["red"]
    assert strict[2] == float(colour_ok)
    assert out.valid.tolist() == [True, True, True, False] and math.isnan(score[3])
    assert model.group_keys(meta) == {"geneval_partial": ["single_object", "single_object", "colors", None],
                                      "geneval_overall": ["single_object", "single_object", "colors", None]}


def test_geneval_flow_grpo_scores_what_the_server_sees(geneval_dirs, scorer):
    """The server's rule on the server's input: JPEG (PIL, quality 75) for everything, red/blue swapped for the
    detector only (mmdet reads the RGB array as BGR), colours on the JPEG image as it is."""
    model = RewardModel("geneval_flow_grpo", DEVICE, geneval_flow_grpo=geneval_dirs)
    images = F.interpolate(rand_images(3, 12, 12, seed=8), size=48, mode="bilinear")
    images[:, 0] *= 0.3  # red differs from blue, so the swap changes the detector's input
    meta = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
            {"tag": "counting", "include": [{"class": "dog", "count": 2}], "prompt": "two dogs",
             "exclude": [{"class": "dog", "count": 3}]},
            {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a red dog"}]
    got = model(images, [m["prompt"] for m in meta], meta).components["geneval_flow_grpo"]
    jpeg = geneval.jpeg_roundtrip(images, 75)
    for i, m in enumerate(meta):
        objects = geneval.select_objects(scorer.detect(jpeg[i:i + 1].flip(1), 0.3)[0], m["tag"])
        want = geneval.evaluate_flow_grpo(objects, m, lambda d, c, i=i: scorer.colours(jpeg[i], d, c)).score
        assert got[i] == pytest.approx(want)
    plain = RewardModel("geneval_flow_grpo", DEVICE, geneval_flow_grpo={**geneval_dirs, "jpeg_quality": 0,
                                                                         "swap_red_blue": False})
    objects = geneval.select_objects(scorer.detect(images[:1], 0.3)[0], "single_object")
    assert plain(images[:1], ["a dog"], meta[:1]).total[0] == pytest.approx(
        geneval.evaluate_flow_grpo(objects, meta[0]).score)


# -- missing weights ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, options, hint", [
    ("pickscore", {"model": "flow-cps-tests/no-such-model"}, "hf download yuvalkirstain/PickScore_v1"),
    ("pickscore", {"model": "/no/such/PickScore_v1"}, "no such directory"),
    ("hpsv2", {"model": "/no/such/HPS_v2.1_compressed.pt"}, "hf download xswu/HPSv2 HPS_v2.1_compressed.pt"),
    ("geneval_overall", {"detector": "/no/such/mask2former"}, "facebook/mask2former-swin-small-coco-instance"),
])
def test_missing_weights_fail_at_start_up_with_instructions(name, options, hint):
    with pytest.raises(FileNotFoundError) as err:
        RewardModel(name, "cpu", **{name: options})
    msg = str(err.value)
    assert hint in msg and "--reward_options" in msg and f'"{name}": {{"' in msg
    assert next(iter(options.values())) in msg  # the path or hub id that was tried


def test_a_missing_local_reward_path_never_goes_to_the_hub(tmp_path, monkeypatch):
    """`data/PickScore_v1` with a data/ folder here is a local path, as --model decides (hub.hub_id): it fails naming
    the path, without a Hub lookup (which went offline-error or, online, downloaded whatever that repo holds); a
    run stops with the message, not a traceback after the model loaded."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError, match=r"'data/PickScore_v1' \(FileNotFoundError: no such directory"):
        RewardModel("pickscore", "cpu", pickscore={"model": "data/PickScore_v1"})
    with pytest.raises(SystemExit, match=r"^reward error: pickscore: cannot load the PickScore_v1 model from "
                                         r"'data/PickScore_v1'"):
        train.main(["--iterations", "1", "--report_to", "none", "--reward", "pickscore", "--reward_options",
                    '{"pickscore": {"model": "data/PickScore_v1"}}', "--output_dir", str(tmp_path / "run")])


def test_pickscore_rejects_unknown_scale(pickscore_dirs):
    with pytest.raises(ValueError, match="flow_grpo"):
        REGISTRY["pickscore"](**pickscore_dirs, scale="normalised")


# -- built-in rewards --------------------------------------------------------------------------------------------
def test_digit_judge_on_clean_test_digits():
    images, labels = digits.load("test")
    fn = REGISTRY["digit_judge"]()
    right = fn(images, [f"a handwritten digit {int(d)}" for d in labels])
    wrong = fn(images, [f"a handwritten digit {(int(d) + 1) % 10}" for d in labels])
    assert right.mean() >= 0.9 and wrong.mean() < 0.1
    acc = REGISTRY["digit_judge_accuracy"]()(images, [f"the number {digits.WORDS[int(d)]}" for d in labels])
    assert acc.mean() >= 0.9


def test_clean_background_ranks_clean_above_noisy():
    images, _ = digits.load("test")
    noisy = (images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    fn = REGISTRY["clean_background"]()
    clean_r, noisy_r = fn(images, []), fn(noisy, [])
    assert clean_r.mean() > noisy_r.mean() + 0.05 and (clean_r > noisy_r).float().mean() > 0.9
