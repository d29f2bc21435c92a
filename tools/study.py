"""The sampler comparison behind bench.py's report, on both built-in tasks. docs/STUDY.md is its design, written and
committed before any report seed ran; this file is that design as code:

  * each task has a training reward and an independent judge (another model, other data) that is the held-out
    metric, and a quality measure beside them, so reward hacking shows: the reward rising while the judge or the
    quality falls;
  * tuning seeds choose each sampler's eta (largest mean AUC of the judge); report seeds choose nothing;
  * ONE primary comparison (PRIMARY): CPS - Flow-SDE, each at its tuned eta, held-out judge AUC, paired by seed;
    every other comparison is secondary (SECONDARY), its p-values Holm-adjusted as one family;
  * "level" is claimed only where TOST shows equivalence within MARGIN; an interval that merely contains 0 is
    "inconclusive";
  * time to a threshold counts the runs that never reach it (censored: Kaplan-Meier median, fraction reached);
  * every setting is evaluated at the same iterations, so AUC is integrated alike;
  * runs are cached by their argv and a hash of the training code, so a changed loop retrains.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import inspect
import io
import json
import math
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import peft
import torch
import transformers
from tqdm.auto import tqdm

import grpo
import sampling
import train
from flow_cps import models, prompts, scoring
from tools import stats

ROOT = Path(__file__).resolve().parent.parent  # the repository root
SDE = ["cps", "flow_sde", "dance_sde"]
# Per-run GRPO settings of every comparison (one process, one thread).
RUN = dict(prompts_per_iter=8, group_size=8, updates_per_iter=2, report_to="none")
RUN_ARGS = [x for k, v in RUN.items() for x in (f"--{k}", str(v))]
SAMPLES_PER_ITERATION = RUN["prompts_per_iter"] * RUN["group_size"]
# DanceGRPO's recipe (its advantage rule and a random 60% of the steps), for Dance-SDE and for CPS on that recipe.
DANCE_ARGS = ["--advantage", "dance", "--timesteps", "random", "--timestep_fraction", "0.6"]
MARGIN = 0.02  # equivalence margin of every TOST, in judge-accuracy AUC (docs/STUDY.md)
EQUAL_ETA = 0.7  # the paper's eta for CPS and Flow-SDE


@dataclass(frozen=True)
class Task:
    """A built-in task as the study runs it."""
    name: str
    judge: str  # the held-out metric: independent of the reward
    reward: str  # what GRPO trains on
    args: tuple[str, ...]  # train.py flags selecting the task
    figure_prompts: tuple[str, ...]  # the columns of the Figure-1 grid
    held_out: str  # what the held-out evaluation holds out, in words
    quality: str = "clean_background"  # the quality measure beside the reward

    @property
    def eval_prompts(self) -> int:
        return len(prompts.load(self.name, "test")[0])


TASKS = {
    "digits": Task("digits", "digit_svm_accuracy", "digit_judge", ("--model", "digits"),
                   tuple(f"a handwritten digit {d}" for d in range(10)),
                   "the noises, the ODE sampler and the EMA weights, not the prompts (the digits' encoder maps every "
                   "phrasing of a digit to one vector)"),
    "shapes": Task("shapes", "scene_judge", "scene_reward", ("--preset", "shapes"),
                   ("a red square", "two blue triangles", "three yellow circles", "a green circle and a red square",
                    "a yellow square above a blue triangle", "a red circle left of a green triangle"),
                   "compositions never trained on (a count of a shape, or a pair of objects), besides the noises, the "
                   "ODE sampler and the EMA weights"),
}

# The comparisons: label -> (a, b), each a - b paired by seed. Group labels are built by `groups`.
PRIMARY = ("CPS − Flow-SDE, each at its tuned η", "cps tuned", "flow_sde tuned")
SECONDARY = {
    "CPS − Dance-SDE, each at its tuned η and recipe": ("cps tuned", "dance_sde tuned"),
    "CPS − Dance-SDE, both on the Dance recipe (the sampler alone)": ("cps tuned, dance recipe", "dance_sde tuned"),
    "CPS − Flow-SDE, both at η 0.7": ("cps 0.7", "flow_sde 0.7"),
    "Flow-SDE η 0.7: CPS log-prob − Gaussian (App. D)": ("flow_sde 0.7 + cps log-prob", "flow_sde 0.7"),
    "Flow-SDE η 0.7 + CPS log-prob − CPS tuned": ("flow_sde 0.7 + cps log-prob", "cps tuned"),
}
APPENDIX_D = list(SECONDARY)[3:5]  # how much of the gain the log-prob's form carries


def training_modules(entry: Path = ROOT / "train.py") -> list[Path]:
    """Every project file the entry point imports, directly or through others (read from the import graph with ast,
    so a module added to the training path joins the cache key without anyone listing it)."""
    seen, todo = set(), [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            todo += [f for n in names if (f := ROOT / (n.replace(".", "/") + ".py")).is_file()]
    return sorted(seen)


def code_version() -> str:
    """The cache key's code part: the text of every module train.main imports, the study's own code that measures
    a run (run_training, residual_noise), and the versions of the libraries that compute the numbers."""
    h = hashlib.sha256(" ".join(f"{m.__name__} {m.__version__}" for m in (torch, diffusers, transformers, peft))
                       .encode())
    for path in training_modules():
        h.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    for fn in (run_training, residual_noise):
        h.update(inspect.getsource(fn).encode())
    return h.hexdigest()[:12]


def quiet(fn, *args, **kwargs):
    """fn with stdout/stderr captured (a training run prints its plan, a progress bar and a line per iteration)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        return fn(*args, **kwargs)


