"""Model adapters: one small interface between GRPO and a diffusers flow-matching transformer.

    cond = backbone.encode(prompts)             # prompt embeddings, computed once per unique prompt and cached
    v    = backbone.velocity(x, t, cond, model) # v_theta(x_t, t, c) (after CFG if any), t in [0, 1] of shape (B,), fp32
    imgs = backbone.decode(x0)                  # images (B, C, H, W) in [0, 1]
    grid = backbone.sigmas(num_steps)           # the model's own schedule (shift / dynamic shift)

`model` is the module to call (the transformer itself, or its DDP/FSDP wrapper); the LoRA lives inside the
transformer via peft, and `adapter_disabled` gives the reference policy for the KL term. Three backbones:

  * FluxAdapter, kind "flux": FLUX.1-dev (guidance embedding 3.5, resolution-dependent shift), FLUX.1-schnell (no
    guidance embedding, no shift, 4 steps) and the built-in digits model, a real tiny `FluxTransformer2DModel`, so the
    default CPU run exercises the exact code path FLUX.1 uses;
  * SD3Adapter, kind "sd3": SD3 / SD3.5 (three text encoders, true classifier-free guidance, static shift 3).

`load_backbone(model, device, **options)` takes "digits", a hub id or a local diffusers folder, and detects FLUX vs SD3
from model_index.json. `resolve_model` fails before any work, naming the missing files and how to get them.
`model_info` + `memory_estimate` size a run without loading weights (`train.py --dry_run true`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

import sampling

# Flow-GRPO's LoRA targets for FLUX/SD3 attention (PAPER.md §5.2). SD3.5's second (MMDiT-X) attention is named
# "attn2" and is not matched, as in Flow-GRPO.
ATTENTION_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                     "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
# Flow-GRPO's FLUX.1 targets: attention plus both feed-forward networks of the double-stream blocks.
FLUX_TARGETS = ATTENTION_TARGETS + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]

PIPELINES = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}  # model_index.json _class_name -> kind
DEFAULT_GUIDANCE = {"flux": 3.5, "sd3": 4.5}  # the paper's values (PAPER.md §1.4); diffusers' SD3 default is 7.0
# Scheduler options the adapters' closed-form schedules (sampling.sigmas) do not reproduce: refuse, never guess.
_UNSUPPORTED_SCHEDULER = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "shift_terminal",
                          "invert_sigmas", "stochastic_sampling")


# ----------------------------------------------------------------------------------------------------------------
# The adapters


class _Adapter:
    """What FLUX and SD3 share: the per-prompt embedding cache, guidance switching, offloading and chunked decode.

    Subclasses set kind, latent_shape and implement _encode_batch, velocity, sigmas and _latents_for_vae.
    """

    kind = ""

    def _init_common(self, transformer: nn.Module, encode_prompt, vae: nn.Module | None, *, guidance: float | None,
                     scheduler_config: dict | None, shift: float, device, offload: bool, text_encoders,
                     cache_limit: int, decode_batch: int):
        self.transformer, self.encode_prompt, self.vae = transformer, encode_prompt, vae
        self.guidance = guidance
        self.scheduler_config = dict(scheduler_config or {})
        for key in _UNSUPPORTED_SCHEDULER:
            if self.scheduler_config.get(key):
                raise ValueError(f"the scheduler option {key}={self.scheduler_config[key]!r} is not supported: the "
                                 "sampler computes the schedule in closed form (sampling.sigmas)")
        if int(self.scheduler_config.get("num_train_timesteps", sampling.NUM_TRAIN_TIMESTEPS)) != \
                sampling.NUM_TRAIN_TIMESTEPS:
            raise ValueError("only schedulers with num_train_timesteps = 1000 are supported")
        self.shift = float(shift)  # > 0 overrides the scheduler's shift (DanceGRPO's static 3 on FLUX)
        self.device = torch.device(device) if device is not None else None
        self.offload = bool(offload) and self.device is not None and self.device.type != "cpu"
        self.text_encoders = [m for m in text_encoders if m is not None]
        self.cache_limit, self.decode_batch = cache_limit, decode_batch
        # Embeddings live on the CPU (a 25k-prompt set at 128 T5 tokens would need ~25 GB of GPU memory) and the
        # least recently used ones are dropped beyond cache_limit; encode() returns them on self.device.
        self._cache: OrderedDict[str, dict[str, Tensor]] = OrderedDict()
        self._shared: dict[str, Tensor] = {}  # per-batch constants (FLUX txt_ids, SD3's empty-prompt embedding)

    # -- conditioning ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _on_device(self, modules):
        """Offloading: frozen encoders / VAE visit the GPU only while they run."""
        if not self.offload:
            yield
            return
        for m in modules:
            m.to(self.device)
        try:
            yield
        finally:
            for m in modules:
                m.to("cpu")

    def _encode_batch(self, prompts: list[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(per-prompt tensors with batch dim, shared tensors) for a list of unique prompts."""
        raise NotImplementedError

    def _store(self, t: Tensor) -> Tensor:
        return t.detach().to("cpu", copy=True) if self.device is not None else t.detach()

    def _out(self, t: Tensor) -> Tensor:
        return t.to(self.device) if self.device is not None else t

    def encode(self, prompts: list[str], cache: bool = True) -> dict:
        """Prompt embeddings for a batch; with cache=True each unique prompt is encoded once (frozen encoders).

        Every tensor has the batch as its first dim except FLUX's txt_ids (L, 3), which is shared."""
        if not cache:
            rows, shared = self._encode_batch(prompts)
            return {**rows, **shared}
        todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if todo:
            with torch.no_grad(), self._on_device(self.text_encoders):
                rows, shared = self._encode_batch(todo)
            for i, p in enumerate(todo):
                self._cache[p] = {k: self._store(v[i:i + 1]) for k, v in rows.items()}
            self._shared.update({k: self._store(v) for k, v in shared.items()})
        for p in prompts:
            self._cache.move_to_end(p)
        out = {k: self._out(torch.cat([self._cache[p][k] for p in prompts])) for k in self._cache[prompts[0]]}
        out.update({k: self._out(v) for k, v in self._shared.items()})
        while len(self._cache) > self.cache_limit:
            self._cache.popitem(last=False)
        return self._expand_shared(out, len(prompts))

    def _expand_shared(self, cond: dict, batch: int) -> dict:
        return cond

    @contextlib.contextmanager
    def guidance_scale(self, scale: float | None):
        """Temporarily sample with another guidance (evaluation's eval_guidance); None or < 0 keeps the current."""
        old = self.guidance
        if scale is not None and scale >= 0 and self.guidance is not None:
            self.guidance = float(scale)
        try:
            yield
        finally:
            self.guidance = old

    @property
    def dtype(self) -> torch.dtype:
        # The base weights' dtype (bf16 on CUDA, fp32 on CPU); LoRA / fully trained weights are fp32 masters.
        return next(self.transformer.parameters()).dtype

    # -- latents -> images ----------------------------------------------------------------------------------------
    def _vae_factors(self) -> tuple[float, float]:
        if self.vae is None:
            return 1.0, 0.0
        return float(self.vae.config.scaling_factor), float(self.vae.config.shift_factor or 0.0)

    def _latents_for_vae(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, x: Tensor) -> Tensor:
        """Latents -> images in [0, 1]: (unpack), latents / scaling + shift, VAE decode, x/2 + 1/2, as the pipelines.

        The VAE runs in chunks of decode_batch: at 512 px one image's decoder activations are ~0.5 GB."""
        lat = self._latents_for_vae(x)
        scale, shift = self._vae_factors()
        lat = lat / scale + shift
        if self.vae is None:
            return (lat.float() / 2 + 0.5).clamp(0, 1)
        out = []
        with self._on_device([self.vae]):
            for i in range(0, len(lat), self.decode_batch):
                chunk = lat[i:i + self.decode_batch].to(self.vae.device, self.vae.dtype)
                out.append(self.vae.decode(chunk, return_dict=False)[0].float())
        return (torch.cat(out).to(x.device) / 2 + 0.5).clamp(0, 1)


