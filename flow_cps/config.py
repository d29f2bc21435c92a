"""Configuration of a run: the Config dataclass (one documented field per option), the paper's presets, the
command-line parser generated from the fields, and the validation of every field before any work. plan.py turns a
Config into the batch arithmetic and memory plan; train.py runs it.

A flag with a fixed set of values is declared once, with `choice(default, doc, options)`: `options` is the registry
the code looks the value up in (sampling.SAMPLERS, grpo.ADVANTAGES, ...), or the plumbing's tuple of names, and the
same declaration gives argparse its `choices` and `validate` its check."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import math
from dataclasses import dataclass, field

import torch

import grpo
import rewards
import sampling
from flow_cps import scoring
from flow_cps.distributed import DEVICES
from flow_cps.logs import REPORT_TO
from flow_cps.lora import LoRA
from flow_cps.policy import PARALLEL
from flow_cps.precision import PRECISIONS

# Flow-GRPO's LoRA targets for FLUX/SD3 attention (its config/grpo.py; docs/NOTES.md, "Where the numbers come
# from"). SD3.5's second (MMDiT-X) attention is named "attn2" and is not matched, as in Flow-GRPO.
ATTENTION_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                     "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
# Flow-GRPO's FLUX.1 targets: attention plus both feed-forward networks of the double-stream blocks.
FLUX_TARGETS = ATTENTION_TARGETS + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


def option(default, doc: str):
    """A Config field: its default and the --help text of its flag."""
    return field(default=default, metadata={"help": doc})


def choice(default: str, doc: str, options) -> dataclasses.Field:
    """A Config field whose value must name one of `options` (a registry name -> object, or a tuple of names): the
    one declaration argparse's `choices`, `validate` and the code's lookup share. "" in options means "the sampler's
    own" (--log_prob, --kl_form)."""
    return field(default=default, metadata={"help": doc, "choices": tuple(options)})


