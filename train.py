"""GRPO fine-tuning of flow-matching models with Coefficients-Preserving Sampling (Wang & Yu, arXiv 2509.05952).

    torchrun --standalone --nproc_per_node=2 train.py          # the built-in tiny FLUX on digits, CPU, ~1.5 min
    python train.py --sampler flow_sde --eta 0.7               # the paper's baseline sampler, one flag
    python train.py --help                                     # every option, with its meaning (flow_cps/config.py)
    python train.py --preset flux-dev-pickscore --dry_run true # batch arithmetic + per-GPU memory, loads nothing
    torchrun --nproc_per_node=8 train.py --preset sd3.5-geneval                # the paper's settings (config.PRESETS)

One GRPO iteration (PAPER.md §4), each step a function of this file, `main` at the bottom:
  1. rollout     G samples per prompt with the chosen sampler (CPS, Eq. 12) and each step's log-prob (Eq. 14 / 13)
  2. score       rewards of the decoded images, gathered over ranks
  3. advantages  group-relative (grpo.ADVANTAGES)
  4. update      per optimizer step, the kept (sample, trained step) terms recomputed with gradients, in micro-batches
                 of terms; `objective` states what is minimised
  5. evaluate    deterministic ODE samples of held-out prompts with the EMA weights
Deliberate choices, where the peers differ:
  * every noise derives from (seed, iteration, prompt, group member), never from a global RNG stream: a run is
    reproducible, independent of the world size's slicing, and a resumed run continues exactly;
  * invalid samples (a reward returned NaN) are excluded from advantages and loss and counted, never scored 0;
  * the loss is a mean over all kept (sample, step) terms of the whole world, whatever the ranks and micro-batches.
The plumbing lives in the flow_cps package: engine (distributed, Policy, EMA), checkpoints (run folder), plan (batch
arithmetic, memory), models (FLUX / SD3 / digits adapters), logs (metrics, figures).
"""
from __future__ import annotations

import contextlib
import functools
import math
import sys

import numpy as np
import torch

import grpo
import sampling
from flow_cps import engine, lora, plan, scoring
from flow_cps.config import parse_config, sde_window_range
from flow_cps.session import Session, Timer, all_ranks


# ======================================================================================================================
# The algorithm
# ======================================================================================================================
def seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def generators(parts: list[tuple[int, ...]]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed_of(*p)) for p in parts]


def draw_prompts(train_set, seed: int, it: int, b: plan.Batch, rank: int, same_noise: bool):
    """This rank's prompts (each repeated G times), metadata and per-sample generators for iteration `it`: a
    deterministic function of (seed, it), the same on every rank, whatever the world size's slicing."""
    texts, meta = train_set
    ids = np.random.default_rng(seed_of(seed, it)).choice(len(texts), b.prompts, replace=len(texts) < b.prompts)
    slots = [(q, m) for q in range(rank * b.prompts_per_rank, (rank + 1) * b.prompts_per_rank)
             for m in range(b.group_size)]
    gens = generators([(seed, it, q, m) for q, m in slots])
    # DanceGRPO's one initial noise per group: seeded by member index G, which no sample's own noise uses
    noise = generators([(seed, it, q, b.group_size) for q, _ in slots]) if same_noise else gens
    return [texts[ids[q]] for q, _ in slots], [meta[ids[q]] for q, _ in slots], gens, noise


@torch.no_grad()
def rollout(backbone, texts, gens, noise_gens, *, grid, step, log_prob, eta, window, micro_batch, device,
            autocast=contextlib.nullcontext):
    """1. Trajectories x_{t_0} -> x_{t_N} with the current policy in forwards of `micro_batch` samples; returns the
    concatenated Trajectory (latents (B, N+1, ...), log-probs (B, N)) and the conditioning."""
    cond = backbone.encode(texts)
    x1 = torch.stack([sampling.randn(backbone.latent_shape, g) for g in noise_gens]).to(device)
    parts = []
    for i in range(0, len(texts), micro_batch):
        rows = torch.arange(i, min(i + micro_batch, len(texts)))
        c = backbone.select(cond, rows)
        velocity = lambda x, t, c=c: _with(autocast, backbone.velocity, x, t, c)  # noqa: E731
        parts.append(sampling.rollout(velocity, x1[rows], grid, step, eta, gens[i:i + micro_batch], window=window,
                                      log_prob=log_prob))
    cat = lambda k: torch.cat([getattr(p, k) for p in parts])  # noqa: E731
    return sampling.Trajectory(latents=cat("latents"), log_probs=cat("log_probs"), stochastic=parts[0].stochastic,
                               x0_hat=cat("x0_hat"), sigmas=grid), cond