class FluxAdapter(_Adapter):
    """FLUX.1 (dev, schnell) and the built-in digits model: 2x2-packed latents, position ids, timestep = t.

    encode_prompt(prompts) -> (prompt_embeds (B, L, D), pooled (B, P), text_ids (L, 3)), as FluxPipeline's.
    vae=None means pixels are the latents (the digits model): decode is the same unpack -> unscale -> x/2 + 1/2 path.
    guidance: the guidance-embedding scale for FLUX.1-dev (3.5); must be None for models without guidance embeds.
    scheduler_config: the pipeline scheduler's config, read for shift / dynamic shifting (None: no shift).
    """

    kind = "flux"

    def __init__(self, transformer: nn.Module, encode_prompt, vae: nn.Module | None = None, *, height: int, width: int,
                 guidance: float | None = None, scheduler_config: dict | None = None, shift: float = 0.0,
                 device=None, offload: bool = False, text_encoders=(), cache_limit: int = 8192,
                 decode_batch: int = 8):
        from diffusers import FluxPipeline

        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        step = 2 * self.vae_scale_factor
        if height % step or width % step:
            raise ValueError(f"height and width must be multiples of {step} for this FLUX model (2x2 packing of "
                             f"latents at VAE scale {self.vae_scale_factor}); got {height}x{width}.")
        has_guidance = bool(transformer.config.guidance_embeds)
        if has_guidance and guidance is None:
            raise ValueError("this FLUX transformer has guidance embeddings (FLUX.1-dev); set a guidance scale "
                             "(e.g. 3.5)")
        self._init_common(transformer, encode_prompt, vae, guidance=guidance if has_guidance else None,
                          scheduler_config=scheduler_config, shift=shift, device=device, offload=offload,
                          text_encoders=text_encoders, cache_limit=cache_limit, decode_batch=decode_batch)
        if self.scheduler_config.get("time_shift_type", "exponential") != "exponential":
            raise ValueError("only FLUX's exponential time shift is supported (scheduler time_shift_type)")
        self.height, self.width = height, width
        self.channels = transformer.config.in_channels  # 4 x latent channels after packing
        h, w = height // step, width // step
        self.latent_shape = (h * w, self.channels)
        self.img_ids = FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32)

    def _encode_batch(self, prompts):
        emb, pooled, txt_ids = self.encode_prompt(prompts)
        return dict(prompt_embeds=emb, pooled=pooled), dict(txt_ids=txt_ids)

    # -- the velocity field -------------------------------------------------------------------------------------
    def velocity(self, x: Tensor, t: Tensor, cond: dict, model: nn.Module | None = None) -> Tensor:
        """v_theta(x_t, t, c) for packed latents x (B, L, C) and t (B,) in [0, 1] (FLUX's timestep is t itself:
        the pipeline passes timestep/1000 with timestep = 1000 t). Returned in fp32 for the sampler."""
        model = model or self.transformer
        dtype = self.dtype
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((x.shape[0],), self.guidance, device=x.device, dtype=torch.float32)
        out = model(hidden_states=x.to(dtype), timestep=t.to(dtype), guidance=guidance,
                    pooled_projections=cond["pooled"].to(x.device, dtype),
                    encoder_hidden_states=cond["prompt_embeds"].to(x.device, dtype),
                    txt_ids=cond["txt_ids"].to(x.device), img_ids=self.img_ids.to(x.device), return_dict=False)[0]
        return out.float()

    def sigmas(self, num_steps: int) -> Tensor:
        return model_sigmas("flux", self.scheduler_config, self.latent_shape[0], num_steps, self.shift)

    def _latents_for_vae(self, x: Tensor) -> Tensor:
        from diffusers import FluxPipeline

        return FluxPipeline._unpack_latents(x, self.height, self.width, self.vae_scale_factor)

    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [0, 1] -> packed latents (the inverse of decode; used to pre-train the digits model)."""
        from diffusers import FluxPipeline

        if self.vae is not None:
            raise NotImplementedError("encode_images is only needed for the VAE-free digits model")
        b, c, h, w = images.shape
        return FluxPipeline._pack_latents(images * 2 - 1, b, c, h, w)


class SD3Adapter(_Adapter):
    """SD3 / SD3.5 (StableDiffusion3Pipeline components): latents (B, C, H/8, W/8), timestep = 1000 t, and true
    classifier-free guidance v = v_uncond + w (v_cond - v_uncond) with the empty prompt as the negative, in one
    batched forward of 2B, both when sampling and when recomputing log-probs (PAPER.md §1.4, trap 10).

    encode_prompt(prompts) -> (prompt_embeds (B, L, D), pooled (B, P)): CLIP-L + CLIG-G + T5, as the pipeline's.
    guidance <= 1 means no CFG (one forward of B), as the pipeline's do_classifier_free_guidance = (w > 1).
    """

    kind = "sd3"

    def __init__(self, transformer: nn.Module, encode_prompt, vae: nn.Module, *, height: int, width: int,
                 guidance: float = 4.5, scheduler_config: dict | None = None, shift: float = 0.0, device=None,
                 offload: bool = False, text_encoders=(), cache_limit: int = 8192, decode_batch: int = 8):
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        patch = transformer.config.patch_size
        step = self.vae_scale_factor * patch
        if height % step or width % step:
            raise ValueError(f"height and width must be multiples of {step} for this SD3 model (VAE scale "
                             f"{self.vae_scale_factor} x patch {patch}); got {height}x{width}.")
        self._init_common(transformer, encode_prompt, vae, guidance=float(guidance),
                          scheduler_config=scheduler_config, shift=shift, device=device, offload=offload,
                          text_encoders=text_encoders, cache_limit=cache_limit, decode_batch=decode_batch)
        if self.scheduler_config.get("use_dynamic_shifting"):
            raise ValueError("SD3 schedulers with use_dynamic_shifting are not supported (SD3.5 uses a static shift)")
        self.height, self.width = height, width
        self.latent_shape = (transformer.config.in_channels, height // self.vae_scale_factor,
                             width // self.vae_scale_factor)

    def _encode_batch(self, prompts):
        emb, pooled = self.encode_prompt(prompts)
        rows = dict(prompt_embeds=emb, pooled=pooled)
        if "neg_prompt_embeds" not in self._shared:  # the negative prompt "" once, shared by every sample
            neg, neg_pooled = self.encode_prompt([""])
            return rows, dict(neg_prompt_embeds=neg, neg_pooled=neg_pooled)
        return rows, {}

    def _expand_shared(self, cond: dict, batch: int) -> dict:
        # One row per sample (a view, no copy), so that train.py can slice every conditioning tensor by sample.
        for k in ("neg_prompt_embeds", "neg_pooled"):
            cond[k] = cond[k].expand(batch, *cond[k].shape[1:])
        return cond

    def encode(self, prompts: list[str], cache: bool = True) -> dict:
        if not cache:  # still one encoding of "" per call
            rows, _ = self._encode_batch(prompts)
            neg, neg_pooled = self.encode_prompt([""])
            return self._expand_shared({**rows, "neg_prompt_embeds": neg, "neg_pooled": neg_pooled}, len(prompts))
        return super().encode(prompts, cache)

    def velocity(self, x: Tensor, t: Tensor, cond: dict, model: nn.Module | None = None) -> Tensor:
        """v_theta(x_t, t, c) with CFG for latents x (B, C, h, w), t (B,) in [0, 1]; fp32. The transformer gets
        timestep = 1000 t in fp32, exactly the scheduler's `timesteps` (sigmas * 1000)."""
        model = model or self.transformer
        dtype = self.dtype
        emb, pooled = cond["prompt_embeds"].to(x.device, dtype), cond["pooled"].to(x.device, dtype)
        timestep = t.float() * sampling.NUM_TRAIN_TIMESTEPS
        w = self.guidance
        if w is None or w <= 1:
            return model(hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=emb,
                         pooled_projections=pooled, return_dict=False)[0].float()
        neg = cond["neg_prompt_embeds"].to(x.device, dtype)
        neg_pooled = cond["neg_pooled"].to(x.device, dtype)
        out = model(hidden_states=torch.cat([x, x]).to(dtype), timestep=torch.cat([timestep, timestep]),
                    encoder_hidden_states=torch.cat([neg, emb]), pooled_projections=torch.cat([neg_pooled, pooled]),
                    return_dict=False)[0].float()
        v_uncond, v_cond = out.chunk(2)  # the pipeline's order: negative first
        return v_uncond + w * (v_cond - v_uncond)

    def sigmas(self, num_steps: int) -> Tensor:
        return model_sigmas("sd3", self.scheduler_config, 0, num_steps, self.shift)

    def _latents_for_vae(self, x: Tensor) -> Tensor:
        return x