@dataclass
class Config:
    # run
    preset: str = option("tiny", "named preset applied before the command-line overrides (see PRESETS)")
    output_dir: str = option("", "where logs, images and checkpoints go; empty = a new runs/<preset>/run-NNN per run "
                             "(runs/<preset>/latest points to the newest)")
    seed: int = option(0, "base seed; every random stream derives from (stream, seed, iteration, ...): train.Stream")
    iterations: int = option(150, "GRPO iterations (one rollout batch + updates each)")
    resume: bool = option(False, "continue the run in output_dir (empty: runs/<preset>/latest) from its newest "
                          "complete checkpoint, exactly")
    device: str = choice("auto", "'auto' (cuda:LOCAL_RANK if available, else cpu), 'cpu' or 'cuda' (each process "
                         "uses cuda:LOCAL_RANK: choose the GPUs with CUDA_VISIBLE_DEVICES)", DEVICES)
    # model and prompts
    model: str = option("digits", "'digits' or 'shapes' (built-in tiny FLUX models) or a hub id / local diffusers "
                        "folder (FLUX.1, SD3.5)")
    prompts: str = option("digits", "prompt set: 'digits', 'shapes', 'geneval', 'ocr', a .txt/.jsonl file, or a folder "
                          "with train.txt/test.txt (Flow-GRPO's dataset/pickscore)")
    eval_prompts: int = option(0, "held-out prompts evaluated (the first N of the test split); 0 = all")
    eval_split: str = choice("test", "the split of --prompts evaluated: 'test' (held out) or, for the shapes task, "
                             "'fresh' (prompts never trained on, of trained compositions)", ("test", "fresh"))
    eval_prompt_file: str = option("", "a .txt/.jsonl prompt file to evaluate on instead of the test split of "
                                   "--prompts")
    resolution: int = option(0, "image height = width in pixels; 0 = the model's default (digits 8, shapes 16, "
                             "pipelines 1024)")
    guidance: float = option(-1.0, "FLUX.1-dev guidance embedding / SD3.5 CFG scale (<= 1: no CFG) for rollouts and "
                             "training; -1 = the paper's value (3.5 / 4.5; none for FLUX.1-schnell and digits)")
    eval_guidance: float = option(-1.0, "guidance of the evaluation rollouts; -1 = the same as --guidance")
    max_sequence_length: int = option(0, "T5 tokens per prompt; 0 = the pipeline's default (FLUX 512, SD3 256)")
    shift: float = option(0.0, "timestep shift override: 0 = the model's schedule (SD3.5 static 3, FLUX.1-dev "
                          "resolution-dependent, schnell none); s > 0 = static shift s (DanceGRPO: 3)")
    quantize_timesteps: bool = option(False, "give the transformer DanceGRPO's int(1000 t)/1000 (and its fp32 "
                                      "inputs) while the sampler uses the exact t")
    embedding_cache_gb: float = option(8.0, "host RAM per rank for cached prompt embeddings (GiB); the least "
                                       "recently used are dropped beyond it")
    # sampling
    sampler: str = choice("cps", "rollout sampler: cps (Eq. 12), flow_sde (Eq. 9), dance_sde, cpws (Eq. 15), "
                          "dpm_sde (App. B); the ODE has no density to train on", sampling.SAMPLERS)
    eta: float = option(0.7, "noise level; its meaning differs per sampler (docs/NOTES.md, \"eta\")")
    log_prob: str = choice("", "'gaussian' (Eq. 13) or 'cps' (Eq. 14); empty = the sampler's default "
                           "(sampling.DEFAULT_LOG_PROB)", ("", *sampling.LOG_PROBS))
    num_steps: int = option(10, "sampler steps of a training rollout")
    eval_steps: int = option(10, "ODE steps of an evaluation rollout")
    sde_window: int = option(0, "if > 0: only this many consecutive steps are stochastic (Flow-GRPO-Fast), the "
                             "rest ODE")
    sde_window_range: str = option("", "'lo,hi' range for the window start (default 0,num_steps//2)")
    reward_image: str = choice("final", "the sampling.Trajectory attribute decoded for the reward: the 'final' "
                               "latent (Flow-GRPO) or the last step's 'x0_hat' (DanceGRPO)", ("final", "x0_hat"))
    same_noise_in_group: bool = option(False, "one initial noise per group (DanceGRPO) instead of per sample")
    # GRPO
    group_size: int = option(8, "samples per prompt (G)")
    prompts_per_iter: int = option(8, "prompts per iteration over all ranks (a group may span ranks)")
    advantage: str = choice("flow_grpo", "'flow_grpo' (group mean, batch std), 'flow_grpo_group_std' or 'dance' "
                            "(group mean and unbiased std)", grpo.ADVANTAGES)
    adv_clip: float = option(5.0, "advantages are clipped to [-adv_clip, adv_clip]")
    drop_zero_adv: bool = option(True, "skip samples whose advantage is 0 (all-equal groups), as Flow-GRPO")
    timesteps: str = choice("ordered", "trained steps: the 'ordered' first fraction (Flow-GRPO) or a 'random' "
                            "subset per sample (DanceGRPO)", grpo.TIMESTEPS)
    timestep_fraction: float = option(0.99, "fraction of steps trained (0.99 -> all but the last)")
    clip_range: float = option(1e-4, "PPO clip range epsilon")
    beta: float = option(0.0, "KL penalty weight (0 = no reference forward)")
    kl_form: str = choice("", "'mse' (FlowCPS), 'flow_grpo' or 'gaussian' (exact), see grpo.KL_FORMS; empty = the "
                          "sampler's own codebase (grpo.DEFAULT_KL_FORM: Flow-SDE 'flow_grpo', CPS 'mse')",
                          ("", *grpo.KL_FORMS))
    updates_per_iter: int = option(2, "optimizer steps per iteration (the batch is split into this many chunks)")
    micro_batch: int = option(144, "per rank and forward: (sample, trained step) terms in a training forward (an "
                              "update's kept pairs, flattened), samples in a rollout or evaluation forward")
    # optimisation
    lr: float = option(1e-3, "AdamW learning rate")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient-norm clip")
    lora_rank: int = option(8, "LoRA rank; 0 = full fine-tuning of the transformer (needs beta = 0)")
    lora_alpha: float = option(16.0, "LoRA alpha (scale alpha / rank)")
    lora_targets: str = option(",".join(ATTENTION_TARGETS), "comma-separated LoRA target modules")
    ema_decay: float = option(0.9, "EMA decay of the trained weights used for evaluation (0 = no EMA)")
    ema_interval: int = option(1, "the EMA updates only after every this many optimizer steps (Flow-GRPO: 8)")
    ema_updates_per_step: int = option(1, "EMA updates per optimizer step (Flow-GRPO updates once per training batch: "
                                       "2 per step in its 32-GPU SD3.5 runs, 6 for FLUX.1); independent of the world "
                                       "size (ema.EMASchedule)")
    ema_warmup: bool = option(False, "Flow-GRPO's warm-up decay min((1 + s)/(10 + s), ema_decay) at optimizer step "
                              "s")
    # scale
    parallel: str = choice("ddp", "multi-GPU engine: 'ddp' (a replica per GPU) or 'fsdp' (FSDP2: weights, grads and "
                           "optimizer state sharded per transformer block)", PARALLEL)
    gradient_checkpointing: bool = option(False, "recompute each transformer block in backward: less activation "
                                          "memory, ~1/3 more training compute")
    precision: str = choice("auto", "'bf16': bf16 frozen weights + bf16 autocast; 'fp16': fp16 frozen weights + fp16 "
                            "autocast + dynamic loss scaling; 'fp32'; 'auto' = bf16 on CUDA, fp32 on CPU (trained "
                            "weights, sampler math and the VAE are always fp32)", ("auto", *PRECISIONS))
    collective_timeout: float = option(30.0, "minutes a collective waits for another rank before the run stops: "
                                       "the backstop for a rank that hangs without failing (a rank that fails stops "
                                       "every rank at once; waits for loading weights have their own 6 h)")
    offload: bool = option(False, "keep text encoders and VAE on the CPU; they visit the GPU only to encode new "
                           "prompts and to decode")
    dry_run: bool = option(False, "resolve and validate the config, print the plan (the algorithm's choices, the "
                           "batch arithmetic, a per-GPU memory estimate), load no weights, exit")
    dry_run_gpus: int = option(0, "--dry_run: the world size to plan for; 0 = $WORLD_SIZE, else the preset's GPU "
                               "count")
    # rewards and evaluation
    reward: str = option("digit_judge", "training reward, or a weighted sum 'name:w,name:w'")
    reward_options: str = option("{}", "JSON: per-reward factory options, e.g. "
                                 "'{\"pickscore\": {\"model\": \"/path\"}}'")
    eval_metrics: str = option("digit_svm_accuracy,digit_judge_accuracy,digit_judge,clean_background",
                               "held-out metrics (reward names); the first is the run's headline metric")
    eval_every: int = option(15, "evaluate every this many iterations (and at the start and end)")
    eval_per_prompt: int = option(20, "fixed noises per held-out prompt")
    # outputs
    checkpoint_every: int = option(50, "checkpoint every this many iterations (and at the end)")
    keep_checkpoints: int = option(2, "how many complete checkpoints to keep (>= 1; the newest is never deleted)")
    report_to: str = choice("tensorboard", "where the scalars and image grids also go: 'tensorboard', 'wandb' "
                            "(Weights & Biases, `pip install wandb`; WANDB_MODE=offline works without a network) or "
                            "'none' (metrics.jsonl and images/ are always written)", REPORT_TO)

    # -- what the flags resolve to (the code reads these, never the empty defaults) --------------------------------
    @property
    def log_prob_used(self) -> str:
        """--log_prob, or the sampler's own when empty (sampling.DEFAULT_LOG_PROB: Eq. 14 for CPS, Eq. 13 for the
        SDEs)."""
        return self.log_prob or sampling.DEFAULT_LOG_PROB[self.sampler]

    @property
    def kl_form_used(self) -> str:
        """--kl_form, or the sampler's codebase's when empty (grpo.DEFAULT_KL_FORM)."""
        return self.kl_form or grpo.DEFAULT_KL_FORM[self.sampler]

    @property
    def lora(self) -> LoRA | None:
        """The LoRA this run trains, or None for full fine-tuning (--lora_rank 0)."""
        if not self.lora_rank:
            return None
        return LoRA(self.lora_rank, self.lora_alpha, tuple(t.strip() for t in self.lora_targets.split(",")))