def _with(ctx, fn, *args):
    with ctx():
        return fn(*args)


def score(reward_fn, images, texts, meta) -> tuple[scoring.RewardOutput, torch.Tensor]:
    """2. This rank's rewards, and every rank's totals in rank order (so every rank computes the same advantages)."""
    r = all_ranks(reward_fn, images, texts, meta)
    return r, engine.all_gather_cat(r.total.to(images.device)).cpu()


def objective(logp, logp_old, adv, kl, *, clip_range: float, beta: float, n_terms: int, world: int):
    """What is minimised, per optimizer step:

        J(θ) = 1/|T| Σ_{(i,k) ∈ T} [ max(−A_i r_ik, −A_i clip(r_ik, 1 − ε, 1 + ε)) + β KL_ik ],
        r_ik = exp(log p_θ(x_{k+1} | x_k) − log p_old(x_{k+1} | x_k)),

    T = the kept (sample i, trained step k) terms of the whole world in this update, |T| = n_terms. A rank returns
    its micro-batch's share, Σ_{its terms} [...] · world / |T|: DDP and FSDP2 average gradients over the ranks
    (÷ world), so the applied gradient is ∇J exactly, whatever the ranks and micro-batches hold."""
    surrogate, stats = grpo.clipped_surrogate(logp, logp_old, adv, clip_range)
    per_term = surrogate if kl is None else surrogate + beta * kl
    return per_term.sum() * (world / n_terms), stats


def terms(policy, traj, cond, rows, ks, adv, *, step, log_prob, kl_form, eta, beta, autocast=contextlib.nullcontext):
    """The (sample, step) terms (rows[j], ks[j]), recomputed with gradients: log p_θ of the stored transition, and
    the KL to the adapter-off reference when beta > 0. At the first update of an iteration the weights are the
    rollout's, so log p_θ equals the stored log-prob (ratio 1; tests check it bitwise)."""
    bb = policy.backbone
    x, x_next = traj.latents[rows, ks], traj.latents[rows, ks + 1]
    grid = traj.sigmas.to(x.device)  # the grid lives on the CPU, the step indices with the samples
    t, t_next, c = grid[ks], grid[ks + 1], bb.select(cond, rows)
    v = _with(autocast, bb.velocity, x, t, c, policy.module)
    logp, mean, std = sampling.step_log_prob(v, x, x_next, t, t_next, step, eta, log_prob)
    kl = None
    if beta > 0:
        with torch.no_grad(), lora.adapter_disabled(bb.transformer):
            mean_ref = step(x, _with(autocast, bb.velocity, x, t, c, bb.transformer), t, t_next, eta)[0]
        kl = kl_form(mean, mean_ref, std, t - t_next)
    return logp, traj.log_probs[rows, ks], adv[rows], kl


