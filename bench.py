"""Measured, side by side: what CPS changes at the scale this project can run, and what each phase costs.

    python bench.py                 # the full report (~45 min on 2 CPU cores) -> results/report.md + figures
    python bench.py --quick         # the same sections, tiny budgets (~2 min), for CI and smoke tests
    python bench.py --only cost     # one section: cost, split, scaling, convergence, noise, factors

Sections (numbers are ratios or paired differences measured in one run, because shared machines are noisy):
  1. cost         rollout time of each SDE sampler / ODE on the same model, batch and steps (min/median/max)
  2. split        where a GRPO iteration goes (rollout / decode / reward / train fwd+bwd / optimizer / eval / log+ckpt)
  3. scaling      images per second with 1 and 2 torchrun processes at the same per-process batch
  4. convergence  held-out ODE judge accuracy vs iteration and wall clock: CPS and Flow-SDE over an eta sweep,
                  Dance-SDE, >= 3 seeds, paired tests, iterations to threshold, train-vs-eval gap, App. D ablation
  5. noise        residual noise of the final training samples per sampler and eta, base and trained model
  6. factors      one factor at a time: noise-sensitive reward, 16x16 images, shift-3 schedule, matched noise
Training runs are cached per configuration under <out>/runs/*.json, so an interrupted report resumes.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

import digits
import logs
import models
import rewards
import sampling
import train

ROOT = Path(__file__).resolve().parent
SDE_SAMPLERS = ["cps", "flow_sde", "dance_sde"]
NAMES = {"cps": "CPS", "flow_sde": "Flow-SDE", "dance_sde": "Dance-SDE"}


# -- budgets -------------------------------------------------------------------------------------------------------
def budget(quick: bool) -> dict:
    if quick:
        return dict(repeats=3, seeds=[0], iterations=4, eval_every=2, eval_per_prompt=4, etas={"cps": [0.7],
                    "flow_sde": [0.7], "dance_sde": [0.7]}, ablation=False, factors=["baseline", "matched_noise"],
                    scaling_iters=3, split_iters=3, noise_samples=40)
    return dict(repeats=7, seeds=[0, 1, 2], iterations=40, eval_every=10, eval_per_prompt=20,
                etas={"cps": [0.3, 0.5, 0.7, 0.9], "flow_sde": [0.3, 0.5, 0.7, 0.9], "dance_sde": [0.3, 0.7]},
                ablation=True, factors=["baseline", "noise_reward", "matched_noise", "shift3", "image16"],
                scaling_iters=8, split_iters=10, noise_samples=200)


# Per-run GRPO settings of the comparison: smaller than the default (64 samples/iteration, one process) so that the
# 60+ runs fit the budget; the same for every sampler.
RUN_ARGS = ["--prompts_per_iter", "8", "--group_size", "8", "--micro_batch", "32", "--updates_per_iter", "2",
            "--tensorboard", "false", "--checkpoint_every", "100000"]


def quiet(fn, *args, **kwargs):
    """Run fn with stdout/stderr captured (training prints a progress bar and a line per iteration)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        return fn(*args, **kwargs)


def spread(xs) -> dict:
    xs = [float(x) for x in xs]
    return dict(min=min(xs), median=statistics.median(xs), max=max(xs))


