"""Rewards: every reward is `fn(images, prompts, metadata=None) -> Tensor[B]`, images float (B, C, H, W) in [0, 1].

A reward returns NaN for a sample it cannot score (a prompt without the text it needs, no GenEval metadata), never a
made-up 0. It is made by a factory registered under its name (`REGISTRY`); the factory's keyword arguments are its
options (train.py's `--reward_options '{"pickscore": {"model": "/local/dir"}}'`, checked at start-up by
flow_cps/scoring.py, which also combines rewards into a run's reward: weighted sums, invalid samples, loud failures).
Model weights are loaded when the factory runs (start-up), never mid-training: a missing model fails at once with the
hub id or path tried and how to provide it. A reward may carry `fn.group_key = callable(metadata) -> str | None`: its
logged mean is then the mean over groups of the group means; for the GenEval rewards (key: the tag) that is the
benchmark's overall score (`geneval.summarize`), not a mean over images.

The paper's rewards (weights from the Hugging Face hub, or local copies; see each factory):
  pickscore             PickScore_v1: logit_scale x cos(image, text), ~21-24 raw (or /26, Flow-GRPO's scale)
  hpsv2                 HPSv2.1: cos(image, text) of an OpenCLIP ViT-H-14, ~0.30; loaded into transformers' CLIP
  geneval_partial       GenEval partial credit, this project's rule (see geneval.py)
  geneval_overall       GenEval's benchmark rule, 1 or 0 per image (its mean over tags: GenEval's overall score)
  geneval_flow_grpo     Flow-GRPO's reward-server partial credit, its quirks and JPEG compression included
  ocr                   1 - normalised edit distance of the prompt's quoted text (RapidOCR; models ship in the wheel)
Built-in, offline rewards (no download):
  digit_judge           probability that the image shows the prompt's digit (the OCR/GenEval analogue), in [0, 1]
  digit_judge_accuracy  1 if the judge's top class is the prompt's digit, else 0
  digit_svm_accuracy    the same with an independent classifier (another architecture, disjoint data): evaluation
  scene_reward          shapes task: GenEval's partial credit on a learned per-pixel detector that sees every pixel
  scene_judge           shapes task: 1 if an exact analytic detector finds exactly the prompt's scene, else 0
  scene_credit          shapes task: the same detections' partial credit (GenEval's graded form): evaluation
  clean_background      1 - 4 x background brightness: the residual-noise detector (the paper's point)
  smoothness            1 - total variation; a weaker noise detector
  jpeg_compressibility  -kB of the JPEG-encoded image (DDPO); smaller files = less high-frequency noise

Score image files with `python rewards.py ocr sign.png --prompt 'A sign that says "OPEN LATE"'`.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from flow_cps import clip, digits, geneval, scenes, shapes

RewardFn = Callable[..., Tensor]
REGISTRY: dict[str, Callable[..., RewardFn]] = {}  # name -> factory(device, **options) -> reward fn


def register(name: str):
    def deco(factory):
        REGISTRY[name] = factory
        return factory
    return deco


def check_images(images: Tensor) -> None:
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"rewards take float images (B, C, H, W) in [0, 1]; got {tuple(images.shape)} "
                         f"{images.dtype}")


# -- PickScore (Kirstain et al. 2023, Pick-a-Pic; the paper's FLUX.1 task) -------------------------------------
PICKSCORE_HUB_ID = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PICKSCORE_SCALES = {"raw": 1.0, "flow_grpo": 1 / 26}


@register("pickscore")
def pickscore(device="cpu", model: str = PICKSCORE_HUB_ID, processor: str = PICKSCORE_PROCESSOR_ID,
              scale: str = "raw", dtype="float32", batch_size: int = 32) -> RewardFn:
    """PickScore = logit_scale.exp() x cos(image embedding, text embedding) of the PickScore_v1 CLIP-H model.

    scale="raw": the paper's tables, ~21-24 (FLUX.1-dev 22.06 -> Flow-GRPO 23.90 -> Flow-CPS 24.25; FLUX.1-schnell
    21.86 -> 23.39 -> 23.78). scale="flow_grpo": divided by 26 (~0.85), the scale Flow-GRPO trains on. Training does
    not care which: the advantages are standardised by the batch std (only its + 1e-4 sees the scale) and beta weighs
    the KL against those standardised advantages, so the scale changes the logged numbers alone (docs/SCALE.md).
    Preprocessing is CLIPProcessor's (shorter side 224 bicubic, centre crop, CLIP mean/std; its settings read from
    `processor`) done on tensors, batched on `device`, after rounding to 8 bits as Flow-GRPO's uint8 -> PIL route
    does. Text: at most 77 tokens, `processor`'s tokenizer. dtype: Flow-GRPO scores in fp32; its cost in each dtype:
    docs/NOTES.md, "Measurements".
    """
    from transformers import AutoTokenizer, CLIPModel

    if scale not in PICKSCORE_SCALES:
        raise ValueError(f"pickscore scale {scale!r}: choose one of {sorted(PICKSCORE_SCALES)}")
    dtype, factor = clip.as_dtype(dtype), PICKSCORE_SCALES[scale]
    net = clip.load_pretrained(CLIPModel, model, "pickscore", "model", PICKSCORE_HUB_ID, "the PickScore_v1 model")
    net = net.to(device, dtype).eval().requires_grad_(False)
    ip = clip.load_processor_settings(processor, "pickscore", "processor", PICKSCORE_PROCESSOR_ID)
    tok = clip.load_pretrained(AutoTokenizer, processor, "pickscore", "processor", PICKSCORE_PROCESSOR_ID,
                               "the CLIP ViT-H-14 tokenizer")

    def fn(images: Tensor, prompts: list[str], metadata=None) -> Tensor:
        check_images(images)
        cos = clip.cosine(net, tok, images, prompts, lambda x: clip.clip_preprocess(x, **ip), device, dtype, batch_size)
        return net.logit_scale.detach().float().exp().cpu() * cos * factor
    fn.normaliser = Normaliser(22.0 * factor, 1.0 * factor)
    return fn


# -- HPSv2.1 (Wu et al. 2023, Human Preference Score v2; the paper's Dance-GRPO task) ---------------------------
HPS_REPO, HPS_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"
HPS_TOKENIZER_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # OpenCLIP ViT-H-14 uses OpenAI CLIP's BPE, as this does


@register("hpsv2")
def hpsv2(device="cpu", model: str | None = None, tokenizer: str = HPS_TOKENIZER_ID, vision_heads: int | None = None,
          text_heads: int | None = None, dtype="float32", batch_size: int = 32) -> RewardFn:
    """HPSv2.1 = cos(normalised image features, normalised text features) of an OpenCLIP ViT-H-14 fine-tuned on
    human preferences. Scale ~0.2-0.4: the paper's FLUX numbers are 0.304 (base) -> 0.364 (Dance-GRPO) -> 0.377
    (Flow-CPS); DanceGRPO's README shows Qwen-Image 0.25 -> 0.33.

    model: path to `HPS_v2.1_compressed.pt` (the public release, an OpenCLIP state dict); by default it is taken
    from the hub repo xswu/HPSv2 (the Hugging Face cache, offline included). The checkpoint is loaded WITHOUT
    open_clip or torchvision: `clip.openclip_to_transformers` maps its keys onto transformers' CLIPModel (OpenCLIP's
    ViT-H-14 and transformers' CLIP are the same architecture). Preprocessing is HPSv2's (resize the longer side to
    224 bicubic, pad to square, CLIP mean/std) done on tensors; text through OpenAI CLIP's BPE, 77 tokens.
    Same network as PickScore, so the same cost per image.
    """
    from transformers import AutoTokenizer

    sd = clip.load_openclip_checkpoint(model, HPS_REPO, HPS_FILE, "hpsv2")
    tok = clip.load_pretrained(AutoTokenizer, tokenizer, "hpsv2", "tokenizer", HPS_TOKENIZER_ID, "the CLIP tokenizer")
    dtype = clip.as_dtype(dtype)
    net = clip.openclip_to_transformers(sd, vision_heads, text_heads, tok.bos_token_id, tok.eos_token_id,
                                        tok.pad_token_id).to(device, dtype).requires_grad_(False)
    size = net.config.vision_config.image_size

    def fn(images: Tensor, prompts: list[str], metadata=None) -> Tensor:
        check_images(images)
        return clip.cosine(net, tok, images, prompts, lambda x: clip.normalise(clip.resize_max_and_pad(x, size)),
                           device, dtype, batch_size)
    return fn


# -- GenEval (Ghosh et al. 2023; the paper's SD3.5-M task); rules and models live in geneval.py -----------------
# Options (all three): geneval.Options' fields: detector (default facebook/mask2former-swin-small-coco-instance),
# clip (openai/clip-vit-large-patch14), detector_size (800), threshold (0.3), counting_threshold (0.9), max_objects
# (16), max_overlap (1.0), position_margin (0.1), max_per_image (100), dtype. Rewards built with the same options
# share the loaded models. They need per-prompt metadata (prompts.load("geneval") or a GenEval-format .jsonl) and
# carry `group_key` = the tag (log `geneval_overall` as the mean over tags: the benchmark's overall score). Their
# names and Flow-GRPO's logged keys, side by side: docs/REWARDS.md.
@register("geneval_partial")
def geneval_partial(device="cpu", **options) -> RewardFn:
    """GenEval partial credit in [0, 1], this project's rule (`geneval.evaluate`, rules in geneval.py's docstring):
    Flow-GRPO's idea with its quirks removed (count credit floored at 0, colour/position credit without the exact
    count, excludes priced, no JPEG). Not Flow-GRPO's `geneval` score, which is `geneval_flow_grpo`."""
    return geneval.reward_fn(geneval.shared_scorer("geneval_partial", device, **options), lambda v: v.score)


