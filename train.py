"""GRPO fine-tuning of flow-matching models with Coefficients-Preserving Sampling (Wang & Yu, arXiv 2509.05952).

    torchrun --standalone --nproc_per_node=2 train.py          # the built-in tiny FLUX on digits, CPU, ~1.5 min
    python train.py --sampler flow_sde --eta 0.7               # the paper's baseline sampler, one flag
    python train.py --help                                     # every option, with its meaning (flow_cps/config.py)
    python train.py --preset flux-dev-pickscore --dry_run true # the plan: the algorithm, batch, memory; loads nothing
    torchrun --nproc_per_node=8 train.py --preset sd3.5-geneval \\
        --prompts flow_grpo/dataset/geneval    # the paper's settings (config.PRESETS) and prompt set; without
                                               # --prompts the preset trains on generated GenEval-like prompts

One GRPO iteration (the loop the paper runs CPS in, its Section 4), each step a function of this file, `main` last:
  1. rollout     G samples per prompt with the chosen sampler (CPS, Eq. 12) and each step's log-prob (Eq. 14 / 13)
  2. score       rewards of the decoded images, gathered over ranks
  3. advantages  group-relative (grpo.ADVANTAGES)
  4. update      per optimizer step, the kept (sample, trained step) terms recomputed with gradients, in micro-batches
                 of terms; `Objective.loss` states what is minimised
  5. evaluate    deterministic ODE samples of held-out prompts with the EMA weights
Where this loop departs from the peers on purpose (named random streams, invalid samples excluded, the loss a mean
over the world's terms): docs/NOTES.md, "Deliberate choices". The plumbing lives in the flow_cps package: session
(set-up, logs), plan (batch arithmetic), policy (DDP / FSDP2, AdamW, EMA), evaluation (the held-out samples' slots
and sums), scoring (a run's reward on every rank), models (FLUX / SD3 / built-in backbones).
"""
from __future__ import annotations

import enum
import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch

import grpo
import sampling
from flow_cps import distributed, lora, plan, scoring
from flow_cps.config import Config, parse_config, sde_window_range
from flow_cps.evaluation import Evaluation, HeldOut
from flow_cps.session import Report, Scores, Session, Timer


# ======================================================================================================================
# The random streams
# ======================================================================================================================
class Stream(enum.IntEnum):
    """Every random draw of a run, by name. A generator is seeded by (stream, *parts), the tag first, so no two streams
    share a seed whatever their parts (numpy's SeedSequence pads short entropy with zeros: untagged, (seed, it) and
    the sample noise (seed, it, 0, 0) were one seed)."""
    PROMPTS = 1  # (seed, it): which prompts an iteration draws
    SAMPLE_NOISE = 2  # (seed, it, prompt slot, member): a sample's initial noise and every fresh eps of its rollout
    GROUP_NOISE = 3  # (seed, it, prompt slot): DanceGRPO's one initial noise per group (--same_noise_in_group)
    SDE_WINDOW = 4  # (seed, it): Flow-GRPO-Fast's stochastic window
    TRAINED_STEPS = 5  # (seed, it): DanceGRPO's random trained steps, drawn for every sample of the world
    EVAL_NOISE = 6  # (prompt, noise index): the held-out noises, the same for every run, sampler and iteration
    UPDATE_SPLIT = 7  # (seed, it): which optimizer step trains each sample of the world (grpo.split_updates)


def seed_of(stream: Stream, *parts: int) -> int:
    return int(np.random.SeedSequence([int(stream), *map(int, parts)]).generate_state(1, np.uint64)[0] >> 1)


def generators(stream: Stream, parts: list[tuple[int, ...]]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed_of(stream, *p)) for p in parts]


