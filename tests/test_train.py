"""train.py end to end on the built-in digits model: on-policy ratio, DDP, exact resume, LoRA export, KL, config errors.

The subprocess tests run the real command lines (`python train.py`, `torchrun ... train.py`) with few iterations.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import config
import digits
import models
import rewards
import sampling
import train

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--iterations", "4", "--eval_every", "2", "--checkpoint_every", "2", "--eval_per_prompt", "2",
        "--prompts_per_iter", "4", "--group_size", "4", "--micro_batch", "8", "--tensorboard", "false"]


@pytest.fixture(scope="module")
def pretrained():
    return digits.model_dir(progress=False)  # pre-train once into the test cache (conftest sets FLOW_CPS_CACHE)


@pytest.fixture
def backbone(pretrained):
    return models.load_digits_backbone()  # fresh per test: each test adds its own LoRA


def _policy(backbone, *argv):
    cfg = config.parse_config(list(argv))
    config.validate(cfg, 1)
    return cfg, train.Policy(cfg, backbone, torch.device("cpu"), 1)


def _rollout(policy, cfg, n=8, seed=0):
    prompts = digits.prompts("train")[:n]
    gens = train.generators([(seed, 1, i, 0) for i in range(n)])
    window = (0, 5) if cfg.sampler == "cpws" else None  # CPWS is undefined on the last steps (sampling.cpws)
    return train.sample(policy.backbone, prompts, gens, cfg.num_steps, cfg.sampler, cfg.eta, cfg.micro_batch, "cpu",
                        window=window, log_prob=cfg.log_prob or None)


@pytest.mark.parametrize("sampler,log_prob", [("cps", ""), ("cps", "gaussian"), ("flow_sde", ""), ("flow_sde", "cps"),
                                              ("dance_sde", ""), ("dpm_sde", ""), ("cpws", "")])
def test_first_inner_step_is_exactly_on_policy(backbone, sampler, log_prob):
    """The recomputed log-prob equals the rollout's bitwise (ratio exactly 1) at every trained step."""
    cfg, policy = _policy(backbone, "--sampler", sampler, "--eta", "0.5", "--log_prob", log_prob, "--micro_batch", "8")
    with torch.no_grad():  # a non-zero LoRA, so the policy differs from the base model
        for p in policy.params:
            p.normal_(0, 0.05)
    traj, cond = _rollout(policy, cfg)
    steps = train.grpo.ordered_timesteps(traj.stochastic, cfg.timestep_fraction)
    assert len(steps) > 0
    rows = torch.arange(8)
    adv = torch.randn(8)
    for j in steps.tolist():
        loss, _, st = train.step_terms(policy, cfg, traj, cond, rows, torch.full((8,), j), adv)
        assert st["ratio_min"] == 1.0 and st["ratio_max"] == 1.0, (sampler, j, st)
        torch.testing.assert_close(loss, -adv, rtol=0, atol=0)


def test_kl_is_zero_at_init_and_positive_after(backbone):
    cfg, policy = _policy(backbone, "--beta", "0.04", "--kl_form", "flow_grpo", "--micro_batch", "8")
    traj, cond = _rollout(policy, cfg)
    rows, steps = torch.arange(8), torch.full((8,), 3)
    _, kl, _ = train.step_terms(policy, cfg, traj, cond, rows, steps, torch.zeros(8))
    assert torch.equal(kl.detach(), torch.zeros(8))  # LoRA B = 0: policy == reference exactly
    with torch.no_grad():
        for p in policy.params:
            p.normal_(0, 0.05)
    _, kl, _ = train.step_terms(policy, cfg, traj, cond, rows, steps, torch.zeros(8))
    assert (kl > 0).all()
    kl.sum().backward()  # the penalty reaches the LoRA parameters
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.params)


