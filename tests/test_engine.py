"""engine.py: the EMA rules against hand-computed values and against Flow-GRPO's training loop written out, the
optimizer step's stop on non-finite gradients (before the weights change), the precisions, fp16 loss scaling (the
applied gradient is the unscaled one; overflow skips the step) and an fp16 training run on the CPU."""
import pytest
import tiny_pipelines
import torch

import train
from flow_cps import config, engine, lora, models

LORA = lora.LoRA(4, 4.0, tuple(config.ATTENTION_TARGETS))


def _run_ema(rule: engine.EMA, weights: list[float]) -> list[float]:
    """Drive the EMA as Policy.step does: optimizer step n sets the weight to weights[n]; returns the EMA after each."""
    w, e, out = torch.zeros(1), [torch.zeros(1)], []
    for n, value in enumerate(weights):
        rule.before_step(e, [w], n)
        w.fill_(value)  # the optimizer step
        rule.after_step(e, [w], n + 1)
        out.append(float(e[0]))
    return out


def test_plain_ema_hand_computed():
    got = _run_ema(engine.EMA(0.9), [1.0, 2.0, 3.0])
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
    got = _run_ema(engine.EMA(0.9, "flow_grpo", batches=2, interval=2), [1.0, 2.0, 3.0])
    e1 = 9 / 11
    e2 = e1 + (9 / 11) * (1 - e1)
    e3 = e2 + (9 / 13) * (3 - e2)
    assert got == pytest.approx([e1, e2, e3], abs=1e-6)


def test_flow_grpo_ema_equals_its_training_loop():
    """Flow-GRPO's train_sd3.py, written out: per epoch, B training batches; the optimizer steps every M batches
    (gradient accumulation, global_step += 1 then); after every batch, ema.step(params, global_step) updates only when
    (global_step + 1) % 8 == 0, with decay min((1 + s)/(10 + s), 0.9)."""
    torch.manual_seed(0)
    weights = torch.randn(60).tolist()  # the weight after each optimizer step
    M, B = 3, 6  # 3 batches per optimizer step, 2 optimizer steps per epoch
    w, e, global_step, ema_ref = 0.0, 0.0, 0, []
    for _epoch in range(30):
        for i in range(B):
            if (i + 1) % M == 0:  # the accumulation window closes: the optimizer step
                w = weights[global_step]
                global_step += 1
            if (global_step + 1) % 8 == 0:  # EMAModuleWrapper.step(params, global_step)
                e += (1 - min((1 + global_step) / (10 + global_step), 0.9)) * (w - e)
            if (i + 1) % M == 0:
                ema_ref.append(e)
    # the EMA right after each optimizer step, as Policy.step leaves it (the next window's batches come later)
    ours = _run_ema(engine.EMA(0.9, "flow_grpo", batches=M, interval=8), weights)
    assert ours == pytest.approx(ema_ref, abs=1e-5)
    assert len({round(x, 6) for x in ours}) > 5  # it moved


def test_non_finite_gradients_stop_before_the_step():
    bb = models.load_digits_backbone()
    policy = engine.Policy(bb, torch.device("cpu"), 1, lora=LORA, ema=engine.EMA(0.9))
    before = [p.detach().clone() for p in policy.params]
    for p in policy.params:
        p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(engine.Diverged, match="gradient norm is nan"):
        policy.step(1.0)
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, policy.params)) and policy.steps == 0


def test_precision_names():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert engine.precision("auto", cpu).dtype == torch.float32
    assert engine.precision("auto", cuda).dtype == torch.bfloat16
    fp16 = engine.precision("fp16", cpu)
    assert fp16.dtype == torch.float16 and fp16.loss_scaling and not engine.precision("bf16", cpu).loss_scaling
    with fp16.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.float16 and torch.is_autocast_enabled("cpu")
    with engine.precision("fp32", cpu).autocast():
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="precision must be"):
        engine.precision("fp8", cpu)


def _digits_policy(prec):
    bb = models.load_digits_backbone()
    return engine.Policy(bb, torch.device("cpu"), 1, lora=LORA, precision=prec,
                         ema=engine.EMA(0.9), seed=3)


def _loss(policy):
    bb = policy.backbone
    x = torch.randn(4, *bb.latent_shape, generator=torch.Generator().manual_seed(1))
    return bb.velocity(x, torch.full((4,), 0.5), bb.encode(["a 3"] * 4), policy.module).square().mean()


def test_fp16_loss_scaling_applies_the_unscaled_gradient():
    """backward scales by 2^16 (exact: a power of two), step divides back: the update equals the unscaled one
    bitwise. An overflow skips the step (weights unchanged, returns inf), halves the scale and still counts the step
    (Flow-GRPO's global_step); good steps double the scale every `interval`; below scale 1 the run has diverged."""
    cpu = torch.device("cpu")
    plain, scaled = _digits_policy(None), _digits_policy(engine.precision("fp16", cpu))
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
    with pytest.raises(engine.Diverged, match="below 1"):
        scaled.step(1.0)


def test_fp16_training_run_on_the_cpu(tmp_path):
    """--precision fp16 end to end on the tiny SD3.5-style pipeline (CFG, KL), on the CPU: fp16 frozen transformer
    and text encoders, fp32 LoRA masters and VAE, on-policy at every first update (rollout and training run the same
    fp16 autocast), loss-scaled gradients that train, and the loss scale in the checkpoint."""
    tiny = tiny_pipelines.cached()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\ntwo birds\na green apple\n")
    res = train.main(["--model", str(tiny["sd3.5"]), "--prompts", str(prompts), "--eval_prompt_file", str(prompts),
                      "--precision", "fp16", "--device", "cpu", "--resolution", "32", "--max_sequence_length", "16",
                      "--reward", "clean_background", "--eval_metrics", "clean_background", "--iterations", "1",
                      "--eval_every", "1", "--eval_per_prompt", "1", "--eval_prompts", "1", "--prompts_per_iter", "1",
                      "--group_size", "2", "--updates_per_iter", "1", "--micro_batch", "4", "--num_steps", "3",
                      "--eval_steps", "2", "--lora_rank", "4", "--beta", "0.01", "--lr", "0.05", "--tensorboard",
                      "false", "--output_dir", str(tmp_path / "r")])
    policy, rows = res["policy"], res["history"]
    bb = policy.backbone
    frozen = [p for p in bb.transformer.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.float16 for p in frozen) and all(p.dtype == torch.float32 for p in policy.params)
    assert bb.vae.dtype == torch.float32  # T5 keeps its `wo` layers fp32 (transformers' _keep_in_fp32_modules)
    assert all(m.get_input_embeddings().weight.dtype == torch.float16 for m in bb.text_encoders)
    assert all(r["first_ratio_max_dev"] == 0.0 for r in rows[1:])
    assert any(float(p.abs().max()) > 0 for n, p in zip(policy.names, policy.params) if "lora_B" in n)  # it trained
    state = torch.load(tmp_path / "r" / "checkpoints" / "iter_000001" / "training_state.pt", weights_only=True)
    assert state["loss_scale"] == [policy.scaler.scale, float(policy.scaler.good_steps)]
