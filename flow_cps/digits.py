"""The built-in task: a tiny FLUX transformer that draws scikit-learn's 8x8 handwritten digits.

Everything a newcomer needs to see GRPO work on a laptop, with no download: the data (1,797 bundled images), the
prompts ("a handwritten digit 7"), a learned one-token prompt encoder standing in for CLIP+T5, the flow-matching
pre-training of a real diffusers `FluxTransformer2DModel` (deliberately stopped early so RL has headroom), and the
judge classifier behind the `digit_judge` reward. Both are trained on first use and cached on disk (cache.py: built
atomically, checked against its manifest on every use); later runs load the model with the same `from_pretrained`
code that loads FLUX.1. The pre-training drives the transformer through the backbone it is given
(models.digits_backbone), the same one GRPO uses.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flow_cps import cache
from sampling import rollout

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Training prompts use several phrasings, evaluation another; PromptEncoder reads only the digit, so every phrasing of a
# digit conditions alike: the held-out part of this task is the noises, the ODE sampler and the EMA weights.
TRAIN_TEMPLATES = ["a handwritten digit {d}", "the number {w}, written by hand", "a scanned digit {d}",
                   "handwritten {w}"]
EVAL_TEMPLATE = "an image of the digit {d}"
SIZE = 8  # pixels per side
EMBED_DIM = 32  # width of the prompt embedding (= FLUX joint_attention_dim and pooled_projection_dim)

# A FLUX.1 transformer scaled down to ~0.46 M parameters. patch_size=1 and in_channels=4 because pixels are 2x2-packed
# into 4-channel tokens exactly as FLUX packs its 16-channel VAE latents into 64-channel tokens.
TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                          num_attention_heads=4, joint_attention_dim=EMBED_DIM, pooled_projection_dim=EMBED_DIM,
                          guidance_embeds=False, axes_dims_rope=(4, 6, 6))
PRETRAIN = dict(batch=128, lr=1e-3, seed=0)
# Stopped early on purpose so RL has headroom (10-step ODE judge accuracy at pre-training 0.820). The digits exist at
# 8x8 only: larger images would be upsamples holding no more information (the shapes task renders natively).
PRETRAIN_STEPS = {8: 150}


def prompts(split: str = "train") -> list[str]:
    """All prompts of a split: 40 training phrasings (4 templates x 10 digits) or the 10 held-out eval prompts."""
    if split == "train":
        return [tpl.format(d=d, w=WORDS[d]) for tpl in TRAIN_TEMPLATES for d in range(10)]
    if split == "test":
        return [EVAL_TEMPLATE.format(d=d) for d in range(10)]
    raise ValueError(f"unknown prompt split {split!r}; use 'train' or 'test'.")


def parse_digit(prompt: str) -> int:
    """The digit a prompt asks for: the first standalone digit character or digit word ('7' or 'seven')."""
    m = re.search(r"\b(\d|" + "|".join(WORDS) + r")\b", prompt.lower())
    if m is None:
        raise ValueError(f"prompt {prompt!r} names no digit; the digits task needs e.g. 'a handwritten digit 7'.")
    tok = m.group(1)
    return int(tok) if tok.isdigit() else WORDS.index(tok)


def load(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 8, 8) in [0, 1] and labels (N,); a fixed stratified 75/25 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx_train, idx_test = train_test_split(np.arange(len(d.target)), test_size=0.25, random_state=0,
                                           stratify=d.target)
    idx = {"train": idx_train, "test": idx_test}[split]
    return torch.tensor(d.images[idx] / 16.0, dtype=torch.float32)[:, None], torch.tensor(d.target[idx])


class PromptEncoder(nn.Module):
    """Stands in for FLUX's CLIP (pooled) + T5 (sequence) encoders: one learned token per digit.

    Returns what `FluxPipeline.encode_prompt` returns: (prompt_embeds (B, 1, D), pooled (B, D), text_ids (1, 3)).
    """

    def __init__(self, dim: int = EMBED_DIM):
        super().__init__()
        self.table = nn.Embedding(10, dim)

    def forward(self, prompts: list[str]):
        e = self.table(torch.tensor([parse_digit(p) for p in prompts], device=self.table.weight.device))
        return e[:, None], e, torch.zeros(1, 3, device=e.device)


class Judge(nn.Module):
    """A small MLP digit classifier on [0, 1] images (B, 1, 8, 8); logits over the 10 digits."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.GELU(), nn.Dropout(0.2), nn.Linear(256, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (SIZE, SIZE):  # larger renders are judged at the data's resolution
            images = nn.functional.adaptive_avg_pool2d(images, SIZE)
        return self.net(images.float().mean(1, keepdim=True))


