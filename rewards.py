"""Rewards: every reward is `fn(images, prompts, metadata=None) -> Tensor[B]`, images float (B, C, H, W) in [0, 1].

A reward returns NaN for a sample it cannot score (exception, unreadable input, a prompt without the text it
needs); `RewardModel` turns that into a `valid` mask so GRPO excludes the sample from its advantages instead of
training on a silent 0. Several rewards combine as a weighted sum ("ocr:1,pickscore:0.5"), each component
normalised first (see `Normaliser`) and logged separately.

Built-in, offline rewards (no download):
  digit_judge           probability that the image shows the prompt's digit (the OCR/GenEval analogue), in [0, 1]
  digit_judge_accuracy  1 if the judge's top class is the prompt's digit, else 0 (evaluation metric)
  clean_background      1 - 4 x background brightness: the residual-noise detector (the paper's point)
  smoothness            1 - total variation; a weaker noise detector
  jpeg_compressibility  -kB of the JPEG-encoded image (DDPO); smaller files = less high-frequency noise
  ocr                   1 - normalised edit distance of the prompt's quoted text (RapidOCR; models ship in the wheel)
The paper's model-based rewards (weights from the Hugging Face hub, or local copies; see each factory):
  pickscore             PickScore_v1: logit_scale x cos(image, text), ~21-24 raw (or /26, Flow-GRPO's scale)
  hpsv2                 HPSv2.1: cos(image, text) of an OpenCLIP ViT-H-14, ~0.30; loaded into transformers' CLIP
  geneval / _strict     GenEval partial credit / the benchmark's binary rule (see geneval.py)

Model weights are loaded when the factory runs (start-up), never mid-training: a missing model fails at once with
the hub id or path tried and how to provide it. Options per reward come from `RewardModel(spec, device,
**{name: {option: value}})` (train.py's `--reward_options '{"pickscore": {"model": "/local/dir"}}'`).

    python rewards.py ocr sign.png --prompt 'A sign that says "OPEN LATE"'       # score image files
    python rewards.py --scales                                                  # the built-in rewards' scales
"""
from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

RewardFn = Callable[..., Tensor]
REGISTRY: dict[str, Callable[..., RewardFn]] = {}  # name -> factory(device, **options) -> reward fn


def register(name: str):
    def deco(factory):
        REGISTRY[name] = factory
        return factory
    return deco


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"rewards take float images (B, C, H, W) in [0, 1]; got {tuple(images.shape)} "
                         f"{images.dtype}")


# -- built-in rewards --------------------------------------------------------------------------------------------
@register("digit_judge")
def digit_judge(device="cpu", judge=None, **_) -> RewardFn:
    """p_judge(prompt's digit | image): "is the requested content rendered?". Scale [0, 1]; the clean test images
    score 0.96 on average, the pre-trained base model about 0.8 (printed on first use)."""
    import digits

    judge = (judge or digits.load_judge()).to(device)

    @torch.no_grad()
    def fn(images: Tensor, prompts: list[str], metadata=None) -> Tensor:
        _check_images(images)
        target = torch.tensor([digits.parse_digit(p) for p in prompts], device=images.device)
        probs = judge(images.to(device)).softmax(-1)
        return probs.gather(1, target.to(device)[:, None])[:, 0].float()
    return fn


@register("digit_judge_accuracy")
def digit_judge_accuracy(device="cpu", judge=None, **_) -> RewardFn:
    """1 if the judge's most likely digit is the prompt's, else 0. Its batch mean is the held-out accuracy."""
    import digits

    judge = (judge or digits.load_judge()).to(device)

    @torch.no_grad()
    def fn(images: Tensor, prompts: list[str], metadata=None) -> Tensor:
        _check_images(images)
        target = torch.tensor([digits.parse_digit(p) for p in prompts], device=device)
        return (judge(images.to(device)).argmax(-1) == target).float()
    return fn


