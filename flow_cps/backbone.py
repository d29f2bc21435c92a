"""What the FLUX and SD3 backbones (models.py) share: how they are loaded and run (`Options`, one field per flag), the
per-prompt embedding cache (bounded by bytes, on the CPU), guidance switching, offloading of the frozen encoders and
VAE, the transformer's timestep (exact, or DanceGRPO's quantised one) and the chunked fp32 decode. models.py documents
the interface a backbone offers train.py. ("Adapter" in this project means only the LoRA adapter that peft injects.)"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import sampling

# Scheduler options the closed-form schedules (sampling.sigmas) do not reproduce: refuse, never guess.
_UNSUPPORTED_SCHEDULER = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "shift_terminal",
                          "invert_sigmas", "stochastic_sampling")
GIB = 2 ** 30
DEFAULT_CACHE_BYTES = 8 * GIB  # --embedding_cache_gb's default: host RAM per rank for cached prompt embeddings


@dataclass(frozen=True)
class Options:
    """How a backbone is loaded and run: the flags of the same names (flow_cps/config.py), listed once here.
    0 and -1 mean the model's own value."""
    resolution: int = 0  # image height = width in pixels; 0 = the pipeline's default (digits: 8)
    guidance: float = -1.0  # FLUX.1-dev guidance embedding / SD3 CFG scale; -1 = the paper's value (models.py)
    max_sequence_length: int = 0  # T5 tokens per prompt; 0 = the pipeline's default (FLUX 512, SD3 256)
    shift: float = 0.0  # > 0: a static shift s on the model's grid instead of its scheduler's (DanceGRPO: 3)
    quantize_timesteps: bool = False  # the transformer gets DanceGRPO's int(1000 t)/1000, the sampler the exact t
    offload: bool = False  # text encoders and VAE stay on the CPU and visit the GPU only while they run
    dtype: torch.dtype = torch.float32  # frozen transformer and text encoders; the VAE is fp32 in every precision
    cache_bytes: int = DEFAULT_CACHE_BYTES  # host RAM for cached prompt embeddings, least recently used dropped
    decode_batch: int = 8  # images per VAE decode (at 512 px one image's decoder activations are ~1 GB in fp32)


