"""The per-GPU memory model of a run, before any weight is loaded: the released configs of the paper's models
(KNOWN_MODELS), exact parameter counts (built on the meta device), and `memory_estimate`, what each phase of an
iteration holds on one GPU (and the host RAM of the prompt-embedding cache). plan.py prints it (`--dry_run`);
docs/SCALE.md's memory table is plan.py's `memory_table()`, and gpu_check.py measures it against a real GPU.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open

from flow_cps import hub, lora, models

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
REWARD_PARAMS = {"pickscore": 986_000_000, "hpsv2": 986_000_000, "geneval": 497_000_000}


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
    """Configs and component sizes of a hub id (KNOWN_MODELS, or a cached copy), a local folder or a pipeline
    registered in memory (hub.register_pipeline)."""
    folder, repo = None, hub.hub_id(model)
    known = repo[0] if repo else model  # owner/name@revision is sized as owner/name
    path = Path(model).expanduser()
    if path.is_dir():
        folder = path
    elif known not in KNOWN_MODELS and repo is not None:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(repo[0], revision=repo[1], local_files_only=True,
                                            allow_patterns=["*.json"]))
        except Exception:
            folder = None
    if hub.registered(model) is not None:  # built in memory (gpu_check.py): its own configs and component sizes
        info = _info_from_pipeline(model, hub.registered(model))
    elif folder is not None and (folder / "model_index.json").is_file():
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
    elif known in KNOWN_MODELS:
        info = ModelInfo(name=model, **KNOWN_MODELS[known])
    else:
        raise ValueError(f"--model {model}: unknown without its files; known hub ids: {', '.join(KNOWN_MODELS)}, "
                         "or give a local diffusers folder")
    if hub.registered(model) is not None:
        return info
    try:
        hub.resolve_model(model, download=False)
        info.weights = "available"
    except ValueError as e:
        info.weights = str(e)
    return info


@lru_cache(maxsize=16)
def _counts(kind: str, config_json: str, trained: lora.LoRA | None) -> dict:
    """Exact parameter counts of a transformer config, built on the meta device (no memory): params, buffers,
    trainable (this LoRA, or everything for full fine-tuning: None), and the largest block's size."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = {"flux": FluxTransformer2DModel, "sd3": SD3Transformer2DModel}[kind]
    with torch.device("meta"):
        tr = cls.from_config(json.loads(config_json))
        params = sum(p.numel() for p in tr.parameters())
        trainable = lora.add_lora(tr, trained) if trained is not None else list(tr.parameters())
    blocks = models.transformer_blocks(tr)
    in_blocks = sum(p.numel() for b in blocks for p in b.parameters())
    return dict(params=params, buffers=sum(b.numel() for b in tr.buffers()),
                trainable=sum(p.numel() for p in trainable), root=sum(p.numel() for p in tr.parameters()) - in_blocks,
                param_max=max(p.numel() for p in trainable),
                block_max=max(sum(p.numel() for p in b.parameters()) for b in blocks), blocks=len(blocks))


def _info_from_pipeline(name: str, pipe) -> ModelInfo:
    kind = hub.PIPELINES[type(pipe).__name__]
    numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    encoders = {f"{n} ({type(getattr(pipe, n)).__name__})": numel(getattr(pipe, n)) for n in
                ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(pipe, n, None) is not None}
    tr = {k: v for k, v in dict(pipe.transformer.config).items() if not k.startswith("_")}
    return ModelInfo(name=name, kind=kind, transformer=tr, scheduler=dict(pipe.scheduler.config),
                     vae_scale_factor=pipe.vae_scale_factor,
                     default_resolution=pipe.default_sample_size * pipe.vae_scale_factor, encoders=encoders,
                     vae=numel(pipe.vae), weights="available (built in memory)")



GB = 1024 ** 3
# Activation bytes per token per block per hidden unit, fitted to torch.cuda.max_memory_allocated of one LoRA forward +
# backward under bf16 autocast with random weights (H200, torch 2.11, flash/mem-efficient attention), minus the LoRA
# gradients: FLUX.1-dev r64 at 512 px, batch 3, 128 text tokens: 20.0 GiB (1.2 with checkpointing); at 720 px, batch 1,
# 512 text tokens: 14.7 GiB (0.75); SD3.5-M r32 at 512 px, batch 18 (9 x CFG), 205 text tokens: 40.5 GiB (3.4).
ACT_PER_TOKEN, ACT_DUAL_PER_IMAGE_TOKEN = 36, 40
# Not measured (this project's assumptions, for gpu_check.py to test): a no-grad forward (rollout, evaluation, the KL
# reference) holds about half of what one block keeps for backward; the VAE decoder's working set is ~6 fp32 copies
# of its 128-channel full-resolution feature map per image.
INFERENCE_FRACTION, VAE_MAPS = 0.5, 6


