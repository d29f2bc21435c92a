"""The shapes task's learned models: a tiny FLUX transformer that draws scenes.py's scenes from prompts, the
word-reading prompt encoder it is conditioned on, and the learned detector behind the `scene_reward` reward.

Both are trained on first use and cached on disk like the digits model (cache.cached, under $FLOW_CPS_CACHE):

  * the generator: a real diffusers `FluxTransformer2DModel` on 2x2-packed RGB pixels (12 channels per token), the same
    code path as FLUX.1 and the digits model, pre-trained by flow matching on training scenes only (never a held-out
    colour-shape pair) and stopped early so that RL has headroom;
  * the reward's detector, `Detector`: a fully convolutional per-pixel classifier (which colour and shape each pixel
    belongs to) trained on renders; scene_reward scores its detections with GenEval's partial credit
    (scenes.credit), as Flow-GRPO's GenEval reward scores a learned detector's. It reads every pixel, so residual
    noise reaches the reward. The evaluation's judge (scenes.detect) is exact and analytic: another architecture, no
    data, so a pattern that fools the detector does not fool the judge.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flow_cps import cache, digits, scenes
from sampling import rollout

SIZE = 16  # the default side in pixels; scenes.SIZES are the sizes the study uses
MAX_WORDS = 8  # "a red square left of a blue circle"
VOCAB = ["<pad>", *scenes.NUMBERS.values(), *scenes.COLOURS, *scenes.SHAPES, *(s + "s" for s in scenes.SHAPES),
         "and", "above", "below", "left", "right", "of"]
EMBED_DIM = 32  # = FLUX joint_attention_dim and pooled_projection_dim
# A FLUX.1 transformer scaled down to ~0.46 M parameters, on 2x2-packed RGB pixels: 12 channels per token, as FLUX
# packs 16 latent channels into 64.
TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=12, num_layers=2, num_single_layers=2, attention_head_dim=16,
                          num_attention_heads=4, joint_attention_dim=EMBED_DIM, pooled_projection_dim=EMBED_DIM,
                          guidance_embeds=False, axes_dims_rope=(4, 6, 6))
PRETRAIN = dict(batch=64, lr=2e-3, seed=0)
# Pre-training steps per size. 16x16 (the study's size) is trained until the judge sees the base model's scenes
# (docs/STUDY.md, "A shapes base model its judge can see": `python -m tools.shapes_pilot`); 24 and 32 keep the first,
# shorter recipe. $FLOW_CPS_SHAPES_STEPS overrides every size: the tests set a short pre-training (tests/conftest.py),
# cached under its own key (the steps are part of it), so CI never builds the long model.
# 16x16: 2000 steps + a 400-step cooldown, the first candidate of the pilot whose judge on training compositions
# reached 0.35 (0.395; results/shapes_pilot.json); about 13 min on one unloaded thread.
PRETRAIN_STEPS = {16: 2000, 24: 1200, 32: 1200}
# Then a cooldown of COOLDOWN_STEPS: a fresh AdamW whose lr falls linearly from COOLDOWN["lr"] to ~0, on batches of
# its own seed (docs/STUDY.md: under this machine's load, the cheapest way to the judge's target; 0 = none).
COOLDOWN_STEPS = {16: 400, 24: 0, 32: 0}
COOLDOWN = dict(lr=1e-3, seed=1)
STEPS_ENV = "FLOW_CPS_SHAPES_STEPS"  # set: that many steps and no cooldown
DETECTOR_TRAIN = dict(steps=600, batch=64, lr=3e-3, seed=1)
# The scenes' code is part of every cache key: a changed renderer or grammar retrains both models.
SCENES_CODE = hashlib.sha256(Path(scenes.__file__).read_bytes()).hexdigest()[:10]


def code_of(*objects) -> str:
    """A hash of the source of the functions and classes that build a cached model (with SCENES_CODE, its key)."""
    return hashlib.sha256("".join(inspect.getsource(o) for o in objects).encode()).hexdigest()[:10]


def words(prompt: str) -> list[int]:
    """The prompt's word ids, padded to MAX_WORDS (the prompt must parse, scenes.parse)."""
    scenes.parse(prompt)
    ids = [VOCAB.index(w) for w in prompt.lower().split()]
    return ids + [0] * (MAX_WORDS - len(ids))


def word_ids(prompts: list[str], device) -> torch.Tensor:
    return torch.tensor([words(p) for p in prompts], device=device)


