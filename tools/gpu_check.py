"""The GPU check: one GRPO iteration of every preset through the real code (train.main: rollout, decode, a reward,
the update, a checkpoint), on one CUDA device, with the released architectures of FLUX.1-dev, FLUX.1-schnell and
SD3.5-Medium (memory.KNOWN_MODELS) built in memory with random weights: nothing is downloaded.

    python -m tools.gpu_check                    # one GPU: every preset at a reduced batch -> results/gpu.md (< 8 min)
    python -m tools.gpu_check --tiny --out X.md  # the CPU smoke version (tiny shapes, fp32); tests/test_gpu_check.py
    python -m tools.gpu_check --device cpu --depth 1,1 --resolution 64 --presets flux-dev-pickscore   # real widths, CPU

What stands in for what:
  * transformers: the released configs, random weights (normal, std 0.02: outputs stay finite through 57 blocks);
    flux-dev-hpsv2 (full fine-tuning, 16 B/param of fp32 weights, grads and AdamW state) keeps FLUX.1-dev's width but
    only --dance_depth blocks, since the whole model does not fit one GPU's memory;
  * text encoders: one-layer CLIP / T5 with the real embedding widths (T5 d_model 4096; CLIP pooled 768, SD3's
    CLIP-L + CLIP-G 768 + 1280 = 2048), in-memory character tokenizers;
  * VAE: the released architecture (16 latent channels, 4 levels), random weights, fp32;
  * reward: clean_background (no weights), for every preset; the paper's reward models are not downloadable here.
The pipeline is registered with hub.register_pipeline and the preset run as `--model memory:<preset>`, so Session,
the adapters, the policy and the checkpoint are exactly a user's. Per preset it records the peak GPU memory against
the dry run's estimate for the same batch (plan.describe), the first update's ratio and clip fraction, throughput
(from the second iteration's timers) and the model FLOPs utilisation of the transformer's rollout forward and
training forward + backward (FLOPs: torch.utils.flop_counter over one forward, training = 3 x forward).
"""
from __future__ import annotations

import argparse
import gc
import math
import re
import shutil
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

import train
from flow_cps import distributed, hub, memory, plan, precision
from flow_cps.config import parse_config

PRESETS = ["sd3.5-geneval", "sd3.5-ocr", "sd3.5-pickscore", "flux-dev-pickscore", "flux-schnell-pickscore",
           "flux-dev-hpsv2"]
HUB_IDS = {"flux-dev": "black-forest-labs/FLUX.1-dev", "flux-schnell": "black-forest-labs/FLUX.1-schnell",
           "sd3.5": "stabilityai/stable-diffusion-3.5-medium"}
# Dense bf16 (= fp16) tensor-core peaks, TFLOP/s, from the vendors' data sheets (their figures with sparsity,
# halved), per (model, form factor): "" is the SXM / module part. The NVL and PCIe cards run at lower clocks.
PEAK_TFLOPS = {("H100", ""): 989.4, ("H100", "NVL"): 835.5, ("H100", "PCIE"): 756.5, ("H200", ""): 989.4,
               ("H200", "NVL"): 835.5, ("GH200", ""): 989.4, ("A100", ""): 312.0, ("A100", "PCIE"): 312.0,
               ("L40S", ""): 362.1, ("B200", ""): 2250.0}
FORM_FACTORS, SIZES = {"NVL", "PCIE"}, re.compile(r"\d+GB|HBM\d*E?|SXM\d*")
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "two cups of coffee on a table",
           "a sign that says \"OPEN\"", "a bowl of ramen, studio photo", "a green bicycle against a brick wall"]


def kind_of(preset: str) -> str:
    return "sd3.5" if preset.startswith("sd3.5") else "flux-schnell" if "schnell" in preset else "flux-dev"


