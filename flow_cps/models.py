"""The backbones: one small interface between GRPO and a diffusers flow-matching transformer.

    cond = backbone.encode(prompts)             # prompt embeddings, computed once per unique prompt and cached
    c    = backbone.select(cond, rows)          # the conditioning of some samples (rows: indices into the batch)
    v    = backbone.velocity(x, t, cond, model) # v_theta(x_t, t, c) (after CFG if any), t in [0, 1] of shape (B,), fp32
    imgs = backbone.decode(x0)                  # images (B, C, H, W) in [0, 1]
    grid = backbone.sigmas(num_steps)           # the model's own schedule (shift / dynamic shift)
    backbone.check_prompts(prompts)             # ValueError naming a prompt the model cannot condition on

`model` is the module to call (the transformer itself, or its DDP/FSDP wrapper); the LoRA lives inside the
transformer via peft (lora.py), and `lora.adapter_disabled` gives the reference policy for the KL term. Two classes:

  * FluxBackbone, kind "flux": FLUX.1-dev (guidance embedding 3.5, resolution-dependent shift), FLUX.1-schnell (no
    guidance embedding, no shift, 4 steps) and the built-in digits and shapes models, real tiny
    `FluxTransformer2DModel`s, so the default CPU run exercises the exact code path FLUX.1 uses;
  * SD3Backbone, kind "sd3": SD3 / SD3.5 (three text encoders, true classifier-free guidance, static shift 3).

What they share (embedding cache, guidance switching, offloading, timesteps, fp32 decode) is backbone.Backbone, and
how they are loaded and run is backbone.Options. `load_backbone(model, device, **options)` takes "digits" or "shapes",
a hub id or a local diffusers folder (found by hub.py), or
a pipeline built in memory and registered with hub.register_pipeline (gpu_check.py's random-weight FLUX.1-dev and
SD3.5), and detects FLUX vs SD3 from model_index.json (the pipeline's class). plan.py sizes a run without loading
weights (`train.py --dry_run true`).
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

import sampling
from flow_cps import digits, hub, scenes, shapes
from flow_cps.backbone import Backbone, Options

# The paper's guidance (Flow-GRPO's configs: SD3.5 CFG 4.5, FLUX.1-dev guidance embedding 3.5); diffusers' SD3 default
# is 7.0. docs/NOTES.md, "The models".
DEFAULT_GUIDANCE = {"flux": 3.5, "sd3": 4.5}


class _TorchvisionFallbackNotice(logging.Filter):
    """Importing FluxPipeline / StableDiffusion3Pipeline makes transformers say, once per class, that
    CLIPImageProcessor and SiglipImageProcessor fall back to their PIL versions without torchvision. The pipelines
    import them only for IP-Adapter image inputs, which this project never passes (rewards preprocess tensors,
    clip.py), so the notice is harmless here; it would otherwise open every FLUX / SD3 run's first screen."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackNotice())


# ----------------------------------------------------------------------------------------------------------------
# The backbones


