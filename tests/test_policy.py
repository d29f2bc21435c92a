"""policy.py, ema.py, precision.py: the EMA rules against hand-computed values and against Flow-GRPO's training
loop written out, the optimizer step's stop on non-finite gradients (before the weights change), the precisions, fp16
loss scaling (the applied gradient is the unscaled one; overflow skips the step) and an fp16 training run on the CPU."""
import contextlib

import pytest
import tiny_pipelines
import torch

import train
from flow_cps import config, lora, models, plan
from flow_cps.ema import EMA, EMASchedule
from flow_cps.policy import Diverged, Policy
from flow_cps.precision import precision

LORA = lora.LoRA(4, 4.0, tuple(config.ATTENTION_TARGETS))


def _run_ema(schedule: EMASchedule, weights: list[float]) -> list[float]:
    """Drive the EMA as Policy.step does: optimizer step n sets the weight to weights[n]; returns the EMA after each."""
    w = torch.zeros(1)
    ema, out = EMA([w], schedule), []
    for n, value in enumerate(weights):
        ema.before_step([w], n)
        w.fill_(value)  # the optimizer step
        ema.after_step([w], n + 1)
        out.append(float(ema.weights[0]))
    return out


def test_plain_ema_hand_computed():
    got = _run_ema(EMASchedule(0.9), [1.0, 2.0, 3.0])
    e1 = 0.1 * 1.0
    e2 = e1 + 0.1 * (2.0 - e1)
    e3 = e2 + 0.1 * (3.0 - e2)
    assert got == pytest.approx([e1, e2, e3], abs=1e-7)


def test_flow_grpo_ema_hand_computed():
    """Interval 2 and 2 training batches per optimizer step, weights w_n = n. The batch closing step n sees s = n, the
    next step's first batch still s = n (same weights); only (s + 1) % 2 == 0 updates, with decay
    d_s = min((1+s)/(10+s), 0.9):
      step 1: s=0 skip, then s=1 (w=1): e = 0 + (1 - 2/11)(1 - 0)                  = 9/11
      step 2: s=1 (w=1): e = 9/11 + (9/11)(1 - 9/11) = 117/121; then s=2 skip
      step 3: s=2 skip; then s=3 (w=3): e = 117/121 + (1 - 4/13)(3 - 117/121)"""
    got = _run_ema(EMASchedule(0.9, interval=2, updates_per_step=2, warmup=True), [1.0, 2.0, 3.0])
    e1 = 9 / 11
    e2 = e1 + (9 / 11) * (1 - e1)
    e3 = e2 + (9 / 13) * (3 - e2)
    assert got == pytest.approx([e1, e2, e3], abs=1e-6)


def _flow_grpo_loop(weights: list[float], batches_per_step: int) -> list[float]:
    """Flow-GRPO's train_sd3.py, written out: per epoch, 2 optimizer steps of `batches_per_step` training batches
    (gradient accumulation, global_step += 1 when a window closes); after every batch, ema.step(params,
    global_step) updates only when (global_step + 1) % 8 == 0, with decay min((1 + s)/(10 + s), 0.9). Returns the
    EMA right after each optimizer step, as Policy.step leaves it (the next window's batches come later)."""
    w, e, global_step, out = 0.0, 0.0, 0, []
    while global_step < len(weights):
        for i in range(2 * batches_per_step):
            if (i + 1) % batches_per_step == 0:  # the accumulation window closes: the optimizer step
                w = weights[global_step]
                global_step += 1
            if (global_step + 1) % 8 == 0:  # EMAModuleWrapper.step(params, global_step)
                e += (1 - min((1 + global_step) / (10 + global_step), 0.9)) * (w - e)
            if (i + 1) % batches_per_step == 0:
                out.append(e)
    return out


def test_flow_grpo_ema_equals_its_training_loop():
    torch.manual_seed(0)
    weights = torch.randn(60).tolist()  # the weight after each optimizer step
    ours = _run_ema(EMASchedule(0.9, interval=8, updates_per_step=3, warmup=True), weights)
    assert ours == pytest.approx(_flow_grpo_loop(weights, 3), abs=1e-5)
    assert len({round(x, 6) for x in ours}) > 5  # it moved


@pytest.mark.parametrize("preset", ["sd3.5-geneval", "flux-dev-pickscore"])
def test_preset_ema_is_the_papers_32_gpu_run(preset):
    """A preset's EMA (plan.ema_schedule: from the config alone, never the world size; Session gives it to the
    Policy) is the paper's run's: Flow-GRPO's 32-GPU config accumulates num_batches_per_epoch // 2 training batches
    per optimizer step, num_batches_per_epoch = int(48 / (32 GPUs x images per GPU / 24)), and steps its EMA once per
    batch. It used to follow this run's micro-batches per update: SD3.5 on 8 GPUs got 8 updates per step, not 2.
    tests/test_scale.py runs an EMA at 1 and 2 ranks and compares the weights."""
    cfg = config.parse_config(["--preset", preset])
    batches = int(48 / (32 * cfg.micro_batch / 24)) // 2  # config/grpo.py's geneval_sd3 / pickscore_flux
    torch.manual_seed(0)
    weights = torch.randn(40).tolist()
    assert plan.ema_schedule(cfg).updates_per_step == batches == {"sd3.5-geneval": 2, "flux-dev-pickscore": 6}[preset]
    assert _run_ema(plan.ema_schedule(cfg), weights) == pytest.approx(_flow_grpo_loop(weights, batches), abs=1e-5)