def model_sigmas(kind: str, scheduler_config: dict, image_seq_len: int, num_steps: int, shift: float = 0.0) -> Tensor:
    """The grid t_0 = 1 > ... > t_N = 0 each pipeline samples on, from its scheduler config (PAPER.md §1.3):

      * FLUX (FluxPipeline passes the uniform grid linspace(1, 1/N, N)): FLUX.1-dev's dynamic shift mu(L), L = the
        number of packed latent tokens (use_dynamic_shifting); else the config's static shift (schnell: 1, none);
      * SD3 (the scheduler's own set_timesteps grid, down to the shifted sigma_min): the config's static shift (3).
    shift > 0 overrides both with a static shift on the same grid (DanceGRPO's FLUX: 3 on the uniform grid)."""
    cfg = scheduler_config
    if kind == "sd3":
        return sampling.sigmas(num_steps, shift=shift or float(cfg.get("shift", 1.0)), grid="diffusers")
    if shift > 0:
        return sampling.sigmas(num_steps, shift=shift, grid="uniform")
    if cfg.get("use_dynamic_shifting"):
        mu = sampling.flux_mu(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                              cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        return sampling.sigmas(num_steps, mu=mu)
    return sampling.sigmas(num_steps, shift=float(cfg.get("shift", 1.0)), grid="uniform")


# -- LoRA through peft -------------------------------------------------------------------------------------------
def add_lora(transformer: nn.Module, rank: int, alpha: float, targets: list[str]) -> list[nn.Parameter]:
    """Freeze the transformer and inject a LoRA adapter named 'default'; B = 0 so the policy starts at the base."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                       target_modules=targets))
    return [p for p in transformer.parameters() if p.requires_grad]


def _full(v: Tensor) -> Tensor:
    """A plain tensor from a DTensor (FSDP2 shard): all-gathers, so every rank must call it in the same order."""
    return v.full_tensor() if hasattr(v, "full_tensor") else v


def lora_state_dict(transformer: nn.Module) -> dict[str, Tensor]:
    """A copy of the LoRA tensors under diffusers' names, on the CPU (a copy: on the CPU `.cpu()` would alias the live
    parameters, which swap_ema then overwrites). Under FSDP2 this gathers only the LoRA tensors (collective: call
    it on every rank)."""
    from peft import get_peft_model_state_dict

    return {k: _full(v.detach()).to("cpu", copy=True).contiguous()
            for k, v in get_peft_model_state_dict(transformer).items()}


def save_lora(transformer: nn.Module, out_dir: str | Path, state_dict: dict[str, Tensor] | None = None,
              pipeline: str = "flux") -> None:
    """Write diffusers' `pytorch_lora_weights.safetensors` with the alpha metadata (without it, `load_lora_weights`
    silently uses alpha = r and rescales the update). `state_dict` overrides the weights (the EMA copy)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}[pipeline]
    cls.save_lora_weights(str(out_dir), transformer_lora_layers=state_dict or lora_state_dict(transformer),
                          transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())