class PromptEncoder(nn.Module):
    """Stands in for FLUX's T5 (a sequence of word vectors) and CLIP (a pooled vector): one learned vector per word
    plus one per position, so 'a blue circle' conditions word by word, and a combination never trained on is still a
    distinct sequence of trained words.

    Returns what `FluxPipeline.encode_prompt` returns: (prompt_embeds (B, MAX_WORDS, D), pooled (B, D),
    text_ids (MAX_WORDS, 3))."""

    def __init__(self, dim: int = EMBED_DIM):
        super().__init__()
        self.word, self.position = nn.Embedding(len(VOCAB), dim), nn.Embedding(MAX_WORDS, dim)
        self.pool = nn.Linear(dim, dim)

    def forward(self, prompts: list[str]):
        ids = word_ids(prompts, self.word.weight.device)
        seq = self.word(ids) + self.position.weight[None]
        real = (ids != 0).float()[..., None]
        pooled = self.pool((seq * real).sum(1) / real.sum(1))
        return seq, pooled, torch.zeros(MAX_WORDS, 3, device=seq.device)


def draw(split: str, n: int, size: int, rng: random.Random) -> tuple[list[scenes.Scene], torch.Tensor]:
    """n scenes of a split (tag uniform, then scene uniform within the tag) and their renders (n, 3, size, size)."""
    by_tag = {tag: ss for tag, ss in scenes.scenes(split).items() if ss}
    chosen = [rng.choice(by_tag[rng.choice(list(by_tag))]) for _ in range(n)]
    return chosen, torch.tensor(np.stack([scenes.render(scenes.layout(s, size, rng), size) for s in chosen]),
                                dtype=torch.float32)


# -- the generator -----------------------------------------------------------------------------------------------
def pretrain_steps(size: int = SIZE) -> int:
    """The pre-training steps of the model of this size: PRETRAIN_STEPS, or $FLOW_CPS_SHAPES_STEPS if set."""
    if size not in PRETRAIN_STEPS:
        raise ValueError(f"shapes models exist at sizes {sorted(PRETRAIN_STEPS)}, not {size}")
    return int(os.environ.get(STEPS_ENV) or PRETRAIN_STEPS[size])


def cooldown_steps(size: int = SIZE) -> int:
    return 0 if os.environ.get(STEPS_ENV) else COOLDOWN_STEPS[size]


def model_path(size: int = SIZE, steps: int | None = None, cooldown: int | None = None) -> Path:
    """Where the shapes model of this size, step count and cooldown is cached: the key holds all that builds it."""
    steps = steps or pretrain_steps(size)
    cooldown = cooldown_steps(size) if cooldown is None else cooldown
    key = cache.cache_key(TRANSFORMER_CONFIG, PRETRAIN, steps, size, SCENES_CODE,
                          *([COOLDOWN, cooldown] if cooldown else []),
                          code_of(PromptEncoder, words, draw, _build, cool, save_model, digits.flow_matching))
    return cache.cache_dir() / f"shapes{size}-{key}"


def model_dir(make_backbone, progress: bool = True, size: int = SIZE) -> Path:
    """The cached shapes model folder (transformer/, prompt_encoder.safetensors, info.json), pre-trained on first
    use through `make_backbone(transformer, prompt_encoder, size)` (models.shapes_backbone)."""
    steps, cooldown = pretrain_steps(size), cooldown_steps(size)
    return cache.cached(model_path(size, steps, cooldown),
                        lambda out: _build(out, make_backbone, progress, size, steps, cooldown=cooldown),
                        f"pre-training the shapes model at {size}x{size} ({steps} steps"
                        f"{f' + {cooldown} cooldown' if cooldown else ''})")


def cool(backbone, transformer, encoder, size: int, steps: int, progress: bool = True) -> float:
    """The cooldown: `steps` steps of a fresh AdamW, lr linear from COOLDOWN["lr"] to ~0, on training scenes drawn
    with COOLDOWN["seed"]; returns its seconds. A fresh optimizer, so it can start from any saved snapshot."""
    rng = random.Random(COOLDOWN["seed"])

    def batch(_g):
        chosen, images = draw("train", PRETRAIN["batch"], size, rng)
        return backbone.encode_images(images), [scenes.text(s) for s in chosen]
    return digits.flow_matching(backbone, [*transformer.parameters(), *encoder.parameters()], batch, steps,
                                lr=COOLDOWN["lr"], seed=COOLDOWN["seed"], progress=progress, decay=True)


