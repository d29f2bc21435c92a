"""The plan of a run, before any weight is loaded: the batch arithmetic (computed once, here; train.py runs the same
`Batch`), the schedule and the trained steps, parameter counts and a per-GPU memory estimate.

    python train.py --preset flux-dev-pickscore --dry_run true --dry_run_gpus 8

`describe` prints the plan at the start of every run; `dry_run` validates a config for a planned world size and
prints the plan without loading anything.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open

import grpo
import hub
import lora
import models
import prompts
import sampling
import scoring
from config import PRESET_GPUS, PROMPT_SOURCES, Config, validate

# -- sizing a run without weights: parameter counts and a per-GPU memory estimate --------------------

_FLUX_CONFIG = dict(attention_head_dim=128, in_channels=64, joint_attention_dim=4096, num_attention_heads=24,
                    num_layers=19, num_single_layers=38, patch_size=1, pooled_projection_dim=768,
                    axes_dims_rope=[16, 56, 56])
_FLUX_DEV_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                           base_image_seq_len=256, max_image_seq_len=4096, num_train_timesteps=1000)
# The released configs of the three paper models (transformer/config.json, scheduler/scheduler_config.json) and the
# parameter counts of their other components, counted from the same configs on the meta device (tests check them):
# CLIP-L text 123.1 M (SD3's with projection 123.7 M), OpenCLIP bigG text 694.7 M, T5-XXL encoder 4,762.3 M,
# VAE 83.8 M (decoder 49.5 M).
KNOWN_MODELS: dict[str, dict] = {
    "black-forest-labs/FLUX.1-dev": dict(
        kind="flux", gated=True, vae_scale_factor=8, default_resolution=1024,
        transformer=dict(_FLUX_CONFIG, guidance_embeds=True), scheduler=_FLUX_DEV_SCHEDULER,
        encoders={"text_encoder (CLIP-L)": 123_060_480, "text_encoder_2 (T5-XXL)": 4_762_310_656},
        vae=83_819_683),
    "black-forest-labs/FLUX.1-schnell": dict(
        kind="flux", gated=False, vae_scale_factor=8, default_resolution=1024,
        transformer=dict(_FLUX_CONFIG, guidance_embeds=False),
        scheduler=dict(shift=1.0, use_dynamic_shifting=False, num_train_timesteps=1000),
        encoders={"text_encoder (CLIP-L)": 123_060_480, "text_encoder_2 (T5-XXL)": 4_762_310_656},
        vae=83_819_683),
    "stabilityai/stable-diffusion-3.5-medium": dict(
        kind="sd3", gated=True, vae_scale_factor=8, default_resolution=1024,
        transformer=dict(attention_head_dim=64, caption_projection_dim=1536, dual_attention_layers=list(range(13)),
                         in_channels=16, joint_attention_dim=4096, num_attention_heads=24, num_layers=24,
                         out_channels=16, patch_size=2, pooled_projection_dim=2048, pos_embed_max_size=384,
                         qk_norm="rms_norm", sample_size=128),
        scheduler=dict(shift=3.0, num_train_timesteps=1000),
        encoders={"text_encoder (CLIP-L)": 123_650_304, "text_encoder_2 (CLIP-G)": 694_659_840,
                  "text_encoder_3 (T5-XXL)": 4_762_310_656},
        vae=83_819_683),
}
# Reward models' parameters on the GPU (approximate; from the model cards / configs): PickScore_v1 and HPSv2.1 are
# OpenCLIP ViT-H/14 (986 M); GenEval = Mask2Former Swin-S (69 M) + CLIP ViT-L/14 (428 M); OCR runs rapidocr's ONNX
# models on the CPU; the built-in rewards have no weights on the GPU.
REWARD_PARAMS = {"pickscore": 986_000_000, "hpsv2": 986_000_000, "geneval": 497_000_000,
                 "geneval_strict": 497_000_000}


@dataclass
class ModelInfo:
    """What sizing a run needs, read from a local folder's configs or from KNOWN_MODELS (no weights loaded)."""
    name: str
    kind: str
    transformer: dict
    scheduler: dict
    vae_scale_factor: int
    default_resolution: int
    encoders: dict[str, int]
    vae: int
    gated: bool = False
    weights: str = "not checked"  # "available", or why not