# -- the stand-in pipelines ------------------------------------------------------------------------------------------
def tokenizers(clip_len: int = 77):
    """A char-level CLIP BPE and a T5 Unigram tokenizer from in-memory vocabularies (no sentencepiece, no files)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer, T5Tokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for tok in ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=clip_len)  # model_max_length must be set
    pieces = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
              + [(c, -2.0) for c in string.ascii_letters + string.digits + string.punctuation]
              + [("\u2581" + c, -1.5) for c in string.ascii_lowercase])
    return clip, T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


TINY = {"flux-dev": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                         num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                         axes_dims_rope=(4, 6, 6)),
        "sd3.5": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
                      num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64,
                      pooled_projection_dim=64, pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,))}
TINY["flux-schnell"] = dict(TINY["flux-dev"], guidance_embeds=False)


def stand_in_pipeline(kind: str, *, tiny: bool, dtype: torch.dtype, device: str, depth: tuple[int, int] | None = None):
    """A FluxPipeline / StableDiffusion3Pipeline with random weights: the released transformer config (or TINY's),
    stand-in text encoders of the real embedding widths, the released VAE architecture; built on `device`."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    known = memory.KNOWN_MODELS[HUB_IDS[kind]]
    tr_cfg = dict(TINY[kind] if tiny else known["transformer"])
    flux = kind.startswith("flux")
    if depth and not tiny:  # fewer blocks at the real width (SD3: depth[0] joint blocks, its dual ones among them)
        tr_cfg.update(num_layers=depth[0], **dict(num_single_layers=depth[1]) if flux else dict(
            dual_attention_layers=[i for i in tr_cfg["dual_attention_layers"] if i < depth[0]]))
    t5_dim = tr_cfg["joint_attention_dim"]
    clip_dims = ([tr_cfg["pooled_projection_dim"]] if flux else [tr_cfg["pooled_projection_dim"] * 3 // 8,
                                                                  tr_cfg["pooled_projection_dim"] * 5 // 8])
    clip_len = 16 if tiny else 77
    clip_tok, t5_tok = tokenizers(clip_len)

    def clip(cls, hidden):
        return cls(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden,
                                  intermediate_size=2 * hidden, num_attention_heads=4, num_hidden_layers=1,
                                  max_position_embeddings=clip_len, vocab_size=1000, projection_dim=hidden))

    t5 = lambda: T5EncoderModel(T5Config(vocab_size=200, d_model=t5_dim, d_kv=8 if tiny else 64,  # noqa: E731
                                         d_ff=2 * t5_dim if tiny else 1024, num_layers=1, num_heads=4,
                                         relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                                         eos_token_id=1))
    levels = 3 if tiny else 4  # VAE scale 4 (tiny) or 8 (released: 128, 256, 512, 512 channels)
    vae = lambda: AutoencoderKL(  # noqa: E731
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(8, 16, 16) if tiny else (128, 256, 512, 512),
        layers_per_block=1 if tiny else 2, latent_channels=4 if tiny else 16, norm_num_groups=4 if tiny else 32,
        sample_size=32 if tiny else 1024, scaling_factor=0.3611 if flux else 1.5305,
        shift_factor=0.1159 if flux else 0.0609, use_quant_conv=False, use_post_quant_conv=False)
    sched = {k: v for k, v in known["scheduler"].items() if k != "num_train_timesteps"}
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    try:
        with torch.device(device):
            torch.set_default_dtype(dtype)
            tr = (FluxTransformer2DModel if flux else SD3Transformer2DModel)(**tr_cfg)
            encoders = [clip(CLIPTextModel if flux else CLIPTextModelWithProjection, d) for d in clip_dims] + [t5()]
            torch.set_default_dtype(torch.float32)
            image_vae = vae()
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():  # small weights: random full-depth transformers stay finite
        for m in tr.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)):
                m.weight.normal_(0, 0.02)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
    scheduler = FlowMatchEulerDiscreteScheduler(**sched)
    if flux:
        pipe = FluxPipeline(scheduler=scheduler, vae=image_vae, text_encoder=encoders[0], tokenizer=clip_tok,
                            text_encoder_2=encoders[1], tokenizer_2=t5_tok, transformer=tr)
    else:
        pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=scheduler, vae=image_vae, text_encoder=encoders[0],
                                        tokenizer=clip_tok, text_encoder_2=encoders[1], tokenizer_2=clip_tok,
                                        text_encoder_3=encoders[2], tokenizer_3=t5_tok)
    for c in pipe.components.values():
        if isinstance(c, torch.nn.Module):
            c.eval()
    return pipe


