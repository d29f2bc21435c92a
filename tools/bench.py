"""Measured, side by side: what each phase of the loop costs, and what CPS changes against Flow-SDE and Dance-SDE at
the scale this project can run (the two built-in tasks, CPU).

    python -m tools.bench                            # everything -> results/report.md, figures, README's Results
    python -m tools.bench --quick                    # the same sections with tiny budgets (~3 min): CI's smoke test
    python -m tools.bench --only cost,speed,scaling  # some sections: cost, speed, scaling, main_job, mechanism,
                                                     # ocr, study
    python -m tools.bench --only study --tasks shapes   # one task's study
    python -m tools.bench --only study --hours 2     # start study runs for two hours; run it again to go on
    python -m tools.bench --only speed --baseline 55484a0   # also time that commit's loop, interleaved, in this run

Sections:
  cost      rollout time of each SDE sampler / the ODE on the same model, batch and steps (min / median / max)
  speed     samples per second of the default iteration (one process, 2 threads) and where it goes; with
            --baseline, the same for another commit, interleaved on this machine
  scaling   data-parallel efficiency: images/s of N processes x 1 thread over N x that of 1 process x 1 thread
  main_job  the Quickstart command (torchrun, 2 processes), cold (empty cache) and warm
  mechanism advantage distortion on each task's base model: the within-group rank correlation of the rewards of
            the final samples with those of the last x0_hat, per sampler and eta (mechanism.py, docs/STUDY.md)
  ocr       the OCR reward's score and within-group ranking against added noise (ocr_noise.py)
  study     the study of docs/STUDY.md on each task (study.py): the primary comparison, the mechanism's prediction
            and the Holm-adjusted secondary family on the report seeds, reward hacking, the paper's Figure 1
The study's runs are committed records (<out>/runs/, tools/runs.py): a run already recorded on a code version that
computes the same numbers (its probe) is not run again, so the study can be run in parts. Written to the default
results/ folder, the report also regenerates the README's generated blocks (report.update_readme).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import sampling
from flow_cps import digits, models, prompts
from tools import figures, mechanism, ocr_noise, report, runs, study

ROOT = Path(__file__).resolve().parent.parent  # the repository root
SDE = ["cps", "flow_sde", "dance_sde"]


def budget(quick: bool) -> dict:
    """Every budget of the bench; the study's design is tools/study.py's DESIGNS (docs/STUDY.md)."""
    if quick:
        mechanism_budget = dict(groups=8, grid={s: [0.7] for s in SDE}, base_images=8, ocr_groups=2,
                                ocr_sigmas=[0.2])
        return dict(mechanism=mechanism_budget, repeats=2, speed_iterations=4, scaling_iterations=3)
    # docs/STUDY.md, "The mechanism as a number": 128 groups per setting; the OCR table's 48 groups x 6 noise levels
    # take ~10 min of OCR on one thread.
    mechanism_budget = dict(groups=mechanism.GROUPS, grid=mechanism.GRID, base_images=192, ocr_groups=48,
                            ocr_sigmas=ocr_noise.SIGMAS)
    return dict(mechanism=mechanism_budget, repeats=7, speed_iterations=12, scaling_iterations=10)


def designs(quick: bool, tasks: list[str]) -> dict[str, study.Design]:
    """The study's designs: docs/STUDY.md's, or (quick) the same groups and comparisons for 4 iterations on 1 seed."""
    tasks = [t for t in tasks if t in study.DESIGNS]
    if not quick:
        return {t: study.DESIGNS[t] for t in tasks}
    return {t: dataclasses.replace(study.design(study.TASKS[t], 4, 2, 2, 0.01, seeds=(1,)), residual_samples=8)
            for t in tasks}


def spread(xs) -> dict:
    xs = [float(x) for x in xs]
    return dict(min=min(xs), median=statistics.median(xs), max=max(xs))


# -- cost ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def section_cost(b: dict) -> dict:
    """Each sampler's rollout against the ODE's: same model, prompts, noise and 10 steps; interleaved repeats."""
    bb = models.load_builtin_backbone("digits")
    texts = digits.prompts("train")[:32] * 2
    times = {s: [] for s in ["ode", *SDE]}
    for _ in range(b["repeats"] + 1):  # interleaved: machine noise hits all samplers alike; round 1 warms up
        for s in times:
            t0 = time.perf_counter()
            study.sample(bb, texts, s, 0.7 if s != "ode" else 0.0, seed=1)
            times[s].append(time.perf_counter() - t0)
    times = {s: t[1:] for s, t in times.items()}
    x = torch.randn(64, *bb.latent_shape)
    math_us = {}
    for s in ["ode", *SDE]:  # the sampler's own arithmetic, no model: what it adds per step
        t0 = time.perf_counter()
        for _ in range(200):
            mean, std = sampling.SAMPLERS[s](x, x, 0.6, 0.5, 0.7)
            if s != "ode":
                sampling.cps_log_prob(mean + std * torch.randn_like(mean), mean, std)
        math_us[s] = (time.perf_counter() - t0) / 200 * 1e6
    return dict(batch=len(texts), ratio_vs_ode={s: spread([a / o for a, o in zip(times[s], times["ode"])])
                                                for s in SDE}, step_math_us=math_us)


# -- speed ---------------------------------------------------------------------------------------------------------
def _loop_times(tree: Path, iterations: int, cache: str, threads: int = 2, nproc: int = 1, extra=()) -> list[dict]:
    """Run train.py of a code tree as the user would (a fresh process) and return its per-iteration timings."""
    with tempfile.TemporaryDirectory() as tmp:
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        f"--nproc_per_node={nproc}"]
        cmd = [*launcher, "train.py", "--iterations", str(iterations), "--eval_every", "100000",
               "--checkpoint_every", "100000", "--report_to", "none", "--output_dir", str(Path(tmp) / "r"), *extra]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "FLOW_CPS_CACHE": cache}
        p = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env, timeout=1800)
        if p.returncode:
            raise RuntimeError(f"{cmd} in {tree} failed:\n{p.stderr[-2000:]}")
        rows = [json.loads(x) for x in (Path(tmp) / "r" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if 1 < r["iteration"] < iterations]  # steady state: no warm-up, no final evaluation


def _per_iteration(rows: list[dict]) -> list[float]:
    return [sum(v for k, v in r.items() if k.startswith("time/") and k != "time/eval" and v) for r in rows]


def section_speed(b: dict, trees: dict[str, Path], out: Path) -> dict:
    """The default iteration (64 samples, one process, 2 threads): samples/s and the split of its time, for this
    commit and (--baseline) another one, interleaved on this machine, each with its own digits cache."""
    seconds, split = {k: [] for k in trees}, {}
    for _ in range(max(1, b["repeats"] // 3)):
        for k, tree in trees.items():
            rows = _loop_times(tree, b["speed_iterations"], str(out / f"cache-{k}"))
            seconds[k] += _per_iteration(rows)
            if k == "this":
                split = {p: float(np.median([r.get(f"time/{p}", 0.0) for r in rows]))
                         for p in ("rollout", "reward", "train")}
    res = {k: dict(seconds_per_iteration=spread(v), samples_per_second=64 / statistics.median(v))
           for k, v in seconds.items()}
    res["split"] = split
    if "baseline" in trees:
        res["speedup"] = res["this"]["samples_per_second"] / res["baseline"]["samples_per_second"]
    return res


@contextlib.contextmanager
def code_trees(baseline: str):
    """{'this': this checkout} and, with a baseline commit, {'baseline': a temporary git worktree of it}."""
    trees = {"this": ROOT}
    if baseline:
        trees["baseline"] = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
        subprocess.run(["git", "worktree", "add", "--detach", str(trees["baseline"]), baseline], cwd=ROOT, check=True,
                       capture_output=True)
    try:
        yield trees
    finally:
        if baseline:
            subprocess.run(["git", "worktree", "remove", "--force", str(trees["baseline"])], cwd=ROOT,
                           capture_output=True)


# -- scaling -------------------------------------------------------------------------------------------------------
def section_scaling(b: dict, out: Path, tree: Path = ROOT, name: str = "this") -> dict:
    """Images/s of N processes x 1 thread (torchrun, 32 samples per process per iteration) against N x that of one
    process x 1 thread: the data-parallel efficiency itself. One process x 2 threads for reference."""
    res = {}
    for nproc, threads in ((1, 1), (2, 1), (1, 2)):
        extra = ["--prompts_per_iter", str(4 * nproc), "--group_size", "8"]  # each code's own default micro-batch
        rows = _loop_times(tree, b["scaling_iterations"], str(out / f"cache-{name}"), threads, nproc, extra)
        per = _per_iteration(rows)
        res[f"{nproc}x{threads}"] = dict(processes=nproc, threads=threads, images_per_iteration=32 * nproc,
                                         seconds=spread(per), images_per_second=32 * nproc / statistics.median(per))
    res["efficiency"] = res["2x1"]["images_per_second"] / (2 * res["1x1"]["images_per_second"])
    return res


# -- the Quickstart ------------------------------------------------------------------------------------------------
def section_main_job(out: Path, tree: Path = ROOT, name: str = "this") -> dict:
    """`torchrun --standalone --nproc_per_node=2 train.py` in a fresh folder: cold (empty digits cache, so the
    pre-training is included) and warm."""
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "FLOW_CPS_CACHE": str(Path(tmp) / "cache")}
        for kind in ("cold", "warm"):
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                str(tree / "train.py"), *(["--output_dir", f"runs/tiny/run-{kind}"] if name ==
                                                          "baseline" else [])], cwd=tmp, capture_output=True,
                               text=True, env=env, timeout=1800)
            wall = time.perf_counter() - t0
            if p.returncode:
                raise RuntimeError(f"the Quickstart failed:\n{p.stderr[-2000:]}")
            run = sorted(Path(tmp).glob("runs/tiny/run-*"))[-1]
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            last = max(r["iteration"] for r in rows)
            for src, dst in (("reward_curve.png", "curve"), ("images/eval_00000.png", "eval_base"),
                             (f"images/eval_{last:05d}.png", "eval_trained"),
                             (f"images/train_{last:05d}.png", "train_samples")):
                if name == "this":  # the README shows what the Quickstart draws
                    shutil.copy(run / src, out / f"quickstart_{dst}.png")
            evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
            res[kind] = dict(wall=wall, held_out={k[5:]: [evals[0][k], evals[-1][k]] for k in evals[0]
                                                  if k.startswith("eval/")},
                             **run_settings(json.loads((run / "config.json").read_text())),
                             first_ratio_max_dev=max(r.get("first_ratio_max_dev") or 0 for r in rows))
    return res


def run_settings(config: dict) -> dict:
    """What a run's numbers rest on, for the report's labels: iterations, samples per iteration, held-out images."""
    n = len(prompts.load(config["prompts"], "test", config["seed"])[0])
    n = min(n, config["eval_prompts"]) if config["eval_prompts"] else n
    return dict(iterations=config["iterations"], samples=config["prompts_per_iter"] * config["group_size"],
                eval_prompts=n, eval_images=n * config["eval_per_prompt"], model=config["model"])


# -- the mechanism: advantage distortion, and a real reward model against noise ---------------------------------------
def section_mechanism(b: dict, out: Path, tasks: list[str], earlier: dict, workers: int) -> dict:
    """Each task's distortion table on its base model (a run of some tasks keeps the others' last tables) and the
    figure of all of them; the settings run in `workers` single-threaded processes."""
    torch.set_num_threads(1)
    m = b["mechanism"]
    res = {**earlier, **{t: mechanism.task_table(study.TASKS[t], m["grid"], m["groups"], base_images=m["base_images"],
                                                 workers=workers) for t in tasks}}
    mechanism.figure(res, out / "mechanism_distortion.png")
    return res


def section_ocr(b: dict, out: Path) -> dict:
    torch.set_num_threads(1)
    res = ocr_noise.sensitivity(b["mechanism"]["ocr_groups"], b["mechanism"]["ocr_sigmas"])
    ocr_noise.figure(res, out / "ocr_noise.png")
    return res


# -- the study -------------------------------------------------------------------------------------------------------
def section_study(quick: bool, out: Path, workers: int, tasks: list[str], hours: float | None) -> dict:
    """Each task's study from its runs' records (tools/runs.py): the runs not yet recorded are run (only in the first
    `hours`, if given), then every complete comparison is computed (study.analyse) and drawn."""
    res, root = {}, out / "runs"
    ds = designs(quick, tasks)
    probe = [] if quick else study.probe_jobs(ds)  # quick: records are never reused across code versions
    for name, d in ds.items():
        records, missing = runs.run_missing(d.jobs(), probe, (study.measure_final,), workers, hours, root)
        st = study.analyse(d, records)
        figures.convergence(d, records, out / f"{name}_convergence.png")
        first = runs.scratch(root) / name / study.C7.slug / f"seed{d.seeds[0]}"
        if (first / "checkpoints").is_dir():  # the Figure-1 model: the first seed's CPS run, where it ran here
            st["figure1_residual"] = figures.figure1(d.task, first, {study.C7.sampler: study.C7.eta,
                                                                    "flow_sde": study.HI, "dance_sde": study.DANCE_ETA},
                                                     out / f"{name}_figure1.png")
        res[name] = st
        print(f"[bench] study {name}: {st['runs']} of {st['of']} runs recorded; {len(missing)} still to run")
    return res


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny budgets (~2 min) for smoke tests")
    p.add_argument("--out", default=None, help="results folder (default: results/, or bench_out/ with --quick)")
    p.add_argument("--only", default="", help="comma-separated sections: cost,speed,scaling,main_job,mechanism,"
                                                "ocr,study")
    p.add_argument("--tasks", default="digits,shapes", help="the study's and the mechanism's tasks, comma-separated")
    p.add_argument("--workers", type=int, default=2, help="training runs in parallel, one thread each")
    p.add_argument("--hours", type=float, default=None, help="study: start new runs only in the first HOURS (the rest "
                                                             "on the next invocation)")
    p.add_argument("--baseline", default="", help="a git commit whose loop the speed section also times")
    args = p.parse_args(argv)
    out = Path(args.out or ("bench_out" if args.quick else "results"))
    out.mkdir(parents=True, exist_ok=True)
    sections = set(filter(None, args.only.split(","))) or (
        {"cost", "speed", "scaling", "mechanism", "ocr", "study"} | (set() if args.quick else {"main_job"}))
    b = budget(args.quick)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in study.TASKS]
    if unknown:
        p.error(f"unknown task(s) {', '.join(unknown)}; the tasks are {', '.join(study.TASKS)}")
    t0, res = time.perf_counter(), dict(budget=b, quick=args.quick)
    earlier = out / "results.json"
    if earlier.exists() and args.only:  # a partial run keeps the other sections of the last report
        kept = json.loads(earlier.read_text())
        if kept.get("quick") == args.quick:
            res = {**kept, **res}
    with code_trees(args.baseline) as trees:
        for name, fn in (("cost", lambda: section_cost(b)), ("speed", lambda: section_speed(b, trees, out)),
                         ("scaling", lambda: {k: section_scaling(b, out, t, k) for k, t in trees.items()}),
                         ("main_job", lambda: {k: section_main_job(out, t, k) for k, t in trees.items()}),
                         ("mechanism", lambda: section_mechanism(b, out, tasks, res.get("mechanism", {}),
                                                                 args.workers)),
                         ("ocr_noise", lambda: section_ocr(b, out)),
                         ("study", lambda: section_study(args.quick, out, args.workers, tasks, args.hours))):
            if name in sections or (name == "ocr_noise" and "ocr" in sections):
                print(f"[bench] {name}", flush=True)
                if name == "study":  # one entry per task: a run of some tasks keeps the others' last results
                    res["studies"] = {**res.get("studies", {}), **fn()}
                    res["pilots"] = study.pilot_summary(out / "pilots" if args.quick else study.PILOT_ROOT)
                else:
                    res[name] = fn()
    if args.baseline:
        res["baseline_ref"] = args.baseline
    res["wall"] = time.perf_counter() - t0
    res["machine"] = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, " + (
        torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    path = report.write(json.loads((out / "results.json").read_text()), out)
    if out.resolve() == (ROOT / "results").resolve():  # the README's generated blocks follow results/
        report.update_readme()
    print(path.read_text())
    print(f"[bench] report: {path} (and figures in {out}/)")
    return path


if __name__ == "__main__":
    main()
