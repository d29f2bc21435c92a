"""The plumbing around the paper's files: what a reader of the paper may skip.

The top level of the repository is the paper (sampling.py, grpo.py, rewards.py, train.py, theory.py); this package
holds what a run needs around them, one concern per module, no sub-packages:

  config      Config (one documented field per flag, choices declared once), the paper's presets
  plan        the batch arithmetic (computed once) and the dry run; memory: the per-GPU memory estimate
  session     a run's set-up around the loop: ranks, run folder, prompt sets, models, logs
  engine      process group and collectives, the Policy (LoRA or full, DDP or FSDP2, fp32 masters, AdamW), the EMA
  checkpoints the run folder: claimed, durable checkpoints with a full manifest, resume from the newest good one;
              lock: the run folder's lock; files: atomic, durable, link-safe writes and streamed hashes
  backbone, models, lora, hub  the FLUX / SD3 / built-in backbones, LoRA and its diffusers export, finding weights
  scoring     a run's reward: the registered rewards combined, invalid samples, loud failures
  geneval, clip, prompts       GenEval's rules and models, CLIP loading, prompt sets
  digits, logs                 the built-in task; metrics, image grids, figures

Arrows point one way: the package may use sampling.py, grpo.py and rewards.py, never train.py or tools/.
"""
