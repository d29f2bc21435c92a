"""GRPO fine-tuning of flow-matching models with Coefficients-Preserving Sampling (Wang & Yu, arXiv 2509.05952).

    torchrun --standalone --nproc_per_node=2 train.py          # the built-in tiny FLUX on digits, CPU, ~3 min
    python train.py --sampler flow_sde --eta 0.7               # the paper's baseline sampler, one flag
    python train.py --help                                     # every option, with its meaning

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
    model: str = F("digits", "'digits' (built-in tiny FLUX) or a hub id / local diffusers folder")
    prompts: str = F("digits", "prompt set: 'digits', 'geneval', 'ocr', or a .txt/.jsonl file")
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
    lora_rank: int = F(8, "LoRA rank")
    lora_alpha: float = F(16.0, "LoRA alpha (scale alpha / rank)")
    lora_targets: str = F(",".join(__import__("models").ATTENTION_TARGETS), "comma-separated LoRA target modules")
    ema_decay: float = F(0.9, "EMA decay of the trained weights used for evaluation (0 = no EMA)")
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


PRESETS: dict[str, dict] = {
    "tiny": {},  # the defaults: built-in digits model, CPS eta 0.7, ~3 min on 2 CPU cores
}
RESUMABLE_CHANGES = {"iterations", "resume", "kill_at", "eval_every", "checkpoint_every", "keep_checkpoints",
                     "tensorboard", "device"}


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
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
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
class Policy:
    """The backbone + its LoRA, the (DDP-wrapped) module to call for gradients, the optimizer and the EMA."""

    def __init__(self, cfg: Config, backbone, device: torch.device, world: int):
        import models

        self.backbone, self.cfg = backbone, cfg
        tr = backbone.transformer
        torch.manual_seed(cfg.seed)  # identical LoRA init on every rank (DDP also broadcasts it)
        self.params = models.add_lora(tr, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","))
        tr.to(device)
        self.names = [n for n, p in tr.named_parameters() if p.requires_grad]
        self.module = tr
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.module = DistributedDataParallel(tr, device_ids=[device.index] if device.type == "cuda" else None)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                                     eps=1e-8)
        self.ema = [p.detach().clone() for p in self.params] if cfg.ema_decay > 0 else None

    def update_ema(self) -> None:
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - self.cfg.ema_decay)

    def swap_ema(self) -> None:
        """Exchange live and EMA weights in place (call twice to restore)."""
        if self.ema is not None:
            with torch.no_grad():
                for p, e in zip(self.params, self.ema):
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
    t, t_next = traj.sigmas[steps].to(x.device), traj.sigmas[steps + 1].to(x.device)
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
def save_checkpoint(out: Path, iteration: int, policy: Policy, history: list[dict], cfg: Config) -> Path:
    """Atomic: everything is written into a temporary folder that is renamed into place, then `latest` is
    replaced atomically. A run killed at any moment leaves the previous checkpoint intact."""
    import models

    root = out / "checkpoints"
    final = root / f"iter_{iteration:06d}"
    tmp = root / f".tmp-iter_{iteration:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kind = policy.backbone.kind
    models.save_lora(policy.backbone.transformer, tmp / "lora", pipeline=kind)
    if policy.ema is not None:
        live = models.lora_state_dict(policy.backbone.transformer)
        policy.swap_ema()
        models.save_lora(policy.backbone.transformer, tmp / "lora_ema", pipeline=kind)
        policy.swap_ema()
        assert all(torch.equal(v, models.lora_state_dict(policy.backbone.transformer)[k]) for k, v in live.items())
    torch.save(dict(iteration=iteration, history=history, config=dataclasses.asdict(cfg),
                    torch_rng=torch.get_rng_state(), **policy.state()), tmp / "training_state.pt")
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
    prompts = [eval_prompts[p] for _, p in mine]
    policy.swap_ema()
    try:
        traj, _ = sample(policy.backbone, prompts, generators([(10_007, p, k) for k, p in mine]), cfg.eval_steps, "ode",
                         0.0, max(cfg.micro_batch, 1) * 4, device, autocast=autocast)
        images = policy.backbone.decode(traj.final)
    finally:
        policy.swap_ema()
    out = metrics(images, prompts, [eval_meta[p] for _, p in mine])
    sums = torch.stack([torch.nansum(v) for v in out.components.values()] +
                       [torch.isfinite(v).sum() for v in out.components.values()]).double()
    sums = all_reduce(sums)
    m = len(out.components)
    result = {f"eval/{k}": float(sums[i] / sums[m + i].clamp(min=1)) for i, k in enumerate(out.components)}
    return result, images


# -- the loop ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    """Run GRPO; returns {'summary': base vs trained metrics (rank 0), 'history': per-iteration logs, 'policy'}."""
    cfg = parse_config(argv)
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
        diff = {k: (saved[k], v) for k, v in dataclasses.asdict(cfg).items()
                if k not in RESUMABLE_CHANGES and saved.get(k) != v}
        if diff:
            raise SystemExit(f"--resume with a different config: {diff} (saved, given). Resume with the saved "
                             f"values, or start a new output_dir.")
    elif is_main and (out / "checkpoints").exists():
        raise SystemExit(f"{out} already holds a run; pass --resume to continue it or choose another --output_dir")

    import models
    from rewards import RewardModel, nan_mean

    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    train_prompts, train_meta = load_prompts(cfg.prompts, "train", cfg.seed)
    eval_prompts, eval_meta = load_prompts(cfg.prompts, "test", cfg.seed)
    reward_opts = json.loads(cfg.reward_options)
    with rank_zero_first():
        reward_fn = RewardModel(cfg.reward, device=device, **reward_opts)  # fails now if weights are missing
        metrics = RewardModel(cfg.eval_metrics, device=device, **reward_opts)
        backbone = models.load_backbone(cfg.model, device=device)
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
           f"{sum(p.numel() for p in policy.params):,} trainable LoRA parameters")

    history: list[dict] = []
    start = 1
    if ckpt is not None:
        st = torch.load(ckpt / "training_state.pt", weights_only=False)
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

            logs.image_grid(images[:min(len(images), 10 * len(eval_prompts))], min(10, cfg.eval_per_prompt),
                            out / "images" / f"eval_{it:05d}.png")
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
        same = generators([(cfg.seed, it, s[2], -1) for s in slots]) if cfg.same_noise_in_group else None
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
            agg["grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(policy.params, cfg.max_grad_norm)))
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

                logs.image_grid(images[:8 * cfg.group_size], min(8, per_rank_prompts),
                                out / "images" / f"train_{it:05d}.png")
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
            if is_main:
                save_checkpoint(out, it, policy, history, cfg)
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
