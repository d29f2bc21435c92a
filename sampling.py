"""Samplers for flow matching: the ODE, the SDEs of Flow-GRPO and DanceGRPO, and Coefficients-Preserving Sampling.

Paper: Wang & Yu, "Coefficients-Preserving Sampling for Reinforcement Learning with Flow Matching", arXiv 2509.05952.
Every sampler below is one Gaussian transition x_{t'} ~ N(mean, std^2 I) written in the paper's basis

    x_{t'} = a * x0_hat + b * x1_hat + c * eps,      mean = a x0_hat + b x1_hat,  std = c,

and a sampler is *coefficients-preserving* (Definition 1) when a = 1 - t' and sqrt(b^2 + c^2) = t'.

Conventions (the README's conventions box says the same):
  * t = 1 is pure noise, t = 0 is data: x_t = (1 - t) x0 + t x1, x1 ~ N(0, I). diffusers calls t "sigma".
  * velocity v = dx_t/dt = x1 - x0; predictions x0_hat = x_t - t v, x1_hat = x_t + (1 - t) v.
  * one step goes from t to t' = t - Dt with Dt > 0 (the paper's sign). Code that writes dt = t' - t has dt < 0.
  * log-probs are reduced by a *mean* over all non-batch dims (as ddpo / Flow-GRPO / FlowCPS do), in fp32.
  * all sampler math runs in at least fp32 (bf16 overflows in the mean, as Flow-GRPO's code notes).

Notation (variable -> paper):  t -> t,  t_next -> t' = t - Dt,  eta -> eta (noise level),  sigma_t -> sigma_t,
x0_hat -> hat x_0,  x1_hat -> hat x_1 (the paper's predicted noise),  std -> the fresh-noise coefficient c.

Run `python sampling.py` for a demo: each sampler on a point mass, with the residual noise of its final sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
Velocity = Callable[[Tensor, Tensor], Tensor]  # velocity(x (B, ...), t (B,)) -> v (B, ...)

# diffusers' FlowMatchEulerDiscreteScheduler has 1000 training timesteps; its smallest unshifted sigma is 1/1000.
NUM_TRAIN_TIMESTEPS = 1000


# ----------------------------------------------------------------------------------------------------------------
# Schedules (docs/NOTES.md, "Schedules"). Computed here in a few lines instead of driving diffusers' stateful scheduler;
# tests/test_sampling.py checks them against FlowMatchEulerDiscreteScheduler.set_timesteps.


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX.1-dev's resolution-dependent shift: mu = m L + b, linear in the number L of packed 2x2 latent tokens.

    Same formula and defaults as diffusers' `pipeline_flux.calculate_shift` (512 px: L = 1024, mu = 0.63).
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def sigmas(num_steps: int, shift: float = 1.0, mu: float | None = None, *, grid: str | None = None) -> Tensor:
    """The decreasing time grid t_0 = 1 > t_1 > ... > t_N = 0 (length num_steps + 1, fp32), as diffusers makes it.

    Two base grids u (then a shift maps u -> t):
      * "uniform":  u_k = 1 - k/N. FluxPipeline passes this grid (linspace(1, 1/N, N)); DanceGRPO and the
        paper's Figure-2 notebook use it too.
      * "diffusers": u = linspace(1, u_min, N) with u_min = the *shifted* 1/1000, what
        FlowMatchEulerDiscreteScheduler.set_timesteps(N) does by default (SD3.5 pipeline). The shift is then
        applied again, so SD3.5's last non-zero t is 0.0089, not 0.001 (docs/NOTES.md, "Schedules").
    Shifts: static  t = s u / (1 + (s - 1) u)  (SD3.5: s = 3; DanceGRPO: s = 3 on the uniform grid),
            dynamic t = e^mu / (e^mu + 1/u - 1) (FLUX.1-dev; mu from `flux_mu`).
    Default grid: "uniform" when mu is given or shift == 1 (FLUX.1-dev, FLUX.1-schnell, Figure 2), else "diffusers"
    (SD3.5). So sigmas(10, 3.0) is SD3.5, sigmas(6, mu=flux_mu(1024)) FLUX.1-dev at 512 px, sigmas(4) schnell.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}; pass e.g. 10 (SD3.5) or 6 (FLUX).")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}; pass 1.0 for no shift or 3.0 for SD3.5.")
    if mu is not None and shift != 1.0:
        raise ValueError("pass either a static shift or a dynamic mu, not both (FLUX.1-dev uses mu, SD3.5 shift=3).")
    grid = grid or ("uniform" if (mu is not None or shift == 1.0) else "diffusers")
    if grid == "uniform":
        # FluxPipeline: np.linspace(1, 1/N, N) cast to fp32, then shifted in fp32.
        u = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64).to(torch.float32)
    elif grid == "diffusers":
        # set_timesteps(N): linspace over timesteps 1000*sigma from sigma_max to the stored (fp32, shifted)
        # sigma_min, divided by 1000 and shifted, all in fp64. Same order of operations -> bit-identical grid.
        u_min = float(_static_shift(torch.tensor(1.0 / NUM_TRAIN_TIMESTEPS), shift))
        u = torch.linspace(NUM_TRAIN_TIMESTEPS, u_min * NUM_TRAIN_TIMESTEPS, num_steps, dtype=torch.float64)
        u = u / NUM_TRAIN_TIMESTEPS
    else:
        raise ValueError(f"unknown grid {grid!r}; pass 'uniform' or 'diffusers'.")
    t = _static_shift(u, shift) if mu is None else _exponential_shift(u, mu)
    return torch.cat([t.to(torch.float32), torch.zeros(1)])


