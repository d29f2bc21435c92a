"""The EMA of the trained weights: its schedule (a property of the preset, the same at any world size) and the average
itself, which owns its copy of the weights and swaps them in for evaluation and the `*_ema` exports."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from flow_cps.distributed import local_shard


@dataclass(frozen=True)
class EMASchedule:
    """When and how strongly the EMA follows the trained weights (§4 step 6): plain data, a property of the preset
    (what the paper's run did), the same at any world size.

    After optimizer step s the EMA is updated `updates_per_step` times in all, each time only if (s + 1) % interval
    == 0: e <- e + (1 - d_s)(w - e), d_s = decay, or with warm-up min((1 + s)/(10 + s), decay).

    Flow-GRPO (`EMAModuleWrapper(decay=0.9, update_step_interval=8)`, stepped after every training batch with
    s = the optimizer steps so far) is interval 8 with warm-up, and an optimizer step there closes a window of
    gradient-accumulation batches: the window's last batch sees the new step count n and new weights, its first
    updates_per_step - 1 batches still the previous n and weights. The paper's 32-GPU configs accumulate 2 batches
    per optimizer step for SD3.5 and 6 for FLUX.1; on 8 GPUs the same configs would give 8 and 24, so the count is
    taken from the paper's runs, not from this run's world size. The default (interval 1, one update, no warm-up)
    is the plain EMA, e <- e + (1 - decay)(w - e) after every optimizer step. plan.ema_words says it in words."""
    decay: float
    interval: int = 1
    updates_per_step: int = 1
    warmup: bool = False

    def decay_at(self, s: int) -> float:
        return min((1 + s) / (10 + s), self.decay) if self.warmup else self.decay


class EMA:
    """An exponential moving average of the trained weights, owning its copy of them (`weights`: one tensor per
    trained parameter, sharded like it under FSDP2); evaluation and the `*_ema` exports use it (`swapped_in`)."""

    def __init__(self, params: list[Tensor], schedule: EMASchedule):
        self.schedule = schedule
        self.weights = [p.detach().clone() for p in params]

    def _update(self, params: list[Tensor], s: int, times: int) -> None:
        if times < 1 or (s + 1) % self.schedule.interval:
            return
        with torch.no_grad():
            local_e, local_p = [local_shard(e) for e in self.weights], [local_shard(p.detach()) for p in params]
            for _ in range(times):
                torch._foreach_lerp_(local_e, local_p, 1 - self.schedule.decay_at(s))

    def before_step(self, params: list[Tensor], s: int) -> None:
        """The updates that precede optimizer step s + 1 (the first updates_per_step - 1 batches of its window)."""
        self._update(params, s, self.schedule.updates_per_step - 1)

    def after_step(self, params: list[Tensor], s: int) -> None:
        """The update right after optimizer step s (s counts from 1)."""
        self._update(params, s, 1)

    @contextlib.contextmanager
    def swapped_in(self, params: list[Tensor]):
        """Within the block `params` hold the EMA weights (and the EMA the live ones); swapped back after."""
        self._swap(params)
        try:
            yield
        finally:
            self._swap(params)

    def _swap(self, params: list[Tensor]) -> None:
        with torch.no_grad():
            for p, e in zip(params, self.weights):
                p, e = local_shard(p), local_shard(e)
                tmp = p.detach().clone()
                p.copy_(e)
                e.copy_(tmp)

