"""GRPO for flow-matching models: group advantages, the clipped surrogate, the KL penalty, which steps to train and
which samples each optimizer step trains on.

One function per concept, each with its formula: the GRPO loop the paper runs CPS in (its Section 4, with Flow-GRPO's
and DanceGRPO's released code as the reference for every detail; docs/NOTES.md, "The GRPO step as run").
Everything here is pure tensor math on one process: train.py gathers rewards across ranks first, so the same
function gives the same advantages on every rank.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor


# -- advantages --------------------------------------------------------------------------------------------------
def _centred(rewards: Tensor, groups: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """What both advantages start from: (r in fp64, valid = given and finite, each sample's group index, the per-group
    count of valid rewards, r - its group's mean over the valid rewards (0 where invalid))."""
    r = rewards.double()
    valid = torch.isfinite(r) if valid is None else valid & torch.isfinite(r)
    _, inv = torch.unique(groups, return_inverse=True)
    n = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.zeros(n, dtype=r.dtype).index_add_(0, inv, valid.to(r.dtype))
    mean = torch.zeros(n, dtype=r.dtype).index_add_(0, inv, torch.where(valid, r, 0.0)) / count.clamp(min=1)
    return r, valid, inv, count, torch.where(valid, r - mean[inv], 0.0)


def flow_grpo_advantages(rewards: Tensor, groups: Tensor, valid: Tensor | None = None, *, global_std: bool = True,
                         eps: float = 1e-4, clip: float = 5.0) -> Tensor:
    """Flow-GRPO (PerPromptStatTracker): A_i = clip((r_i - mean_{g(i)} r) / (std + eps), -clip, clip).

    mean over the valid samples of the prompt's group; std is the *population* std of all valid rewards of the batch
    (global_std=True, Flow-GRPO's default) or of the group. All-equal rewards give exactly 0 (the numerator is 0).
    Invalid samples (NaN rewards) get advantage 0 and do not enter any statistic.
    """
    r, valid, inv, count, centred = _centred(rewards, groups, valid)
    if global_std:
        std = centred.new_tensor(float(r[valid].std(correction=0))) if int(valid.sum()) > 0 else centred.new_zeros(())
    else:
        sq = torch.zeros_like(count).index_add_(0, inv, centred ** 2)
        std = (sq / count.clamp(min=1)).sqrt()[inv]
    return (centred / (std + eps)).clamp(-clip, clip).to(rewards.dtype)


def dance_grpo_advantages(rewards: Tensor, groups: Tensor, valid: Tensor | None = None, *, eps: float = 1e-8,
                          clip: float = 5.0) -> Tensor:
    """DanceGRPO: A_i = clip((r_i - mean_{g(i)} r) / (std_{g(i)} r + eps)) with the *unbiased* group std.

    A group with fewer than two valid samples has no std: its advantages are 0 (never NaN).
    """
    _, valid, inv, count, centred = _centred(rewards, groups, valid)
    sq = torch.zeros_like(count).index_add_(0, inv, centred ** 2)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    adv = torch.where((count[inv] >= 2) & valid, centred / (std[inv] + eps), 0.0)
    return adv.clamp(-clip, clip).to(rewards.dtype)


# One signature, fn(rewards, groups, valid=None, *, clip) -> (B,): Flow-GRPO's PerPromptStatTracker with the batch std
# (its global_std=True default) or the group's population std, and DanceGRPO's group mean and unbiased std.
ADVANTAGES = {"flow_grpo": flow_grpo_advantages,
              "flow_grpo_group_std": functools.partial(flow_grpo_advantages, global_std=False),
              "dance": dance_grpo_advantages}


# -- the policy loss ---------------------------------------------------------------------------------------------
def clipped_surrogate(logp_new: Tensor, logp_old: Tensor, adv: Tensor, clip_range: float) -> tuple[Tensor, dict]:
    """PPO's clipped surrogate per sample: max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = exp(logp_new - logp_old).

    Returns the per-sample loss (B,) (the caller weights and averages it, so padding and gradient accumulation stay
    exact) and diagnostics: clipfrac = mean(|r - 1| > eps), approx_kl = 0.5 mean (logp_new - logp_old)^2 (as
    Flow-GRPO logs it), ratio mean/min/max.
    """
    log_ratio = logp_new - logp_old
    ratio = torch.exp(log_ratio)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range))
    with torch.no_grad():
        stats = dict(clipfrac=float(((ratio - 1).abs() > clip_range).float().mean()),
                     approx_kl=float(0.5 * log_ratio.pow(2).mean()), ratio_mean=float(ratio.mean()),
                     ratio_min=float(ratio.min()), ratio_max=float(ratio.max()))
    return loss, stats


# KL(policy step || reference step) per sample (B,), in the form each codebase uses. Both steps are Gaussians with the
# same std (the sampler's), so only the means differ: mu from the policy, mu_ref from the adapter-off reference.
# One signature: (mean, mean_ref, std, dt) -> (B,); std is the step's fresh-noise std, dt = t - t' > 0.
def _sq_diff(mean: Tensor, mean_ref: Tensor) -> Tensor:
    return (mean.float() - mean_ref.float()).pow(2).flatten(1).mean(1)


def _per_sample(x: Tensor | float, like: Tensor) -> Tensor:
    """A std or dt as (B,) (or a scalar): std is constant over a sample's elements."""
    x = torch.as_tensor(x, dtype=torch.float32, device=like.device)
    return x.reshape(x.shape[0], -1)[:, 0] if x.ndim else x


