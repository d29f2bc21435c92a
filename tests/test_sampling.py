"""sampling.py against independent references: diffusers' scheduler, torch.distributions, closed forms, and
hypothesis property tests of coefficient preservation (Definition 1) over the whole domain
t in (0, 1], t' in [0, t), eta in [0, 1]."""

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from scipy import stats

import sampling
from flow_cps import config, plan
from sampling import (
    SAMPLERS,
    cps,
    cps_log_prob,
    flux_mu,
    gaussian_log_prob,
    ode,
    rollout,
    sigmas,
    step_log_prob,
)
from theory import coefficients, eq10_noise_level, noise_level, sde_sigma

STEP_COUNTS = [4, 6, 10, 16, 28, 40]
PRESERVING = ["cps", "cpws", "dpm_sde"]
SDES = ["flow_sde", "dance_sde"]

# t in (0, 1] with t = 1 (Flow-SDE's guarded case) drawn often; t' = f * t with f in [0, 1).
times = st.one_of(st.just(1.0), st.floats(1e-3, 1.0))
fractions = st.one_of(st.just(0.0), st.floats(0.0, 0.999))
etas = st.floats(0.0, 1.0)


def _cpws_defined(t, t_next, eta):
    s = sde_sigma("flow_sde", t, t_next, eta)
    return t_next**2 - s**2 * (t - t_next) >= 0


# ------------------------------------------------------------------------------------------------ schedules


@pytest.fixture(scope="module")
def diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_sd35_schedule_equals_diffusers(diffusers_scheduler, n):
    # SD3.5-Medium's scheduler config: static shift 3 (so its sigma_min is the shifted 1/1000).
    sched = diffusers_scheduler(shift=3.0)
    sched.set_timesteps(n)
    assert torch.equal(sigmas(n, shift=3.0), sched.sigmas)


@pytest.mark.parametrize("n", STEP_COUNTS)
@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_flux_dev_schedule_equals_diffusers(diffusers_scheduler, n, resolution):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    # FLUX.1-dev: dynamic shifting; FluxPipeline passes linspace(1, 1/N, N) and mu from the packed sequence length.
    seq_len = (resolution // 16) ** 2
    assert flux_mu(seq_len) == pytest.approx(calculate_shift(seq_len))
    sched = diffusers_scheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                base_image_seq_len=256, max_image_seq_len=4096)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=calculate_shift(seq_len))
    assert torch.equal(sigmas(n, mu=flux_mu(seq_len)), sched.sigmas)


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_flux_schnell_schedule_equals_diffusers(diffusers_scheduler, n):
    sched = diffusers_scheduler(shift=1.0)  # schnell: no shift, no dynamic shifting
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n))
    assert torch.equal(sigmas(n), sched.sigmas)


def test_schedule_reference_values():
    # the grids each model samples on (docs/NOTES.md, "Schedules"), independent of diffusers.
    sd35 = [1, .9601, .9133, .8577, .7904, .7073, .6022, .4649, .2780, .0089, 0]
    assert sigmas(10, 3.0).tolist() == pytest.approx(sd35, abs=5e-5)
    assert sigmas(6, mu=flux_mu(1024)).tolist() == pytest.approx([1, .9037, .7897, .6525, .4842, .2730, 0], abs=5e-5)
    assert sigmas(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    dance = [1, .9783, .9545, .9286, .9, .8684, .8333, .7941, .75, .7, .6429, .5769, .5, .4091, .3, .1667, 0]
    assert sigmas(16, 3.0, grid="uniform").tolist() == pytest.approx(dance, abs=5e-5)


@given(n=st.integers(1, 200), shift=st.floats(0.2, 8.0))
def test_schedule_is_decreasing_from_one_to_zero(n, shift):
    s = sigmas(n, shift)
    assert len(s) == n + 1 and s[0] == 1.0 and s[-1] == 0.0
    assert bool((s[1:] < s[:-1]).all())


# ------------------------------------------------------------------------------------------------ the ODE step


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_ode_step_equals_diffusers_step(diffusers_scheduler, shift):
    sched = diffusers_scheduler(shift=shift)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for k in range(10):
        sched._step_index = k  # the scheduler is stateful; point it at step k
        ref = sched.step(v, sched.timesteps[k], x).prev_sample
        mean, std = ode(x, v, float(sched.sigmas[k]), float(sched.sigmas[k + 1]))
        assert torch.equal(mean, ref)  # bit-identical in fp32
        assert float(std) == 0.0
        x = ref


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_cps_at_eta_one_is_diffusers_stochastic_sampling(diffusers_scheduler, shift):
    """diffusers' stochastic_sampling step, x0 = x - sigma v, then (1 - sigma') x0 + sigma' eps with eps =
    randn(sample.shape, generator), is CPS at eta = 1 (Eq. 12: cos(pi/2) = 0, sin(pi/2) = 1): the same eps gives the
    same next sample, on every step of the grid (the last, t' = 0, returns x0_hat in both)."""
    sched = diffusers_scheduler(shift=shift, stochastic_sampling=True)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for k in range(10):
        sched._step_index = k
        ref = sched.step(v, sched.timesteps[k], x, generator=torch.Generator().manual_seed(k)).prev_sample
        eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(k))  # what diffusers' randn_tensor draws
        mean, std = cps(x, v, float(sched.sigmas[k]), float(sched.sigmas[k + 1]), 1.0)
        torch.testing.assert_close(mean + std * eps, ref, rtol=0, atol=1e-6)
        assert float(std) == pytest.approx(float(sched.sigmas[k + 1]))  # all of the noise t' is fresh
        x = ref