# ======================================================================================================================
# The algorithm
# ======================================================================================================================
@dataclass(frozen=True)
class Objective:
    """The GRPO objective of a run, resolved once from its flags: the transition density p_θ(x_{k+1} | x_k) is the
    `sampler`'s Gaussian step at `eta` scored by `log_prob` (Eq. 14 or 13); `kl_form` measures the KL to the
    LoRA-off reference, weighted by `beta`; `clip_range` is PPO's ε."""
    sampler: Callable  # step(x, v, t, t', eta) -> (mean, std): sampling.SAMPLERS
    eta: float
    log_prob: Callable  # (x', mean, std) -> (B,): sampling.LOG_PROBS
    kl_form: Callable  # (mean, mean_ref, std, Δt) -> (B,): grpo.KL_FORMS
    beta: float
    clip_range: float

    @classmethod
    def of(cls, cfg: Config) -> Objective:
        return cls(sampling.SAMPLERS[cfg.sampler], cfg.eta, sampling.LOG_PROBS[cfg.log_prob_used],
                   grpo.KL_FORMS[cfg.kl_form_used], cfg.beta, cfg.clip_range)

    def loss(self, logp, logp_old, adv, kl, *, n_terms: int, world: int):
        """What is minimised, per optimizer step:

            J(θ) = 1/|T| Σ_{(i,k) ∈ T} [ max(−A_i r_ik, −A_i clip(r_ik, 1 − ε, 1 + ε)) + β KL_ik ],
            r_ik = exp(log p_θ(x_{k+1} | x_k) − log p_old(x_{k+1} | x_k)),

        T = the kept (sample i, trained step k) terms of the whole world in this update, |T| = n_terms. A rank returns
        its micro-batch's share, Σ_{its terms} [...] · world / |T|: DDP and FSDP2 average gradients over the ranks
        (÷ world), so the applied gradient is ∇J exactly, whatever the ranks and micro-batches hold."""
        surrogate, stats = grpo.clipped_surrogate(logp, logp_old, adv, self.clip_range)
        per_term = surrogate if kl is None else surrogate + self.beta * kl
        return per_term.sum() * (world / n_terms), stats


@dataclass
class Samples:
    """This rank's samples of an iteration (`plan.Batch.rank_slice`; sample s is member s % G of prompt slot s // G):
    their prompts, metadata, and per sample the generators of its fresh noise and of its initial noise (the group's
    with --same_noise_in_group). Each is a function of (seed, iteration, global sample), whatever the slicing."""
    texts: list[str]
    meta: list
    noise: list[torch.Generator]  # eps of every stochastic step
    start: list[torch.Generator]  # x_1


def draw(train_set, seed: int, it: int, b: plan.Batch, rank: int, same_noise: bool) -> Samples:
    """The prompts of iteration `it` (b.prompts distinct ones where the set allows) and this rank's samples of them."""
    texts, meta = train_set
    ids = np.random.default_rng(seed_of(Stream.PROMPTS, seed, it)).choice(len(texts), b.prompts,
                                                                         replace=len(texts) < b.prompts)
    slots = [divmod(s, b.group_size) for s in range(b.samples)[b.rank_slice(rank)]]
    noise = generators(Stream.SAMPLE_NOISE, [(seed, it, q, m) for q, m in slots])
    start = generators(Stream.GROUP_NOISE, [(seed, it, q) for q, _ in slots]) if same_noise else noise
    return Samples([texts[ids[q]] for q, _ in slots], [meta[ids[q]] for q, _ in slots], noise, start)


@torch.no_grad()
def rollout(bb, J: Objective, grid, samples: Samples, window, micro_batch: int):
    """1. Trajectories x_{t_0} -> x_{t_N} over `grid` with the current policy: J's sampler at J's eta (every step, or
    only those of the SDE `window`), each step's log-prob by J's log-prob (Eq. 14 / 13), in forwards of `micro_batch`
    samples. Returns the Trajectory (latents (B, N+1, ...), log-probs (B, N)) and the conditioning."""
    cond = bb.encode(samples.texts)
    x1 = torch.stack([sampling.randn(bb.latent_shape, g) for g in samples.start]).to(bb.latent_device)
    parts = []
    for i in range(0, len(samples.texts), micro_batch):
        rows = torch.arange(i, min(i + micro_batch, len(samples.texts)))
        velocity = functools.partial(bb.velocity, cond=bb.select(cond, rows))
        parts.append(sampling.rollout(velocity, x1[rows], grid, J.sampler, J.eta, samples.noise[i:i + micro_batch],
                                      window=window, log_prob=J.log_prob))
    return sampling.Trajectory.cat(parts), cond


