"""config.py and the checks before any work: every bad flag stops the run with one line that names the problem and
writes nothing; unknown flags get a suggestion; presets and booleans resolve."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grpo
import sampling
import train
from flow_cps import config, distributed, logs, lora, policy, precision, prompts

ROOT = Path(__file__).resolve().parent.parent
SHORT = ["--iterations", "1", "--eval_per_prompt", "1", "--report_to", "none"]


@pytest.mark.parametrize("argv,message", [
    (["--group_size", "1"], "group_size must be >= 2"),
    (["--sampler", "cps", "--eta", "1.5"], "CPS needs eta in [0, 1]"),
    (["--sampler", "euler_maruyama"], "argument --sampler: invalid choice: 'euler_maruyama' (choose from"),
    (["--sampler", "ode"], "no density"),
    (["--advantage", "ppo"], "argument --advantage: invalid choice: 'ppo'"),
    (["--kl_form", "reverse"], "argument --kl_form: invalid choice: 'reverse'"),
    (["--precision", "fp8"], "invalid choice: 'fp8' (choose from 'auto', 'bf16', 'fp16', 'fp32')"),
    (["--micro_batch", "0"], "micro_batch must be >= 1"),
    (["--updates_per_iter", "0"], "updates_per_iter must be >= 1"),
    (["--prompts_per_iter", "0"], "prompts_per_iter must be >= 1"),
    (["--eval_per_prompt", "0"], "eval_per_prompt must be >= 1"),
    (["--keep_checkpoints", "-1"], "keep_checkpoints must be >= 1"),
    (["--keep_checkpoints", "0"], "keep_checkpoints must be >= 1"),
    (["--seed", "-1"], "seed must be >= 0"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--max_grad_norm", "nan"], "max_grad_norm must be a finite number"),
    (["--adv_clip", "nan"], "adv_clip must be a finite number"),
    (["--updates_per_iter", "3"], "divisible by updates_per_iter"),
    (["--ema_interval", "0"], "ema_interval and ema_updates_per_step must be >= 1"),
    (["--ema_updates_per_step", "0"], "ema_interval and ema_updates_per_step must be >= 1"),
    (["--sde_window", "2", "--sde_window_range", "abc"], "sde_window_range must be 'lo,hi'"),
    (["--sde_window", "4", "--sde_window_range", "0,3"], "does not fit"),
    (["--reward", "aesthetic"], "unknown reward 'aesthetic'"),
    (["--reward", "digit_judge:heavy"], "is not a number"),
    (["--reward_options", "not json"], "--reward_options is not valid JSON"),
    (["--reward_options", '{"digit_judge": 5}'], "--reward_options: the value for 'digit_judge' must be a JSON object"),
    (["--reward_options", '{"pickscore": {}}'], "has options for 'pickscore', which this run does not use"),
    (["--reward_options", '{"digit_judge": {"sharpness": 2}}'], "sharpness"),
    (["--lora_targets", "foo"], "--lora_targets foo: no linear layer of this transformer has that name"),
    (["--guidance", "3.5"], "the digits model has no guidance embedding"),
    (["--resolution", "12"], "digits models exist at sizes"),
    (["--learning_rate", "1e-3"], "unknown option: --learning_rate"),
    (["--micro_batch", "abc"], "argument --micro_batch: invalid int value"),
    # round 2: flags that used to pass validation and then fail or do nothing
    (["--eta", "0"], "--sampler cps with eta 0.0 adds no noise on any step"),
    (["--sampler", "flow_sde", "--eta", "0"], "adds no noise on any step"),
    (["--sampler", "cpws"], "--sampler cpws cannot take step 8 (t 0.2000 -> 0.1000) of a rollout"),
    (["--device", "foo"], "argument --device: invalid choice: 'foo' (choose from 'auto', 'cpu', 'cuda')"),
    (["--device", "cuda:3"], "argument --device: invalid choice: 'cuda:3'"),  # --help: CUDA_VISIBLE_DEVICES
    (["--collective_timeout", "0"], "collective_timeout must be > 0"),
    (["--reward", "jpeg_compressibility", "--reward_options", '{"jpeg_compressibility": {"quality": 101}}'],
     "jpeg_compressibility's quality must be a whole number in [0, 100] (got 101)"),
    (["--reward", "pickscore", "--reward_options", '{"pickscore": {"batch_size": 0}}'],
     "pickscore's batch_size must be a whole number >= 1 (got 0)"),
    (["--reward", "pickscore", "--reward_options", '{"pickscore": {"dtype": "float8"}}'],
     "pickscore's dtype must be one of float32, float16, bfloat16"),
    (["--reward", "geneval_partial", "--reward_options", '{"geneval_partial": {"threshold": 3}}'],
     "geneval_partial's threshold must be a number in [0, 1] (got 3)"),
])
def test_bad_flags_stop_with_one_line_and_write_nothing(argv, message, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main([*SHORT, *argv, "--output_dir", str(out)])
    text = str(e.value.code)
    assert message in text and "\n" not in text, text
    assert not out.exists()


def test_bad_paths_stop_with_one_line_and_write_nothing(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        train.main([*SHORT, "--output_dir", str(a_file)])
    assert a_file.read_text() == "mine"
    with pytest.raises(SystemExit, match="cannot write into /proc"):  # root may write anywhere but there
        train.main([*SHORT, "--output_dir", "/proc/flow_cps_run"])
    cats = tmp_path / "cats.txt"
    cats.write_text("\n".join(f"a photo of cat number {i}" for i in range(40)) + "\n")
    with pytest.raises(SystemExit, match="names no digit"):  # the digits model reads only digits
        train.main([*SHORT, "--prompts", str(cats), "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit, match="prompt error: --eval_prompt_file .*missing.txt: no such file"):
        train.main([*SHORT, "--eval_prompt_file", str(tmp_path / "missing.txt"), "--output_dir", str(tmp_path / "r")])


def test_bad_prompt_files_stop_with_one_line_and_write_nothing(tmp_path, monkeypatch):
    counting = tmp_path / "geneval.jsonl"  # GenEval metadata whose count would divide by zero in every score
    counting.write_text("\n".join(json.dumps({"prompt": f"a photo of {w} clocks", "tag": "counting",
                                              "include": [{"class": "clock", "count": n}]})
                                  for w, n in (("two", 2), ("zero", 0))) + "\n")
    with pytest.raises(SystemExit) as e:
        train.main([*SHORT, "--prompts", str(counting), "--output_dir", str(tmp_path / "run")])
    assert str(e.value) == (f"prompt error: {counting}:2: GenEval metadata: include[0]: 'count' must be a whole "
                            "number >= 1 (got 0)")
    monkeypatch.setattr(prompts, "MAX_FILE_BYTES", 100)  # a file far larger than any prompt set
    big = tmp_path / "big.txt"
    big.write_text("a handwritten digit 7\n" * 10)
    with pytest.raises(SystemExit, match=r"big.txt is 0 MiB; prompt files are read whole on every rank and capped"):
        train.main([*SHORT, "--prompts", str(big), "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_cpws_trains_when_its_window_avoids_the_last_steps(tmp_path):
    """Flow-CPWS is undefined at t' = 0: refused up front on every step a rollout can draw (see the bad flags
    above); with an SDE window in the first half it trains."""
    res = train.main([*SHORT, "--sampler", "cpws", "--eta", "0.5", "--sde_window", "2", "--prompts_per_iter", "2",
                      "--group_size", "4", "--output_dir", str(tmp_path / "run")])
    assert res["history"][-1]["iteration"] == 1 and res["history"][-1]["kept"] > 0


def test_a_bad_flag_exits_nonzero_with_one_line_on_stderr(tmp_path):
    p = subprocess.run([sys.executable, "train.py", "--micro_batch", "0", "--output_dir", str(tmp_path / "r")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stderr.strip() == "config error: micro_batch must be >= 1 (got 0)"
    assert not (tmp_path / "r").exists()


def test_unknown_flags_get_a_suggestion():
    with pytest.raises(SystemExit, match=r"unknown option: --group-size \(did you mean --group_size\?\)"):
        config.parse_config(["--group-size", "4"])
    with pytest.raises(SystemExit, match=r"unknown option: --lrr \(did you mean --lr"):
        config.parse_config(["--lrr=3"])
    with pytest.raises(SystemExit, match="unknown preset 'sdxl'"):
        config.parse_config(["--preset", "sdxl"])


def test_each_choice_is_declared_once_and_shared():
    """A flag with a fixed set of values takes them from one declaration: the registry the code looks the value up
    in gives argparse its choices, and validate checks a Config built in code against the same list."""
    registries = {"sampler": sampling.SAMPLERS, "log_prob": {"": None, **sampling.LOG_PROBS},
                  "advantage": grpo.ADVANTAGES, "kl_form": {"": None, **grpo.KL_FORMS}, "timesteps": grpo.TIMESTEPS,
                  "parallel": policy.PARALLEL, "precision": ("auto", *precision.PRECISIONS),
                  "reward_image": ("final", "x0_hat"), "eval_split": ("test", "fresh"), "report_to": logs.REPORT_TO,
                  "device": distributed.DEVICES}
    declared = {f.name: f.metadata["choices"] for f in dataclasses.fields(config.Config) if "choices" in f.metadata}
    assert declared == {k: tuple(v) for k, v in registries.items()}
    for name in declared:
        with pytest.raises(SystemExit, match=f"argument --{name}: invalid choice: 'nope'"):
            config.parse_config([f"--{name}", "nope"])
        with pytest.raises(SystemExit, match=rf"config error: {name} must be one of .* \(got 'nope'\)"):
            config.validate(dataclasses.replace(config.Config(), **{name: "nope"}))
    cfg = config.parse_config(["--sampler", "flow_sde"])  # empty log_prob / kl_form: the sampler's own
    assert (cfg.log_prob_used, cfg.kl_form_used) == ("gaussian", "flow_grpo")
    assert config.Config().lora == lora.LoRA(8, 16.0, tuple(config.ATTENTION_TARGETS))
    assert config.parse_config(["--lora_rank", "0", "--beta", "0"]).lora is None  # full fine-tuning


def test_bool_flags_and_presets_resolve():
    cfg = config.parse_config(["--drop_zero_adv", "false", "--eta", "0.3"])
    assert cfg.drop_zero_adv is False and cfg.eta == 0.3 and cfg.preset == "tiny"
    assert config.parse_config([]) == config.Config()
    flux = config.parse_config(["--preset", "flux-dev-pickscore", "--eta", "0.5"])
    assert flux.eta == 0.5 and flux.lora_rank == 64 and (flux.ema_interval, flux.ema_warmup) == (8, True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a host with CUDA")
def test_device_cuda_on_a_cpu_only_host_is_a_config_error_before_set_up(tmp_path):
    """The device is checked with the other flags, before the process group and the device are set up (set-up ran
    first and crashed in torch.cuda.set_device)."""
    with pytest.raises(SystemExit, match=r"^config error: device 'cuda' requested but CUDA is not available"):
        train.main([*SHORT, "--device", "cuda", "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