def test_ode_step_bf16_close_to_diffusers(diffusers_scheduler):
    # diffusers multiplies dt * v in bf16; we upcast first (all sampler math fp32), so equal up to bf16 rounding.
    sched = diffusers_scheduler(shift=3.0)
    sched.set_timesteps(10)
    sched._step_index = 3
    x, v = torch.randn(2, 16, 4).bfloat16(), torch.randn(2, 16, 4).bfloat16()
    ref = sched.step(v, sched.timesteps[3], x).prev_sample
    mean, _ = ode(x, v, float(sched.sigmas[3]), float(sched.sigmas[4]))
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean.bfloat16(), ref, atol=2e-2, rtol=1e-2)


# ------------------------------------------------------------------------------------------------ Definition 1


@given(t=times, f=fractions, eta=etas, name=st.sampled_from(PRESERVING))
def test_coefficients_preserved(t, f, eta, name):
    t_next = f * t
    if name == "cpws":
        assume(_cpws_defined(t, t_next, eta))
    a, b, c = coefficients(name, t, t_next, eta)
    assert a == pytest.approx(1 - t_next, abs=1e-12)                 # Definition 1 (1)
    assert math.hypot(b, c) == pytest.approx(t_next, abs=1e-12)     # Definition 1 (2)
    assert b >= -1e-15 and c >= 0


@given(t=times, f=fractions, eta=etas, name=st.sampled_from(SDES))
def test_sdes_overshoot_noise_as_eq10_says(t, f, eta, name):
    t_next = f * t
    a, b, c = coefficients(name, t, t_next, eta)
    assert a == pytest.approx(1 - t_next, abs=1e-12)  # the sample coefficient is right ...
    level = math.hypot(b, c)
    assert level >= t_next - 1e-12                      # ... but the noise is never less than t'
    closed = eq10_noise_level(t, t_next, sde_sigma(name, t, t_next, eta))
    assert level == pytest.approx(closed, rel=1e-9, abs=1e-12)


def test_cps_special_cases():
    x, v = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    t = 0.6
    x0_hat = x - t * v
    # eta = 1: predict x0 and re-noise fully: mean = (1 - t') x0_hat, std = t'.
    mean, std = cps(x, v, t, 0.4, 1.0)
    torch.testing.assert_close(mean, 0.6 * x0_hat, atol=1e-12, rtol=0)
    assert float(std) == pytest.approx(0.4)
    # the last step (t' = 0): deterministic and exactly x0_hat, for every eta: no residual noise.
    for eta in (0.3, 0.7, 1.0):
        mean, std = cps(x, v, t, 0.0, eta)
        assert float(std) == 0.0
        torch.testing.assert_close(mean, x0_hat, atol=1e-12, rtol=0)
    # Eq. 12 numbers: eta = 0.7 at t' = 0.5 -> b = 0.5 cos(0.35 pi), c = 0.5 sin(0.35 pi).
    a, b, c = coefficients("cps", 0.6, 0.5, 0.7)
    assert (b, c) == pytest.approx((0.5 * 0.45399, 0.5 * 0.89101), abs=1e-5)


def test_flow_sde_t1_guard_gives_first_step_noise_eta():
    # Flow-GRPO replaces only the denominator's t by sigmas[1] at t = 1, so the first std is exactly eta.
    for grid in (sigmas(10, 3.0), sigmas(6, mu=flux_mu(1024)), sigmas(16)):
        for eta in (0.3, 0.7, 0.9):
            _, _, c = coefficients("flow_sde", 1.0, float(grid[1]), eta)
            assert c == pytest.approx(eta, rel=1e-6)