def _static_shift(u: Tensor, shift: float) -> Tensor:
    return shift * u / (1.0 + (shift - 1.0) * u)


def _exponential_shift(u: Tensor, mu: float) -> Tensor:
    e_mu = torch.tensor(math.exp(mu), dtype=u.dtype)  # a tensor, so each op rounds once, as numpy does
    return e_mu / (e_mu + (torch.ones_like(u) / u - 1))


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared by the step functions.


def _compute_dtype(x: Tensor) -> torch.dtype:
    # fp32 at least (bf16/fp16 overflow in the mean); fp64 stays fp64 so theory.py can check to 1e-12.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as_time(t: float | Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    """t as a tensor broadcastable to x: a 0-d tensor for a float, shape (B, 1, ..., 1) for a (B,) tensor."""
    t = torch.as_tensor(t, dtype=dtype, device=x.device)
    if t.ndim == 1:
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"t has shape {tuple(t.shape)} but x has batch size {x.shape[0]}; pass a float or (B,).")
        t = t.reshape(-1, *([1] * (x.ndim - 1)))
    elif t.ndim != 0:
        raise ValueError(f"t must be a float or a tensor of shape (B,), got shape {tuple(t.shape)}.")
    return t


def _prepare(x: Tensor, v: Tensor, t, t_next, eta: float):
    """Upcast, broadcast and validate; returns (x, v, t, t_next, Dt, x0_hat, x1_hat) in the compute dtype."""
    if x.shape != v.shape:
        raise ValueError(f"x {tuple(x.shape)} and v {tuple(v.shape)} must have the same shape.")
    if not (math.isfinite(float(eta)) and float(eta) >= 0.0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}; pass a noise level such as 0.7.")
    dtype = _compute_dtype(x)
    x, v = x.to(dtype), v.to(dtype)
    t, t_next = _as_time(t, x, dtype), _as_time(t_next, x, dtype)
    if bool((t_next >= t).any()) or bool((t > 1).any()) or bool((t_next < 0).any()):
        raise ValueError("each step must go from t to t_next with 0 <= t_next < t <= 1 (t = 1 is noise); "
                         "pass consecutive entries of sigmas(...), e.g. t=s[k], t_next=s[k+1].")
    x0_hat = x - t * v
    x1_hat = x + (1 - t) * v
    return x, v, t, t_next, t - t_next, x0_hat, x1_hat


