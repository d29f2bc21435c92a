"""The paper's mechanism as a number, measured before any training (docs/STUDY.md, "The mechanism as a number"):
does an SDE sampler's residual noise reorder the rewards within a GRPO group?

    python -m tools.mechanism                       # both tasks, every sampler and eta -> results/mechanism.json
    python -m tools.mechanism --tasks digits --groups 16    # a quick look
    python -m tools.bench --only mechanism,ocr      # the same, into results.json and report.md

On a task's base model, groups are drawn exactly as training draws them (`train.draw`, `train.rollout`: 8
training prompts x G = 8 samples per iteration, 10 steps on the model's grid, the sampler's step and eta). Per
trajectory: r_final = the reward of the final sample (what GRPO trains on), r_clean = the reward of the last step's
x0_hat (the same trajectory without its residual noise), j_clean = the independent judge of x0_hat. Within a group
GRPO's advantage is an increasing affine map of the reward (Flow-GRPO's and DanceGRPO's alike), so the rank correlation
of two advantage vectors is that of the reward vectors:

    D_reward = tau_b(r_final, r_clean)    1 for CPS by construction (its last step returns x0_hat, Eq. 12 at t' = 0)
    D_judge  = tau_b(r_final, j_clean)    beside B_judge = tau_b(r_clean, j_clean), the same trajectories' baseline

each the mean over groups of Kendall's tau-b, the groups where a vector is constant left out and counted
(`distortion`), with a 95% bootstrap interval over groups. tools/ocr_noise.py measures a real OCR model the same way.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

import sampling
import train
from flow_cps import models, plan, prompts, scenes, scoring
from tools import study

ROOT = Path(__file__).resolve().parent.parent
SEED = 7000  # no training run of this repository uses it (tuning seeds 0-2, report seeds 100-109)
PROMPTS_PER_ITER, GROUP_SIZE, STEPS = 8, 8, 10  # as the study's runs (study.RUN)
GRID = {"cps": [0.3, 0.5, 0.7, 0.9], "flow_sde": [0.5, 0.7, 0.9, 1.2, 1.4, 1.6],
        "dance_sde": [0.3, 0.5, 0.7, 0.8, 0.9]}
GROUPS = 128  # per setting: 16 iterations x 8 prompts


# -- the estimator ---------------------------------------------------------------------------------------------------
def varies(x) -> bool:
    return bool(np.ptp(np.asarray(x, dtype=float)) > 0)


def tau_b(x, y) -> float:
    """Kendall's tau-b of one group's two vectors (ties corrected); NaN where either is constant (no ranking)."""
    if not (varies(x) and varies(y)):
        return math.nan
    if np.array_equal(x, y):  # exactly 1 (scipy's float arithmetic gives 1 - 2e-16), as CPS's r_final = r_clean is
        return 1.0
    return float(stats.kendalltau(x, y, variant="b").statistic)


def bootstrap_interval(values: list[float], seed: int = 0) -> tuple[float, float]:
    """95% BCa bootstrap interval of the mean over groups (scipy.stats.bootstrap, 9999 resamples); a set of equal
    values (CPS's D_reward) has the degenerate interval [v, v], and fewer than 3 values none."""
    x = np.asarray(values, dtype=float)
    if len(x) < 3:
        return math.nan, math.nan
    if np.ptp(x) == 0:
        return float(x[0]), float(x[0])
    ci = stats.bootstrap((x,), np.mean, n_resamples=9999, method="BCa", random_state=seed).confidence_interval
    return float(ci.low), float(ci.high)


def distortion(xs: list, ys: list) -> dict:
    """Mean per-group tau-b of (x, y) over the groups where both vary, its 95% bootstrap interval, and how many groups
    were left out by kind: 'neither' varies (no signal), only x varies ('x_only': x has a ranking the other lacks),
    only y varies ('y_only')."""
    taus = [tau_b(x, y) for x, y in zip(xs, ys)]
    kinds = [(varies(x), varies(y)) for x, y in zip(xs, ys)]
    used = [t for t in taus if not math.isnan(t)]
    lo, hi = bootstrap_interval(used)
    return dict(mean=float(np.mean(used)) if used else math.nan, lo=lo, hi=hi, n=len(used), groups=len(taus),
                neither=kinds.count((False, False)), x_only=kinds.count((True, False)),
                y_only=kinds.count((False, True)), taus=taus)


def paired_difference(a: list[float], b: list[float]) -> dict:
    """a - b over the groups where both are defined: mean and 95% t-interval over groups."""
    d = np.array([x - y for x, y in zip(a, b) if not (math.isnan(x) or math.isnan(y))])
    if len(d) < 2:
        return dict(diff=math.nan, lo=math.nan, hi=math.nan, n=len(d))
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return dict(diff=float(d.mean()), lo=float(d.mean()) - half, hi=float(d.mean()) + half, n=len(d))


# -- each setting on the grid ----------------------------------------------------------------------------------------
def check(sampler: str, eta: float, grid: torch.Tensor) -> dict:
    """Is the step defined on every step of the grid, and where does its x1_hat coefficient b turn negative before
    the last step (more noise injected than the step removes: Flow-SDE's and Dance-SDE's drift overshoots)? b is read
    off the step itself: with x = t and v = 1, x0_hat = 0 and x1_hat = 1, so the mean is b."""
    negative = []
    for k in range(len(grid) - 1):
        t, t_next = float(grid[k]), float(grid[k + 1])
        try:
            mean, _ = sampling.SAMPLERS[sampler](torch.full((1, 1), t), torch.ones(1, 1), t, t_next, eta)
        except ValueError as e:
            return dict(defined=False, problem=str(e), negative_b=negative)
        if float(mean) < 0 and k < len(grid) - 2:
            negative.append(k)
    return dict(defined=True, problem="", negative_b=negative)


@torch.no_grad()
def measure(backbone, task: study.Task, sampler: str, eta: float, iterations: int, seed: int = SEED,
            metrics=None) -> dict:
    """One setting: `iterations` training iterations' groups on the base model; per group the reward of the final
    sample and of x0_hat and the judge of x0_hat; the distortions, their baseline and the residual noise."""
    reward, judge = metrics or (scoring.RewardModel(task.reward), scoring.RewardModel(task.judge))
    b = plan.Batch(world=1, prompts=PROMPTS_PER_ITER, group_size=GROUP_SIZE, updates=2, micro_batch=64)
    train_set, grid = prompts.load(task.name, "train"), backbone.sigmas(STEPS)
    r_final, r_clean, j_clean, residual = [], [], [], []
    for it in range(1, iterations + 1):
        samples = train.draw(train_set, seed, it, b, 0, False)
        J = study.objective(sampler, eta)
        traj, _ = train.rollout(backbone, J, grid, samples, None, 64)
        texts, meta = samples.texts, samples.meta
        final, clean = backbone.decode(traj.final), backbone.decode(traj.x0_hat)
        scores = [m(im, texts, meta).total.numpy() for m, im in ((reward, final), (reward, clean), (judge, clean))]
        for out, s in zip((r_final, r_clean, j_clean), scores):
            out += list(s.reshape(PROMPTS_PER_ITER, GROUP_SIZE))
        residual.append(study.residual(traj))
    d_judge, b_judge = distortion(r_final, j_clean), distortion(r_clean, j_clean)
    return dict(sampler=sampler, eta=eta, check=check(sampler, eta, grid), residual=float(np.mean(residual)),
                r_final=float(np.mean(r_final)), r_clean=float(np.mean(r_clean)), j_clean=float(np.mean(j_clean)),
                d_reward=distortion(r_final, r_clean), d_judge=d_judge, b_judge=b_judge,
                judge_shift=paired_difference(d_judge["taus"], b_judge["taus"]),
                identical=bool(all(np.array_equal(a, c) for a, c in zip(r_final, r_clean))))


_LOADED: dict[str, tuple] = {}  # per process: a task's backbone and reward models, loaded once


def _job(name: str, what: str, args: tuple):
    """One unit of a table in this process (1 thread): a setting (`measure`) or the shapes base judge; timed."""
    torch.set_num_threads(1)
    task = study.TASKS[name]
    if name not in _LOADED:
        _LOADED[name] = (models.load_builtin_backbone(name),
                         (scoring.RewardModel(task.reward), scoring.RewardModel(task.judge)))
    backbone, metrics = _LOADED[name]
    t0 = time.process_time()
    out = measure(backbone, task, *args, metrics=metrics) if what == "setting" else shapes_base_judge(backbone, *args)
    return out, time.process_time() - t0


def task_table(task: study.Task, grid: dict[str, list[float]], groups: int, seed: int = SEED,
               base_images: int = 192, workers: int = 1) -> dict:
    """Every setting of the grid on one task's base model (the same prompts and noises at every setting); for shapes
    also the base model's judge per prompt split (`base_images` per tag). workers > 1: the settings run in that many
    single-threaded processes (each setting's numbers do not depend on where it runs)."""
    models.load_builtin_backbone(task.name)  # pre-train (or find) the model once, before any worker starts
    jobs = [("setting", (s, e, math.ceil(groups / PROMPTS_PER_ITER), seed)) for s, es in grid.items() for e in es]
    if task.name == "shapes":
        jobs.append(("base", (base_images, seed)))
    t0 = time.perf_counter()
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = [ex.submit(_job, task.name, what, args) for what, args in jobs]
            done = [f.result() for f in tqdm(futures, desc=f"mechanism {task.name}")]
    else:
        done = [_job(task.name, what, args) for what, args in tqdm(jobs, desc=f"mechanism {task.name}")]
    rows = [out for (what, _), (out, _) in zip(jobs, done) if what == "setting"]
    base = next((out for (what, _), (out, _) in zip(jobs, done) if what == "base"), None)
    return dict(task=task.name, reward=task.reward, judge=task.judge, groups=groups, group_size=GROUP_SIZE,
                steps=STEPS, seed=seed, model_info=model_info(task.name), rows=rows, base_judge=base,
                seconds=time.perf_counter() - t0, cpu_seconds=sum(c for _, c in done))


@torch.no_grad()
def shapes_base_judge(backbone, images_per_tag: int = 192, seed: int = SEED) -> dict:
    """The shapes base model's judge (scene_judge, GenEval's rule) on 10-step ODE samples, as the study evaluates,
    per split: training compositions (each image a scene drawn from the train split, tag first), fresh prompts and
    held-out compositions (each prompt of a tag an equal share of the tag's images, noises never used elsewhere).
    The value is the mean over tags of the tag means (scene_judge's grouping); its 95% interval is a bootstrap that
    resamples prompts within each tag (images of one prompt are not independent)."""
    out = {}
    for split in ("train", "fresh", "test"):
        if split == "train":  # the training distribution: scenes drawn as pre-training draws them, one image each
            rng = random.Random(f"base/train/{seed}")
            chosen = {tag: [[rng.choice(ss)] for _ in range(images_per_tag)]
                      for tag, ss in scenes.scenes("train").items()}
        else:  # the evaluation's prompt lists (prompts.load), each prompt of a tag an equal share of its images
            texts, meta = prompts.load("shapes", split)
            by_tag = {m["tag"]: [scenes.parse(t) for t, m2 in zip(texts, meta) if m2["tag"] == m["tag"]] for m in meta}
            chosen = {tag: [[sc] * (images_per_tag // len(ss)) for sc in ss] for tag, ss in by_tag.items()}
        flat = [(tag, k, sc) for tag, groups in chosen.items() for k, g in enumerate(groups) for sc in g]
        texts = [scenes.text(sc) for _, _, sc in flat]
        gens = train.generators(train.Stream.EVAL_NOISE, [(seed, i) for i in range(len(texts))])
        images = []
        for i in range(0, len(texts), 64):
            cond = backbone.encode(texts[i:i + 64], cache=False)
            x1 = torch.stack([sampling.randn(backbone.latent_shape, g) for g in gens[i:i + 64]])
            traj = sampling.rollout(lambda x, t, c=cond: backbone.velocity(x, t, c), x1, backbone.sigmas(STEPS), "ode")
            images.append(backbone.decode(traj.final))
        passed = [scenes.judge(im, sc) for im, (_, _, sc) in zip(torch.cat(images).numpy(), flat)]
        per_prompt = {tag: [] for tag in chosen}
        for tag, groups in chosen.items():
            for k in range(len(groups)):
                per_prompt[tag].append(np.mean([p for p, (t, j, _) in zip(passed, flat) if (t, j) == (tag, k)]))
        data = tuple(np.array(v) for v in per_prompt.values())
        value = float(np.mean([d.mean() for d in data]))
        ci = stats.bootstrap(data, lambda *a: np.mean([x.mean() for x in a]), n_resamples=9999,
                             method="percentile", random_state=0).confidence_interval
        out[split] = dict(judge=value, lo=float(ci.low), hi=float(ci.high), images=len(flat),
                          prompts=sum(map(len, data)), tags={t: float(d.mean()) for t, d in zip(per_prompt, data)})
    return out


def model_info(name: str) -> dict:
    """The base model's info.json (its pre-training steps and base judge), so a table names the model it measured."""
    task = models.BUILT_IN[name][0]
    path = task.model_dir(models.BUILT_IN[name][1], progress=False)
    return json.loads((path / "info.json").read_text())


# -- the figure and the printed table --------------------------------------------------------------------------------
NAMES = {"cps": "CPS", "flow_sde": "Flow-SDE", "dance_sde": "Dance-SDE"}


def figure(tables: dict[str, dict], path: Path) -> Path:
    """D_reward (top) and D_judge - B_judge (middle) against eta, and D_reward against the residual noise (bottom:
    eta means a different noise in each sampler), one line per sampler, one column per task."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(tables), figsize=(5.5 * len(tables), 10), squeeze=False)
    for col, (name, tab) in enumerate(tables.items()):
        for s in NAMES:
            rows = [r for r in tab["rows"] if r["sampler"] == s]
            eta = [r["eta"] for r in rows]
            for ax, get in ((axes[0, col], lambda r: (r["d_reward"]["mean"], r["d_reward"]["lo"], r["d_reward"]["hi"])),
                            (axes[1, col], lambda r: (r["judge_shift"]["diff"], r["judge_shift"]["lo"],
                                                      r["judge_shift"]["hi"]))):
                m, lo, hi = map(np.array, zip(*map(get, rows)))
                ax.errorbar(eta, m, yerr=[m - lo, hi - m], marker="o", capsize=3, label=NAMES[s])
            m, lo, hi = (np.array([r["d_reward"][k] for r in rows]) for k in ("mean", "lo", "hi"))
            axes[2, col].errorbar([r["residual"] for r in rows], m, yerr=[m - lo, hi - m], marker="o", capsize=3,
                                  label=NAMES[s])
        axes[0, col].set_title(f"{name}: reward `{tab['reward']}`, {tab['groups']} groups of {tab['group_size']}")
        axes[0, col].set_ylabel("D_reward = τ-b(r_final, r_clean)")
        axes[1, col].set_ylabel("D_judge − B_judge")
        axes[1, col].axhline(0, color="grey", lw=0.8)
        axes[2, col].set_ylabel("D_reward")
        for ax in axes[:2, col]:
            ax.set_xlabel("η (its meaning differs per sampler)")
        axes[2, col].set_xlabel("residual noise std(final − x̂₀), latent units")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
        axes[0, col].legend()
    fig.suptitle("Advantage distortion on the base model (1 = no reordering; 95% intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table_lines(tab: dict) -> list[str]:
    """A task's table as plain text (the report's markdown is tools/report.py's mechanism_tables)."""
    L = [f"{tab['task']}: {tab['groups']} groups x {tab['group_size']}, reward {tab['reward']}, judge {tab['judge']}"]
    for r in tab["rows"]:
        d, j, b = r["d_reward"], r["d_judge"], r["b_judge"]
        L.append(f"  {NAMES[r['sampler']]:>9} eta {r['eta']:<4} residual {r['residual']:.3f}  D_reward {d['mean']:.3f}"
                 f" [{d['lo']:.3f}, {d['hi']:.3f}] n {d['n']}  D_judge {j['mean']:.3f} (n {j['n']})  B_judge "
                 f"{b['mean']:.3f}  diff {r['judge_shift']['diff']:+.3f} [{r['judge_shift']['lo']:+.3f}, "
                 f"{r['judge_shift']['hi']:+.3f}]")
    return L


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="digits,shapes")
    ap.add_argument("--groups", type=int, default=GROUPS, help="groups per setting (a multiple of 8)")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "mechanism.json"
    res = json.loads(path.read_text()) if path.exists() else {}  # one task's run keeps the other's table
    for name in args.tasks.split(","):
        res[name] = task_table(study.TASKS[name], GRID, args.groups)
        print("\n".join(table_lines(res[name])), flush=True)
        path.write_text(json.dumps(res, indent=1))
    figure({k: res[k] for k in ("digits", "shapes") if k in res}, out / "mechanism_distortion.png")
    return res


if __name__ == "__main__":
    main()
