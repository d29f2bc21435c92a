"""A fully fine-tuned transformer as diffusers loads it: a folder with `config.json` and safetensors shards (and
their index when there are several), no optimizer state, what `FluxTransformer2DModel.from_pretrained(folder)` (or
the SD3 class) reads and `pipe.transformer` can be replaced with. The LoRA runs' export is lora.save_lora.

Under FSDP2 no rank ever holds the model: the shards are cut by huggingface_hub's rule from the tensors' global
shapes alone, then each is all-gathered tensor by tensor and written by rank 0, so the host memory of the export is
one shard (`MAX_SHARD_SIZE`) and the device memory one gathered tensor."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

MAX_SHARD_SIZE = "5GB"  # huggingface_hub's default; a shard is the most host memory an export holds
WEIGHTS = "diffusion_pytorch_model{suffix}.safetensors"  # diffusers' file names (SAFETENSORS_WEIGHTS_NAME)
INDEX = "diffusion_pytorch_model.safetensors.index.json"  # diffusers' SAFE_WEIGHTS_INDEX_NAME


def gathered(t: Tensor) -> Tensor:
    """A plain tensor from a DTensor (an FSDP2 shard): all-gathers, so every rank must call it in the same order."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def save_transformer(transformer: nn.Module, out_dir: str | Path, is_main: bool) -> None:
    """Write `transformer` (plain, or sharded in place by FSDP2) as a diffusers model folder. Under FSDP2 every rank
    calls it (the gathers are collectives); otherwise rank 0 alone may. Weights as trained (fp32 masters)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out = Path(out_dir)
    state = transformer.state_dict()  # FSDP2: this rank's shards (DTensors), nothing gathered; buffers whole
    shapes = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}
    split = split_torch_state_dict_into_shards(shapes, filename_pattern=WEIGHTS, max_shard_size=MAX_SHARD_SIZE)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(_config_json(transformer))
    for filename, names in split.filename_to_tensors.items():
        shard = {}
        for name in names:
            full = gathered(state[name].detach())
            if is_main:
                shard[name] = full.to("cpu", copy=True).contiguous()
        if is_main:
            save_file(shard, out / filename, metadata={"format": "pt"})
    if is_main and split.is_sharded:
        index = dict(metadata=split.metadata, weight_map=split.tensor_to_filename)
        (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _config_json(transformer: nn.Module) -> str:
    """The model's config.json as save_config writes it, naming the diffusers class (FSDP2 subclasses it in place:
    FSDPFluxTransformer2DModel)."""
    cls = next(c for c in type(transformer).__mro__ if c.__module__.startswith("diffusers."))
    config = json.loads(transformer.to_json_string())
    config["_class_name"] = cls.__name__
    return json.dumps(config, indent=2, sort_keys=True) + "\n"