def total_variation(images: Tensor) -> Tensor:
    """Mean absolute difference between horizontally and vertically adjacent pixels, per image."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).mean(1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(1)
    return (dx + dy) / 2


@register("smoothness")
def smoothness(device="cpu", **_) -> RewardFn:
    """1 - mean |neighbour difference| (total variation), a residual-noise detector.

    Scale on the 8x8 digits (`python rewards.py --scales`): clean test images 0.761 (per-image std 0.03); plus
    Gaussian noise of std 0.05 / 0.1 / 0.2 (in [0, 1] units) 0.756 / 0.749 / 0.725; uniform noise 0.669. Digit strokes
    already have large neighbour differences at 8x8, so this is a weak detector; `clean_background` is the strong one.
    """
    def fn(images: Tensor, prompts: list[str], metadata=None) -> Tensor:
        _check_images(images)
        return 1 - total_variation(images.float())
    return fn


def background_level(images: Tensor, threshold: float = 0.25) -> Tensor:
    """Mean brightness of the pixels darker than `threshold` (the background of a dark-ink-on-black digit)."""
    mask = (images < threshold).float()
    return (images * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1)


@register("clean_background")
def clean_background(device="cpu", **_) -> RewardFn:
    """1 - 4 * mean(pixels below 0.25): 1 for a perfectly clean background, lower when residual noise speckles it.

    The noise-sensitive reward of the built-in task. Scale (`python rewards.py --scales`): clean test images 0.926
    (per-image std 0.03); plus Gaussian noise of std 0.025 / 0.05 / 0.1 in [0, 1] units: 0.875 / 0.843 / 0.786 (an
    effect of 1.7 / 2.8 / 4.7 per-image standard deviations, versus 0.1 / 0.2 / 0.4 for `smoothness`).
    """
    def fn(images: Tensor, prompts: list[str], metadata=None) -> Tensor:
        _check_images(images)
        return 1 - 4 * background_level(images.float().mean(1, keepdim=True))
    return fn


@register("jpeg_compressibility")
def jpeg_compressibility(device="cpu", quality: int = 95, **_) -> RewardFn:
    """-size in kB of the JPEG (quality 95) of each image, as DDPO's compressibility reward. Noise costs bytes.

    Meant for real images (DDPO: 512 px, ~-100 kB). At 8x8 the JPEG header dominates (-0.394 kB clean, -0.395 uniform
    noise), so it is blind on the built-in digits."""
    from PIL import Image

    def fn(images: Tensor, prompts: list[str], metadata=None) -> Tensor:
        _check_images(images)
        arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for a in arr:
            buf = io.BytesIO()
            Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="JPEG", quality=quality)
            sizes.append(-buf.tell() / 1000)
        return torch.tensor(sizes, dtype=torch.float32)
    return fn


# -- plumbing shared by the model-based rewards ------------------------------------------------------------------
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation, used by all CLIPs here
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def missing_weights_message(reward: str, what: str, tried: str, option: str, hub_id: str, cause: BaseException,
                            filename: str | None = None) -> str:
    """What went wrong and the two ways to fix it (download into the cache, or point at a local copy)."""
    first_line = (str(cause).strip().splitlines() or [""])[0]
    get = f"{hub_id} {filename}" if filename else hub_id
    return (f"{reward}: cannot load {what} from {tried!r} ({type(cause).__name__}: {first_line}).\n"
            f"  Download it once with `hf download {get}` (older huggingface_hub: `huggingface-cli download {get}`);"
            f" it is then found in the Hugging Face cache, also offline.\n"
            f"  Or give a local copy: --reward_options '{{\"{reward}\": {{\"{option}\": \"/path/to/local/"
            f"{'file' if filename else 'dir'}\"}}}}'")


def load_pretrained(cls, name_or_path: str, reward: str, option: str, hub_id: str, what: str, **kwargs):
    """`cls.from_pretrained(name_or_path)`, turning "not found / not cached / offline" into one clear error."""
    path = Path(name_or_path).expanduser()
    if str(name_or_path).startswith(("/", ".", "~")) and not path.exists():  # clearly a path, not a hub id
        raise FileNotFoundError(missing_weights_message(reward, what, name_or_path, option, hub_id,
                                                        FileNotFoundError(f"no such directory: {path}")))
    try:
        return cls.from_pretrained(str(path) if path.exists() else name_or_path, **kwargs)
    except (OSError, ValueError) as e:  # OSError: not cached / offline / no such dir; ValueError: malformed hub id
        raise FileNotFoundError(missing_weights_message(reward, what, name_or_path, option, hub_id, e)) from None


def _dtype(dtype) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def quantise(images: Tensor) -> Tensor:
    """Clamp to [0, 1] and round to 8 bits: score exactly what a saved PNG would hold (as the peers do, who pass
    uint8 images to their scorers)."""
    return (images.float().clamp(0, 1) * 255).round() / 255


def _rgb(images: Tensor) -> Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _bicubic(images: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    # antialias=True matches PIL's bicubic downscaling (what CLIPProcessor and open_clip's transforms use); clamp the
    # cubic overshoot as PIL does when it writes uint8
    return F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def clip_preprocess(images: Tensor, size: int, crop: int, mean=CLIP_MEAN, std=CLIP_STD) -> Tensor:
    """CLIP's evaluation transform, batched on the images' device: resize the shorter side to `size` (bicubic),
    centre-crop `crop` x `crop`, normalise. (B, C, H, W) in [0, 1] -> (B, 3, crop, crop)."""
    images = _rgb(images.float())
    h, w = images.shape[-2:]
    images = _bicubic(images, (size, int(size * w / h)) if h <= w else (int(size * h / w), size))
    h, w = images.shape[-2:]
    top, left = int(round((h - crop) / 2)), int(round((w - crop) / 2))
    images = images[..., top:top + crop, left:left + crop]
    return (images - images.new_tensor(mean).view(1, 3, 1, 1)) / images.new_tensor(std).view(1, 3, 1, 1)


def _size_of(value, key: str) -> int:
    """An image processor's size entry: an int, a dict or transformers 5's SizeDict."""
    if isinstance(value, int):
        return value
    return int(value[key] if isinstance(value, dict) else getattr(value, key))


# -- OCR (visual text rendering; Flow-GRPO's SD3.5-M task) ------------------------------------------------------
def ocr_target(prompt: str, metadata: dict | None = None) -> str | None:
    """The text the image must show: metadata["text"] if given, else the first double-quoted span of the prompt
    ('A sign that says "OPEN LATE"' -> 'OPEN LATE'); None if there is none."""
    if metadata and metadata.get("text"):
        return str(metadata["text"])
    m = re.search(r'["\u201c]([^"\u201d]+)["\u201d]', prompt)
    return m.group(1) if m else None


def _ocr_normalise(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def ocr_score(recognised: str, target: str) -> float:
    """Flow-GRPO's OCR reward: after lower-casing and removing whitespace, 1 if the target occurs in the recognised
    text, else max(0, 1 - Levenshtein(recognised, target) / len(target))."""
    from rapidfuzz.distance import Levenshtein

    rec, tgt = _ocr_normalise(recognised), _ocr_normalise(target)
    if not tgt:
        return float("nan")
    if tgt in rec:
        return 1.0
    return max(0.0, 1 - Levenshtein.distance(rec, tgt) / len(tgt))


@register("ocr")
def ocr(device="cpu", det_limit_side_len: int = 320, **_) -> RewardFn:
    """Text-rendering accuracy: `ocr_score` of what RapidOCR reads in the image vs the prompt's quoted text.

    Scale [0, 1]. Its test-set mean is the paper's "OCR accuracy": SD3.5-M 0.579, Flow-GRPO 0.966, Flow-CPS 0.975
    (PAPER.md §6). Flow-GRPO reads with PaddleOCR 2.9 (English, CPU, angle classifier off); RapidOCR 3.10 runs the
    PP-OCR det/rec models through onnxruntime with the model files inside the wheel, so this works offline.
    Detection runs at most `det_limit_side_len` px on the longer side (320: 40 ms per 256x64 image and 70-95 ms per
    512x512 one on 2 CPU cores, 14-px text on 512x512 still read exactly; 960: ~120 ms at 512x512). Images are
    read one at a time, on the CPU, whatever `device` is (as Flow-GRPO's PaddleOCR). A prompt without quoted text
    scores NaN (invalid), not 0: there is nothing to read, and a 0 would push the policy away from an image that
    did nothing wrong.
    """
    from rapidocr import RapidOCR

    engine = RapidOCR(params={"Global.log_level": "error", "Det.limit_type": "max",
                              "Det.limit_side_len": det_limit_side_len})

    def fn(images: Tensor, prompts: list[str], metadata=None) -> Tensor:
        _check_images(images)
        arr = (quantise(_rgb(images)) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
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


# -- PickScore (Kirstain et al. 2023, Pick-a-Pic; the paper's FLUX.1 task) -------------------------------------
PICKSCORE_HUB_ID = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PICKSCORE_SCALES = {"raw": 1.0, "flow_grpo": 1 / 26}


@register("pickscore")
def pickscore(device="cpu", model: str = PICKSCORE_HUB_ID, processor: str = PICKSCORE_PROCESSOR_ID,
              scale: str = "raw", dtype="float32", batch_size: int = 32, **_) -> RewardFn:
    """PickScore = logit_scale.exp() x cos(image embedding, text embedding) of the PickScore_v1 CLIP-H model.

    scale="raw": the paper's tables, ~21-24 (FLUX.1-dev 22.06 -> Flow-GRPO 23.90 -> Flow-CPS 24.25; FLUX.1-schnell
    21.86 -> 23.39 -> 23.78). scale="flow_grpo": divided by 26 (~0.85), the scale Flow-GRPO trains on. GRPO's
    per-group standardised advantages do not care which; the KL weight and logged numbers do.
    Preprocessing is CLIPProcessor's (shorter side 224 bicubic, centre crop, CLIP mean/std) done on tensors, batched
    on `device`, after rounding to 8 bits as Flow-GRPO's uint8 -> PIL route does. Text: at most 77 tokens.
    Cost (the ViT-H/14 network with random weights, batch 64 of 512-px images, one H200): 9 ms per image in fp32,
    1.1 ms in bf16 (dtype="bfloat16"); Flow-GRPO scores in fp32.
    """
    from transformers import AutoProcessor, CLIPModel

    if scale not in PICKSCORE_SCALES:
        raise ValueError(f"pickscore scale {scale!r}: choose one of {sorted(PICKSCORE_SCALES)}")
    dtype = _dtype(dtype)
    net = load_pretrained(CLIPModel, model, "pickscore", "model", PICKSCORE_HUB_ID, "the PickScore_v1 model")
    net = net.to(device, dtype).eval().requires_grad_(False)
    proc = load_pretrained(AutoProcessor, processor, "pickscore", "processor", PICKSCORE_PROCESSOR_ID,
                           "the CLIP ViT-H-14 processor")
    ip, tokenizer = proc.image_processor, proc.tokenizer
    size, crop = _size_of(ip.size, "shortest_edge"), _size_of(ip.crop_size, "height")
    max_len = min(77, net.config.text_config.max_position_embeddings)
    factor = PICKSCORE_SCALES[scale]

    @torch.no_grad()
    def fn(images: Tensor, prompts: list[str], metadata=None) -> Tensor:
        _check_images(images)
        out = []
        for i in range(0, len(prompts), batch_size):
            px = clip_preprocess(quantise(images[i:i + batch_size].to(device)), size, crop, ip.image_mean,
                                 ip.image_std)
            tok = tokenizer(prompts[i:i + batch_size], padding=True, truncation=True, max_length=max_len,
                            return_tensors="pt").to(device)
            img = F.normalize(net.get_image_features(pixel_values=px.to(dtype)).pooler_output.float(), dim=-1)
            txt = F.normalize(net.get_text_features(**tok).pooler_output.float(), dim=-1)
            out.append(net.logit_scale.float().exp() * (img * txt).sum(-1))
        return torch.cat(out).cpu() * factor
    fn.normaliser = Normaliser(22.0 * factor, 1.0 * factor)
    return fn


# -- HPSv2.1 (Wu et al. 2023, Human Preference Score v2; the paper's Dance-GRPO task) ---------------------------
HPS_REPO, HPS_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"
HPS_TOKENIZER_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # OpenCLIP ViT-H-14 uses OpenAI CLIP's BPE, as this does
_BLOCK_KEYS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def load_openclip_state_dict(path) -> dict[str, Tensor]:
    """An OpenCLIP checkpoint's state dict: the file holds {"state_dict": ...} (HPSv2's training checkpoints) or
    the bare dict; a DistributedDataParallel "module." prefix is dropped; tensors are cast to fp32 ("compressed"
    releases store fp16). Loaded with weights_only=True: no code in the file runs."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"{path}: not an OpenCLIP checkpoint (expected a state dict, or {{'state_dict': ...}})")
    return {k.removeprefix("module."): v.float() if v.is_floating_point() else v for k, v in sd.items()}