def flow_grpo_sigma(t: Tensor, t_next: Tensor, eta: float) -> Tensor:
    """Flow-GRPO's diffusion coefficient sigma_t = eta * sqrt(t / (1 - t)), with its t = 1 guard.

    At t = 1 the ratio is infinite; Flow-GRPO replaces only the *denominator's* t by the grid's second value
    sigmas[1] (docs/NOTES.md, "Implementation traps"). Within one step that value is t_next, so the first step's
    fresh-noise std is
    sigma_t * sqrt(1 - t_1) = eta exactly.
    """
    t_guard = torch.where(t >= 1, t_next, t)
    return eta * torch.sqrt(t / (1 - t_guard))


def _transition(x0_hat, x1_hat, a, b, c, like: Tensor):
    """mean = a x0_hat + b x1_hat; std = c broadcast to a tensor (never a Python float)."""
    return a * x0_hat + b * x1_hat, torch.as_tensor(c, dtype=like.dtype, device=like.device)


# ----------------------------------------------------------------------------------------------------------------
# The samplers. Same signature, side by side, so a diff of any two shows only the equation.
# step(x, v, t, t_next, eta) -> (mean, std), both in fp32 (fp64 for fp64 input); std broadcastable to x.


def ode(x: Tensor, v: Tensor, t, t_next, eta: float = 0.0):
    """Euler ODE step (Sec. 2.1): x_{t'} = x_t + (t' - t) v.  a = 1 - t', b = t', c = 0.  eta is unused.

    Written as x + dt v (not a x0_hat + b x1_hat) so that it is bit-identical to diffusers'
    FlowMatchEulerDiscreteScheduler.step(...).prev_sample, which computes exactly this in fp32.
    """
    x, v, t, t_next, _, _, _ = _prepare(x, v, t, t_next, 0.0)
    return x + (t_next - t) * v, torch.zeros((), dtype=x.dtype, device=x.device)


def flow_sde(x: Tensor, v: Tensor, t, t_next, eta: float):
    """Flow-GRPO's SDE, Euler-Maruyama step of Eq. 9, sigma_t = eta sqrt(t/(1-t)) (t = 1 guard: `flow_grpo_sigma`).

    x_{t-Dt} = x_t - [v + sigma_t^2/(2t) (x_t + (1-t) v)] Dt + sigma_t sqrt(Dt) eps, i.e. in the x-hat basis
    a = 1 - t',  b = t' - sigma_t^2 Dt / (2t),  c = sigma_t sqrt(Dt).  Total noise sqrt(b^2+c^2) > t' (Eq. 10).
    """
    x, v, t, t_next, dt, x0_hat, x1_hat = _prepare(x, v, t, t_next, eta)
    sigma_t = flow_grpo_sigma(t, t_next, eta)
    return _transition(x0_hat, x1_hat, 1 - t_next, t_next - sigma_t**2 * dt / (2 * t), sigma_t * dt.sqrt(), x)


def dance_sde(x: Tensor, v: Tensor, t, t_next, eta: float):
    """DanceGRPO's SDE (its `flux_step`): Flow-SDE with a constant diffusion coefficient sigma_t = eta.

    a = 1 - t',  b = t' - eta^2 Dt / (2t),  c = eta sqrt(Dt).  Total noise > t' (Eq. 10), worst near t = 0.
    """
    x, v, t, t_next, dt, x0_hat, x1_hat = _prepare(x, v, t, t_next, eta)
    return _transition(x0_hat, x1_hat, 1 - t_next, t_next - eta**2 * dt / (2 * t), eta * dt.sqrt(), x)


