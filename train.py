"""GRPO fine-tuning of flow-matching models with Coefficients-Preserving Sampling (Wang & Yu, arXiv 2509.05952).

    torchrun --standalone --nproc_per_node=2 train.py          # the built-in tiny FLUX on digits, CPU, ~3 min
    python train.py --sampler flow_sde --eta 0.7               # the paper's baseline sampler, one flag
    python train.py --help                                     # every option, with its meaning
    python train.py --preset flux-dev-pickscore --dry_run true # batch arithmetic + per-GPU memory, loads nothing
    torchrun --nproc_per_node=8 train.py --preset sd3.5-geneval                # the paper's settings (PRESETS)

One loop for every model (PAPER.md §4): rollout with the chosen sampler -> decode -> rewards -> group advantages ->
per-(sample, trained step) recomputed log-probs -> clipped surrogate (+ KL to the adapter-off reference) ->
gradient accumulation -> clipped AdamW step on the LoRA. Deliberate choices, where the peers differ:
  1. Seeds derive from (seed, iteration, prompt, group member), never from a global RNG stream: a run is
     reproducible, independent of the world size's slicing, and a resumed run continues exactly.
  2. Invalid samples (a reward returned NaN) are excluded from advantages and loss and counted, never scored 0.
  3. The loss is a mean over all kept (sample, step) terms of the whole world (not per micro-batch), so it does not
     depend on how samples fall into micro-batches or ranks.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import grpo
import sampling


def F(default, doc: str):
    return field(default=default, metadata={"help": doc})


@dataclass
class Config:
    # run
    preset: str = F("tiny", "named preset applied before the command-line overrides (see PRESETS)")
    output_dir: str = F("runs/tiny", "where logs, images and checkpoints go")
    seed: int = F(0, "base seed; every noise derives from (seed, iteration, prompt, group member)")
    iterations: int = F(150, "GRPO iterations (one rollout batch + updates each)")
    resume: bool = F(False, "continue from output_dir/checkpoints/latest exactly")
    device: str = F("auto", "'auto' (cuda:LOCAL_RANK if available, else cpu), 'cpu' or 'cuda'")
    # model and prompts
    model: str = F("digits", "'digits' (built-in tiny FLUX) or a hub id / local diffusers folder (FLUX.1, SD3.5)")
    prompts: str = F("digits", "prompt set: 'digits', 'geneval', 'ocr', a .txt/.jsonl file, or a folder with "
                     "train.txt/test.txt (Flow-GRPO's dataset/pickscore)")
    resolution: int = F(0, "image height = width in pixels; 0 = the model's default (digits 8, pipelines 1024)")
    guidance: float = F(-1.0, "FLUX.1-dev guidance embedding / SD3.5 CFG scale (<= 1: no CFG) for rollouts and "
                        "training; -1 = the paper's value (3.5 / 4.5; none for FLUX.1-schnell and digits)")
    eval_guidance: float = F(-1.0, "guidance of the evaluation rollouts; -1 = the same as --guidance")
    max_sequence_length: int = F(0, "T5 tokens per prompt; 0 = the pipeline's default (FLUX 512, SD3 256)")
    shift: float = F(0.0, "timestep shift override: 0 = the model's schedule (SD3.5 static 3, FLUX.1-dev "
                     "resolution-dependent, schnell none); s > 0 = static shift s (DanceGRPO: 3)")
    # sampling
    sampler: str = F("cps", "rollout sampler: " + ", ".join(sampling.SAMPLERS))
    eta: float = F(0.7, "noise level; its meaning differs per sampler (PAPER.md §8 trap 13)")
    log_prob: str = F("", "'gaussian' (Eq. 13) or 'cps' (Eq. 14); empty = the sampler's default")
    num_steps: int = F(10, "sampler steps of a training rollout")
    eval_steps: int = F(10, "ODE steps of an evaluation rollout")
    sde_window: int = F(0, "if > 0: only this many consecutive steps are stochastic (Flow-GRPO-Fast), the rest ODE")
    sde_window_range: str = F("", "'lo,hi' range for the window start (default 0,num_steps//2)")
    reward_image: str = F("final", "'final' latent (Flow-GRPO) or the last step's 'x0_hat' (DanceGRPO)")
    same_noise_in_group: bool = F(False, "one initial noise per group (DanceGRPO) instead of per sample")
    # GRPO
    group_size: int = F(8, "samples per prompt (G)")
    prompts_per_iter: int = F(8, "prompts per iteration over all ranks; each group lives on one rank")
    advantage: str = F("flow_grpo", "'flow_grpo' (group mean, batch std) or 'dance' (group mean and std)")
    global_std: bool = F(True, "flow_grpo: std over the whole batch (True) or per group")
    adv_clip: float = F(5.0, "advantages are clipped to [-adv_clip, adv_clip]")
    drop_zero_adv: bool = F(True, "skip samples whose advantage is 0 (all-equal groups), as Flow-GRPO")
    timesteps: str = F("ordered", "'ordered' first fraction of steps (Flow-GRPO) or 'random' subset (DanceGRPO)")
    timestep_fraction: float = F(0.99, "fraction of steps trained (0.99 -> all but the last)")
    clip_range: float = F(1e-4, "PPO clip range epsilon")
    beta: float = F(0.0, "KL penalty weight (0 = no reference forward)")
    kl_form: str = F("mse", "'mse' (FlowCPS), 'flow_grpo' or 'gaussian' (exact); see grpo.kl_penalty")
    updates_per_iter: int = F(2, "optimizer steps per iteration (the batch is split into this many chunks)")
    micro_batch: int = F(16, "samples per forward pass and per rank (rollout and training)")
    # optimisation
    lr: float = F(1e-3, "AdamW learning rate")
    weight_decay: float = F(1e-4, "AdamW weight decay")
    max_grad_norm: float = F(1.0, "gradient-norm clip")
    lora_rank: int = F(8, "LoRA rank; 0 = full fine-tuning of the transformer (needs beta = 0)")
    lora_alpha: float = F(16.0, "LoRA alpha (scale alpha / rank)")
    lora_targets: str = F(",".join(__import__("models").ATTENTION_TARGETS), "comma-separated LoRA target modules")
    ema_decay: float = F(0.9, "EMA decay of the trained weights used for evaluation (0 = no EMA)")
    # scale
    parallel: str = F("ddp", "multi-GPU engine: 'ddp' (a replica per GPU) or 'fsdp' (FSDP2: weights, grads and "
                      "optimizer state sharded per transformer block)")
    gradient_checkpointing: bool = F(False, "recompute each transformer block in backward: less activation memory, "
                                     "~1/3 more training compute")
    precision: str = F("auto", "'auto': bf16 frozen weights + bf16 autocast on CUDA, fp32 on CPU; 'fp32': fp32 "
                       "everywhere (trained weights and sampler math are always fp32)")
    offload: bool = F(False, "keep text encoders and VAE on the CPU; they visit the GPU only to encode new prompts "
                      "and to decode")
    dry_run: bool = F(False, "resolve and validate the config, print the batch arithmetic and a per-GPU memory "
                      "estimate, load no weights, exit")
    dry_run_gpus: int = F(0, "--dry_run: the world size to plan for; 0 = $WORLD_SIZE, else the preset's GPU count")
    # rewards and evaluation
    reward: str = F("digit_judge", "training reward, or a weighted sum 'name:w,name:w'")
    reward_options: str = F("{}", "JSON: per-reward factory options, e.g. '{\"pickscore\": {\"model\": \"/path\"}}'")
    eval_metrics: str = F("digit_judge_accuracy,digit_judge,clean_background", "held-out metrics (reward names)")
    eval_every: int = F(15, "evaluate every this many iterations (and at the start and end)")
    eval_per_prompt: int = F(20, "fixed noises per held-out prompt")
    # outputs
    checkpoint_every: int = F(50, "checkpoint every this many iterations (and at the end)")
    keep_checkpoints: int = F(2, "how many checkpoints to keep")
    tensorboard: bool = F(True, "also write TensorBoard scalars")
    kill_at: int = F(-1, "testing: SIGKILL this process right after the checkpoint of this iteration")


# The paper's settings (PAPER.md §5.2: Flow-GRPO's released configs, which the FlowCPS commit left unchanged; §5.3:
# DanceGRPO's scripts). Global batch = prompts_per_iter x group_size, fixed; micro_batch = the configs' images per GPU
# per forward; the number of micro-batches per update adapts to the world size (validate() checks divisibility).
_FLOW_GRPO = dict(
    resolution=512, max_sequence_length=128,  # Flow-GRPO encodes prompts (and the negative "") with 128 T5 tokens
    sampler="cps", group_size=24, prompts_per_iter=48, updates_per_iter=2, advantage="flow_grpo", global_std=True,
    adv_clip=5.0, timesteps="ordered", timestep_fraction=0.99, clip_range=1e-4, kl_form="mse", lr=3e-4,
    weight_decay=1e-4, max_grad_norm=1.0, ema_decay=0.9, eval_per_prompt=1, iterations=1000, checkpoint_every=30)
_SD35 = dict(_FLOW_GRPO, model="stabilityai/stable-diffusion-3.5-medium", num_steps=10, eval_steps=40, guidance=4.5,
             eval_guidance=4.5, micro_batch=9, eta=0.7, lora_rank=32, lora_alpha=64.0,
             lora_targets=",".join(__import__("models").ATTENTION_TARGETS), parallel="ddp", eval_every=60)
_FLUX = dict(_FLOW_GRPO, guidance=3.5, eval_guidance=3.5, micro_batch=3, eta=0.9, beta=0.0, lora_rank=64,
             lora_alpha=128.0, lora_targets=",".join(__import__("models").FLUX_TARGETS), parallel="fsdp",
             reward="pickscore", eval_metrics="pickscore", prompts="flow_grpo/dataset/pickscore", eval_every=30)
PRESETS: dict[str, dict] = {
    "tiny": {},  # the defaults: built-in digits model, CPS eta 0.7, ~3 min on 2 CPU cores
    "sd3.5-geneval": dict(_SD35, prompts="geneval", reward="geneval", eval_metrics="geneval_strict,geneval",
                          beta=0.04, output_dir="runs/sd3.5-geneval"),
    "sd3.5-ocr": dict(_SD35, prompts="ocr", reward="ocr", eval_metrics="ocr", beta=0.04, output_dir="runs/sd3.5-ocr"),
    "sd3.5-pickscore": dict(_SD35, prompts="flow_grpo/dataset/pickscore", reward="pickscore", eval_metrics="pickscore",
                            beta=0.01, output_dir="runs/sd3.5-pickscore"),
    "flux-dev-pickscore": dict(_FLUX, model="black-forest-labs/FLUX.1-dev", num_steps=6, eval_steps=28,
                               output_dir="runs/flux-dev-pickscore"),
    # No FLUX.1-schnell config was released; the paper's table has it (4 steps, S-ZH). No guidance embedding.
    "flux-schnell-pickscore": dict(_FLUX, model="black-forest-labs/FLUX.1-schnell", num_steps=4, eval_steps=4,
                                   guidance=-1.0, eval_guidance=-1.0, output_dir="runs/flux-schnell-pickscore"),
    # DanceGRPO's FLUX.1-dev HPSv2.1 recipe (16-GPU script): full fine-tuning, shift-3 uniform 16-step grid, groups of
    # 12 with one initial noise, a random 60% of the steps, group-std advantages, 3 updates per iteration, no KL.
    # Sampler: CPS at eta 0.7 (the paper's CPS-on-Dance run); the Dance-GRPO baseline is --sampler dance_sde --eta 0.3.
    "flux-dev-hpsv2": dict(
        model="black-forest-labs/FLUX.1-dev", resolution=720, max_sequence_length=512, num_steps=16, eval_steps=16,
        shift=3.0, guidance=3.5, eval_guidance=3.5, sampler="cps", eta=0.7, reward_image="x0_hat",
        same_noise_in_group=True, group_size=12, prompts_per_iter=16, updates_per_iter=3, micro_batch=1,
        advantage="dance", adv_clip=5.0, drop_zero_adv=False, timesteps="random", timestep_fraction=0.6,
        clip_range=1e-4, beta=0.0, lr=1e-5, weight_decay=1e-4, max_grad_norm=1.0, lora_rank=0, ema_decay=0.995,
        parallel="fsdp", gradient_checkpointing=True, reward="hpsv2", eval_metrics="hpsv2",
        prompts="DanceGRPO/assets/prompts.txt", eval_per_prompt=1, eval_every=50, iterations=300,
        checkpoint_every=50, output_dir="runs/flux-dev-hpsv2"),
}
# GPUs each preset's numbers assume (the dry run's default world size). The paper's configs used 32 GPUs, but 48
# prompts do not split over 32 ranks with every group on one rank; 8 GPUs is Flow-GRPO's `*_8gpu` layout.
PRESET_GPUS = {"tiny": 2, "sd3.5-geneval": 8, "sd3.5-ocr": 8, "sd3.5-pickscore": 8, "flux-dev-pickscore": 8,
               "flux-schnell-pickscore": 8, "flux-dev-hpsv2": 16}
# Where the prompt sets without a generator in prompts.py come from.
PROMPT_SOURCES = {"flow_grpo/dataset/pickscore": "git clone https://github.com/yifan123/flow_grpo (its "
                  "dataset/pickscore holds train.txt and test.txt)",
                  "DanceGRPO/assets/prompts.txt": "git clone https://github.com/XueZeyue/DanceGRPO (assets/prompts.txt "
                  "holds the HPDv2 prompts)"}
RESUMABLE_CHANGES = {"iterations", "resume", "kill_at", "eval_every", "checkpoint_every", "keep_checkpoints",
                     "tensorboard", "device", "output_dir", "dry_run", "dry_run_gpus"}


# -- configuration -----------------------------------------------------------------------------------------------
def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def parse_config(argv: list[str] | None = None) -> Config:
    """argparse generated from the dataclass; the preset applies first, explicit flags override it."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        typ = _bool if f.type in (bool, "bool") else {"int": int, "float": float, "str": str}.get(f.type, f.type)
        p.add_argument(f"--{f.name}", type=typ, default=None, help=f"{f.metadata['help']} (default: {f.default})")
    args, unknown = p.parse_known_args(argv)
    if unknown:
        names = [f"--{f.name}" for f in dataclasses.fields(Config)]
        hints = [f"{u} (did you mean {', '.join(m)}?)" if (m := difflib.get_close_matches(u.split("=")[0], names))
                 else u for u in unknown]
        p.error("unknown arguments: " + "; ".join(hints))
    preset = args.preset or "tiny"
    if preset not in PRESETS:
        p.error(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in vars(args).items() if v is not None}, "preset": preset}
    return Config(**values)


