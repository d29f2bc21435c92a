"""What residual noise does to each task's reward, and how much of it each sampler leaves (bench.py's 'noise'):

    reward_response(task, size, sigmas)   the reward, the judge and the quality measure of clean held-out images
                                          and of the same images plus Gaussian noise of each std
    residual_by_eta(task, size, etas)     the residual noise of the base model's final training samples, per sampler
                                          and eta

Noise stds are in latent units (images x 2 - 1), the units of the residual noise the samplers leave (study.residual),
so the two tables read together: a sampler that leaves 0.2 shows its reward the 0.2 row.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from flow_cps import digits, models, prompts, scenes, scoring
from tools import study


def clean_images(task: study.Task, size: int, n: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Held-out images that are exactly right: the digits' test quarter, or renders of the held-out scenes."""
    if task.name == "digits":
        images, labels = digits.load("test")
        return images[:n], [f"a handwritten digit {int(d)}" for d in labels[:n]]
    texts = (prompts.load("shapes", "test")[0] * n)[:n]
    rng = random.Random(seed)
    arr = np.stack([scenes.render(scenes.layout(scenes.parse(t), size, rng), size) for t in texts])
    return torch.tensor(arr, dtype=torch.float32), texts


@torch.no_grad()
def reward_response(task: study.Task, size: int, sigmas: list[float], n: int = 240, seed: int = 0) -> dict:
    """{sigma: {reward, judge, quality: mean score; effect: the reward's drop from clean in standard deviations of
    the clean images' reward}} for clean images plus N(0, sigma^2) noise in latent units (sigma / 2 in pixels),
    clamped to [0, 1] as a decoded image is."""
    images, texts = clean_images(task, size, n, seed)
    metrics = {k: scoring.RewardModel(name) for k, name in (("reward", task.reward), ("judge", task.judge),
                                                             ("quality", task.quality))}
    g = torch.Generator().manual_seed(seed)
    out, clean = {}, None
    for sigma in [0.0, *sigmas]:
        noisy = (images + sigma / 2 * torch.randn(images.shape, generator=g)).clamp(0, 1)
        scores = {k: m(noisy, texts).total for k, m in metrics.items()}
        clean = clean if clean is not None else scores["reward"]
        out[str(sigma)] = {k: float(v.mean()) for k, v in scores.items()}
        out[str(sigma)]["effect"] = float((clean.mean() - scores["reward"].mean()) / clean.std())
    return dict(size=size, images=n, rows=out)


@torch.no_grad()
def residual_by_eta(task: study.Task, size: int, etas: dict[str, list[float]], n: int = 64, seed: int = 7) -> dict:
    """{sampler: {eta: residual noise}} of the base model's final training samples (10 steps, fixed noises)."""
    bb = models.load_builtin_backbone(task.name, resolution=size)
    texts = prompts.load(task.name, "train")[0][:n]
    return {s: {str(e): study.residual(study.quiet(study.sample, bb, texts, s, e, seed)) for e in es}
            for s, es in etas.items()}
