"""Finding model weights: a local diffusers folder or a Hugging Face hub id, optionally pinned to a revision (the
cache first, a download if online), or a pipeline registered in memory; and opening them (`load_pipeline`).

Everything here fails *before* any work, naming the missing files and the command that fetches them
(`resolve_model`). train.py calls it on rank 0 before loading; plan.py calls it to say whether the weights are in
place (`--dry_run`).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

PIPELINES = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}  # model_index.json _class_name -> kind
GATED = {"black-forest-labs/FLUX.1-dev", "stabilityai/stable-diffusion-3.5-medium"}  # licence to accept on the hub


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name; --model owner/name@revision pins a branch, tag or commit
# Pipelines built in memory, by the name a run gives as --model (tools/gpu_check.py: FLUX.1-dev / SD3.5-Medium with
# random weights, nothing downloaded): `load_pipeline` returns the object itself, memory.model_info reads its configs.
_REGISTERED: dict[str, object] = {}
MEMORY_PREFIX = "memory:"


def register_pipeline(name: str, pipeline) -> str:
    """Make a FluxPipeline / StableDiffusion3Pipeline object loadable as --model `memory:<name>`; returns that."""
    if type(pipeline).__name__ not in PIPELINES:
        raise ValueError(f"unsupported pipeline {type(pipeline).__name__}; supported: {', '.join(PIPELINES)}")
    _REGISTERED[MEMORY_PREFIX + name] = pipeline
    return MEMORY_PREFIX + name


def registered(model: str):
    """The pipeline registered as `model`, or None."""
    return _REGISTERED.get(model)


def unregister(model: str | None = None) -> None:
    """Forget a registered pipeline (every one when `model` is None)."""
    if model is None:
        _REGISTERED.clear()
    else:
        _REGISTERED.pop(model, None)


def hub_id(model: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when --model names a Hugging Face hub repo, None when it names a local path: one
    that exists, starts with '.', '/' or '~', or whose first part is a folder here (`data/flux` with a data/ folder
    is a missing local folder, never a download)."""
    name, _, revision = model.partition("@")
    if (Path(model).expanduser().exists() or model.startswith((".", "/", "~")) or not HUB_ID.match(name)
            or Path(name.split("/")[0]).is_dir()):
        return None
    return name, revision or None


def load_pipeline(model: str, dtype: torch.dtype):
    """The diffusers pipeline behind --model (a registered one, or `from_pretrained` of the folder `resolve_model`
    finds), with the transformer in `dtype` (from_pretrained: the text encoders too, but for T5's fp32 `wo`) and the
    VAE in fp32."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    folder, kind = resolve_model(model)
    if folder is not None:
        cls = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}[kind]
        return cls.from_pretrained(folder, dtype={"default": dtype, "vae": torch.float32})
    pipe = _REGISTERED[model]  # built in memory (gpu_check.py) in the run's dtype; cast only what differs, as
    if pipe.transformer.dtype != dtype:  # from_pretrained would load it (diffusers warns on every dtype cast)
        pipe.transformer.to(dtype)
    if pipe.vae.dtype != torch.float32:
        pipe.vae.to(torch.float32)
    return pipe
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


def _how_to_get(model: str, local_dir: str, revision: str | None = None) -> str:
    gated = model in GATED
    flux = "flux" in model.lower()  # FLUX has no third text encoder
    include = " ".join(f'"{p}"' for p in DOWNLOAD_PATTERNS if not (flux and "_3" in p))
    pin = f" --revision {revision}" if revision else ""
    return ((f"{model} is gated: accept its licence on https://huggingface.co/{model} and run `hf auth login` "
             "first. " if gated else "") +
            f"Download the diffusers folders once:\n    hf download {model}{pin} --local-dir {local_dir} --include "
            f"{include}\n(older huggingface_hub: `huggingface-cli download` with the same arguments), then pass "
            f"--model {local_dir}.")


def resolve_model(model: str, download: bool = True) -> tuple[Path | None, str]:
    """'owner/name' or 'owner/name@revision' (a hub id, looked up in the Hugging Face cache, downloaded if online and
    `download`) or a local diffusers folder (`hub_id` tells which) -> (folder, kind); a registered in-memory
    pipeline -> (None, kind). Raises ValueError naming the missing files and how to provide them."""
    if model in _REGISTERED:
        return None, PIPELINES[type(_REGISTERED[model]).__name__]
    if model.startswith(MEMORY_PREFIX):
        raise ValueError(f"--model {model}: no pipeline of that name was built in this process "
                         "(hub.register_pipeline; tools/gpu_check.py builds them)")
    repo = hub_id(model)
    if repo is None:
        path = Path(model).expanduser()
        if not path.is_dir():
            first = Path(model.split("/")[0])
            raise ValueError(f"--model {model}: no such folder. Give 'digits', a Hugging Face hub id such as "
                             "black-forest-labs/FLUX.1-dev, or a local diffusers folder (with model_index.json)" +
                             (f"; {first}/ is a folder here, so {model} is read as a local path" if "/" in model and
                              first.is_dir() and not path.exists() else "") + ".")
        missing = missing_files(path)
        if missing:
            raise ValueError(f"--model {model} is not a complete diffusers pipeline folder; missing: "
                             f"{', '.join(missing)}. A folder written by `hf download <id> --local-dir {model}` "
                             "or by `pipeline.save_pretrained` has them all.")
        return path, pipeline_kind(path)
    from huggingface_hub import snapshot_download

    repo_id, revision = repo
    local_dir = f"/data/{repo_id.split('/')[1]}"
    folder, missing, error = None, ["model_index.json"], None
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True,
                                        allow_patterns=DOWNLOAD_PATTERNS))
        missing = missing_files(folder)
    except Exception as e:  # not in the cache at all
        error = e
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    if missing and download and not offline:
        try:  # online: fetch (only) what is missing, like from_pretrained would
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS))
            missing = missing_files(folder)
        except Exception as e:
            error = e
    if missing:
        at = f" at revision {revision}" if revision else ""
        where = (f"the Hugging Face cache has an incomplete copy at {folder} (missing: {', '.join(missing[:6])}"
                 f"{', ...' if len(missing) > 6 else ''})" if folder is not None else
                 f"it is not in the Hugging Face cache{at}" + (" and HF_HUB_OFFLINE=1 forbids downloading" if offline
                                                               else "" if not download else
                                                               f" and downloading failed ({_first_line(error)})"))
        raise ValueError(f"model {repo_id!r}: the weights are not available: {where}. "
                         f"{_how_to_get(repo_id, local_dir, revision)}"
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
