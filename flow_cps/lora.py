"""LoRA through peft, on a diffusers transformer: inject it, export it in diffusers' format (what
`pipe.load_lora_weights` reads), and switch it off for the KL term's reference policy.

Pitfalls handled here (docs/NOTES.md, "LoRA"): the export carries lora_alpha (without it `load_lora_weights`
silently uses alpha = r), its keys are diffusers' (no `base_model.model.` prefix), and identical runs write identical
bytes. In this project "adapter" means this LoRA adapter only (peft's word); the model wrappers are backbones.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from flow_cps import files
from flow_cps.export import gathered


@dataclass(frozen=True)
class LoRA:
    """The LoRA a run trains (--lora_rank, --lora_alpha, --lora_targets): the update W + (alpha / rank) B A on each
    linear layer named in `targets` (names inside a transformer block, e.g. 'attn.to_q')."""
    rank: int
    alpha: float
    targets: tuple[str, ...]


def add_lora(transformer: nn.Module, lora: LoRA) -> list[nn.Parameter]:
    """Freeze the transformer and inject a LoRA adapter named 'default'; B = 0 so the policy starts at the base.
    Raises ValueError naming the targets that match no linear layer, with the names that would."""
    from peft import LoraConfig

    targets = list(lora.targets)

    linear = sorted({n.split(".", 2)[-1] for n, m in transformer.named_modules() if isinstance(m, nn.Linear)
                     and n.count(".") >= 2})  # names inside a block: 'attn.to_q', 'ff.net.2', ...
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n, m in transformer.named_modules()
                                             if isinstance(m, nn.Linear))]
    if unknown:
        raise ValueError(f"--lora_targets {','.join(unknown)}: no linear layer of this transformer has that name; "
                         f"valid names (per block): {', '.join(linear)}")
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, init_lora_weights="gaussian",
                                       target_modules=targets))
    return [p for p in transformer.parameters() if p.requires_grad]


def lora_state_dict(transformer: nn.Module) -> dict[str, Tensor]:
    """A copy of the LoRA tensors under diffusers' names, on the CPU (a copy: on the CPU `.cpu()` would alias the live
    parameters, which `Policy.ema_weights` then overwrites with the EMA's). Under FSDP2 this gathers only the LoRA
    tensors (collective: call it on every rank)."""
    from peft import get_peft_model_state_dict

    return {k: gathered(v.detach()).to("cpu", copy=True).contiguous()
            for k, v in get_peft_model_state_dict(transformer).items()}


def save_lora(transformer: nn.Module, out_dir: str | Path, state_dict: dict[str, Tensor] | None = None,
              pipeline: str = "flux") -> None:
    """Write diffusers' `pytorch_lora_weights.safetensors` with the alpha metadata (without it, `load_lora_weights`
    silently uses alpha = r and rescales the update). `state_dict` overrides the weights (the EMA copy).

    Through the pipelines' LoRA mixins (what FluxPipeline.save_lora_weights is), which do not import the pipelines
    and their CLIP image processors. target_modules is a set in peft's config: it is sorted here so that identical
    runs write byte-identical files."""
    from diffusers.loaders import FluxLoraLoaderMixin, SD3LoraLoaderMixin

    cls = {"flux": FluxLoraLoaderMixin, "sd3": SD3LoraLoaderMixin}[pipeline]
    metadata = transformer.peft_config["default"].to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    cls.save_lora_weights(str(out_dir), transformer_lora_layers=state_dict or lora_state_dict(transformer),
                          transformer_lora_adapter_metadata=metadata)
    _sort_safetensors_header(Path(out_dir) / "pytorch_lora_weights.safetensors")


def _sort_safetensors_header(path: Path) -> None:
    """safetensors writes its __metadata__ map in hash order, which changes from process to process; rewrite the
    JSON header with sorted keys so identical runs give identical bytes. In place (padded with spaces, as the writer
    pads it) when the sorted header fits in the old one's length, so the tensor offsets stand; else (a longer JSON
    encoding, e.g. escaped non-ASCII metadata) the file is rewritten whole, header first, never over tensor bytes."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) <= n:
            f.seek(8)
            f.write(text.ljust(n))
            return
        data = f.read()
    text = text.ljust(-(-len(text) // 8) * 8)  # the writer keeps the tensor data 8-byte aligned
    files.write_atomic(path, len(text).to_bytes(8, "little") + text + data)


@contextlib.contextmanager
def adapter_disabled(transformer: nn.Module):
    """The reference policy of the KL term: the same transformer with its LoRA switched off."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()
