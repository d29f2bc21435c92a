"""models.py on tiny random-weight FLUX.1-dev, FLUX.1-schnell and SD3.5 pipelines, saved with save_pretrained and
loaded through the same `load_backbone("/path")` a user's `--model /path` takes (tests/tiny_pipelines.py):

  * the project's ODE rollout through the adapter equals diffusers' own pipeline for the same initial latents,
    prompts, steps and guidance (|diff| <= 1e-5; measured: FLUX bitwise, SD3 ~1e-6 from batching the empty prompt);
  * the LoRA a GRPO run exports loads with `pipe.load_lora_weights` and reproduces the policy's images (live and EMA);
    the adapter-off reference is exactly the base model;
  * missing weights stop train.py before any work, with the files and the download command;
  * FLUX's 2x2 packing and position ids equal FluxPipeline's static methods; `select` slices by sample; unknown
    LoRA targets are refused with the valid names.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_pipelines  # tests/ is on sys.path (pytest's rootdir-relative import)
import torch

import sampling
import train
from flow_cps import hub, lora, models

ROOT = Path(__file__).resolve().parent.parent
RES, MSL, STEPS = 32, 16, 6  # 32 px: 8x8 latents (VAE scale 4) = 16 tokens for FLUX (2x2 packing) and SD3 (patch 2)
TOL = dict(atol=1e-5, rtol=1e-5)
PROMPTS = ["a red cat", "two dogs on a sofa", "a sign that says OPEN"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is as fast, and much faster when the two cores are shared with other jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return tiny_pipelines.cached()


def _load(tiny, kind: str, guidance: float = -1.0):
    bb = models.load_backbone(str(tiny[kind]), "cpu", resolution=RES, guidance=guidance, max_sequence_length=MSL)
    bb.pipeline.set_progress_bar_config(disable=True)
    return bb


@torch.no_grad()
def _ode(bb, x1: torch.Tensor, steps: int = STEPS):
    cond = bb.encode(PROMPTS)
    traj = sampling.rollout(lambda x, t: bb.velocity(x, t, cond), x1, bb.sigmas(steps), "ode", 0.0)
    return traj.final, bb.decode(traj.final)


@torch.no_grad()
def _pipe(pipe, x1: torch.Tensor, guidance: float | None, output_type: str, steps: int = STEPS):
    kw = {} if guidance is None else dict(guidance_scale=guidance)
    return pipe(prompt=PROMPTS, latents=x1.clone(), num_inference_steps=steps, height=RES, width=RES,
                max_sequence_length=MSL, output_type=output_type, **kw).images


def _noise(bb, seed: int = 0) -> torch.Tensor:
    return torch.randn(len(PROMPTS), *bb.latent_shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind,guidance,override", [
    ("flux-dev", 3.5, None),      # guidance embedding + resolution-dependent shift
    ("flux-dev", 3.5, 2.0),       # evaluation's guidance override (eval_guidance)
    ("flux-schnell", None, None),  # no guidance embedding, no shift
    ("sd3.5", 4.5, None),         # true CFG in one batch of 2B, static shift 3, timestep 1000 t
    ("sd3.5", 4.5, 1.0),          # CFG off (w <= 1: one forward of B), as the pipeline's guidance_scale=1
])
def test_ode_rollout_equals_the_diffusers_pipeline(tiny, kind, guidance, override):
    bb = _load(tiny, kind, -1.0 if guidance is None else guidance)
    x1 = _noise(bb)
    with bb.guidance_scale(override):
        lat, img = _ode(bb, x1)
    w = override if override is not None else guidance
    lat_pipe = _pipe(bb.pipeline, x1, w, "latent")
    img_pipe = _pipe(bb.pipeline, x1, w, "pt")
    assert torch.equal(bb.pipeline.scheduler.sigmas, bb.sigmas(STEPS))  # the same schedule, bit for bit
    torch.testing.assert_close(lat, lat_pipe, **TOL)
    torch.testing.assert_close(img, img_pipe, **TOL)
    assert img.shape == (len(PROMPTS), 3, RES, RES) and float(img.std()) > 1e-3
    if override is not None:  # the override changed something, and was undone
        assert bb.guidance == guidance
        assert (lat - _ode(bb, x1)[0]).abs().max() > 1e-3


def test_prompt_embeddings_are_cached_per_unique_prompt(tiny):
    bb = _load(tiny, "sd3.5")
    calls = []
    encode = bb.encode_prompt
    bb.encode_prompt = lambda ps: calls.append(list(ps)) or encode(ps)
    a = bb.encode(["x", "y", "x"])
    b = bb.encode(["y", "x"])
    assert calls == [["x", "y"], [""]]  # two unique prompts, then the negative prompt once; the second call is cached
    assert torch.equal(a["prompt_embeds"][0], a["prompt_embeds"][2])
    assert torch.equal(b["prompt_embeds"][1], a["prompt_embeds"][0])
    assert a["neg_prompt_embeds"].shape[0] == 3  # one (view) row per sample, so train.py can slice by sample
    one = bb.cache_nbytes // 2  # "x" and "y": the same shapes, so each holds half
    bb.cache_bytes = one
    bb.encode(["z"])
    assert list(bb._cache) == ["z"]  # least recently used embeddings are dropped beyond the limit
    assert bb.cache_nbytes == one


LORA_RUN = ["--resolution", str(RES), "--max_sequence_length", str(MSL), "--reward", "clean_background",
            "--eval_metrics", "clean_background", "--iterations", "2", "--eval_every", "2", "--checkpoint_every", "2",
            "--eval_per_prompt", "1", "--prompts_per_iter", "2", "--group_size", "4", "--micro_batch", "4",
            "--num_steps", "4", "--eval_steps", "4", "--lora_rank", "4", "--lora_alpha", "12", "--lr", "0.05",
            "--report_to", "none"]


@pytest.mark.parametrize("kind", ["flux-dev", "sd3.5"])
def test_exported_lora_reproduces_the_trained_policy_in_diffusers(tiny, tmp_path, kind):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    # lora_alpha 12 != rank 4: the export must carry alpha, or load_lora_weights rescales the update
    res = train.main([*LORA_RUN, "--model", str(tiny[kind]), "--prompts", str(prompts), "--eval_prompt_file",
                      str(prompts), "--output_dir", str(tmp_path / "run")])
    policy, ckpt = res["policy"], tmp_path / "run" / "checkpoints" / "iter_000002"
    bb = policy.backbone
    x1 = _noise(bb, seed=1)
    lat_live, img_live = _ode(bb, x1)
    with lora.adapter_disabled(bb.transformer):
        lat_ref, img_ref = _ode(bb, x1)
    with policy.ema_weights():
        _, img_ema = _ode(bb, x1)
    fresh = _load(tiny, kind)  # the base pipeline, fresh from disk
    lat_base, img_base = _ode(fresh, x1)
    assert torch.equal(lat_ref, lat_base)  # the KL reference is exactly the base model
    torch.testing.assert_close(img_ref, _pipe(fresh.pipeline, x1, fresh.guidance, "pt"), **TOL)
    fresh.pipeline.load_lora_weights(str(ckpt / "lora"), adapter_name="grpo")
    torch.testing.assert_close(_pipe(fresh.pipeline, x1, fresh.guidance, "pt"), img_live, **TOL)
    fresh.pipeline.load_lora_weights(str(ckpt / "lora_ema"), adapter_name="grpo_ema")
    fresh.pipeline.set_adapters("grpo_ema")
    torch.testing.assert_close(_pipe(fresh.pipeline, x1, fresh.guidance, "pt"), img_ema, **TOL)
    assert (img_live - img_base).abs().max() > 1e-3 and (img_live - img_ema).abs().max() > 1e-4  # it trained
    meta = json.loads(_metadata(ckpt / "lora" / "pytorch_lora_weights.safetensors"))
    assert meta["transformer.lora_alpha"] == 12 and meta["transformer.r"] == 4


def _metadata(path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()["lora_adapter_metadata"]


def test_full_fine_tuning_exports_a_diffusers_transformer(tiny, tmp_path):
    """lora_rank 0 (DanceGRPO's full fine-tuning): every weight trains; the checkpoint holds a loadable transformer."""
    from diffusers import SD3Transformer2DModel

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    res = train.main([*LORA_RUN, "--model", str(tiny["sd3.5"]), "--prompts", str(prompts), "--lora_rank", "0",
                      "--eval_prompt_file", str(prompts),
                      "--lr", "1e-3", "--iterations", "1", "--output_dir", str(tmp_path / "run")])
    policy = res["policy"]
    assert len(policy.params) == len(list(policy.backbone.transformer.parameters()))
    ckpt = tmp_path / "run" / "checkpoints" / "iter_000001"
    loaded = SD3Transformer2DModel.from_pretrained(ckpt / "transformer").eval()
    live = dict(policy.backbone.transformer.named_parameters())
    assert all(torch.equal(p, live[n]) for n, p in loaded.named_parameters())
    base = SD3Transformer2DModel.from_pretrained(tiny["sd3.5"] / "transformer")
    assert any(not torch.equal(p, dict(base.named_parameters())[n]) for n, p in loaded.named_parameters())


def test_missing_weights_stop_before_any_work(tiny, tmp_path):
    out = tmp_path / "out"
    # a hub id that is not in the cache (the tests run with HF_HUB_OFFLINE=1)
    with pytest.raises(SystemExit) as e:
        train.main(["--model", "black-forest-labs/FLUX.1-dev", "--output_dir", str(out)])
    msg = str(e.value)
    assert msg.startswith("model error:") and "not in the Hugging Face cache" in msg
    assert "hf download black-forest-labs/FLUX.1-dev --local-dir" in msg and "--model /data/FLUX.1-dev" in msg
    assert "gated" in msg and "text_encoder_3" not in msg  # FLUX has two text encoders
    # an incomplete local folder names the missing file
    broken = tmp_path / "broken"
    shutil.copytree(tiny["flux-dev"], broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(SystemExit, match=r"missing: transformer/ \(weights"):
        train.main(["--model", str(broken), "--output_dir", str(out)])
    with pytest.raises(SystemExit, match="no such folder"):
        train.main(["--model", str(tmp_path / "nowhere"), "--output_dir", str(out)])
    assert not out.exists()  # nothing was written
    # a guidance scale for a model without guidance embeddings is refused, not ignored
    with pytest.raises(ValueError, match="no guidance embedding"):
        models.load_backbone(str(tiny["flux-schnell"]), resolution=RES, guidance=3.5)


def test_a_missing_local_path_is_never_downloaded_and_a_revision_can_be_pinned(tiny, tmp_path, monkeypatch):
    """`data/flux` with a data/ folder here is a missing local folder, not a Hub id to download; `owner/name@rev`
    resolves that revision in the Hugging Face cache (a cache with two revisions of one repo, built here)."""
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(ValueError, match=r"--model data/flux: no such folder.*; data/ is a folder here, so data/flux "
                                         r"is read as a local path\.$"):
        hub.resolve_model("data/flux")
    assert hub.hub_id("data/flux") is None and hub.hub_id("./flux/x") is None
    assert hub.hub_id("black-forest-labs/FLUX.1-dev@v1") == ("black-forest-labs/FLUX.1-dev", "v1")
    repo, old, new = tmp_path / "hub" / "models--acme--tiny-flux", "a" * 40, "b" * 40
    for sha, kind in ((old, "flux-dev"), (new, "flux-schnell")):
        shutil.copytree(tiny[kind], repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(old)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hub.resolve_model("acme/tiny-flux") == (repo / "snapshots" / old, "flux")
    assert hub.resolve_model(f"acme/tiny-flux@{new}") == (repo / "snapshots" / new, "flux")
    bb = models.load_backbone(f"acme/tiny-flux@{new}", resolution=RES, max_sequence_length=MSL)
    assert bb.guidance is None  # the schnell revision: no guidance embedding
    with pytest.raises(ValueError, match="(?s)not in the Hugging Face cache at revision v2.*--revision v2"):
        hub.resolve_model("acme/tiny-flux@v2")


def test_the_lora_header_rewrite_never_overwrites_tensor_bytes(tmp_path):
    """The sorted header is longer when json.dumps escapes non-ASCII metadata: the file is then rewritten whole."""
    from safetensors.torch import load_file, safe_open, save_file

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(tensors, path, metadata={"zeta": "naïve café", "alpha": "1"})
    lora._sort_safetensors_header(path)
    loaded = load_file(path)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"zeta": "naïve café", "alpha": "1"}
    n = int.from_bytes(path.read_bytes()[:8], "little")
    header = path.read_bytes()[8:8 + n]
    assert n % 8 == 0 and header.rstrip() == json.dumps(json.loads(header), sort_keys=True,
                                                        separators=(",", ":")).encode()


def test_flux_packing_matches_the_pipeline():
    """models.pack_latents / unpack_latents / latent_image_ids against FluxPipeline's static methods (the layout the
    transformer was trained on)."""
    from diffusers import FluxPipeline

    x = torch.randn(3, 16, 8, 12)
    packed = models.pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 3, 16, 8, 12))
    assert torch.equal(models.unpack_latents(packed, 4, 6), x)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 64, 96, 8), x)  # 64 x 96 px at VAE scale 8
    assert torch.equal(models.latent_image_ids(4, 6), FluxPipeline._prepare_latent_image_ids(1, 4, 6, "cpu",
                                                                                               torch.float32))