# -- 1. sampler cost -----------------------------------------------------------------------------------------------
@torch.no_grad()
def section_cost(b: dict) -> dict:
    bb = models.load_digits_backbone()
    prompts = digits.prompts("train")[:32] * 2
    cond = bb.encode(prompts)
    grid = bb.sigmas(10)
    x1 = torch.randn(len(prompts), *bb.latent_shape, generator=torch.Generator().manual_seed(0))
    v = lambda x, t: bb.velocity(x, t, cond)  # noqa: E731
    times = {s: [] for s in ["ode", *SDE_SAMPLERS]}
    for _ in range(b["repeats"] + 1):  # interleaved repeats: machine noise hits all samplers alike
        for s in times:
            t0 = time.perf_counter()
            sampling.rollout(v, x1, grid, s, 0.7 if s != "ode" else 0.0, torch.Generator().manual_seed(1))
            times[s].append(time.perf_counter() - t0)
    times = {s: t[1:] for s, t in times.items()}  # the first round warms up
    ratios = {s: spread([a / o for a, o in zip(times[s], times["ode"])]) for s in SDE_SAMPLERS}
    # the sampler math alone, on the same shapes (no model): what the SDE adds per step
    x, vv = torch.randn_like(x1), torch.randn_like(x1)
    math_us = {}
    for s in ["ode", *SDE_SAMPLERS]:
        fn = sampling.get_sampler(s)
        t0 = time.perf_counter()
        for _ in range(200):
            mean, std = fn(x, vv, 0.6, 0.5, 0.7)
            if s != "ode":
                sampling.cps_log_prob(mean + std * torch.randn_like(mean), mean, std)
        math_us[s] = (time.perf_counter() - t0) / 200 * 1e6
    return dict(batch=len(prompts), steps=10, seconds={s: spread(t) for s, t in times.items()}, ratio_vs_ode=ratios,
                step_math_us=math_us)


# -- training runs (sections 2, 4, 5, 6) -------------------------------------------------------------------------
def _residual_noise(policy, sampler: str, eta: float, n: int, log_prob: str = "", model_kwargs=None) -> dict:
    """Final training samples of this policy: residual noise std(final - x0_hat of the last step) in latent units
    (0 for a coefficients-preserving sampler: its last step returns x0_hat) and the clean_background reward."""
    bb = policy.backbone
    prompts = (digits.prompts("train") * n)[:n]
    gens = train.generators([(999, i) for i in range(n)])
    step = sampling.SAMPLERS[sampler]
    with torch.no_grad():
        traj, _ = train.rollout(bb, prompts, gens, gens, grid=bb.sigmas(10), step=step, eta=eta, window=None,
                                log_prob=sampling.LOG_PROBS[log_prob or sampling.DEFAULT_LOG_PROB[sampler]],
                                micro_batch=50, device="cpu")
        images = bb.decode(traj.final)
    residual = (traj.final - traj.x0_hat).flatten(1).std(1)
    cb = rewards.REGISTRY["clean_background"]()(images, prompts)
    return dict(residual=float(residual.mean()), clean_background=float(cb.mean()), images=images[:20])


def run_training(job: dict) -> dict:
    """One GRPO run in this process (1 thread), returning its history and the noise of its final samples."""
    torch.set_num_threads(1)
    cache = Path(job["cache"])
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached["argv"] == job["argv"]:  # a changed budget or setting retrains
            return cached
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = quiet(train.main, [*job["argv"], "--output_dir", str(Path(tmp) / "run")])
        wall = time.perf_counter() - t0
    hist = out["history"]
    res = dict(name=job["name"], argv=job["argv"], wall=wall, history=hist)
    if job.get("noise"):
        cfg_sampler, eta = job["sampler"], job["eta"]
        noise = _residual_noise(out["policy"], cfg_sampler, eta, job["noise"], job.get("log_prob", ""))
        noise.pop("images")
        res["noise_trained"] = noise
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(res))
    return res


def _jobs_convergence(b: dict, out: Path) -> list[dict]:
    jobs = []
    common = [*RUN_ARGS, "--iterations", str(b["iterations"]), "--eval_every", str(b["eval_every"]),
              "--eval_per_prompt", str(b["eval_per_prompt"])]
    for sampler, etas in b["etas"].items():
        for eta in etas:
            for seed in b["seeds"]:
                extra = ["--advantage", "dance", "--timesteps", "random", "--timestep_fraction", "0.6"] \
                    if sampler == "dance_sde" else []
                jobs.append(dict(name=f"conv/{sampler}/eta{eta}/seed{seed}", sampler=sampler, eta=eta, seed=seed,
                                 argv=[*common, "--sampler", sampler, "--eta", str(eta), "--seed", str(seed), *extra],
                                 noise=b["noise_samples"]))
    if b["ablation"]:  # Appendix D: each sampler with the other log-prob
        for sampler, lp in (("cps", "gaussian"), ("flow_sde", "cps")):
            for seed in b["seeds"]:
                jobs.append(dict(name=f"ablation/{sampler}/{lp}/seed{seed}", sampler=sampler, eta=0.7, seed=seed,
                                 log_prob=lp, argv=[*common, "--sampler", sampler, "--eta", "0.7", "--seed",
                                                    str(seed), "--log_prob", lp]))
    for j in jobs:
        j["cache"] = str(out / "runs" / (j["name"].replace("/", "_") + ".json"))
    return jobs