def test_non_finite_gradients_stop_before_the_step():
    bb = models.load_builtin_backbone("digits")
    policy = Policy(bb, torch.device("cpu"), 1, lora=LORA, ema=EMASchedule(0.9))
    before = [p.detach().clone() for p in policy.params]
    for p in policy.params:
        p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(Diverged, match="gradient norm is nan"):
        policy.step(1.0)
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, policy.params)) and policy.steps == 0


def test_precision_names():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert precision("auto", cpu).dtype == torch.float32
    assert precision("auto", cuda).dtype == torch.bfloat16
    fp16 = precision("fp16", cpu)
    assert fp16.dtype == torch.float16 and fp16.loss_scaling and not precision("bf16", cpu).loss_scaling
    with fp16.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.float16 and torch.is_autocast_enabled("cpu")
    with precision("fp32", cpu).autocast():
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="precision must be"):
        precision("fp8", cpu)


def _digits_policy(prec):
    bb = models.load_builtin_backbone("digits")
    return Policy(bb, torch.device("cpu"), 1, lora=LORA, precision=prec, ema=EMASchedule(0.9), seed=3)


def _loss(policy):
    bb = policy.backbone
    x = torch.randn(4, *bb.latent_shape, generator=torch.Generator().manual_seed(1))
    return bb.velocity(x, torch.full((4,), 0.5), bb.encode(["a 3"] * 4), policy.module).square().mean()


def test_fp16_loss_scaling_applies_the_unscaled_gradient():
    """backward scales by 2^16 (exact: a power of two), step divides back: the update equals the unscaled one
    bitwise. An overflow skips the step (weights unchanged, returns inf), halves the scale and still counts the step
    (Flow-GRPO's global_step); good steps double the scale every `interval`; below scale 1 the run has diverged."""
    cpu = torch.device("cpu")
    plain, scaled = _digits_policy(None), _digits_policy(precision("fp16", cpu))
    scaled.backbone.autocast = contextlib.nullcontext  # the loss scaling alone: both forwards in fp32
    with torch.no_grad():
        for p, q in zip(plain.params, scaled.params):
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
            q.copy_(p)
    plain.backward(_loss(plain))
    scaled.backward(_loss(scaled))
    assert scaled.scaler.scale == 2.0 ** 16
    assert all(torch.equal(q.grad, p.grad * 2.0 ** 16) for p, q in zip(plain.params, scaled.params))
    assert scaled.step(1.0) == plain.step(1.0)
    assert all(torch.equal(p, q) for p, q in zip(plain.params, scaled.params))
    before = [p.detach().clone() for p in scaled.params]
    scaled.backward(_loss(scaled))
    scaled.params[0].grad[0, 0] = float("inf")
    assert scaled.step(1.0) == float("inf") and scaled.steps == 2 and scaled.scaler.scale == 2.0 ** 15
    assert all(torch.equal(a, p) for a, p in zip(before, scaled.params)) and scaled.params[0].grad is None
    scaled.scaler.interval = 2
    for _ in range(2):
        scaled.backward(_loss(scaled))
        scaled.step(1.0)
    assert scaled.scaler.scale == 2.0 ** 16 and scaled.scaler.good_steps == 0
    assert scaled.state()["loss_scale"] == [2.0 ** 16, 0.0]  # checkpointed, so a resume continues exactly
    scaled.scaler.scale = 1.0
    scaled.backward(_loss(scaled))
    scaled.params[0].grad[0, 0] = float("nan")
    with pytest.raises(Diverged, match="below 1"):
        scaled.step(1.0)


def test_fp16_training_run_on_the_cpu(tmp_path):
    """--precision fp16 end to end on the tiny SD3.5-style pipeline (CFG, KL), on the CPU: fp16 frozen transformer
    and text encoders, fp32 LoRA masters and VAE, on-policy at every first update (rollout and training run the same
    fp16 autocast), loss-scaled gradients that train, and the loss scale in the checkpoint."""
    tiny = tiny_pipelines.cached()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\ntwo birds\na green apple\n")
    argv = ["--model", str(tiny["sd3.5"]), "--prompts", str(prompts), "--eval_prompt_file", str(prompts),
            "--precision", "fp16", "--device", "cpu", "--resolution", "32", "--max_sequence_length", "16",
            "--reward", "clean_background", "--eval_metrics", "clean_background", "--iterations", "1",
            "--eval_every", "1", "--eval_per_prompt", "1", "--eval_prompts", "1", "--prompts_per_iter", "1",
            "--group_size", "2", "--updates_per_iter", "1", "--micro_batch", "4", "--num_steps", "3",
            "--eval_steps", "2", "--lora_rank", "4", "--beta", "0.01", "--lr", "0.05", "--report_to",
            "none", "--ema_interval", "2", "--ema_warmup", "true", "--output_dir", str(tmp_path / "r")]
    res = train.main(argv)
    policy, rows = res["policy"], res["history"]
    bb = policy.backbone
    frozen = [p for p in bb.transformer.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.float16 for p in frozen) and all(p.dtype == torch.float32 for p in policy.params)
    assert bb.vae.dtype == torch.float32
    # the whole T5 in fp16, its `wo` layers too (from_pretrained keeps them fp32), as Flow-GRPO casts it
    assert {p.dtype for m in bb.text_encoders for p in m.parameters()} == {torch.float16}
    assert policy.ema.schedule == plan.ema_schedule(config.parse_config(argv))  # the config's, not the world's
    assert all(r["first_ratio_max_dev"] == 0.0 for r in rows[1:])
    assert any(float(p.abs().max()) > 0 for n, p in zip(policy.names, policy.params) if "lora_B" in n)  # it trained
    state = torch.load(tmp_path / "r" / "checkpoints" / "iter_000001" / "training_state.pt", weights_only=True)
    assert state["loss_scale"] == [policy.scaler.scale, float(policy.scaler.good_steps)]