def validate(cfg: Config, world: int) -> None:
    """Every check that can fail, before any work: a clear message naming the problem and the fix."""
    from rewards import parse_spec

    def need(ok: bool, msg: str):
        if not ok:
            raise SystemExit(f"config error: {msg}")
    need(cfg.group_size >= 2, f"group_size must be >= 2 for group advantages (got {cfg.group_size})")
    need(cfg.sampler in sampling.SAMPLERS, f"unknown sampler {cfg.sampler!r}; use one of {list(sampling.SAMPLERS)}")
    need(math.isfinite(cfg.eta) and cfg.eta >= 0, f"eta must be finite and >= 0 (got {cfg.eta})")
    need(cfg.sampler != "cps" or cfg.eta <= 1, f"CPS eta must be in [0, 1] (got {cfg.eta}; eta and 2 - eta alias)")
    need(cfg.sampler != "ode", "the ODE sampler has no density to train on; use cps, flow_sde, dance_sde, ...")
    need(cfg.log_prob in ("", *sampling.LOG_PROBS),
         f"unknown log_prob {cfg.log_prob!r}; use one of {list(sampling.LOG_PROBS)}")
    need(cfg.advantage in grpo.ADVANTAGES, f"unknown advantage {cfg.advantage!r}; use {list(grpo.ADVANTAGES)}")
    need(cfg.timesteps in ("ordered", "random"), f"timesteps must be 'ordered' or 'random' (got {cfg.timesteps!r})")
    need(cfg.kl_form in ("mse", "flow_grpo", "gaussian"), f"unknown kl_form {cfg.kl_form!r}")
    need(cfg.reward_image in ("final", "x0_hat"), f"reward_image must be 'final' or 'x0_hat' ({cfg.reward_image!r})")
    need(0 < cfg.timestep_fraction <= 1, f"timestep_fraction must be in (0, 1] (got {cfg.timestep_fraction})")
    need(cfg.num_steps >= 2 and cfg.eval_steps >= 1, "num_steps must be >= 2 and eval_steps >= 1")
    need(cfg.clip_range > 0 and cfg.lr > 0 and cfg.beta >= 0, "clip_range and lr must be > 0, beta >= 0")
    need(0 <= cfg.ema_decay < 1, f"ema_decay must be in [0, 1) (got {cfg.ema_decay})")
    need(cfg.iterations >= 1 and cfg.eval_every >= 1 and cfg.checkpoint_every >= 1, "iterations/eval_every/"
         "checkpoint_every must be >= 1")
    need(cfg.prompts_per_iter % world == 0, f"prompts_per_iter ({cfg.prompts_per_iter}) must be divisible by the "
         f"world size ({world}): each group lives on one rank")
    per_rank = cfg.prompts_per_iter // world * cfg.group_size
    need(per_rank % cfg.updates_per_iter == 0, f"samples per rank ({per_rank} = prompts_per_iter/world x group_size)"
         f" must be divisible by updates_per_iter ({cfg.updates_per_iter})")
    need((per_rank // cfg.updates_per_iter) % cfg.micro_batch == 0, f"samples per rank and update "
         f"({per_rank // cfg.updates_per_iter}) must be divisible by micro_batch ({cfg.micro_batch})")
    need(0 <= cfg.sde_window <= cfg.num_steps - 1, f"sde_window must be in [0, num_steps - 1] ({cfg.sde_window})")
    need(cfg.parallel in ("ddp", "fsdp"), f"parallel must be 'ddp' or 'fsdp' (got {cfg.parallel!r})")
    need(cfg.precision in ("auto", "fp32"), f"precision must be 'auto' or 'fp32' (got {cfg.precision!r})")
    need(cfg.lora_rank >= 0 and (cfg.lora_rank == 0 or cfg.lora_alpha > 0), "lora_rank must be >= 0 (0 = full "
         "fine-tuning) and lora_alpha > 0")
    need(cfg.lora_rank > 0 or cfg.beta == 0, "full fine-tuning (lora_rank 0) has no adapter-off reference for the KL "
         "term; use beta 0 or a LoRA")
    need(cfg.resolution >= 0 and cfg.max_sequence_length >= 0 and cfg.shift >= 0,
         "resolution, max_sequence_length and shift must be >= 0 (0 = the model's default)")
    need(cfg.guidance == -1 or cfg.guidance >= 0, f"guidance must be >= 0, or -1 for the model's default "
         f"(got {cfg.guidance})")
    need(cfg.eval_guidance == -1 or cfg.eval_guidance >= 0, f"eval_guidance must be >= 0, or -1 for --guidance "
         f"(got {cfg.eval_guidance})")
    need(cfg.dry_run_gpus >= 0, "dry_run_gpus must be >= 0")
    try:
        parse_spec(cfg.reward)
        parse_spec(cfg.eval_metrics)
        opts = json.loads(cfg.reward_options)
        need(isinstance(opts, dict), "reward_options must be a JSON object")
    except (ValueError, json.JSONDecodeError) as e:
        raise SystemExit(f"config error: {e}") from None
    if cfg.device.startswith("cuda"):
        need(torch.cuda.is_available(), "device 'cuda' requested but CUDA is not available; use --device cpu")


# -- distributed ---------------------------------------------------------------------------------------------------
def setup_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE; plain `python train.py` runs as a world of one with no process group."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        # cuDNN's fused attention backward crashed (illegal memory access) on FLUX.1-dev's shapes in bf16 on an H200
        # with torch 2.11; the flash and memory-efficient kernels ran them fine, so SDPA uses those.
        torch.backends.cuda.enable_cudnn_sdp(False)
    if not dist.is_initialized() and (world > 1 or cfg.parallel == "fsdp"):
        # NCCL for CUDA tensors, gloo for the small CPU tensors the loop also reduces (kept-sample counts, metrics)
        backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
        if world > 1 or "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend)
        else:  # `python train.py --parallel fsdp` without torchrun: FSDP2 needs a process group, here one of one
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return rank, world, device


def all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from all ranks in rank order (gloo/nccl-safe: on the tensor's device)."""
    if not dist.is_initialized():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


@contextlib.contextmanager
def rank_zero_first():
    """Rank 0 runs the block first (pre-training, downloads, caches); the others then find the result on disk."""
    first = not dist.is_initialized() or dist.get_rank() == 0
    if not first:
        dist.barrier()
    yield
    if first and dist.is_initialized():
        dist.barrier()


def grad_sync(model, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an update (DDP no_sync / FSDP2)."""
    if hasattr(model, "no_sync"):
        return nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


# -- seeds ---------------------------------------------------------------------------------------------------------
def seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def generators(parts: list[tuple[int, ...]]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed_of(*p)) for p in parts]


def load_prompts(name: str, split: str, seed: int) -> tuple[list[str], list]:
    if name == "digits":
        import digits

        ps = digits.prompts(split)
        return ps, [None] * len(ps)
    import prompts

    return prompts.load(name, split, seed)


# -- the policy --------------------------------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor (element-wise EMA maths needs no communication); plain tensors as is."""
    return t.to_local() if hasattr(t, "to_local") else t


class Policy:
    """The backbone + what trains (a LoRA, or every transformer weight), the module to call for gradients (the
    transformer itself, its DDP wrapper, or the transformer sharded in place by FSDP2), the optimizer and the EMA."""

    def __init__(self, cfg: Config, backbone, device: torch.device, world: int):
        import models

        self.backbone, self.cfg = backbone, cfg
        self.fsdp = cfg.parallel == "fsdp"
        tr = backbone.transformer
        torch.manual_seed(cfg.seed)  # identical LoRA init on every rank (DDP also broadcasts it)
        if cfg.lora_rank > 0:
            self.params = models.add_lora(tr, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","))
        else:  # full fine-tuning (DanceGRPO): every transformer weight trains
            tr.requires_grad_(True)
            self.params = list(tr.parameters())
        if cfg.gradient_checkpointing:
            tr.enable_gradient_checkpointing()  # diffusers recomputes each block (non-reentrant checkpoint)
        tr.to(device)
        self.names = [n for n, p in tr.named_parameters() if p.requires_grad]
        self.module = tr
        if self.fsdp:  # fp32 masters are made block by block inside, so 12B weights are never all fp32 at once
            self._shard(tr, device, world)
            self.params = [p for p in tr.parameters() if p.requires_grad]  # now DTensors holding this rank's shard
        else:
            self._fp32_masters(self.params)
            if world > 1:
                from torch.nn.parallel import DistributedDataParallel

                self.module = DistributedDataParallel(tr, device_ids=[device.index] if device.type == "cuda" else
                                                      None)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                                     eps=1e-8)
        self.ema = [p.detach().clone() for p in self.params] if cfg.ema_decay > 0 else None

    @staticmethod
    def _fp32_masters(params) -> None:
        """Trained weights are fp32 (base weights may be bf16 on CUDA): AdamW's small updates vanish in bf16."""
        for p in params:
            if p.dtype != torch.float32:
                p.data = p.data.float()

    def _shard(self, tr, device: torch.device, world: int) -> None:
        """FSDP2: fully_shard each transformer block (FLUX: transformer_blocks + single_transformer_blocks; SD3:
        transformer_blocks), then the root for the remaining embedders and output layers. On CUDA the all-gathers
        run in bf16 and gradients are reduced in fp32; on CPU (tests) everything stays fp32."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        import models

        # diffusers' blocks return views of a split tensor and FSDP2 warns that an in-place op on them would skip
        # its hooks; none follows (tests/test_scale.py checks FSDP2 against DDP and a single process).
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
        mesh = init_device_mesh(device.type, (world,))
        bf16 = device.type == "cuda" and self.cfg.precision == "auto"
        # cast_forward_inputs=False: bf16 autocast decides the compute dtype, as under DDP. FSDP2's own input cast
        # is not re-applied when activation checkpointing recomputes a block (FLUX's fp32 rotary embeddings came
        # back fp32, and torch.utils.checkpoint refused the mismatch; seen on an H200 with torch 2.11).
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32 if bf16 else None, cast_forward_inputs=False)
        for block in models.transformer_blocks(tr):
            self._fp32_masters([p for p in block.parameters() if p.requires_grad])
            fully_shard(block, mesh=mesh, mp_policy=mp)
        self._fp32_masters([p for p in tr.parameters() if p.requires_grad])
        fully_shard(tr, mesh=mesh, mp_policy=mp)

    def backbone_guidance(self, scale: float):
        """Evaluation's guidance (eval_guidance; -1 keeps the training guidance)."""
        return self.backbone.guidance_scale(scale) if hasattr(self.backbone, "guidance_scale") else nullcontext()

    def update_ema(self) -> None:
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_([_local(e) for e in self.ema], [_local(p.detach()) for p in self.params],
                                     1 - self.cfg.ema_decay)

    def swap_ema(self) -> None:
        """Exchange live and EMA weights in place (call twice to restore)."""
        if self.ema is not None:
            with torch.no_grad():
                for p, e in zip(self.params, self.ema):
                    p, e = _local(p), _local(e)
                    tmp = p.detach().clone()
                    p.copy_(e)
                    e.copy_(tmp)

    def state(self) -> dict:
        return dict(params={n: p.detach().cpu() for n, p in zip(self.names, self.params)},
                    ema=None if self.ema is None else {n: e.cpu() for n, e in zip(self.names, self.ema)},
                    optimizer=self.opt.state_dict())

    def load_state(self, st: dict) -> None:
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(st["params"][n])
            if self.ema is not None:
                for n, e in zip(self.names, self.ema):
                    e.copy_(st["ema"][n])
        self.opt.load_state_dict(st["optimizer"])

    # FSDP2: torch.distributed.checkpoint writes each rank's shards of the trained weights, AdamW state and EMA; no
    # rank ever holds the whole model (frozen base weights are not saved: they are the pretrained ones).
    def _sharded_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, [self.opt],
                                            options=StateDictOptions(ignore_frozen_params=True))
        state = {"model": model_sd, "optim": optim_sd}
        if self.ema is not None:
            state["ema"] = dict(zip(self.names, self.ema))
        return state

    def save_sharded(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._sharded_state(), checkpoint_id=str(path))  # collective; every rank writes its own file

    def load_sharded(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._sharded_state()
        dcp.load(state, checkpoint_id=str(path))  # in place, into this rank's shards (the EMA included)
        set_state_dict(self.module, [self.opt], model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))