def test_dpm_sde_angle():
    # App. B: b = t' e^{-h}, e^{-h} = t'(1-t) / (t(1-t')).
    t, tn = 0.7, 0.4
    _, b, c = coefficients("dpm_sde", t, tn, 0.0)
    e = tn * (1 - t) / (t * (1 - tn))
    assert (b, c) == pytest.approx((tn * e, tn * math.sqrt(1 - e * e)), abs=1e-12)


# ------------------------------------------------------------------------------------------------ statistics


@given(t=times, f=fractions, eta=etas, name=st.sampled_from(PRESERVING))
def test_point_mass_noise_is_gaussian_with_std_t_next(t, f, eta, name):
    """With the exact velocity of a point mass x0, x_{t'} - (1-t') x0 is N(0, t'^2) per coordinate.

    n = 20000 coordinates: the sample std is within 4% of t' (about 8 standard errors) and the KS distance of
    the standardised noise to N(0, 1) is below 0.03 (the 1% critical value is 0.0115).
    """
    t_next = f * t
    # Below ~1e-9 the fp64 rounding of x (~1e-16 absolute) is no longer small against the t' scale being checked.
    assume(t_next == 0 or t_next > 1e-9)
    if name == "cpws":
        assume(_cpws_defined(t, t_next, eta))
    g = torch.Generator().manual_seed(1234)
    n = 20_000
    x0 = torch.randn(1, n, generator=g, dtype=torch.float64)
    x = (1 - t) * x0 + t * torch.randn(1, n, generator=g, dtype=torch.float64)
    mean, std = SAMPLERS[name](x, (x - x0) / t, t, t_next, eta)
    noise = (mean + std * torch.randn(1, n, generator=g, dtype=torch.float64) - (1 - t_next) * x0).flatten()
    if t_next == 0:
        assert float(noise.abs().max()) < 1e-12
        return
    assert float(noise.std()) == pytest.approx(t_next, rel=0.04)
    assert stats.kstest((noise / t_next).numpy(), "norm").statistic < 0.03


@pytest.mark.parametrize("name", ["flow_sde", "dance_sde", "cps", "cpws", "dpm_sde"])
def test_rollout_draws_noise_with_the_returned_std(name):
    # One step from t = 0.8 to 0.6: the spread of (x' - mean) over repeated draws is the step's returned std.
    x1 = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0))
    velocity = lambda x, t: 0.5 * x  # any velocity
    traj = rollout(velocity, x1, torch.tensor([0.8, 0.6]), name, 0.5, torch.Generator().manual_seed(1))
    mean, expected = SAMPLERS[name](x1, velocity(x1, None), 0.8, 0.6, 0.5)  # the step's mean, as the rollout's
    empirical = float((traj.latents[:, 1] - mean).std())
    assert empirical == pytest.approx(float(expected), rel=0.02)


@given(name=st.sampled_from(["flow_sde", "dance_sde", "cps", "cpws"]), t=st.floats(0.05, 1.0),
       f=st.floats(0.0, 0.95))
def test_eta_zero_is_the_ode(name, t, f):
    # dpm_sde is excluded on purpose: its stochasticity is set by the grid and it ignores eta (documented).
    x, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mean, std = SAMPLERS[name](x, v, t, f * t, 0.0)
    ode_mean, _ = ode(x, v, t, f * t)
    torch.testing.assert_close(mean, ode_mean, atol=2e-6, rtol=1e-6)
    assert float(torch.as_tensor(std).abs().max()) == 0.0


# ------------------------------------------------------------------------------------------------ log-probs


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), std=st.floats(1e-3, 3.0),
       seed=st.integers(0, 2**16))
def test_gaussian_log_prob_equals_torch_distributions(shape, std, seed):
    g = torch.Generator().manual_seed(seed)
    x_next, mean = torch.randn(3, *shape, generator=g), torch.randn(3, *shape, generator=g)
    ref = torch.distributions.Normal(mean, std).log_prob(x_next).mean(dim=tuple(range(1, x_next.ndim)))
    torch.testing.assert_close(gaussian_log_prob(x_next, mean, std), ref, rtol=1e-5, atol=1e-5)


