"""Run by tests/test_scale.py under `torchrun --nproc_per_node=2` (gloo, CPU): FSDP2 full fine-tuning of the tiny
FLUX.1-dev-style transformer, one update of two micro-batches per rank, accumulated as train.update does
(policy.grad_sync, policy.backward). After the first micro-batch a rank must hold only its shard of the gradient:
the DTensor gradients' local parts, with no unsharded gradient left inside FSDP2. The same update with the old rule
(no reduce-scatter before the last micro-batch) is run for contrast. Rank 0 writes both runs' storage counts and
full gradients to OUT/grads.pt; the test compares them with a one-process sum.

    torchrun --nproc_per_node=2 tests/fsdp_grads_check.py TINY_FLUX_DEV_FOLDER OUT
"""
import os
import sys

import torch
from torch.distributed.fsdp import FSDPModule

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flow_cps import distributed, models  # noqa: E402
from flow_cps.policy import Policy  # noqa: E402

RES, MSL = 32, 16


def batches(bb, rank: int) -> list[tuple]:
    """This rank's two micro-batches: (latents, t, conditioning), a deterministic function of (rank, index)."""
    out = []
    for i in range(2):
        g = torch.Generator().manual_seed(100 * rank + i)
        x = torch.randn(2, *bb.latent_shape, generator=g)
        t = torch.rand(2, generator=g)
        out.append((x, t, bb.encode([f"prompt {rank} {i} a", f"prompt {rank} {i} b"])))
    return out


def loss_of(bb, module, x, t, cond):
    return bb.velocity(x, t, cond, module).square().mean()


def unsharded_grad_numel(module) -> int:
    """Elements of gradient FSDP2 holds unsharded (its accumulation when a reduce-scatter is skipped)."""
    n = 0
    for m in module.modules():
        if isinstance(m, FSDPModule):
            group = m._get_fsdp_state()._fsdp_param_group
            for fp in group.fsdp_params if group is not None else []:
                acc = getattr(fp, "unsharded_accumulated_grad", None)
                unsharded = getattr(fp, "_unsharded_param", None)
                if acc is not None:
                    n += acc.numel()
                elif unsharded is not None and unsharded.grad is not None:
                    n += unsharded.grad.numel()
    return n


def one_update(folder: str, world: int, rank: int, keep_sharded: bool) -> tuple[dict, list]:
    bb = models.load_backbone(folder, "cpu", resolution=RES, max_sequence_length=MSL)
    policy = Policy(bb, torch.device("cpu"), world, lora=None, parallel="fsdp")
    policy.module.keep_grads_sharded = keep_sharded  # True is what Policy sets for full fine-tuning
    data = batches(bb, rank)
    stats = {}
    for f, (x, t, cond) in enumerate(data):
        with policy.grad_sync(f == len(data) - 1):
            policy.backward(loss_of(bb, policy.module, x, t, cond))
        if f == 0:  # after the first micro-batch: what this rank stores
            stats = dict(sharded=sum(p.grad.to_local().numel() for p in policy.params if p.grad is not None),
                         unsharded=unsharded_grad_numel(policy.module),
                         shard=sum(p.to_local().numel() for p in policy.params),
                         model=sum(p.numel() for p in policy.params))
    return stats, [p.grad.full_tensor() for p in policy.params]  # collective: every rank


def main(folder: str, out: str) -> None:
    rank, world, _ = distributed.setup("cpu", need_group=True)
    torch.manual_seed(0)
    new, grads_new = one_update(folder, world, rank, keep_sharded=True)
    old, grads_old = one_update(folder, world, rank, keep_sharded=False)
    stats = distributed.all_gather_objects(dict(new=new, old=old))
    if rank == 0:
        torch.save(dict(stats=stats, grads_new=grads_new, grads_old=grads_old), os.path.join(out, "grads.pt"))
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