def _safetensors_numel(folder: Path) -> int:
    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def model_info(model: str) -> ModelInfo:
    """Configs and component sizes of a hub id (KNOWN_MODELS, or a cached copy) or a local folder."""
    folder = None
    path = Path(model).expanduser()
    if path.is_dir():
        folder = path
    elif model not in KNOWN_MODELS and hub.HUB_ID.match(model):
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(model, local_files_only=True, allow_patterns=["*.json"]))
        except Exception:
            folder = None
    if folder is not None and (folder / "model_index.json").is_file():
        kind = hub.pipeline_kind(folder)
        index = json.loads((folder / "model_index.json").read_text())
        read = lambda p: {k: v for k, v in json.loads((folder / p).read_text()).items() if not k.startswith("_")}  # noqa: E731
        vae_cfg = read("vae/config.json")
        encoders = {f"{n} ({index[n][1]})": _safetensors_numel(folder / n) for n in
                    ("text_encoder", "text_encoder_2", "text_encoder_3") if isinstance(index.get(n), list)
                    and None not in index[n]}
        vae_params = _safetensors_numel(folder / "vae")
        tr = read("transformer/config.json")
        sample = tr.get("sample_size", 128) if kind == "sd3" else 128
        info = ModelInfo(name=model, kind=kind, transformer=tr, scheduler=read("scheduler/scheduler_config.json"),
                         vae_scale_factor=2 ** (len(vae_cfg["block_out_channels"]) - 1),
                         default_resolution=sample * 2 ** (len(vae_cfg["block_out_channels"]) - 1),
                         encoders=encoders, vae=vae_params)
    elif model in KNOWN_MODELS:
        info = ModelInfo(name=model, **KNOWN_MODELS[model])
    else:
        raise ValueError(f"--model {model}: unknown without its files; known hub ids: {', '.join(KNOWN_MODELS)}, "
                         "or give a local diffusers folder")
    try:
        hub.resolve_model(model, download=False)
        info.weights = "available"
    except ValueError as e:
        info.weights = str(e)
    return info


