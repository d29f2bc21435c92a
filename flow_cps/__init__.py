"""The plumbing around the paper's files: what a reader of the paper may skip.

The top level of the repository is the paper (sampling.py, grpo.py, rewards.py, train.py, theory.py); this package
holds what a run needs around them, one concern per module, no sub-packages:

  config       Config (one documented field per flag, choices declared once), the paper's presets
  plan         the batch arithmetic (computed once: which rank holds which samples, which update trains them, the
               padding), the EMA schedule from the config and the dry run; memory: the per-GPU memory estimate
  session      a run's set-up around the loop: ranks, run folder, prompt sets, models, policy, logs
  distributed  the process group, the collectives and the failure watch that stops every rank when one fails
  precision    what --precision means (frozen-weight dtype, autocast) and fp16 loss scaling
  ema          the EMA's schedule and the average itself
  policy       the Policy: LoRA or full fine-tuning, DDP or FSDP2, fp32 masters, AdamW, the EMA, checkpoint state
  evaluation   the held-out evaluation's slots per rank, streamed sums and image grid
  scoring      a run's reward: the registered rewards combined, options checked, failures loud, scored on every rank
  checkpoints  the run folder: claimed, durable checkpoints with a full manifest, resume from the newest good one;
               lock: the run folder's lock; files: atomic, durable, link-safe writes and streamed hashes
  backbone, models, lora, export, hub   the FLUX / SD3 / built-in backbones, LoRA, the diffusers export, finding weights
  geneval, clip, prompts                GenEval's rules and models, CLIP loading, prompt sets
  digits, shapes, scenes, logs          the built-in tasks (digits; shapes and their scenes); metrics, grids, figures

Arrows point one way: the package may use sampling.py, grpo.py and rewards.py, never train.py or tools/.
"""
