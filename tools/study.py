"""The sampler comparison behind bench.py's report: GRPO training runs on the built-in digits model, and the
statistics a reviewer asks for.

Design (each choice made before any result was seen):
  * tuning seeds choose each sampler's eta (by the area under its held-out curve, mean over tuning seeds); every
    claimed difference is measured on report seeds that played no part in choosing anything;
  * held-out metric: judge accuracy of deterministic ODE samples with the EMA weights, 10 held-out prompts x 50 fixed
    noises = 500 images (one image = 0.002), at several budgets (20 / 40 / 80 iterations), the iterations to reach
    fixed thresholds, and the area under the curve (AUC: mean accuracy over training, trapezoid);
  * differences are paired by seed (same prompts, noises and initial LoRA): mean, 95% t-interval over seeds, and the
    minimum difference the design detects (two-sided 5%, power 80%) from the observed spread;
  * runs are cached by their full argv and a hash of the training code, so a changed loop retrains.
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
from pathlib import Path

import diffusers
import numpy as np
import peft
import torch
import transformers
from scipy import stats
from tqdm.auto import tqdm

import sampling
import train
from flow_cps import digits, models, scoring

ROOT = Path(__file__).resolve().parent.parent  # the repository root
NAMES = {"cps": "CPS", "flow_sde": "Flow-SDE", "dance_sde": "Dance-SDE", "ode": "ODE"}
METRIC = "eval/digit_judge_accuracy"
# Per-run GRPO settings of every comparison (one process, one thread): 8 prompts x 8 samples per iteration.
RUN_ARGS = ["--prompts_per_iter", "8", "--group_size", "8", "--updates_per_iter", "2", "--report_to", "none"]
DANCE_ARGS = ["--advantage", "dance", "--timesteps", "random", "--timestep_fraction", "0.6"]


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
def job(name: str, sampler: str, eta: float, seed: int, budget: dict, out: Path, size: int = 8, log_prob: str = "",
        noise: int = 0) -> dict:
    """One training run's description: its argv decides it (and its cache key)."""
    argv = [*RUN_ARGS, "--iterations", str(budget["iterations"]), "--eval_every", str(budget["eval_every"]),
            "--eval_per_prompt", str(budget["eval_per_prompt"]), "--sampler", sampler, "--eta", f"{eta:.6g}",
            "--seed", str(seed), "--checkpoint_every", str(budget["iterations"]),
            *(DANCE_ARGS if sampler == "dance_sde" else []), *(["--resolution", str(size)] if size != 8 else []),
            *(["--log_prob", log_prob] if log_prob else [])]
    return dict(name=name, sampler=sampler, eta=eta, seed=seed, size=size, log_prob=log_prob, argv=argv,
                noise=noise, dir=str(out / "runs" / name.replace("/", "_")))


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
        res["noise"] = residual_noise(out["policy"].backbone, j["sampler"], j["eta"], j["noise"], j["log_prob"])
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


@torch.no_grad()
def residual_noise(backbone, sampler: str, eta: float, n: int, log_prob: str = "", seed: int = 999) -> dict:
    """Final training samples (fixed prompts and noises): residual noise std(final - the last step's x0_hat) in
    latent units (exactly 0 for a coefficients-preserving sampler, whose last step returns x0_hat) and the
    clean_background reward of the images."""
    texts = (digits.prompts("train") * n)[:n]
    gens = train.generators(train.Stream.SAMPLE_NOISE, [(seed, 0, i, 0) for i in range(n)])
    step = sampling.SAMPLERS[sampler]
    traj, _ = train.rollout(backbone, texts, gens, gens, grid=backbone.sigmas(10), step=step, eta=eta, window=None,
                            log_prob=sampling.LOG_PROBS[log_prob or sampling.DEFAULT_LOG_PROB[sampler]],
                            micro_batch=64, device="cpu")
    images = backbone.decode(traj.final)
    cb = scoring.RewardModel("clean_background")(images, texts).total
    return dict(residual=float((traj.final - traj.x0_hat).flatten(1).std(1).mean()),
                clean_background=float(cb.mean()))