@dataclass(frozen=True)
class Spec:
    """What one training process holds, as the memory estimate needs it (plan.run_estimate makes it from a config):
    the image and text sizes, the forward batch (cfg_forward: SD3's CFG doubles it), the world and its parallelism,
    what trains (a LoRA, or None for full fine-tuning), the EMA, offloading, the reward names, the precision, the
    samples per rank, the steps per rollout, a KL term, the VAE's decode batch and the host's embedding cache."""
    resolution: int
    max_sequence_length: int
    micro_batch: int
    cfg_forward: bool
    world: int
    parallel: str
    trained: lora.LoRA | None
    ema: bool
    offload: bool
    rewards: tuple[str, ...]
    precision: str = "bf16"
    samples_per_rank: int = 1
    num_steps: int = 10
    kl: bool = False
    decode_batch: int = 8
    embedding_cache_gb: float = 8.0


def memory_estimate(info: ModelInfo, run: Spec) -> dict:
    """Per-GPU bytes of one training process in each phase of an iteration, in GiB (activations +-50%).

    static, held all run:
      weights        frozen transformer weights in the precision's dtype (2 B/param; fp32: 4); FSDP2 (any world,
                     one included): params 1/world, buffers whole, + the all-gathered root and two blocks (the one in
                     use, the prefetched next) while a forward or backward runs, in the precision's dtype (full
                     fine-tuning: fp32, as DanceGRPO's FSDP1 gathers them; policy.Policy)
      trainable      fp32 master weights + gradients + AdamW m, v (+ EMA) = 16 (20) B/param; FSDP2: 1/world
      accumulation   gradient buffers beyond that: DDP's buckets (4 B/param); FSDP2 LoRA: the unsharded fp32
                     gradients accumulated until the update's last micro-batch reduce-scatters them (4 B/param, whole);
                     FSDP2 full fine-tuning reduce-scatters every micro-batch (policy.grad_sync): the fp32 gradients
                     of the one or two blocks in flight, never the whole model
      text encoders  in the precision's dtype (0 with --offload: then a transient while encoding)
      VAE            fp32 weights (decoding is fp32, as Flow-GRPO)
      rewards        fp32 weights, one copy per RewardModel that loads them (GenEval's detector and CLIP are shared)
      rollout        the iteration's samples on this rank, held until the next: latents x_0..x_N and x0_hat (fp32),
                     their prompt embeddings (the encoders' dtype), decoded images (fp32)
    transient, the largest at a time:
      rollout        a no-grad forward of micro_batch samples (x2 with CFG), or the VAE decoding decode_batch images
      training       activations of micro_batch (sample, step) TERMS (x2 with CFG): ACT_PER_TOKEN = 36 bytes per token
                     per block per hidden unit (the form of Korthikanti et al. 2022's 34 s b h with flash attention),
                     + 40 per image token in SD3.5's dual-attention blocks; block checkpointing keeps each block's input
                     (2 d bytes per token) + one block's activations; autocast's half-precision copies of fp32 trained
                     weights outside FSDP2 (2 B/param); the KL reference's no-grad forward; or AdamW's step (the
                     multi-tensor one: 4 B/param; full fine-tuning's per-tensor one: 4 B x the largest tensor)
      evaluation     streamed: a no-grad forward of micro_batch samples, or the decode of min(micro_batch, 8) images
    host RAM: the prompt-embedding cache, at most embedding_cache_gb per rank (backbone.Backbone evicts by bytes)."""
    tr = info.transformer
    d = tr["num_attention_heads"] * tr["attention_head_dim"]
    counts = _counts(info.kind, json.dumps(tr, sort_keys=True), run.trained)
    wbytes = 4 if run.precision == "fp32" else 2
    patch = 2 if info.kind == "flux" else tr.get("patch_size", 2)  # FLUX packs 2x2 latents into one token
    img_tokens = (run.resolution // (info.vae_scale_factor * patch)) ** 2
    clip_tokens = 77 if info.kind == "sd3" else 0  # SD3 prepends CLIP-L+G tokens (padded to 77) to T5's
    txt_tokens = run.max_sequence_length + clip_tokens
    tokens = img_tokens + txt_tokens
    cfg2 = 2 if run.cfg_forward else 1
    batch = run.micro_batch * cfg2
    blocks, n_trained = counts["blocks"], counts["trainable"]
    dual = len(tr.get("dual_attention_layers", ()) or ())
    fsdp, full = run.parallel == "fsdp", run.trained is None
    shard = run.world if fsdp else 1
    frozen = counts["params"] - (n_trained if full else 0)
    weights = (frozen / shard + counts["buffers"]) * wbytes
    gathered = (2 * counts["block_max"] + counts["root"]) * (4 if full else wbytes) if fsdp else 0
    state = n_trained * (12 + (4 if run.ema else 0)) / shard  # fp32 masters, AdamW m and v (EMA): held all run
    grads = n_trained * 4 / shard  # from an update's first backward to its optimizer step
    if not fsdp:
        accumulation = n_trained * 4 if run.world > 1 else 0  # DDP's buckets, allocated once
    else:  # during an update only
        accumulation = 2 * counts["block_max"] * 4 if full else n_trained * 4
    encoders = sum(info.encoders.values()) * wbytes
    vae = info.vae * 4
    reward = sum(REWARD_PARAMS.get(r, 0) * 4 for r in run.rewards if not r.startswith("geneval"))
    reward += REWARD_PARAMS["geneval"] * 4 if any(r.startswith("geneval") for r in run.rewards) else 0
    # the iteration's samples on this rank
    latent = img_tokens * tr["in_channels"] * (1 if info.kind == "flux" else patch ** 2)
    embedding = txt_tokens * tr["joint_attention_dim"] + tr["pooled_projection_dim"]  # elements per prompt
    image = 3 * run.resolution ** 2 * 4
    rollout_buffers = run.samples_per_rank * ((run.num_steps + 2) * latent * 4 + embedding * wbytes + image)
    # activations
    half = wbytes / 2  # the constants are bf16 measurements
    act_block = ACT_PER_TOKEN * d * tokens * batch * half
    act_dual = ACT_DUAL_PER_IMAGE_TOKEN * d * img_tokens * batch * half
    act_full = act_block * blocks + act_dual * dual
    act_ckpt = 2 * d * tokens * batch * blocks * half + act_block + (act_dual if dual else 0)
    infer = lambda n: INFERENCE_FRACTION * (act_block + act_dual) / batch * n * cfg2  # noqa: E731
    decode = lambda n: VAE_MAPS * 128 * run.resolution ** 2 * 4 * min(n, run.decode_batch)  # noqa: E731
    autocast_copies = n_trained * 2 if not fsdp and run.precision != "fp32" else 0
    optimizer_step = (counts["param_max"] if full else n_trained) * 4 / shard  # policy.Policy: per-tensor AdamW if full
    static = weights + state + vae + reward + (0 if run.offload else encoders) + rollout_buffers
    static += accumulation if not fsdp else 0
    offloaded = encoders if run.offload else 0
    rollout = max(gathered + infer(run.micro_batch), decode(run.samples_per_rank), offloaded)
    evaluation = max(gathered + infer(run.micro_batch), decode(run.micro_batch), offloaded)
    train = {k: grads + (accumulation if fsdp else 0) + max(
        gathered + act + autocast_copies + (infer(run.micro_batch) if run.kl else 0), optimizer_step)
        for k, act in (("off", act_full), ("on", act_ckpt))}
    peak = {k: static + max(rollout, evaluation, train[k]) for k in train}
    gb = lambda x: x / GB  # noqa: E731
    return dict(params=counts["params"], buffers=counts["buffers"], trainable_params=n_trained,
                image_tokens=img_tokens, text_tokens=txt_tokens, forward_batch=batch,
                embedding_mib=embedding * wbytes / 2 ** 20,
                gb=dict(weights=gb(weights), gathered=gb(gathered), trainable=gb(state + grads),
                        accumulation=gb(accumulation), activations=gb(act_full), activations_checkpointing=gb(act_ckpt),
                        text_encoders=gb(encoders), vae=gb(vae), vae_decode=gb(decode(run.samples_per_rank)),
                        rewards=gb(reward), rollout_buffers=gb(rollout_buffers), evaluation=gb(evaluation),
                        optimizer_step=gb(optimizer_step), peak=gb(peak["off"]), peak_checkpointing=gb(peak["on"]),
                        embedding_cache=run.embedding_cache_gb))