@contextlib.contextmanager
def adapter_disabled(transformer: nn.Module):
    """The reference policy of the KL term: the same transformer with its LoRA switched off."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def transformer_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The repeated blocks, the unit of FSDP2 sharding and of activation checkpointing: transformer_blocks (FLUX
    double-stream, SD3 joint) and single_transformer_blocks (FLUX single-stream)."""
    blocks = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        blocks += list(getattr(transformer, name, []))
    return blocks


# ----------------------------------------------------------------------------------------------------------------
# Finding and loading models


def load_digits_backbone(device: str | torch.device = "cpu", size: int | None = None) -> FluxAdapter:
    """The built-in default: pre-trained on first use (see digits.py), loaded like any diffusers transformer."""
    from diffusers import FluxTransformer2DModel

    import digits

    size = size or digits.SIZE
    path = digits.model_dir() if size == digits.SIZE else digits.model_dir(size=size)
    transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer").to(device).eval()
    encoder = digits.load_prompt_encoder(path).to(device)
    return FluxAdapter(transformer, encoder, vae=None, height=size, width=size)


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# What a training run needs from a hub repo: the diffusers folders only (FLUX.1-dev's repo also holds a 23.8 GB
# single-file checkpoint and SD3.5's a ComfyUI `text_encoders/` folder, which we never read).
DOWNLOAD_PATTERNS = ["model_index.json", "scheduler/*", "transformer/*", "vae/*", "text_encoder/*", "text_encoder_2/*",
                     "text_encoder_3/*", "tokenizer/*", "tokenizer_2/*", "tokenizer_3/*"]


