"""Configuration of a run: the Config dataclass (one documented field per option), the paper's presets, the
command-line parser generated from the fields, validation before any work, and the dry-run plan (batch arithmetic,
schedules and a per-GPU memory estimate) that needs no weights. train.py runs what this file describes."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field

import torch

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


def load_prompts(name: str, split: str, seed: int) -> tuple[list[str], list]:
    if name == "digits":
        import digits

        ps = digits.prompts(split)
        return ps, [None] * len(ps)
    import prompts

    return prompts.load(name, split, seed)


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