def test_lora_export_loads_with_diffusers_and_reproduces_velocity(backbone, tmp_path):
    from diffusers import FluxTransformer2DModel

    cfg, policy = _policy(backbone, "--lora_rank", "4", "--lora_alpha", "12")  # alpha != r: metadata matters
    with torch.no_grad():
        for p in policy.params:
            p.normal_(0, 0.05)
    models.save_lora(backbone.transformer, tmp_path, pipeline="flux")
    x = torch.randn(6, *backbone.latent_shape)
    t = torch.rand(6)
    cond = backbone.encode(digits.prompts("test")[:6])
    with torch.no_grad():
        v_policy = backbone.velocity(x, t, cond)
        with models.adapter_disabled(backbone.transformer):
            v_ref = backbone.velocity(x, t, cond)
    fresh = FluxTransformer2DModel.from_pretrained(digits.model_dir(), subfolder="transformer").eval()
    with torch.no_grad():
        v_base = backbone.velocity(x, t, cond, fresh)
        fresh.load_lora_adapter(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
        v_loaded = backbone.velocity(x, t, cond, fresh)
    assert torch.equal(v_ref, v_base)  # the adapter-off reference is exactly the base model
    torch.testing.assert_close(v_loaded, v_policy, atol=1e-6, rtol=1e-5)
    assert (v_policy - v_base).abs().max() > 1e-3


def _run(args, env=None, check=True):
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def test_resume_after_kill_is_bitwise_exact(backbone, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run([sys.executable, "train.py", *FAST, "--output_dir", str(straight)])
    p = _run([sys.executable, "train.py", *FAST, "--output_dir", str(killed), "--kill_at", "2"], check=False)
    assert p.returncode == -9, p.stderr[-2000:]  # SIGKILL right after the iteration-2 checkpoint
    assert (killed / "checkpoints" / "latest").read_text() == "iter_000002"
    _run([sys.executable, "train.py", *FAST, "--output_dir", str(killed), "--resume", "true"])
    a = load_file(straight / "checkpoints/iter_000004/lora/pytorch_lora_weights.safetensors")
    b = load_file(killed / "checkpoints/iter_000004/lora/pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(straight / "checkpoints/iter_000004/training_state.pt", weights_only=False)
    sb = torch.load(killed / "checkpoints/iter_000004/training_state.pt", weights_only=False)
    assert all(torch.equal(sa["ema"][k], sb["ema"][k]) for k in sa["ema"])
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)  # it trained
    la = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lb] == [0, 1, 2, 3, 4]
    assert [r.get("reward") for r in la] == [r.get("reward") for r in lb]
    # the resumed run refuses a changed config, and a fresh run refuses to overwrite
    p = _run([sys.executable, "train.py", *FAST, "--output_dir", str(killed), "--resume", "true", "--lr", "1"],
             check=False)
    assert p.returncode != 0 and "different config" in p.stderr
    p = _run([sys.executable, "train.py", *FAST, "--output_dir", str(killed)], check=False)
    assert p.returncode != 0 and "--resume" in p.stderr


def test_torchrun_two_ranks_stay_identical(backbone, tmp_path):
    out = tmp_path / "ddp"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/ddp_check.py",
          *FAST, "--iterations", "2", "--micro_batch", "4", "--output_dir", str(out)], env={"OMP_NUM_THREADS": "1"})
    r0, r1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert any(v.abs().sum() > 0 for k, v in r0.items() if "lora_B" in k)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["first_ratio_max_dev"] == 0.0  # on-policy at the first update, under DDP too
    assert (out / "images" / "eval_00002.png").exists() and (out / "config.json").exists()


def test_multi_reward_with_invalid_samples_trains(backbone, tmp_path):
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


@pytest.mark.parametrize("argv,message", [
    (["--group_size", "1"], "group_size must be >= 2"),
    (["--sampler", "cps", "--eta", "1.5"], "CPS eta must be in [0, 1]"),
    (["--sampler", "euler_maruyama"], "unknown sampler"),
    (["--prompts_per_iter", "3"], "must be divisible by the world size"),
    (["--micro_batch", "5"], "must be divisible by micro_batch"),
    (["--updates_per_iter", "3"], "divisible by updates_per_iter"),
    (["--reward", "aesthetic"], "unknown reward 'aesthetic'"),
    (["--reward", "digit_judge:heavy"], "is not a number"),
    (["--sampler", "ode"], "no density"),
    (["--advantage", "ppo"], "unknown advantage"),
    (["--reward_options", "{bad json"], "config error"),
])
def test_config_errors_name_the_problem(argv, message):
    cfg = config.parse_config(argv)
    world = 2 if "--prompts_per_iter" in argv else 1
    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace("]", r"\]")):
        config.validate(cfg, world)


def test_resume_without_a_checkpoint_says_how_to_start(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint in .*run without --resume"):
        train.main(["--resume", "true", "--output_dir", str(tmp_path / "empty")])


def test_unknown_flag_suggests_the_right_one(capsys):
    with pytest.raises(SystemExit):
        config.parse_config(["--learning_rate", "1e-3"])
    with pytest.raises(SystemExit):
        config.parse_config(["--group-size", "4"])
    err = capsys.readouterr().err
    assert "unknown arguments" in err and "--group_size" in err
    with pytest.raises(SystemExit):
        config.parse_config(["--preset", "sdxl"])
    assert "unknown preset" in capsys.readouterr().err


def test_bool_flags_and_presets_resolve():
    cfg = config.parse_config(["--drop_zero_adv", "false", "--eta", "0.3"])
    assert cfg.drop_zero_adv is False and cfg.eta == 0.3 and cfg.preset == "tiny"
    assert config.parse_config([]) == config.Config()


def test_seeds_are_a_function_of_their_parts():
    assert train.seed_of(0, 1, 2, 3) == train.seed_of(0, 1, 2, 3) != train.seed_of(0, 1, 3, 2)
    a = sampling.randn((1, 4), train.generators([(0, 5, 1, 1)]), "cpu")
    b = sampling.randn((1, 4), train.generators([(0, 5, 1, 1)]), "cpu")
    assert torch.equal(a, b)