def test_gaussian_log_prob_per_sample_std_and_bf16():
    x_next, mean = torch.randn(4, 16, 4), torch.randn(4, 16, 4)
    std = torch.tensor([0.1, 0.5, 1.0, 2.0]).view(4, 1, 1)
    ref = torch.distributions.Normal(mean, std).log_prob(x_next).mean(dim=(1, 2))
    torch.testing.assert_close(gaussian_log_prob(x_next, mean, std), ref)
    lp = gaussian_log_prob(x_next.bfloat16(), mean.bfloat16(), std.bfloat16())
    assert lp.dtype == torch.float32 and lp.shape == (4,)
    assert cps_log_prob(x_next.bfloat16(), mean.bfloat16()).dtype == torch.float32


def test_cps_log_prob_is_minus_mean_squared_error():
    x_next, mean = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    torch.testing.assert_close(cps_log_prob(x_next, mean), -((x_next - mean) ** 2).mean(dim=(1, 2)))


def test_bf16_inputs_give_fp32_means():
    x, v = torch.randn(2, 8).bfloat16(), torch.randn(2, 8).bfloat16()
    for name, step in SAMPLERS.items():
        mean, std = step(x, v, 0.9, 0.8, 0.5)
        assert mean.dtype == torch.float32 and torch.as_tensor(std).dtype == torch.float32, name


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_per_sample_times_equal_scalar_times(name):
    # Training batches mix timesteps: t of shape (B,) must give what each sample gets with a float t.
    x, v = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    t, t_next = torch.tensor([1.0, 0.7, 0.3]), torch.tensor([0.9, 0.5, 0.25])
    mean, std = SAMPLERS[name](x, v, t, t_next, 0.4)
    for i in range(3):
        m_i, s_i = SAMPLERS[name](x[i:i + 1], v[i:i + 1], float(t[i]), float(t_next[i]), 0.4)
        torch.testing.assert_close(mean[i:i + 1], m_i)
        torch.testing.assert_close(torch.as_tensor(std).expand(3, 1, 1)[i].flatten(), s_i.flatten())


# ------------------------------------------------------------------------------------------------ rollout


def _velocity(x, t):
    return torch.tanh(x) - 0.3 * t.view(-1, *([1] * (x.ndim - 1)))


@pytest.mark.parametrize("name", ["flow_sde", "dance_sde", "cps", "dpm_sde"])
def test_recomputed_log_prob_equals_rollout(name):
    # The on-policy check: recomputing each step's log-prob from the stored trajectory gives the rollout's.
    grid = sigmas(6, 3.0)
    traj = rollout(_velocity, torch.randn(5, 8, 4), grid, name, 0.7, torch.Generator().manual_seed(0))
    for k in range(6):
        if not traj.stochastic[k]:
            continue
        x = traj.latents[:, k]
        t = torch.full((5,), float(grid[k]))
        lp, _, _ = step_log_prob(_velocity(x, t), x, traj.latents[:, k + 1], t, torch.full((5,), float(grid[k + 1])),
                                 name, 0.7)
        assert torch.equal(lp, traj.log_probs[:, k])


def test_rollout_reproducible_and_batch_independent():
    grid = sigmas(5)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    x1 = torch.stack([torch.randn(6, generator=g) for g in gens([1, 2, 3])])
    a = rollout(_velocity, x1, grid, "cps", 0.7, gens([11, 12, 13]))
    b = rollout(_velocity, x1, grid, "cps", 0.7, gens([11, 12, 13]))
    assert torch.equal(a.latents, b.latents)
    # sample 1 alone, with its own generator, follows the same trajectory as inside the batch
    c = rollout(_velocity, x1[1:2], grid, "cps", 0.7, gens([12]))
    torch.testing.assert_close(c.latents[0], a.latents[1], atol=1e-6, rtol=0)
    assert a.latents.shape == (3, 6, 6) and a.log_probs.shape == (3, 5)


def test_rollout_sde_window():
    grid = sigmas(8)
    traj = rollout(_velocity, torch.randn(4, 6), grid, "flow_sde", 0.7, torch.Generator().manual_seed(0),
                   window=(2, 5))
    assert traj.stochastic.tolist() == [False, False, True, True, True, False, False, False]
    assert float(traj.log_probs[:, ~traj.stochastic].abs().max()) == 0.0
    # outside the window the transitions are exactly the ODE
    for k in (0, 1, 5, 6, 7):
        mean, _ = ode(traj.latents[:, k], _velocity(traj.latents[:, k], torch.full((4,), float(grid[k]))),
                      float(grid[k]), float(grid[k + 1]))
        assert torch.equal(mean, traj.latents[:, k + 1])