@register("geneval_overall")
def geneval_overall(device="cpu", **options) -> RewardFn:
    """1 if the image passes the GenEval benchmark's rule for its prompt, else 0: Flow-GRPO's `accuracy` (not its
    `strict_accuracy`, which asks for exact counts). Aggregated by tag (group_key) as `geneval.summarize(tags,
    scores)` does, it is GenEval's overall score (SD3.5-M 0.63; Flow-GRPO and Flow-CPS with KL 0.97: the paper's
    table as a secondary source gives it, docs/NOTES.md "Sources")."""
    return geneval.reward_fn(geneval.shared_scorer("geneval_overall", device, **options), lambda v: float(v.correct))


@register("geneval_flow_grpo")
def geneval_flow_grpo(device="cpu", jpeg_quality: int = 75, swap_red_blue: bool = True, **options) -> RewardFn:
    """Flow-GRPO's GenEval training reward as its reward server computes it (`geneval.evaluate_flow_grpo`: exact
    counts for colour/position credit, excludes ignored, unfloored count credit, a failed relation credited 0 and 1),
    on what the server sees: the images JPEG-compressed by PIL at quality 75 (its client's `save(format="JPEG")`,
    PIL's default) and, with swap_red_blue, red and blue swapped for the detector only (the server hands mmdet 2's
    `inference_detector` RGB arrays, which mmdet takes for BGR and converts; CLIP colours see the true colours).
    jpeg_quality 0 skips the JPEG. Scale: the mean of credits, <= 1, below 0 only for heavy over-counting."""
    return geneval.reward_fn(geneval.shared_scorer("geneval_flow_grpo", device, **options), lambda v: v.score,
                             geneval.evaluate_flow_grpo, jpeg_quality or None, swap_red_blue)