# The paper's settings: Flow-GRPO's released configs, which the FlowCPS commit left unchanged, and DanceGRPO's scripts
# (the paper's Section 5 names the tasks; the values are the released code's). Global batch = prompts_per_iter x
# group_size, fixed; micro_batch = the configs' images per GPU per forward, here (sample, trained step) terms per
# training forward and samples per rollout/eval forward; the number of forwards per update adapts to the world size
# (plan.batch checks divisibility). Provenance of each value: docs/SCALE.md "Presets" (the source tags are defined
# in docs/NOTES.md, "Sources").
_FLOW_GRPO = dict(
    resolution=512, max_sequence_length=128,  # Flow-GRPO encodes prompts (and the negative "") with 128 T5 tokens
    sampler="cps", group_size=24, prompts_per_iter=48, updates_per_iter=2, advantage="flow_grpo", adv_clip=5.0,
    timesteps="ordered", timestep_fraction=0.99, clip_range=1e-4, lr=3e-4, weight_decay=1e-4, max_grad_norm=1.0,
    ema_decay=0.9, ema_interval=8, ema_warmup=True, eval_per_prompt=1, iterations=1000, checkpoint_every=30)
# SD3.5: config/base.py's mixed_precision "fp16" (fp16 autocast, loss scaling; Flow-GRPO's FAQ prefers fp16 for its
# smaller sampling/training mismatch) and base.py's noise_level 0.7, read as CPS's eta. EMA: train_sd3.py steps it once
# per training batch, and geneval_sd3's 32 GPUs accumulate 2 batches per optimizer step (4 per epoch // 2).
_SD35 = dict(_FLOW_GRPO, model="stabilityai/stable-diffusion-3.5-medium", num_steps=10, eval_steps=40, guidance=4.5,
             eval_guidance=4.5, micro_batch=9, eta=0.7, lora_rank=32, lora_alpha=64.0,
             lora_targets=",".join(ATTENTION_TARGETS), parallel="ddp", eval_every=60, precision="fp16",
             ema_updates_per_step=2)
