"""Run by tests/test_scale.py under torchrun, as 1 node x 2 processes or as 2 nodes x 1 process (two launchers and
a c10d rendezvous on localhost, what a cluster runs): two GRPO runs through train.main in one process group,

  ddp   the tiny SD3.5-style pipeline: a LoRA under DDP, CFG, an EMA of several updates per optimizer step;
  fsdp  the tiny FLUX.1-dev-style pipeline: full fine-tuning under FSDP2 with an EMA, exported as diffusers folders
        (transformer/, transformer_ema/) cut into several shards;

then every rank writes what it holds to OUT/<run>/rank<RANK>.pt: the trained weights and the EMA (gathered), the
transformer's buffers, whether DDP broadcasts them, and the velocities of the live and the EMA weights on fixed
inputs, so that the test can compare ranks, launches, one process and the exports.

    torchrun ... tests/multinode_check.py OUT TINY_SD3_FOLDER TINY_FLUX_FOLDER PROMPTS_FILE
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from flow_cps import export  # noqa: E402

COMMON = ["--resolution", "32", "--max_sequence_length", "16", "--reward", "clean_background", "--eval_metrics",
          "clean_background", "--iterations", "2", "--eval_every", "2", "--checkpoint_every", "2",
          "--eval_per_prompt", "1", "--prompts_per_iter", "2", "--group_size", "4", "--micro_batch", "2",
          "--updates_per_iter", "1", "--num_steps", "4", "--eval_steps", "4", "--report_to", "none",
          "--ema_decay", "0.9", "--ema_interval", "1", "--ema_updates_per_step", "2", "--ema_warmup", "true"]
PROMPTS = ["a red cat", "two birds"]


def runs(sd3: str, flux: str, prompts: str) -> dict[str, list[str]]:
    """The two runs' flags, also run in one process by the test (without --parallel)."""
    return dict(ddp=[*COMMON, "--model", sd3, "--prompts", prompts, "--lora_rank", "4", "--lora_alpha", "8"],
                fsdp=[*COMMON, "--model", flux, "--prompts", prompts, "--lora_rank", "0", "--lr", "1e-4"])


def probe(bb, module) -> torch.Tensor:
    """The velocity of `module` on fixed latents, times and prompts (a collective forward under FSDP2)."""
    x = torch.randn(len(PROMPTS), *bb.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return bb.velocity(x, torch.tensor([0.9, 0.4]), bb.encode(PROMPTS), module)


def held(policy) -> dict:
    """What this rank holds after training (gathers under FSDP2: call on every rank)."""
    weights = lambda: {n: export.gathered(p.detach()).cpu().clone() for n, p in zip(policy.names, policy.params)}  # noqa: E731
    out = dict(weights=weights(), velocity=probe(policy.backbone, policy.module),
               buffers={n: b.cpu().clone() for n, b in policy.backbone.transformer.named_buffers()},
               forward_sync_buffers=getattr(policy.module, "forward_sync_buffers", None))
    with policy.ema_weights():
        out.update(ema=weights(), ema_velocity=probe(policy.backbone, policy.module))
    return out


def main(out: str, sd3: str, flux: str, prompts: str) -> None:
    destroy = dist.destroy_process_group
    dist.destroy_process_group = lambda *a, **k: None  # one process group for both runs and the gathers
    export.MAX_SHARD_SIZE = 400_000  # the tiny transformer's export in several shards, as a 12 B one's
    for name, flags in runs(sd3, flux, prompts).items():
        result = train.main([*flags, "--parallel", name, "--output_dir", os.path.join(out, name)])
        torch.save(held(result["policy"]), os.path.join(out, name, f"rank{os.environ['RANK']}.pt"))
    destroy()


if __name__ == "__main__":
    main(*sys.argv[1:5])