def cps(x: Tensor, v: Tensor, t, t_next, eta: float):
    """Flow-CPS, Eq. 12: x_{t'} = (1 - t') x0_hat + t' cos(eta pi/2) x1_hat + t' sin(eta pi/2) eps.

    a = 1 - t',  b = t' cos(eta pi/2),  c = t' sin(eta pi/2), so b^2 + c^2 = t'^2 for every eta (Definition 1).
    eta = 0 is the Euler ODE; eta = 1 predicts x0 and re-noises with fresh noise, (1 - t') x0_hat + t' eps, which is
    exactly the step of diffusers' FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) (tests/test_sampling.py
    checks the two agree for the same eps). At t' = 0 the std is 0 and the mean is x0_hat: the final sample carries
    no noise. (The official code writes b = sqrt(t'^2 - std^2), equal on eta in [0, 1]; eta is restricted to [0, 1]
    because the code aliases eta and 2 - eta.)
    """
    if not 0.0 <= float(eta) <= 1.0:
        # sin(eta pi/2) is symmetric about eta = 1 and the official sqrt(t'^2 - std^2) returns |cos|, so the code
        # silently runs eta > 1 as 2 - eta, while Eq. 12 would flip the sign of the x1_hat coefficient.
        raise ValueError(f"CPS needs eta in [0, 1], got {eta}: eta and 2 - eta give the same noise (sin is "
                         f"symmetric about pi/2), so eta > 1 adds nothing; pass {min(max(2 - eta, 0.0), 1.0):.3g} "
                         "(eta = 1 is already full re-noising).")
    x, v, t, t_next, _, x0_hat, x1_hat = _prepare(x, v, t, t_next, eta)
    angle = eta * math.pi / 2
    return _transition(x0_hat, x1_hat, 1 - t_next, t_next * math.cos(angle), t_next * math.sin(angle), x)


def cpws(x: Tensor, v: Tensor, t, t_next, eta: float):
    """Flow-CPWS, Eq. 15 (coefficients-preserving with Wiener-scaled noise): keep Flow-SDE's fresh noise
    c = sigma_t sqrt(Dt) and shrink the x1_hat coefficient so that the total noise is exactly t':
    a = 1 - t',  b = sqrt(t'^2 - sigma_t^2 Dt).  Theorem 1: Flow-SDE's b is its first-order Taylor expansion.
    Provenance: a reconstruction (this project's derivation; docs/NOTES.md, "Where the numbers come from"): the
    paper's Eq. 15 was not read; the form follows the reviewers' quotes and the authors' notebook (cell 3 plots
    sqrt(t^2 - x) against t - x/(2t)).

    Undefined where t'^2 < sigma_t^2 Dt (always at t' = 0, and near the end of short schedules): raises ValueError.
    """
    x, v, t, t_next, dt, x0_hat, x1_hat = _prepare(x, v, t, t_next, eta)
    sigma_t = flow_grpo_sigma(t, t_next, eta)
    b2 = t_next**2 - sigma_t**2 * dt
    if bool((b2 < 0).any()):
        raise ValueError("Flow-CPWS (Eq. 15) is undefined here: t'^2 < sigma_t^2 * Dt (the Wiener noise alone "
                         "exceeds the target noise level t'; always so at t' = 0). Use 'cps' (Eq. 12), which is "
                         "defined on every step, or a smaller eta / more steps.")
    return _transition(x0_hat, x1_hat, 1 - t_next, b2.sqrt(), sigma_t * dt.sqrt(), x)


def dpm_sde(x: Tensor, v: Tensor, t, t_next, eta: float = 0.0):
    """First-order SDE-DPM-Solver++ (Appendix B, Eq. 22-24), written for flow matching (alpha = 1-t, sigma = t).

    With lambda = log((1-t)/t) and h = lambda' - lambda, e^{-h} = t'(1-t) / (t(1-t')):
    a = 1 - t',  b = t' e^{-h},  c = t' sqrt(1 - e^{-2h}); b^2 + c^2 = t'^2, so it is coefficients-preserving,
    a CPS with a schedule-given angle cos(phi) = e^{-h}. Its stochasticity is fixed by the grid: eta is unused.
    """
    x, v, t, t_next, _, x0_hat, x1_hat = _prepare(x, v, t, t_next, 0.0)
    exp_neg_h = t_next * (1 - t) / (t * (1 - t_next))  # 0 at t = 1 (full re-noise) and at t' = 0
    return _transition(x0_hat, x1_hat, 1 - t_next, t_next * exp_neg_h,
                       t_next * torch.sqrt(1 - exp_neg_h**2), x)


