"""grpo.py against hand-computed cases and independent references (numpy, torch.distributions)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import grpo


def test_flow_grpo_advantages_hand_case():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    g = torch.tensor([0, 0, 1, 1])
    std = np.std([1, 2, 3, 4])  # population std over the batch, as Flow-GRPO's numpy call
    expected = torch.tensor([-0.5, 0.5, -0.5, 0.5]) / (std + 1e-4)
    torch.testing.assert_close(grpo.flow_grpo_advantages(r, g), expected)
    per_group = grpo.ADVANTAGES["flow_grpo_group_std"](r, g)
    torch.testing.assert_close(per_group, torch.tensor([-0.5, 0.5, -0.5, 0.5]) / (0.5 + 1e-4))
    torch.testing.assert_close(per_group, grpo.flow_grpo_advantages(r, g, global_std=False))


def test_all_equal_groups_give_exact_zero_not_nan():
    r = torch.tensor([0.7, 0.7, 0.7, 1.0, 2.0, 3.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    for adv in [fn(r, g) for fn in grpo.ADVANTAGES.values()]:
        assert torch.equal(adv[:3], torch.zeros(3))
        assert torch.isfinite(adv).all() and (adv[3:] != 0).any()
    everything_equal = torch.full((8,), 0.3)
    assert torch.equal(grpo.flow_grpo_advantages(everything_equal, torch.arange(8) // 4), torch.zeros(8))
    assert torch.equal(grpo.dance_grpo_advantages(everything_equal, torch.arange(8) // 4), torch.zeros(8))


def test_advantage_clip():
    r = torch.tensor([0.0] * 99 + [1000.0])
    adv = grpo.flow_grpo_advantages(r, torch.zeros(100, dtype=torch.long), clip=5.0)
    assert adv.max() == 5.0


def test_invalid_samples_are_excluded_from_statistics():
    r = torch.tensor([1.0, float("nan"), 3.0, 2.0, 4.0, 6.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = grpo.flow_grpo_advantages(r, g)
    valid = [1.0, 3.0, 2.0, 4.0, 6.0]
    std = np.std(valid)
    assert adv[1] == 0
    torch.testing.assert_close(adv[[0, 2, 3, 4, 5]], torch.tensor([-1.0, 1.0, -2.0, 0.0, 2.0]) / (std + 1e-4))
    dance = grpo.dance_grpo_advantages(torch.tensor([1.0, float("nan"), 5.0, 5.0]), torch.tensor([0, 0, 1, 1]))
    assert torch.equal(dance, torch.zeros(4))  # group 0 has one valid sample, group 1 is all-equal


@given(st.lists(st.floats(-10, 10), min_size=8, max_size=8))
def test_dance_advantages_match_torch_unbiased_std(values):
    r = torch.tensor(values, dtype=torch.float64)
    g = torch.tensor([0] * 4 + [1] * 4)
    adv = grpo.dance_grpo_advantages(r, g, clip=1e9)
    for k in (0, 1):
        x = r[4 * k:4 * k + 4]
        ref = (x - x.mean()) / (x.std() + 1e-8)  # torch's default std is unbiased, as DanceGRPO's
        torch.testing.assert_close(adv[4 * k:4 * k + 4], ref)


def test_clipped_surrogate_hand_case_and_gradients():
    logp_old = torch.zeros(3)
    logp_new = torch.log(torch.tensor([1.5, 1.5, 1.01])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 1.0])
    loss, stats = grpo.clipped_surrogate(logp_new, logp_old, adv, clip_range=0.2)
    # A>0, r=1.5: max(-1.5, -1.2) = -1.2 (clipped, no gradient); A<0, r=1.5: max(1.5, 1.2) = 1.5 (unclipped)
    torch.testing.assert_close(loss.detach(), torch.tensor([-1.2, 1.5, -1.01]))
    loss.sum().backward()
    torch.testing.assert_close(logp_new.grad, torch.tensor([0.0, 1.5, -1.01]))
    assert stats["clipfrac"] == pytest.approx(2 / 3)
    assert stats["approx_kl"] == pytest.approx(0.5 * float((logp_new.detach() ** 2).mean()))
    assert stats["ratio_max"] == pytest.approx(1.5) and stats["ratio_min"] == pytest.approx(1.01)


def test_ratio_one_gives_minus_advantage():
    adv = torch.randn(16)
    lp = torch.randn(16)
    loss, stats = grpo.clipped_surrogate(lp, lp.clone(), adv, 1e-4)
    torch.testing.assert_close(loss, -adv)
    assert stats["clipfrac"] == 0 and stats["approx_kl"] == 0


def test_kl_forms_against_torch_distributions():
    torch.manual_seed(0)
    mu, mu_ref = torch.randn(4, 16, 4), torch.randn(4, 16, 4)
    std, dt = torch.full((4, 1, 1), 0.3), torch.full((4,), 0.1)
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(mu, std),
                                              torch.distributions.Normal(mu_ref, std)).flatten(1).mean(1)
    torch.testing.assert_close(grpo.KL_FORMS["gaussian"](mu, mu_ref, std, dt), exact)
    torch.testing.assert_close(grpo.KL_FORMS["flow_grpo"](mu, mu_ref, std, dt), exact * dt)
    torch.testing.assert_close(grpo.KL_FORMS["mse"](mu, mu_ref, std, dt), (mu - mu_ref).pow(2).flatten(1).mean(1))
    assert torch.equal(grpo.KL_FORMS["gaussian"](mu, mu, std, dt), torch.zeros(4))
    # a scalar std and dt (one step for the whole batch) give the same values
    torch.testing.assert_close(grpo.KL_FORMS["flow_grpo"](mu, mu_ref, 0.3, 0.1), exact * 0.1)


def test_kl_form_follows_the_sampler_as_the_official_codes():
    """Flow-GRPO's train_sd3.py divides the mean difference by 2 sigma_t^2 (sigma_t = std / sqrt(dt)); FlowCPS uses the
    plain mean square. Hand-computed: mu - mu_ref = 0.2 everywhere, std 0.3, dt 0.04 -> sigma_t^2 = 2.25."""
    mu, mu_ref = torch.full((2, 8), 0.5), torch.full((2, 8), 0.3)
    flow = grpo.KL_FORMS[grpo.DEFAULT_KL_FORM["flow_sde"]](mu, mu_ref, torch.tensor([0.3, 0.3]), torch.tensor(0.04))
    torch.testing.assert_close(flow, torch.full((2,), 0.04 / (2 * 2.25)))
    cps = grpo.KL_FORMS[grpo.DEFAULT_KL_FORM["cps"]](mu, mu_ref, torch.tensor([0.3, 0.3]), torch.tensor(0.04))
    torch.testing.assert_close(cps, torch.full((2,), 0.04))


def test_ordered_timesteps_skip_the_last_and_deterministic_steps():
    stochastic = torch.ones(10, dtype=torch.bool)
    assert grpo.ordered_timesteps(stochastic, 1, 0.99).tolist() == [list(range(9))]  # int(9.9) = 9: SD3's 9 of 10
    flux = grpo.ordered_timesteps(torch.ones(6, dtype=torch.bool), 2, 0.99)  # FLUX: 5 of 6, the same for every sample
    assert flux.tolist() == [list(range(5))] * 2
    window = torch.zeros(10, dtype=torch.bool)
    window[2:5] = True
    assert grpo.ordered_timesteps(window, 1, 0.99).tolist() == [[2, 3, 4]]


def test_random_timesteps_dance():
    stochastic = torch.ones(16, dtype=torch.bool)
    steps = grpo.random_timesteps(stochastic, batch=32, fraction=0.6, generator=torch.Generator().manual_seed(0))
    assert steps.shape == (32, int(0.6 * 15))
    assert steps.max() < 15  # the last step is never trained
    assert all(len(set(row.tolist())) == steps.shape[1] for row in steps)  # a subset, no repeats
    assert len({tuple(row.tolist()) for row in steps}) > 1  # per-sample subsets differ


def test_random_timesteps_without_stochastic_steps_names_the_fix():
    with pytest.raises(ValueError, match="no stochastic step to train: widen the SDE window"):
        grpo.random_timesteps(torch.zeros(10, dtype=torch.bool), batch=4)


def test_draw_sde_window():
    g = torch.Generator().manual_seed(0)
    starts = {grpo.draw_sde_window(10, 3, generator=g)[0] for _ in range(200)}
    assert starts == {0, 1, 2}  # uniform over the first half (0, 5): starts 0..2
    lo, hi = grpo.draw_sde_window(10, 2, 4, 8, g)
    assert hi - lo == 2 and 4 <= lo <= 6
    with pytest.raises(ValueError, match="does not fit"):
        grpo.draw_sde_window(10, 6)


def test_advantages_are_finite_for_any_batch():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        r = torch.randn(24, generator=g).round()
        r[torch.rand(24, generator=g) < 0.2] = float("nan")
        for fn in grpo.ADVANTAGES.values():
            adv = fn(r, torch.arange(24) // 6)
            assert torch.isfinite(adv).all() and not math.isnan(float(adv.sum()))


@given(st.lists(st.booleans(), min_size=1, max_size=120), st.integers(1, 5), st.integers(0, 2 ** 31))
def test_split_updates_filters_then_splits_into_equal_steps(keep, updates, seed):
    """Flow-GRPO's order: the kept samples only, split into steps whose sizes differ by at most one; every kept
    sample in exactly one step; drawn from the generator alone (the same labels whatever slices them)."""
    keep = torch.tensor(keep)
    labels = grpo.split_updates(keep, updates, torch.Generator().manual_seed(seed))
    assert torch.equal(labels >= 0, keep) and int(labels.max()) < updates
    sizes = torch.bincount(labels[keep], minlength=updates)
    assert int(sizes.sum()) == int(keep.sum()) and int(sizes.max() - sizes.min()) <= 1
    assert torch.equal(labels, grpo.split_updates(keep, updates, torch.Generator().manual_seed(seed)))


@given(st.integers(1, 6), st.integers(2, 8), st.integers(1, 4), st.floats(0, 0.6), st.integers(0, 2 ** 31))
def test_split_updates_leaves_every_slice_balanced(prompts_per_rank, group, updates, dropped, seed):
    """A rank holds a contiguous slice of the world's samples; at any world size its samples differ by at most two
    between steps (by none when nothing is dropped and its slice divides into the steps)."""
    from flow_cps import plan

    g = torch.Generator().manual_seed(seed)
    for world in (1, 2, 3, 4, 8):
        b = plan.Batch(world, prompts_per_rank * world, group, updates, micro_batch=5)
        if b.problem():
            continue
        keep = torch.rand(b.samples, generator=g) >= dropped
        labels = grpo.split_updates(keep, updates, g)
        for rank in range(world):
            counts = torch.bincount(labels[b.rank_slice(rank)][keep[b.rank_slice(rank)]], minlength=updates)
            assert int(counts.max() - counts.min()) <= 2
            if bool(keep.all()) and b.samples_per_rank % updates == 0:
                assert int(counts.max() - counts.min()) == 0


def test_batch_slices_spans_and_work():
    """plan.Batch: rank r holds samples [r n, (r + 1) n); a group's span; each update's work on a rank: its rows,
    the world's terms (every rank alike) and the busiest rank's forwards."""
    from flow_cps import plan

    b = plan.Batch(world=4, prompts=2, group_size=6, updates=2, micro_batch=2)
    assert b.samples_per_rank == 3 and b.rank_slice(2) == slice(6, 9) and b.group_span == 2
    assert plan.Batch(64, 48, 24, 2, 9).group_span == 2 and plan.Batch(64, 16, 12, 3, 1).group_span == 4
    assert plan.Batch(8, 48, 24, 2, 9).group_span == 1
    labels = torch.tensor([0, 1, -1, 0, 0, 1, 1, -1, -1, 0, 1, 1])  # rank 0: 0 1 -; rank 1: 0 0 1; ...
    work = [b.split(labels, r, trained_steps=3) for r in range(4)]
    assert torch.equal(work[1][0].rows, torch.tensor([0, 1])) and torch.equal(work[1][1].rows, torch.tensor([2]))
    assert all(w[0].terms == 4 * 3 and w[1].terms == 5 * 3 for w in work)  # the world's, on every rank
    assert all(w[0].forwards == 3 and w[1].forwards == 3 for w in work)  # the busiest rank: 2 samples x 3 / 2
    # 6 forwards run; an even spread of 12 and 15 terms over 4 ranks would run ceil(3 / 2) + ceil(3.75 / 2) = 4
    assert plan.padding_overhead(b, labels, 3) == pytest.approx(6 / 4 - 1)
    assert "divisible by the world size (5)" in plan.Batch(5, 2, 6, 2, 2).problem()
    assert "divisible by updates_per_iter (5)" in plan.Batch(4, 2, 6, 5, 2).problem()
