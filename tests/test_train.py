"""train.py on the built-in digits model: the on-policy ratio, the flattened (sample, step) objective against a
per-step reference, the KL, the LoRA export, streamed evaluation, 2-rank DDP and an exact resume after SIGKILL.

The subprocess tests run the real command lines (`python train.py`, `torchrun ... train.py`) with few iterations.
"""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import grpo
import rewards
import sampling
import train
from flow_cps import checkpoints, config, digits, evaluation, lora, models, plan, scoring, session
from flow_cps.ema import EMASchedule
from flow_cps.policy import Policy

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--iterations", "4", "--eval_every", "2", "--checkpoint_every", "2", "--eval_per_prompt", "2",
        "--prompts_per_iter", "4", "--group_size", "4", "--micro_batch", "8", "--report_to", "none"]


@pytest.fixture(scope="module")
def pretrained():
    return models.load_builtin_backbone("digits")  # pre-train once into the test cache (conftest sets FLOW_CPS_CACHE)


@pytest.fixture
def backbone(pretrained):
    return models.load_builtin_backbone("digits")  # fresh per test: each test adds its own LoRA


def _policy(backbone, lora_rank=8, lora_alpha=16.0, randomise=True):
    policy = Policy(backbone, torch.device("cpu"), 1,
                           lora=lora.LoRA(lora_rank, lora_alpha, tuple(config.ATTENTION_TARGETS)),
                           ema=EMASchedule(0.9))
    if randomise:  # a non-zero LoRA, so the policy differs from the base model
        with torch.no_grad():
            for p in policy.params:
                p.normal_(0, 0.05)
    return policy


def _rollout(policy, sampler="cps", eta=0.5, log_prob="", n=16, micro_batch=16):
    step = sampling.SAMPLERS[sampler]
    lp = sampling.LOG_PROBS[log_prob or sampling.DEFAULT_LOG_PROB[sampler]]
    gens = train.generators(train.Stream.SAMPLE_NOISE, [(0, 1, i, 0) for i in range(n)])
    window = (0, 5) if sampler == "cpws" else None  # CPWS is undefined on the last steps (sampling.cpws)
    J = train.Objective(step, eta, lp, grpo.kl_mse, beta=0.0, clip_range=1e-4)
    samples = train.Samples((digits.prompts("train") * 2)[:n], [None] * n, gens, gens)
    traj, cond = train.rollout(policy.backbone, J, policy.backbone.sigmas(10), samples, window, micro_batch)
    return traj, cond, step, lp


def _pairs(traj, n):
    steps = grpo.ordered_timesteps(traj.stochastic, 1, 0.99)[0]
    return torch.arange(n).repeat_interleave(len(steps)), steps.repeat(n), len(steps)


@pytest.mark.parametrize("sampler,log_prob", [("cps", ""), ("cps", "gaussian"), ("flow_sde", ""), ("flow_sde", "cps"),
                                              ("dance_sde", ""), ("dpm_sde", ""), ("cpws", "")])
def test_first_update_is_exactly_on_policy(backbone, sampler, log_prob):
    """The recomputed log-prob equals the rollout's bitwise (ratio exactly 1) for every (sample, step) term, when the
    training forwards hold >= 16 terms, whatever steps they mix (rollout: 16 samples at one step per forward). On the
    CPU a row's output then does not depend on its batch; in forwards of fewer rows it can differ in the last bits,
    so forwards of 5 terms are checked to 1e-6."""
    policy = _policy(backbone)
    traj, cond, step, lp = _rollout(policy, sampler, log_prob=log_prob)
    rows, ks, _ = _pairs(traj, 16)
    adv = torch.randn(16)
    J = train.Objective(step, 0.5, lp, grpo.kl_mse, beta=0.0, clip_range=1e-4)
    for chunk, exact in ((16, True), (48, True), (len(rows), True), (5, False)):
        for i in range(0, len(rows), chunk):
            logp, logp_old, a, _ = train.terms(J, policy, traj, cond, rows[i:i + chunk], ks[i:i + chunk], adv)
            if exact:
                assert torch.equal(logp, logp_old), (sampler, chunk, i)
                loss, st = grpo.clipped_surrogate(logp, logp_old, a, 1e-4)
                assert st["ratio_min"] == st["ratio_max"] == 1.0
                torch.testing.assert_close(loss, -a, rtol=0, atol=0)
            else:
                torch.testing.assert_close(logp, logp_old, rtol=0, atol=1e-6)


