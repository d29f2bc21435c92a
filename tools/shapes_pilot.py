"""How long to pre-train the shapes model so that its judge can see it (docs/STUDY.md, "A shapes base model its judge
can see"): one long pre-training at the recipe's constant lr, with the judge measured every `every` steps.

    python -m tools.shapes_pilot --steps 10000 --every 1000             # the curve -> results/shapes_pilot.json
    python -m tools.shapes_pilot --steps 10000 --every 1000 --install 6000   # and cache the 6000-step model
    python -m tools.shapes_pilot --cool 2000 --cooldown 500     # snapshot 2000 + a 500-step cooldown (shapes.cool)
    python -m tools.shapes_pilot --cool 2000 --cooldown 500 --install 2000  # ... and cache it

At a constant lr the first k steps of a long run are exactly the k-step pre-training (the same batches, noises and
updates; tests/test_shapes.py checks a snapshot against a k-step build bit for bit), so one run gives every
candidate's judge, and `--install k` puts snapshot k where `shapes.model_dir` looks for a k-step model (with the
info.json a k-step build writes), instead of pre-training it again. Set shapes.PRETRAIN_STEPS[16] = k to use it.
A cooldown (a fresh optimizer, shapes.cool) starts from a saved snapshot, so snapshot k + cooldown D is exactly the
model shapes.model_dir builds with PRETRAIN_STEPS = k and COOLDOWN_STEPS = D (tests/test_shapes.py checks that too).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from flow_cps import models, shapes

ROOT = Path(__file__).resolve().parent.parent


def pilot(steps: int, every: int, snapshots: Path, size: int = shapes.SIZE, per_tag: int = 64) -> dict:
    """Pre-train `steps` steps; every `every` steps save the model as a k-step build would (shapes.save_model) under
    snapshots/step_k and measure the judge on `per_tag` ODE samples per tag of each split (train: 4 tags; fresh and
    test: 3). Returns {"rows": [{step, seconds, train, fresh, test}], ...}."""
    rows = []

    def on_step(k, seconds, backbone, transformer, encoder):
        if k % every:
            return
        shapes.save_model(snapshots / f"step_{k}", backbone, transformer, encoder, seconds, size, k)
        row = dict(step=k, seconds=seconds, per_tag=per_tag,
                   **{split: shapes.judge_accuracy(backbone, split, per_tag=per_tag, seed=2)
                      for split in ("train", "fresh", "test")})
        rows.append(row)
        print(json.dumps(row), flush=True)
        (snapshots / "curve.json").write_text(json.dumps(rows, indent=1))
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        shapes._build(Path(tmp), models.shapes_backbone, True, size, steps, on_step)
    return dict(size=size, steps=steps, every=every, lr=shapes.PRETRAIN["lr"], batch=shapes.PRETRAIN["batch"],
                threads=torch.get_num_threads(), wall=time.time() - t0, rows=rows)


def load_snapshot(folder: Path, size: int = shapes.SIZE):
    """A saved model folder as trainable modules (transformer, encoder) and their backbone."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    encoder = shapes.load_prompt_encoder(folder).requires_grad_(True)
    return models.shapes_backbone(transformer, encoder, size), transformer, encoder


def cooldown(snapshots: Path, k: int, steps: int, size: int = shapes.SIZE, per_tag: int = 64) -> dict:
    """Snapshot k plus a `steps`-step cooldown, saved as snapshots/step_k+cool_steps with the judge as in `pilot`."""
    backbone, transformer, encoder = load_snapshot(snapshots / f"step_{k}", size)
    seconds = json.loads((snapshots / f"step_{k}" / "info.json").read_text())["pretrain_seconds"]
    seconds += shapes.cool(backbone, transformer, encoder, size, steps)
    shapes.save_model(snapshots / f"step_{k}+cool_{steps}", backbone, transformer, encoder, seconds, size, k, steps)
    return dict(step=k, cooldown=steps, seconds=seconds, per_tag=per_tag,
                **{split: shapes.judge_accuracy(backbone, split, per_tag=per_tag, seed=2)
                   for split in ("train", "fresh", "test")})


def install(snapshots: Path, k: int, size: int = shapes.SIZE, cool: int = 0) -> Path:
    """Copy snapshot k (with its cooldown) to the cache folder of that model (shapes.model_path)."""
    dest = shapes.model_path(size, k, cool)
    if not (dest / "info.json").exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(snapshots / (f"step_{k}" + (f"+cool_{cool}" if cool else "")), dest)
    return dest


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--snapshots", default="runs/shapes_pilot", help="where the snapshots go (not committed)")
    ap.add_argument("--out", default=str(ROOT / "results" / "shapes_pilot.json"))
    ap.add_argument("--install", type=int, default=0, help="cache this step's snapshot as the k-step model")
    ap.add_argument("--cool", type=int, default=0, help="instead of pre-training: cool snapshot k down")
    ap.add_argument("--cooldown", type=int, default=500, help="cooldown steps (with --cool)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    snapshots, out = Path(args.snapshots), Path(args.out)
    if args.cool:  # a cooldown row joins the pilot's record
        res = json.loads(out.read_text()) if out.exists() else {}
        res.setdefault("cooldowns", []).append(cooldown(snapshots, args.cool, args.cooldown))
        print(json.dumps(res["cooldowns"][-1]))
    else:
        res = pilot(args.steps, args.every, snapshots)
    out.write_text(json.dumps(res, indent=1))
    if args.install:
        print(f"installed {install(snapshots, args.install, cool=args.cooldown if args.cool else 0)}")


if __name__ == "__main__":
    main()
