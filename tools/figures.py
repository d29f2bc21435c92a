"""The study's figures, every axis, row and column labelled from the run's settings (never typed in):

    convergence(st, b, path)   the judge on held-out prompts vs iteration, mean and 95% band over report seeds
    dose_response(st, path)    CPS - Flow-SDE (judge AUC, 95% interval) against the number of image tokens
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


def convergence(st: dict, b: dict, path: Path) -> Path:
    """The judge on held-out prompts vs iteration for the main size's groups, mean and 95% t-band over seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for group, dirs in st["run_dirs"].items():
        if "@" in group:
            continue
        curves = np.array([study.curve(r, st["judge"])[1] for r in study.load_runs(dirs)])
        its = study.curve(study.load_runs(dirs[:1])[0], st["judge"])[0]
        mean, n = curves.mean(0), len(curves)
        half = stats.t.ppf(0.975, n - 1) * curves.std(0, ddof=1) / math.sqrt(n) if n > 1 else 0 * mean
        ax.plot(its, mean, marker="o", ms=3, label=report.group_name(group, st["tuned"]))
        ax.fill_between(its, mean - half, mean + half, alpha=0.12)
    images = st["eval_prompts"] * b["run"]["eval_per_prompt"]
    ax.set(xlabel=f"GRPO iteration ({study.SAMPLES_PER_ITERATION} training samples each)",
           ylabel=f"held-out {st['judge']} ({images} ODE images)",
           title=f"{st['task']}, {st['sizes'][0]}×{st['sizes'][0]}: report seeds {b['report_seeds'][0]}–"
                 f"{b['report_seeds'][-1]} (n = {len(b['report_seeds'])}), mean and 95% band")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def dose_response(st: dict, path: Path) -> Path:
    """CPS - Flow-SDE at their tuned eta, judge AUC with its 95% interval, against the image tokens per size."""
    plt = _plt()
    rows = [(st["sizes"][0], st["primary"]["auc"])] + [(s, st["secondary"][f"{study.PRIMARY[0]}, at {s}×{s}"])
                                                       for s in st["sizes"][1:]]
    tokens = np.array([(s // 2) ** 2 for s, _ in rows])
    y = np.array([d["diff"] for _, d in rows])
    err = np.array([[d["diff"] - d["lo"] for _, d in rows], [d["hi"] - d["diff"] for _, d in rows]])
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.errorbar(tokens, y, yerr=err, fmt="o-", capsize=4)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.minorticks_off()  # log-scale minor labels would overprint the sizes
    ax.set_xticks(tokens)
    ax.set_xticklabels([f"{s}×{s}\n{t} tokens" for (s, _), t in zip(rows, tokens)])
    ax.set(ylabel=f"CPS − Flow-SDE, {st['judge']} AUC", title=f"{st['task']}: the gap against the image size "
           "(each sampler at its tuned η, 95% interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.no_grad()
def figure1(task: study.Task, run_dir: str, size: int, etas: dict[str, float], path: Path, seed: int = 2024) -> dict:
    """The paper's Figure 1 from a trained model: the same prompts and initial noises, the final training sample of
    the ODE and of each SDE at its eta (all with one model, so only the sampler differs). Rows are labelled by
    sampler and eta, columns by prompt; returns each row's residual noise."""
    plt = _plt()
    bb = study.trained_backbone(task, run_dir, size)
    texts = list(task.figure_prompts)
    rows, residual = {}, {}
    for sampler in ["ode", *study.SDE]:
        traj = study.quiet(study.sample, bb, texts, sampler, etas.get(sampler, 0.0), seed)
        rows[sampler] = bb.decode(traj.final).permute(0, 2, 3, 1).numpy()
        residual[sampler] = study.residual(traj)
    n = len(texts)
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