def update(policy, traj, cond, adv, keep, steps, *, b: plan.Batch, perm, world, max_grad_norm, loss_of, terms_of):
    """4. `b.updates` optimizer steps; each flattens its kept samples' (sample, trained step) pairs and runs them in
    forwards of `b.micro_batch` terms, accumulating the gradient of J (`objective`). Returns the statistics."""
    tally, K = Tally(), steps.shape[1]
    policy.module.train()
    for u in range(b.updates):
        rows = perm[u * b.samples_per_update:(u + 1) * b.samples_per_update]
        rows = rows[keep[rows]]
        pair_rows, pair_ks = rows.repeat_interleave(K), steps[rows].flatten()  # sample-major (sample, step) pairs
        n_terms = int(engine.all_reduce(torch.tensor([len(pair_rows)])).item())
        tally.add("kept", len(rows), 0)
        if n_terms == 0:
            continue
        n_fwd = int(engine.all_reduce(torch.tensor([math.ceil(len(pair_rows) / b.micro_batch)]), "max").item())
        for f in range(n_fwd):
            sl = slice(f * b.micro_batch, (f + 1) * b.micro_batch)
            r, k, weight = pair_rows[sl], pair_ks[sl], 1.0
            if len(r) == 0:  # padding, so every rank runs as many forwards (DDP / FSDP2 collectives)
                r, k, weight = perm[:1], steps[perm[:1], 0], 0.0
            with engine.grad_sync(policy.module, f == n_fwd - 1):
                logp, logp_old, a, kl = terms_of(policy, traj, cond, r, k, adv)
                loss, st = loss_of(logp, logp_old, a, kl, n_terms=n_terms, world=world)
                policy.backward(loss * weight)  # loss.backward(), fp16: loss-scaled
            if weight:
                tally.terms(loss, st, kl, len(r), first_update=u == 0)
        tally.add("grad_norm", policy.step(max_grad_norm))
    policy.module.eval()
    return tally


@torch.no_grad()
def evaluate(policy, metrics, texts, meta, *, steps, per_prompt, micro_batch, guidance, rank, world, pad,
             device="cpu", autocast=contextlib.nullcontext):
    """5. Deterministic ODE samples with the EMA weights, of the held-out prompts x `per_prompt` fixed noises (the
    same for every run, sampler and iteration), streamed: encode, sample, decode and score one micro-batch at a
    time, keeping only scores and the grid's images. Returns ({'eval/<metric>': value}, grid images)."""
    bb = policy.backbone
    order = [(k, p) for k in range(per_prompt) for p in range(len(texts))]  # interleaved: rank 0 sees every prompt
    per = math.ceil(len(order) / world)
    mine = order[rank * per:(rank + 1) * per]
    n_mine = len(mine)
    mine += [order[-1]] * (per - n_mine) if pad else []  # FSDP2: forwards are collectives, every rank runs as many
    sums, shown, finite, error = {}, [], True, None
    with policy.ema_weights(), bb.guidance_scale(guidance):
        for i in range(0, len(mine), micro_batch):
            chunk = mine[i:i + micro_batch]
            ps = [texts[p] for _, p in chunk]
            cond = bb.encode(ps)
            noise = generators([(10_007, p, k) for k, p in chunk])
            x1 = torch.stack([sampling.randn(bb.latent_shape, g) for g in noise]).to(device)
            velocity = lambda x, t, cond=cond: _with(autocast, bb.velocity, x, t, cond)  # noqa: E731
            images = bb.decode(sampling.rollout(velocity, x1, bb.sigmas(steps), "ode").final)
            real = [j for j in range(len(chunk)) if i + j < n_mine]
            finite &= bool(torch.isfinite(images[real]).all())
            if error is None and real:  # after an error, the forwards go on (FSDP2: collectives) unscored
                try:
                    out = metrics(images[real], [ps[j] for j in real], [meta[chunk[j][1]] for j in real])
                except scoring.RewardError as e:
                    error = str(e)
                    continue
                keys = metrics.group_keys([meta[chunk[j][1]] for j in real])
                for name, v in out.components.items():
                    for j, x in enumerate(v.tolist()):
                        if math.isfinite(x):
                            s = sums.setdefault((name, keys[name][j]), [0.0, 0])
                            s[0], s[1] = s[0] + x, s[1] + 1
            shown += [images[j] for j in real if chunk[j][0] < 10 and chunk[j][1] < 10]
    merged: dict = {}
    for part, err in engine.all_gather_objects((sums, error)):  # one collective, whatever each rank evaluated
        if err:
            raise scoring.RewardError(err)
        for key, (total, n) in part.items():
            merged[key] = [merged.get(key, [0.0, 0])[0] + total, merged.get(key, [0.0, 0])[1] + n]
    result = {}
    for name in dict.fromkeys(name for name, _ in merged):  # a grouped metric is the mean over groups (GenEval)
        means = [t / n for (m, _), (t, n) in merged.items() if m == name and n]
        result[f"eval/{name}"] = float(np.mean(means)) if means and finite else float("nan")
    if not finite:
        print(f"rank {rank}: evaluation images are not finite (the model diverged): metrics reported as NaN")
    return result, torch.stack(shown) if shown else None