def missing_files(folder: str | Path) -> list[str]:
    """Files a diffusers pipeline folder lacks for loading: model_index.json, then per component its config and
    its weights (every shard an index lists). Empty when the folder is complete."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        return ["model_index.json"]
    missing = []
    for name, value in json.loads(index.read_text()).items():
        if name.startswith("_") or not isinstance(value, list) or None in value:
            continue  # metadata, or an optional component the pipeline does not use (FLUX's image_encoder)
        sub = folder / name
        if name.startswith("tokenizer"):
            if not sub.is_dir() or not any(f.is_file() for f in sub.iterdir()):
                missing.append(f"{name}/ (tokenizer files)")
            continue
        if name == "scheduler":
            if not (sub / "scheduler_config.json").is_file():
                missing.append("scheduler/scheduler_config.json")
            continue
        if not (sub / "config.json").is_file():
            missing.append(f"{name}/config.json")
        indexes = sorted(sub.glob("*.safetensors.index.json")) + sorted(sub.glob("*.bin.index.json"))
        if indexes:
            shards = sorted(set(json.loads(indexes[0].read_text()).get("weight_map", {}).values()))
            missing += [f"{name}/{s}" for s in shards if not (sub / s).is_file()]
        elif not any(f.is_file() for pat in ("*.safetensors", "*.bin") for f in sub.glob(pat)):
            missing.append(f"{name}/ (weights: *.safetensors)")
    return missing


def _how_to_get(model: str, local_dir: str) -> str:
    gated = KNOWN_MODELS.get(model, {}).get("gated", False)
    flux = KNOWN_MODELS.get(model, {}).get("kind") == "flux"  # FLUX has no third text encoder
    include = " ".join(f'"{p}"' for p in DOWNLOAD_PATTERNS if not (flux and "_3" in p))
    return ((f"{model} is gated: accept its licence on https://huggingface.co/{model} and run `hf auth login` "
             "first. " if gated else "") +
            f"Download the diffusers folders once:\n    hf download {model} --local-dir {local_dir} --include "
            f"{include}\n(older huggingface_hub: `huggingface-cli download` with the same arguments), then pass "
            f"--model {local_dir}.")


def resolve_model(model: str, download: bool = True) -> tuple[Path, str]:
    """'owner/name' (hub id, looked up in the Hugging Face cache, downloaded if online and `download`) or a local
    diffusers folder -> (folder, kind). Raises ValueError naming the missing files and how to provide them."""
    path = Path(model).expanduser()
    if path.exists() or not _HUB_ID.match(model):
        if not path.is_dir():
            raise ValueError(f"--model {model}: no such folder. Give 'digits', a Hugging Face hub id such as "
                             "black-forest-labs/FLUX.1-dev, or a local diffusers folder (with model_index.json).")
        missing = missing_files(path)
        if missing:
            raise ValueError(f"--model {model} is not a complete diffusers pipeline folder; missing: "
                             f"{', '.join(missing)}. A folder written by `hf download <id> --local-dir {model}` "
                             "or by `pipeline.save_pretrained` has them all.")
        return path, pipeline_kind(path)
    from huggingface_hub import snapshot_download

    local_dir = f"/data/{model.split('/')[1]}"
    folder, missing, error = None, ["model_index.json"], None
    try:
        folder = Path(snapshot_download(model, local_files_only=True, allow_patterns=DOWNLOAD_PATTERNS))
        missing = missing_files(folder)
    except Exception as e:  # not in the cache at all
        error = e
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    if missing and download and not offline:
        try:  # online: fetch (only) what is missing, like from_pretrained would
            folder = Path(snapshot_download(model, allow_patterns=DOWNLOAD_PATTERNS))
            missing = missing_files(folder)
        except Exception as e:
            error = e
    if missing:
        where = (f"the Hugging Face cache has an incomplete copy at {folder} (missing: {', '.join(missing[:6])}"
                 f"{', ...' if len(missing) > 6 else ''})" if folder is not None else
                 "it is not in the Hugging Face cache" + (" and HF_HUB_OFFLINE=1 forbids downloading" if offline
                                                          else "" if not download else
                                                          f" and downloading failed ({_first_line(error)})"))
        raise ValueError(f"model {model!r}: the weights are not available: {where}. {_how_to_get(model, local_dir)}"
                         f"\n(If {model} was meant as a local folder: there is no such folder.)")
    return folder, pipeline_kind(folder)


def _first_line(e: BaseException | None) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0] if e is not None else ""


def pipeline_kind(folder: str | Path) -> str:
    """'flux' or 'sd3' from model_index.json's _class_name."""
    name = json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name")
    if name not in PIPELINES:
        raise ValueError(f"{folder}: pipeline class {name!r} is not supported; supported: "
                         + ", ".join(f"{k} ({v})" for k, v in PIPELINES.items()))
    return PIPELINES[name]


