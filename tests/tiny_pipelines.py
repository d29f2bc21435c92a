"""Tiny random-weight FLUX.1-dev, FLUX.1-schnell and SD3.5-style pipelines, built offline from configs.

They have the real pipelines' structure (model_index.json, the same component classes, tokenizers, scheduler
configs) at ~1 M parameters, so `models.load_backbone("/that/folder")` takes exactly the path a user's
`--model /path/to/FLUX.1-dev` takes. A hand-built pipeline must satisfy diffusers' shape rules (a broken one is a
shape error at the first forward); the comments below state the rule each argument satisfies.

    python tests/tiny_pipelines.py /tmp/tiny      # writes /tmp/tiny/{flux-dev,flux-schnell,sd3.5}
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project, when run as a script

import torch  # noqa: E402

from tools import gpu_check  # noqa: E402  (its in-memory tokenizers)

CLIP_LEN = 16  # CLIP tokens (model_max_length): the pipelines pad CLIP prompts to this; small keeps SD3's context short
KINDS = ("flux-dev", "flux-schnell", "sd3.5")


def _tokenizers():
    """A char-level CLIP BPE and a T5 Unigram tokenizer from in-memory vocabularies (no sentencepiece, no files)."""
    return gpu_check.tokenizers(CLIP_LEN)


def _clip(cls, hidden: int = 32):
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden,
                              intermediate_size=2 * hidden, num_attention_heads=4, num_hidden_layers=2,
                              max_position_embeddings=CLIP_LEN, vocab_size=1000, hidden_act="gelu",
                              projection_dim=hidden, layer_norm_eps=1e-5))


def _t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=200, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1))


def _vae(scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    # 3 blocks -> vae_scale_factor 4; non-trivial scaling/shift factors so decode() must apply them like the pipeline
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=scaling_factor,
                         shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False)


def build(kind: str, seed: int = 0):
    """A pipeline object with random weights; every component in eval mode (T5 has dropout 0.1 otherwise)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if kind not in KINDS:
        raise ValueError(f"unknown tiny pipeline {kind!r}; choose one of {KINDS}")
    torch.manual_seed(seed)
    clip_tok, t5_tok = _tokenizers()
    if kind.startswith("flux"):
        dev = kind == "flux-dev"
        # FLUX.1-dev's scheduler: resolution-dependent shift; schnell's: none
        scheduler = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                     max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
                     if dev else FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False))
        # in_channels = 4 x latent channels (2x2 packing); sum(axes_dims_rope) = head dim; joint_attention_dim = T5
        # d_model; pooled_projection_dim = CLIP hidden size (pooler_output)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                             attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                             pooled_projection_dim=32, guidance_embeds=dev, axes_dims_rope=(4, 6, 6))
        pipe = FluxPipeline(scheduler=scheduler, vae=_vae(0.3611, 0.1159), text_encoder=_clip(CLIPTextModel),
                            tokenizer=clip_tok, text_encoder_2=_t5(32), tokenizer_2=t5_tok, transformer=transformer)
    else:
        # SD3.5-Medium style: qk RMS norm and a dual-attention (MMDiT-X) first layer; static shift 3.
        # joint_attention_dim = T5 d_model >= 2 x CLIP hidden; pooled_projection_dim = 2 x CLIP projection;
        # caption_projection_dim = heads x head dim
        transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                            attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                                            caption_projection_dim=64, pooled_projection_dim=64,
                                            pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,))
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                        vae=_vae(1.5305, 0.0609), text_encoder=_clip(CLIPTextModelWithProjection),
                                        tokenizer=clip_tok, text_encoder_2=_clip(CLIPTextModelWithProjection),
                                        tokenizer_2=clip_tok, text_encoder_3=_t5(64), tokenizer_3=t5_tok)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_all(root: str | Path) -> dict[str, Path]:
    """Write every tiny pipeline with save_pretrained (the layout of a `hf download` folder)."""
    out = {}
    for kind in KINDS:
        path = Path(root) / kind
        build(kind).save_pretrained(path)
        out[kind] = path
    return out


def cached() -> dict[str, Path]:
    """The tiny pipelines, written once into $FLOW_CPS_CACHE (tests/conftest.py points it at a temp folder) and
    shared by the test modules and the torchrun subprocesses they start. Built in a temp folder and renamed, so a
    concurrent or killed build never leaves a half-written one."""
    import shutil
    import tempfile

    root = Path(os.environ.get("FLOW_CPS_CACHE") or tempfile.gettempdir()) / "tiny-pipelines-v1"
    if not all((root / k / "model_index.json").is_file() for k in KINDS):
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-tiny-", dir=root.parent))
        save_all(tmp)
        if root.exists():  # another process finished first; theirs is identical
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, root)
    return {k: root / k for k in KINDS}


if __name__ == "__main__":
    for kind, path in save_all(sys.argv[1] if len(sys.argv) > 1 else "tiny_pipelines").items():
        print(kind, path)