@torch.enable_grad()  # a first use may come from inside a caller's no_grad (a reward, an evaluation)
def train_judge(seed: int = 0, epochs: int = 300) -> tuple[Judge, float]:
    """Full-batch AdamW with light pixel noise for robustness; returns the judge and its held-out accuracy."""
    torch.manual_seed(seed)
    (x, y), (xt, yt) = load("train"), load("test")
    judge, g = Judge(), torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(judge.parameters(), lr=3e-3, weight_decay=1e-2)
    for _ in range(epochs):
        noisy = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
        loss = nn.functional.cross_entropy(judge(noisy), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    judge.eval().requires_grad_(False)
    with torch.no_grad():
        acc = float((judge(xt).argmax(1) == yt).float().mean())
    return judge, acc


def svm_features(images: torch.Tensor) -> np.ndarray:
    """Images (B, C, H, W) in [0, 1] as the SVM reads them: grey, at the data's 8x8, on scikit-learn's 0-16 scale."""
    grey = images.detach().float().mean(1, keepdim=True).cpu()
    if grey.shape[-2:] != (SIZE, SIZE):
        grey = nn.functional.adaptive_avg_pool2d(grey, SIZE)
    return (grey.flatten(1) * 16).numpy()


def train_svm():
    """The independent judge (rewards.digit_svm_accuracy): an RBF support-vector classifier fitted on the test
    quarter of the data, which the Judge MLP (the reward) never saw; accuracy 0.98 on the MLP's training part
    (tests/test_shapes.py). Deterministic and ~0.1 s, so it is fitted on use rather than cached."""
    from sklearn.svm import SVC

    images, labels = load("test")
    return SVC(C=10.0, gamma="scale").fit(svm_features(images), labels.numpy())


@torch.enable_grad()  # a first use may come from inside a caller's no_grad (an evaluation, a figure)
def flow_matching(backbone, params, batch, steps: int, *, lr: float, seed: int, progress: bool = True,
                  on_step=None, decay: bool = False) -> float:
    """Pre-train a built-in model by flow matching (AdamW, logit-normal t as in SD3's recipe): each step draws
    `batch(g) -> (x0 latents, prompts)` and regresses v_theta(x_t, t, c) on v = eps - x0 at x_t = (1-t) x0 + t eps.
    Returns the seconds the steps took. on_step(k, seconds so far) runs after step k (a pilot's snapshots); its own
    time is not counted, and at a constant lr the first k steps of a longer run are exactly a k-step run. decay:
    the lr falls linearly from lr (step 1) to lr / steps (the last step), a cooldown."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr)
    t0 = time.time()
    elsewhere = 0.0  # seconds spent in on_step
    for k in tqdm(range(1, steps + 1), desc="pre-training", disable=not progress):
        x0, text = batch(g)
        t = torch.sigmoid(torch.randn(len(x0), generator=g))
        eps = torch.randn(x0.shape, generator=g)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        loss = (backbone.velocity(xt, t, backbone.encode(text, cache=False)) - (eps - x0)).pow(2).mean()
        if decay:
            opt.param_groups[0]["lr"] = lr * (steps - k + 1) / steps
        opt.zero_grad()
        loss.backward()
        opt.step()
        if on_step is not None:
            t1 = time.time()
            on_step(k, t1 - t0 - elsewhere)
            elsewhere += time.time() - t1
    return time.time() - t0 - elsewhere


def judge_dir() -> Path:
    """The cached judge (judge.safetensors, info.json), trained on first use (~1 s)."""
    def build(out: Path) -> None:
        judge, acc = train_judge()
        save_file(judge.state_dict(), out / "judge.safetensors")
        (out / "info.json").write_text(json.dumps(dict(judge_accuracy=acc), indent=1))
        print(f"[digits] judge held-out accuracy {acc:.4f}")
    key = cache.cache_key("judge", 300, 0)
    return cache.cached(cache.cache_dir() / f"judge-{key}", build, "training the digit judge")


def model_dir(make_backbone, progress: bool = True, size: int = SIZE) -> Path:
    """The cached digits model folder (transformer/, prompt_encoder.safetensors, info.json), pre-trained on first use
    through `make_backbone(transformer, prompt_encoder, size)` (models.digits_backbone)."""
    if size not in PRETRAIN_STEPS:
        raise ValueError(f"digits models exist at sizes {sorted(PRETRAIN_STEPS)}, not {size} (the shapes task renders "
                         f"natively at 16, 24 and 32: --preset shapes)")
    judge_dir()  # the pre-training reports its base accuracy with the judge
    key = cache.cache_key(TRANSFORMER_CONFIG, PRETRAIN, PRETRAIN_STEPS[size], EMBED_DIM, size)
    return cache.cached(cache.cache_dir() / f"digits-{key}", lambda out: _build(out, make_backbone, progress, size),
                        f"pre-training the tiny FLUX model ({PRETRAIN_STEPS[size]} steps, about 20 s)")


def _build(out: Path, make_backbone, progress: bool, size: int = SIZE) -> dict:
    from diffusers import FluxTransformer2DModel

    judge = load_judge()
    torch.manual_seed(PRETRAIN["seed"])
    transformer, encoder = FluxTransformer2DModel(**TRANSFORMER_CONFIG), PromptEncoder()
    backbone = make_backbone(transformer, encoder, size)
    images, labels = load("train")
    x0_all = backbone.encode_images(images)
    text = [TRAIN_TEMPLATES[0].format(d=int(d), w="") for d in labels]

    def batch(g):
        idx = torch.randint(0, len(x0_all), (PRETRAIN["batch"],), generator=g)
        return x0_all[idx], [text[i] for i in idx.tolist()]
    seconds = flow_matching(backbone, [*transformer.parameters(), *encoder.parameters()], batch, PRETRAIN_STEPS[size],
                            lr=PRETRAIN["lr"], seed=PRETRAIN["seed"], progress=progress)
    transformer.save_pretrained(out / "transformer")
    save_file(encoder.state_dict(), out / "prompt_encoder.safetensors")
    # the headroom figure: judge accuracy of 20 ODE samples per digit, 10 steps
    test = prompts("test") * 20
    with torch.no_grad():
        cond = backbone.encode(test, cache=False)
        x1 = torch.randn(len(test), *backbone.latent_shape, generator=torch.Generator().manual_seed(1))
        traj = rollout(lambda x, t: backbone.velocity(x, t, cond), x1, backbone.sigmas(10), "ode", 0.0)
        pred = judge(backbone.decode(traj.final)).argmax(1)
    base_acc = float((pred == torch.tensor([parse_digit(p) for p in test])).float().mean())
    info = dict(base_accuracy=base_acc, pretrain_seconds=seconds, size=size, steps=PRETRAIN_STEPS[size], **PRETRAIN)
    (out / "info.json").write_text(json.dumps(info, indent=1))
    print(f"[digits] base model ODE judge accuracy {base_acc:.3f}; pre-training took {seconds:.1f} s")
    return info


def load_judge(path: Path | None = None) -> Judge:
    judge = Judge()
    judge.load_state_dict(load_file((path or judge_dir()) / "judge.safetensors"))
    return judge.eval().requires_grad_(False)


def load_prompt_encoder(path: Path) -> PromptEncoder:
    enc = PromptEncoder()
    enc.load_state_dict(load_file(path / "prompt_encoder.safetensors"))
    return enc.eval().requires_grad_(False)