for _factory in (geneval_partial, geneval_overall, geneval_flow_grpo):
    _factory.forwards_to = geneval.Options  # its fields are the factory's other options (scoring.parse_options)


# -- OCR (visual text rendering; Flow-GRPO's SD3.5-M task) ------------------------------------------------------
def ocr_target(prompt: str, metadata: dict | None = None) -> str | None:
    """The text the image must show: metadata["text"] if given, else the text between the prompt's first pair of
    double quotes ('A sign that says "OPEN LATE"' -> 'OPEN LATE'; Flow-GRPO's `prompt.split('"')[1]`, curly quotes
    also accepted). None if there is no such pair or the first pair holds only spaces ('say "" on a "sign"': the
    target is empty, not the text between the pairs); Flow-GRPO's scorer divides by zero there."""
    if metadata and metadata.get("text"):
        return str(metadata["text"])
    m = re.search(r'["\u201c]([^"\u201d]*)["\u201d]', prompt)
    return m.group(1) if m and m.group(1).replace(" ", "") else None


def _ocr_normalise(text: str) -> str:
    return text.replace(" ", "").lower()  # Flow-GRPO's ocr.py: spaces (only) removed, lower-cased


def ocr_score(recognised: str, target: str) -> float:
    """Flow-GRPO's OCR reward: after lower-casing and removing spaces (U+0020 only, as Flow-GRPO), 1 if the target
    occurs in the recognised text, else max(0, 1 - Levenshtein(recognised, target) / len(target))."""
    from rapidfuzz.distance import Levenshtein

    rec, tgt = _ocr_normalise(recognised), _ocr_normalise(target)
    if not tgt:
        return float("nan")
    if tgt in rec:
        return 1.0
    return max(0.0, 1 - Levenshtein.distance(rec, tgt) / len(tgt))


