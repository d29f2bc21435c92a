"""Run outputs (rank 0 only): metrics.jsonl, image grids, TensorBoard or Weights & Biases, the reward-curve figure.
Files are written as files.py writes them: replaced atomically, never through a link."""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
from torch import Tensor

from flow_cps import files
from flow_cps.clip import to_uint8


def image_grid(images: Tensor, rows: int, min_side: int = 64) -> np.ndarray:
    """Images (B, C, H, W) in [0, 1] as one rows x ceil(B/rows) grid, (H, W, 3) uint8; tiny images are upscaled
    (nearest) so residual noise stays visible pixel by pixel."""
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
    return canvas


def strict(row: dict) -> dict:
    """NaN and infinities as null: metrics.jsonl is strict JSON (a NaN literal breaks most parsers)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def scalars(row: dict) -> dict[str, float]:
    """What goes to TensorBoard / Weights & Biases: the finite numbers of a row, without the step itself."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "iteration" and math.isfinite(v)}


REPORT_TO = ("tensorboard", "wandb", "none")


class Logger:
    """A run's logs, on rank 0: metrics.jsonl (one strict-JSON object per iteration), the image grids under images/,
    and the same scalars and images in TensorBoard or Weights & Biases (`report_to`; wandb is imported only when
    chosen, and WANDB_MODE=offline works without a network).

    The logs are the run: a fresh run starts them empty; a resumed run rewrites metrics.jsonl to the checkpoint's
    history, has TensorBoard drop every event after the checkpoint (purge_step), and starts a new W&B run that
    replays the checkpoint's history; so iterations that a killed run logged past its last checkpoint are not
    shown twice. The image grids the killed run wrote stay as files, and are not replayed."""

    def __init__(self, out_dir: Path, enabled: bool, report_to: str = "tensorboard", history: list[dict] = (),
                 config: dict | None = None):
        self.enabled, self.path, self.images = enabled, out_dir / "metrics.jsonl", out_dir / "images"
        self.tb = self.wandb = self.fd = None
        if not enabled:
            return
        files.write_atomic(self.path, "".join(json.dumps(strict(h), allow_nan=False) + "\n" for h in history))
        self.fd = files.open_append(self.path)  # rows go to this file, whatever is later put at its name
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"),
                                    purge_step=history[-1]["iteration"] + 1 if history else None)
        elif report_to == "wandb":
            import wandb

            resumed = f" (resumed after iteration {history[-1]['iteration']})" if history else ""
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "flow_cps"), dir=str(out_dir),
                                    name=out_dir.name + resumed, config=config)
            for row in history:
                self.wandb.log(scalars(row), step=row["iteration"])

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        os.write(self.fd, (json.dumps(strict(row), allow_nan=False) + "\n").encode())
        if self.tb is not None:
            for k, v in scalars(row).items():
                self.tb.add_scalar(k, v, row["iteration"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars(row), step=row["iteration"])

    def image(self, tag: str, images: Tensor, rows: int, iteration: int) -> None:
        """A grid of images (B, C, H, W) in [0, 1], `rows` rows: images/<tag>_<iteration>.png, and the same grid
        under `tag` in TensorBoard / W&B."""
        if not self.enabled:
            return
        from PIL import Image

        grid = image_grid(images, rows)
        self.images.mkdir(parents=True, exist_ok=True)
        png = io.BytesIO()
        Image.fromarray(grid).save(png, format="PNG")
        files.write_atomic(self.images / f"{tag}_{iteration:05d}.png", png.getvalue())
        if self.tb is not None:
            self.tb.add_image(tag, grid, iteration, dataformats="HWC")
            self.tb.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(grid)}, step=iteration)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


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
    png = io.BytesIO()
    fig.savefig(png, dpi=110, format="png")
    plt.close(fig)
    return files.write_atomic(path, png.getvalue())