def _build(out: Path, make_backbone, progress: bool, size: int, steps: int, on_step=None, cooldown: int = 0) -> dict:
    """Pre-train `steps` steps (then `cooldown` steps of `cool`) into `out`. on_step(k, seconds, backbone,
    transformer, encoder) after each step of the first phase (the pilot's snapshots, tools/shapes_pilot.py): at a
    constant lr, step k of a longer run is exactly the k-step model."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(PRETRAIN["seed"])
    transformer, encoder = FluxTransformer2DModel(**TRANSFORMER_CONFIG), PromptEncoder()
    backbone = make_backbone(transformer, encoder, size)
    rng = random.Random(PRETRAIN["seed"])

    def batch(_g):
        chosen, images = draw("train", PRETRAIN["batch"], size, rng)
        return backbone.encode_images(images), [scenes.text(s) for s in chosen]
    hook = None if on_step is None else lambda k, sec: on_step(k, sec, backbone, transformer, encoder)
    seconds = digits.flow_matching(backbone, [*transformer.parameters(), *encoder.parameters()], batch, steps,
                                   lr=PRETRAIN["lr"], seed=PRETRAIN["seed"], progress=progress, on_step=hook)
    if cooldown:
        seconds += cool(backbone, transformer, encoder, size, cooldown, progress)
    return save_model(out, backbone, transformer, encoder, seconds, size, steps, cooldown)


def save_model(out: Path, backbone, transformer, encoder, seconds: float, size: int, steps: int,
               cooldown: int = 0) -> dict:
    """Write a pre-trained model's folder and its info.json: the base model's judge on the three prompt splits
    (training compositions, fresh prompts, held-out compositions) and the pre-training time."""
    transformer.save_pretrained(out / "transformer")
    save_file(encoder.state_dict(), out / "prompt_encoder.safetensors")
    base = {split: judge_accuracy(backbone, split) for split in ("train", "fresh", "test")}
    info = dict(base_judge_accuracy=base, pretrain_seconds=seconds, size=size, steps=steps, **PRETRAIN,
                cooldown=dict(COOLDOWN, steps=cooldown) if cooldown else None)
    (out / "info.json").write_text(json.dumps(info, indent=1))
    print(f"[shapes] base model ODE judge accuracy after {steps} (+ {cooldown}) steps: training scenes "
          f"{base['train']:.3f}, fresh prompts {base['fresh']:.3f}, held-out compositions {base['test']:.3f}; "
          f"pre-training took {seconds:.1f} s")
    return info


@torch.no_grad()
def judge_accuracy(backbone, split: str, per_tag: int = 24, steps: int = 10, seed: int = 1) -> float:
    """The headroom figure: the analytic judge's accuracy on 10-step ODE samples of `per_tag` scenes per tag (of the
    tags the split has)."""
    rng = random.Random(seed)
    by_tag = scenes.scenes(split)
    chosen = [rng.choice(by_tag[tag]) for tag in scenes.TAGS if by_tag[tag] for _ in range(per_tag)]
    texts = [scenes.text(s) for s in chosen]
    cond = backbone.encode(texts, cache=False)
    x1 = torch.randn(len(texts), *backbone.latent_shape, generator=torch.Generator().manual_seed(seed))
    traj = rollout(lambda x, t: backbone.velocity(x, t, cond), x1, backbone.sigmas(steps), "ode", 0.0)
    images = backbone.decode(traj.final).numpy()
    return float(np.mean([scenes.judge(im, s) for im, s in zip(images, chosen)]))


def load_prompt_encoder(path: Path) -> PromptEncoder:
    enc = PromptEncoder()
    enc.load_state_dict(load_file(path / "prompt_encoder.safetensors"))
    return enc.eval().requires_grad_(False)


# -- the reward's detector: a learned per-pixel classifier ---------------------------------------------------------
CLASSES = [("background", "")] + [(c, sh) for c in scenes.COLOURS for sh in scenes.SHAPES]


class Detector(nn.Module):
    """Which kind of object (colour and shape, or background) each pixel belongs to: a fully convolutional network
    at the native resolution (3x3 convolutions, dilated so that each pixel sees a whole object, then a 1x1
    classifier), so every pixel of the image reaches the reward, noise included."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers, c = [], 3
        for dilation in (1, 1, 2, 4, 1):
            layers += [nn.Conv2d(c, width, 3, padding=dilation, dilation=dilation), nn.GELU()]
            c = width
        self.net = nn.Sequential(*layers, nn.Conv2d(width, len(CLASSES), 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float())  # (B, classes, H, W) logits


def pixel_classes(placed: list[scenes.Placed], size: int) -> np.ndarray:
    """The detector's target: each pixel's class, the object that covers at least half of it, else background."""
    cover = np.stack([np.zeros((size, size))] + [scenes.coverage(p.shape, p.x, p.y, p.r, size) for p in placed])
    kinds = [0] + [CLASSES.index((p.colour, p.shape)) for p in placed]
    best = cover.argmax(0)
    return np.where(cover.max(0) >= 0.5, np.array(kinds)[best], 0)


def detector_batch(n: int, size: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """n renders of scenes of every composition (the reward is not the generator: it may know every pair) and their
    pixel classes."""
    by_tag = scenes.all_scenes()
    placed = [scenes.layout(rng.choice(by_tag[rng.choice(scenes.TAGS)]), size, rng) for _ in range(n)]
    images = np.stack([scenes.render(p, size) for p in placed])
    return (torch.tensor(images, dtype=torch.float32),
            torch.tensor(np.stack([pixel_classes(p, size) for p in placed]), dtype=torch.long))


@torch.no_grad()
def learned_detect(net: Detector, images: torch.Tensor) -> list[list[scenes.Found]]:
    """The objects the detector sees in each image: each class's connected pixels (where it is the most likely class)
    are one object, weighted by its probability; the same area threshold as the exact judge."""
    probs = net(images).softmax(1)
    best = probs.argmax(1)
    out = []
    for p, b in zip(probs.cpu().numpy(), best.cpu().numpy()):
        found = []
        for k, (colour, shape) in enumerate(CLASSES[1:], 1):
            for x, y, area, _ in scenes.blobs(p[k] * (b == k), scenes.min_area(p.shape[-1])):
                found.append(scenes.Found(colour, shape, x, y, area, float("nan")))
        out.append(found)
    return out


@torch.enable_grad()  # a first use may come from inside a caller's no_grad (the reward itself, an evaluation)
def train_detector(size: int, progress: bool = True) -> tuple[Detector, dict]:
    """AdamW on fresh renders every step, cross-entropy per pixel; returns the detector and how often its partial
    credit agrees with the exact judge's on 256 fresh renders (1.0: it sees those scenes as the judge does)."""
    from tqdm.auto import tqdm

    torch.manual_seed(DETECTOR_TRAIN["seed"])
    rng = random.Random(DETECTOR_TRAIN["seed"])
    net = Detector()
    opt = torch.optim.AdamW(net.parameters(), lr=DETECTOR_TRAIN["lr"], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, DETECTOR_TRAIN["lr"], total_steps=DETECTOR_TRAIN["steps"])
    t0 = time.time()
    for _ in tqdm(range(DETECTOR_TRAIN["steps"]), desc="scene_reward detector", disable=not progress):
        images, classes = detector_batch(DETECTOR_TRAIN["batch"], size, rng)
        loss = nn.functional.cross_entropy(net(images), classes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval().requires_grad_(False)
    rng = random.Random(12345)
    by_tag = scenes.all_scenes()
    chosen = [rng.choice(by_tag[scenes.TAGS[k % 4]]) for k in range(256)]
    images = torch.tensor(np.stack([scenes.render(scenes.layout(c, size, rng), size) for c in chosen]),
                          dtype=torch.float32)
    agree = np.mean([scenes.credit(f, c) == scenes.credit(scenes.detect(im), c)
                     for f, c, im in zip(learned_detect(net, images), chosen, images.numpy())])
    return net, dict(agreement=float(agree), seconds=time.time() - t0, size=size, **DETECTOR_TRAIN)


def detector_dir(size: int = SIZE) -> Path:
    """The cached scene_reward detector (detector.safetensors, info.json) of this image size."""
    def build(out: Path) -> None:
        net, info = train_detector(size)
        save_file(net.state_dict(), out / "detector.safetensors")
        (out / "info.json").write_text(json.dumps(info, indent=1))
        print(f"[shapes] scene_reward detector: agrees with the exact judge on {info['agreement']:.3f} of fresh "
              f"renders ({info['seconds']:.0f} s)")
    key = cache.cache_key("detector", DETECTOR_TRAIN, size, SCENES_CODE,
                          code_of(Detector, pixel_classes, detector_batch, train_detector))
    return cache.cached(cache.cache_dir() / f"scene_detector{size}-{key}", build,
                        f"training the scene_reward detector at {size}x{size}")


def load_detector(size: int = SIZE) -> Detector:
    net = Detector()
    net.load_state_dict(load_file(detector_dir(size) / "detector.safetensors"))
    return net.eval().requires_grad_(False)
