"""CLIP plumbing shared by the model-based rewards (rewards.py) and GenEval's colour classifier (geneval.py).

  * images as 8-bit arrays (`to_uint8`: what PIL, the JPEG/OCR rewards and the image grids take);
  * tensor preprocessing, batched on the images' device: `quantise` (8-bit, as a saved PNG), `clip_preprocess`
    (resize the shorter side + centre crop, CLIPProcessor's transform), `resize_max_and_pad` (HPSv2's);
  * weight loading that fails at start-up with the hub id or path tried and how to provide it (`load_pretrained`,
    `missing_weights_message`), and the CLIP image processor's settings read without building a transformers image
    processor class (`load_processor_settings`);
  * the OpenCLIP -> transformers mapping (`load_openclip_state_dict`, `openclip_to_transformers`), so HPSv2.1's
    OpenCLIP checkpoint runs in transformers' CLIPModel without open_clip or torchvision.

Imports only hub.py (the rule that tells a local path from a hub id, the one --model follows), and transformers only
inside the functions that build a model: importing this module (and so rewards.py or geneval.py) never pulls in a
transformers image processor or its torchvision warnings.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flow_cps.hub import hub_id as _hub_id

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation, used by all CLIPs here
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# -- preprocessing on tensors ------------------------------------------------------------------------------------
def to_uint8(images: Tensor) -> np.ndarray:
    """Images (B, C, H, W) in [0, 1] as 8-bit pixels, (B, H, W, C) uint8 on the CPU: clamped, scaled by 255 and
    rounded (not truncated), what a saved PNG holds and PIL takes."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def quantise(images: Tensor) -> Tensor:
    """Clamp to [0, 1] and round to 8 bits: score exactly what a saved PNG would hold (as the peers do, who pass
    uint8 images to their scorers)."""
    return (images.float().clamp(0, 1) * 255).round() / 255