def test_select_slices_samples_and_keeps_shared_tensors(tiny):
    for kind in ("flux-dev", "sd3.5"):
        bb = _load(tiny, kind)
        cond = bb.encode(PROMPTS)
        rows = torch.tensor([2, 0])
        sel = bb.select(cond, rows)
        for k, v in cond.items():
            assert torch.equal(sel[k], v if k in bb.shared_keys else v[rows]), (kind, k)
        assert bb.shared_keys == (("txt_ids",) if kind == "flux-dev" else ())


def test_unknown_lora_targets_name_the_valid_ones(tiny):
    bb = _load(tiny, "flux-dev")
    with pytest.raises(ValueError, match=r"--lora_targets attn.to_qq: .* valid names \(per block\): .*attn.to_q"):
        lora.add_lora(bb.transformer, lora.LoRA(4, 4.0, ("attn.to_qq", "attn.to_k")))


def test_embedding_cache_is_bounded_by_bytes(tiny):
    """The cache drops least recently used prompts once their embeddings exceed cache_bytes (not a prompt count:
    one FLUX prompt at 512 T5 tokens is 4 MiB in bf16), and load_backbone takes the bound."""
    bb = models.load_backbone(str(tiny["flux-dev"]), "cpu", resolution=RES, max_sequence_length=MSL,
                              cache_bytes=10 ** 9)
    assert bb.cache_bytes == 10 ** 9
    bb.encode(["a"])
    one = bb.cache_nbytes  # prompt_embeds (1, 16, 32) + pooled (1, 32), fp32
    assert one == (MSL * 32 + 32) * 4
    bb.cache_bytes = int(2.5 * one)  # room for two prompts
    bb.encode(["b"])
    bb.encode(["c"])
    assert list(bb._cache) == ["b", "c"] and bb.cache_nbytes == 2 * one  # "a", the least recently used, went
    bb.encode(["b"])  # b is used again: c is now the least recently used
    bb.encode(["d", "e"])  # a batch larger than the cache is still encoded whole, then trimmed
    assert list(bb._cache) == ["d", "e"] and bb.cache_nbytes == 2 * one
    before = bb.encode(["d", "e"])["prompt_embeds"]
    assert torch.equal(bb.encode(["e", "d"])["prompt_embeds"], before.flip(0))
    bb.cache_bytes = 0  # nothing kept, the embeddings are still returned
    assert bb.encode(["f"])["prompt_embeds"].shape == (1, MSL, 32) and not bb._cache and bb.cache_nbytes == 0