def velocity_fn(backbone, cond: dict, model=None, autocast=nullcontext):
    def v(x, t):
        with autocast():
            return backbone.velocity(x, t, cond, model)
    return v


def sample(backbone, prompts: list[str], gens: list[torch.Generator], num_steps: int, sampler: str, eta: float,
           micro_batch: int, device, *, window=None, log_prob=None, same_noise: list | None = None,
           autocast=nullcontext):
    """Rollouts in micro-batches (the same batch shapes the training forward uses). Returns the trajectories,
    concatenated over micro-batches, and the conditioning."""
    grid = backbone.sigmas(num_steps)
    cond = backbone.encode(prompts)
    x1 = torch.stack([sampling.randn(backbone.latent_shape, g, "cpu") for g in (same_noise or gens)]).to(device)
    parts = []
    for i in range(0, len(prompts), micro_batch):
        sl = slice(i, i + micro_batch)
        c = {k: (v[sl] if k != "txt_ids" else v) for k, v in cond.items()}
        parts.append(sampling.rollout(velocity_fn(backbone, c, autocast=autocast), x1[sl], grid, sampler, eta,
                                      gens[sl], window=window, log_prob=log_prob))
    traj = sampling.Trajectory(latents=torch.cat([p.latents for p in parts]),
                               log_probs=torch.cat([p.log_probs for p in parts]), stochastic=parts[0].stochastic,
                               x0_hat=torch.cat([p.x0_hat for p in parts]), sigmas=grid)
    return traj, cond