# -- training runs ---------------------------------------------------------------------------------------------------
def job(task: Task, name: str, sampler: str, eta: float, seed: int, run: dict, out: Path, size: int,
        log_prob: str = "", recipe: str = "", noise: int = 0) -> dict:
    """One training run's description: its argv decides it (and its cache key). recipe 'dance' = DanceGRPO's
    advantage rule and trained steps (the default for Dance-SDE)."""
    dance = recipe == "dance" or (not recipe and sampler == "dance_sde")
    argv = [*task.args, *RUN_ARGS, "--iterations", str(run["iterations"]), "--eval_every", str(run["eval_every"]),
            "--eval_per_prompt", str(run["eval_per_prompt"]), "--sampler", sampler, "--eta", f"{eta:.6g}",
            "--seed", str(seed), "--checkpoint_every", str(run["iterations"]), "--resolution", str(size),
            *(DANCE_ARGS if dance else []), *(["--log_prob", log_prob] if log_prob else [])]
    return dict(name=f"{task.name}/{name}", task=task.name, sampler=sampler, eta=eta, seed=seed, size=size,
                log_prob=log_prob, argv=argv, noise=noise, dir=str(out / "runs" / task.name / name.replace("/", "_")))


def run_training(j: dict, version: str) -> dict:
    """One GRPO run in this process (1 thread); cached by argv + code version. Keeps the final LoRA (for figures)
    and measures the residual noise of the final training samples with the run's own sampler."""
    torch.set_num_threads(1)
    cache = Path(j["dir"]) / "result.json"
    key = dict(argv=j["argv"], version=version)
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached["key"] == key and (cached.get("noise") or not j["noise"]):
            return cached
    shutil.rmtree(j["dir"], ignore_errors=True)
    t0 = time.perf_counter()
    out = quiet(train.main, [*j["argv"], "--output_dir", j["dir"]])
    res = dict(key=key, name=j["name"], wall=time.perf_counter() - t0, history=out["history"])
    if j["noise"]:
        res["noise"] = residual_noise(out["policy"].backbone, TASKS[j["task"]], j["sampler"], j["eta"], j["noise"],
                                      j["log_prob"])
    cache.write_text(json.dumps(res))
    return res


