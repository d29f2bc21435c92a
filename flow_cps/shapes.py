"""The shapes task's learned models: a tiny FLUX transformer that draws scenes.py's scenes from prompts, the
word-reading prompt encoder it is conditioned on, and `scene_match`, the learned reward.

Both are trained on first use and cached on disk like the digits model (digits.cached, under $FLOW_CPS_CACHE):

  * the generator: a real diffusers `FluxTransformer2DModel` on 2x2-packed RGB pixels (12 channels per token), the same
    code path as FLUX.1 and the digits model, pre-trained by flow matching on training scenes only (never a held-out
    colour-shape pair) and stopped early so that RL has headroom;
  * the reward, `Matcher`: a convolutional image-text matching network (a tiny PickScore / VQA-score analogue) that
    reads every pixel at the native resolution and the prompt word by word, trained to tell a scene's render from
    renders of scenes that differ in one attribute (a colour, a shape, a count, the relation). It never sees the
    analytic judge (scenes.judge), which evaluates: different architecture, no shared data.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flow_cps import digits, scenes
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
PRETRAIN_STEPS = {16: 400, 24: 400, 32: 400}  # stopped early on purpose (pilots: docs/STUDY.md)
MATCHER_TRAIN = dict(steps=600, batch=128, lr=2e-3, seed=1)
# The scenes' code is part of every cache key: a changed renderer or grammar retrains both models.
SCENES_CODE = hashlib.sha256(Path(scenes.__file__).read_bytes()).hexdigest()[:10]


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
def model_dir(make_backbone, progress: bool = True, size: int = SIZE) -> Path:
    """The cached shapes model folder (transformer/, prompt_encoder.safetensors, info.json), pre-trained on first
    use through `make_backbone(transformer, prompt_encoder, size)` (models.shapes_backbone)."""
    if size not in PRETRAIN_STEPS:
        raise ValueError(f"shapes models exist at sizes {sorted(PRETRAIN_STEPS)}, not {size}")
    key = digits.cache_key(TRANSFORMER_CONFIG, PRETRAIN, PRETRAIN_STEPS[size], VOCAB, size, SCENES_CODE)
    return digits.cached(digits.cache_dir() / f"shapes{size}-{key}", lambda out: _build(out, make_backbone, progress,
                                                                                        size),
                         f"pre-training the shapes model at {size}x{size} ({PRETRAIN_STEPS[size]} steps)")


def _build(out: Path, make_backbone, progress: bool, size: int) -> dict:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(PRETRAIN["seed"])
    transformer, encoder = FluxTransformer2DModel(**TRANSFORMER_CONFIG), PromptEncoder()
    backbone = make_backbone(transformer, encoder, size)
    rng = random.Random(PRETRAIN["seed"])

    def batch(_g):
        chosen, images = draw("train", PRETRAIN["batch"], size, rng)
        return backbone.encode_images(images), [scenes.text(s) for s in chosen]
    seconds = digits.flow_matching(backbone, [*transformer.parameters(), *encoder.parameters()], batch,
                                   PRETRAIN_STEPS[size], lr=PRETRAIN["lr"], seed=PRETRAIN["seed"], progress=progress)
    transformer.save_pretrained(out / "transformer")
    save_file(encoder.state_dict(), out / "prompt_encoder.safetensors")
    base = {split: judge_accuracy(backbone, split) for split in ("train", "test")}
    info = dict(base_judge_accuracy=base, pretrain_seconds=seconds, size=size, steps=PRETRAIN_STEPS[size], **PRETRAIN)
    (out / "info.json").write_text(json.dumps(info, indent=1))
    print(f"[shapes] base model ODE judge accuracy: training scenes {base['train']:.3f}, held-out "
          f"{base['test']:.3f}; pre-training took {seconds:.1f} s")
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


# -- the reward: scene_match ---------------------------------------------------------------------------------------
class Matcher(nn.Module):
    """p(image shows the prompt's scene): convolutions over every pixel at the native resolution, modulated (FiLM)
    by a GRU's reading of the prompt's words, then pooled to one logit."""

    def __init__(self, width: int = 32, dim: int = 48):
        super().__init__()
        self.word = nn.Embedding(len(VOCAB), dim)
        self.gru = nn.GRU(dim, dim, batch_first=True)
        conv = lambda i, o, s=1: nn.Sequential(nn.Conv2d(i, o, 3, s, 1), nn.GELU())  # noqa: E731
        self.stem = nn.Sequential(conv(3, width), conv(width, width))
        self.body = nn.Sequential(conv(width, 2 * width, 2), conv(2 * width, 2 * width), conv(2 * width, 2 * width, 2))
        self.film = nn.Linear(dim, 2 * width)
        self.head = nn.Sequential(nn.Linear(4 * width + dim, 64), nn.GELU(), nn.Linear(64, 1))

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        ids = word_ids(prompts, images.device)
        _, h = self.gru(self.word(ids))
        text = h[0]
        scale, shift = self.film(text)[:, :, None, None].chunk(2, 1)
        x = self.body(self.stem(images.float()) * (1 + scale) + shift)
        pooled = torch.cat([x.mean((2, 3)), x.amax((2, 3)), text], 1)
        return self.head(pooled)[:, 0]


def mutate(s: scenes.Scene, rng: random.Random) -> scenes.Scene:
    """A scene that differs from s in one attribute: a colour, a shape, a count, or (two objects) the relation or
    which object has which colour. The matcher's negatives."""
    objs = list(s.objects)
    options = ["colour", "shape", "count"] + (["relation", "swap"] if len(objs) == 2 else [])
    while True:
        kind, i = rng.choice(options), rng.randrange(len(objs))
        o = objs[i]
        new = list(objs)
        if kind == "colour":
            new[i] = scenes.Obj(rng.choice([c for c in scenes.COLOURS if c != o.colour]), o.shape, o.count)
        elif kind == "shape":
            new[i] = scenes.Obj(o.colour, rng.choice([x for x in scenes.SHAPES if x != o.shape]), o.count)
        elif kind == "count":
            counts = [2] if len(objs) == 2 else [n for n in scenes.NUMBERS if n != o.count]  # room for 3 objects
            new[i] = scenes.Obj(o.colour, o.shape, rng.choice(counts))
        elif kind == "swap":
            new = [scenes.Obj(objs[1].colour, objs[0].shape), scenes.Obj(objs[0].colour, objs[1].shape)]
        relation = s.relation
        if kind == "relation":
            relation = {"above": "below", "below": "above", "left of": "right of", "right of": "left of",
                        None: rng.choice(scenes.RELATIONS)}[s.relation]
        if len({(x.colour, x.shape) for x in new}) == len(new):  # still distinct object kinds
            tag = s.tag if len(new) == 2 else ("single" if new[0].count == 1 else "counting")
            m = scenes.Scene(tag, tuple(new), relation)
            if m != s:
                return m


def matcher_batch(n: int, size: int, rng: random.Random) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Half matching pairs (a render and its prompt), half a prompt with the render of a one-attribute mutation."""
    by_split = {split: scenes.scenes(split) for split in ("train", "test")}
    chosen = [rng.choice(by_split[rng.choice(("train", "test"))][rng.choice(scenes.TAGS)]) for _ in range(n)]
    label = torch.tensor([k % 2 == 0 for k in range(n)], dtype=torch.float32)
    drawn = [s if k % 2 == 0 else mutate(s, rng) for k, s in enumerate(chosen)]
    images = torch.tensor(np.stack([scenes.render(scenes.layout(s, size, rng), size) for s in drawn]),
                          dtype=torch.float32)
    return images, [scenes.text(s) for s in chosen], label


@torch.enable_grad()  # a first use may come from inside a caller's no_grad (the reward itself, an evaluation)
def train_matcher(size: int, progress: bool = True) -> tuple[Matcher, dict]:
    """AdamW on fresh scenes every step (all compositions: the reward model is not the generator); returns the
    matcher and its accuracy on 512 fresh pairs."""
    from tqdm.auto import tqdm

    torch.manual_seed(MATCHER_TRAIN["seed"])
    rng = random.Random(MATCHER_TRAIN["seed"])
    net = Matcher()
    opt = torch.optim.AdamW(net.parameters(), lr=MATCHER_TRAIN["lr"], weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, MATCHER_TRAIN["lr"], total_steps=MATCHER_TRAIN["steps"])
    t0 = time.time()
    for _ in tqdm(range(MATCHER_TRAIN["steps"]), desc="scene_match reward", disable=not progress):
        images, texts, label = matcher_batch(MATCHER_TRAIN["batch"], size, rng)
        loss = nn.functional.binary_cross_entropy_with_logits(net(images, texts), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval().requires_grad_(False)
    images, texts, label = matcher_batch(512, size, random.Random(12345))
    with torch.no_grad():
        acc = float(((net(images, texts) > 0).float() == label).float().mean())
    return net, dict(accuracy=acc, seconds=time.time() - t0, size=size, **MATCHER_TRAIN)


def matcher_dir(size: int = SIZE) -> Path:
    """The cached scene_match reward (matcher.safetensors, info.json) of this image size."""
    def build(out: Path) -> None:
        net, info = train_matcher(size)
        save_file(net.state_dict(), out / "matcher.safetensors")
        (out / "info.json").write_text(json.dumps(info, indent=1))
        print(f"[shapes] scene_match reward: accuracy {info['accuracy']:.3f} on fresh pairs ({info['seconds']:.0f} s)")
    key = digits.cache_key("matcher", MATCHER_TRAIN, VOCAB, size, SCENES_CODE)
    return digits.cached(digits.cache_dir() / f"scene_match{size}-{key}", build,
                         f"training the scene_match reward at {size}x{size}")


def load_matcher(size: int = SIZE) -> Matcher:
    net = Matcher()
    net.load_state_dict(load_file(matcher_dir(size) / "matcher.safetensors"))
    return net.eval().requires_grad_(False)
