"""How long to pre-train the shapes model so that its judge can see it (docs/STUDY.md, "A shapes base model its judge
can see"): one long pre-training at the recipe's constant lr, with the judge measured every `every` steps.

    python -m tools.shapes_pilot --steps 10000 --every 1000             # the curve -> results/shapes_pilot.json
    python -m tools.shapes_pilot --steps 10000 --every 1000 --install 6000   # and cache the 6000-step model

At a constant lr the first k steps of a long run are exactly the k-step pre-training (the same batches, noises and
updates; tests/test_shapes.py checks a snapshot against a k-step build bit for bit), so one run gives every
candidate's judge, and `--install k` puts snapshot k where `shapes.model_dir` looks for a k-step model (with the
info.json a k-step build writes), instead of pre-training it again. Set shapes.PRETRAIN_STEPS[16] = k to use it.
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


def install(snapshots: Path, k: int, size: int = shapes.SIZE) -> Path:
    """Copy snapshot k to the cache folder of the k-step model (shapes.model_path)."""
    dest = shapes.model_path(size, k)
    if not (dest / "info.json").exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(snapshots / f"step_{k}", dest)
    return dest


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--snapshots", default="runs/shapes_pilot", help="where the snapshots go (not committed)")
    ap.add_argument("--out", default=str(ROOT / "results" / "shapes_pilot.json"))
    ap.add_argument("--install", type=int, default=0, help="cache this step's snapshot as the k-step model")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    snapshots = Path(args.snapshots)
    res = pilot(args.steps, args.every, snapshots)
    Path(args.out).write_text(json.dumps(res, indent=1))
    if args.install:
        print(f"installed {install(snapshots, args.install)}")


if __name__ == "__main__":
    main()