def train_steps(stochastic, n: int, timesteps: str, fraction: float, gen) -> torch.Tensor:
    """Which steps each sample trains, (n, K): Flow-GRPO's ordered first fraction or DanceGRPO's random subset."""
    if timesteps == "ordered":
        return grpo.ordered_timesteps(stochastic, fraction).expand(n, -1)
    return grpo.random_timesteps(stochastic, n, fraction, gen)


class Tally:
    """Per-term statistics summed over micro-batches and ranks: world-wide means, minima and maxima."""

    KEYS = ("kept", "loss", "clipfrac", "approx_kl", "ratio_mean", "kl", "grad_norm")

    def __init__(self):  # the same keys on every rank, whatever it trained: the reductions need equal shapes
        self.sums = {k: [0.0, 0] for k in self.KEYS}
        self.low, self.high = {"ratio_min": math.inf}, {"ratio_max": -math.inf, "first_ratio_max_dev": -math.inf}

    def add(self, key: str, total: float, count: int = 1) -> None:
        s = self.sums[key]
        s[0], s[1] = s[0] + float(total), s[1] + count

    def terms(self, loss, st: dict, kl, n: int, first_update: bool) -> None:
        self.add("loss", float(loss.detach()), 0)  # this rank's share of J (see `objective`): summed, not averaged
        for k in ("clipfrac", "approx_kl", "ratio_mean"):
            self.add(k, st[k] * n, n)
        if kl is not None:
            self.add("kl", float(kl.detach().sum()), n)
        self.low["ratio_min"] = min(self.low["ratio_min"], st["ratio_min"])
        self.high["ratio_max"] = max(self.high["ratio_max"], st["ratio_max"])
        if first_update:  # |ratio - 1| at the first update: 0 when the recomputation is exactly on-policy
            dev = max(abs(st["ratio_max"] - 1), abs(st["ratio_min"] - 1))
            self.high["first_ratio_max_dev"] = max(self.high["first_ratio_max_dev"], dev)

    def reduce(self) -> dict:
        """Means over the world's terms (clipfrac, approx_kl, ratio_mean, kl) and over updates (grad_norm), J's mean
        over updates (loss), kept samples, ratio extremes; NaN where nothing trained (kl: None without KL)."""
        flat = [v for k in self.KEYS for v in self.sums[k]]
        flat += [self.low["ratio_min"], self.high["ratio_max"], self.high["first_ratio_max_dev"]]
        s = engine.all_reduce(torch.tensor(flat[:-3], dtype=torch.float64)).tolist()
        lo = engine.all_reduce(torch.tensor(flat[-3:-2], dtype=torch.float64), "min").tolist()
        hi = engine.all_reduce(torch.tensor(flat[-2:], dtype=torch.float64), "max").tolist()
        out = {k: s[2 * i] / s[2 * i + 1] if s[2 * i + 1] else math.nan for i, k in enumerate(self.KEYS)}
        # J of each update is the sum of its shares over micro-batches and ranks / world; grad_norm's count is
        # world x the updates that trained
        out.update(kept=int(s[0]), loss=s[2] / s[13] if s[13] else math.nan, ratio_min=lo[0], ratio_max=hi[0],
                   first_ratio_max_dev=hi[1])
        if not s[2 * 5 + 1]:
            del out["kl"]  # no KL term (beta = 0): nothing to report
        return {k: v if not (isinstance(v, float) and math.isinf(v)) else math.nan for k, v in out.items()}