def openclip_to_transformers(sd: dict[str, Tensor], vision_heads: int | None = None, text_heads: int | None = None,
                             bos_token_id: int | None = None, eos_token_id: int | None = None,
                             pad_token_id: int | None = None):
    """Map an OpenCLIP ViT (open_clip.CLIP with the built-in text tower) state dict onto transformers' CLIPModel.

    The two are the same network under different names, apart from three layout differences handled here:
    OpenCLIP's fused attention in_proj (3W, W) is split into q/k/v; its projections `visual.proj` and
    `text_projection` are (W, E) matrices used as x @ P, i.e. the transposes of nn.Linear weights; and the class/
    positional embeddings are bare parameters. Activations are exact GELU (OpenCLIP's default for LAION models; not
    OpenAI's QuickGELU), layer-norm eps 1e-5. Sizes are read from the tensors; head counts cannot be, so they
    default to OpenCLIP's: ViT-H-14 vision 16 heads of 80 (width 1280), otherwise width / 64.
    """
    from transformers import CLIPConfig, CLIPModel

    sd = {k: v for k, v in sd.items() if not k.endswith("attn_mask")}  # a causal-mask buffer, not a weight
    towers = {"vision": "visual.transformer.resblocks.", "text": "transformer.resblocks."}
    depth = {t: 1 + max((int(k[len(p):].split(".")[0]) for k in sd if k.startswith(p)), default=-1)
             for t, p in towers.items()}
    if not depth["vision"] or not depth["text"] or "visual.conv1.weight" not in sd:
        raise ValueError("not an OpenCLIP ViT state dict: need visual.conv1.weight, visual.transformer.resblocks.* "
                         "and transformer.resblocks.* (timm or Hugging Face text towers are not supported)")
    wv, _, patch, _ = sd["visual.conv1.weight"].shape
    wt = sd["token_embedding.weight"].shape[1]
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    text_proj = sd["text_projection"] if "text_projection" in sd else sd["text_projection.weight"].T
    vision_heads = vision_heads or (16 if wv == 1280 else wv // 64)
    text_heads = text_heads or wt // 64
    if not vision_heads or wv % vision_heads or not text_heads or wt % text_heads:
        raise ValueError(f"cannot infer head counts for widths {wv}/{wt}; pass vision_heads= and text_heads=")
    vocab = sd["token_embedding.weight"].shape[0]
    ids = dict(bos_token_id=vocab - 2 if bos_token_id is None else bos_token_id,  # OpenCLIP: SOT, EOT = last ids
               eos_token_id=vocab - 1 if eos_token_id is None else eos_token_id)
    ids["pad_token_id"] = ids["eos_token_id"] if pad_token_id is None else pad_token_id
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=wt, intermediate_size=sd["transformer.resblocks.0.mlp.c_fc"
                         ".weight"].shape[0], num_hidden_layers=depth["text"], num_attention_heads=text_heads,
                         max_position_embeddings=sd["positional_embedding"].shape[0], hidden_act="gelu",
                         layer_norm_eps=1e-5, **ids),
        vision_config=dict(hidden_size=wv, intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"]
                           .shape[0], num_hidden_layers=depth["vision"], num_attention_heads=vision_heads,
                           image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-5),
        projection_dim=text_proj.shape[1])

    out = {"logit_scale": sd["logit_scale"].reshape(()),
           "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
           "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
           "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
           "visual_projection.weight": sd["visual.proj"].T, "text_projection.weight": text_proj.T,
           "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": sd["positional_embedding"]}
    for ours, theirs in [("vision_model.pre_layrnorm", "visual.ln_pre"), ("vision_model.post_layernorm",
                         "visual.ln_post"), ("text_model.final_layer_norm", "ln_final")]:
        out[f"{ours}.weight"], out[f"{ours}.bias"] = sd[f"{theirs}.weight"], sd[f"{theirs}.bias"]
    for tower, prefix in towers.items():
        for i in range(depth[tower]):
            src, dst = f"{prefix}{i}.", f"{tower}_model.encoder.layers.{i}."
            for kind in ("weight", "bias"):
                q, k, v = sd[f"{src}attn.in_proj_{kind}"].chunk(3)  # OpenCLIP fuses [q; k; v] row-wise
                out[f"{dst}self_attn.q_proj.{kind}"], out[f"{dst}self_attn.k_proj.{kind}"] = q, k
                out[f"{dst}self_attn.v_proj.{kind}"] = v
                for theirs, ours in _BLOCK_KEYS.items():
                    out[f"{dst}{ours}.{kind}"] = sd[f"{src}{theirs}.{kind}"]
    used = {"visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.proj",
            "text_projection", "text_projection.weight", "token_embedding.weight", "positional_embedding",
            "logit_scale", *(f"{p}.{k}" for p in ("visual.ln_pre", "visual.ln_post", "ln_final")
                             for k in ("weight", "bias"))}
    unknown = sorted(k for k in sd if k not in used and not any(k.startswith(p) for p in towers.values()))
    if unknown:  # e.g. layer scale or attention pooling: a variant this mapping does not cover; refuse, not guess
        raise ValueError(f"OpenCLIP keys with no transformers CLIP counterpart: {unknown[:8]}")

    with torch.device("meta"):  # skip the random init of ~1 B parameters; every weight is assigned below
        model = CLIPModel(config)
    model.load_state_dict({k: v.contiguous() for k, v in out.items()}, strict=True, assign=True)
    for emb in (model.text_model.embeddings, model.vision_model.embeddings):  # non-persistent buffers stay on meta
        emb.register_buffer("position_ids", torch.arange(emb.position_embedding.num_embeddings)[None],
                            persistent=False)
    return model.eval()