@register("ocr")
def ocr(device="cpu", det_limit_side_len: int = 960) -> RewardFn:
    """Text-rendering accuracy: `ocr_score` of what RapidOCR reads in the image vs the prompt's quoted text.

    Scale [0, 1]. Its test-set mean is the paper's "OCR accuracy": SD3.5-M 0.579, Flow-GRPO 0.966, Flow-CPS 0.975
    (unverified, docs/NOTES.md "Sources"). Flow-GRPO reads with PaddleOCR 2.9 (English, CPU, angle classifier off);
    RapidOCR 3.10 runs the PP-OCR det/rec models through onnxruntime with the model files inside the wheel, so this
    works offline. Where Flow-GRPO scores an OCR exception as 0, here it is a failure (NaN, reported by RewardModel).
    Detection size: PaddleOCR's default, det_limit_side_len 960 with limit_type "max" (only images whose longer side
    exceeds 960 px are shrunk, so a 512-px image is read at full size); what a smaller one costs in accuracy and saves
    in time: docs/NOTES.md, "Measurements". Images are read one at a time, on the CPU, whatever `device` is (as
    Flow-GRPO's PaddleOCR). A prompt without quoted text scores NaN (invalid), not 0: there is nothing to read, and a
    0 would push the policy away from an image that did nothing wrong.
    """
    from rapidocr import RapidOCR

    engine = RapidOCR(params={"Global.log_level": "error", "Det.limit_type": "max",
                              "Det.limit_side_len": det_limit_side_len})

    def fn(images: Tensor, prompts: list[str], metadata=None) -> Tensor:
        check_images(images)
        arr = clip.to_uint8(clip.rgb(images))
        scores = []
        for i, prompt in enumerate(prompts):
            target = ocr_target(prompt, metadata[i] if metadata else None)
            if target is None:
                scores.append(float("nan"))
                continue
            # RapidOCR reads ndarrays as BGR (OpenCV's order); the detection options are passed on every call because
            # rapidocr 3.10 keeps a call's use_det/use_cls/use_rec for later calls that omit them
            out = engine(arr[i][..., ::-1].copy(), use_det=True, use_cls=False, use_rec=True)
            text = "".join(t for t, s in zip(out.txts or (), out.scores or ()) if s > 0)
            scores.append(ocr_score(text, target))
        return torch.tensor(scores, dtype=torch.float32)
    return fn


# -- the offline rewards of the built-in tasks (no download) -----------------------------------------------------
def _judge_reward(device, judge, score: Callable[[Tensor, Tensor], Tensor]) -> RewardFn:
    judge = (judge or digits.load_judge()).to(device)

    @torch.no_grad()
    def fn(images: Tensor, prompts: list[str], metadata=None) -> Tensor:
        check_images(images)
        target = torch.tensor([digits.parse_digit(p) for p in prompts], device=device)
        return score(judge(images.to(device)), target).float()
    return fn


@register("digit_judge")
def digit_judge(device="cpu", judge=None) -> RewardFn:
    """p_judge(prompt's digit | image): "is the requested content rendered?". Scale [0, 1]; the clean test images
    score 0.96 on average, the pre-trained base model about 0.8 (printed on first use)."""
    return _judge_reward(device, judge, lambda logits, t: logits.softmax(-1).gather(1, t[:, None])[:, 0])


