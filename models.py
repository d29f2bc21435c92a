"""Model adapters: one small interface between GRPO and a diffusers flow-matching transformer.

    cond = backbone.encode(prompts)             # prompt embeddings, computed once per unique prompt and cached
    v    = backbone.velocity(x, t, cond, model) # v_theta(x_t, t, c) on packed latents, t in [0, 1] of shape (B,)
    imgs = backbone.decode(x0)                  # images (B, C, H, W) in [0, 1]
    grid = backbone.sigmas(num_steps)           # the model's own schedule (shift / dynamic shift)

`model` is the module to call (the transformer itself, or its DDP/FSDP wrapper); the LoRA lives inside the
transformer via peft, and `adapter_disabled` gives the reference policy for the KL term. The built-in digits model is
a real `FluxTransformer2DModel` behind `FluxAdapter`, so it exercises the exact code path FLUX.1 uses.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import Tensor, nn

import sampling

# Flow-GRPO's LoRA targets for FLUX/SD3 attention (PAPER.md §5.2).
ATTENTION_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                     "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


class FluxAdapter:
    """FLUX.1 (dev, schnell) and the built-in digits model: 2x2-packed latents, position ids, timestep = t.

    encode_prompt(prompts) -> (prompt_embeds (B, L, D), pooled (B, P), text_ids (L, 3)), as FluxPipeline's.
    vae=None means pixels are the latents (the digits model): decode is the same unpack -> unscale -> x/2 + 1/2 path.
    guidance: the guidance-embedding scale for FLUX.1-dev (3.5); must be None for models without guidance embeds.
    scheduler_config: the pipeline scheduler's config, read for shift / dynamic shifting (None: no shift).
    """

    kind = "flux"

    def __init__(self, transformer: nn.Module, encode_prompt, vae: nn.Module | None = None, *, height: int, width: int,
                 guidance: float | None = None, scheduler_config: dict | None = None):
        from diffusers import FluxPipeline

        self.transformer, self.encode_prompt, self.vae = transformer, encode_prompt, vae
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        step = 2 * self.vae_scale_factor
        if height % step or width % step:
            raise ValueError(f"height and width must be multiples of {step} for this FLUX model (2x2 packing of "
                             f"latents at VAE scale {self.vae_scale_factor}); got {height}x{width}.")
        has_guidance = bool(transformer.config.guidance_embeds)
        if has_guidance and guidance is None:
            raise ValueError("this FLUX transformer has guidance embeddings (FLUX.1-dev); set a guidance scale "
                             "(e.g. 3.5)")
        self.guidance = guidance if has_guidance else None
        self.height, self.width = height, width
        self.channels = transformer.config.in_channels  # 4 x latent channels after packing
        h, w = height // step, width // step
        self.latent_shape = (h * w, self.channels)
        self.img_ids = FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32)
        self.scheduler_config = dict(scheduler_config or {})
        self._cache: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    # -- conditioning -------------------------------------------------------------------------------------------
    def encode(self, prompts: list[str], cache: bool = True) -> dict:
        """Prompt embeddings for a batch; with cache=True each unique prompt is encoded once (frozen encoders)."""
        if not cache:
            emb, pooled, txt_ids = self.encode_prompt(prompts)
            return dict(prompt_embeds=emb, pooled=pooled, txt_ids=txt_ids)
        todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if todo:
            with torch.no_grad():
                emb, pooled, txt_ids = self.encode_prompt(todo)
            for i, p in enumerate(todo):
                self._cache[p] = (emb[i:i + 1], pooled[i:i + 1], txt_ids)
        rows = [self._cache[p] for p in prompts]
        return dict(prompt_embeds=torch.cat([r[0] for r in rows]), pooled=torch.cat([r[1] for r in rows]),
                    txt_ids=rows[0][2])

    # -- the velocity field -------------------------------------------------------------------------------------
    def velocity(self, x: Tensor, t: Tensor, cond: dict, model: nn.Module | None = None) -> Tensor:
        """v_theta(x_t, t, c) for packed latents x (B, L, C) and t (B,) in [0, 1] (FLUX's timestep is t itself:
        the pipeline passes timestep/1000 with timestep = 1000 t). Returned in fp32 for the sampler."""
        model = model or self.transformer
        dtype = next(self.transformer.parameters()).dtype
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((x.shape[0],), self.guidance, device=x.device, dtype=torch.float32)
        out = model(hidden_states=x.to(dtype), timestep=t.to(dtype), guidance=guidance,
                    pooled_projections=cond["pooled"].to(x.device, dtype),
                    encoder_hidden_states=cond["prompt_embeds"].to(x.device, dtype),
                    txt_ids=cond["txt_ids"].to(x.device), img_ids=self.img_ids.to(x.device), return_dict=False)[0]
        return out.float()

    def sigmas(self, num_steps: int) -> Tensor:
        """The pipeline's schedule: dynamic shift mu(sequence length) for FLUX.1-dev, none for schnell/digits."""
        cfg = self.scheduler_config
        if cfg.get("use_dynamic_shifting"):
            mu = sampling.flux_mu(self.latent_shape[0], cfg.get("base_image_seq_len", 256),
                                  cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                  cfg.get("max_shift", 1.15))
            return sampling.sigmas(num_steps, mu=mu)
        return sampling.sigmas(num_steps, shift=float(cfg.get("shift", 1.0)), grid="uniform")

    # -- latents <-> images -------------------------------------------------------------------------------------
    def _vae_factors(self) -> tuple[float, float]:
        if self.vae is None:
            return 1.0, 0.0
        return float(self.vae.config.scaling_factor), float(self.vae.config.shift_factor or 0.0)

    def decode(self, x: Tensor) -> Tensor:
        """Packed latents -> images in [0, 1]: unpack, latents / scaling + shift, VAE decode, x/2 + 1/2."""
        from diffusers import FluxPipeline

        lat = FluxPipeline._unpack_latents(x, self.height, self.width, self.vae_scale_factor)
        scale, shift = self._vae_factors()
        lat = lat / scale + shift
        if self.vae is not None:
            lat = self.vae.decode(lat.to(self.vae.dtype), return_dict=False)[0]
        return (lat.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [0, 1] -> packed latents (the inverse of decode; used to pre-train the digits model)."""
        from diffusers import FluxPipeline

        if self.vae is not None:
            raise NotImplementedError("encode_images is only needed for the VAE-free digits model")
        b, c, h, w = images.shape
        return FluxPipeline._pack_latents(images * 2 - 1, b, c, h, w)


# -- LoRA through peft -------------------------------------------------------------------------------------------
def add_lora(transformer: nn.Module, rank: int, alpha: float, targets: list[str]) -> list[nn.Parameter]:
    """Freeze the transformer and inject a LoRA adapter named 'default'; B = 0 so the policy starts at the base."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                       target_modules=targets))
    return [p for p in transformer.parameters() if p.requires_grad]


def lora_state_dict(transformer: nn.Module) -> dict[str, Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


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


# -- loading -----------------------------------------------------------------------------------------------------
def load_digits_backbone(device: str | torch.device = "cpu") -> FluxAdapter:
    """The built-in default: pre-trained on first use (see digits.py), loaded like any diffusers transformer."""
    from diffusers import FluxTransformer2DModel

    import digits

    path = digits.model_dir()
    transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer").to(device).eval()
    encoder = digits.load_prompt_encoder(path).to(device)
    return FluxAdapter(transformer, encoder, vae=None, height=digits.SIZE, width=digits.SIZE)


def load_backbone(model: str, device: str | torch.device = "cpu", **kwargs) -> FluxAdapter:
    if model == "digits":
        return load_digits_backbone(device)
    raise ValueError(f"unknown model {model!r}: the available model is 'digits' (the built-in tiny FLUX).")