def resize_max_and_pad(images: Tensor, size: int) -> Tensor:
    """HPSv2's evaluation resize (open_clip's ResizeMaxSize): longer side to `size` (bicubic), then pad to a
    square with black, centred. A square image is simply resized."""
    images = _rgb(images.float())
    h, w = images.shape[-2:]
    nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
    images = _bicubic(images, (nh, nw))
    ph, pw = size - nh, size - nw
    return F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


@register("hpsv2")
def hpsv2(device="cpu", model: str | None = None, tokenizer: str = HPS_TOKENIZER_ID, vision_heads: int | None = None,
          text_heads: int | None = None, dtype="float32", batch_size: int = 32, **_) -> RewardFn:
    """HPSv2.1 = cos(normalised image features, normalised text features) of an OpenCLIP ViT-H-14 fine-tuned on
    human preferences. Scale ~0.2-0.4: the paper's FLUX numbers are 0.304 (base) -> 0.364 (Dance-GRPO) -> 0.377
    (Flow-CPS); DanceGRPO's README shows Qwen-Image 0.25 -> 0.33.

    model: path to `HPS_v2.1_compressed.pt` (the public release, an OpenCLIP state dict); by default it is taken
    from the hub repo xswu/HPSv2 (the Hugging Face cache, offline included). The checkpoint is loaded WITHOUT
    open_clip or torchvision: `openclip_to_transformers` maps its keys onto transformers' CLIPModel (OpenCLIP's
    ViT-H-14 and transformers' CLIP are the same architecture). Preprocessing is HPSv2's (resize the longer side to
    224 bicubic, pad to square, CLIP mean/std) done on tensors; text through OpenAI CLIP's BPE, 77 tokens.
    Same network as PickScore, so the same cost per image.
    """
    from transformers import AutoTokenizer

    if model is None:
        from huggingface_hub import hf_hub_download
        try:
            model = hf_hub_download(HPS_REPO, HPS_FILE)
        except Exception as e:  # not cached + offline, or no network: say how to get it
            raise FileNotFoundError(missing_weights_message("hpsv2", "the HPSv2.1 checkpoint", f"{HPS_REPO}/"
                                                            f"{HPS_FILE}", "model", HPS_REPO, e, HPS_FILE)) from None
    try:
        sd = load_openclip_state_dict(model)
    except (FileNotFoundError, IsADirectoryError) as e:
        raise FileNotFoundError(missing_weights_message("hpsv2", "the HPSv2.1 checkpoint", str(model), "model",
                                                        HPS_REPO, e, HPS_FILE)) from None
    tok = load_pretrained(AutoTokenizer, tokenizer, "hpsv2", "tokenizer", HPS_TOKENIZER_ID, "the CLIP tokenizer")
    dtype = _dtype(dtype)
    net = openclip_to_transformers(sd, vision_heads, text_heads, tok.bos_token_id, tok.eos_token_id,
                                   tok.pad_token_id).to(device, dtype).requires_grad_(False)
    del sd
    size = net.config.vision_config.image_size
    max_len = min(77, net.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def fn(images: Tensor, prompts: list[str], metadata=None) -> Tensor:
        _check_images(images)
        out = []
        for i in range(0, len(prompts), batch_size):
            px = resize_max_and_pad(quantise(images[i:i + batch_size].to(device)), size)
            px = (px - px.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)) / px.new_tensor(CLIP_STD).view(1, 3, 1, 1)
            t = tok(prompts[i:i + batch_size], padding=True, truncation=True, max_length=max_len,
                    return_tensors="pt").to(device)
            img = F.normalize(net.get_image_features(pixel_values=px.to(dtype)).pooler_output.float(), dim=-1)
            txt = F.normalize(net.get_text_features(**t).pooler_output.float(), dim=-1)
            out.append((img * txt).sum(-1))
        return torch.cat(out).cpu()
    return fn


