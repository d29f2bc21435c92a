"""plan.py: every preset resolves, validates and plans on CPU (--dry_run) for the world sizes its batch arithmetic
allows; the memory estimate scales as documented; the documented parameter counts are those of the released configs;
a local folder plans like the loader reads it. No weights are loaded."""
import dataclasses
import json
from pathlib import Path

import pytest
import tiny_pipelines
import torch

import train
from flow_cps import config, models, plan

RES, STEPS = 32, 6


@pytest.fixture(scope="module")
def tiny():
    return tiny_pipelines.cached()


# world sizes each preset's batch arithmetic allows: the divisors of the images per iteration (groups may span GPUs)
DIVISORS_1152 = [1, 2, 3, 4, 6, 8, 9, 12, 16, 18, 24, 32, 36, 48, 64]  # 48 prompts x 24, Flow-GRPO's official 32 too
WORLD_SIZES = {"sd3.5-geneval": DIVISORS_1152, "sd3.5-ocr": DIVISORS_1152, "sd3.5-pickscore": DIVISORS_1152,
               "flux-dev-pickscore": DIVISORS_1152, "flux-schnell-pickscore": DIVISORS_1152,
               "flux-dev-hpsv2": [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]}  # 16 prompts x 12 = 192
# the training schedules at 512 px (SD3.5 10 steps, FLUX.1-dev 6), schnell's 4, DanceGRPO's 16 (docs/NOTES.md,
# "Schedules")
SIGMAS = {"sd3.5": [1, .9601, .9133, .8577, .7904, .7073, .6022, .4649, .2780, .0089, 0],
          "flux-dev": [1, .9037, .7897, .6525, .4842, .2730, 0], "flux-schnell": [1, .75, .5, .25, 0],
          "dance": [1, .9783, .9545, .9286, .9, .8684, .8333, .7941, .75, .7, .6429, .5769, .5, .4091, .3, .1667, 0]}


@pytest.mark.parametrize("preset", sorted(WORLD_SIZES))
def test_every_preset_plans_on_cpu_without_weights(preset, capsys):
    cfg = config.parse_config(["--preset", preset])
    assert plan.world_sizes(cfg) == WORLD_SIZES[preset]
    for world in WORLD_SIZES[preset]:
        p = train.main(["--preset", preset, "--dry_run", "true", "--dry_run_gpus", str(world)])["plan"]
        assert p["images_per_iteration"] == cfg.prompts_per_iter * cfg.group_size
        assert p["images_per_gpu"] * world == p["images_per_iteration"]
        mem = p["memory"]["gb"]
        assert 0 < mem["peak_checkpointing"] < mem["peak"]
    out = capsys.readouterr().out
    assert "per-GPU memory estimate" in out and "weights: model" in out  # and that they are not downloaded
    for term in ("gradient accumulation buffers", "rollout buffers", "evaluation, streamed", "VAE weights, fp32",
                 "host RAM per rank: prompt-embedding cache <= 8 GiB", "(sample, step) terms per GPU, flattened",
                 "AdamW step"):
        assert term in out, term
    assert f"{world} GPU(s); {cfg.precision};" in out  # each preset names its precision (fp16 / bf16)
    key = ("dance" if preset == "flux-dev-hpsv2" else "sd3.5" if preset.startswith("sd3.5") else
           "flux-schnell" if "schnell" in preset else "flux-dev")
    assert p["sigmas"] == pytest.approx(SIGMAS[key], abs=1e-4)
    assert p["trained_steps"] == {"dance": 9, "sd3.5": 9, "flux-dev": 5, "flux-schnell": 3}[key]
    bad = 32 if 32 not in WORLD_SIZES[preset] else 5
    with pytest.raises(SystemExit, match=r"world sizes this batch arithmetic supports: \[1, 2"):
        train.main(["--preset", preset, "--dry_run", "true", "--dry_run_gpus", str(bad)])


