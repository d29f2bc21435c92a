"""Run outputs: JSONL + TensorBoard metrics, image grids and the reward-curve figure (rank 0 only)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from torch import Tensor

from flow_cps.clip import to_uint8


def image_grid(images: Tensor, rows: int, path: str | Path, min_side: int = 64) -> Path:
    """Save images (B, C, H, W) in [0, 1] as a rows x ceil(B/rows) grid PNG; tiny images are upscaled (nearest) so
    residual noise stays visible pixel by pixel."""
    from PIL import Image

    b, _, h, w = images.shape
    cols = math.ceil(b / rows)
    up = max(1, min_side // max(h, w))
    pad = max(1, up // 4)
    canvas = np.full((rows * (h * up + pad) + pad, cols * (w * up + pad) + pad, 3), 255, np.uint8)
    arr = to_uint8(images).repeat(up, 1).repeat(up, 2)  # (B, H, W, C); one channel broadcasts to grey
    for i in range(b):
        r, q = divmod(i, cols)
        y, x = pad + r * (h * up + pad), pad + q * (w * up + pad)
        canvas[y:y + h * up, x:x + w * up] = arr[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


def strict(row: dict) -> dict:
    """NaN and infinities as null: metrics.jsonl is strict JSON (a NaN literal breaks most parsers)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


class Logger:
    """metrics.jsonl (one strict-JSON object per iteration) and TensorBoard scalars, on rank 0.

    The logs are the run: a fresh run starts them empty; a resumed run rewrites metrics.jsonl to the checkpoint's
    history and has TensorBoard drop every event after the checkpoint (purge_step), so iterations that a killed run
    logged past its last checkpoint are not shown twice."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool = True, history: list[dict] = ()):
        self.enabled, self.path, self.tb = enabled, out_dir / "metrics.jsonl", None
        if not enabled:
            return
        self.path.write_text("".join(json.dumps(strict(h), allow_nan=False) + "\n" for h in history))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"),
                                    purge_step=history[-1]["iteration"] + 1 if history else None)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(strict(row), allow_nan=False) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "iteration" and math.isfinite(v):
                    self.tb.add_scalar(k, v, row["iteration"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def reward_curves(history: list[dict], path: str | Path, title: str) -> Path:
    """Training reward (stochastic rollouts) and held-out ODE metrics versus iteration, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["iteration"], h["reward"]) for h in history if "reward" in h]
    evals = [h for h in history if any(k.startswith("eval/") for k in h)]
    keys = sorted({k for h in evals for k in h if k.startswith("eval/")})
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4 * (1 + len(keys)), 3.2), squeeze=False)
    if train:
        axes[0, 0].plot(*zip(*train), lw=1)
    axes[0, 0].set(title="training reward (rollouts)", xlabel="iteration")
    for ax, k in zip(axes[0, 1:], keys):
        ax.plot([h["iteration"] for h in evals if k in h], [h[k] for h in evals if k in h], "o-")
        ax.set(title=f"held-out {k.removeprefix('eval/')} (ODE)", xlabel="iteration")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