# -- GenEval (Ghosh et al. 2023; the paper's SD3.5-M task); the rules live in geneval.py ------------------------
_GENEVAL_SCORERS: dict = {}  # geneval and geneval_strict in one run share the loaded models


def _geneval_fn(device, pick: Callable, **options) -> RewardFn:
    import geneval

    if "dtype" in options:
        options["dtype"] = _dtype(options["dtype"])
    key = (str(device), tuple(sorted(options.items())))
    if key not in _GENEVAL_SCORERS:
        _GENEVAL_SCORERS[key] = geneval.Scorer(device=device, **options)
    scorer = _GENEVAL_SCORERS[key]

    def fn(images: Tensor, prompts: list[str], metadata=None) -> Tensor:
        _check_images(images)
        meta = list(metadata) if metadata is not None else [None] * len(prompts)
        ok = [i for i, m in enumerate(meta) if isinstance(m, dict) and (m.get("include") or m.get("exclude"))]
        if len(ok) < len(meta):  # nothing to check against: NaN (invalid), never a made-up score
            warnings.warn("geneval: samples without GenEval metadata (include/exclude) score NaN; load prompts with "
                          "prompts.load('geneval', ...) or a GenEval-format .jsonl", stacklevel=2)
        out = torch.full((len(prompts),), float("nan"))
        if ok:
            for i, v in zip(ok, scorer(images[ok], [meta[i] for i in ok])):
                out[i] = pick(v)
        return out
    return fn