def step_terms(policy: Policy, cfg: Config, traj, cond: dict, rows: torch.Tensor, steps: torch.Tensor, adv,
               autocast=nullcontext):
    """The loss terms of one trained step j for samples `rows`: each sample at its own step steps[rows] (B,).

    Returns per-sample clipped-surrogate loss, KL (or None) and stats. At the first update of an iteration the
    weights are those of the rollout, so logp_new == logp_old bitwise: ratio exactly 1 (tests check it)."""
    bb = policy.backbone
    x, x_next = traj.latents[rows, steps], traj.latents[rows, steps + 1]
    grid = traj.sigmas.to(x.device)  # the grid lives on the CPU, the step indices with the samples
    t, t_next = grid[steps], grid[steps + 1]
    c = {k: (v[rows] if k != "txt_ids" else v) for k, v in cond.items()}
    with autocast():
        v = bb.velocity(x, t, c, policy.module)
    logp, mean, std = sampling.step_log_prob(v, x, x_next, t, t_next, cfg.sampler, cfg.eta, cfg.log_prob or None)
    loss, stats = grpo.clipped_surrogate(logp, traj.log_probs[rows, steps], adv[rows], cfg.clip_range)
    kl = None
    if cfg.beta > 0:
        import models

        with torch.no_grad(), models.adapter_disabled(bb.transformer), autocast():
            v_ref = bb.velocity(x, t, c, bb.transformer)
        mean_ref, _ = sampling.get_sampler(cfg.sampler)(x, v_ref, t, t_next, cfg.eta)
        kl = grpo.kl_penalty(mean, mean_ref, std, t - t_next, cfg.kl_form)
    return loss, kl, stats