# FLUX: pickscore_flux's mixed_precision "bf16" (fp16 gives invalid FLUX images, Flow-GRPO's FAQ) and noise_level
# 0.9, Flow-SDE's eta in Flow-GRPO, which the FlowCPS fork left unchanged and so reads as CPS's eta (no source says
# which eta the paper's FLUX CPS runs used; a reviewer of the paper reports 0.7 for CPS). train_flux.py has no
# zero-advantage filter. EMA: pickscore_flux's 32 GPUs accumulate 6 batches per optimizer step (12 per epoch // 2).
_FLUX = dict(_FLOW_GRPO, guidance=3.5, eval_guidance=3.5, micro_batch=3, eta=0.9, beta=0.0, lora_rank=64,
             lora_alpha=128.0, lora_targets=",".join(FLUX_TARGETS), parallel="fsdp", precision="bf16",
             drop_zero_adv=False, reward="pickscore", eval_metrics="pickscore", prompts="flow_grpo/dataset/pickscore",
             eval_every=30, ema_updates_per_step=6)
PRESETS: dict[str, dict] = {
    "tiny": {},  # the defaults: built-in digits model, CPS eta 0.7, ~1.5 min on 2 CPU cores
    # The built-in GenEval-like task (flow_cps/scenes.py): coloured shapes with counts and positions at 16x16, held-out
    # compositions; trained on scene_reward (a learned detector + GenEval's partial credit), judged by the exact
    # analytic scene_judge (and its partial credit, scene_credit). lr 3e-3: at 1e-3 the held-out judge hardly moved
    # in 60 iterations (pilot on a tuning seed, docs/STUDY.md).
    "shapes": dict(model="shapes", prompts="shapes", reward="scene_reward", lr=3e-3,
                   eval_metrics="scene_judge,scene_credit,scene_reward,clean_background"),
    # Flow-GRPO's reward server's GenEval rule (rewards.geneval_flow_grpo) trains; the benchmark's rule evaluates.
    # prompts: this project's generated GenEval-like / OCR sets (offline defaults); the paper's are Flow-GRPO's
    # dataset/geneval and dataset/ocr folders: --prompts /path/flow_grpo/dataset/geneval (docs/SCALE.md)
    "sd3.5-geneval": dict(_SD35, prompts="geneval", reward="geneval_flow_grpo",
                          eval_metrics="geneval_overall,geneval_partial", beta=0.04),
    "sd3.5-ocr": dict(_SD35, prompts="ocr", reward="ocr", eval_metrics="ocr", beta=0.04),
    "sd3.5-pickscore": dict(_SD35, prompts="flow_grpo/dataset/pickscore", reward="pickscore", eval_metrics="pickscore",
                            beta=0.01),
    "flux-dev-pickscore": dict(_FLUX, model="black-forest-labs/FLUX.1-dev", num_steps=6, eval_steps=28),
    # No FLUX.1-schnell config was released; the paper reports a schnell run (4 steps per a secondary source,
    # docs/NOTES.md "Sources": unverified). No guidance embedding.
    "flux-schnell-pickscore": dict(_FLUX, model="black-forest-labs/FLUX.1-schnell", num_steps=4, eval_steps=4,
                                   guidance=-1.0, eval_guidance=-1.0),
    # DanceGRPO's FLUX.1-dev HPSv2.1 recipe, its 16-GPU script (scripts/finetune/finetune_flux_grpo.sh) throughout:
    # full fine-tuning in bf16, shift-3 uniform 16-step grid at 720 px, 512 T5 tokens, groups of 12 with one initial
    # noise, a random 60% of the 15 steps before the last, group-std advantages, no KL; --train_batch_size 1 (one
    # prompt per GPU: 16 prompts), --gradient_accumulation_steps 4 (4 samples per update: 3 updates of a GPU's 12),
    # --max_grad_norm 1.0, no --use_ema (the 8-GPU script's EMA 0.995 and max_grad_norm 0.01 go with its batch 2 and
    # accumulation 12), checkpoints every 40 steps; the transformer gets int(1000 t)/1000. Sampler: CPS at eta 0.7
    # (the paper's CPS-on-Dance run); the Dance-GRPO baseline is --sampler dance_sde --eta 0.3.
    "flux-dev-hpsv2": dict(
        model="black-forest-labs/FLUX.1-dev", resolution=720, max_sequence_length=512, num_steps=16, eval_steps=16,
        shift=3.0, quantize_timesteps=True, guidance=3.5, eval_guidance=3.5, sampler="cps", eta=0.7,
        reward_image="x0_hat", same_noise_in_group=True, group_size=12, prompts_per_iter=16, updates_per_iter=3,
        micro_batch=1, advantage="dance", adv_clip=5.0, drop_zero_adv=False, timesteps="random",
        timestep_fraction=0.6, clip_range=1e-4, beta=0.0, lr=1e-5, weight_decay=1e-4, max_grad_norm=1.0, lora_rank=0,
        ema_decay=0.0, precision="bf16", parallel="fsdp", gradient_checkpointing=True, reward="hpsv2",
        eval_metrics="hpsv2", prompts="DanceGRPO/assets/prompts.txt", eval_per_prompt=1, eval_every=50,
        eval_prompts=256, iterations=300, checkpoint_every=40),
}
# GPUs each preset's official run used (the dry run's default world size): Flow-GRPO's configs set gpu_number = 32
# (config/grpo.py), DanceGRPO's script 16. Any world size that divides the images per iteration runs the same batch.
PRESET_GPUS = {"tiny": 2, "shapes": 2, "sd3.5-geneval": 32, "sd3.5-ocr": 32, "sd3.5-pickscore": 32,
               "flux-dev-pickscore": 32, "flux-schnell-pickscore": 32, "flux-dev-hpsv2": 16}