# -- one preset --------------------------------------------------------------------------------------------------
def preset_args(preset: str, model: str, prompts: Path, out: Path, *, tiny: bool, iterations: int, device: str,
                resolution: int = 0, precision: str = "") -> list[str]:
    """The preset at a reduced batch: one prompt, a group of one rollout forward (the preset's micro_batch samples),
    one update, a short evaluation of one held-out image, clean_background as the reward."""
    cfg = parse_config(["--preset", preset])
    group = max(2, cfg.micro_batch) if not tiny else 2
    args = ["--preset", preset, "--model", model, "--prompts", str(prompts), "--eval_prompt_file", str(prompts),
            "--eval_prompts", "1", "--eval_per_prompt", "1", "--reward", "clean_background", "--eval_metrics",
            "clean_background", "--prompts_per_iter", "1", "--group_size", str(group), "--updates_per_iter", "1",
            "--iterations", str(iterations), "--eval_every", str(iterations), "--checkpoint_every", str(iterations),
            "--keep_checkpoints", "1", "--eval_steps", str(cfg.num_steps), "--report_to", "none",
            "--output_dir", str(out)]
    if tiny:  # CPU: fp32 (CPU half-precision matmuls are slow; the fp16 path has its own CPU test)
        args += ["--precision", "fp32", "--resolution", "32", "--max_sequence_length", "16", "--micro_batch", "2",
                 "--num_steps", "4", "--eval_steps", "2"]
    elif resolution:
        args += ["--resolution", str(resolution)]
    return args + ["--device", device] + (["--precision", precision] if precision and not tiny else [])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeat: int = 3) -> float:
    fn()  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeat


def utilisation(policy, autocast, micro_batch: int, repeat: int) -> dict:
    """FLOPs of one transformer forward of micro_batch samples (x2 with CFG), counted by torch's FlopCounterMode
    (matmuls and attention of the executed graph), and the seconds of a rollout forward (no grad) and of a training
    forward + backward (the policy's module: LoRA / FSDP2 as in training)."""
    from torch.utils.flop_counter import FlopCounterMode

    bb = policy.backbone
    device = bb.device or torch.device("cpu")
    x = torch.randn(micro_batch, *bb.latent_shape, device=device)
    t = torch.full((micro_batch,), 0.6, device=device)
    cond = bb.encode([PROMPTS[i % len(PROMPTS)] for i in range(micro_batch)])

    def forward():
        with torch.no_grad(), autocast():
            bb.velocity(x, t, cond, policy.module)

    def train_step():
        with autocast():
            v = bb.velocity(x, t, cond, policy.module)
        v.square().mean().backward()
        policy.opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        forward()
    flops = counter.get_total_flops()
    policy.module.train()
    out = dict(flops=flops, forward_s=_timed(forward, device, repeat), train_s=_timed(train_step, device, repeat))
    policy.module.eval()
    return out