@register("geneval")
def geneval_reward(device="cpu", **options) -> RewardFn:
    """GenEval partial credit in [0, 1] (the training reward; geneval.py's docstring has the rules). Options:
    detector (hub id/path, default facebook/mask2former-swin-small-coco-instance), clip (default
    openai/clip-vit-large-patch14), detector_size (800), threshold (0.3), counting_threshold (0.9), max_objects
    (16), max_overlap (1.0), position_margin (0.1), dtype. Needs per-prompt metadata (prompts.load("geneval"))."""
    return _geneval_fn(device, lambda v: v.score, **options)


@register("geneval_strict")
def geneval_strict(device="cpu", **options) -> RewardFn:
    """1 if the image passes the GenEval benchmark's rule for its prompt, else 0. Aggregate with
    `geneval.summarize(tags, scores)`: per-tag accuracy and the overall score (SD3.5-M 0.63; Flow-GRPO and
    Flow-CPS with KL 0.97, PAPER.md §6). Same options as `geneval`; the two share their loaded models."""
    return _geneval_fn(device, lambda v: float(v.correct), **options)


# -- combination and failure handling ----------------------------------------------------------------------------
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
               "ocr": Normaliser(0.5, 0.3), "geneval": Normaliser(0.5, 0.3), "geneval_strict": Normaliser(0.5, 0.5),
               "pickscore": Normaliser(22.0, 1.0),  # raw scale; the flow_grpo scale brings its own
               "hpsv2": Normaliser(0.30, 0.02)}  # base FLUX 0.304, trained 0.36-0.38