# Where the prompt sets without a generator in prompts.py come from.
PROMPT_SOURCES = {"flow_grpo/dataset/pickscore": "git clone https://github.com/yifan123/flow_grpo (its "
                  "dataset/pickscore holds train.txt and test.txt)",
                  "DanceGRPO/assets/prompts.txt": "git clone https://github.com/XueZeyue/DanceGRPO (assets/prompts.txt "
                  "holds the HPDv2 prompts)"}
# The generated prompt sets that stand in for the paper's (offline defaults): a paper preset run on one says so.
PAPER_PROMPTS = {"geneval": ("GenEval-like", "flow_grpo/dataset/geneval"),
                 "ocr": ("sign/label", "flow_grpo/dataset/ocr")}
RESUMABLE_CHANGES = {"iterations", "resume", "collective_timeout", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "report_to", "device", "output_dir", "dry_run", "dry_run_gpus",
                     "embedding_cache_gb"}


# -- configuration -----------------------------------------------------------------------------------------------
def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the 40-line usage block (--help has it)
        raise SystemExit(f"config error: {message} (see --help)")


def parse_config(argv: list[str] | None = None) -> Config:
    """argparse generated from the dataclass; the preset applies first, explicit flags override it."""
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        typ = _bool if f.type in (bool, "bool") else {"int": int, "float": float, "str": str}.get(f.type, f.type)
        p.add_argument(f"--{f.name}", type=typ, default=None, choices=f.metadata.get("choices"),
                       help=f"{f.metadata['help']} (default: {f.default!r})")
    args, unknown = p.parse_known_args(argv)
    flags = [u.split("=")[0] for u in unknown if u.startswith("-")]  # the values after an unknown flag are its own
    if unknown:
        names = [f"--{f.name}" for f in dataclasses.fields(Config)]
        hints = [f"{u} (did you mean {', '.join(m)}?)" if (m := difflib.get_close_matches(u.replace("-", "_")
                                                                                          .replace("__", "--"), names))
                 else u for u in flags or unknown]
        p.error(f"unknown option{'s' if len(hints) > 1 else ''}: " + "; ".join(hints))
    preset = args.preset or "tiny"
    if preset not in PRESETS:
        p.error(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in vars(args).items() if v is not None}, "preset": preset}
    return Config(**values)