def load_backbone(model: str, device: str | torch.device = "cpu", *, resolution: int = 0, guidance: float = -1.0,
                  max_sequence_length: int = 0, shift: float = 0.0, offload: bool = False,
                  dtype: torch.dtype = torch.float32, decode_batch: int = 8) -> _Adapter:
    """'digits', a hub id or a local diffusers folder -> an adapter on `device` (transformer, text encoders and VAE
    frozen, in eval mode, in `dtype`; text encoders and VAE on the CPU between uses if `offload`).

    resolution 0 = the pipeline's default (default_sample_size x vae_scale_factor); guidance -1 = the paper's value
    for the model (FLUX.1-dev 3.5, SD3.5 4.5; none for schnell and digits); max_sequence_length 0 = the pipeline's
    default (FLUX 512, SD3 256); shift 0 = the scheduler's own schedule."""
    if model == "digits":
        if guidance >= 0:
            raise ValueError("the digits model has no guidance embedding; leave --guidance at -1")
        backbone = load_digits_backbone(device, size=resolution or None)
        backbone.shift = float(shift)
        return backbone
    folder, kind = resolve_model(model)
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}[kind]
    pipe = cls.from_pretrained(folder, dtype=dtype)
    return adapter_from_pipeline(pipe, device, resolution=resolution, guidance=guidance,
                                 max_sequence_length=max_sequence_length, shift=shift, offload=offload,
                                 decode_batch=decode_batch)