def matched_flow_sde_eta(cps_eta: float = 0.7, num_steps: int = 10) -> float:
    """The Flow-SDE eta that injects the same total fresh-noise variance sum_k std_k^2 over the 10-step uniform grid
    as CPS at `cps_eta` (equal eta means different noise for each sampler: PAPER.md §8 trap 13)."""
    from scipy.optimize import brentq

    grid = sampling.sigmas(num_steps)
    x = torch.zeros(1, 1)

    def injected(name, eta):
        return sum(float(sampling.get_sampler(name)(x, x, float(grid[k]), float(grid[k + 1]), eta)[1]) ** 2
                   for k in range(num_steps))
    target = injected("cps", cps_eta)
    return float(brentq(lambda e: injected("flow_sde", e) - target, 1e-3, 3.0))


def _jobs_factors(b: dict, out: Path) -> list[dict]:
    """CPS vs Flow-SDE at eta 0.7 with one factor changed at a time."""
    common = [*RUN_ARGS, "--iterations", str(b["iterations"]), "--eval_every", str(b["eval_every"]),
              "--eval_per_prompt", str(b["eval_per_prompt"])]
    variants = {"baseline": ([], {}), "noise_reward": (["--reward", "digit_judge:1,clean_background:1"], {}),
                "shift3": (["--shift", "3"], {}), "image16": (["--resolution", "16"], {}),
                "matched_noise": ([], {"flow_sde": matched_flow_sde_eta(0.7)})}
    jobs = []
    for factor in b["factors"]:
        extra, etas = variants[factor]
        for sampler in ("cps", "flow_sde"):
            eta = etas.get(sampler, 0.7)
            for seed in b["seeds"]:
                name = f"factor/{factor}/{sampler}/seed{seed}"
                if factor == "baseline" or (factor == "matched_noise" and sampler == "cps"):
                    name = f"conv/{sampler}/eta0.7/seed{seed}"  # the same run as the convergence section's
                jobs.append(dict(name=name, sampler=sampler, eta=eta, seed=seed, factor=factor,
                                 argv=[*common, "--sampler", sampler, "--eta", f"{eta:.6g}", "--seed", str(seed),
                                       *extra], noise=b["noise_samples"] if factor == "baseline" else 0))
    for j in jobs:
        j["cache"] = str(out / "runs" / (j["name"].replace("/", "_") + ".json"))
    return jobs


def run_jobs(jobs: list[dict], workers: int) -> dict[str, dict]:
    from tqdm.auto import tqdm

    unique: dict[str, dict] = {}
    for j in jobs:  # a run shared by two sections keeps the richest measurement request
        if j["name"] in unique:
            unique[j["name"]]["noise"] = max(unique[j["name"]].get("noise") or 0, j.get("noise") or 0)
        else:
            unique[j["name"]] = dict(j)
    results = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as ex:
        futures = {ex.submit(run_training, j): name for name, j in unique.items()}
        for f in tqdm(as_completed(futures), total=len(futures), desc="training runs"):
            results[futures[f]] = f.result()
    return results