def run_preset(preset: str, args, workdir: Path) -> dict:
    device = torch.device(args.device)
    cfg0 = parse_config(["--preset", preset] + (["--precision", args.precision] if args.precision else []))
    dtype = torch.float32 if args.tiny else precision.precision(cfg0.precision, device).dtype
    depth = args.depth or (args.dance_depth if preset == "flux-dev-hpsv2" else "")
    depth = tuple(int(d) for d in depth.split(",")) if depth and not args.tiny else None
    base = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)  # what an earlier preset left (should be ~0)
    t0 = time.perf_counter()
    pipe = stand_in_pipeline(kind_of(preset), tiny=args.tiny, dtype=dtype, device=str(device), depth=depth)
    model = hub.register_pipeline(preset, pipe)
    built = time.perf_counter() - t0
    prompts = workdir / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    argv = preset_args(preset, model, prompts, workdir / preset, tiny=args.tiny, iterations=args.iterations,
                       device=args.device, resolution=args.resolution, precision=args.precision)
    cfg = parse_config(argv)
    estimate = plan.describe(cfg, 1, check_files=False)[1]
    teardown, distributed.teardown = distributed.teardown, lambda: None  # keep FSDP2's group for the measurements below
    try:
        res = train.main(argv)
        peak = (torch.cuda.max_memory_allocated(device) - base) / memory.GB if device.type == "cuda" else math.nan
        reserved = torch.cuda.max_memory_reserved(device) / memory.GB if device.type == "cuda" else math.nan
        ckpt = sorted((workdir / preset / "checkpoints").glob("iter_*"))
        rows = [r for r in res["history"] if r["iteration"] >= 1]
        autocast = precision.precision(cfg.precision, device).autocast  # what the Session ran under
        try:  # the memory and ratio above are kept if the timing fails
            use = utilisation(res["policy"], autocast, cfg.micro_batch, repeat=3 if device.type == "cuda" else 1)
        except Exception as e:
            if args.tiny:
                raise
            print(f"gpu_check: {preset}: utilisation failed: {e!r}", flush=True)
            use = dict(flops=math.nan, forward_s=math.nan, train_s=math.nan)
    finally:
        distributed.teardown = teardown
        distributed.teardown()
    est = estimate["memory"]["gb"]
    k, b = estimate["trained_steps"], plan.batch(cfg, 1)
    last = rows[-1]
    mem = estimate["memory"]
    out = dict(preset=preset, depth=depth, precision=precision.precision(cfg.precision, device).name,
               params=mem["params"], trained=mem["trainable_params"], samples=b.samples_per_rank,
               micro_batch=cfg.micro_batch, forward_batch=mem["forward_batch"],
               checkpointing=cfg.gradient_checkpointing, built_s=built, peak_gb=peak, reserved_gb=reserved,
               leftover_gb=base / memory.GB,
               estimate_gb=est["peak_checkpointing"] if cfg.gradient_checkpointing else est["peak"],
               first_ratio_dev=rows[0]["first_ratio_max_dev"], clipfrac=rows[0]["clipfrac"],
               rollout_images_s=b.samples_per_rank / last["time/rollout"],
               terms_s=last["kept"] * k / last["time/train"] if last["time/train"] else math.nan,
               checkpoint=bool(ckpt), **use)
    del res, pipe
    hub.unregister(model)
    gc.collect()
    shutil.rmtree(workdir / preset, ignore_errors=True)
    return out