def test_stochastic_steps_are_one_rule():
    """The rollout's mask, the trained-step count of the plan and the config check all ask sampling.stochastic."""
    grid = sigmas(10, 3.0)
    assert sampling.stochastic("cps", grid, 0.7).tolist() == [True] * 9 + [False]  # CPS: no noise at t' = 0
    assert not sampling.stochastic("ode", grid, 0.0).any() and not sampling.stochastic("flow_sde", grid, 0.0).any()
    traj = rollout(_velocity, torch.randn(2, 4), grid, "cps", 0.7, torch.Generator().manual_seed(0), window=(2, 6))
    assert torch.equal(traj.stochastic, sampling.stochastic("cps", grid, 0.7, (2, 6)))
    assert plan.trained_steps("cps", grid, 0.7, "ordered", 0.99) == 9
    with pytest.raises(ValueError, match=r"step 7 \(t 0.4649 -> 0.2780\) of a rollout: Flow-CPWS"):
        rollout(_velocity, torch.randn(2, 4), grid, "cpws", 0.7)  # refused before any forward
    assert "cannot take step 7 (t 0.4649 -> 0.2780) of a rollout" in config.sampler_problem(
        config.parse_config(["--sampler", "cpws"]), grid)


def test_default_log_prob_is_found_by_the_samplers_name():
    grid, x1 = sigmas(4), torch.randn(2, 4)
    assert sampling.default_log_prob(cps) == sampling.default_log_prob("cps") == "cps"
    step = functools.partial(cps)  # a step function that is not registered has no default
    with pytest.raises(ValueError, match="no default log-prob"):
        rollout(_velocity, x1, grid, step, 0.7, torch.Generator().manual_seed(0))
    mine = rollout(_velocity, x1, grid, step, 0.7, torch.Generator().manual_seed(0), log_prob="cps")
    named = rollout(_velocity, x1, grid, "cps", 0.7, torch.Generator().manual_seed(0))
    assert torch.equal(mine.log_probs, named.log_probs)


def test_cps_final_sample_is_last_x0_hat():
    traj = rollout(_velocity, torch.randn(3, 5), sigmas(4), "cps", 0.9, torch.Generator().manual_seed(0))
    assert not traj.stochastic[-1]  # std = 0 at t' = 0
    torch.testing.assert_close(traj.final, traj.x0_hat, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ errors


def test_bad_arguments_have_clear_messages():
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"eta and 2 - eta .*pass 0\.8"):
        cps(x, v, 0.5, 0.4, 1.2)
    with pytest.raises(ValueError, match=r"CPS needs eta in \[0, 1\]"):
        cps(x, v, 0.5, 0.4, -0.1)
    with pytest.raises(ValueError, match=r"0 <= t_next < t <= 1"):
        cps(x, v, 0.5, 0.5, 0.3)
    with pytest.raises(ValueError, match=r"0 <= t_next < t <= 1"):
        sampling.flow_sde(x, v, 0.4, 0.6, 0.3)
    with pytest.raises(ValueError, match=r"num_steps must be an integer >= 1"):
        sigmas(0)
    with pytest.raises(ValueError, match=r"unknown sampler 'sde'.*'cps'.*'flow_sde'"):
        rollout(_velocity, x, sigmas(2), "sde")
    with pytest.raises(ValueError, match=r"Flow-CPWS \(Eq. 15\) is undefined.*Use 'cps'"):
        sampling.cpws(x, v, 0.2, 0.0, 0.7)
    with pytest.raises(ValueError, match=r"std > 0.*deterministic"):
        gaussian_log_prob(x, v, 0.0)
    with pytest.raises(ValueError, match=r"unknown log-prob 'sum'"):
        sampling.get_log_prob("sum")
    with pytest.raises(ValueError, match=r"SDE window"):
        rollout(_velocity, x, sigmas(4), "cps", 0.5, window=(3, 7))
    with pytest.raises(ValueError, match=r"either a static shift or a dynamic mu"):
        sigmas(4, 3.0, mu=0.5)
    with pytest.raises(ValueError, match=r"eta must be a finite number >= 0"):
        sampling.flow_sde(x, v, 0.5, 0.4, -1.0)
    with pytest.raises(ValueError, match=r"one per sample"):
        sampling.randn((3, 2), [torch.Generator()])


def test_noise_level_of_ode_is_t_next():
    assert noise_level("ode", 0.8, 0.3, 0.9) == pytest.approx(0.3)