def test_flattened_objective_equals_the_per_step_loss(backbone):
    """`update` runs an update's (sample, step) terms in forwards of micro_batch terms, mixing steps. Its gradient
    equals an independent per-step computation of Flow-GRPO's loss, mean over steps of the mean over samples of the
    clipped surrogate + beta KL, to fp32 rounding, whatever the micro-batch; and the logged loss is that J."""
    policy = _policy(backbone)
    traj, cond, step, lp = _rollout(policy, "flow_sde", eta=0.7, n=16)
    K = int(traj.stochastic[:-1].sum())
    steps = grpo.ordered_timesteps(traj.stochastic, 16, 0.99)
    adv, keep = torch.randn(16), torch.ones(16, dtype=torch.bool)
    keep[3] = False  # an excluded sample (invalid reward)
    with torch.no_grad():  # move the policy away from the rollout's, so ratios differ from 1 and clipping happens
        for p in policy.params:
            p.add_(torch.randn_like(p) * 0.01)
    beta, eps = 0.3, 1e-3
    kept = torch.arange(16)[keep]
    loss_ref = 0.0
    for j in range(K):  # the reference: one forward per trained step, as Flow-GRPO's loop
        x, x_next = traj.latents[kept, j], traj.latents[kept, j + 1]
        c = backbone.select(cond, kept)
        v = backbone.velocity(x, torch.full((len(kept),), float(traj.sigmas[j])), c, policy.module)
        logp, mean, std = sampling.step_log_prob(v, x, x_next, float(traj.sigmas[j]), float(traj.sigmas[j + 1]),
                                                 "flow_sde", 0.7)
        with torch.no_grad(), lora.adapter_disabled(backbone.transformer):
            v_ref = backbone.velocity(x, torch.full((len(kept),), float(traj.sigmas[j])), c)
        mean_ref = sampling.flow_sde(x, v_ref, float(traj.sigmas[j]), float(traj.sigmas[j + 1]), 0.7)[0]
        surrogate, _ = grpo.clipped_surrogate(logp, traj.log_probs[kept, j], adv[kept], eps)
        kl = grpo.kl_flow_grpo(mean, mean_ref, std, traj.sigmas[j] - traj.sigmas[j + 1])
        loss_ref = loss_ref + (surrogate + beta * kl).mean() / K
    loss_ref.backward()
    grad_ref = [p.grad.clone() for p in policy.params]
    policy.opt.zero_grad(set_to_none=True)
    for micro_batch in (7, 16, 1000):
        grads = []

        def capture(max_norm, grads=grads):  # instead of the optimizer step: the accumulated gradient
            grads.append([p.grad.clone() for p in policy.params])
            policy.opt.zero_grad(set_to_none=True)
            return 0.0
        policy.step = capture
        b = plan.Batch(world=1, prompts=2, group_size=8, updates=1, micro_batch=micro_batch)
        J = train.Objective(step, 0.7, lp, grpo.kl_flow_grpo, beta=beta, clip_range=eps)
        work = b.split(grpo.split_updates(keep, 1), 0, K)
        tally = train.update(J, policy, traj, cond, adv, steps, work, max_grad_norm=1.0)
        stats = tally.reduce()
        assert stats["kept"] == 15 and stats["loss"] == pytest.approx(float(loss_ref.detach()), rel=1e-5)
        assert stats["clipfrac"] > 0  # the clip is exercised
        for g, r in zip(grads[0], grad_ref):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


def test_padding_never_injects_nan(backbone):
    """A rank with fewer forwards than another pads with a sample whose loss is multiplied by 0; 0 x NaN is NaN in
    backward, so the padding must be a finite sample: here sample 0 (the first row, the old choice) diverged, its
    reward is invalid and it is not kept. Another rank's extra forward is simulated in the update's forward count."""
    policy = _policy(backbone)
    traj, cond, step, lp = _rollout(policy, n=16, micro_batch=16)
    traj.latents[0] = float("nan")
    keep, adv = torch.ones(16, dtype=torch.bool), torch.randn(16)
    keep[0], adv[0] = False, float("nan")
    steps = grpo.ordered_timesteps(traj.stochastic, 16, 0.99)
    b = plan.Batch(world=1, prompts=2, group_size=8, updates=1, micro_batch=1000)
    work = b.split(grpo.split_updates(keep, 1), 0, steps.shape[1])
    work = [plan.Update(w.rows, w.terms, w.forwards + 1, w.micro_batch) for w in work]  # another rank: one more
    J = train.Objective(step, 0.5, lp, grpo.kl_mse, beta=0.0, clip_range=1e-4)
    tally = train.update(J, policy, traj, cond, adv, steps, work, max_grad_norm=1.0)
    assert math.isfinite(tally.reduce()["grad_norm"]) and all(torch.isfinite(p).all() for p in policy.params)
    assert torch.equal(plan.padding_row(traj, adv, work), torch.tensor([1]))