# ======================================================================================================================
def main(argv: list[str] | None = None) -> dict:
    """Run GRPO; returns {'summary': base -> trained held-out metrics (rank 0), 'history', 'policy', 'output_dir'}."""
    cfg = parse_config(argv)
    if cfg.dry_run:
        return plan.dry_run(cfg)
    with Session(cfg) as run:  # ranks, run folder, prompts, models, policy, resume, logs; all checked before work
        b, policy, bb, rank, device = run.batch, run.policy, run.policy.backbone, run.rank, run.device
        step = sampling.SAMPLERS[cfg.sampler]  # names resolved once: below, functions and values only
        log_prob = sampling.LOG_PROBS[cfg.log_prob or sampling.DEFAULT_LOG_PROB[cfg.sampler]]
        advantage = grpo.ADVANTAGES[cfg.advantage]
        kl_form = grpo.KL_FORMS[cfg.kl_form or grpo.DEFAULT_KL_FORM[cfg.sampler]]
        terms_of = functools.partial(terms, step=step, log_prob=log_prob, kl_form=kl_form, eta=cfg.eta,
                                     beta=cfg.beta, autocast=run.autocast)
        loss_of = functools.partial(objective, clip_range=cfg.clip_range, beta=cfg.beta)
        held_out = functools.partial(evaluate, policy, run.metrics, *run.eval_set, steps=cfg.eval_steps,
                                     per_prompt=cfg.eval_per_prompt, micro_batch=b.micro_batch, rank=rank,
                                     world=run.world, guidance=cfg.eval_guidance, pad=policy.fsdp,
                                     device=device, autocast=run.autocast)
        grid, window, timer = bb.sigmas(cfg.num_steps), None, Timer()
        if run.start == 1:
            run.log(0, held_out())
        for it in run.iterations():
            timer.clear()
            texts, meta, gens, noise = draw_prompts(run.train_set, cfg.seed, it, b, rank, cfg.same_noise_in_group)
            if cfg.sde_window:  # Flow-GRPO-Fast: this iteration's stochastic window
                window = grpo.draw_sde_window(cfg.num_steps, cfg.sde_window, *sde_window_range(cfg),
                                              torch.Generator().manual_seed(seed_of(cfg.seed, it, 1)))
            with timer("rollout"):  # 1. sample with the current policy
                traj, cond = rollout(bb, texts, gens, noise, grid=grid, step=step, log_prob=log_prob, eta=cfg.eta,
                                     window=window, micro_batch=b.micro_batch, device=device, autocast=run.autocast)
                images = bb.decode(traj.x0_hat if cfg.reward_image == "x0_hat" else traj.final)
            with timer("reward"):  # 2. rewards, every rank's
                r, all_r = score(run.reward_fn, images, texts, meta)
            adv = advantage(all_r, torch.arange(len(all_r)) // b.group_size, clip=cfg.adv_clip)  # 3. advantages
            adv = adv[rank * b.samples_per_rank:(rank + 1) * b.samples_per_rank].to(device)
            keep = r.valid.to(device) & ((adv != 0) if cfg.drop_zero_adv else True)
            gen = torch.Generator().manual_seed(seed_of(cfg.seed, it, 2, rank))
            steps = train_steps(traj.stochastic, b.samples_per_rank, cfg.timesteps, cfg.timestep_fraction, gen)
            with timer("train"):  # 4. optimizer steps on J (`objective`)
                tally = update(policy, traj, cond, adv, keep, steps.to(device), b=b, world=run.world,
                               perm=torch.randperm(b.samples_per_rank, generator=gen).to(device),
                               max_grad_norm=cfg.max_grad_norm, loss_of=loss_of, terms_of=terms_of)
            due = it % cfg.eval_every == 0 or it == cfg.iterations
            with timer("eval"):  # 5. held-out evaluation (and the metrics on the training samples)
                ev, train_metrics = (held_out(), run.train_metrics(images, texts, meta)) if due else (None, None)
            run.log(it, ev, r, all_r, tally.reduce(), train_metrics, timer, images if due else None)
            if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
                run.checkpoint(it)
        return run.finish()

if __name__ == "__main__":
    main(sys.argv[1:])
