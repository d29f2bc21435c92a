"""Run outputs (rank 0 only): metrics.jsonl, image grids, TensorBoard or Weights & Biases, the reward-curve figure.
Written through the run folder's descriptor (folder.Folder): replaced atomically, never through a link, and never
into a subfolder swapped in after the run opened it."""
from __future__ import annotations

import io
import json
import math
import os
import secrets
from pathlib import Path

import numpy as np
from torch import Tensor

from flow_cps.clip import to_uint8
from flow_cps.folder import Folder


def image_grid(images: Tensor, rows: int, min_side: int = 64, row_labels: list[str] = (),
               col_labels: list[str] = ()) -> np.ndarray:
    """Images (B, C, H, W) in [0, 1] as one rows x ceil(B/rows) grid, (H, W, 3) uint8, rows and columns labelled in
    the margins; tiny images are upscaled (nearest) so residual noise stays visible pixel by pixel."""
    from PIL import Image, ImageDraw, ImageFont

    b, _, h, w = images.shape
    cols = math.ceil(b / rows)
    up = max(1, min_side // max(h, w))
    pad = max(1, up // 4)
    cell_w, cell_h = w * up + pad, h * up + pad
    font = ImageFont.load_default(size=10)
    col_text = [_wrap(t, font, cell_w - 2) for t in col_labels[:cols]]
    row_text = [_wrap(t, font, 110) for t in row_labels[:rows]]
    top = max((12 * len(t.splitlines()) + 4 for t in col_text), default=0)
    left = max((int(font.getlength(line)) + 6 for t in row_text for line in t.splitlines()), default=0)
    canvas = np.full((top + rows * cell_h + pad, left + cols * cell_w + pad, 3), 255, np.uint8)
    arr = to_uint8(images).repeat(up, 1).repeat(up, 2)  # (B, H, W, C); one channel broadcasts to grey
    for i in range(b):
        r, q = divmod(i, cols)
        y, x = top + pad + r * cell_h, left + pad + q * cell_w
        canvas[y:y + h * up, x:x + w * up] = arr[i]
    if not (col_text or row_text):
        return canvas
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for q, t in enumerate(col_text):
        draw.multiline_text((left + pad + q * cell_w, 2), t, fill=(0, 0, 0), font=font, spacing=2)
    for r, t in enumerate(row_text):
        draw.multiline_text((3, top + pad + r * cell_h), t, fill=(0, 0, 0), font=font, spacing=2)
    return np.asarray(image)


def _wrap(text: str, font, width: int) -> str:
    """Greedy word wrap of `text` to lines at most `width` pixels wide in `font`."""
    lines = [""]
    for word in text.split():
        trial = f"{lines[-1]} {word}".strip()
        if font.getlength(trial) <= width or not lines[-1]:
            lines[-1] = trial
        else:
            lines.append(word)
    return "\n".join(lines)


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
    shown twice. The image grids the killed run wrote stay as files, and are not replayed.

    `out` is the run folder, held (checkpoints.RunFolder.dir) or by path. TensorBoard writes into the held
    tensorboard/ (its /proc/self/fd path) under a file name with a random part, so no link can be planted at it; W&B
    writes wandb/ by name from its own service process (docs/RUN_FOLDER.md)."""

    def __init__(self, out: Path | Folder, enabled: bool, report_to: str = "tensorboard", history: list[dict] = (),
                 config: dict | None = None):
        self.enabled, self.tb, self.wandb, self.fd, self.dir, self._own = enabled, None, None, None, None, False
        if not enabled:
            return
        self.dir, self._own = (out, False) if isinstance(out, Folder) else (Folder.open(out), True)
        out_dir = Path(self.dir.where)
        self.dir.write("metrics.jsonl", "".join(json.dumps(strict(h), allow_nan=False) + "\n" for h in history))
        self.fd = self.dir.append("metrics.jsonl")  # rows go to this file, whatever is later put at its name
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(self.dir.child("tensorboard", create=True).path,
                                    purge_step=history[-1]["iteration"] + 1 if history else None,
                                    filename_suffix="." + secrets.token_hex(4))
        elif report_to == "wandb":
            import wandb

            self.dir.child("wandb", create=True)  # a link there stops the run; W&B itself goes by name
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

    def image(self, tag: str, images: Tensor, rows: int, iteration: int, row_labels: list[str] = (),
              col_labels: list[str] = ()) -> None:
        """A grid of images (B, C, H, W) in [0, 1], `rows` rows, labelled: images/<tag>_<iteration>.png, and the same
        grid under `tag` in TensorBoard / W&B."""
        if not self.enabled:
            return
        from PIL import Image

        grid = image_grid(images, rows, row_labels=row_labels, col_labels=col_labels)
        png = io.BytesIO()
        Image.fromarray(grid).save(png, format="PNG")
        self.dir.child("images", create=True).write(f"{tag}_{iteration:05d}.png", png.getvalue())
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
        if self._own:
            self.dir.close()
            self._own = False


def reward_curves(history: list[dict], title: str) -> bytes:
    """Training reward (stochastic rollouts) and held-out ODE metrics versus iteration, one panel each: a PNG."""
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
    return png.getvalue()