def test_kl_is_zero_at_init_and_positive_after(backbone):
    policy = _policy(backbone, randomise=False)
    traj, cond, step, lp = _rollout(policy, n=8, micro_batch=8)
    rows, ks = torch.arange(8), torch.full((8,), 3)
    J = train.Objective(step, 0.5, lp, grpo.kl_flow_grpo, beta=0.04, clip_range=1e-4)
    kl = train.terms(J, policy, traj, cond, rows, ks, torch.zeros(8))[3]
    assert torch.equal(kl.detach(), torch.zeros(8))  # LoRA B = 0: policy == reference exactly
    with torch.no_grad():
        for p in policy.params:
            p.normal_(0, 0.05)
    kl = train.terms(J, policy, traj, cond, rows, ks, torch.zeros(8))[3]
    assert (kl > 0).all()
    kl.sum().backward()  # the penalty reaches the LoRA parameters
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.params)


def test_lora_export_loads_with_diffusers_and_reproduces_velocity(backbone, tmp_path):
    from diffusers import FluxTransformer2DModel

    policy = _policy(backbone, lora_rank=4, lora_alpha=12)  # alpha != r: metadata matters
    lora.save_lora(backbone.transformer, tmp_path, pipeline="flux")
    x = torch.randn(6, *backbone.latent_shape)
    t = torch.rand(6)
    cond = backbone.encode(digits.prompts("test")[:6])
    with torch.no_grad():
        v_policy = backbone.velocity(x, t, cond)
        with lora.adapter_disabled(backbone.transformer):
            v_ref = backbone.velocity(x, t, cond)
    fresh = FluxTransformer2DModel.from_pretrained(digits.model_dir(models.digits_backbone), subfolder="transformer")
    with torch.no_grad():
        v_base = backbone.velocity(x, t, cond, fresh.eval())
        fresh.load_lora_adapter(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
        v_loaded = backbone.velocity(x, t, cond, fresh)
    assert torch.equal(v_ref, v_base)  # the adapter-off reference is exactly the base model
    torch.testing.assert_close(v_loaded, v_policy, atol=1e-6, rtol=1e-5)
    assert (v_policy - v_base).abs().max() > 1e-3
    first = (tmp_path / "pytorch_lora_weights.safetensors").read_bytes()
    lora.save_lora(backbone.transformer, tmp_path, pipeline="flux")  # identical runs write identical bytes
    assert (tmp_path / "pytorch_lora_weights.safetensors").read_bytes() == first
    with policy.ema_weights():  # the EMA swap is undone exactly
        pass
    with torch.no_grad():
        assert torch.equal(backbone.velocity(x, t, cond), v_policy)


def test_evaluation_is_streamed_and_capped(backbone, monkeypatch):
    """Evaluation samples, decodes and scores one micro-batch at a time: the largest batch it ever holds and the
    images it keeps (the grid's) do not grow with the number of held-out prompts."""
    policy = _policy(backbone)
    metrics = scoring.RewardModel("digit_judge_accuracy")
    seen = []
    rollout = sampling.rollout
    monkeypatch.setattr(sampling, "rollout", lambda v, x1, *a, **k: seen.append(len(x1)) or rollout(v, x1, *a, **k))
    out = {}
    for copies in (1, 4):
        texts = digits.prompts("test") * copies
        seen.clear()
        ev = train.evaluate(policy, evaluation.HeldOut(texts, [None] * len(texts), metrics, steps=4, per_prompt=3,
                                                       micro_batch=8))
        out[copies] = (max(seen), sum(seen), len(ev.images), ev.metrics["digit_judge_accuracy"])
    assert out[1][0] == out[4][0] == 8  # the largest batch is the micro-batch, for 30 or 120 samples
    assert (out[1][1], out[4][1]) == (30, 120)
    assert out[1][2] == out[4][2] == 30  # the grid: at most 10 noises x 10 prompts
    assert 0.5 < out[1][3] <= 1 and 0.5 < out[4][3] <= 1
    cfg = config.parse_config(["--eval_prompts", "3"])
    _, (held_out, meta) = session.load_prompt_sets(cfg)
    assert held_out == digits.prompts("test")[:3] and len(meta) == 3


def test_evaluation_grid_shows_the_first_prompts_at_scale():
    """4 ranks x 2 noises per prompt (more ranks than noises, as every paper preset on 8 GPUs): rank 0's grid holds
    the first prompts x the first noises, gathered from the ranks that sampled them, and every rank reports the
    metrics a world of one computes (tests/eval_grid_check.py, without a model)."""
    p = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
              "tests/eval_grid_check.py"], env={"OMP_NUM_THREADS": "1"})
    # the ranks share one stdout: their lines may run together ("rank 1: okrank 3: ok"), so count the marks
    assert sorted(re.findall(r"rank (\d+): ok", p.stdout)) == ["0", "1", "2", "3"], p.stdout[-2000:]