@register("digit_judge_accuracy")
def digit_judge_accuracy(device="cpu", judge=None) -> RewardFn:
    """1 if the judge's most likely digit is the prompt's, else 0. Its batch mean is the held-out accuracy."""
    return _judge_reward(device, judge, lambda logits, t: logits.argmax(-1) == t)


@register("digit_svm_accuracy")
def digit_svm_accuracy(device="cpu") -> RewardFn:
    """The digits task's independent judge: 1 if an RBF support-vector classifier (scikit-learn, `digits.train_svm`)
    reads the prompt's digit, else 0. It is trained on the quarter of the data digit_judge never saw, with another
    architecture, so a model that learns to please digit_judge's MLP is not automatically right by it."""
    svm = digits.train_svm()

    def fn(images: Tensor, prompts: list[str], metadata=None) -> Tensor:
        check_images(images)
        pred = svm.predict(digits.svm_features(images))
        return torch.tensor(pred == np.array([digits.parse_digit(p) for p in prompts]), dtype=torch.float32)
    return fn


@register("scene_judge")
def scene_judge(device="cpu") -> RewardFn:
    """The shapes task's evaluation judge: 1 if the exact analytic detector (`scenes.judge`) finds exactly the
    prompt's objects (colour, shape, count), nothing else, and their relation, else 0. Stricter than GenEval's rule,
    which asks for at least `count` of each object and caps counts only for the counting tag (as Flow-GRPO's
    strict_accuracy, it demands exact counts). Exact on every rendered scene; no learned weights, so it shares no model
    with the scene_reward reward. Its logged value is the mean over the tags of the tag means, as GenEval's overall
    score (the held-out prompts have three tags: counting, two_object, position; a lone object cannot hold an unseen
    composition)."""
    def fn(images: Tensor, prompts: list[str], metadata=None) -> Tensor:
        check_images(images)
        arr = images.detach().float().cpu().numpy()
        return torch.tensor([float(scenes.judge(a, scenes.parse(p))) for a, p in zip(arr, prompts)])
    fn.group_key = geneval.tag_of  # the prompt's tag (prompts.load('shapes') metadata)
    return fn


@register("scene_credit")
def scene_credit(device="cpu") -> RewardFn:
    """The shapes task's graded judge, GenEval's partial credit for its scenes (`scenes.credit`): the mean of the
    prompt's checks (each object kind's count, nothing extra, the relation) on the same exact detections as
    scene_judge. Grouped by tag like it."""
    def fn(images: Tensor, prompts: list[str], metadata=None) -> Tensor:
        check_images(images)
        arr = images.detach().float().cpu().numpy()
        return torch.tensor([scenes.credit(scenes.detect(a), scenes.parse(p)) for a, p in zip(arr, prompts)])
    fn.group_key = geneval.tag_of
    return fn


@register("scene_reward")
def scene_reward(device="cpu") -> RewardFn:
    """The shapes task's training reward, GenEval's partial credit on a learned detector (as Flow-GRPO's GenEval
    reward scores a learned detector's detections): `shapes.Detector`, a convolutional per-pixel classifier at the
    native resolution, finds the objects, and `scenes.credit` scores them against the prompt. Scale [0, 1]; the
    detector of the images' size, trained with the shapes model on first use. Residual noise lowers it (report
    section 5: `python -m tools.bench --only noise`)."""
    nets: dict[int, torch.nn.Module] = {}

    def fn(images: Tensor, prompts: list[str], metadata=None) -> Tensor:
        check_images(images)
        size = images.shape[-1]
        if size not in nets:
            nets[size] = shapes.load_detector(size).to(device)
        found = shapes.learned_detect(nets[size], images.to(device))
        return torch.tensor([scenes.credit(f, scenes.parse(p)) for f, p in zip(found, prompts)])
    return fn