class FluxBackbone(Backbone):
    """FLUX.1 (dev, schnell) and the built-in digits model: 2x2-packed latents, position ids, timestep = t.

    encode_prompt(prompts) -> (prompt_embeds (B, L, D), pooled (B, P), text_ids (L, 3)), as FluxPipeline's.
    vae=None means pixels are the latents (the built-in models): decode is the same unpack -> unscale -> x/2 + 1/2 path.
    guidance: the guidance-embedding scale for FLUX.1-dev (3.5); must be None for models without guidance embeds.
    scheduler_config: the pipeline scheduler's config, read for shift / dynamic shifting (None: no shift).
    """

    kind = "flux"
    shared_keys = ("txt_ids",)

    def __init__(self, transformer: nn.Module, encode_prompt, vae: nn.Module | None = None, *, height: int, width: int,
                 guidance: float | None = None, **common):
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        step = 2 * self.vae_scale_factor
        if height % step or width % step:
            raise ValueError(f"height and width must be multiples of {step} for this FLUX model (2x2 packing of "
                             f"latents at VAE scale {self.vae_scale_factor}); got {height}x{width}.")
        has_guidance = bool(transformer.config.guidance_embeds)
        if has_guidance and guidance is None:
            raise ValueError("this FLUX transformer has guidance embeddings (FLUX.1-dev); set a guidance scale "
                             "(e.g. 3.5)")
        super().__init__(transformer, encode_prompt, vae, guidance=guidance if has_guidance else None, **common)
        if self.scheduler_config.get("time_shift_type", "exponential") != "exponential":
            raise ValueError("only FLUX's exponential time shift is supported (scheduler time_shift_type)")
        self.height, self.width = height, width
        self.channels = transformer.config.in_channels  # 4 x latent channels after packing
        h, w = height // step, width // step
        self.latent_shape = (h * w, self.channels)
        self.img_ids = latent_image_ids(h, w)

    def _encode_batch(self, prompts):
        emb, pooled, txt_ids = self.encode_prompt(prompts)
        return dict(prompt_embeds=emb, pooled=pooled), dict(txt_ids=txt_ids)

    # -- the velocity field -------------------------------------------------------------------------------------
    def _velocity(self, x: Tensor, t: Tensor, cond: dict, model: nn.Module | None = None) -> Tensor:
        """v_theta(x_t, t, c) for packed latents x (B, L, C) and t (B,) in [0, 1] (FLUX's timestep is t itself:
        the pipeline passes timestep/1000 with timestep = 1000 t). Returned in fp32 for the sampler.

        Latents and t go in the weights' dtype, as FluxPipeline and Flow-GRPO's pipeline pass them (diffusers casts
        the timestep to the latents' dtype); with quantize_timesteps in fp32, as DanceGRPO passes them, so its
        time embedding sees int(1000 t)/1000 exactly (autocast still runs the layers in bf16)."""
        model = model or self.transformer
        dtype = torch.float32 if self.quantize_timesteps else self.dtype
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((x.shape[0],), self.guidance, device=x.device, dtype=torch.float32)
        out = model(hidden_states=x.to(dtype), timestep=self.model_t(t).to(dtype), guidance=guidance,
                    pooled_projections=cond["pooled"].to(x.device, self.dtype),
                    encoder_hidden_states=cond["prompt_embeds"].to(x.device, self.dtype),
                    txt_ids=cond["txt_ids"].to(x.device), img_ids=self.img_ids.to(x.device), return_dict=False)[0]
        return out.float()

    def sigmas(self, num_steps: int) -> Tensor:
        return model_sigmas("flux", self.scheduler_config, self.latent_shape[0], num_steps, self.shift)

    def _latents_for_vae(self, x: Tensor) -> Tensor:
        step = 2 * self.vae_scale_factor
        return unpack_latents(x, self.height // step, self.width // step)

    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [0, 1] -> packed latents (the inverse of decode; used to pre-train the built-in models)."""
        if self.vae is not None:
            raise NotImplementedError("encode_images is only needed for the VAE-free built-in models")
        return pack_latents(images * 2 - 1)


class SD3Backbone(Backbone):
    """SD3 / SD3.5 (StableDiffusion3Pipeline components): latents (B, C, H/8, W/8), timestep = 1000 t, and true
    classifier-free guidance v = v_uncond + w (v_cond - v_uncond) with the empty prompt as the negative, in one
    batched forward of 2B, both when sampling and when recomputing log-probs (a recomputation without the same CFG
    would break the ratio's exactness at the first update; docs/NOTES.md, "The models").

    encode_prompt(prompts) -> (prompt_embeds (B, L, D), pooled (B, P)): CLIP-L + CLIG-G + T5, as the pipeline's.
    guidance <= 1 means no CFG (one forward of B), as the pipeline's do_classifier_free_guidance = (w > 1).
    """

    kind = "sd3"

    def __init__(self, transformer: nn.Module, encode_prompt, vae: nn.Module, *, height: int, width: int,
                 guidance: float = 4.5, **common):
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        patch = transformer.config.patch_size
        step = self.vae_scale_factor * patch
        if height % step or width % step:
            raise ValueError(f"height and width must be multiples of {step} for this SD3 model (VAE scale "
                             f"{self.vae_scale_factor} x patch {patch}); got {height}x{width}.")
        super().__init__(transformer, encode_prompt, vae, guidance=float(guidance), **common)
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

    def _velocity(self, x: Tensor, t: Tensor, cond: dict, model: nn.Module | None = None) -> Tensor:
        """v_theta(x_t, t, c) with CFG for latents x (B, C, h, w), t (B,) in [0, 1]; fp32. The transformer gets
        timestep = 1000 t in fp32, exactly the scheduler's `timesteps` (sigmas * 1000); with quantize_timesteps
        int(1000 t)."""
        model = model or self.transformer
        dtype = self.dtype
        emb, pooled = cond["prompt_embeds"].to(x.device, dtype), cond["pooled"].to(x.device, dtype)
        timestep = t.float() * sampling.NUM_TRAIN_TIMESTEPS
        if self.quantize_timesteps:
            timestep = torch.floor(timestep)
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


# -- FLUX's 2x2 latent packing (FluxPipeline's layout; tests/test_models.py checks it against its static methods) ----
def pack_latents(latents: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch becomes one token, channels ordered (c, dy, dx)."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, 2, 2)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of pack_latents for an (h, w) grid of tokens: (B, h*w, 4C) -> (B, C, 2h, 2w)."""
    b, _, d = tokens.shape
    patches = tokens.reshape(b, h, w, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, 2, w, 2)
    return patches.reshape(b, d // 4, 2 * h, 2 * w)


def latent_image_ids(h: int, w: int) -> Tensor:
    """FLUX's rotary position ids of an (h, w) token grid: (h*w, 3) rows (0, row, column), fp32."""
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(h * w, 3)


def model_sigmas(kind: str, scheduler_config: dict, image_seq_len: int, num_steps: int, shift: float = 0.0) -> Tensor:
    """The grid t_0 = 1 > ... > t_N = 0 each pipeline samples on, from its scheduler config (docs/NOTES.md,
    "Schedules"):

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


def transformer_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The repeated blocks, the unit of FSDP2 sharding and of activation checkpointing: transformer_blocks (FLUX
    double-stream, SD3 joint) and single_transformer_blocks (FLUX single-stream)."""
    blocks = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        blocks += list(getattr(transformer, name, []))
    return blocks


# ----------------------------------------------------------------------------------------------------------------
# Loading models


def digits_backbone(transformer: nn.Module, encoder: nn.Module, size: int = digits.SIZE,
                    options: Options | None = None) -> FluxBackbone:
    """The digits model behind the FLUX backbone: pixels are the latents (no VAE), 2x2-packed as FLUX packs latents;
    prompts must name a digit. digits.model_dir pre-trains through it (with the default options)."""
    return FluxBackbone(transformer, encoder, vae=None, height=size, width=size, options=options,
                        prompt_check=digits.parse_digit)


def shapes_backbone(transformer: nn.Module, encoder: nn.Module, size: int = shapes.SIZE,
                    options: Options | None = None) -> FluxBackbone:
    """The shapes model behind the FLUX backbone: RGB pixels are the latents (no VAE), 2x2-packed into 12-channel
    tokens; prompts must follow the scenes' grammar (scenes.parse). shapes.model_dir pre-trains through it."""
    return FluxBackbone(transformer, encoder, vae=None, height=size, width=size, options=options,
                        prompt_check=scenes.parse)


BUILT_IN = {"digits": (digits, digits_backbone), "shapes": (shapes, shapes_backbone)}  # name -> (task, backbone)


def load_builtin_backbone(name: str = "digits", device: str | torch.device = "cpu", **options) -> FluxBackbone:
    """A built-in model, 'digits' (the default) or 'shapes': pre-trained on first use (digits.py / shapes.py, through
    its backbone), loaded like any diffusers transformer. Always fp32 (~0.46 M parameters); the options that have no
    meaning for it (text length, offloading, dtype, cache) are ignored."""
    from diffusers import FluxTransformer2DModel

    task, make_backbone = BUILT_IN[name]
    opts = Options(**options)
    if opts.guidance >= 0:
        raise ValueError(f"the {name} model has no guidance embedding; leave --guidance at -1")
    size = opts.resolution or task.SIZE
    path = task.model_dir(make_backbone, size=size)
    transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer").to(device).eval()
    return make_backbone(transformer, task.load_prompt_encoder(path).to(device), size, opts)


def load_backbone(model: str, device: str | torch.device = "cpu", **options) -> Backbone:
    """'digits' or 'shapes' (the built-in models), a hub id, a local diffusers folder or a pipeline registered in
    memory (hub.register_pipeline) ->
    a backbone on `device` (transformer, text encoders and VAE frozen, in eval mode; transformer and text encoders
    in options' dtype, the VAE in fp32; text encoders and VAE on the CPU between uses if `offload`). `options` are
    backbone.Options' fields (resolution, guidance, max_sequence_length, shift, ...)."""
    if model in BUILT_IN:
        return load_builtin_backbone(model, device, **options)
    opts = Options(**options)
    pipe = hub.load_pipeline(model, opts.dtype)
    # Every text-encoder weight in the run's dtype, T5's `wo` layers included (from_pretrained keeps those fp32,
    # transformers' _keep_in_fp32_modules): Flow-GRPO casts its whole T5 with .to(dtype), so the prompt embeddings
    # are the official runs' (in fp16, T5's blocks clamp what would overflow).
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None and any(p.dtype != opts.dtype for p in module.parameters()):
            module.to(opts.dtype)
    return backbone_from_pipeline(pipe, device, opts)


def backbone_from_pipeline(pipe, device: str | torch.device = "cpu", options: Options | None = None) -> Backbone:
    """Wrap a loaded FluxPipeline / StableDiffusion3Pipeline (the same object `pipe(...)` samples with)."""
    options = options or Options()
    kind = hub.PIPELINES.get(type(pipe).__name__)
    if kind is None:
        raise ValueError(f"unsupported pipeline {type(pipe).__name__}; supported: {', '.join(hub.PIPELINES)}")
    device = torch.device(device)
    encoders = [getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    for m in [*encoders, pipe.vae, pipe.transformer]:
        if m is not None:
            m.eval().requires_grad_(False)
    pipe.transformer.to(device)
    for m in [*encoders, pipe.vae]:
        if m is not None:
            m.to("cpu" if options.offload else device)
    size = options.resolution or pipe.default_sample_size * pipe.vae_scale_factor
    common = dict(height=size, width=size, scheduler_config=dict(pipe.scheduler.config), device=device,
                  options=options, text_encoders=encoders)
    if kind == "flux":
        has_guidance = bool(pipe.transformer.config.guidance_embeds)
        if options.guidance >= 0 and not has_guidance:
            raise ValueError("this FLUX model (e.g. FLUX.1-schnell) has no guidance embedding; leave --guidance "
                             "and --eval_guidance at -1")
        msl = options.max_sequence_length or 512

        def encode_prompt(prompts):
            return pipe.encode_prompt(prompts, prompt_2=None, device=device, max_sequence_length=msl)
        g = (options.guidance if options.guidance >= 0 else DEFAULT_GUIDANCE["flux"]) if has_guidance else None
        backbone = FluxBackbone(pipe.transformer, encode_prompt, pipe.vae, guidance=g, **common)
    else:
        msl = options.max_sequence_length or 256

        def encode_prompt(prompts):
            emb, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device,
                                                   do_classifier_free_guidance=False, max_sequence_length=msl)
            return emb, pooled
        backbone = SD3Backbone(pipe.transformer, encode_prompt, pipe.vae,
                               guidance=options.guidance if options.guidance >= 0 else DEFAULT_GUIDANCE["sd3"],
                               **common)
    backbone.pipeline, backbone.max_sequence_length = pipe, msl
    return backbone