def sde_window_range(cfg: Config) -> tuple[int, int | None]:
    """--sde_window_range 'lo,hi' as integers (default: grpo.draw_sde_window's first half)."""
    if not cfg.sde_window_range:
        return 0, None
    try:
        lo, hi = (int(x) for x in cfg.sde_window_range.split(","))
    except ValueError:
        raise SystemExit(f"config error: sde_window_range must be 'lo,hi' (two integers), got "
                         f"{cfg.sde_window_range!r}") from None
    return lo, hi


def validate(cfg: Config) -> None:
    """Every check that needs no model and no world size, before any work: one line naming the problem and the fix.
    (plan.batch checks the batch against the world size; the LoRA targets are checked when the model is loaded.)"""
    def need(ok: bool, msg: str):
        if not ok:
            raise SystemExit(f"config error: {msg}")
    for f in dataclasses.fields(Config):
        v, options = getattr(cfg, f.name), f.metadata.get("choices")
        need(not isinstance(v, float) or math.isfinite(v), f"{f.name} must be a finite number (got {v})")
        # the declared choices: argparse checks a flag, this a preset or a Config built in code
        need(options is None or v in options, f"{f.name} must be one of {', '.join(map(repr, options or ()))} "
             f"(got {v!r})")
    for name in ("iterations", "prompts_per_iter", "updates_per_iter", "micro_batch", "eval_every", "eval_per_prompt",
                 "checkpoint_every", "keep_checkpoints", "eval_steps"):
        need(getattr(cfg, name) >= 1, f"{name} must be >= 1 (got {getattr(cfg, name)})")
    need(cfg.group_size >= 2, f"group_size must be >= 2 for group advantages (got {cfg.group_size})")
    need(cfg.num_steps >= 2, f"num_steps must be >= 2 (got {cfg.num_steps})")
    need(cfg.seed >= 0, f"seed must be >= 0 (got {cfg.seed}): seeds are parts of numpy SeedSequences")
    need(cfg.eval_prompts >= 0, f"eval_prompts must be >= 0 (got {cfg.eval_prompts})")
    need(cfg.collective_timeout > 0, f"collective_timeout must be > 0 minutes (got {cfg.collective_timeout})")
    need(cfg.sampler != "ode", "the ODE sampler has no density to train on; use cps, flow_sde, dance_sde, ...")
    need(cfg.eta >= 0, f"eta must be >= 0 (got {cfg.eta})")
    need(0 < cfg.timestep_fraction <= 1, f"timestep_fraction must be in (0, 1] (got {cfg.timestep_fraction})")
    need(cfg.clip_range > 0 and cfg.lr > 0 and cfg.beta >= 0 and cfg.weight_decay >= 0,
         "clip_range and lr must be > 0, beta and weight_decay >= 0")
    need(cfg.max_grad_norm > 0 and cfg.adv_clip > 0, "max_grad_norm and adv_clip must be > 0")
    need(0 <= cfg.ema_decay < 1, f"ema_decay must be in [0, 1) (got {cfg.ema_decay})")
    need(cfg.ema_interval >= 1 and cfg.ema_updates_per_step >= 1,
         f"ema_interval and ema_updates_per_step must be >= 1 (got {cfg.ema_interval}, {cfg.ema_updates_per_step})")
    need(0 <= cfg.sde_window <= cfg.num_steps - 1, f"sde_window must be in [0, num_steps - 1] ({cfg.sde_window})")
    if cfg.sde_window:
        try:
            grpo.draw_sde_window(cfg.num_steps, cfg.sde_window, *sde_window_range(cfg))
        except ValueError as e:
            need(False, str(e))
    need(cfg.report_to != "wandb" or importlib.util.find_spec("wandb") is not None,
         "--report_to wandb needs the wandb package: pip install wandb (or --report_to tensorboard)")
    problem = sampler_problem(cfg, sampling.sigmas(cfg.num_steps))
    need(problem is None, str(problem))  # on a plain grid here; the session asks again on the model's grid
    need(cfg.embedding_cache_gb >= 0, f"embedding_cache_gb must be >= 0 (got {cfg.embedding_cache_gb})")
    need(cfg.lora_rank >= 0 and (cfg.lora_rank == 0 or cfg.lora_alpha > 0), "lora_rank must be >= 0 (0 = full "
         "fine-tuning) and lora_alpha > 0")
    need(cfg.lora_rank == 0 or all(t.strip() for t in cfg.lora_targets.split(",")),
         f"lora_targets must be comma-separated module names (got {cfg.lora_targets!r})")
    need(cfg.lora_rank > 0 or cfg.beta == 0, "full fine-tuning (lora_rank 0) has no adapter-off reference for the KL "
         "term; use beta 0 or a LoRA")
    need(cfg.resolution >= 0 and cfg.max_sequence_length >= 0 and cfg.shift >= 0,
         "resolution, max_sequence_length and shift must be >= 0 (0 = the model's default)")
    need(cfg.guidance == -1 or cfg.guidance >= 0, f"guidance must be >= 0, or -1 for the model's default "
         f"(got {cfg.guidance})")
    need(cfg.eval_guidance == -1 or cfg.eval_guidance >= 0, f"eval_guidance must be >= 0, or -1 for --guidance "
         f"(got {cfg.eval_guidance})")
    need(cfg.dry_run_gpus >= 0, "dry_run_gpus must be >= 0")
    try:
        reward_options(cfg)
    except ValueError as e:
        need(False, str(e))
    if cfg.device.startswith("cuda"):
        need(torch.cuda.is_available(), "device 'cuda' requested but CUDA is not available; use --device cpu")


