"""The plan of a run, before any weight is loaded: the algorithm's choices in the paper's words, the batch arithmetic
(computed once, here; train.py runs the same `Batch`), the schedule and the trained steps, the EMA's schedule (from
the config alone, here, so the plan states what the run uses), parameter counts and a per-GPU memory estimate.

    python train.py --preset flux-dev-pickscore --dry_run true --dry_run_gpus 8

`describe` prints the plan at the start of every run; `dry_run` validates a config for a planned world size and
prints the plan without loading anything.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import torch

import grpo
import rewards
import sampling
from flow_cps import models, prompts
from flow_cps.config import PAPER_PROMPTS, PRESET_GPUS, PRESETS, PROMPT_SOURCES, Config, parse_config, validate
from flow_cps.ema import EMASchedule
from flow_cps.memory import GB, KNOWN_MODELS, ModelInfo, Spec, memory_estimate, model_info  # noqa: F401 (plan.KNOWN_MODELS)
from flow_cps.policy import Diverged
from flow_cps.precision import precision


# -- the plan ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    """One iteration's batch arithmetic on `world` ranks, computed once: train.py runs it, the dry run prints it.

    The iteration's samples are numbered prompt-major, sample s = (prompt s // G, member s % G), and rank r holds the
    contiguous slice `rank_slice(r)`, as Flow-GRPO's distributed sampler deals them out: a group may span ranks
    (`group_span`); rewards are gathered world-wide first, so the advantages are the same. The world's kept samples
    are split into `updates` optimizer steps (grpo.split_updates); a step's (sample, trained step) terms on a rank
    run in forwards of `micro_batch` terms each (`Update`), so micro_batch is independent of how many samples a step
    holds, and every rank runs as many forwards as the busiest one (padding)."""
    world: int
    prompts: int  # per iteration, over all ranks
    group_size: int
    updates: int
    micro_batch: int

    @property
    def samples(self) -> int:
        return self.prompts * self.group_size

    @property
    def samples_per_rank(self) -> int:
        return self.samples // self.world

    def rank_slice(self, rank: int) -> slice:
        """The world's samples that rank `rank` holds."""
        return slice(rank * self.samples_per_rank, (rank + 1) * self.samples_per_rank)

    @property
    def group_span(self) -> int:
        """The most ranks one group's samples lie on."""
        n, g = self.samples_per_rank, self.group_size
        return max((q * g + g - 1) // n - q * g // n + 1 for q in range(self.prompts))

    def forwards_per_update(self, trained_steps: int) -> int:
        """Training forwards per update per rank with every sample kept (grpo.split_updates' balance)."""
        return math.ceil(math.ceil(self.samples_per_rank / self.updates) * trained_steps / self.micro_batch)

    def split(self, labels: torch.Tensor, rank: int, trained_steps: int) -> list[Update]:
        """This rank's work in each update, from the world's update labels (grpo.split_updates: every rank holds the
        same labels, so the counts need no collective)."""
        per_rank = labels.reshape(self.world, self.samples_per_rank)
        mine = per_rank[rank]
        out = []
        for u in range(self.updates):
            counts = (per_rank == u).sum(1)
            out.append(Update(rows=torch.nonzero(mine == u)[:, 0], terms=int(counts.sum()) * trained_steps,
                              forwards=math.ceil(int(counts.max()) * trained_steps / self.micro_batch),
                              micro_batch=self.micro_batch))
        return out

    def problem(self) -> str | None:
        if self.samples % self.world:
            return (f"the images per iteration ({self.samples} = prompts_per_iter {self.prompts} x group_size "
                    f"{self.group_size}) must be divisible by the world size ({self.world}): every rank samples "
                    "as many")
        if self.samples % self.updates:
            return (f"the images per iteration ({self.samples}) must be divisible by updates_per_iter "
                    f"({self.updates}): every optimizer step trains as many")
        return None


@dataclass(frozen=True)
class Update:
    """One optimizer step's work on one rank: its samples (rank-local rows), the world's (sample, step) terms (the
    objective's denominator), the forwards every rank runs (the busiest rank's count) and the terms per forward."""
    rows: torch.Tensor
    terms: int
    forwards: int
    micro_batch: int

    def micro_batches(self, steps: torch.Tensor, pad: torch.Tensor):
        """The update's forwards, each (rows, trained steps, weight): its samples' (sample, trained step) pairs,
        sample-major, `micro_batch` at a time; once this rank's pairs run out, the padding sample `pad` (`padding_row`)
        with weight 0, so that every rank runs `forwards` (DDP and FSDP2 forwards and backwards are collectives)."""
        rows = self.rows.to(steps.device)
        pair_rows, pair_ks = rows.repeat_interleave(steps.shape[1]), steps[rows].flatten()
        for f in range(self.forwards):
            part = slice(f * self.micro_batch, (f + 1) * self.micro_batch)
            if len(pair_rows[part]):
                yield pair_rows[part], pair_ks[part], 1.0
            else:
                yield pad, steps[pad, 0], 0.0


def padding_row(traj, adv: torch.Tensor, work: list[Update]) -> torch.Tensor:
    """The sample a rank pads its forwards with when another rank has more (`Update.micro_batches`): its loss is
    multiplied by 0, and 0 x NaN is NaN in backward (all-reduced to every rank), so it must be finite: a sample one
    of this rank's updates trains if there is one, else any sample whose trajectory, log-probs and advantage are
    finite."""
    finite = (torch.isfinite(traj.latents.flatten(1)).all(1) & torch.isfinite(traj.log_probs).all(1)).to(adv.device)
    finite &= torch.isfinite(adv)
    trained = torch.zeros_like(finite)
    trained[torch.cat([u.rows for u in work]).to(adv.device)] = True
    rows = torch.cat([torch.nonzero(trained & finite)[:, 0], torch.nonzero(finite)[:, 0]])[:1]
    if len(rows) == 0:
        raise Diverged("every sample of this rank is non-finite (trajectory or advantage)")
    return rows


def batch(cfg: Config, world: int) -> Batch:
    """The run's Batch; stops with the reason (and the world sizes that work) if it does not divide."""
    b = Batch(world, cfg.prompts_per_iter, cfg.group_size, cfg.updates_per_iter, cfg.micro_batch)
    if b.problem():
        raise SystemExit(f"config error: {b.problem()} (world sizes this batch arithmetic supports: "
                         f"{world_sizes(cfg)})")
    return b


def world_sizes(cfg: Config, upto: int = 64) -> list[int]:
    """World sizes the batch arithmetic divides into (up to `upto`)."""
    return [w for w in range(1, upto + 1) if Batch(w, cfg.prompts_per_iter, cfg.group_size, cfg.updates_per_iter,
                                                    cfg.micro_batch).problem() is None]


def ema_schedule(cfg: Config) -> EMASchedule | None:
    """The run's EMA schedule, from its config alone: the same at any world size (None: no EMA)."""
    if cfg.ema_decay == 0:
        return None
    return EMASchedule(cfg.ema_decay, cfg.ema_interval, cfg.ema_updates_per_step, cfg.ema_warmup)


def trained_steps(sampler: str, grid: torch.Tensor, eta: float, timesteps: str, fraction: float,
                  sde_window: int = 0) -> int:
    """K, the trained steps per sample: the stochastic steps (sampling.stochastic; CPS's last step has none) selected
    by the rule train.py uses (grpo.TIMESTEPS). With a window, its size counts (its position is drawn per iteration;
    steps outside it are never probed: CPWS is undefined on the last ones)."""
    stochastic = sampling.stochastic(sampler, grid, eta, (0, sde_window) if sde_window else None)
    return grpo.TIMESTEPS[timesteps](stochastic, 1, fraction, torch.Generator()).shape[1]


# -- the algorithm in the paper's words --------------------------------------------------------------------------
# What each declared choice (config.choice) means, as the plan prints it; tests/test_plan.py checks that every
# registered name has its words.
WORDS = {
    "sampler": {"cps": "Flow-CPS (Eq. 12): x_t' = (1 - t') x0_hat + t' cos(eta pi/2) x1_hat + t' sin(eta pi/2) eps",
                "flow_sde": "Flow-SDE, Flow-GRPO's sampler (Eq. 9), sigma_t = eta sqrt(t / (1 - t))",
                "dance_sde": "Dance-SDE, DanceGRPO's sampler (Eq. 9 with sigma_t = eta)",
                "cpws": "Flow-CPWS (Eq. 15): Flow-SDE's fresh noise, the x1_hat coefficient shrunk to keep t'",
                "dpm_sde": "SDE-DPM-Solver++1 (Appendix B, Eq. 22-24)",
                "ode": "the Euler ODE (deterministic)"},
    "log_prob": {"cps": "Eq. 14, -mean (x' - mu)^2 (FlowCPS's, without 1/(2 std^2))",
                 "gaussian": "Eq. 13, the Gaussian log-density, mean over the latent's elements"},
    "kl_form": {"mse": "FlowCPS's mean (mu - mu_ref)^2",
                "flow_grpo": "Flow-GRPO's mean (mu - mu_ref)^2 / (2 sigma_t^2)",
                "gaussian": "the exact Gaussian KL, mean (mu - mu_ref)^2 / (2 std^2)"},
    "advantage": {"flow_grpo": "Flow-GRPO's (r - group mean) / (std of the whole batch + 1e-4)",
                  "flow_grpo_group_std": "Flow-GRPO's (r - group mean) / (population std of the group + 1e-4)",
                  "dance": "DanceGRPO's (r - group mean) / (unbiased std of the group + 1e-8)"},
    "timesteps": {"ordered": "the first {k} of the {n} steps, in order (Flow-GRPO, fraction {f})",
                  "random": "a random {k} of the stochastic steps before the last, per sample (DanceGRPO, fraction "
                            "{f})"},
    "precision": {"bf16": "bf16 frozen weights under bf16 autocast; trained weights, sampler math and the VAE fp32",
                  "fp16": "fp16 frozen weights under fp16 autocast with dynamic loss scaling; trained weights, "
                          "sampler math and the VAE fp32",
                  "fp32": "fp32 throughout"},
}


def ema_words(e: EMASchedule | None) -> str:
    if e is None:
        return "none: evaluation and exports use the live weights"
    decay = f"the warm-up decay min((1 + s)/(10 + s), {e.decay:g})" if e.warmup else f"{e.decay:g}"
    when = ("after every optimizer step" if e.interval == 1 else
            f"at the optimizer steps s with (s + 1) % {e.interval} == 0")
    n = e.updates_per_step
    count = "one update" if n == 1 else f"{n} updates (Flow-GRPO's training batches per optimizer step, its 32 GPUs')"
    return f"e <- e + (1 - d)(w - e), {count} {when}, d = {decay}"


def algorithm(cfg: Config, b: Batch, k: int, device: str) -> list[str]:
    """The algorithm's choices, one line each, in words a reader of the paper recognises."""
    kl = (f"beta {cfg.beta:g} x {WORDS['kl_form'][cfg.kl_form_used]}, to the LoRA-off reference" if cfg.beta > 0
          else "none (beta 0)")
    window = (f"; stochastic only in a window of {cfg.sde_window} steps drawn each iteration (Flow-GRPO-Fast)"
              if cfg.sde_window else "")
    what = (f"LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g}" if cfg.lora else "every transformer weight (full "
            "fine-tuning)")
    prec = precision(cfg.precision, torch.device(device))
    return ["  the algorithm (GRPO, one iteration = rollout, rewards, advantages, updates):",
            f"    sampler: {WORDS['sampler'][cfg.sampler]}, eta {cfg.eta:g}{window}; "
            f"{'one initial noise per group; ' if cfg.same_noise_in_group else ''}"
            f"the reward scores the {'last x0_hat' if cfg.reward_image == 'x0_hat' else 'final sample'}",
            f"    log-prob: {WORDS['log_prob'][cfg.log_prob_used]}",
            f"    advantage: {WORDS['advantage'][cfg.advantage]}, clipped to +-{cfg.adv_clip:g}"
            + ("; samples with advantage 0 are skipped" if cfg.drop_zero_adv else ""),
            "    trained steps: " + WORDS["timesteps"][cfg.timesteps].format(k=k, n=cfg.num_steps,
                                                                              f=cfg.timestep_fraction),
            f"    loss: PPO's clipped surrogate, clip range {cfg.clip_range:g}; KL: {kl}",
            f"    optimizer: AdamW lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}, gradient-norm clip "
            f"{cfg.max_grad_norm:g}, {b.updates} optimizer step{'s' * (b.updates > 1)} per iteration; trained: {what}",
            f"    EMA: {ema_words(ema_schedule(cfg))}",
            f"    precision: {prec.name}: {WORDS['precision'][prec.name]}"]


def describe(cfg: Config, world: int, check_files: bool = True, device: str = "cuda") -> tuple[list[str], dict]:
    """Human-readable plan of a run on `world` ranks of `device` type: the algorithm's choices, model, schedules,
    batch arithmetic, (on GPUs) the per-GPU memory estimate and (check_files) whether the weights and prompts are
    there. Loads no weights."""
    b = batch(cfg, world)
    unit = "GPU" if device != "cpu" else "process"  # a CPU run's ranks are processes
    ranks = f"{world} {unit}" + ("" if world == 1 else "es" if unit == "process" else "s")
    per_update = math.ceil(b.samples_per_rank / b.updates)
    plan: dict = dict(world=world, images_per_iteration=b.samples, images_per_gpu=b.samples_per_rank,
                      group_span=b.group_span, updates=b.updates, images_per_update_per_gpu=per_update,
                      world_sizes=world_sizes(cfg))
    lines = [f"preset {cfg.preset}: model {cfg.model}, reward {cfg.reward}, prompts {cfg.prompts}"]
    lines += [f"  {note}" for note in [prompt_note(cfg)] if note]
    info = None
    if cfg.model in models.BUILT_IN:
        image_tokens = (cfg.resolution or models.BUILT_IN[cfg.model][0].SIZE) ** 2 // 4
        grid_fn = lambda n: models.model_sigmas("flux", {}, image_tokens, n, cfg.shift)  # noqa: E731
    else:
        info = model_info(cfg.model)
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
    k = trained_steps(cfg.sampler, grid, cfg.eta, cfg.timesteps, cfg.timestep_fraction, cfg.sde_window)
    plan.update(sigmas=[round(float(t), 4) for t in grid], eval_sigmas=[round(float(t), 4) for t in eval_grid],
                trained_steps=k, forwards_per_update=b.forwards_per_update(k))
    lines += algorithm(cfg, b, k, device)
    lines.append(f"  schedule ({cfg.num_steps} steps): {' '.join(f'{float(t):.4f}' for t in grid)}"
                 + ("; the transformer gets int(1000 t)/1000 (DanceGRPO)" if cfg.quantize_timesteps else ""))
    lines.append(f"  eval: ODE, {cfg.eval_steps} steps, {cfg.eval_per_prompt} image(s) per held-out prompt, "
                 f"{'EMA' if cfg.ema_decay > 0 else 'live (no EMA)'} weights, every {cfg.eval_every} iterations")
    span = ("each group on one " + unit if b.group_span == 1 else
            f"a group of {b.group_size} spans up to {b.group_span} {unit}{'es' if unit == 'process' else 's'}")
    lines.append(f"  batch on {ranks}: {cfg.prompts_per_iter} prompts x {cfg.group_size} = {b.samples} images per "
                 f"iteration; {b.samples_per_rank} images per {unit} ({span}); {b.updates} updates of "
                 f"{b.samples // b.updates} images (~{per_update} per {unit}) x {k} steps = {per_update * k} (sample, "
                 f"step) terms per {unit}, flattened into {b.forwards_per_update(k)} training forwards of <= "
                 f"{cfg.micro_batch} terms; rollout and evaluation forwards of <= {cfg.micro_batch} samples")
    lines.append(f"  world sizes this batch arithmetic supports (up to 64): {plan['world_sizes']}")
    if info is not None and device != "cpu":
        lines += _memory_lines(cfg, info, plan, world)
        if check_files:
            lines.append("  weights: " + info.weights)
    if check_files:
        try:
            n_train, n_test = (len(prompts.load(cfg.prompts, s, cfg.seed)[0]) for s in ("train", "test"))
            lines.append(f"  prompts: {n_train} train / {n_test} held-out")
        except (ValueError, OSError) as e:
            lines.append("  prompts: " + prompt_error(cfg, e))
    return lines, plan


def run_estimate(cfg: Config, info: ModelInfo, plan: dict, world: int) -> dict:
    """memory.memory_estimate for this config on `world` GPUs (the planned GPU's precision: 'auto' is bf16)."""
    b = batch(cfg, world)
    return memory_estimate(info, Spec(
        resolution=plan["resolution"], max_sequence_length=cfg.max_sequence_length or
        (512 if info.kind == "flux" else 256), micro_batch=cfg.micro_batch,
        cfg_forward=info.kind == "sd3" and bool(plan["guidance"]) and plan["guidance"] > 1, world=world,
        parallel=cfg.parallel, trained=cfg.lora, ema=cfg.ema_decay > 0, offload=cfg.offload,
        rewards=(*rewards.parse_spec(cfg.reward), *rewards.parse_spec(cfg.eval_metrics)),
        precision="bf16" if cfg.precision == "auto" else cfg.precision, samples_per_rank=b.samples_per_rank,
        num_steps=cfg.num_steps, kl=cfg.beta > 0, embedding_cache_gb=cfg.embedding_cache_gb))


def _memory_lines(cfg: Config, info: ModelInfo, plan: dict, world: int) -> list[str]:
    est = plan["memory"] = run_estimate(cfg, info, plan, world)
    g, b = est["gb"], batch(cfg, world)
    reward_names = [*rewards.parse_spec(cfg.reward), *rewards.parse_spec(cfg.eval_metrics)]
    what = (f"LoRA r{cfg.lora_rank} = {est['trainable_params'] / 1e6:,.1f} M" if cfg.lora_rank else
            f"full fine-tuning = {est['trainable_params'] / 1e6:,.1f} M")
    fsdp = cfg.parallel == "fsdp"
    shard = f", 1/{world}" if fsdp else ""
    ck = cfg.gradient_checkpointing
    prec = "bf16" if cfg.precision == "auto" else cfg.precision
    names = ", ".join(f"{n} x{reward_names.count(n)}" if reward_names.count(n) > 1 else n
                      for n in dict.fromkeys(reward_names))
    fits = int(cfg.embedding_cache_gb * 1024 / est["embedding_mib"])
    acc = ("DDP buckets" if not fsdp else "FSDP2: blocks being reduce-scattered" if cfg.lora_rank == 0 else
           "FSDP2: unsharded LoRA grads until the last micro-batch")
    rows = [(f"transformer weights, {prec}{shard}", g["weights"]),
            ("  all-gathered root + 2 blocks while a forward runs (FSDP2)", g["gathered"]),
            (f"trained weights + grads + AdamW m, v{' + EMA' if cfg.ema_decay > 0 else ''}, fp32{shard}",
             g["trainable"]),
            (f"gradient accumulation buffers ({acc if world > 1 or fsdp else 'none'})", g["accumulation"]),
            (f"training activations, {est['forward_batch']} terms x ({est['image_tokens']}+{est['text_tokens']} "
             f"tokens){' <-' if not ck else ''}", g["activations"]),
            (f"training activations with block checkpointing{' <-' if ck else ''}", g["activations_checkpointing"]),
            (f"rollout buffers: {b.samples_per_rank} samples' latents, embeddings, images", g["rollout_buffers"]),
            (f"text encoders, {prec}" + (" (offloaded: transient)" if cfg.offload else ""), g["text_encoders"]),
            ("VAE weights, fp32", g["vae"]), ("VAE decode of <= 8 images, fp32 (transient)", g["vae_decode"]),
            (f"evaluation, streamed: {cfg.micro_batch} samples per forward (transient)", g["evaluation"]),
            ("AdamW step (transient)", g["optimizer_step"]),
            (f"reward models ({names}), fp32", g["rewards"]),
            (f"peak, checkpointing {'on' if ck else 'off'}", g["peak_checkpointing"] if ck else g["peak"]),
            (f"peak, checkpointing {'off' if ck else 'on'}", g["peak"] if ck else g["peak_checkpointing"])]
    return [f"  per-GPU memory estimate in GiB ({cfg.parallel.upper()} on {world} GPU(s); {prec}; transformer "
            f"{est['params'] / 1e6:,.1f} M params; {what} trained; activations +-50%):",
            *(f"    {label:<72}{value:8.2f}" for label, value in rows),
            f"  host RAM per rank: prompt-embedding cache <= {cfg.embedding_cache_gb:g} GiB (--embedding_cache_gb; "
            f"one prompt = {est['embedding_mib']:.2f} MiB: {fits:,} prompts)"
            + (f"; offloaded text encoders {g['text_encoders']:.1f} GiB" if cfg.offload else "")] + \
        ([f"  offload costs: the text encoders ({g['text_encoders']:.1f} GiB) go to the GPU and back for every batch "
          f"with prompts not yet cached (~{2 * g['text_encoders'] * GB / PAGEABLE_BYTES_PER_S:.1f} s at "
          f"{PAGEABLE_BYTES_PER_S / 1e9:.0f} GB/s, pageable host memory), the VAE ({g['vae']:.1f} GiB) for every "
          f"decode (~{2 * g['vae'] * GB / PAGEABLE_BYTES_PER_S:.2f} s)"] if cfg.offload else [])


# Host-to-GPU copies from pageable (not pinned) memory, what `module.to(device)` does: an assumed typical rate (PCIe
# 4/5 x16 moves 25-50 GB/s from pinned memory; pageable copies are staged through a pinned buffer). Measure yours.
PAGEABLE_BYTES_PER_S = 10e9


def prompt_note(cfg: Config) -> str | None:
    """One line when a paper preset trains on a generated stand-in for the paper's prompt set (None otherwise)."""
    if cfg.preset == "tiny" or cfg.prompts not in PAPER_PROMPTS:
        return None
    kind, folder = PAPER_PROMPTS[cfg.prompts]
    return (f"prompts: this project's generated {kind} set, not the paper's; for the paper's, git clone "
            f"https://github.com/yifan123/flow_grpo and add --prompts {folder}")


def prompt_error(cfg: Config, e: BaseException) -> str:
    hint = PROMPT_SOURCES.get(cfg.prompts)
    return f"{e}" + (f"\n  the prompts of preset {cfg.preset} come from {hint}; or pass --prompts your_file.txt"
                     if hint else "")


def dry_run(cfg: Config) -> dict:
    """--dry_run: validate for the planned world size and print the plan; nothing is loaded or launched."""
    world = cfg.dry_run_gpus or int(os.environ.get("WORLD_SIZE", 0)) or PRESET_GPUS.get(cfg.preset, 1)
    validate(cfg)
    try:
        lines, plan = describe(cfg, world, device="cpu" if cfg.device == "cpu" else "cuda")
    except ValueError as e:
        raise SystemExit(f"model error: {e}") from None
    print("\n".join(lines))
    return dict(summary={}, history=[], policy=None, plan=plan)


# -- docs/SCALE.md's memory table ------------------------------------------------------------------------------------
TABLE_HEADER = ("| preset | GPUs | precision | images / iteration (per GPU) | terms per training forward | weights | "
                "trained | accum. | act. off / on | rollout | enc. | VAE + decode | eval | reward | "
                "peak, ckpt off / on |\n|" + "---|" * 15)


def memory_table(presets=None) -> str:
    """The memory table of docs/SCALE.md, from the dry run of every preset on its official GPU count and on 8;
    `python -m flow_cps.plan` prints it."""
    rows = [TABLE_HEADER]
    # the GPU presets only: the built-in CPU tasks (tiny, shapes) have no GPU memory to plan
    gpu_presets = [p for p, v in PRESETS.items() if v.get("model", "digits") not in models.BUILT_IN]
    for name in presets or gpu_presets:
        for world in dict.fromkeys([PRESET_GPUS[name], 8]):
            cfg = parse_config(["--preset", name])
            plan = describe(cfg, world, check_files=False)[1]
            est, g = plan["memory"], plan["memory"]["gb"]
            ck = cfg.gradient_checkpointing
            peak = [f"**{v:.1f}**" if on == ck else f"{v:.1f}" for on, v in ((False, g["peak"]),
                                                                          (True, g["peak_checkpointing"]))]
            cells = [f"`{name}`", str(world), "bf16" if cfg.precision == "auto" else cfg.precision,
                     f"{plan['images_per_iteration']} ({plan['images_per_gpu']})",
                     f"{cfg.micro_batch}" + (f" ({est['forward_batch']} with CFG)" if est["forward_batch"] !=
                                             cfg.micro_batch else ""),
                     f"{g['weights'] + g['gathered']:.1f}", f"{g['trainable']:.1f}", f"{g['accumulation']:.1f}",
                     f"{g['activations']:.1f} / {g['activations_checkpointing']:.1f}", f"{g['rollout_buffers']:.1f}",
                     f"{g['text_encoders']:.1f}", f"{g['vae']:.1f} + {g['vae_decode']:.1f}", f"{g['evaluation']:.1f}",
                     f"{g['rewards']:.1f}", " / ".join(peak)]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)