def run_jobs(jobs: list[dict], workers: int) -> dict[str, dict]:
    """Every distinct job once, in a pool of single-threaded worker processes; results by name."""
    unique = {}
    for j in jobs:
        if j["name"] in unique:
            unique[j["name"]]["noise"] = max(unique[j["name"]]["noise"], j["noise"])
        else:
            unique[j["name"]] = dict(j)
    version, results = code_version(), {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as ex:
        futures = {ex.submit(run_training, j, version): name for name, j in unique.items()}
        for f in tqdm(as_completed(futures), total=len(futures), desc="training runs"):
            results[futures[f]] = f.result()
    return results


def sample(backbone, texts: list[str], sampler: str, eta: float, seed: int, log_prob: str = ""):
    """Training samples as a run draws them (10 steps, fixed noises): the trajectory, with its final x0_hat."""
    gens = train.generators(train.Stream.SAMPLE_NOISE, [(seed, 0, i, 0) for i in range(len(texts))])
    J = train.Objective(sampling.SAMPLERS[sampler], eta,
                        sampling.LOG_PROBS[log_prob or sampling.DEFAULT_LOG_PROB.get(sampler, "gaussian")],
                        grpo.kl_mse, 0.0, 1.0)  # only the sampler, eta and log-prob roll out
    return train.rollout(backbone, J, backbone.sigmas(10), train.Samples(texts, [None] * len(texts), gens, gens),
                         None, 64)[0]


def residual(traj) -> float:
    """std(final sample - the last step's x0_hat), per sample, mean, in latent units (images x 2 - 1): exactly 0
    for a coefficients-preserving sampler, whose last step returns x0_hat."""
    return float((traj.final - traj.x0_hat).flatten(1).std(1).mean())


@torch.no_grad()
def residual_noise(backbone, task: Task, sampler: str, eta: float, n: int, log_prob: str = "", seed: int = 999) -> dict:
    """The final training samples of fixed prompts and noises: their residual noise and their quality measure."""
    texts = (prompts.load(task.name, "train")[0] * n)[:n]
    traj = quiet(sample, backbone, texts, sampler, eta, seed, log_prob)
    quality = scoring.RewardModel(task.quality)(backbone.decode(traj.final), texts).total
    return dict(residual=residual(traj), quality=float(quality.mean()))


def load_runs(dirs: list[str]) -> list[dict]:
    """Finished runs' results (result.json in each run folder)."""
    return [json.loads((Path(d) / "result.json").read_text()) for d in dirs]


def trained_backbone(task: Task, run_dir: str, size: int):
    """The task's model with a finished run's final LoRA (the live weights that drew its last training samples)."""
    bb = models.load_builtin_backbone(task.name, resolution=size)
    ckpt = sorted((Path(run_dir) / "checkpoints").glob("iter_*"))[-1]
    bb.transformer.load_lora_adapter(str(ckpt / "lora"), weight_name="pytorch_lora_weights.safetensors")
    return bb


# -- what a run's held-out curve says -------------------------------------------------------------------------------
def curve(run: dict, metric: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [h for h in run["history"] if f"eval/{metric}" in h]
    return np.array([h["iteration"] for h in rows]), np.array([h[f"eval/{metric}"] for h in rows])


def at(run: dict, metric: str, iteration: int) -> float:
    its, acc = curve(run, metric)
    return float(acc[its == iteration][0]) if iteration in its else math.nan


def auc(run: dict, metric: str) -> float:
    """Mean held-out value over the run: trapezoid area under the curve / its length."""
    its, acc = curve(run, metric)
    return float(np.trapezoid(acc, its) / (its[-1] - its[0]))


def iterations_to(run: dict, metric: str, threshold: float) -> float:
    """First iteration whose held-out value reaches the threshold, linearly interpolated between evaluations;
    inf if never (censored at the last evaluation by stats.time_to)."""
    its, acc = curve(run, metric)
    for k in range(len(its)):
        if acc[k] >= threshold:
            if k == 0:
                return float(its[0])
            return float(its[k - 1] + (threshold - acc[k - 1]) / (acc[k] - acc[k - 1]) * (its[k] - its[k - 1]))
    return math.inf


def training_reward(run: dict, first: bool, window: int = 5) -> float:
    """The mean training reward (stochastic samples, the reward GRPO sees) of the first or last `window` iterations."""
    r = [h["reward"] for h in run["history"] if "reward" in h]
    return float(np.mean(r[:window] if first else r[-window:]))


def describe(task: Task, runs: list[dict], b: dict) -> dict:
    """A group of seeds' runs: the judge at each budget and its AUC, time to each threshold (censored), the reward
    hacking measures (training reward, held-out reward and quality, base -> final), the residual noise."""
    last = b["run"]["iterations"]

    def change(metric):
        return stats.summary([at(r, metric, last) - at(r, metric, 0) for r in runs])
    return dict(acc={k: stats.summary([at(r, task.judge, k) for r in runs]) for k in b["budgets"]},
                auc=stats.summary([auc(r, task.judge) for r in runs]),
                reach={t: stats.time_to([iterations_to(r, task.judge, t) for r in runs], last)
                       for t in b["thresholds"]},
                hacking=dict(reward_first=stats.summary([training_reward(r, True) for r in runs]),
                             reward_last=stats.summary([training_reward(r, False) for r in runs]),
                             judge=change(task.judge), reward=change(task.reward), quality=change(task.quality)),
                residual=stats.summary([r["noise"]["residual"] for r in runs if "noise" in r]),
                quality=stats.summary([r["noise"]["quality"] for r in runs if "noise" in r]),
                wall=float(np.mean([r["wall"] for r in runs])))


def compare(task: Task, a: list[dict], b: list[dict], measure: str, final: int) -> dict:
    """a - b, paired by seed, on the judge's AUC ('auc') or its value at the last iteration ('final'): difference,
    interval, p, sign test, and TOST at MARGIN."""
    value = (lambda r: auc(r, task.judge)) if measure == "auc" else (lambda r: at(r, task.judge, final))
    x, y = [value(r) for r in a], [value(r) for r in b]
    return dict(stats.paired(x, y), measure=measure, tost=stats.tost(x, y, MARGIN))


def verdict(d: dict, p_adjusted: float, tost_adjusted: float) -> str:
    """The words a table may use (docs/STUDY.md): a difference only where the (adjusted) test rejects; "level" only
    where TOST shows equivalence within the margin; otherwise "inconclusive"."""
    within = tost_adjusted < 0.05
    if p_adjusted < 0.05:
        return ("higher" if d["diff"] > 0 else "lower") + (f", by less than {MARGIN:g}" if within else "")
    return f"level (within ±{MARGIN:g})" if within else "inconclusive"


# -- a task's study --------------------------------------------------------------------------------------------------
def run_study(task: Task, b: dict, out: Path, workers: int) -> dict:
    """Tuning seeds choose each sampler's eta; report seeds measure every group; the primary comparison, the Holm-
    adjusted secondary family and the dose-response over image sizes (docs/STUDY.md)."""
    sizes = b["sizes"]  # the first is the main size, the others the dose-response
    for size in sizes:  # pre-train each size once, before the workers start
        models.load_builtin_backbone(task.name, resolution=size)
    tuning = [job(task, f"tune/{s}/eta{eta}/seed{seed}", s, eta, seed, b["run"], out, sizes[0])
              for s, etas in b["etas"].items() for eta in etas for seed in b["tuning_seeds"]]
    results = run_jobs(tuning, workers)
    tuning_auc = {s: {e: [auc(results[f"{task.name}/tune/{s}/eta{e}/seed{k}"], task.judge) for k in b["tuning_seeds"]]
                      for e in etas} for s, etas in b["etas"].items()}
    tuned = {s: max(etas, key=lambda e, s=s: np.mean(tuning_auc[s][e])) for s, etas in b["etas"].items()}
    jobs = groups(task, b, tuned, out)
    results.update(run_jobs([j for js in jobs.values() for j in js], workers))
    runs = {label: [results[j["name"]] for j in js] for label, js in jobs.items()}
    final = b["run"]["iterations"]
    primary = {m: compare(task, runs[PRIMARY[1]], runs[PRIMARY[2]], m, final) for m in ("auc", "final")}
    for d in primary.values():
        d["verdict"] = verdict(d, d["p"], d["tost"]["p"])
    # A budget may run fewer groups (docs/STUDY.md): a comparison is made only where both of its groups ran.
    secondary = {label: compare(task, runs[a], runs[c], "auc", final) for label, (a, c) in SECONDARY.items()
                 if a in runs and c in runs}
    secondary[f"{PRIMARY[0]}, final value"] = primary["final"]
    for size in sizes[1:]:
        secondary[f"{PRIMARY[0]}, at {size}×{size}"] = compare(task, runs[f"cps tuned @{size}"],
                                                                 runs[f"flow_sde tuned @{size}"], "auc", final)
    p_holm = stats.holm({k: d["p"] for k, d in secondary.items()})
    tost_holm = stats.holm({k: d["tost"]["p"] for k, d in secondary.items()})
    secondary = {k: dict(d, p_holm=p_holm[k], tost_p_holm=tost_holm[k], verdict=verdict(d, p_holm[k], tost_holm[k]))
                 for k, d in secondary.items()}
    return dict(task=task.name, judge=task.judge, reward=task.reward, quality=task.quality, held_out=task.held_out,
                tuned=tuned,
                samples=SAMPLES_PER_ITERATION, primary_label=PRIMARY[0], appendix_d=APPENDIX_D, margin=MARGIN,
                tuning={s: {str(e): stats.summary(v) for e, v in es.items()} for s, es in tuning_auc.items()},
                groups={label: describe(task, rs, b) for label, rs in runs.items()}, primary=primary,
                secondary=secondary, eval_prompts=task.eval_prompts, sizes=sizes,
                run_dirs={label: [j["dir"] for j in js] for label, js in jobs.items()},
                base=stats.summary([at(r, task.judge, 0) for r in runs["cps tuned"]]),
                process_minutes=sum(r["wall"] for r in results.values()) / 60, runs=len(results))


def groups(task: Task, b: dict, tuned: dict[str, float], out: Path) -> dict[str, list[dict]]:
    """The report seeds' groups: each sampler at its tuned eta (Dance-SDE on its recipe), CPS on the Dance recipe,
    CPS and Flow-SDE at the paper's eta 0.7, Flow-SDE with CPS's log-prob (App. D), and CPS / Flow-SDE at their tuned
    eta at every other size. Residual noise is measured for the groups of the Figure-1 comparison. b["groups"], where
    given, lists the groups to run (the primary's two always run); a sampler left out of tuning has no tuned group."""
    jobs = {}
    wanted = {*b["groups"], PRIMARY[1], PRIMARY[2]} if b.get("groups") else None

    def add(label, sampler, eta, size=b["sizes"][0], log_prob="", recipe="", noise=0):
        if (wanted is not None and label not in wanted) or eta is None:
            return
        name = f"report/{size}/{sampler}/eta{eta}/{log_prob or 'own'}/{recipe or 'own'}"
        jobs[label] = [job(task, f"{name}/seed{k}", sampler, eta, k, b["run"], out, size, log_prob, recipe, noise)
                       for k in b["report_seeds"]]
    for s in SDE:
        add(f"{s} tuned", s, tuned.get(s), noise=b["noise"])
    add("cps tuned, dance recipe", "cps", tuned["cps"], recipe="dance")
    for s in ("cps", "flow_sde"):
        add(f"{s} {EQUAL_ETA:g}", s, EQUAL_ETA, noise=b["noise"])
    add(f"flow_sde {EQUAL_ETA:g} + cps log-prob", "flow_sde", EQUAL_ETA, log_prob="cps")
    for size in b["sizes"][1:]:
        for s in ("cps", "flow_sde"):
            add(f"{s} tuned @{size}", s, tuned[s], size, noise=b["noise"])
    return jobs