def score(reward_fn, images, texts, meta) -> Scores:
    """2. This rank's rewards and the world's: every rank's totals in rank order (so every rank computes the same
    advantages) and, for a weighted sum, each component's world mean (scoring.GroupedSums, the rule of every logged
    reward mean)."""
    mine, sums = scoring.on_every_rank(reward_fn, images, texts, meta)
    totals = distributed.all_gather_cat(mine.total.to(images.device)).cpu()
    return Scores(mine=mine, totals=totals, components=scoring.GroupedSums.means(sums) if len(mine.components) > 1
                  else {})


def terms(J: Objective, policy, traj, cond, rows, ks, adv):
    """The (sample, step) terms (rows[j], ks[j]), recomputed with gradients: log p_θ of the stored transition, and
    the KL to the LoRA-off reference when beta > 0. At the first update of an iteration the weights are the
    rollout's, so log p_θ equals the stored log-prob (ratio 1; tests check it bitwise)."""
    bb = policy.backbone
    x, x_next = traj.latents[rows, ks], traj.latents[rows, ks + 1]
    grid = traj.sigmas.to(x.device)  # the grid lives on the CPU, the step indices with the samples
    t, t_next = grid[ks], grid[ks + 1]
    c = bb.select(cond, rows)
    v = bb.velocity(x, t, c, policy.module)
    logp, mean, std = sampling.step_log_prob(v, x, x_next, t, t_next, J.sampler, J.eta, J.log_prob)
    kl = None
    if J.beta > 0:
        with torch.no_grad(), lora.adapter_disabled(bb.transformer):
            mean_ref = J.sampler(x, bb.velocity(x, t, c, bb.transformer), t, t_next, J.eta)[0]
        kl = J.kl_form(mean, mean_ref, std, t - t_next)
    return logp, traj.log_probs[rows, ks], adv[rows], kl


def update(J: Objective, policy, traj, cond, adv, steps, work: list[plan.Update], max_grad_norm: float) -> Tally:
    """4. One optimizer step on J per `work` item (plan.Batch.split): each runs its samples' (sample, trained step)
    terms in forwards of micro_batch terms, accumulating the gradient of J (`Objective.loss`); a rank with fewer
    forwards than the busiest pads with a finite sample of weight 0 (plan.padding_row)."""
    tally = Tally()
    pad = plan.padding_row(traj, adv, work)
    policy.module.train()
    for u, step in enumerate(work):
        tally.kept += len(step.rows)
        if step.terms == 0:
            continue
        for f, (rows, ks, weight) in enumerate(step.micro_batches(steps, pad)):
            with policy.grad_sync(f == step.forwards - 1):  # the gradients are reduced over ranks once per update
                logp, logp_old, a, kl = terms(J, policy, traj, cond, rows, ks, adv)
                loss, st = J.loss(logp, logp_old, a, kl, n_terms=step.terms, world=policy.world)
                policy.backward(loss * weight)  # loss.backward(), fp16: loss-scaled
            if weight:
                tally.add_terms(loss, st, kl, len(rows), first_update=u == 0)
        tally.add_step(policy.step(max_grad_norm))
    policy.module.eval()
    return tally