def kl_mse(mean: Tensor, mean_ref: Tensor, std: Tensor | float, dt: Tensor | float) -> Tensor:
    """mean_dims (mu - mu_ref)^2: FlowCPS (commit 814c359 dropped Flow-GRPO's divisor)."""
    return _sq_diff(mean, mean_ref)


def kl_flow_grpo(mean: Tensor, mean_ref: Tensor, std: Tensor | float, dt: Tensor | float) -> Tensor:
    """mean_dims (mu - mu_ref)^2 / (2 sigma_t^2): Flow-GRPO's train_sd3.py, with sigma_t = std / sqrt(dt) the
    diffusion coefficient (without sqrt(dt)); this is dt times the exact KL."""
    sigma_t_sq = _per_sample(std, mean) ** 2 / _per_sample(dt, mean)
    return _sq_diff(mean, mean_ref) / (2 * sigma_t_sq)


def kl_gaussian(mean: Tensor, mean_ref: Tensor, std: Tensor | float, dt: Tensor | float) -> Tensor:
    """mean_dims (mu - mu_ref)^2 / (2 std^2): the exact KL between the two Gaussian steps (per element)."""
    return _sq_diff(mean, mean_ref) / (2 * _per_sample(std, mean) ** 2)


KL_FORMS = {"mse": kl_mse, "flow_grpo": kl_flow_grpo, "gaussian": kl_gaussian}
# The KL form that goes with each sampler when --kl_form is not given, so that `--sampler flow_sde` on a Flow-GRPO
# preset is Flow-GRPO and the CPS run is FlowCPS: Flow-GRPO's divisor for the Wiener-noise SDEs (Flow-SDE, Dance-SDE
# (DanceGRPO itself trains without KL), CPWS), FlowCPS's plain mean square for the coefficients-preserving samplers.
DEFAULT_KL_FORM = {"flow_sde": "flow_grpo", "dance_sde": "flow_grpo", "cpws": "flow_grpo", "cps": "mse",
                   "dpm_sde": "mse", "ode": "mse"}


# -- which steps are trained -------------------------------------------------------------------------------------
# One signature, fn(stochastic (N,) bool, batch, fraction, generator) -> (batch, K) step indices per sample.
def ordered_timesteps(stochastic: Tensor, batch: int = 1, fraction: float = 0.99,
                      generator: torch.Generator | None = None) -> Tensor:
    """Flow-GRPO: the first int(N * fraction) steps in order (0.99 -> N - 1: the last, noise-free CPS step is
    skipped), keeping only steps that injected noise (a deterministic step has no density); the same for every
    sample (`generator` is unused)."""
    n = len(stochastic)
    steps = torch.arange(int(n * fraction))
    return steps[stochastic[steps]].expand(batch, -1)


def random_timesteps(stochastic: Tensor, batch: int = 1, fraction: float = 0.6,
                     generator: torch.Generator | None = None) -> Tensor:
    """DanceGRPO: per sample, a random subset of the stochastic steps before the last, int(fraction x their number)
    of them (at least 1), each row in random order (Dance's permutation)."""
    candidates = torch.arange(len(stochastic) - 1)
    candidates = candidates[stochastic[candidates]]
    if len(candidates) == 0:
        raise ValueError("no stochastic step to train: widen the SDE window or use a stochastic sampler")
    k = max(1, int(fraction * len(candidates)))
    order = torch.stack([torch.randperm(len(candidates), generator=generator)[:k] for _ in range(batch)])
    return candidates[order]


TIMESTEPS = {"ordered": ordered_timesteps, "random": random_timesteps}  # --timesteps


def draw_sde_window(num_steps: int, size: int, lo: int = 0, hi: int | None = None,
                    generator: torch.Generator | None = None) -> tuple[int, int]:
    """Flow-GRPO-Fast / MixGRPO: a window of `size` consecutive stochastic steps whose start is uniform in
    [lo, hi - size]; all other steps use the ODE. Default range: the first half, (0, N // 2) as Flow-GRPO-Fast."""
    hi = num_steps // 2 if hi is None else hi
    if size < 1 or lo < 0 or hi > num_steps or lo + size > hi:
        raise ValueError(f"SDE window of {size} steps does not fit in range [{lo}, {hi}) of {num_steps} steps")
    start = lo + int(torch.randint(hi - size - lo + 1, (1,), generator=generator))
    return start, start + size


# -- which samples each optimizer step trains on ---------------------------------------------------------------------
def split_updates(keep: Tensor, updates: int, generator: torch.Generator | None = None) -> Tensor:
    """The update (optimizer step) that trains each sample: (B,) in [0, updates), -1 where not kept.

    As Flow-GRPO: the samples are filtered first (`keep`: a finite reward, and a non-zero advantage where zero ones
    are dropped), then split into `updates` steps of equal size (sizes differ by one where the kept count does not
    divide). The split is drawn over the whole world's samples, so it is the same at any world size; it is
    stratified: each run of `updates` consecutive kept samples sends one sample to each step, in a random order. A
    rank holds a contiguous slice of the samples, so whatever the world size its work per step differs by at most
    two samples between steps (a random split of 64 ranks' samples leaves some rank ~50% more than the mean)."""
    kept = torch.nonzero(keep)[:, 0]
    blocks = -(-len(kept) // updates)
    order = torch.rand(blocks, updates, generator=generator).argsort(1).flatten()[:len(kept)]
    out = torch.full(keep.shape, -1, dtype=torch.long)
    out[kept] = order
    return out