SAMPLERS: dict[str, Callable] = {
    "ode": ode, "flow_sde": flow_sde, "dance_sde": dance_sde, "cps": cps, "cpws": cpws, "dpm_sde": dpm_sde,
}


def get_sampler(name: str | Callable) -> Callable:
    """A step function by name (SAMPLERS); a step function passes through, so callers can resolve names once."""
    if callable(name):
        return name
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}.")
    return SAMPLERS[name]


# ----------------------------------------------------------------------------------------------------------------
# Log-probabilities of a transition.


def _mean_over_non_batch(t: Tensor) -> Tensor:
    return t.mean(dim=tuple(range(1, t.ndim))) if t.ndim > 1 else t


def gaussian_log_prob(x_next: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
    """Eq. 13: log N(x'; mean, std^2 I) per element, -(x'-mean)^2/(2 std^2) - log std - log sqrt(2 pi),
    then the *mean* over all non-batch dims (not the sum: a summed ratio over 16k dims overflows, ddpo #10).

    Returns (B,) fp32 (fp64 for fp64 input). std must be > 0: the ODE and CPS's last step (t' = 0) have no density.
    """
    dtype = _compute_dtype(x_next)
    x_next, mean = x_next.to(dtype), mean.to(dtype)
    std = torch.as_tensor(std, dtype=dtype, device=x_next.device)
    if bool((std <= 0).any()):
        raise ValueError("gaussian_log_prob needs std > 0, but the transition is deterministic here (the ODE, or "
                         "the last CPS/DPM-SDE step at t' = 0); skip that step or use cps_log_prob.")
    lp = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return _mean_over_non_batch(lp)


def cps_log_prob(x_next: Tensor, mean: Tensor, std: Tensor | float | None = None) -> Tensor:
    """Eq. 14, the surrogate the official FlowCPS code trains with: -mean over non-batch dims of (x' - mean)^2.

    It drops the 1/(2 std^2) factor, -log std and the constant of Eq. 13. Dropping 1/(2 std^2) reweights each
    step's gradient by 2 std^2; CPS's std goes to 0 at the end of the schedule, where Eq. 13 would weigh a step
    by up to ~1e4 (SD3.5 step 9: std 0.008), and the paper (App. D) reports that CPS with Eq. 13 fails to converge.
    Ratios exp(lp_new - lp_old) are then on a different scale, which is why CPS configs use tiny clip ranges.
    `std` is accepted and ignored so both log-probs share a signature.
    """
    dtype = _compute_dtype(x_next)
    return -_mean_over_non_batch((x_next.to(dtype) - mean.to(dtype)) ** 2)


LOG_PROBS: dict[str, Callable] = {"gaussian": gaussian_log_prob, "cps": cps_log_prob}

# Default log-prob per sampler (the paper's choice; App. D ablates it, `--log_prob` overrides it).
# The coefficients-preserving samplers whose std reaches 0 on the last step train with Eq. 14, as FlowCPS does;
# the SDE baselines keep the exact Gaussian of their own codebases (Flow-GRPO, DanceGRPO).
DEFAULT_LOG_PROB = {"ode": "gaussian", "flow_sde": "gaussian", "dance_sde": "gaussian", "cpws": "gaussian",
                    "cps": "cps", "dpm_sde": "cps"}


def default_log_prob(sampler: str | Callable) -> str:
    """The paper's log-prob for a sampler (DEFAULT_LOG_PROB), found by the sampler's registered name; a step function
    that is not in SAMPLERS (a functools.partial, your own) has none: pass log_prob explicitly."""
    name = sampler if isinstance(sampler, str) else next((k for k, f in SAMPLERS.items() if f is sampler), None)
    if name not in DEFAULT_LOG_PROB:
        raise ValueError(f"no default log-prob for sampler {sampler!r}; pass log_prob ('gaussian' = Eq. 13, "
                         "'cps' = Eq. 14).")
    return DEFAULT_LOG_PROB[name]


def get_log_prob(name: str | Callable) -> Callable:
    """A log-prob by name (LOG_PROBS); a log-prob function passes through."""
    if callable(name):
        return name
    if name not in LOG_PROBS:
        raise ValueError(f"unknown log-prob {name!r}; choose one of {sorted(LOG_PROBS)} "
                         "('gaussian' = Eq. 13, 'cps' = Eq. 14).")
    return LOG_PROBS[name]


# ----------------------------------------------------------------------------------------------------------------
# Rollout and the training-time recomputation of one step.


@dataclass
class Trajectory:
    """One batch of sampled trajectories over a grid of N steps (all tensors fp32, no grad).

    latents:    (B, N+1, ...)  x_{t_0} = initial noise, ..., x_{t_N} = final sample
    log_probs:  (B, N)         log-prob of each taken transition under the rollout policy (0 where deterministic)
    stochastic: (N,) bool      which steps sampled noise (`stochastic`); only those have a meaningful log-prob
    x0_hat:     (B, ...)       the clean prediction at the last step (DanceGRPO decodes this, not the final latent)
    sigmas:     (N+1,)         the grid
    """

    latents: Tensor
    log_probs: Tensor
    stochastic: Tensor
    x0_hat: Tensor
    sigmas: Tensor

    @property
    def final(self) -> Tensor:
        return self.latents[:, -1]

    @staticmethod
    def cat(parts: list[Trajectory]) -> Trajectory:
        """The rollouts of several batches over the same grid and window, as one batch."""
        def joined(name: str) -> Tensor:
            return torch.cat([getattr(p, name) for p in parts])
        return Trajectory(joined("latents"), joined("log_probs"), parts[0].stochastic, joined("x0_hat"),
                          parts[0].sigmas)


def randn(shape: Sequence[int], generator: torch.Generator | Sequence[torch.Generator] | None,
          device: torch.device | str = "cpu") -> Tensor:
    """Standard normal noise of `shape`. A list of generators draws sample i from generator i, so a sample's noise
    depends only on its own seed, not on which other samples share its batch or rank."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample.")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device).to(device)
                            for g in generator])
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device).to(device)


def check_window(window: tuple[int, int] | None, num_steps: int) -> tuple[int, int]:
    lo, hi = (0, num_steps) if window is None else window
    if not 0 <= lo < hi <= num_steps:
        raise ValueError(f"SDE window {window} must satisfy 0 <= start < end <= num_steps = {num_steps}.")
    return lo, hi


def stochastic(sampler: str | Callable, sigma_grid: Tensor, eta: float,
               window: tuple[int, int] | None = None) -> Tensor:
    """(N,) bool: which steps of a rollout over `sigma_grid` inject noise, so have a density to train on: those in
    `window` = (start, end) (None: all) where the sampler's std is > 0 (never the ODE's; not CPS's last, t' = 0). The
    one rule: the rollout, the trained steps and the config checks ask it. The sampler is asked on a dummy tensor
    (its std depends on t, t' and eta alone); a step where it is undefined raises its ValueError, naming the step."""
    step, n = get_sampler(sampler), len(sigma_grid) - 1
    lo, hi = check_window(window, n)
    x = torch.zeros(1, 1)
    out = torch.zeros(n, dtype=torch.bool)
    for k in range(lo, hi):
        t, t_next = float(sigma_grid[k]), float(sigma_grid[k + 1])
        try:
            out[k] = bool((step(x, x, t, t_next, eta)[1] > 0).any())
        except ValueError as e:
            raise ValueError(f"step {k} (t {t:.4f} -> {t_next:.4f}) of a rollout: {e}") from None
    return out


@torch.no_grad()
def rollout(velocity: Velocity, x1: Tensor, sigma_grid: Tensor, sampler: str | Callable = "cps", eta: float = 0.7,
            generator: torch.Generator | Sequence[torch.Generator] | None = None, *,
            window: tuple[int, int] | None = None, log_prob: str | Callable | None = None) -> Trajectory:
    """Sample a batch of trajectories from initial noise x1 over `sigma_grid` with one sampler.

    velocity(x, t) -> v is the (CFG-combined) model prediction; close over the conditioning. Steps k in
    window = (start, end) use `sampler`, all others the ODE (Flow-GRPO-Fast / MixGRPO); None = every step.
    Returns the whole trajectory with per-step log-probs under `log_prob` (default: `default_log_prob(sampler)`).
    `sampler` and `log_prob` are names or the functions themselves (train.py resolves the names once).
    """
    step = get_sampler(sampler)
    lp_fn = get_log_prob(log_prob or default_log_prob(sampler))
    n = len(sigma_grid) - 1
    if n < 1:
        raise ValueError("sigma_grid needs at least 2 entries (one step); build it with sigmas(num_steps).")
    lo, hi = check_window(window, n)
    noisy = stochastic(step, sigma_grid, eta, window)
    x = x1.float()
    B = x.shape[0]
    latents, log_probs = [x], []
    for k in range(n):
        t, t_next = float(sigma_grid[k]), float(sigma_grid[k + 1])
        v = velocity(x, torch.full((B,), t, device=x.device))
        mean, std = (step if lo <= k < hi else ode)(x, v, t, t_next, eta)
        if noisy[k]:
            x = mean + std * randn(mean.shape, generator, mean.device)
            log_probs.append(lp_fn(x, mean, std))
        else:  # deterministic transition: no density; logged as 0 and masked by `stochastic`
            x = mean
            log_probs.append(torch.zeros(B, device=x.device))
        latents.append(x)
    x0_hat = latents[-2] - float(sigma_grid[-2]) * v.float()
    return Trajectory(latents=torch.stack(latents, 1), log_probs=torch.stack(log_probs, 1), stochastic=noisy,
                      x0_hat=x0_hat, sigmas=sigma_grid)


def step_log_prob(v: Tensor, x: Tensor, x_next: Tensor, t: Tensor | float, t_next: Tensor | float,
                  sampler: str | Callable, eta: float, log_prob: str | Callable | None = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Recompute one transition's log-prob *with gradients* (the training side of the importance ratio).

    v = velocity(x, t) from the current policy (with grad); x, x_next, t, t_next come from the stored trajectory.
    Returns (log_prob (B,), mean, std); the mean feeds the KL term. Uses the same step function and the same
    fp32 math as `rollout`, so at the first inner step the ratio is exactly 1 (tests/test_train.py checks it).
    """
    mean, std = get_sampler(sampler)(x, v, t, t_next, eta)
    return get_log_prob(log_prob or default_log_prob(sampler))(x_next, mean, std), mean, std


# ----------------------------------------------------------------------------------------------------------------
# Demo: every sampler on a point mass x0, whose exact velocity is v(x, t) = (x - x0) / t.

if __name__ == "__main__":
    torch.manual_seed(0)
    x0 = torch.randn(1, 4096)
    point_mass = lambda x, t: (x - x0) / t[:, None]  # noqa: E731
    grid = sigmas(10, shift=3.0)
    print(f"SD3.5 10-step grid: {[round(float(s), 4) for s in grid]}")
    print(f"{'sampler':>10} | residual noise std of the final sample (ideal 0), eta = 0.7")
    for name in SAMPLERS:
        if name == "cpws":
            continue  # undefined on the last step (see its docstring)
        traj = rollout(point_mass, torch.randn(64, 4096), grid, name, 0.7, torch.Generator().manual_seed(1))
        print(f"{name:>10} | {float((traj.final - x0).std()):.4f}")