def sampler_problem(cfg: Config, grid) -> str | None:
    """The sampler tried on every step of `grid` that a rollout can make stochastic (all, or --sde_window's range;
    sampling.stochastic): a step where it is undefined (CPWS at t' = 0), an eta it refuses, or no step with noise at
    all (eta 0), is a config error. None when it can train."""
    n = len(grid) - 1
    lo, hi = sde_window_range(cfg) if cfg.sde_window else (0, n)
    try:
        noisy = sampling.stochastic(cfg.sampler, grid, cfg.eta, (lo, n // 2 if hi is None else hi))
    except ValueError as e:
        return (f"--sampler {cfg.sampler} cannot take {e} (a training rollout samples on every step, or with "
                "--sde_window N on those of --sde_window_range)")
    if not noisy.any():
        return (f"--sampler {cfg.sampler} with eta {cfg.eta} adds no noise on any step: every step is deterministic, "
                "so there is no density to train on (every update would be skipped); use eta > 0")
    return None


def reward_options(cfg: Config) -> dict[str, dict]:
    """--reward_options parsed and checked against the rewards this run uses and their factories' options."""
    return scoring.parse_options(cfg.reward_options, [*rewards.parse_spec(cfg.reward),
                                                      *rewards.parse_spec(cfg.eval_metrics)])