def adapter_from_pipeline(pipe, device: str | torch.device = "cpu", *, resolution: int = 0, guidance: float = -1.0,
                          max_sequence_length: int = 0, shift: float = 0.0, offload: bool = False,
                          decode_batch: int = 8) -> _Adapter:
    """Wrap a loaded FluxPipeline / StableDiffusion3Pipeline (the same object `pipe(...)` samples with)."""
    kind = PIPELINES.get(type(pipe).__name__)
    if kind is None:
        raise ValueError(f"unsupported pipeline {type(pipe).__name__}; supported: {', '.join(PIPELINES)}")
    device = torch.device(device)
    encoders = [getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    for m in [*encoders, pipe.vae, pipe.transformer]:
        if m is not None:
            m.eval().requires_grad_(False)
    pipe.transformer.to(device)
    for m in [*encoders, pipe.vae]:
        if m is not None:
            m.to("cpu" if offload else device)
    size = resolution or pipe.default_sample_size * pipe.vae_scale_factor
    common = dict(height=size, width=size, scheduler_config=dict(pipe.scheduler.config), shift=shift, device=device,
                  offload=offload, text_encoders=encoders, decode_batch=decode_batch)
    if kind == "flux":
        has_guidance = bool(pipe.transformer.config.guidance_embeds)
        if guidance >= 0 and not has_guidance:
            raise ValueError("this FLUX model (e.g. FLUX.1-schnell) has no guidance embedding; leave --guidance "
                             "and --eval_guidance at -1")
        msl = max_sequence_length or 512

        def encode_prompt(prompts):
            return pipe.encode_prompt(prompts, prompt_2=None, device=device, max_sequence_length=msl)
        g = (guidance if guidance >= 0 else DEFAULT_GUIDANCE["flux"]) if has_guidance else None
        adapter = FluxAdapter(pipe.transformer, encode_prompt, pipe.vae, guidance=g, **common)
    else:
        msl = max_sequence_length or 256

        def encode_prompt(prompts):
            emb, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device,
                                                   do_classifier_free_guidance=False, max_sequence_length=msl)
            return emb, pooled
        adapter = SD3Adapter(pipe.transformer, encode_prompt, pipe.vae,
                             guidance=guidance if guidance >= 0 else DEFAULT_GUIDANCE["sd3"], **common)
    adapter.pipeline, adapter.max_sequence_length = pipe, msl
    return adapter


# ----------------------------------------------------------------------------------------------------------------
# Sizing a run without weights: parameter counts and a per-GPU memory estimate (train.py --dry_run)

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
    from safetensors import safe_open

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
    elif model not in KNOWN_MODELS and _HUB_ID.match(model):
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(model, local_files_only=True, allow_patterns=["*.json"]))
        except Exception:
            folder = None
    if folder is not None and (folder / "model_index.json").is_file():
        kind = pipeline_kind(folder)
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
        resolve_model(model, download=False)
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
        trainable = add_lora(tr, lora_rank, lora_alpha, list(targets)) if lora_rank > 0 else list(tr.parameters())
    blocks = transformer_blocks(tr)
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