def test_memory_estimates_scale_as_documented():
    est = lambda *a: train.main(["--dry_run", "true", *a])["plan"]["memory"]  # noqa: E731
    flux8 = est("--preset", "flux-dev-pickscore", "--dry_run_gpus", "8")
    flux1 = est("--preset", "flux-dev-pickscore", "--dry_run_gpus", "1")
    assert flux8["params"] == 11_901_408_320 and flux8["trainable_params"] == 179_306_496  # r64, attn + ff + ff_context
    assert flux1["gb"]["weights"] > 5 * flux8["gb"]["weights"]  # FSDP2 shards the frozen bf16 weights (+2 blocks)
    assert flux8["gb"]["peak"] < 80  # the paper's 8-GPU layout fits an 80 GB card
    sd3 = est("--preset", "sd3.5-geneval")
    assert sd3["params"] == 2_243_171_520 and sd3["buffers"] == 384 * 384 * 1536  # + the positional-embedding table
    assert sd3["forward_batch"] == 18 and sd3["text_tokens"] == 77 + 128  # CFG doubles the micro-batch of 9
    off = est("--preset", "sd3.5-geneval", "--offload", "true")
    # the text encoders (T5-XXL: 9 GiB) then visit the GPU only between rollouts and training
    assert off["gb"]["peak"] < sd3["gb"]["peak"] - 9 and off["gb"]["text_encoders"] == sd3["gb"]["text_encoders"]
    dance = est("--preset", "flux-dev-hpsv2")
    assert dance["trainable_params"] == dance["params"] and dance["gb"]["trainable"] > 10  # full fine-tuning


def test_memory_estimate_counts_what_the_run_holds():
    """FSDP2 full fine-tuning: gradients stay sharded (policy.grad_sync), so what remains of the accumulation is the
    blocks being reduce-scattered, not the 44 GiB fp32 gradient of the whole model; FSDP2 LoRA keeps its unsharded
    fp32 gradients until the last micro-batch; DDP its buckets. Rollout buffers grow with the samples per GPU; the
    embedding cache is host RAM, bounded by --embedding_cache_gb."""
    est = lambda *a: train.main(["--dry_run", "true", *a])["plan"]["memory"]  # noqa: E731
    dance = est("--preset", "flux-dev-hpsv2", "--dry_run_gpus", "16")
    whole_grad = dance["params"] * 4 / plan.GB  # what the old accumulation held on every rank
    assert whole_grad > 44 and dance["gb"]["accumulation"] < whole_grad / 10
    assert dance["gb"]["trainable"] == pytest.approx(dance["params"] * 16 / 16 / plan.GB)  # no EMA (16-GPU script)
    flux = est("--preset", "flux-dev-pickscore", "--dry_run_gpus", "8")
    assert flux["gb"]["accumulation"] == pytest.approx(flux["trainable_params"] * 4 / plan.GB)
    sd3 = est("--preset", "sd3.5-geneval", "--dry_run_gpus", "8")
    assert sd3["gb"]["accumulation"] == pytest.approx(sd3["trainable_params"] * 4 / plan.GB)  # DDP buckets
    sd3_1 = est("--preset", "sd3.5-geneval", "--dry_run_gpus", "1")
    assert sd3_1["gb"]["rollout_buffers"] == pytest.approx(8 * sd3["gb"]["rollout_buffers"])  # 1152 vs 144 samples
    # 144 samples x (11 latents + x0_hat: 16 x 64 x 64 fp32; 205 x 4096 + 2048 fp16 embeddings; 3 x 512 x 512 fp32)
    assert sd3["gb"]["rollout_buffers"] == pytest.approx(
        144 * (12 * 16 * 64 * 64 * 4 + (205 * 4096 + 2048) * 2 + 3 * 512 * 512 * 4) / plan.GB)
    assert sd3["embedding_mib"] == pytest.approx((205 * 4096 + 2048) * 2 / 2 ** 20)
    small = est("--preset", "sd3.5-geneval", "--embedding_cache_gb", "0.5", "--dry_run_gpus", "8")
    assert small["gb"]["embedding_cache"] == 0.5 and small["gb"]["peak"] == sd3["gb"]["peak"]  # host RAM only
    fp32 = est("--preset", "sd3.5-geneval", "--precision", "fp32", "--dry_run_gpus", "8")
    assert fp32["gb"]["weights"] == pytest.approx(2 * sd3["gb"]["weights"])
    assert fp32["gb"]["vae"] == sd3["gb"]["vae"]  # the VAE is fp32 in every precision