@torch.no_grad()
def evaluate(policy, held_out: HeldOut) -> Evaluation:
    """5. Deterministic ODE samples with the EMA weights, of the held-out prompts x `per_prompt` fixed noises (the
    same for every run, sampler and iteration), streamed: sample, decode and score one micro-batch at a time,
    keeping only the sums of the scores and the grid's images (evaluation.Sums)."""
    bb = policy.backbone
    sums = held_out.sums()
    with policy.ema_weights(), bb.guidance_scale(held_out.guidance):
        for pairs in held_out.batches():  # this rank's (noise k, prompt p) pairs
            noise = generators(Stream.EVAL_NOISE, [(p, k) for k, p in pairs])
            sums.add(pairs, ode_images(bb, [held_out.texts[p] for _, p in pairs], noise, held_out.steps))
    return sums.result()  # one collective: the world's means; the grid's images on rank 0


def ode_images(bb, texts, noise, steps: int) -> torch.Tensor:
    """Images of the deterministic ODE samples (the evaluation sampler, the paper's too) from these noises."""
    x1 = torch.stack([sampling.randn(bb.latent_shape, g) for g in noise]).to(bb.latent_device)
    velocity = functools.partial(bb.velocity, cond=bb.encode(texts))
    return bb.decode(sampling.rollout(velocity, x1, bb.sigmas(steps), "ode").final)


@dataclass
class Tally:
    """An iteration's training statistics, summed over micro-batches and then over ranks: each mean is a named sum
    over a named count, so a count of 0 reads as NaN (nothing trained), never as a division."""
    kept: float = 0  # samples kept for the loss (finite reward; non-zero advantage where dropped)
    terms: float = 0  # (sample, step) terms trained
    clipfrac: float = 0.0  # Σ over terms
    approx_kl: float = 0.0  # Σ over terms
    ratio_mean: float = 0.0  # Σ over terms
    kl: float = 0.0  # Σ over the terms of a run with a KL term
    kl_terms: float = 0
    loss: float = 0.0  # Σ of this rank's shares of J (see `Objective.loss`): Σ over ranks = world x J per update
    steps: float = 0  # optimizer steps that trained (x world after the reduction)
    grad_norm: float = 0.0  # Σ over optimizer steps
    ratio_min: float = math.inf
    ratio_max: float = -math.inf
    first_ratio_max_dev: float = -math.inf  # |ratio - 1| at the first update: 0 when the recomputation is on-policy

    def add_terms(self, loss, st: dict, kl, n: int, first_update: bool) -> None:
        self.terms += n
        self.loss += float(loss.detach())
        self.clipfrac += st["clipfrac"] * n
        self.approx_kl += st["approx_kl"] * n
        self.ratio_mean += st["ratio_mean"] * n
        if kl is not None:
            self.kl += float(kl.detach().sum())
            self.kl_terms += n
        self.ratio_min = min(self.ratio_min, st["ratio_min"])
        self.ratio_max = max(self.ratio_max, st["ratio_max"])
        if first_update:
            dev = max(abs(st["ratio_max"] - 1), abs(st["ratio_min"] - 1))
            self.first_ratio_max_dev = max(self.first_ratio_max_dev, dev)

    def add_step(self, grad_norm: float) -> None:
        self.steps += 1
        self.grad_norm += grad_norm

    def reduce(self) -> dict:
        """World-wide means over terms (clipfrac, approx_kl, ratio_mean, kl) and over optimizer steps (loss = J,
        grad_norm), kept samples, ratio extremes; NaN where nothing trained, no kl without a KL term."""
        ops = {f.name: {"ratio_min": "min", "ratio_max": "max", "first_ratio_max_dev": "max"}.get(f.name, "sum")
               for f in fields(self)}
        s = {}
        for op in ("sum", "min", "max"):  # one collective per reduction
            names = [k for k, o in ops.items() if o == op]
            s.update(zip(names, distributed.all_reduce(torch.tensor([getattr(self, k) for k in names],
                                                                    dtype=torch.float64), op).tolist()))
        out = dict(kept=int(s["kept"]), loss=average(s["loss"], s["steps"]),
                   clipfrac=average(s["clipfrac"], s["terms"]), approx_kl=average(s["approx_kl"], s["terms"]),
                   ratio_mean=average(s["ratio_mean"], s["terms"]), grad_norm=average(s["grad_norm"], s["steps"]),
                   ratio_min=s["ratio_min"], ratio_max=s["ratio_max"], first_ratio_max_dev=s["first_ratio_max_dev"])
        if s["kl_terms"]:
            out["kl"] = s["kl"] / s["kl_terms"]
        return {k: math.nan if isinstance(v, float) and math.isinf(v) else v for k, v in out.items()}