def total_variation(images: Tensor) -> Tensor:
    """Mean absolute difference between horizontally and vertically adjacent pixels, per image."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).mean(1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(1)
    return (dx + dy) / 2


@register("smoothness")
def smoothness(device="cpu") -> RewardFn:
    """1 - mean |neighbour difference| (total variation), a residual-noise detector.

    Scale on the 8x8 digits (`python rewards.py --scales`): clean test images 0.761 (per-image std 0.03); plus
    Gaussian noise of std 0.05 / 0.1 / 0.2 (in [0, 1] units) 0.756 / 0.749 / 0.725; uniform noise 0.669. Digit strokes
    already have large neighbour differences at 8x8, so this is a weak detector; `clean_background` is the strong one.
    """
    def fn(images: Tensor, prompts: list[str], metadata=None) -> Tensor:
        check_images(images)
        return 1 - total_variation(images.float())
    return fn


def background_level(images: Tensor, threshold: float = 0.25) -> Tensor:
    """Mean brightness of the pixels darker than `threshold` (the background of a dark-ink-on-black digit)."""
    mask = (images < threshold).float()
    return (images * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1)


@register("clean_background")
def clean_background(device="cpu") -> RewardFn:
    """1 - 4 * mean(pixels below 0.25): 1 for a perfectly clean background, lower when residual noise speckles it.

    The noise-sensitive reward of the built-in task. Scale (`python rewards.py --scales`): clean test images 0.926
    (per-image std 0.03); plus Gaussian noise of std 0.025 / 0.05 / 0.1 in [0, 1] units: 0.875 / 0.843 / 0.786 (an
    effect of 1.7 / 2.8 / 4.7 per-image standard deviations, versus 0.1 / 0.2 / 0.4 for `smoothness`).
    """
    def fn(images: Tensor, prompts: list[str], metadata=None) -> Tensor:
        check_images(images)
        return 1 - 4 * background_level(images.float().mean(1, keepdim=True))
    return fn


@register("jpeg_compressibility")
def jpeg_compressibility(device="cpu", quality: int = 95) -> RewardFn:
    """-size in kB of the JPEG (quality 95) of each image, as DDPO's compressibility reward. Noise costs bytes.

    Meant for real images (DDPO: 512 px, ~-100 kB). At 8x8 the JPEG header dominates (-0.394 kB clean, -0.395 uniform
    noise), so it is blind on the built-in digits."""
    def fn(images: Tensor, prompts: list[str], metadata=None) -> Tensor:
        check_images(images)
        arr = clip.to_uint8(images)
        sizes = []
        for a in arr:
            buf = io.BytesIO()
            Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="JPEG", quality=quality)
            sizes.append(-buf.tell() / 1000)
        return torch.tensor(sizes, dtype=torch.float32)
    return fn


# -- normalisation of a weighted sum (scoring.RewardModel) ---------------------------------------------------------
@dataclass
class Normaliser:
    """Fixed affine normalisation (r - shift) / scale per component, so weights compare like with like.

    GRPO's advantages are invariant to one reward's scale, but a weighted *sum* is not: without this, a reward in kB
    would drown one in [0, 1]. Defaults are each reward's typical value and spread: on the built-in task for the
    offline rewards, on the paper's models for the others. A factory may attach its own as `fn.normaliser` (PickScore
    does, since its scale is an option)."""
    shift: float = 0.0
    scale: float = 1.0


NORMALISERS = {"digit_judge": Normaliser(0.0, 1.0), "digit_judge_accuracy": Normaliser(0.0, 1.0),
               "smoothness": Normaliser(0.75, 0.03),
               "clean_background": Normaliser(0.9, 0.05), "jpeg_compressibility": Normaliser(-0.6, 0.05),
               # [0, 1] rewards whose base-model means sit mid-range (OCR 0.58, GenEval 0.63 on SD3.5-M)
               "ocr": Normaliser(0.5, 0.3), "geneval_partial": Normaliser(0.5, 0.3),
               "geneval_overall": Normaliser(0.5, 0.5), "geneval_flow_grpo": Normaliser(0.5, 0.3),
               "pickscore": Normaliser(22.0, 1.0),  # raw scale; the flow_grpo scale brings its own
               "hpsv2": Normaliser(0.30, 0.02)}  # base FLUX 0.304, trained 0.36-0.38


def parse_spec(spec: str) -> dict[str, float]:
    """'digit_judge:1,smoothness:0.5' -> {'digit_judge': 1.0, 'smoothness': 0.5}; a bare name has weight 1."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, w = part.partition(":")
        if name not in REGISTRY:
            raise ValueError(f"unknown reward {name!r} in {spec!r}; available: {', '.join(sorted(REGISTRY))}")
        try:
            out[name] = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"reward weight {w!r} in {spec!r} is not a number; write e.g. 'digit_judge:0.7'") from None
        if not math.isfinite(out[name]):
            raise ValueError(f"reward weight for {name!r} must be finite, got {w!r}")
    if not out:
        raise ValueError("empty reward spec; give at least one reward name, e.g. --reward digit_judge")
    return out


