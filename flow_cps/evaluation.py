"""The held-out evaluation around train.evaluate: which (noise, prompt) samples each rank evaluates, the streamed sums
of their scores, the image grid, and the one collective that ends an evaluation.

    held_out = HeldOut(texts, meta, metrics, steps=40, per_prompt=20, micro_batch=8, rank=rank, world=world)
    sums = held_out.sums()
    for pairs in held_out.batches():            # this rank's (noise k, prompt p) pairs, a micro-batch at a time
        sums.add(pairs, images)                 # their ODE samples' images
    evaluation = sums.result()                  # the world's metrics on every rank, the grid's images on rank 0
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flow_cps import distributed, scoring


@dataclass
class Evaluation:
    """The held-out metrics {name: value} and, on rank 0, the grid's images: the first GRID noises (rows) x the first
    GRID prompts (`columns`), noise-major, gathered from the ranks that sampled them."""
    GRID = 10  # at most 10 x 10 evaluation images are drawn
    metrics: dict[str, float]
    images: list[Tensor]
    columns: int


def slots(n_prompts: int, per_prompt: int, rank: int, world: int, pad: bool) -> tuple[list[tuple[int, int]], int]:
    """This rank's (noise k, prompt p) pairs, a contiguous share of the noise-major order, and how many are real:
    under FSDP2 (`pad`) forwards are collectives, so every rank runs as many (repeating the last pair). With fewer
    pairs per rank than prompts, the grid's pairs lie on several ranks: `Sums.result` gathers them on rank 0."""
    order = [(k, p) for k in range(per_prompt) for p in range(n_prompts)]
    per = math.ceil(len(order) / world)
    mine = order[rank * per:(rank + 1) * per]
    return mine + [order[-1]] * (per - len(mine) if pad else 0), len(mine)


@dataclass(frozen=True)
class HeldOut:
    """A run's held-out evaluation: the prompts and their metadata, the metrics, the ODE's steps, the fixed noises per
    prompt, the samples per forward, the evaluation guidance (-1: the run's), and this rank's place in the world
    (pad: FSDP2, every rank runs as many forwards)."""
    texts: list[str]
    meta: list
    metrics: scoring.RewardModel
    steps: int
    per_prompt: int
    micro_batch: int
    guidance: float = -1.0
    rank: int = 0
    world: int = 1
    pad: bool = False

    def slots(self) -> tuple[list[tuple[int, int]], int]:
        return slots(len(self.texts), self.per_prompt, self.rank, self.world, self.pad)

    def batches(self):
        """This rank's (noise k, prompt p) pairs, `micro_batch` at a time."""
        mine, _ = self.slots()
        for i in range(0, len(mine), self.micro_batch):
            yield mine[i:i + self.micro_batch]

    def sums(self) -> Sums:
        return Sums(self)


class Sums:
    """One evaluation on this rank, streamed: the sums of its real samples' scores (scoring.GroupedSums), the first
    reward error (after it the forwards go on unscored: FSDP2's are collectives), the grid's images, and whether every
    image was finite."""

    def __init__(self, held_out: HeldOut):
        self.held_out, self.sums, self.error, self.finite = held_out, scoring.GroupedSums(), None, True
        self.grid: list[tuple[int, int, Tensor]] = []  # (noise k, prompt p, image) of the grid's pairs
        self.seen, self.real = 0, held_out.slots()[1]
        self.before = dict(held_out.metrics.failures)

    def add(self, pairs: list[tuple[int, int]], images: Tensor) -> None:
        """The images of these (noise k, prompt p) pairs (`HeldOut.batches`, in order)."""
        h = self.held_out
        real = [j for j in range(len(pairs)) if self.seen + j < self.real]  # the rest is FSDP2's padding
        self.seen += len(pairs)
        self.finite &= bool(torch.isfinite(images[real]).all())
        if self.error is None and real:
            try:
                self.sums.add(h.metrics, images[real], [h.texts[pairs[j][1]] for j in real],
                              [h.meta[pairs[j][1]] for j in real])
            except scoring.RewardError as e:
                self.error = str(e)
        self.grid += [(*pairs[j], images[j].cpu()) for j in real
                      if pairs[j][0] < Evaluation.GRID and pairs[j][1] < Evaluation.GRID]

    def result(self) -> Evaluation:
        """The world's metrics (scoring.gather: one collective; NaN if this rank's images were not finite) and, on
        rank 0, the grid's images from every rank, in (noise, prompt) order."""
        h = self.held_out
        means = scoring.GroupedSums.means(scoring.gather(h.metrics, self.before, self.error, self.sums))
        parts = distributed.gather_to_rank_zero(self.grid)
        images = [x for _, _, x in sorted((g for part in parts or [] for g in part), key=lambda g: g[:2])]
        if not self.finite:
            print(f"rank {h.rank}: evaluation images are not finite (the model diverged): metrics reported as NaN")
        return Evaluation(metrics={k: v if self.finite else math.nan for k, v in means.items()}, images=images,
                          columns=min(Evaluation.GRID, len(h.texts)))