# -- 2. where an iteration goes --------------------------------------------------------------------------------------
def section_split(b: dict) -> dict:
    """A default-size iteration (64 samples, 2 threads, one process) with forward hooks timing the transformer."""
    from diffusers import FluxTransformer2DModel

    spent = {"forward": 0.0}
    starts = []

    def pre(module, args, kwargs=None):
        if isinstance(module, FluxTransformer2DModel):
            starts.append(time.perf_counter())

    def post(module, args, output):
        if isinstance(module, FluxTransformer2DModel):
            spent["forward"] += time.perf_counter() - starts.pop()
    h1 = torch.nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = torch.nn.modules.module.register_module_forward_hook(post)
    torch.set_num_threads(2)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            out = quiet(train.main, ["--iterations", str(b["split_iters"]), "--eval_every", str(b["split_iters"]),
                                     "--checkpoint_every", str(b["split_iters"]), "--tensorboard", "true",
                                     "--output_dir", str(Path(tmp) / "run")])
            wall = time.perf_counter() - t0
    finally:
        h1.remove()
        h2.remove()
    rows = [h for h in out["history"] if h["iteration"] > 0]
    phases = ["rollout", "decode", "reward", "train", "optim", "eval", "log_checkpoint"]
    totals = {p: sum(r.get(f"time/{p}", 0.0) for r in rows) for p in phases}
    loop = sum(totals.values())
    # the base evaluation at iteration 0 also runs forwards; count only the loop's share
    return dict(iterations=len(rows), loop_seconds=loop, wall=wall, fractions={p: v / loop for p, v in totals.items()},
                per_iteration={p: v / len(rows) for p, v in totals.items()},
                transformer_forward_seconds=spent["forward"],
                transformer_share=(totals["train"] + min(spent["forward"], totals["rollout"] + totals["eval"]))
                / max(loop, 1e-9))