def combine(weights: dict[str, float], components: dict[str, Tensor], normalisers: dict[str, Normaliser]) -> Tensor:
    """The reward a run trains on: a single reward on its own scale (as the paper's runs), a weighted sum of
    normalised components otherwise. NaN wherever a component is NaN."""
    if len(weights) == 1:
        (name, w), = weights.items()
        return w * components[name]
    return sum(w * (components[name] - normalisers[name].shift) / normalisers[name].scale
               for name, w in weights.items())


def normaliser(name: str, fn: RewardFn) -> Normaliser:
    return getattr(fn, "normaliser", None) or NORMALISERS.get(name, Normaliser())


# -- command line: score image files; the built-in rewards' scales -----------------------------------------------
def score_files(spec: str, paths: list, prompt: str, options: dict | None = None, metadata: dict | None = None,
                device="cpu") -> list[dict]:
    """Score image files against one prompt: [{"image": path, "total": ..., <reward>: ...}, ...]. A reward that
    fails raises (a run's reward, flow_cps.scoring.RewardModel, isolates and counts failures instead)."""
    weights, options = parse_spec(spec), options or {}
    fns = {name: REGISTRY[name](device=device, **options.get(name, {})) for name in weights}
    rows = []
    for path in paths:  # one at a time: files may differ in size
        with Image.open(path) as im:
            image = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
        comps = {name: fn(image, [prompt], None if metadata is None else [metadata]).float().cpu().reshape(1)
                 for name, fn in fns.items()}
        total = combine(weights, comps, {name: normaliser(name, fn) for name, fn in fns.items()})
        rows.append({"image": str(path), "total": float(total[0]), **{k: float(v[0]) for k, v in comps.items()}})
    return rows


def print_scales() -> None:
    """The noise-sensitive rewards on the clean digits and with added noise (the numbers in their docstrings)."""
    imgs, _ = digits.load("test")
    g = torch.Generator().manual_seed(0)
    for name in ("clean_background", "smoothness", "jpeg_compressibility"):
        fn = REGISTRY[name]()
        row = [f"clean {float(fn(imgs, []).mean()):.3f}"]
        for s in (0.025, 0.05, 0.1, 0.2):
            noisy = (imgs + s * torch.randn(imgs.shape, generator=g)).clamp(0, 1)
            row.append(f"+N(0,{s}) {float(fn(noisy, []).mean()):.3f}")
        row.append(f"uniform {float(fn(torch.rand(imgs.shape, generator=g), []).mean()):.3f}")
        print(f"{name:>22}: " + "  ".join(row))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Score image files with a reward or a weighted spec such as "
                                f"'ocr:1,pickscore:0.5' (rewards: {', '.join(sorted(REGISTRY))}), or print the noise "
                                "rewards' scales (--scales).")
    p.add_argument("reward", nargs="?")
    p.add_argument("images", nargs="*", help="image files (PNG, JPEG, ...)")
    p.add_argument("--prompt", default="", help="the prompt every image is scored against")
    p.add_argument("--options", type=json.loads, default={}, help="per-reward options as JSON, e.g. "
                   '\'{"pickscore": {"model": "/local/PickScore_v1"}}\' (the factories\' keyword arguments)')
    p.add_argument("--metadata", type=json.loads, default=None, help="the prompt's metadata as JSON (GenEval's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--scales", action="store_true", help="print the noise rewards' scales on the digits")
    args = p.parse_args(argv)
    if args.scales or not (args.reward and args.images):
        return print_scales() if args.scales else p.error("give a reward and image files (or --scales)")
    for row in score_files(args.reward, args.images, args.prompt, args.options, args.metadata, args.device):
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else str(v) for k, v in row.items()))


if __name__ == "__main__":
    main()
