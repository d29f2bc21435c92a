"""A real reward model's sensitivity to residual-noise-sized noise: the OCR reward (rewards.ocr, RapidOCR's PP-OCR
models on the CPU), the one reward of the paper that runs here (docs/STUDY.md, "The mechanism as a number").

    python -m tools.ocr_noise --groups 48          # -> the table on stdout (tools.bench --only ocr: into the report)

Groups like GRPO's: per OCR prompt of the project's generated set (`prompts.load("ocr", "test")`), G = 8 renders of
its quoted text whose legibility varies (`render`), so the group's rewards differ; then Gaussian noise of each std in
the images' [-1, 1] units (std / 2 in [0, 1] pixels, clamped as a decoded image is). Measured: the mean OCR score, and
the within-group Kendall tau-b between the clean and the noisy rewards (the estimator of tools/mechanism.py: mean over
groups where both vary, the others counted, 95% bootstrap interval). A proxy: a real sampler's residual noise lives in
the VAE's latent space and reaches the pixels through the decoder, which shapes it (spatially correlated, not i.i.d.
per pixel), so pixel noise of a given std is not the pixel image of latent noise of that std.
"""
from __future__ import annotations

import argparse
import random
import string
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from scipy import stats
from tqdm.auto import tqdm

from flow_cps import prompts
from rewards import REGISTRY, ocr_target
from tools.mechanism import GROUP_SIZE, distortion

SIGMAS = [0.05, 0.1, 0.2, 0.3, 0.5]  # the residual noise the SDE samplers leave (report section 5), and beyond
SIZE = 256  # pixels per side: the paper trains at 512; 256 halves the OCR's time (rewards.ocr's docstring)
SEED = 7001


def render(text: str, size: int, rng: random.Random) -> np.ndarray:
    """One sign (3, size, size) in [0, 1]: dark text on a light background, centred, with legibility drawn at random
    so that a group's members read differently:
      * font height uniform from 2.5% of the side to the largest that fits the text on one line (about 6-40 px at
        256 px; small text is hard for the detector);
      * contrast: text grey level uniform in [0, 0.55], background in [0.75, 1];
      * with probability 1/2, a Gaussian blur of radius uniform in [0, 1.6] px;
      * with probability 1/4, a typo: one letter replaced by another (the reward then tops out at 1 - 1/len);
      * with probability 1/4, an occlusion: a background-coloured bar over 15-40% of the text's width.
    """
    chars = list(text)
    if rng.random() < 0.25:
        k = rng.choice([i for i, c in enumerate(chars) if c.isalpha()])
        chars[k] = rng.choice([c for c in string.ascii_uppercase if c != chars[k].upper()])
        chars[k] = chars[k] if text[k].isupper() else chars[k].lower()
    shown = "".join(chars)
    fit = max(int(0.025 * size), 1)
    while fit < size and ImageFont.load_default(size=fit + 1).getlength(shown) < 0.92 * size:
        fit += 1
    font = ImageFont.load_default(size=rng.randint(int(0.025 * size), max(fit, int(0.025 * size))))
    bg, ink = int(255 * rng.uniform(0.75, 1.0)), int(255 * rng.uniform(0.0, 0.55))
    im = Image.new("RGB", (size, size), (bg, bg, bg))
    draw = ImageDraw.Draw(im)
    x0, y0, x1, y1 = draw.textbbox((0, 0), shown, font=font)
    left, top = (size - (x1 - x0)) / 2 - x0, (size - (y1 - y0)) / 2 - y0
    draw.text((left, top), shown, fill=(ink, ink, ink), font=font)
    if rng.random() < 0.25:
        w = (x1 - x0) * rng.uniform(0.15, 0.4)
        start = left + x0 + rng.uniform(0, (x1 - x0) - w)
        draw.rectangle([start, top + y0 - 2, start + w, top + y1 + 2], fill=(bg, bg, bg))
    if rng.random() < 0.5:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.6)))
    return np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255


def groups(n: int, size: int = SIZE, seed: int = SEED) -> tuple[torch.Tensor, list[str]]:
    """n groups of G renders: images (n G, 3, size, size) and their prompts (each prompt G times)."""
    texts = prompts.load("ocr", "test")[0][:n]
    rng = random.Random(seed)
    images = [render(ocr_target(t), size, rng) for t in texts for _ in range(GROUP_SIZE)]
    return torch.tensor(np.stack(images)), [t for t in texts for _ in range(GROUP_SIZE)]


@torch.no_grad()
def sensitivity(n_groups: int, sigmas: list[float] = SIGMAS, size: int = SIZE, seed: int = SEED) -> dict:
    """Per noise std: the mean OCR score (95% t-interval over groups of the group means) and tau-b(clean, noisy)."""
    images, texts = groups(n_groups, size, seed)
    ocr = REGISTRY["ocr"]()
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    scores = {}
    for sigma in tqdm([0.0, *sigmas], desc="ocr noise"):
        noisy = (images + sigma / 2 * torch.randn(images.shape, generator=g)).clamp(0, 1) if sigma else images
        scores[sigma] = ocr(noisy, texts).numpy().reshape(n_groups, GROUP_SIZE)
    clean, rows = scores[0.0], {}
    for sigma, s in scores.items():
        means = s.mean(1)
        half = float(stats.t.ppf(0.975, n_groups - 1) * means.std(ddof=1) / np.sqrt(n_groups))
        rows[str(sigma)] = dict(score=float(means.mean()), lo=float(means.mean()) - half,
                                hi=float(means.mean()) + half, exact=float((s == 1).mean()),
                                tau=distortion(list(clean), list(s)))
    return dict(groups=n_groups, group_size=GROUP_SIZE, size=size, seed=seed, rows=rows,
                seconds=time.perf_counter() - t0, images=len(texts) * len(scores))


def figure(res: dict, path) -> None:
    """The mean OCR score and tau-b(clean, noisy) against the noise std, with 95% intervals."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sig = [float(s) for s in res["rows"]]
    rows = list(res["rows"].values())
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, get in (("mean OCR score", lambda r: (r["score"], r["lo"], r["hi"])),
                       ("τ-b(clean, noisy) within groups",
                        lambda r: (r["tau"]["mean"], r["tau"]["lo"], r["tau"]["hi"]))):
        m, lo, hi = map(np.array, zip(*map(get, rows)))
        ax.errorbar(sig, m, yerr=[m - lo, hi - m], marker="o", capsize=3, label=label)
    ax.set_xlabel("added pixel noise std, image units [-1, 1]\n(a proxy: real residual noise is latent, decoded)")
    ax.set_title(f"OCR reward (RapidOCR) on {res['size']} px signs, {res['groups']} groups of {res['group_size']}")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=48)
    ap.add_argument("--size", type=int, default=SIZE)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = sensitivity(args.groups, size=args.size)
    for s, r in res["rows"].items():
        t = r["tau"]
        print(f"std {s:>4}: OCR {r['score']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]  tau-b {t['mean']:.3f} "
              f"[{t['lo']:.3f}, {t['hi']:.3f}] (n {t['n']} of {t['groups']})")
    return res


if __name__ == "__main__":
    main()