def _run(args, env=None, check=True):
    """args run from the repository root; env's entries set (None: unset) over this process's environment."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def test_resume_after_kill_is_bitwise_exact(pretrained, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    first = _run([sys.executable, "train.py", *FAST, "--output_dir", str(straight)])
    assert "batch on 1 process: " in first.stdout and "GPU" not in first.stdout  # a CPU run's plan names processes
    p = _run([sys.executable, "tests/kill_check.py", "2", *FAST, "--output_dir", str(killed)], check=False)
    assert p.returncode == -9, p.stderr[-2000:]  # SIGKILL right after the iteration-2 checkpoint
    assert (killed / "checkpoints" / "latest").read_text() == "iter_000002"
    _run([sys.executable, "train.py", *FAST, "--output_dir", str(killed), "--resume", "true"])
    a = load_file(straight / "checkpoints/iter_000004/lora/pytorch_lora_weights.safetensors")
    b = load_file(killed / "checkpoints/iter_000004/lora/pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = checkpoints.load_state(straight / "checkpoints/iter_000004/training_state.pt")
    sb = checkpoints.load_state(killed / "checkpoints/iter_000004/training_state.pt")
    assert all(torch.equal(sa["ema"][k], sb["ema"][k]) for k in sa["ema"]) and sa["steps"] == sb["steps"] == 8
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)  # it trained
    la = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lb] == [0, 1, 2, 3, 4]
    assert [r.get("reward") for r in la] == [r.get("reward") for r in lb]
    assert "kl" not in la[1]  # beta = 0: no KL is computed, none is logged
    # the resumed run refuses a changed config, and a fresh run refuses to overwrite
    with pytest.raises(SystemExit, match="--resume with a different config: {'lr': "):
        train.main([*FAST, "--output_dir", str(killed), "--resume", "true", "--lr", "1"])
    with pytest.raises(SystemExit, match="already holds a run .*pass --resume true"):
        train.main([*FAST, "--output_dir", str(killed)])


# The same flags on 1, 2 and 4 processes: 2 optimizer steps per iteration, DanceGRPO's random trained steps and one
# initial noise per group, groups of 4 (on 4 processes each group spans 2 ranks), forwards of 3 terms (padding).
WORLD_RUN = ["--iterations", "2", "--eval_every", "2", "--checkpoint_every", "2", "--eval_per_prompt", "2",
             "--prompts_per_iter", "2", "--group_size", "4", "--micro_batch", "3", "--updates_per_iter", "2",
             "--timesteps", "random", "--timestep_fraction", "0.6", "--same_noise_in_group", "true",
             "--report_to", "none"]


def test_one_result_whatever_the_world_size(pretrained, tmp_path):
    """Every random choice of an iteration is a function of (seed, iteration, global sample), never of the rank, and
    a rank holds a contiguous slice of the world's samples: 1, 2 and 4 processes train the same (sample, step) terms
    with the same noises and end with the same LoRA weights, EMA and metrics. Not bitwise: the rollout and training
    forwards batch different samples together and DDP sums the gradients in another order, so fp32 rounding differs
    (seen: 3e-7 in the weights, whose scale is 0.5; 4e-8 in the loss, a sum of cancelling terms of size 1). Tolerance
    2e-6 absolute (16 ulps at the weights' scale) for weights, and 1e-5 relative + 1e-6 absolute for metrics; counts
    exact. Within a world the ranks are bitwise identical (DDP), and the main job's output holds no warning."""
    held, logs = {}, {}
    for world in (1, 2, 4):
        out = tmp_path / f"world{world}"
        # world 2: as a user runs it, with torchrun's OMP notice (whatever the environment pytest runs in)
        env = {"OMP_NUM_THREADS": None if world == 2 else "1"}
        p = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                  "tests/ddp_check.py", *WORLD_RUN, "--output_dir", str(out)], env=env)
        logs[world] = p.stdout + p.stderr
        ranks = [load_file(out / f"rank{r}.safetensors") for r in range(world)]
        assert all(r.keys() == ranks[0].keys() and all(torch.equal(r[k], ranks[0][k]) for k in r) for r in ranks)
        state = checkpoints.load_state(out / "checkpoints/iter_000002/training_state.pt")
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        held[world] = (ranks[0], state["ema"], [{k: v for k, v in r.items() if not k.startswith("time/")}
                                                 for r in rows])
    assert "a group of 4 spans up to 2 processes" in logs[4] and "each group on one process" in logs[2]
    lora1, ema1, rows1 = held[1]
    assert any(v.abs().sum() > 0 for k, v in lora1.items() if "lora_B" in k)  # it trained
    for world in (2, 4):
        lora_w, ema_w, rows_w = held[world]
        for a, b in ((lora1, lora_w), (ema1, ema_w)):
            assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=2e-6) for k in a), world
        assert [r.keys() for r in rows1] == [r.keys() for r in rows_w]
        for r1, rw in zip(rows1, rows_w):
            for k, v in r1.items():
                assert (v == rw[k] if isinstance(v, int) else math.isclose(v, rw[k], rel_tol=1e-5, abs_tol=1e-6)), \
                    (world, r1["iteration"], k, v, rw[k])
    notice = "Setting OMP_NUM_THREADS environment variable"  # torchrun's own, in a banner of asterisks
    assert notice in logs[2]
    assert [line for line in logs[2].splitlines() if "warn" in line.lower() and notice not in line] == []
    assert (tmp_path / "world2" / "images" / "eval_00002.png").exists()