@lru_cache(maxsize=16)
def _counts(kind: str, config_json: str, lora_rank: int, lora_alpha: float, targets: tuple[str, ...]) -> dict:
    """Exact parameter counts of a transformer config, built on the meta device (no memory): params, buffers,
    trainable (LoRA with these targets, or everything when lora_rank == 0), and the largest block's size."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = {"flux": FluxTransformer2DModel, "sd3": SD3Transformer2DModel}[kind]
    with torch.device("meta"):
        tr = cls.from_config(json.loads(config_json))
        params = sum(p.numel() for p in tr.parameters())
        trainable = lora.add_lora(tr, lora_rank, lora_alpha, list(targets)) if lora_rank > 0 else \
            list(tr.parameters())
    blocks = models.transformer_blocks(tr)
    return dict(params=params, buffers=sum(b.numel() for b in tr.buffers()),
                trainable=sum(p.numel() for p in trainable),
                block_max=max(sum(p.numel() for p in b.parameters()) for b in blocks), blocks=len(blocks))


GB = 1024 ** 3
# Activation bytes per token per block per hidden unit, fitted to torch.cuda.max_memory_allocated of one LoRA forward +
# backward under bf16 autocast with random weights (H200, torch 2.11, flash/mem-efficient attention), minus the LoRA
# gradients: FLUX.1-dev r64 at 512 px, batch 3, 128 text tokens: 20.0 GiB (1.2 with checkpointing); at 720 px, batch 1,
# 512 text tokens: 14.7 GiB (0.75); SD3.5-M r32 at 512 px, batch 18 (9 x CFG), 205 text tokens: 40.5 GiB (3.4).
ACT_PER_TOKEN, ACT_DUAL_PER_IMAGE_TOKEN = 36, 40


def memory_estimate(info: ModelInfo, *, resolution: int, max_sequence_length: int, micro_batch: int,
                    cfg_forward: bool, world: int, parallel: str, lora_rank: int, lora_alpha: float,
                    lora_targets: list[str], ema: bool, offload: bool, rewards: list[str], decode_batch: int = 8,
                    bf16: bool = True) -> dict:
    """A per-GPU memory estimate in GiB for one training process (documented in the README; +-50% for activations).

    weights          frozen transformer weights in bf16 (2 B/param, buffers too); FSDP: 1/world + two gathered blocks
    trainable        fp32 master weights + grads + AdamW m and v + EMA = 20 B/param (DDP: +4 B/param gradient
                     buckets); FSDP: 1/world
    activations      stored for backward: ACT_PER_TOKEN = 36 bytes per token per block per hidden unit d (the form
                     of Korthikanti et al. 2022's 34 s b h per layer with flash attention), SD3.5's dual-attention
                     layers + ACT_DUAL_PER_IMAGE_TOKEN = 40 d bytes per image token; the batch is the micro-batch,
                     doubled by CFG. Checkpointing stores each block's input (2 d bytes per token) plus one block's
                     activations during its recompute. Constants fitted to peaks measured on an H200 (below)
    text encoders    bf16; offloaded: 0 while training, transient while encoding new prompts
    VAE              bf16 weights + the decoder's transient activations for decode_batch images (~6 bf16 copies of a
                     128-channel full-resolution feature map per image)
    rewards          model weights in fp32 (each RewardModel instance loads its own copy; GenEval's are shared)
    The peak is static (weights, trainable, encoders unless offloaded, VAE, rewards) + the largest transient
    (training activations, VAE decode, or offloaded text encoders).
    """
    tr = info.transformer
    d = tr["num_attention_heads"] * tr["attention_head_dim"]
    counts = _counts(info.kind, json.dumps(tr, sort_keys=True), lora_rank, float(lora_alpha), tuple(lora_targets))
    wbytes = 2 if bf16 else 4
    patch = 2 if info.kind == "flux" else tr.get("patch_size", 2)  # FLUX packs 2x2 latents into one token
    img_tokens = (resolution // (info.vae_scale_factor * patch)) ** 2
    clip_tokens = 77 if info.kind == "sd3" else 0  # SD3 prepends CLIP-L+G tokens (padded to 77) to T5's
    txt_tokens = max_sequence_length + clip_tokens
    tokens = img_tokens + txt_tokens
    batch = micro_batch * (2 if cfg_forward else 1)
    blocks = counts["blocks"]
    dual = len(tr.get("dual_attention_layers", ()) or ())
    fsdp = parallel == "fsdp" and world > 1
    frozen = counts["params"] + counts["buffers"] - (counts["trainable"] if lora_rank == 0 else 0)
    weights = frozen * wbytes / (world if fsdp else 1)
    if fsdp:
        weights += 2 * counts["block_max"] * wbytes  # the all-gathered block in use + the prefetched next one
    per_trainable = 16 + (4 if ema else 0)
    trainable = counts["trainable"] * per_trainable / (world if fsdp else 1)
    if not fsdp and world > 1:
        trainable += counts["trainable"] * 4  # DDP's gradient buckets
    if lora_rank == 0 and fsdp:
        trainable += 2 * counts["block_max"] * 4  # an unsharded fp32 gradient block before reduce-scatter
    act_block = ACT_PER_TOKEN * d * tokens * batch  # bytes one block keeps for backward
    act_dual = ACT_DUAL_PER_IMAGE_TOKEN * d * img_tokens * batch  # + SD3.5's second attention, image tokens only
    act_full = act_block * blocks + act_dual * dual
    act_ckpt = 2 * d * tokens * batch * blocks + act_block + (act_dual if dual else 0)
    encoders = sum(info.encoders.values()) * wbytes
    vae_weights = info.vae * wbytes
    decode = 6 * 128 * resolution * resolution * wbytes * decode_batch
    reward = sum(REWARD_PARAMS.get(r, 0) * 4 for r in rewards if not r.startswith("geneval"))
    reward += REWARD_PARAMS["geneval"] * 4 if any(r.startswith("geneval") for r in rewards) else 0
    static = weights + trainable + (0 if offload else encoders) + vae_weights + reward
    peak = {ck: static + max(act, decode, encoders if offload else 0)
            for ck, act in (("no_checkpointing", act_full), ("checkpointing", act_ckpt))}
    return dict(params=counts["params"], buffers=counts["buffers"], trainable_params=counts["trainable"],
                image_tokens=img_tokens, text_tokens=txt_tokens, forward_batch=batch,
                gb=dict(weights=weights / GB, trainable=trainable / GB, activations=act_full / GB,
                        activations_checkpointing=act_ckpt / GB, text_encoders=encoders / GB,
                        vae=vae_weights / GB, vae_decode=decode / GB, rewards=reward / GB,
                        peak=peak["no_checkpointing"] / GB, peak_checkpointing=peak["checkpointing"] / GB))


# -- the plan ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    """One iteration's batch arithmetic on `world` ranks, computed once: train.py runs it, the dry run prints it.

    Each prompt's group of samples lives on one rank (advantages need the whole group; rewards are gathered anyway).
    A rank's samples are split into `updates` optimizer steps; an update's kept (sample, trained step) terms run in
    forwards of `micro_batch` terms each, so micro_batch is independent of how many samples an update holds."""
    world: int
    prompts: int  # per iteration, over all ranks
    group_size: int
    updates: int
    micro_batch: int

    @property
    def prompts_per_rank(self) -> int:
        return self.prompts // self.world

    @property
    def samples(self) -> int:
        return self.prompts * self.group_size

    @property
    def samples_per_rank(self) -> int:
        return self.prompts_per_rank * self.group_size

    @property
    def samples_per_update(self) -> int:  # per rank
        return self.samples_per_rank // self.updates

    def forwards_per_update(self, trained_steps: int) -> int:
        return math.ceil(self.samples_per_update * trained_steps / self.micro_batch)

    def problem(self) -> str | None:
        if self.prompts % self.world:
            return (f"prompts_per_iter ({self.prompts}) must be divisible by the world size ({self.world}): each "
                    "group lives on one rank")
        if self.samples_per_rank % self.updates:
            return (f"samples per rank ({self.samples_per_rank} = prompts_per_iter/world x group_size) must be "
                    f"divisible by updates_per_iter ({self.updates})")
        return None


def batch(cfg: Config, world: int) -> Batch:
    """The run's Batch; stops with the reason (and the world sizes that work) if it does not divide."""
    b = Batch(world, cfg.prompts_per_iter, cfg.group_size, cfg.updates_per_iter, cfg.micro_batch)
    if b.problem():
        raise SystemExit(f"config error: {b.problem()} (world sizes this batch arithmetic supports: "
                         f"{world_sizes(cfg)})")
    return b


def world_sizes(cfg: Config, upto: int = 64) -> list[int]:
    """World sizes the batch arithmetic divides into (up to `upto`)."""
    return [w for w in range(1, upto + 1) if Batch(w, cfg.prompts_per_iter, cfg.group_size, cfg.updates_per_iter,
                                                    cfg.micro_batch).problem() is None]


def trained_steps(sampler: str, grid: torch.Tensor, eta: float, timesteps: str, fraction: float,
                  sde_window: int = 0) -> int:
    """K, the trained steps per sample: the stochastic steps (the sampler's own std decides; CPS's last step has
    none) selected as train.py selects them (grpo.ordered_timesteps / random_timesteps)."""
    step, x, n = sampling.get_sampler(sampler), torch.zeros(1, 4), len(grid) - 1
    stochastic = torch.tensor([bool((step(x, x, float(grid[k]), float(grid[k + 1]), eta)[1] > 0).any())
                               for k in range(n)])
    if sde_window:
        stochastic[sde_window:] = False  # the window's size; its position is drawn per iteration
    if timesteps == "ordered":
        return len(grpo.ordered_timesteps(stochastic, fraction))
    return max(1, int(fraction * int(stochastic[:-1].sum())))


def describe(cfg: Config, world: int, check_files: bool = True) -> tuple[list[str], dict]:
    """Human-readable plan of a run on `world` GPUs: model, schedules, trained steps, batch arithmetic, per-GPU memory
    estimate and (check_files) whether the weights and prompts are there. Loads no weights."""
    b = batch(cfg, world)
    plan: dict = dict(world=world, images_per_iteration=b.samples, prompts_per_gpu=b.prompts_per_rank,
                      images_per_gpu=b.samples_per_rank, updates=b.updates,
                      images_per_update_per_gpu=b.samples_per_update, world_sizes=world_sizes(cfg))
    lines = [f"preset {cfg.preset}: model {cfg.model}, sampler {cfg.sampler} eta {cfg.eta}, reward {cfg.reward}, "
             f"prompts {cfg.prompts}"]
    info = None
    if cfg.model == "digits":
        image_tokens = (cfg.resolution or 8) ** 2 // 4
        grid_fn = lambda n: models.model_sigmas("flux", {}, image_tokens, n, cfg.shift)  # noqa: E731
    else:
        info = model_info(cfg.model)
        kind = info.kind
        res = cfg.resolution or info.default_resolution
        image_tokens = (res // (info.vae_scale_factor * 2)) ** 2  # FLUX 2x2 packing / SD3 patch 2: 16 px per token
        grid_fn = lambda n: models.model_sigmas(kind, info.scheduler, image_tokens, n, cfg.shift)  # noqa: E731
        guidance = cfg.guidance if cfg.guidance >= 0 else (models.DEFAULT_GUIDANCE[kind] if kind == "sd3" or
                                                           info.transformer.get("guidance_embeds") else None)
        if res % (info.vae_scale_factor * 2):
            raise SystemExit(f"config error: resolution {res} must be a multiple of {info.vae_scale_factor * 2} for "
                             f"{cfg.model} (VAE scale {info.vae_scale_factor} x 2x2 patches)")
        plan.update(kind=kind, resolution=res, guidance=guidance)
        lines.append(f"  {kind}: {res}x{res} px = {image_tokens} image tokens; guidance {guidance}"
                     f"{' (CFG: 2 forwards per sample)' if kind == 'sd3' and guidance and guidance > 1 else ''}"
                     f"{'; eval guidance ' + str(cfg.eval_guidance) if cfg.eval_guidance >= 0 else ''}")
    grid, eval_grid = grid_fn(cfg.num_steps), grid_fn(cfg.eval_steps)
    k = trained_steps(cfg.sampler, grid, cfg.eta, cfg.timesteps, cfg.timestep_fraction, cfg.sde_window)
    plan.update(sigmas=[round(float(t), 4) for t in grid], eval_sigmas=[round(float(t), 4) for t in eval_grid],
                trained_steps=k, forwards_per_update=b.forwards_per_update(k))
    lines.append(f"  schedule ({cfg.num_steps} steps): {' '.join(f'{float(t):.4f}' for t in grid)}")
    lines.append(f"  eval: ODE, {cfg.eval_steps} steps, {cfg.eval_per_prompt} image(s) per held-out prompt, EMA "
                 f"weights, every {cfg.eval_every} iterations")
    lines.append(f"  trained steps per sample: {k} of {cfg.num_steps} ({cfg.timesteps})")
    lines.append(f"  batch on {world} GPU(s): {cfg.prompts_per_iter} prompts x {cfg.group_size} = {b.samples} images "
                 f"per iteration; per GPU {b.prompts_per_rank} prompts = {b.samples_per_rank} images; {b.updates} "
                 f"updates of {b.samples_per_update} images x {k} steps = {b.samples_per_update * k} terms per GPU, "
                 f"in {b.forwards_per_update(k)} forwards of <= {cfg.micro_batch} terms")
    lines.append(f"  world sizes this batch arithmetic supports (up to 64): {plan['world_sizes']}")
    if info is not None:
        lines += _memory_lines(cfg, info, plan, world)
        if check_files:
            lines.append("  weights: " + info.weights)
    if check_files:
        try:
            n_train, n_test = (len(prompts.load(cfg.prompts, s, cfg.seed)[0]) for s in ("train", "test"))
            lines.append(f"  prompts: {n_train} train / {n_test} held-out")
        except (ValueError, OSError) as e:
            lines.append("  prompts: " + prompt_error(cfg, e))
    return lines, plan


def _memory_lines(cfg: Config, info: ModelInfo, plan: dict, world: int) -> list[str]:
    reward_names = [*scoring.parse_spec(cfg.reward), *scoring.parse_spec(cfg.eval_metrics)]
    est = memory_estimate(
        info, resolution=plan["resolution"], max_sequence_length=cfg.max_sequence_length or
        (512 if info.kind == "flux" else 256), micro_batch=cfg.micro_batch,
        cfg_forward=info.kind == "sd3" and bool(plan["guidance"]) and plan["guidance"] > 1, world=world,
        parallel=cfg.parallel, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
        lora_targets=cfg.lora_targets.split(","), ema=cfg.ema_decay > 0, offload=cfg.offload, rewards=reward_names,
        bf16=cfg.precision == "auto")
    g = est["gb"]
    plan["memory"] = est
    what = (f"LoRA r{cfg.lora_rank} = {est['trainable_params'] / 1e6:,.1f} M" if cfg.lora_rank else
            f"full fine-tuning = {est['trainable_params'] / 1e6:,.1f} M")
    shard = f", 1/{world}" if cfg.parallel == "fsdp" and world > 1 else ""
    ck = cfg.gradient_checkpointing
    names = ", ".join(f"{n} x{reward_names.count(n)}" if reward_names.count(n) > 1 else n
                      for n in dict.fromkeys(reward_names))
    rows = [(f"transformer weights, {'bf16' if cfg.precision == 'auto' else 'fp32'}"
             f"{shard + ' + 2 gathered blocks' if shard else ''}", g["weights"]),
            (f"trained weights + grads + AdamW m, v{' + EMA' if cfg.ema_decay > 0 else ''}, fp32{shard}",
             g["trainable"]),
            (f"activations, batch {est['forward_batch']} x ({est['image_tokens']}+{est['text_tokens']} tokens)"
             f"{' <-' if not ck else ''}", g["activations"]),
            (f"activations with block checkpointing{' <-' if ck else ''}", g["activations_checkpointing"]),
            ("text encoders, bf16" + (" (offloaded: transient)" if cfg.offload else ""), g["text_encoders"]),
            ("VAE weights, bf16", g["vae"]), ("VAE decode of 8 images (transient)", g["vae_decode"]),
            (f"reward models ({names}), fp32", g["rewards"]),
            (f"peak, checkpointing {'on' if ck else 'off'}", g["peak_checkpointing"] if ck else g["peak"]),
            (f"peak, checkpointing {'off' if ck else 'on'}", g["peak"] if ck else g["peak_checkpointing"])]
    return [f"  per-GPU memory estimate in GiB ({cfg.parallel.upper()} on {world} GPU(s); transformer "
            f"{est['params'] / 1e6:,.1f} M params; {what} trained; activations +-50%):",
            *(f"    {label:<64}{value:8.2f}" for label, value in rows)]


def prompt_error(cfg: Config, e: BaseException) -> str:
    hint = PROMPT_SOURCES.get(cfg.prompts)
    return f"{e}" + (f"\n  the prompts of preset {cfg.preset} come from {hint}; or pass --prompts your_file.txt"
                     if hint else "")


def dry_run(cfg: Config) -> dict:
    """--dry_run: validate for the planned world size and print the plan; nothing is loaded or launched."""
    world = cfg.dry_run_gpus or int(os.environ.get("WORLD_SIZE", 0)) or PRESET_GPUS.get(cfg.preset, 1)
    validate(cfg)
    try:
        lines, plan = describe(cfg, world)
    except ValueError as e:
        raise SystemExit(f"model error: {e}") from None
    print("\n".join(lines))
    return dict(summary={}, history=[], policy=None, plan=plan)