def average(total: float, count: float) -> float:
    """A named sum over a named count; NaN when nothing was counted."""
    return total / count if count else math.nan


# ======================================================================================================================
def main(argv: list[str] | None = None) -> dict:
    """Run GRPO; returns {'summary': base -> trained held-out metrics (rank 0), 'history', 'policy', 'output_dir'}."""
    cfg = parse_config(argv)
    if cfg.dry_run:
        return plan.dry_run(cfg)
    with Session(cfg) as run:  # ranks, run folder, prompts, models, policy, resume, logs; all checked before work
        b = run.batch  # this rank's slice of the world's samples, the updates, the micro-batches (plan.Batch)
        policy = run.policy
        bb = policy.backbone
        J = Objective.of(cfg)  # the sampler, eta, log-prob and KL form: functions and values from here on
        advantage = grpo.ADVANTAGES[cfg.advantage]
        trained_steps = grpo.TIMESTEPS[cfg.timesteps]
        grid = bb.sigmas(cfg.num_steps)
        timer = Timer()
        if run.start == 1:
            run.log(Report(0, evaluation=evaluate(policy, run.held_out)))
        for it in run.iterations():
            timer.clear()
            mine = draw(run.train_set, cfg.seed, it, b, run.rank, cfg.same_noise_in_group)
            window = None  # every step stochastic, or Flow-GRPO-Fast's window of this iteration:
            if cfg.sde_window:
                window = grpo.draw_sde_window(cfg.num_steps, cfg.sde_window, *sde_window_range(cfg),
                                              generators(Stream.SDE_WINDOW, [(cfg.seed, it)])[0])
            with timer("rollout"):  # 1. sample with the current policy
                traj, cond = rollout(bb, J, grid, mine, window, b.micro_batch)
                images = bb.decode(getattr(traj, cfg.reward_image))  # the final sample, or DanceGRPO's x0_hat
            with timer("reward"):  # 2. rewards, every rank's
                scores = score(run.reward_fn, images, mine.texts, mine.meta)
            adv = advantage(scores.totals, torch.arange(b.samples) // b.group_size, clip=cfg.adv_clip)  # 3.
            keep = torch.isfinite(scores.totals) & ((adv != 0) if cfg.drop_zero_adv else True)  # the world's
            labels = grpo.split_updates(keep, b.updates, generators(Stream.UPDATE_SPLIT, [(cfg.seed, it)])[0])
            steps = trained_steps(traj.stochastic, b.samples, cfg.timestep_fraction,
                                  generators(Stream.TRAINED_STEPS, [(cfg.seed, it)])[0])
            rows = b.rank_slice(run.rank)
            with timer("train"):  # 4. optimizer steps on J
                tally = update(J, policy, traj, cond, adv[rows].to(run.device), steps[rows].to(run.device),
                               b.split(labels, run.rank, steps.shape[1]), cfg.max_grad_norm)
            report = Report(it, scores=scores, stats=tally.reduce())
            with timer("eval"):  # 5. held-out evaluation, and the held-out metrics on the training samples
                if it % cfg.eval_every == 0 or it == cfg.iterations:
                    report.evaluation = evaluate(policy, run.held_out)
                    report.train_metrics = run.train_metrics(images, mine.texts, mine.meta)
                    report.images = images  # the training grid's samples and labels
                    report.texts = mine.texts
            report.timer = dict(timer)
            run.log(report)
            if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
                run.checkpoint(it)
        return run.finish()


if __name__ == "__main__":
    main(sys.argv[1:])