def test_transformer_gets_dances_quantised_timestep_and_the_sampler_the_exact_one(tiny):
    """quantize_timesteps: the FLUX transformer sees int(1000 t)/1000, DanceGRPO's train_grpo_flux.py
    `int(sigma * 1000)` then `timesteps / 1000` (a long tensor / 1000: fp32), while the sampler steps on the exact
    grid; SD3's transformer, which takes 1000 t, gets int(1000 t)."""
    bb = models.load_backbone(str(tiny["flux-dev"]), "cpu", resolution=RES, max_sequence_length=MSL, shift=3.0,
                              quantize_timesteps=True)
    exact = models.load_backbone(str(tiny["flux-dev"]), "cpu", resolution=RES, max_sequence_length=MSL, shift=3.0)
    grid = bb.sigmas(16)
    # by hand: DanceGRPO's grid t = 3u / (1 + 2u), u = 1, 15/16, ..., 0 (docs/NOTES.md, "Schedules"), times 1000,
    # truncated
    hand = [1000, 978, 954, 928, 900, 868, 833, 794, 750, 700, 642, 576, 500, 409, 300, 166]
    assert grid.tolist()[:16] == pytest.approx([3 * u / (1 + 2 * u) for u in [1 - k / 16 for k in range(16)]],
                                                abs=1e-6)
    seen = []
    bb.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].clone()), with_kwargs=True)
    cond = bb.encode(PROMPTS[:2])
    x1 = torch.randn(2, *bb.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        final = sampling.rollout(lambda x, t: bb.velocity(x, t, cond), x1, grid, "ode").final
    assert torch.equal(torch.stack([s[0] for s in seen]), torch.tensor(hand) / 1000)
    # the sampler: Euler steps with the exact t, the velocity of the quantised t (through the un-quantised adapter)
    x = x1.clone()
    with torch.no_grad():
        for k in range(16):
            x = x + (grid[k + 1] - grid[k]) * exact.velocity(x, torch.full((2,), hand[k]) / 1000, cond)
        plain = sampling.rollout(lambda x, t: exact.velocity(x, t, cond), x1, grid, "ode").final
    assert torch.equal(final, x)
    assert (plain - final).abs().max() > 1e-6  # quantising changes the samples
    sd3 = models.load_backbone(str(tiny["sd3.5"]), "cpu", resolution=RES, max_sequence_length=MSL,
                               quantize_timesteps=True)
    seen.clear()
    sd3.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].clone()), with_kwargs=True)
    t = sd3.sigmas(10)[:3]
    with torch.no_grad():
        sd3.velocity(torch.zeros(3, *sd3.latent_shape), t, sd3.encode(PROMPTS))
    assert torch.equal(seen[0], torch.floor(torch.cat([t, t]) * 1000)) and seen[0][1] == 960  # CFG: 2B, t = .9601


