"""The study's figures, every axis, row and column labelled from the run's settings (never typed in):

    convergence(design, records, path)   the judge on held-out prompts vs iteration, mean and 95% band over seeds
    figure1(task, ...)         the paper's Figure 1: final training samples of one trained model, one row per sampler
                               at its eta, one column per prompt; the residual noise of each row
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from tools import report, study


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def convergence(d: study.Design, records: dict[str, dict], path: Path) -> Path:
    """The judge on the held-out prompts vs iteration for every group whose seeds have all finished, mean and 95%
    t-band over the seeds."""
    plt = _plt()
    task = d.task
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for g in d.groups:
        rs = [records.get(f"{task.name}/{g.slug}/seed{k}") for k in d.seeds]
        if not all(rs):
            continue
        its = study.curve(rs[0], task.judge)[0]
        curves = np.array([study.curve(r, task.judge)[1] for r in rs])
        mean, n = curves.mean(0), len(curves)
        half = stats.t.ppf(0.975, n - 1) * curves.std(0, ddof=1) / math.sqrt(n) if n > 1 else 0 * mean
        ax.plot(its, mean, marker="o", ms=3, label=g.label)
        ax.fill_between(its, mean - half, mean + half, alpha=0.12)
    images = task.eval_prompts * d.eval_per_prompt
    ax.set(xlabel=f"GRPO iteration ({study.SAMPLES_PER_ITERATION} training samples each)",
           ylabel=f"held-out {task.judge} ({images} ODE images)",
           title=f"{task.name}: seeds {d.seeds[0]}–{d.seeds[-1]} (n = {len(d.seeds)}), mean and 95% band")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.no_grad()
def figure1(task: study.Task, run_dir: Path, etas: dict[str, float], path: Path, seed: int = 2024) -> dict:
    """The paper's Figure 1 from a trained model: the same prompts and initial noises, the final training sample of
    the ODE and of each SDE at its eta (all with one model, so only the sampler differs). Rows are labelled by
    sampler and eta, columns by prompt; returns each row's residual noise."""
    plt = _plt()
    bb = study.trained_backbone(task, run_dir)
    texts = list(task.figure_prompts)
    rows, residual = {}, {}
    for sampler in ["ode", *study.SDE]:
        traj = study.quiet(study.sample, bb, texts, sampler, etas.get(sampler, 0.0), seed)
        rows[sampler] = bb.decode(traj.final).permute(0, 2, 3, 1).numpy()
        residual[sampler] = study.residual(traj)
    n, size = len(texts), rows["ode"].shape[1]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.5 * n, 1.55 * len(rows) + 0.4), squeeze=False)
    for r, (sampler, images) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r, c]
            img = images[c]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(texts[c].replace(" left of", "\nleft of").replace(" above", "\nabove")
                             .replace(" and", "\nand"), fontsize=7)
            if c == 0:
                eta = "" if sampler == "ode" else f" η {etas[sampler]:g}"
                ax.set_ylabel(f"{report.NAMES[sampler]}{eta}\nresidual {residual[sampler]:.3f}", fontsize=7)
    fig.suptitle(f"{task.name}, {size}×{size}: final training samples of one CPS-trained model, the same prompts "
                 "and initial noises; rows: sampler", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return residual