# -- the report --------------------------------------------------------------------------------------------------
def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:,.1f} M" if n >= 1e5 else f"{n:,}"


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named as torch.cuda.get_device_name names it ('NVIDIA H200 NVL', 'NVIDIA H100 80GB
    HBM3', 'NVIDIA A100-SXM4-80GB'): its model and form factor, read word by word; None for a name with any other
    word (pass --peak_tflops), never the nearest listed part (a substring match gave an H200 NVL the SXM peak)."""
    words = device_name.upper().replace("-", " ").split()
    words = [w for w in words if w != "NVIDIA" and not SIZES.fullmatch(w)]
    if not words or any(w not in FORM_FACTORS for w in words[1:]) or len(words) > 2:
        return None
    return PEAK_TFLOPS.get((words[0], words[1] if len(words) > 1 else ""))


def report(results: list[dict], device_name: str, peak_tflops: float | None, seconds: float, tiny: bool) -> str:
    pct = lambda flops, s: 100 * flops / s / (peak_tflops * 1e12) if peak_tflops else math.nan  # noqa: E731
    lines = [f"# GPU check ({'tiny CPU smoke run' if tiny else device_name})", "",
             f"`python -m tools.gpu_check{' --tiny' if tiny else ''}`: {len(results)} presets in {seconds:.0f} s; "
             f"torch "
             f"{torch.__version__}; peak {peak_tflops or 'unknown'} TFLOP/s dense bf16/fp16. Random weights, the "
             "released architectures (gpu_check.py's docstring says what stands in for what); one prompt, a group "
             "of the preset's micro-batch, one update per iteration, clean_background as the reward.", "",
             "| preset | precision | transformer params (trained) | samples, terms per forward | peak GiB measured "
             "/ dry-run estimate | first-update ratio - 1 | clipfrac | rollout img/s | trained terms/s | MFU "
             "rollout fwd | MFU training fwd+bwd | checkpoint |", "|" + "---|" * 12]
    for r in results:
        if "error" in r:
            lines.append(f"| `{r['preset']}` | failed: {r['error']} |" + " |" * 10)
            continue
        ratio = r["peak_gb"] / r["estimate_gb"] if r["estimate_gb"] else math.nan
        depth = "" if not r["depth"] else f", {r['depth'][0]} blocks" if r["preset"].startswith("sd3") else \
            f", {r['depth'][0]}+{r['depth'][1]} blocks"
        lines.append(
            f"| `{r['preset']}` | {r['precision']} | {_count(r['params'])}{depth} ({_count(r['trained'])}) | "
            f"{r['samples']}, {r['micro_batch']}{' (x2 CFG)' if r['forward_batch'] != r['micro_batch'] else ''} | "
            f"{r['peak_gb']:.1f} / {r['estimate_gb']:.1f} ({ratio:.2f}) | {r['first_ratio_dev']:.1e} | "
            f"{r['clipfrac']:.3f} | {r['rollout_images_s']:.2f} | {r['terms_s']:.2f} | "
            f"{pct(r['flops'], r['forward_s']):.0f}% | {pct(3 * r['flops'], r['train_s']):.0f}% | "
            f"{'yes' if r['checkpoint'] else 'NO'} |")
    lines += ["", "| preset | built (s) | peak reserved GiB | left over by the previous preset GiB |",
              "|---|---|---|---|",
              *(f"| `{r['preset']}` | {r['built_s']:.1f} | {r['reserved_gb']:.1f} | {r['leftover_gb']:.2f} |"
                for r in results if "error" not in r)]
    lines += ["", "Method:",
              "- peak: torch.cuda.max_memory_allocated over building the pipeline and the whole run (two evaluations, "
              "the rollouts, the updates, the checkpoint); the estimate is the dry run's (plan.describe) for the same "
              "config on 1 GPU, with the stand-in encoders' sizes. Goal: within 10%.",
              "- ratio: the first update's max |ratio - 1| over its terms; exactly 0 when the recomputation is "
              "on-policy. Throughput: the last iteration's rollout (sampling + decode) and training timers.",
              "- MFU: FLOPs of one transformer forward of micro_batch samples (x2 with CFG), counted with "
              "torch.utils.flop_counter.FlopCounterMode (matmuls, attention); training = 3 x forward (model FLOPs: "
              "recomputation under checkpointing not counted), timed over forward + backward of the policy's module "
              "(LoRA / FSDP2 as trained), against the dense bf16 peak above. Goal: >= 35% for training at 512 px."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke version: tiny shapes, fp32")
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets to run")
    p.add_argument("--out", default="results/gpu.md", help="the report")
    p.add_argument("--iterations", type=int, default=0, help="GRPO iterations per preset, the last one timed (0: 2 "
                   "on a GPU, the first warms up; 1 with --tiny)")
    p.add_argument("--dance_depth", default="1,2", help="flux-dev-hpsv2: double,single blocks at FLUX.1-dev's width")
    p.add_argument("--depth", default="", help="every preset: 'D,S' blocks at the real width (a CPU check of shapes)")
    p.add_argument("--resolution", type=int, default=0, help="override the presets' resolution (0: theirs)")
    p.add_argument("--device", default="", help="'cuda' (default) or 'cpu' (--tiny: cpu)")
    p.add_argument("--precision", default="", help="override the presets' precision (bf16, fp16, fp32)")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="the GPU's dense bf16 peak (0: from its name)")
    args = p.parse_args(argv)
    args.iterations = args.iterations or (1 if args.tiny else 2)
    if args.tiny:
        torch.set_num_threads(1)  # tiny shapes: one thread is as fast, and much faster on shared cores
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU; `python -m tools.gpu_check --tiny` runs the CPU smoke version")
    cuda = args.device == "cuda"
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = (args.peak_tflops or peak_tflops(name)) if cuda else None
    t0, results = time.perf_counter(), []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for preset in args.presets.split(","):
            try:
                results.append(run_preset(preset, args, Path(tmp)))
            except (Exception, SystemExit) as e:  # one preset failing (OOM, ...) must not lose the others
                if args.tiny:
                    raise
                results.append(dict(preset=preset, error=f"{type(e).__name__}: {str(e)[:400]}"))
                hub.unregister()
                gc.collect()
                torch.cuda.empty_cache()
            print(f"gpu_check: {preset} done ({time.perf_counter() - t0:.0f} s)", flush=True)
            # written after every preset: a run stopped by a time limit keeps what it measured
            Path(args.out).write_text(report(results, name, peak, time.perf_counter() - t0, args.tiny))
    text = report(results, name, peak, time.perf_counter() - t0, args.tiny)
    Path(args.out).write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
