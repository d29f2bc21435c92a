"""Precision: what --precision means on a device (the frozen weights' dtype, the autocast context the transformer's
forwards run in), and fp16's dynamic loss scaling.

    prec = precision.precision("auto", device)   # bf16 on CUDA, fp32 on the CPU
    with prec.autocast(): ...                     # the backbone's forwards (the Policy sets it as the backbone's)
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from flow_cps.distributed import all_reduce, local_shard

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # see Precision; and "auto"


@dataclass(frozen=True)
class Precision:
    """What --precision means on a device. `dtype` is the frozen weights' (transformer, text encoders) and the
    autocast dtype; trained weights are fp32 masters, the sampler maths fp32 and the VAE fp32 whatever it is.

    bf16: bf16 frozen weights under bf16 autocast (Flow-GRPO's FLUX configs, DanceGRPO).
    fp16: fp16 frozen weights under fp16 autocast, with dynamic loss scaling (`LossScaler`), as accelerate runs
          Flow-GRPO's SD3 configs (mixed_precision "fp16"; there the frozen weights stay fp32 and autocast casts them
          to fp16 op by op: the matmuls see the same fp16 operands, only the memory differs).
    fp32: everything fp32 (the CPU default)."""
    name: str
    device_type: str

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.name]

    def autocast(self):
        """The context the transformer's forwards run in (rollouts, training, evaluation)."""
        if self.name == "fp32":
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def loss_scaling(self) -> bool:
        return self.name == "fp16"


def precision(name: str, device: torch.device) -> Precision:
    """--precision on `device`: 'auto' is bf16 on CUDA and fp32 on the CPU; 'bf16', 'fp16', 'fp32' as named (the
    CPU runs them too, slowly: that is how the tests exercise them)."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    if name not in PRECISIONS:  # for callers in code; a run's flag is checked by config.validate
        raise ValueError(f"precision must be 'auto' or one of {', '.join(PRECISIONS)} (got {name!r})")
    return Precision(name, device.type)


@dataclass
class LossScaler:
    """Dynamic loss scaling for fp16 (torch.amp.GradScaler's rule and defaults, which accelerate uses): the loss is
    multiplied by `scale` before backward so that small gradients survive fp16; the optimizer step divides them back.
    A step whose gradients overflowed is skipped and the scale halved; after `interval` good steps it doubles."""
    scale: float = 2.0 ** 16
    good_steps: int = 0
    interval: int = 2000

    def unscale(self, params: list[Tensor]) -> bool:
        """Divide the gradients by the scale in place; True when they are finite on every rank."""
        grads = [local_shard(p.grad) for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)
        finite = torch.tensor([float(all(bool(torch.isfinite(g).all()) for g in grads))])
        return all_reduce(finite, "min").item() == 1

    def update(self, finite: bool) -> None:
        if not finite:
            self.scale, self.good_steps = self.scale / 2, 0
            return
        self.good_steps += 1
        if self.good_steps == self.interval:
            self.scale, self.good_steps = self.scale * 2, 0