def rgb(images: Tensor) -> Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def bicubic(images: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    # antialias=True matches PIL's bicubic downscaling (what CLIPProcessor and open_clip's transforms use); clamp the
    # cubic overshoot as PIL does when it writes uint8
    return F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def normalise(images: Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> Tensor:
    return (images - images.new_tensor(mean).view(1, 3, 1, 1)) / images.new_tensor(std).view(1, 3, 1, 1)


def clip_preprocess(images: Tensor, size: int, crop: int, mean=CLIP_MEAN, std=CLIP_STD) -> Tensor:
    """CLIP's evaluation transform, batched on the images' device: resize the shorter side to `size` (bicubic),
    centre-crop `crop` x `crop`, normalise. (B, C, H, W) in [0, 1] -> (B, 3, crop, crop)."""
    images = rgb(images.float())
    h, w = images.shape[-2:]
    images = bicubic(images, (size, int(size * w / h)) if h <= w else (int(size * h / w), size))
    h, w = images.shape[-2:]
    top, left = int(round((h - crop) / 2)), int(round((w - crop) / 2))
    return normalise(images[..., top:top + crop, left:left + crop], mean, std)


def resize_max_and_pad(images: Tensor, size: int) -> Tensor:
    """HPSv2's evaluation resize (open_clip's ResizeMaxSize): longer side to `size` (bicubic), then pad to a
    square with black, centred. A square image is simply resized."""
    images = rgb(images.float())
    h, w = images.shape[-2:]
    nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
    images = bicubic(images, (nh, nw))
    ph, pw = size - nh, size - nw
    return F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


# -- loading weights, with errors that say how to get them -------------------------------------------------------
def as_dtype(dtype) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


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


def local_or_hub(name_or_path: str, reward: str, option: str, hub_id: str, what: str) -> str:
    """What to load: an existing local path, or a hub id. A missing path is never sent to the Hub: one that starts
    with '/', '.' or '~', is not owner/name, or whose first part is a folder here (`flow_cps/PickScore_v1`), as
    --model decides (hub.hub_id); it fails naming the path."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path)
    if _hub_id(str(name_or_path)) is None:
        raise FileNotFoundError(missing_weights_message(reward, what, name_or_path, option, hub_id,
                                                        FileNotFoundError(f"no such directory: {path}")))
    return name_or_path


def load_pretrained(cls, name_or_path: str, reward: str, option: str, hub_id: str, what: str, **kwargs):
    """`cls.from_pretrained(name_or_path)`, turning "not found / not cached / offline" into one clear error."""
    source = local_or_hub(name_or_path, reward, option, hub_id, what)
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:  # OSError: not cached / offline / no such dir; ValueError: malformed hub id
        raise FileNotFoundError(missing_weights_message(reward, what, name_or_path, option, hub_id, e)) from None


def _size_of(value, key: str) -> int:
    """An image processor's size entry: an int or a dict ({"shortest_edge": 224}, {"height": 224, ...})."""
    return int(value if isinstance(value, int) else value[key])


def load_processor_settings(name_or_path: str, reward: str, option: str, hub_id: str) -> dict:
    """A CLIP image processor's settings (resize `size`, centre `crop`, `mean`, `std`) read from its saved config,
    without building a transformers image processor: CLIPImageProcessor warns at start-up when torchvision is
    missing, and only these four values are used (the transform itself runs on tensors, `clip_preprocess`)."""
    from transformers.image_processing_base import ImageProcessingMixin

    what = "the CLIP image processor settings"
    source = local_or_hub(name_or_path, reward, option, hub_id, what)
    try:
        cfg, _ = ImageProcessingMixin.get_image_processor_dict(source)
    except (OSError, ValueError) as e:  # not cached / offline / no such dir / malformed hub id
        raise FileNotFoundError(missing_weights_message(reward, what, name_or_path, option, hub_id, e)) from None
    return dict(size=_size_of(cfg["size"], "shortest_edge"), crop=_size_of(cfg["crop_size"], "height"),
                mean=tuple(cfg.get("image_mean", CLIP_MEAN)), std=tuple(cfg.get("image_std", CLIP_STD)))


@torch.no_grad()
def cosine(net, tokenizer, images: Tensor, prompts: list[str], preprocess, device, dtype,
           batch_size: int = 32) -> Tensor:
    """cos(image features, text features) of a transformers CLIPModel per (image, prompt) pair, in batches on
    `device`: images rounded to 8 bits, then `preprocess`ed; prompts truncated to the model's context (<= 77)."""
    max_len = min(77, net.config.text_config.max_position_embeddings)
    out = []
    for i in range(0, len(prompts), batch_size):
        px = preprocess(quantise(images[i:i + batch_size].to(device)))
        tok = tokenizer(prompts[i:i + batch_size], padding=True, truncation=True, max_length=max_len,
                        return_tensors="pt").to(device)
        img = F.normalize(net.get_image_features(pixel_values=px.to(dtype)).pooler_output.float(), dim=-1)
        txt = F.normalize(net.get_text_features(**tok).pooler_output.float(), dim=-1)
        out.append((img * txt).sum(-1))
    return torch.cat(out).cpu() if out else torch.zeros(0)


# -- OpenCLIP checkpoints in transformers' CLIPModel -------------------------------------------------------------
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


def load_openclip_checkpoint(path: str | None, repo: str, filename: str, reward: str) -> dict[str, Tensor]:
    """`load_openclip_state_dict` of `path`, or of `filename` in hub repo `repo` (the Hugging Face cache, offline
    included) when path is None; a missing file fails with how to get it."""
    def missing(tried, e):
        return FileNotFoundError(missing_weights_message(reward, f"the checkpoint {filename}", tried, "model", repo, e,
                                                         filename))
    if path is None:
        from huggingface_hub import hf_hub_download
        try:
            path = hf_hub_download(repo, filename)
        except Exception as e:  # not cached + offline, or no network
            raise missing(f"{repo}/{filename}", e) from None
    try:
        return load_openclip_state_dict(path)
    except (FileNotFoundError, IsADirectoryError) as e:
        raise missing(str(path), e) from None


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