# -- docs/SCALE.md's balance table -----------------------------------------------------------------------------------
def padding_overhead(b: Batch, labels: torch.Tensor, trained_steps: int) -> float:
    """The training forwards an iteration runs (every rank as many as the busiest, per update) over those a split
    giving every rank the same share of each update's terms would run, minus 1."""
    run = sum(w.forwards for w in b.split(labels, 0, trained_steps))
    ideal = sum(math.ceil(int((labels == u).sum()) * trained_steps / b.world / b.micro_batch)
                for u in range(b.updates))
    return run / max(ideal, 1) - 1


def balance_table(worlds=(8, 16, 32, 64), dropped=(0.0, 0.25, 0.5), draws: int = 100) -> str:
    """docs/SCALE.md's table: the mean padding overhead (`padding_overhead`) of grpo.split_updates' stratified split
    for the GPU presets (those with the same batch arithmetic share a row), with a fraction of the groups dropped as
    zero-advantage (whole groups: all-equal rewards; only presets with --drop_zero_adv drop any), beside a plain
    random split of the same kept samples."""
    rows = ["| presets | GPUs | images per GPU | a group spans | " + " | ".join(
        f"overhead, {d:.0%} of groups dropped: stratified / random split" for d in dropped) + " |",
        "|" + "---|" * (4 + len(dropped))]
    shared: dict[tuple, list[str]] = {}
    for name, values in PRESETS.items():
        if values.get("model", "digits") not in models.BUILT_IN:  # the GPU presets
            cfg = parse_config(["--preset", name])
            k = describe(cfg, 8, check_files=False, device="cpu")[1]["trained_steps"]
            key = (cfg.prompts_per_iter, cfg.group_size, cfg.updates_per_iter, cfg.micro_batch, k, cfg.drop_zero_adv)
            shared.setdefault(key, []).append(name)
    for (n_prompts, group, updates, micro, k, drop), names in shared.items():
        for world in worlds:
            b = Batch(world, n_prompts, group, updates, micro)
            if b.problem():
                continue
            cells = []
            for d in dropped if drop else dropped[:1]:
                g = torch.Generator().manual_seed(0)
                ours, plain = [], []
                for _ in range(draws):
                    keep = (torch.rand(b.prompts, generator=g) >= d).repeat_interleave(b.group_size)
                    ours.append(padding_overhead(b, grpo.split_updates(keep, b.updates, g), k))
                    kept = torch.nonzero(keep)[:, 0]
                    labels = torch.full((b.samples,), -1)
                    for u, part in enumerate(torch.tensor_split(kept[torch.randperm(len(kept), generator=g)],
                                                                b.updates)):
                        labels[part] = u
                    plain.append(padding_overhead(b, labels, k))
                cells.append(f"{sum(ours) / draws:.1%} / {sum(plain) / draws:.1%}")
            cells += ["(keeps every sample)"] * (len(dropped) - len(cells))
            rows.append(f"| {', '.join(f'`{n}`' for n in names)} | {world} | {b.samples_per_rank} | {b.group_span} "
                        f"GPU{'s' * (b.group_span > 1)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":  # docs/SCALE.md's tables: python -m flow_cps.plan [memory|balance]
    print(balance_table() if sys.argv[1:] == ["balance"] else memory_table(sys.argv[1:] or None))