def trained_backbone(run_dir: str, size: int = 8):
    """The digits model with a finished run's final LoRA (the live weights that drew its last training samples)."""
    bb = models.load_digits_backbone(resolution=size)
    ckpt = sorted((Path(run_dir) / "checkpoints").glob("iter_*"))[-1]
    bb.transformer.load_lora_adapter(str(ckpt / "lora"), weight_name="pytorch_lora_weights.safetensors")
    return bb


# -- what a run's held-out curve says -------------------------------------------------------------------------------
def curve(run: dict) -> tuple[np.ndarray, np.ndarray]:
    rows = [h for h in run["history"] if METRIC in h]
    return np.array([h["iteration"] for h in rows]), np.array([h[METRIC] for h in rows])


def at(run: dict, iteration: int) -> float:
    its, acc = curve(run)
    return float(acc[its == iteration][0]) if iteration in its else math.nan


def auc(run: dict) -> float:
    """Mean held-out accuracy over the run: trapezoid area under the curve / its length."""
    its, acc = curve(run)
    return float(np.trapezoid(acc, its) / (its[-1] - its[0]))


def iterations_to(run: dict, threshold: float) -> float:
    """First iteration whose held-out accuracy reaches the threshold, linearly interpolated between evaluations;
    inf if never."""
    its, acc = curve(run)
    for k in range(len(its)):
        if acc[k] >= threshold:
            if k == 0:
                return float(its[0])
            return float(its[k - 1] + (threshold - acc[k - 1]) / (acc[k] - acc[k - 1]) * (its[k] - its[k - 1]))
    return math.inf