def test_vae_decodes_in_fp32_whatever_the_precision(tiny):
    """Flow-GRPO keeps the VAE fp32 so reward images are not half-precision decodes: with bf16 frozen weights the
    VAE is still the saved fp32 one (loaded as fp32, not rounded through bf16) and decodes as the fp32 pipeline."""
    half = models.load_backbone(str(tiny["flux-dev"]), "cpu", resolution=RES, max_sequence_length=MSL,
                                dtype=torch.bfloat16)
    full = _load(tiny, "flux-dev")
    assert half.dtype == torch.bfloat16 and half.vae.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for m in half.text_encoders for p in m.parameters())
    ref = dict(full.vae.named_parameters())
    assert all(torch.equal(p, ref[n]) for n, p in half.vae.named_parameters())
    x = _noise(full)
    assert torch.equal(half.decode(x), full.decode(x))


def test_loading_the_pipelines_prints_no_warning(tiny):
    """A FLUX / SD3 run's first screen shows nothing that looks like a problem: transformers' notice that the
    pipelines' CLIP / Siglip image processors (IP-Adapter inputs, unused here) fall back to PIL without torchvision
    is filtered (models.py), and a pipeline built in memory in the run's dtype (gpu_check.py, bf16 on a GPU) is not
    cast again, a cast diffusers warns about ("should be kept in float32")."""
    code = ("import sys, torch; sys.path.insert(0, 'tests'); from flow_cps import hub, models; "
            "from tools import gpu_check; "
            f"models.load_backbone({str(tiny['sd3.5'])!r}, resolution=RES, max_sequence_length=MSL); "
            "pipe = gpu_check.stand_in_pipeline('flux-dev', tiny=True, dtype=torch.bfloat16, device='cpu'); "
            "bb = models.load_backbone(hub.register_pipeline('flux', pipe), resolution=RES, max_sequence_length=MSL, "
            "dtype=torch.bfloat16); print(bb.transformer.dtype)").replace("RES", str(RES)).replace("MSL", str(MSL))
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TRANSFORMERS_VERBOSITY": "warning"})
    assert p.returncode == 0 and p.stdout.strip() == "torch.bfloat16", p.stderr[-3000:]
    assert "torchvision" not in p.stderr and "float32" not in p.stderr, p.stderr