# -- 3. scaling --------------------------------------------------------------------------------------------------------
def section_scaling(b: dict) -> dict:
    """Images/s for 1 and 2 torchrun processes, each with 32 samples per iteration (same per-process batch)."""
    res = {}
    for n in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "train.py",
                   "--iterations", str(b["scaling_iters"]), "--eval_every", "100000", "--eval_per_prompt", "1",
                   "--prompts_per_iter", str(4 * n), "--group_size", "8", "--micro_batch", "16",
                   "--tensorboard", "false", "--checkpoint_every", "100000", "--output_dir", str(Path(tmp) / "r")]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // n))}
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
            if p.returncode:
                raise RuntimeError(f"scaling run failed:\n{p.stderr[-2000:]}")
            rows = [json.loads(x) for x in (Path(tmp) / "r" / "metrics.jsonl").read_text().splitlines()]
        steady = [r for r in rows if r["iteration"] > 1 and not any(k.startswith("eval/") for k in r)]
        per_iter = [sum(v for k, v in r.items() if k.startswith("time/")) for r in steady]
        res[n] = dict(processes=n, threads_per_process=max(1, 2 // n), images_per_iteration=32 * n,
                      iteration_seconds=spread(per_iter), images_per_second=32 * n / statistics.median(per_iter))
    res["speedup"] = res[2]["images_per_second"] / res[1]["images_per_second"]
    return res


# -- 5. noise of training samples on the base model -----------------------------------------------------------------
def section_noise_base(b: dict, out: Path) -> dict:
    class P:  # the base model behind the same interface as a trained policy
        backbone = models.load_digits_backbone()
    rows, grid = {}, []
    for sampler, etas in b["etas"].items():
        for eta in etas:
            r = _residual_noise(P, sampler, eta, b["noise_samples"])
            if eta == 0.7:
                grid.append(r["images"][:10])
            rows[f"{sampler}/{eta}"] = {k: v for k, v in r.items() if k != "images"}
    r = _residual_noise(P, "ode", 0.0, b["noise_samples"])
    grid.insert(0, r["images"][:10])
    rows["ode/0"] = {k: v for k, v in r.items() if k != "images"}
    logs.image_grid(torch.cat(grid), len(grid), out / "noise_samples_base.png", min_side=48)
    return rows


# -- analysis ------------------------------------------------------------------------------------------------------
METRIC = "eval/digit_judge_accuracy"


def final_eval(run: dict, key: str = METRIC) -> float:
    return [h[key] for h in run["history"] if key in h][-1]


def iterations_to(run: dict, threshold: float) -> float:
    hit = [h["iteration"] for h in run["history"] if h.get(METRIC, -1) >= threshold]
    return float(hit[0]) if hit else math.inf


def train_eval_gap(run: dict) -> float:
    """Mean training reward over the last quarter of iterations minus the final held-out ODE digit_judge."""
    rows = [h for h in run["history"] if "reward" in h]
    tail = rows[-max(1, len(rows) // 4):]
    return float(np.mean([h["reward"] for h in tail])) - final_eval(run, "eval/digit_judge")


def paired(a: list[float], b: list[float]) -> dict:
    from scipy import stats

    d = np.array(a) - np.array(b)
    p = float(stats.ttest_rel(a, b).pvalue) if len(a) > 1 and d.std() > 0 else float("nan")
    return dict(mean_diff=float(d.mean()), std_diff=float(d.std(ddof=1)) if len(d) > 1 else 0.0, p_value=p, n=len(d))


def analyse(results: dict[str, dict], b: dict) -> dict:
    groups: dict[tuple, list] = {}
    for name, r in results.items():
        parts = name.split("/")
        if parts[0] == "conv":
            groups.setdefault((parts[1], float(parts[2][3:])), []).append(r)
    base = [h for h in next(iter(results.values()))["history"] if h["iteration"] == 0][0][METRIC]
    threshold = round(base + 0.6 * (1 - base), 2)  # 60% of the way from the base model to perfect
    table = {}
    for (sampler, eta), runs in sorted(groups.items()):
        runs = sorted(runs, key=lambda r: r["name"])
        finals = [final_eval(r) for r in runs]
        its = [iterations_to(r, threshold) for r in runs]
        table[f"{sampler}/{eta}"] = dict(
            sampler=sampler, eta=eta, n=len(runs), final_mean=float(np.mean(finals)),
            final_std=float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0, finals=finals,
            iters_to_threshold=its, gap_mean=float(np.mean([train_eval_gap(r) for r in runs])),
            clean_background=float(np.mean([final_eval(r, "eval/clean_background") for r in runs])),
            train_residual=float(np.mean([r["noise_trained"]["residual"] for r in runs if "noise_trained" in r]))
            if any("noise_trained" in r for r in runs) else float("nan"),
            train_clean_background=float(np.mean([r["noise_trained"]["clean_background"] for r in runs
                                                  if "noise_trained" in r])) if runs[0].get("noise_trained") else
            float("nan"),
            wall_mean=float(np.mean([r["wall"] for r in runs])))
    tests = {}
    for eta in b["etas"]["cps"]:
        if ("cps", eta) in groups and ("flow_sde", eta) in groups:
            tests[f"cps-flow_sde/eta{eta}"] = paired(table[f"cps/{eta}"]["finals"], table[f"flow_sde/{eta}"]["finals"])
    best = {s: max((v for v in table.values() if v["sampler"] == s), key=lambda v: v["final_mean"])
            for s in {v["sampler"] for v in table.values()}}
    if "cps" in best and "flow_sde" in best:
        tests["best cps vs best flow_sde"] = paired(best["cps"]["finals"], best["flow_sde"]["finals"])
    if "cps" in best and "dance_sde" in best:
        tests["best cps vs best dance_sde"] = paired(best["cps"]["finals"], best["dance_sde"]["finals"])
    ablation = {}
    for name, r in results.items():
        if name.startswith("ablation/"):
            _, sampler, lp, _ = name.split("/")
            ablation.setdefault(f"{sampler} + {lp} log-prob", []).append(final_eval(r))
    factors = {}
    for name, r in results.items():
        if name.startswith("factor/"):
            _, factor, sampler, seed = name.split("/")
            factors.setdefault(factor, {}).setdefault(sampler, {})[seed] = r
    for sampler in ("cps", "flow_sde"):  # the baseline (and matched-noise CPS) runs are the convergence runs
        for r in groups.get((sampler, 0.7), []):
            factors.setdefault("baseline", {}).setdefault(sampler, {})[r["name"].split("/")[-1]] = r
            if sampler == "cps" and "matched_noise" in b["factors"]:
                factors.setdefault("matched_noise", {}).setdefault(sampler, {})[r["name"].split("/")[-1]] = r
    factor_rows = {}
    for factor, by in factors.items():
        if {"cps", "flow_sde"} <= by.keys():
            seeds = sorted(set(by["cps"]) & set(by["flow_sde"]))
            ev = {s: [final_eval(by[s][k]) for k in seeds] for s in ("cps", "flow_sde")}
            tr = {s: [float(np.mean([h["reward"] for h in by[s][k]["history"] if "reward" in h][-5:]))
                      for k in seeds] for s in ("cps", "flow_sde")}
            factor_rows[factor] = dict(eval=paired(ev["cps"], ev["flow_sde"]), train=paired(tr["cps"], tr["flow_sde"]),
                                       cps_eval=float(np.mean(ev["cps"])), flow_eval=float(np.mean(ev["flow_sde"])),
                                       cps_train=float(np.mean(tr["cps"])), flow_train=float(np.mean(tr["flow_sde"])),
                                       flow_eta=by["flow_sde"][seeds[0]]["argv"][by["flow_sde"][seeds[0]]["argv"]
                                                                                 .index("--eta") + 1])
    return dict(base=base, threshold=threshold, table=table, tests=tests, ablation={k: dict(mean=float(np.mean(v)),
                std=float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, n=len(v)) for k, v in ablation.items()},
                factors=factor_rows)


# -- figures and report ------------------------------------------------------------------------------------------
def plot_convergence(results: dict, analysis: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"cps": "tab:blue", "flow_sde": "tab:red", "dance_sde": "tab:green"}
    for row in analysis["table"].values():
        runs = [r for n, r in results.items() if n.startswith(f"conv/{row['sampler']}/eta{row['eta']}/")]
        its = [h["iteration"] for h in runs[0]["history"] if METRIC in h]
        vals = np.array([[h[METRIC] for h in r["history"] if METRIC in h] for r in runs])
        walls = np.mean([r["wall"] for r in runs]) * np.array(its) / max(its)
        style = dict(color=colours[row["sampler"]], alpha=0.35 + 0.65 * row["eta"], lw=1.5,
                     label=f"{NAMES[row['sampler']]} η={row['eta']}")
        axes[0].plot(its, vals.mean(0), marker="o", ms=3, **style)
        if len(runs) > 1:
            axes[0].fill_between(its, vals.mean(0) - vals.std(0), vals.mean(0) + vals.std(0),
                                 color=colours[row["sampler"]], alpha=0.08)
        axes[1].plot(walls, vals.mean(0), **style)
    axes[0].axhline(analysis["threshold"], color="k", ls=":", lw=1)
    axes[0].set(xlabel="iteration", ylabel="held-out judge accuracy (ODE)", title="convergence (mean ± std over seeds)")
    axes[1].set(xlabel="wall clock (s, 1 thread)", title="versus wall clock")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out / "convergence.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_split(split: dict, cost: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    f = split["fractions"]
    axes[0].barh(list(f), [100 * v for v in f.values()], color="tab:gray")
    axes[0].set(xlabel="% of the GRPO loop", title="where an iteration goes")
    r = cost["ratio_vs_ode"]
    axes[1].bar([NAMES[s] for s in r], [v["median"] for v in r.values()],
                yerr=[[v["median"] - v["min"] for v in r.values()], [v["max"] - v["median"] for v in r.values()]],
                color="tab:blue", capsize=4)
    axes[1].axhline(1, color="k", lw=1)
    axes[1].set(ylabel="rollout time / ODE rollout time", title="sampler cost (min/median/max)")
    fig.tight_layout()
    path = out / "cost_and_split.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fmt(x, nd=3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else (
        "never" if isinstance(x, float) and math.isinf(x) else f"{x:.{nd}f}")


def write_report(res: dict, out: Path, quick: bool, machine: str) -> Path:
    L = [f"# Flow-CPS benchmark report{' (quick mode: smoke-test budgets, not results)' if quick else ''}", "",
         f"Machine: {machine}. Command: `python bench.py{' --quick' if quick else ''}`. Wall time of this "
         f"invocation {res['wall'] / 60:.1f} min" + (f"; the {res['runs']['count']} training runs took "
         f"{res['runs']['seconds'] / 60:.0f} process-minutes on {res['runs']['workers']} workers (cached in runs/ "
         "and reused by later invocations)" if "runs" in res else "") + ".", ""]
    if "cost" in res:
        c = res["cost"]
        L += ["## 1. Sampler cost", "", f"Rollout of {c['batch']} samples × {c['steps']} steps on the built-in model; "
              "ratio to the ODE rollout, min / median / max over interleaved repeats.", "",
              "| sampler | ratio vs ODE (min / median / max) | sampler math per step (µs) |", "|---|---|---|"]
        for s, r in c["ratio_vs_ode"].items():
            L.append(f"| {NAMES[s]} | {r['min']:.3f} / {r['median']:.3f} / {r['max']:.3f} | "
                     f"{c['step_math_us'][s]:.0f} |")
        L += [f"| ODE | 1 | {c['step_math_us']['ode']:.0f} |", ""]
    if "split" in res:
        s = res["split"]
        L += ["## 2. Where an iteration goes", "", f"Default configuration (64 samples, 10 steps, 9 trained, one "
              f"process, 2 threads), {s['iterations']} iterations incl. one evaluation and one checkpoint.", "",
              "| phase | share of the loop | seconds per iteration |", "|---|---|---|"]
        for p, v in s["fractions"].items():
            L.append(f"| {p} | {100 * v:.1f}% | {s['per_iteration'][p]:.3f} |")
        L += ["", f"Time inside the transformer (forward hooks during rollout/eval, plus the training forward and "
              f"backward): **{100 * s['transformer_share']:.0f}%** of the loop.", ""]
    if "scaling" in res:
        sc = res["scaling"]
        L += ["## 3. Scaling", "", "`torchrun` on this machine, 32 samples per process per iteration, median over "
              "steady-state iterations (no evaluation).", "", "| processes | threads each | images / s |",
              "|---|---|---|"]
        for n in (1, 2):
            L.append(f"| {n} | {sc[n]['threads_per_process']} | {sc[n]['images_per_second']:.1f} |")
        L += ["", f"Speed-up 2 vs 1 process: **{sc['speedup']:.2f}×** (2 cores in total: this measures the "
              "data-parallel overhead, not more hardware). No GPU was available to this run.", ""]
    if "analysis" in res:
        a = res["analysis"]
        L += ["## 4. Convergence: the paper's claim", "",
              f"Held-out judge accuracy of deterministic ODE samples (EMA weights, fixed noises, 10 held-out "
              f"prompts × {res['budget']['eval_per_prompt']}) after {res['budget']['iterations']} GRPO iterations "
              f"(64 samples each), mean ± std over seeds {res['budget']['seeds']}; base model {a['base']:.3f}; "
              f"threshold for 'iterations to reach' = {a['threshold']:.2f}.", "",
              "| sampler | η | final accuracy | iterations to threshold (per seed) | train − eval reward gap | "
              "eval clean_background | residual noise of final training samples | run time (s) |",
              "|---|---|---|---|---|---|---|---|"]
        for row in a["table"].values():
            its = ", ".join(fmt(x, 0) for x in row["iters_to_threshold"])
            L.append(f"| {NAMES[row['sampler']]} | {row['eta']} | {row['final_mean']:.3f} ± {row['final_std']:.3f} | "
                     f"{its} | {row['gap_mean']:+.3f} | {row['clean_background']:.3f} | {fmt(row['train_residual'], 4)}"
                     f" | {row['wall_mean']:.0f} |")
        L += ["", "Paired tests (same seeds; difference of final accuracy, mean ± std, two-sided paired t-test):", "",
              "| comparison | difference | p | n |", "|---|---|---|---|"]
        for k, t in a["tests"].items():
            L.append(f"| {k} | {t['mean_diff']:+.3f} ± {t['std_diff']:.3f} | {fmt(t['p_value'])} | {t['n']} |")
        if a["ablation"]:
            L += ["", "Appendix D ablation (η = 0.7): each sampler trained with the other log-prob.", "",
                  "| run | final accuracy |", "|---|---|"]
            for k, v in a["ablation"].items():
                L.append(f"| {k} | {v['mean']:.3f} ± {v['std']:.3f} (n={v['n']}) |")
        L += ["", "![convergence](convergence.png)", ""]
    if "noise_base" in res:
        L += ["## 5. Noise in training samples", "", "Final samples of 10-step training rollouts on the **base** model "
              "(fixed prompts and noises). Residual = std(final latent − the last step's x0_hat): what the sampler "
              "leaves on top of the model's own clean prediction (exactly 0 for CPS by construction).", "",
              "| sampler | η | residual noise | clean_background |", "|---|---|---|---|"]
        for k, v in res["noise_base"].items():
            s, eta = k.split("/")
            L.append(f"| {NAMES.get(s, 'ODE')} | {eta} | {v['residual']:.4f} | {v['clean_background']:.3f} |")
        L += ["", "Rows: ODE, then each sampler at η = 0.7 (in the order of the table):", "",
              "![noise](noise_samples_base.png)", "",
              "The trained models' residual noise is in the convergence table (same estimate, after training).", ""]
    if "analysis" in res and res["analysis"]["factors"]:
        L += ["## 6. Where the claim holds, and why: one factor at a time", "",
              "CPS minus Flow-SDE (η = 0.7 unless stated), paired over seeds; held-out ODE accuracy and the training "
              "reward on stochastic rollouts (last 5 iterations).", "",
              "| factor | Flow-SDE η | CPS eval | Flow-SDE eval | Δ eval (p) | CPS train | Flow-SDE train "
              "| Δ train (p) |",
              "|---|---|---|---|---|---|---|---|"]
        for f, r in res["analysis"]["factors"].items():
            L.append(f"| {f} | {r['flow_eta']} | {r['cps_eval']:.3f} | {r['flow_eval']:.3f} | "
                     f"{r['eval']['mean_diff']:+.3f} ({fmt(r['eval']['p_value'])}) | {r['cps_train']:.3f} | "
                     f"{r['flow_train']:.3f} | "
                     f"{r['train']['mean_diff']:+.3f} ({fmt(r['train']['p_value'])}) |")
        L.append("")
    path = out / "report.md"
    path.write_text("\n".join(L) + "\n")
    return path


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny budgets (~2 min) for smoke tests")
    p.add_argument("--out", default=None, help="results folder (default: results/, or bench_out/ with --quick)")
    p.add_argument("--only", default="", help="comma-separated sections: cost,split,scaling,convergence,noise,factors")
    p.add_argument("--workers", type=int, default=2, help="training runs in parallel, one thread each")
    args = p.parse_args(argv)
    out = Path(args.out or ("bench_out" if args.quick else "results"))
    out.mkdir(parents=True, exist_ok=True)
    sections = set(filter(None, args.only.split(","))) or {"cost", "split", "scaling", "convergence", "noise",
                                                             "factors"}
    b = budget(args.quick)
    models.load_digits_backbone()  # pre-train before the workers start, once
    if "factors" in sections and "image16" in b["factors"]:
        models.load_digits_backbone(size=16)
    t0 = time.perf_counter()
    res: dict = dict(budget={k: v for k, v in b.items()})
    if "cost" in sections:
        print("[bench] 1. sampler cost", flush=True)
        res["cost"] = section_cost(b)
    if "split" in sections:
        print("[bench] 2. iteration split", flush=True)
        res["split"] = section_split(b)
    if "scaling" in sections:
        print("[bench] 3. scaling", flush=True)
        res["scaling"] = section_scaling(b)
    jobs = []
    if "convergence" in sections:
        jobs += _jobs_convergence(b, out)
    if "factors" in sections:
        jobs += _jobs_factors(b, out)
    if jobs:
        print(f"[bench] 4/6. {len({j['name'] for j in jobs})} training runs on {args.workers} workers", flush=True)
        results = run_jobs(jobs, args.workers)
        res["runs"] = dict(count=len(results), seconds=sum(r["wall"] for r in results.values()),
                           workers=args.workers)
        res["analysis"] = analyse(results, b)
        if "convergence" in sections:
            plot_convergence(results, res["analysis"], out)
    if "noise" in sections:
        print("[bench] 5. noise of training samples", flush=True)
        res["noise_base"] = section_noise_base(b, out)
    if "cost" in res and "split" in res:
        plot_split(res["split"], res["cost"], out)
    res["wall"] = time.perf_counter() - t0
    machine = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, " + (
        torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    path = write_report(res, out, args.quick, machine)
    print(path.read_text())
    print(f"[bench] report: {path} (and figures in {out}/)")
    return path


if __name__ == "__main__":
    main()