# -- checkpoints -------------------------------------------------------------------------------------------------
def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(out: Path, iteration: int, policy: Policy, history: list[dict], cfg: Config,
                    is_main: bool = True) -> Path:
    """Atomic: everything is written into a temporary folder that is renamed into place, then `latest` is
    replaced atomically. A run killed at any moment leaves the previous checkpoint intact.

    Contents: lora/ and lora_ema/ (diffusers' pytorch_lora_weights.safetensors, for `pipe.load_lora_weights`), or
    transformer/ and transformer_ema/ for full fine-tuning without FSDP; training_state.pt (iteration, history,
    RNG, config; without FSDP also the trained weights, EMA and AdamW state). Under FSDP2 (call on every rank) the
    weights, EMA and AdamW state go to dcp/, one file per rank (torch.distributed.checkpoint); the LoRA export
    gathers only the LoRA tensors; full fine-tuning exports nothing consolidated (see the README)."""
    import models

    root = out / "checkpoints"
    final = root / f"iter_{iteration:06d}"
    tmp = root / f".tmp-iter_{iteration:06d}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if policy.fsdp:
        _barrier()  # the folder exists before any rank writes into it (a shared filesystem across nodes)
    kind = policy.backbone.kind
    tr = policy.backbone.transformer
    if cfg.lora_rank > 0:
        live = models.lora_state_dict(tr)  # under FSDP: a collective gather of the LoRA tensors only
        if is_main:
            models.save_lora(tr, tmp / "lora", state_dict=live, pipeline=kind)
        if policy.ema is not None:
            policy.swap_ema()
            ema = models.lora_state_dict(tr)
            policy.swap_ema()
            if is_main:
                models.save_lora(tr, tmp / "lora_ema", state_dict=ema, pipeline=kind)
            if not policy.fsdp:
                assert all(torch.equal(v, models.lora_state_dict(tr)[k]) for k, v in live.items())
    elif not policy.fsdp and is_main:
        tr.save_pretrained(tmp / "transformer")
        if policy.ema is not None:
            policy.swap_ema()
            tr.save_pretrained(tmp / "transformer_ema")
            policy.swap_ema()
    if policy.fsdp:
        policy.save_sharded(tmp / "dcp")
    if is_main:
        torch.save(dict(iteration=iteration, history=history, config=dataclasses.asdict(cfg),
                        torch_rng=torch.get_rng_state(), **({} if policy.fsdp else policy.state())),
                   tmp / "training_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / "latest")
        for old in sorted(root.glob("iter_*"))[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    f = out / "checkpoints" / "latest"
    return out / "checkpoints" / f.read_text().strip() if f.exists() else None


# -- evaluation --------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(policy: Policy, cfg: Config, metrics, eval_prompts: list[str], eval_meta: list, rank: int, world: int,
             device, autocast) -> tuple[dict, torch.Tensor]:
    """Deterministic ODE rollouts with the EMA weights on the held-out prompts and fixed noises (the same for
    every run, sampler and iteration), split across ranks; metric means over all samples."""
    n = len(eval_prompts)
    order = [(k, p) for k in range(cfg.eval_per_prompt) for p in range(n)]  # interleaved: rank 0 sees all prompts
    per = math.ceil(len(order) / world)
    mine = order[rank * per:(rank + 1) * per]
    n_mine = len(mine)
    if policy.fsdp and n_mine < per:  # FSDP2 forwards are collectives: every rank runs as many (padding, dropped)
        mine = mine + [order[-1]] * (per - n_mine)
    prompts = [eval_prompts[p] for _, p in mine]
    policy.swap_ema()
    try:
        with policy.backbone_guidance(cfg.eval_guidance):
            traj, _ = sample(policy.backbone, prompts, generators([(10_007, p, k) for k, p in mine]), cfg.eval_steps,
                             "ode", 0.0, max(cfg.micro_batch, 1) * 4, device, autocast=autocast)
        images = policy.backbone.decode(traj.final)[:n_mine]
    finally:
        policy.swap_ema()
    mine, prompts = mine[:n_mine], prompts[:n_mine]
    out = metrics(images, prompts, [eval_meta[p] for _, p in mine])
    sums = torch.stack([torch.nansum(v) for v in out.components.values()] +
                       [torch.isfinite(v).sum() for v in out.components.values()]).double()
    sums = all_reduce(sums)
    m = len(out.components)
    result = {f"eval/{k}": float(sums[i] / sums[m + i].clamp(min=1)) for i, k in enumerate(out.components)}
    # the image grid: up to 10 fixed noises (rows) x 10 prompts (columns) of this rank's share
    keep = [i for i, (k, p) in enumerate(mine) if k < 10 and p < 10]
    return result, images[keep]


# -- planning: batch arithmetic, schedule and memory, before any weight is loaded ----------------------------------
def world_sizes(cfg: Config, upto: int = 64) -> list[int]:
    """World sizes the batch arithmetic divides into: whole groups per rank, whole micro-batches per update."""
    ok = []
    for w in range(1, upto + 1):
        per_rank = cfg.prompts_per_iter // w * cfg.group_size
        if cfg.prompts_per_iter % w == 0 and per_rank % cfg.updates_per_iter == 0 and \
                (per_rank // cfg.updates_per_iter) % cfg.micro_batch == 0:
            ok.append(w)
    return ok


def describe(cfg: Config, world: int, check_files: bool = True) -> tuple[list[str], dict]:
    """Human-readable plan of a run on `world` GPUs: model, schedules, trained steps, batch arithmetic, per-GPU memory
    estimate and (check_files) whether the weights and prompts are there. Loads no weights."""
    import models

    per_rank_prompts = cfg.prompts_per_iter // world
    n_local = per_rank_prompts * cfg.group_size
    chunk = n_local // cfg.updates_per_iter
    plan: dict = dict(world=world, images_per_iteration=cfg.prompts_per_iter * cfg.group_size,
                      prompts_per_gpu=per_rank_prompts, images_per_gpu=n_local, updates=cfg.updates_per_iter,
                      images_per_update_per_gpu=chunk, micro_batches_per_update=chunk // cfg.micro_batch,
                      world_sizes=world_sizes(cfg))
    lines = [f"preset {cfg.preset}: model {cfg.model}, sampler {cfg.sampler} eta {cfg.eta}, reward {cfg.reward}, "
             f"prompts {cfg.prompts}"]
    if cfg.model == "digits":
        kind, image_tokens, grid_fn = "flux", 16, lambda n: models.model_sigmas("flux", {}, 16, n, cfg.shift)
        info = None
    else:
        info = models.model_info(cfg.model)
        kind = info.kind
        res = cfg.resolution or info.default_resolution
        image_tokens = (res // (info.vae_scale_factor * 2)) ** 2  # FLUX 2x2 packing / SD3 patch 2: 16 px per token
        grid_fn = lambda n: models.model_sigmas(kind, info.scheduler, image_tokens, n, cfg.shift)  # noqa: E731
        guidance = cfg.guidance if cfg.guidance >= 0 else (models.DEFAULT_GUIDANCE[kind] if kind == "sd3" or
                                                           info.transformer.get("guidance_embeds") else None)
        if res % (info.vae_scale_factor * 2):
            raise SystemExit(f"config error: resolution {res} must be a multiple of {info.vae_scale_factor * 2} for "
                             f"{cfg.model} (VAE scale {info.vae_scale_factor} x 2x2 patches)")
        plan.update(kind=kind, resolution=res, guidance=guidance)
        lines.append(f"  {kind}: {res}x{res} px = {image_tokens} image tokens; guidance {guidance}"
                     f"{' (CFG: 2 forwards per sample)' if kind == 'sd3' and guidance and guidance > 1 else ''}"
                     f"{'; eval guidance ' + str(cfg.eval_guidance) if cfg.eval_guidance >= 0 else ''}")
    grid, eval_grid = grid_fn(cfg.num_steps), grid_fn(cfg.eval_steps)
    # which steps train: the sampler's own std decides which steps are stochastic (CPS: not the last)
    x = torch.zeros(1, 4)
    stochastic = torch.tensor([bool((sampling.get_sampler(cfg.sampler)(x, x, float(grid[k]), float(grid[k + 1]),
                                                                        cfg.eta)[1] > 0).any())
                               for k in range(cfg.num_steps)])
    if cfg.sde_window:
        stochastic[cfg.sde_window:] = False  # the window's size; its position is drawn per iteration
    k_trained = (len(grpo.ordered_timesteps(stochastic, cfg.timestep_fraction)) if cfg.timesteps == "ordered" else
                 max(1, int(cfg.timestep_fraction * int(stochastic[:-1].sum()))))
    plan.update(sigmas=[round(float(t), 4) for t in grid], eval_sigmas=[round(float(t), 4) for t in eval_grid],
                trained_steps=k_trained)
    lines.append(f"  schedule ({cfg.num_steps} steps): {' '.join(f'{float(t):.4f}' for t in grid)}")
    lines.append(f"  eval: ODE, {cfg.eval_steps} steps, {cfg.eval_per_prompt} image(s) per held-out prompt, EMA "
                 f"weights, every {cfg.eval_every} iterations")
    lines.append(f"  trained steps per sample: {k_trained} of {cfg.num_steps} ({cfg.timesteps})")
    lines.append(f"  batch on {world} GPU(s): {cfg.prompts_per_iter} prompts x {cfg.group_size} = "
                 f"{plan['images_per_iteration']} images per iteration; per GPU {per_rank_prompts} prompts = "
                 f"{n_local} images; {cfg.updates_per_iter} updates of {chunk} images per GPU = "
                 f"{chunk // cfg.micro_batch} micro-batches of {cfg.micro_batch} x {k_trained} steps")
    lines.append(f"  world sizes this batch arithmetic supports (up to 64): {plan['world_sizes']}")
    if info is not None:
        rewards = [*parse_reward_names(cfg.reward), *parse_reward_names(cfg.eval_metrics)]
        est = models.memory_estimate(
            info, resolution=plan["resolution"], max_sequence_length=cfg.max_sequence_length or
            (512 if kind == "flux" else 256), micro_batch=cfg.micro_batch,
            cfg_forward=kind == "sd3" and bool(plan["guidance"]) and plan["guidance"] > 1, world=world,
            parallel=cfg.parallel, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
            lora_targets=cfg.lora_targets.split(","), ema=cfg.ema_decay > 0, offload=cfg.offload, rewards=rewards,
            bf16=cfg.precision == "auto")
        g = est["gb"]
        plan["memory"] = est
        what = (f"LoRA r{cfg.lora_rank} = {est['trainable_params'] / 1e6:,.1f} M" if cfg.lora_rank else
                f"full fine-tuning = {est['trainable_params'] / 1e6:,.1f} M")
        shard = f", 1/{world}" if cfg.parallel == "fsdp" and world > 1 else ""
        ck = cfg.gradient_checkpointing
        names = ", ".join(f"{n} x{rewards.count(n)}" if rewards.count(n) > 1 else n for n in dict.fromkeys(rewards))
        rows = [(f"transformer weights, {'bf16' if cfg.precision == 'auto' else 'fp32'}"
                 f"{shard + ' + 2 gathered blocks' if shard else ''}", g["weights"]),
                (f"trained weights + grads + AdamW m, v{' + EMA' if cfg.ema_decay > 0 else ''}, fp32{shard}",
                 g["trainable"]),
                (f"activations, batch {est['forward_batch']} x ({est['image_tokens']}+{est['text_tokens']} tokens)"
                 f"{' <-' if not ck else ''}", g["activations"]),
                (f"activations with block checkpointing{' <-' if ck else ''}", g["activations_checkpointing"]),
                ("text encoders, bf16" + (" (offloaded: transient)" if cfg.offload else ""), g["text_encoders"]),
                ("VAE weights, bf16", g["vae"]), ("VAE decode of 8 images (transient)", g["vae_decode"]),
                (f"reward models ({names}), fp32", g["rewards"]),
                (f"peak, checkpointing {'on' if ck else 'off'}", g["peak_checkpointing"] if ck else g["peak"]),
                (f"peak, checkpointing {'off' if ck else 'on'}", g["peak"] if ck else g["peak_checkpointing"])]
        lines.append(f"  per-GPU memory estimate in GiB ({cfg.parallel.upper()} on {world} GPU(s); transformer "
                     f"{est['params'] / 1e6:,.1f} M params; {what} trained; activations +-50%):")
        lines += [f"    {label:<64}{value:8.2f}" for label, value in rows]
        if check_files:
            lines.append("  weights: " + info.weights)
    if check_files:
        try:
            n_train, n_test = (len(load_prompts(cfg.prompts, s, cfg.seed)[0]) for s in ("train", "test"))
            lines.append(f"  prompts: {n_train} train / {n_test} held-out")
        except (ValueError, OSError) as e:
            lines.append("  prompts: " + prompt_error(cfg, e))
    return lines, plan


def parse_reward_names(spec: str) -> list[str]:
    from rewards import parse_spec

    return list(parse_spec(spec))


def prompt_error(cfg: Config, e: BaseException) -> str:
    hint = PROMPT_SOURCES.get(cfg.prompts)
    return f"{e}" + (f"\n  the prompts of preset {cfg.preset} come from {hint}; or pass --prompts your_file.txt"
                     if hint else "")


def dry_run(cfg: Config) -> dict:
    """--dry_run: validate for the planned world size and print the plan; nothing is loaded or launched."""
    world = cfg.dry_run_gpus or int(os.environ.get("WORLD_SIZE", 0)) or PRESET_GPUS.get(cfg.preset, 1)
    try:
        validate(cfg, world)
    except SystemExit as e:
        raise SystemExit(f"{e}\n(world sizes this batch arithmetic supports: {world_sizes(cfg)})") from None
    try:
        lines, plan = describe(cfg, world)
    except ValueError as e:
        raise SystemExit(f"model error: {e}") from None
    print("\n".join(lines))
    return dict(summary={}, history=[], policy=None, plan=plan)


def check_model(cfg: Config, is_main: bool) -> None:
    """Fail before any work when the weights are missing: rank 0 resolves (and, online, downloads) the model and
    tells every rank its verdict, so no rank waits at a barrier for a rank that has exited."""
    import models

    if cfg.model == "digits":
        return
    verdict = [None]
    if is_main:
        try:
            models.resolve_model(cfg.model)
        except ValueError as e:
            verdict = [str(e)]
    if dist.is_initialized():
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise SystemExit(f"model error: {verdict[0]}")


# -- the loop ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    """Run GRPO; returns {'summary': base vs trained metrics (rank 0), 'history': per-iteration logs, 'policy'}."""
    cfg = parse_config(argv)
    if cfg.dry_run:
        return dry_run(cfg)
    world = int(os.environ.get("WORLD_SIZE", 1))
    validate(cfg, world)
    rank, world, device = setup_distributed(cfg)
    is_main = rank == 0
    print0 = print if is_main else (lambda *a, **k: None)
    out = Path(cfg.output_dir)
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and ckpt is None:
        raise SystemExit(f"--resume: no checkpoint in {out / 'checkpoints'}; run without --resume to start fresh")
    if ckpt is not None:
        saved = json.loads((out / "config.json").read_text())
        defaults = dataclasses.asdict(Config())  # fields added after the run started count as their defaults
        diff = {k: (saved.get(k, defaults[k]), v) for k, v in dataclasses.asdict(cfg).items()
                if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != v}
        if diff:
            raise SystemExit(f"--resume with a different config: {diff} (saved, given). Resume with the saved "
                             f"values, or start a new output_dir.")
    elif is_main and (out / "checkpoints").exists():
        raise SystemExit(f"{out} already holds a run; pass --resume to continue it or choose another --output_dir")

    import models
    from rewards import RewardModel, nan_mean

    bf16 = device.type == "cuda" and cfg.precision == "auto"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext
    try:  # every rank reads the prompts (cheap), so a missing file stops all of them alike
        train_prompts, train_meta = load_prompts(cfg.prompts, "train", cfg.seed)
        eval_prompts, eval_meta = load_prompts(cfg.prompts, "test", cfg.seed)
    except (ValueError, OSError) as e:
        raise SystemExit("prompt error: " + prompt_error(cfg, e)) from None
    check_model(cfg, is_main)
    print0("\n".join(describe(cfg, world, check_files=False)[0]))  # the plan and memory estimate, checked above
    reward_opts = json.loads(cfg.reward_options)
    load_options = dict(resolution=cfg.resolution, guidance=cfg.guidance, max_sequence_length=cfg.max_sequence_length,
                        shift=cfg.shift)
    if cfg.model != "digits":
        load_options.update(offload=cfg.offload, dtype=torch.bfloat16 if bf16 else torch.float32)
    try:
        with rank_zero_first():
            reward_fn = RewardModel(cfg.reward, device=device, **reward_opts)  # fails now if weights are missing
            metrics = RewardModel(cfg.eval_metrics, device=device, **reward_opts)
            backbone = models.load_backbone(cfg.model, device=device, **load_options)
    except ValueError as e:  # e.g. guidance for FLUX.1-schnell, a resolution the VAE/patching cannot split
        raise SystemExit(f"config error: {e}") from None
    policy = Policy(cfg, backbone, device, world)
    per_rank_prompts = cfg.prompts_per_iter // world
    n_local = per_rank_prompts * cfg.group_size
    chunk = n_local // cfg.updates_per_iter
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    print0(json.dumps(dataclasses.asdict(cfg), indent=1))
    print0(f"world {world} on {device}; per iteration {cfg.prompts_per_iter} prompts x {cfg.group_size} = "
           f"{cfg.prompts_per_iter * cfg.group_size} samples ({n_local} per rank); {cfg.updates_per_iter} updates "
           f"of {chunk} samples per rank in micro-batches of {cfg.micro_batch}; "
           f"{sum(p.numel() for p in policy.params) * (world if policy.fsdp else 1):,} trainable "
           f"{'LoRA ' if cfg.lora_rank else ''}parameters ({cfg.parallel if world > 1 else 'one process'})")

    history: list[dict] = []
    start = 1
    if ckpt is not None:
        st = torch.load(ckpt / "training_state.pt", weights_only=False)
        if policy.fsdp:
            policy.load_sharded(ckpt / "dcp")
        else:
            policy.load_state(st)
        history, start = st["history"], st["iteration"] + 1
        torch.set_rng_state(st["torch_rng"])
        print0(f"resumed from {ckpt} at iteration {st['iteration']}")
    logger = __import__("logs").Logger(out, is_main, cfg.tensorboard)
    if ckpt is not None:
        logger.rewrite(history)
    window = None
    if cfg.sde_window:
        lo, hi = (int(s) for s in cfg.sde_window_range.split(",")) if cfg.sde_window_range else (0, None)

    def run_eval(it: int) -> dict:
        res, images = evaluate(policy, cfg, metrics, eval_prompts, eval_meta, rank, world, device, autocast)
        if is_main:
            import logs

            logs.image_grid(images, min(10, cfg.eval_per_prompt), out / "images" / f"eval_{it:05d}.png")
        return res

    if start == 1:
        base = run_eval(0)
        history.append(dict(iteration=0, **base))
        logger.log(history[-1])
        print0("base model (ODE, held-out): " + "  ".join(f"{k[5:]} {v:.4f}" for k, v in base.items()))

    from tqdm.auto import tqdm

    bar = tqdm(range(start, cfg.iterations + 1), disable=not is_main, desc="GRPO", dynamic_ncols=True)
    for it in bar:
        tm: dict[str, float] = {}
        t0 = time.perf_counter()
        # 1. prompts and seeds: a deterministic function of (seed, iteration), the same on every rank
        rng = np.random.default_rng(seed_of(cfg.seed, it))
        ids = rng.choice(len(train_prompts), cfg.prompts_per_iter, replace=len(train_prompts) < cfg.prompts_per_iter)
        mine = ids[rank * per_rank_prompts:(rank + 1) * per_rank_prompts]
        prompts = [train_prompts[i] for i in mine for _ in range(cfg.group_size)]
        meta = [train_meta[i] for i in mine for _ in range(cfg.group_size)]
        slots = [(cfg.seed, it, q, m) for q in range(rank * per_rank_prompts, (rank + 1) * per_rank_prompts)
                 for m in range(cfg.group_size)]
        gens = generators(slots)
        # one initial noise per group (DanceGRPO): seeded by member index group_size, which no sample's own noise
        # uses (SeedSequence takes only non-negative parts)
        same = generators([(cfg.seed, it, s[2], cfg.group_size) for s in slots]) if cfg.same_noise_in_group else None
        if cfg.sde_window:
            window = grpo.draw_sde_window(cfg.num_steps, cfg.sde_window, lo, hi,
                                          torch.Generator().manual_seed(seed_of(cfg.seed, it, 1)))
        # 2. rollout with the current policy (no grad)
        policy.module.eval()
        with torch.no_grad():
            traj, cond = sample(backbone, prompts, gens, cfg.num_steps, cfg.sampler, cfg.eta, cfg.micro_batch, device,
                                window=window, log_prob=cfg.log_prob or None, same_noise=same, autocast=autocast)
            tm["rollout"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            images = backbone.decode(traj.final if cfg.reward_image == "final" else traj.x0_hat)
            tm["decode"] = time.perf_counter() - t1
        # 3. rewards -> advantages over the whole world's batch (groups never straddle ranks)
        t1 = time.perf_counter()
        rew = reward_fn(images, prompts, meta)
        train_metrics = metrics(images, prompts, meta) if is_main else None
        tm["reward"] = time.perf_counter() - t1
        all_r = all_gather_cat(rew.total.to(device)).cpu()
        groups = torch.arange(len(all_r)) // cfg.group_size
        adv_all = grpo.ADVANTAGES[cfg.advantage](all_r, groups, clip=cfg.adv_clip,
                                                 **({"global_std": cfg.global_std} if cfg.advantage == "flow_grpo"
                                                    else {}))
        adv = adv_all[rank * n_local:(rank + 1) * n_local].to(device)
        keep = rew.valid.to(device) & ((adv != 0) if cfg.drop_zero_adv else True)
        # 4. which steps each sample trains: (n_local, K)
        step_gen = torch.Generator().manual_seed(seed_of(cfg.seed, it, 2, rank))
        if cfg.timesteps == "ordered":
            steps = grpo.ordered_timesteps(traj.stochastic, cfg.timestep_fraction).expand(n_local, -1)
        else:
            steps = grpo.random_timesteps(traj.stochastic, n_local, cfg.timestep_fraction, step_gen)
        steps = steps.to(device)
        K = steps.shape[1]
        # 5. updates: shuffle, split into chunks, micro-batches with gradient accumulation
        t1 = time.perf_counter()
        policy.module.train()
        perm = torch.randperm(n_local, generator=step_gen).to(device)
        agg: dict[str, list] = {"loss": [], "kl": [], "clipfrac": [], "approx_kl": [], "ratio_mean": [],
                                "ratio_min": [], "ratio_max": [], "grad_norm": []}
        kept_total = 0
        for u in range(cfg.updates_per_iter):
            rows_u = perm[u * chunk:(u + 1) * chunk]
            rows_u = rows_u[keep[rows_u]]
            n_kept = all_reduce(torch.tensor([len(rows_u)], dtype=torch.float64)).item()
            kept_total += int(n_kept)
            if n_kept == 0 or K == 0:
                continue
            n_mb = int(all_reduce(torch.tensor([math.ceil(len(rows_u) / cfg.micro_batch)]), dist.ReduceOp.MAX
                                  if dist.is_initialized() else None).item())
            scale = world / (n_kept * K)  # DDP averages over ranks; this turns it into a world-wide mean
            for b in range(n_mb):
                rows = rows_u[b * cfg.micro_batch:(b + 1) * cfg.micro_batch]
                weight = scale
                if len(rows) == 0:  # padding so every rank runs the same number of forwards (DDP/FSDP collectives)
                    rows, weight = perm[:1], 0.0
                for j in range(K):
                    with grad_sync(policy.module, b == n_mb - 1 and j == K - 1):
                        loss, kl, st = step_terms(policy, cfg, traj, cond, rows, steps[rows, j], adv, autocast)
                        total = loss.sum() + (cfg.beta * kl.sum() if kl is not None else 0.0)
                        (total * weight).backward()
                    if weight:
                        agg["loss"].append(float(loss.detach().mean()))
                        agg["kl"].append(float(kl.detach().mean()) if kl is not None else float("nan"))
                        for k in ("clipfrac", "approx_kl", "ratio_mean", "ratio_min", "ratio_max"):
                            agg[k].append(st[k])
                        if u == 0:
                            agg.setdefault("first_ratio_max_dev", []).append(max(abs(st["ratio_max"] - 1),
                                                                                 abs(st["ratio_min"] - 1)))
            t_opt = time.perf_counter()
            norm = torch.nn.utils.clip_grad_norm_(policy.params, cfg.max_grad_norm)
            agg["grad_norm"].append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
            policy.opt.step()
            policy.opt.zero_grad(set_to_none=True)
            policy.update_ema()
            tm["optim"] = tm.get("optim", 0.0) + time.perf_counter() - t_opt
        tm["train"] = time.perf_counter() - t1 - tm.get("optim", 0.0)  # forward + backward of the loss terms
        # 6. logging, evaluation, checkpoints
        t1 = time.perf_counter()
        row = dict(iteration=it, reward=nan_mean(all_r), reward_std=float(all_r[torch.isfinite(all_r)].std())
                   if torch.isfinite(all_r).sum() > 1 else 0.0,
                   invalid=int(all_reduce(torch.tensor([int((~rew.valid).sum())])).item()), kept=kept_total)
        for k, v in rew.components.items():
            if len(rew.components) > 1:
                row[f"reward/{k}"] = nan_mean(all_gather_cat(v.to(device)).cpu())
        if train_metrics is not None:
            row.update({f"train/{k}": nan_mean(v) for k, v in train_metrics.components.items()})
        for k, v in agg.items():
            if k in ("ratio_min", "first_ratio_max_dev"):
                row[k] = min(v) if k == "ratio_min" and v else (max(v) if v else float("nan"))
            elif k == "ratio_max":
                row[k] = max(v) if v else float("nan")
            else:
                row[k] = float(np.nanmean(v)) if v and not all(map(math.isnan, v)) else float("nan")
        if it % cfg.eval_every == 0 or it == cfg.iterations:
            row.update(run_eval(it))
            if is_main:
                import logs

                shown = [i for i in range(min(n_local, 8 * cfg.group_size)) if i % cfg.group_size < 8]
                logs.image_grid(images[shown], min(8, per_rank_prompts), out / "images" / f"train_{it:05d}.png")
        tm["eval"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        row.update({f"time/{k}": v for k, v in tm.items()})
        history.append(row)
        logger.log(row)
        if is_main:
            evs = "  ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("eval/"))
            bar.write(f"it {it:4d} | reward {row['reward']:.4f} | clipfrac {row['clipfrac']:.3f} approx_kl "
                      f"{row['approx_kl']:.2e} kl {row['kl']:.2e} | invalid {row['invalid']} | rollout "
                      f"{tm['rollout']:.2f}s reward {tm['reward']:.2f}s train {tm['train']:.2f}s" +
                      (f" | eval: {evs}" if evs else ""))
        if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
            if is_main or policy.fsdp:  # FSDP2: every rank writes its shards
                save_checkpoint(out, it, policy, history, cfg, is_main)
            if dist.is_initialized():
                dist.barrier()
            if it == cfg.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        history[-1]["time/log_checkpoint"] = time.perf_counter() - t1  # in the returned history, not the JSONL
    logger.close()
    summary = {}
    if is_main:
        import logs

        base = next(h for h in history if h["iteration"] == 0)
        last = [h for h in history if any(k.startswith("eval/") for k in h)][-1]
        curve = logs.reward_curves(history, out / "reward_curve.png",
                                   f"{cfg.sampler} eta={cfg.eta} on {cfg.model}")
        print("\nheld-out metrics (ODE, EMA weights)      base  ->  trained")
        for k in base:
            if k.startswith("eval/"):
                print(f"  {k[5:]:<36} {base[k]:.4f} -> {last[k]:.4f}")
                summary[k] = (base[k], last[k])
        print(f"figures: {curve}  {out / 'images'}\ncheckpoint: {latest_checkpoint(out)}\nlog: {out / 'metrics.jsonl'}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return dict(summary=summary, history=history, policy=policy)


if __name__ == "__main__":
    main(sys.argv[1:])