def test_docs_memory_and_balance_tables_are_the_dry_runs():
    """docs/SCALE.md's memory table is `python -m flow_cps.plan`'s output and its padding table `python -m
    flow_cps.plan balance`'s (regenerate them with those commands)."""
    doc = (Path(__file__).resolve().parent.parent / "docs/SCALE.md").read_text()
    assert plan.memory_table() in doc
    assert plan.balance_table() in doc


def test_flow_grpo_prompt_folders_plan_for_the_presets(tmp_path, capsys):
    """The paper's prompt sets are Flow-GRPO's dataset/ocr (train.txt, test.txt: prompts with the text in quotes)
    and dataset/geneval (train_metadata.jsonl, test_metadata.jsonl: GenEval metadata rows); --prompts FOLDER
    takes them (these rows are written here in the same layout)."""
    ocr = tmp_path / "ocr"
    ocr.mkdir()
    (ocr / "train.txt").write_text('A sign that reads "Open Late" above a door\nA mug printed with "Hello"\n')
    (ocr / "test.txt").write_text('A poster titled "Summer Sale" in bold letters\n')
    gen = tmp_path / "geneval"
    gen.mkdir()
    row = lambda tag, prompt, inc: json.dumps(dict(tag=tag, include=inc, prompt=prompt))  # noqa: E731
    (gen / "train_metadata.jsonl").write_text("\n".join([
        row("counting", "a photo of three cups", [{"class": "cup", "count": 3}]),
        row("position", "a photo of a cat left of a dog", [{"class": "dog", "count": 1},
                                                          {"class": "cat", "count": 1, "position": ["left of", 0]}])]))
    (gen / "test_metadata.jsonl").write_text(row("colors", "a photo of a red car",
                                                 [{"class": "car", "count": 1, "color": "red"}]) + "\n")
    for preset, folder, counts in (("sd3.5-ocr", ocr, "2 train / 1 held-out"),
                                   ("sd3.5-geneval", gen, "2 train / 1 held-out")):
        train.main(["--preset", preset, "--prompts", str(folder), "--dry_run", "true"])
        out = capsys.readouterr().out
        assert f"prompts: {counts}" in out and "not the paper's" not in out
        train.main(["--preset", preset, "--dry_run", "true"])  # the generated stand-in says so, with the flag
        note = [x for x in capsys.readouterr().out.splitlines() if "not the paper's" in x]
        assert len(note) == 1 and f"--prompts flow_grpo/dataset/{folder.name}" in note[0], note
    train.main(["--prompts", "geneval", "--dry_run", "true"])  # not a paper preset: nothing to say
    assert "not the paper's" not in capsys.readouterr().out


def test_a_paper_preset_on_generated_prompts_says_so_in_its_config(tiny, tmp_path):
    """The run's config.json (and its first screen, `plan.describe`) carries the same line as the dry run."""
    out = tmp_path / "run"
    train.main(["--preset", "sd3.5-ocr", "--model", str(tiny["sd3.5"]), "--precision", "fp32", "--device", "cpu",
                "--resolution", "32", "--max_sequence_length", "16", "--reward", "clean_background",
                "--eval_metrics", "clean_background", "--iterations", "1", "--eval_prompts", "1",
                "--prompts_per_iter", "1", "--group_size", "2", "--micro_batch", "4", "--updates_per_iter", "1",
                "--num_steps", "2", "--eval_steps", "2", "--report_to", "none", "--output_dir", str(out)])
    saved = json.loads((out / "config.json").read_text())
    assert saved["prompt_set"] == plan.prompt_note(config.parse_config(["--preset", "sd3.5-ocr"]))
    assert "--prompts flow_grpo/dataset/ocr" in saved["prompt_set"]