@dataclass
class RewardOutput:
    total: Tensor  # (B,) weighted sum of normalised components; NaN where invalid
    components: dict[str, Tensor]  # raw (un-normalised) per-reward scores, NaN where that reward failed
    valid: Tensor  # (B,) bool: every component scored the sample


class RewardModel:
    """A weighted combination of registered rewards with per-sample failure isolation."""

    def __init__(self, spec: str, device="cpu", **options):
        self.weights = parse_spec(spec)
        self.fns = {name: REGISTRY[name](device=device, **options.get(name, {})) for name in self.weights}
        self.normalisers = {name: getattr(fn, "normaliser", None) or NORMALISERS.get(name, Normaliser())
                            for name, fn in self.fns.items()}

    def _score(self, name: str, images: Tensor, prompts: list[str], metadata) -> Tensor:
        fn = self.fns[name]
        try:
            return fn(images, prompts, metadata).detach().float().cpu().reshape(len(prompts))
        except Exception:  # isolate the failing sample(s): score one at a time, NaN for those that still fail
            out = torch.full((len(prompts),), float("nan"))
            for i in range(len(prompts)):
                try:
                    out[i] = fn(images[i:i + 1], prompts[i:i + 1], None if metadata is None else metadata[i:i + 1])[0]
                except Exception:
                    pass
            return out

    def __call__(self, images: Tensor, prompts: list[str], metadata: list | None = None) -> RewardOutput:
        comps = {name: self._score(name, images, prompts, metadata) for name in self.weights}
        if len(self.weights) == 1:  # a single reward trains on its own scale (as the paper's runs do)
            (name, w), = self.weights.items()
            total = w * comps[name]
        else:
            total = torch.zeros(len(prompts))
            for name, w in self.weights.items():
                nrm = self.normalisers[name]
                total = total + w * (comps[name] - nrm.shift) / nrm.scale
        valid = torch.isfinite(total)
        return RewardOutput(total=torch.where(valid, total, torch.nan), components=comps, valid=valid)