class Backbone:
    """What FLUX and SD3 share: the per-prompt embedding cache, guidance switching, offloading, the transformer's
    timestep (exact, or DanceGRPO's quantised) and the chunked fp32 decode.

    Subclasses set kind, latent_shape and implement _encode_batch, _velocity, sigmas and _latents_for_vae.
    guidance: the scale this model uses (None: no guidance embedding and no CFG); scheduler_config: the pipeline
    scheduler's config, read for the shift (None: no shift); prompt_check(prompt) raises ValueError for a prompt the
    model cannot condition on.
    """

    kind = ""
    shared_keys: tuple[str, ...] = ()  # conditioning tensors without a batch dim (FLUX's txt_ids)
    autocast = contextlib.nullcontext  # the context every forward runs in: the precision's (set by policy.Policy)

    def __init__(self, transformer: nn.Module, encode_prompt, vae: nn.Module | None, *, guidance: float | None,
                 scheduler_config: dict | None = None, device=None, options: Options | None = None, text_encoders=(),
                 prompt_check=None):
        options = options or Options()
        self.transformer, self.encode_prompt, self.vae = transformer, encode_prompt, vae
        self.guidance, self.prompt_check = guidance, prompt_check
        self.scheduler_config = dict(scheduler_config or {})
        for key in _UNSUPPORTED_SCHEDULER:
            if self.scheduler_config.get(key):
                raise ValueError(f"the scheduler option {key}={self.scheduler_config[key]!r} is not supported: the "
                                 "sampler computes the schedule in closed form (sampling.sigmas)")
        if int(self.scheduler_config.get("num_train_timesteps", sampling.NUM_TRAIN_TIMESTEPS)) != \
                sampling.NUM_TRAIN_TIMESTEPS:
            raise ValueError("only schedulers with num_train_timesteps = 1000 are supported")
        self.shift = float(options.shift)  # > 0 overrides the scheduler's shift (DanceGRPO's static 3 on FLUX)
        self.quantize_timesteps = bool(options.quantize_timesteps)
        self.device = torch.device(device) if device is not None else None
        self.offload = bool(options.offload) and self.device is not None and self.device.type != "cpu"
        self.text_encoders = [m for m in text_encoders if m is not None]
        self.cache_bytes, self.decode_batch = int(options.cache_bytes), options.decode_batch
        # Embeddings live on the CPU (a 25k-prompt set at 128 T5 tokens would need ~25 GB of GPU memory) and the
        # least recently used ones are dropped once they hold more than cache_bytes (one FLUX prompt at 512 T5
        # tokens is 4 MiB in bf16: a count limit would not bound the host RAM); encode() returns them on self.device.
        self._cache: OrderedDict[str, dict[str, Tensor]] = OrderedDict()
        self.cache_nbytes = 0  # bytes the cached embeddings hold now
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
                self.cache_nbytes += sum(t.numel() * t.element_size() for t in self._cache[p].values())
            self._shared.update({k: self._store(v) for k, v in shared.items()})
        for p in prompts:
            self._cache.move_to_end(p)
        out = {k: self._out(torch.cat([self._cache[p][k] for p in prompts])) for k in self._cache[prompts[0]]}
        out.update({k: self._out(v) for k, v in self._shared.items()})
        while self.cache_nbytes > self.cache_bytes and self._cache:  # least recently used first
            _, dropped = self._cache.popitem(last=False)
            self.cache_nbytes -= sum(t.numel() * t.element_size() for t in dropped.values())
        return self._expand_shared(out, len(prompts))

    def _expand_shared(self, cond: dict, batch: int) -> dict:
        return cond

    def select(self, cond: dict, rows: Tensor) -> dict:
        """The conditioning of the samples `rows` (indices into cond's batch); shared tensors pass as they are."""
        return {k: v if k in self.shared_keys else v[rows] for k, v in cond.items()}

    def check_prompts(self, prompts: list[str]) -> None:
        """Raise ValueError naming a prompt this model cannot condition on (before any work); real text encoders
        take any text, the digits model's one-token encoder needs a digit (digits.parse_digit)."""
        if self.prompt_check is not None:
            for p in dict.fromkeys(prompts):
                self.prompt_check(p)

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

    def model_t(self, t: Tensor) -> Tensor:
        """The t in [0, 1] the transformer is given for the sampler's t: t itself, or with quantize_timesteps
        DanceGRPO's int(1000 t)/1000 (its train_grpo_flux.py: `int(sigma * 1000)` of the fp32 sigma, then
        `timesteps / 1000`), while the sampler's step keeps the exact t (docs/NOTES.md, "Timesteps")."""
        t = t.float()
        if not self.quantize_timesteps:
            return t
        return torch.floor(t * sampling.NUM_TRAIN_TIMESTEPS) / sampling.NUM_TRAIN_TIMESTEPS

    def velocity(self, x: Tensor, t: Tensor, cond: dict, model: nn.Module | None = None) -> Tensor:
        """v_theta(x_t, t, c) in fp32 from `model` (default: the transformer), under the precision's `autocast`."""
        with self.autocast():
            return self._velocity(x, t, cond, model)

    def _velocity(self, x: Tensor, t: Tensor, cond: dict, model: nn.Module | None = None) -> Tensor:
        raise NotImplementedError

    @property
    def latent_device(self) -> torch.device:
        """Where the latents live: the backbone's device, else the transformer's."""
        return self.device if self.device is not None else next(self.transformer.parameters()).device

    # -- latents -> images ----------------------------------------------------------------------------------------
    def _vae_factors(self) -> tuple[float, float]:
        if self.vae is None:
            return 1.0, 0.0
        return float(self.vae.config.scaling_factor), float(self.vae.config.shift_factor or 0.0)

    def _latents_for_vae(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, x: Tensor) -> Tensor:
        """Latents -> images in [0, 1]: (unpack), latents / scaling + shift, VAE decode, x/2 + 1/2, as the pipelines.

        The VAE is fp32 (models.load_backbone keeps it so on every device, as Flow-GRPO does: reward images are not
        half-precision decodes) and runs outside autocast, in chunks of decode_batch images (at 512 px one image's
        decoder activations are ~1 GB in fp32)."""
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