def summary(values: list[float]) -> dict:
    """Mean and 95% t-interval over seeds (inf values, runs that never reached a threshold, are counted apart)."""
    x = np.array([v for v in values if math.isfinite(v)])
    n = len(x)
    half = float(stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return dict(mean=float(x.mean()) if n else math.nan, lo=float(x.mean() - half) if n else math.nan,
                hi=float(x.mean() + half) if n else math.nan, n=n, of=len(values), values=list(values))


def paired(a: list[float], b: list[float]) -> dict:
    """a - b paired by seed: mean, 95% t-interval, p (paired t-test), and the minimum detectable difference of this
    design (two-sided 5%, power 80%, the observed spread of the differences)."""
    d = np.array(a) - np.array(b)
    n = len(d)
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    se = sd / math.sqrt(n) if n > 1 else math.nan
    t = float(stats.t.ppf(0.975, n - 1)) if n > 1 else math.nan
    p = float(stats.ttest_rel(a, b).pvalue) if n > 1 and sd > 0 else math.nan
    return dict(diff=float(d.mean()), lo=float(d.mean() - t * se), hi=float(d.mean() + t * se), p=p, n=n, sd=sd,
                mdd=float((t + stats.t.ppf(0.8, n - 1)) * se) if n > 1 else math.nan,
                detected=bool(n > 1 and (d.mean() - t * se > 0 or d.mean() + t * se < 0)), diffs=d.tolist())


def describe(runs: list[dict], budgets: list[int], thresholds: list[float]) -> dict:
    """A group of seeds' runs (one sampler, eta, size): budgets, thresholds, AUC, each with its interval."""
    return dict(acc={b: summary([at(r, b) for r in runs]) for b in budgets}, auc=summary([auc(r) for r in runs]),
                reach={t: summary([iterations_to(r, t) for r in runs]) for t in thresholds},
                residual=summary([r["noise"]["residual"] for r in runs if "noise" in r]),
                clean_background=summary([r["noise"]["clean_background"] for r in runs if "noise" in r]),
                wall=float(np.mean([r["wall"] for r in runs])))


def compare(a: list[dict], b: list[dict], budgets: list[int]) -> dict:
    """a vs b, paired by seed: at each budget and on AUC."""
    out = {f"acc@{k}": paired([at(r, k) for r in a], [at(r, k) for r in b]) for k in budgets}
    out["auc"] = paired([auc(r) for r in a], [auc(r) for r in b])
    return out


# -- figures --------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(groups: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Held-out accuracy vs iteration, mean and 95% band over report seeds, one line per group."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, runs in groups.items():
        its = curve(runs[0])[0]
        acc = np.array([curve(r)[1] for r in runs])
        mean = acc.mean(0)
        half = stats.t.ppf(0.975, len(runs) - 1) * acc.std(0, ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else 0
        ax.plot(its, mean, marker="o", ms=3, label=label)
        ax.fill_between(its, mean - half, mean + half, alpha=0.15)
    ax.set(xlabel="GRPO iteration (64 samples each)", ylabel="held-out judge accuracy (ODE, 500 images)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_dose_response(rows: list[dict], path: Path) -> Path:
    """CPS - Flow-SDE (AUC, 95% interval over report seeds) against the number of image tokens."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for k, (label, style) in enumerate({"tuned": ("each at its tuned η", "o-"),
                                        "equal": ("both at η 0.7", "s--")}.items()):
        pts = [r for r in rows if r["kind"] == label]
        x = np.array([r["tokens"] for r in pts]) * (1 + 0.03 * (2 * k - 1))
        y = np.array([r["auc"]["diff"] for r in pts])
        err = np.array([[r["auc"]["diff"] - r["auc"]["lo"] for r in pts], [r["auc"]["hi"] - r["auc"]["diff"]
                                                                           for r in pts]])
        ax.errorbar(x, y, yerr=err, fmt=style[1], capsize=4, label=style[0])
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.minorticks_off()  # log-scale minor labels would overprint the sizes
    ax.set_xticks([r["tokens"] for r in rows if r["kind"] == "tuned"])
    ax.set_xticklabels([f"{r['size']}x{r['size']}\n{r['tokens']} tokens" for r in rows if r["kind"] == "tuned"])
    ax.set(ylabel="CPS − Flow-SDE, held-out AUC", title="Does CPS's advantage grow with the image size?")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.no_grad()
def figure1(run_dir: str, size: int, etas: dict[str, float], path: Path, n: int = 10) -> dict:
    """The paper's Figure 1 from a trained model: the same prompts (digits 0-9) and initial noises, sampled with the
    ODE and with each SDE at its tuned eta (all with the CPS-trained model, so only the sampler differs); rows
    labelled by sampler, columns by digit. Returns each row's residual noise."""
    plt = _plt()
    bb = trained_backbone(run_dir, size)
    texts = [f"a handwritten digit {d}" for d in range(n)]
    gens = lambda: train.generators(train.Stream.SAMPLE_NOISE, [(2024, 0, i, 0) for i in range(n)])  # noqa: E731
    rows, residual = {}, {}
    for sampler in ["ode", "cps", "flow_sde", "dance_sde"]:
        eta = etas.get(sampler, 0.0)
        step = sampling.SAMPLERS[sampler]
        traj, _ = train.rollout(bb, texts, gens(), gens(), grid=bb.sigmas(10), step=step, eta=eta, window=None,
                                log_prob=sampling.LOG_PROBS[sampling.DEFAULT_LOG_PROB[sampler]], micro_batch=n,
                                device="cpu")
        rows[sampler] = bb.decode(traj.final)[:, 0]
        residual[sampler] = float((traj.final - traj.x0_hat).flatten(1).std(1).mean())
    fig, axes = plt.subplots(len(rows), n, figsize=(1.25 * n, 1.45 * len(rows)))
    for r, (sampler, images) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(images[c].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"digit {c}", fontsize=9)
            if c == 0:
                label = NAMES[sampler] + ("" if sampler == "ode" else f"\nη {etas[sampler]:g}")
                ax.set_ylabel(label, fontsize=9)
    fig.suptitle(f"Final training samples, {size}x{size}, one trained model, the same prompts and noises", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return residual
