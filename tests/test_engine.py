"""engine.py: the EMA rules against hand-computed values and against Flow-GRPO's training loop written out, and the
optimizer step's stop on non-finite gradients (before the weights change)."""
import pytest
import torch

import config
import engine
import models


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
    policy = engine.Policy(bb, torch.device("cpu"), 1, lora=(4, 4.0, config.ATTENTION_TARGETS), ema=engine.EMA(0.9))
    before = [p.detach().clone() for p in policy.params]
    for p in policy.params:
        p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(engine.Diverged, match="gradient norm is nan"):
        policy.step(1.0)
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, policy.params)) and policy.steps == 0