def test_documented_parameter_counts_match_the_released_configs():
    """KNOWN_MODELS' component sizes (used by --dry_run without weights) from the released configs, on meta."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                                     feed_forward_proj="gated-gelu", relative_attention_num_buckets=32))
        clip_l = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                      vocab_size=49408, max_position_embeddings=77, projection_dim=768)
        clip_g = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                      vocab_size=49408, max_position_embeddings=77, projection_dim=1280)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                            use_quant_conv=False, use_post_quant_conv=False)
        n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        counts = {"T5-XXL": n(t5), "CLIP-L": n(CLIPTextModel(CLIPTextConfig(**clip_l))),
                  "CLIP-L+proj": n(CLIPTextModelWithProjection(CLIPTextConfig(**clip_l))),
                  "CLIP-G": n(CLIPTextModelWithProjection(CLIPTextConfig(**clip_g))), "VAE": n(vae)}
    flux, sd3 = (plan.KNOWN_MODELS[k] for k in ("black-forest-labs/FLUX.1-dev",
                                                  "stabilityai/stable-diffusion-3.5-medium"))
    assert flux["encoders"] == {"text_encoder (CLIP-L)": counts["CLIP-L"], "text_encoder_2 (T5-XXL)": counts["T5-XXL"]}
    assert sd3["encoders"] == {"text_encoder (CLIP-L)": counts["CLIP-L+proj"], "text_encoder_2 (CLIP-G)":
                               counts["CLIP-G"], "text_encoder_3 (T5-XXL)": counts["T5-XXL"]}
    assert flux["vae"] == sd3["vae"] == counts["VAE"]


def test_dry_run_reads_a_local_folder_like_the_loader(tiny, capsys):
    p = train.main(["--dry_run", "true", "--model", str(tiny["flux-dev"]), "--resolution", str(RES),
                       "--num_steps", str(STEPS)])["plan"]
    bb = models.load_backbone(str(tiny["flux-dev"]), "cpu", resolution=RES)
    assert p["kind"] == "flux" and p["guidance"] == 3.5
    assert p["sigmas"] == pytest.approx(bb.sigmas(STEPS).tolist(), abs=1e-4)
    assert "weights: available" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="must be a multiple of 8"):
        train.main(["--dry_run", "true", "--model", str(tiny["flux-dev"]), "--resolution", "36"])


def test_presets_state_their_precision_and_dance_follows_one_script(capsys):
    """SD3.5 presets run Flow-GRPO's fp16 mixed precision, FLUX bf16; --precision is validated. flux-dev-hpsv2
    follows DanceGRPO's 16-GPU script throughout (scripts/finetune/finetune_flux_grpo.sh): one prompt per GPU on 16,
    4 samples per update (3 updates of a GPU's 12), max_grad_norm 1.0, no EMA, checkpoints every 40 steps, and the
    transformer gets int(1000 t)/1000."""
    for name in config.PRESETS:
        cfg = config.parse_config(["--preset", name])
        builtin = config.PRESETS[name].get("model", "digits") in models.BUILT_IN  # the CPU models: fp32
        want = "auto" if builtin else "fp16" if name.startswith("sd3.5") else "bf16"
        assert cfg.precision == want, name
    for bad in ("fp8", "half"):
        with pytest.raises(SystemExit, match=f"argument --precision: invalid choice: '{bad}'"):
            train.main(["--preset", "sd3.5-ocr", "--precision", bad, "--dry_run", "true"])
    train.main(["--preset", "sd3.5-ocr", "--precision", "fp32", "--dry_run", "true"])
    assert "32 GPU(s); fp32;" in capsys.readouterr().out  # Flow-GRPO's official GPU count
    dance = config.parse_config(["--preset", "flux-dev-hpsv2"])
    b = plan.batch(dance, 16)
    assert (b.samples_per_rank, b.group_span, b.updates, b.forwards_per_update(9)) == (12, 1, 3, 36)
    assert (dance.max_grad_norm, dance.ema_decay, dance.lr, dance.checkpoint_every, dance.iterations) == \
        (1.0, 0.0, 1e-5, 40, 300)
    assert dance.quantize_timesteps and dance.lora_rank == 0 and dance.micro_batch == 1 and dance.precision == "bf16"


def _algorithm(out: str) -> dict[str, str]:
    """The plan's algorithm block: {'sampler': 'sampler: Flow-CPS ...', ...}."""
    block = out.split("  the algorithm")[1].split("\n  schedule")[0].splitlines()[1:]
    return {line.strip().split(":")[0]: line.strip() for line in block}


def test_the_plan_states_the_algorithm(capsys):
    """The dry run names the algorithm's choices in the paper's words: the Flow-GRPO baseline (--sampler flow_sde on
    the CPS preset) differs from the CPS run in the sampler, its log-prob and the KL form, and in nothing else."""
    plans = {}
    for name, argv in (("cps", []), ("flow_grpo", ["--sampler", "flow_sde"])):
        train.main(["--preset", "sd3.5-geneval", "--dry_run", "true", *argv])
        plans[name] = _algorithm(capsys.readouterr().out)
    cps, base = plans["cps"], plans["flow_grpo"]
    assert cps["sampler"].startswith("sampler: Flow-CPS (Eq. 12): x_t' = (1 - t') x0_hat + t' cos(eta pi/2) x1_hat")
    assert base["sampler"].startswith("sampler: Flow-SDE, Flow-GRPO's sampler (Eq. 9)")
    assert "eta 0.7;" in cps["sampler"] and "eta 0.7;" in base["sampler"]
    assert cps["log-prob"].startswith("log-prob: Eq. 14") and base["log-prob"].startswith("log-prob: Eq. 13")
    assert cps["loss"].endswith("KL: beta 0.04 x FlowCPS's mean (mu - mu_ref)^2, to the LoRA-off reference")
    assert base["loss"].endswith("KL: beta 0.04 x Flow-GRPO's mean (mu - mu_ref)^2 / (2 sigma_t^2), to the LoRA-off "
                                 "reference")
    assert {k for k in cps if cps[k] != base[k]} == {"sampler", "log-prob", "loss"}
    assert cps["advantage"] == ("advantage: Flow-GRPO's (r - group mean) / (std of the whole batch + 1e-4), clipped "
                                "to +-5; samples with advantage 0 are skipped")
    assert cps["trained steps"] == "trained steps: the first 9 of the 10 steps, in order (Flow-GRPO, fraction 0.99)"
    assert cps["EMA"] == ("EMA: e <- e + (1 - d)(w - e), 2 updates (Flow-GRPO's training batches per optimizer step, "
                          "its 32 GPUs') at the optimizer steps s with (s + 1) % 8 == 0, d = the warm-up decay "
                          "min((1 + s)/(10 + s), 0.9)")
    assert cps["precision"].startswith("precision: fp16: fp16 frozen weights under fp16 autocast with dynamic loss")
    for gpus in ("8", "64"):  # the algorithm, the EMA's schedule included, does not depend on the GPU count
        train.main(["--preset", "sd3.5-geneval", "--dry_run", "true", "--dry_run_gpus", gpus])
        assert _algorithm(capsys.readouterr().out) == cps, gpus
    train.main(["--preset", "flux-dev-hpsv2", "--dry_run", "true"])  # DanceGRPO's recipe reads as DanceGRPO's
    dance = _algorithm(capsys.readouterr().out)
    assert "a random 9 of the stochastic steps before the last, per sample (DanceGRPO" in dance["trained steps"]
    assert "DanceGRPO's (r - group mean) / (unbiased std of the group" in dance["advantage"]
    assert dance["EMA"] == "EMA: none: evaluation and exports use the live weights" and "KL: none" in dance["loss"]
    assert "every transformer weight (full fine-tuning)" in dance["optimizer"]
    train.main(["--dry_run", "true", "--device", "cpu", "--dry_run_gpus", "2"])  # a CPU run's ranks are processes
    out = capsys.readouterr().out
    assert "batch on 2 processes: " in out and "32 images per process (each group on one process)" in out
    assert "GPU" not in out
    assert _algorithm(out)["precision"] == "precision: fp32: fp32 throughout"


def test_every_declared_choice_has_its_words():
    declared = {f.name: set(f.metadata["choices"]) - {"", "auto"} for f in dataclasses.fields(config.Config)
                if "choices" in f.metadata}
    assert {name: set(words) for name, words in plan.WORDS.items()} == {name: declared[name] for name in plan.WORDS}
def test_offload_states_its_cost(capsys):
    """--offload moves whole encoders through pageable host memory: the plan says how much and how long."""
    train.main(["--preset", "flux-dev-pickscore", "--offload", "true", "--dry_run", "true"])
    line = [x for x in capsys.readouterr().out.splitlines() if "offload costs" in x]
    assert len(line) == 1 and "the text encoders (9.1 GiB) go to the GPU and back" in line[0], line
    train.main(["--preset", "flux-dev-pickscore", "--dry_run", "true"])
    assert "offload costs" not in capsys.readouterr().out