def nan_mean(x: Tensor) -> float:
    x = x[torch.isfinite(x)]
    return float(x.mean()) if x.numel() else float("nan")


# -- command line: score image files; the built-in rewards' scales -----------------------------------------------
def load_image(path) -> Tensor:
    """An image file as (1, 3, H, W) float in [0, 1]."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def score_files(spec: str, paths: list, prompt: str, options: dict | None = None, metadata: dict | None = None,
                device="cpu") -> list[dict]:
    """Score image files against one prompt: [{"image": path, "total": ..., <reward>: ...}, ...]."""
    model = RewardModel(spec, device, **(options or {}))
    rows = []
    for path in paths:  # one at a time: files may differ in size
        out = model(load_image(path), [prompt], None if metadata is None else [metadata])
        rows.append({"image": str(path), "total": float(out.total[0]),
                     **{k: float(v[0]) for k, v in out.components.items()}})
    return rows


def print_scales() -> None:
    """The noise-sensitive rewards on the clean digits and with added noise (the numbers in their docstrings)."""
    import digits

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
    import argparse
    import json

    p = argparse.ArgumentParser(description="Score image files with a reward (or a weighted spec such as "
                                "'ocr:1,pickscore:0.5'), or print the built-in rewards' scales.")
    p.add_argument("reward", nargs="?", help=f"reward spec; one of {', '.join(sorted(REGISTRY))}")
    p.add_argument("images", nargs="*", help="image files (PNG, JPEG, ...)")
    p.add_argument("--prompt", default="", help="the prompt every image is scored against")
    p.add_argument("--options", default="{}", help='per-reward options as JSON, e.g. \'{"pickscore": {"model": '
                   '"/local/PickScore_v1"}}\'')
    p.add_argument("--metadata", default=None, help="per-prompt metadata as JSON (GenEval: tag/include/exclude)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--scales", action="store_true", help="print the built-in noise rewards' scales on the digits")
    args = p.parse_args(argv)
    if args.scales:
        print_scales()
        return
    if not args.reward or not args.images:
        p.error("give a reward and at least one image file (or --scales)")
    rows = score_files(args.reward, args.images, args.prompt, json.loads(args.options),
                       None if args.metadata is None else json.loads(args.metadata), args.device)
    for row in rows:
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else str(v) for k, v in row.items()))


if __name__ == "__main__":
    main()