def test_multi_reward_with_invalid_samples_trains(pretrained, tmp_path):
    """A weighted multi-reward where one component fails for some samples: they are counted and excluded."""
    @rewards.register("flaky_test_reward")
    def flaky(device="cpu", **_):
        def fn(images, prompts, metadata=None):
            if any(p.startswith("a ") for p in prompts):  # two of the four training phrasings
                raise RuntimeError("cannot score this phrasing")
            return images.mean((1, 2, 3))
        return fn
    try:
        out = train.main([*FAST, "--iterations", "2", "--output_dir", str(tmp_path / "multi"),
                          "--reward", "digit_judge:1,clean_background:0.5,flaky_test_reward:0.1"])
    finally:
        rewards.REGISTRY.pop("flaky_test_reward")
    rows = [h for h in out["history"] if "reward" in h]
    for r in rows:
        assert {"reward/digit_judge", "reward/clean_background", "reward/flaky_test_reward"} <= r.keys()
        assert r["reward"] == r["reward"]  # finite mean over the valid samples
    assert sum(r["invalid"] for r in rows) > 0


def test_seeds_are_a_function_of_their_parts():
    S = train.Stream.SAMPLE_NOISE
    assert train.seed_of(S, 0, 1, 2, 3) == train.seed_of(S, 0, 1, 2, 3) != train.seed_of(S, 0, 1, 3, 2)
    a = sampling.randn((1, 4), train.generators(S, [(0, 5, 1, 1)]), "cpu")
    b = sampling.randn((1, 4), train.generators(S, [(0, 5, 1, 1)]), "cpu")
    assert torch.equal(a, b)


def test_the_random_streams_of_an_iteration_are_pairwise_distinct(pretrained, tmp_path, monkeypatch):
    """Every generator of an iteration (prompts, sample noise, DanceGRPO's group noise, the SDE window, the random
    trained steps, the split into updates, the evaluation noises) is seeded from a named stream: distinct draws never
    share a seed. Untagged, (seed, it) for the prompts equalled (seed, it, 0, 0), the sample noise of slot 0, member 0
    (SeedSequence pads short entropy with zeros)."""
    drawn = {}
    seed_of = train.seed_of
    monkeypatch.setattr(train, "seed_of", lambda stream, *parts: drawn.setdefault((stream, *parts),
                                                                                 seed_of(stream, *parts)))
    train.main([*FAST, "--iterations", "1", "--eval_every", "1", "--same_noise_in_group", "true", "--sde_window", "3",
                "--timesteps", "random", "--output_dir", str(tmp_path / "run")])
    assert {key[0] for key in drawn} == set(train.Stream)  # every stream was drawn from
    assert len(set(drawn.values())) == len(drawn)  # and no two draws share a seed
    untagged = lambda *p: int(np.random.SeedSequence(list(p)).generate_state(1, np.uint64)[0] >> 1)  # noqa: E731
    assert untagged(0, 1) == untagged(0, 1, 0, 0)  # why the tag comes first
