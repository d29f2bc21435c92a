"""The study of docs/STUDY.md as code: does the residual noise the SDE samplers leave slow GRPO down, and does CPS,
which leaves none, train faster? Written, with docs/STUDY.md, before any of its report seeds ran.

    python -m tools.bench --only study            # run what is missing (records: tools/runs.py), then the report
    python -m tools.bench --only study --hours 2  # start runs for two hours only; run it again to go on

The design (`DESIGNS`, one per task): groups of runs (a sampler, its eta, the log-prob it trains with, the recipe,
and which image the reward scores), each on the same report seeds; ONE primary comparison; the mechanism's
prediction, a difference of differences; a secondary family, Holm-adjusted. Every comparison is a - b paired by
seed, on the judge (an independent metric, never the reward) averaged over the evaluations after training starts
(`auc`: the shared base point left out). "level" is said only where a TOST margin was allowed (the pilots moved
the metric by at least five times it) and equivalence is shown; otherwise an interval that contains 0 is
"inconclusive". A comparison is reported only when every run of its groups has finished: a design run in parts
says how far it got and reports nothing of the parts that are not complete.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import grpo
import sampling
import train
from flow_cps import models, prompts, scoring
from flow_cps.evaluation import HeldOut
from tools import runs, stats
from tools.runs import quiet

ROOT = runs.ROOT
SDE = ["cps", "flow_sde", "dance_sde"]
# Per-run GRPO settings of every group (one process, one thread): Flow-GRPO's recipe unless a group says "dance".
RUN = dict(prompts_per_iter=8, group_size=8, updates_per_iter=2, report_to="none")
SAMPLES_PER_ITERATION = RUN["prompts_per_iter"] * RUN["group_size"]
DANCE_ARGS = ("--advantage", "dance", "--timesteps", "random", "--timestep_fraction", "0.6")


@dataclass(frozen=True)
class Task:
    """A built-in task as the study runs it."""
    name: str
    judge: str  # the held-out metric: independent of the reward
    reward: str  # what GRPO trains on
    args: tuple[str, ...]  # train.py flags selecting the task
    figure_prompts: tuple[str, ...]  # the columns of the Figure-1 grid
    held_out: str  # what the held-out evaluation holds out, in words
    eval_split: str = "test"  # the prompt split the runs evaluate (the primary metric's)
    quality: str = "clean_background"  # the quality measure beside the reward
    final_split: str = ""  # a second split evaluated once, after training (a secondary measure)

    @property
    def eval_prompts(self) -> int:
        return len(prompts.load(self.name, self.eval_split)[0])


TASKS = {
    "digits": Task("digits", "digit_svm_accuracy", "digit_judge", ("--model", "digits"),
                   tuple(f"a handwritten digit {d}" for d in range(10)),
                   "the noises, the ODE sampler and the EMA weights, not the prompts (the digits' encoder maps every "
                   "phrasing of a digit to one vector)"),
    "shapes": Task("shapes", "scene_judge", "scene_reward", ("--preset", "shapes"),
                   ("a red square", "two blue triangles", "three yellow circles", "a green circle and a red square",
                    "a yellow square above a blue triangle", "a red circle left of a green triangle"),
                   "prompts never trained on, of trained compositions (the 'fresh' split), besides the noises, the "
                   "ODE sampler and the EMA weights", eval_split="fresh", final_split="test"),
}


@dataclass(frozen=True)
class Group:
    """A setting the study trains on every report seed."""
    sampler: str
    eta: float
    log_prob: str = ""  # "" = the sampler's own (CPS: Eq. 14; the SDEs: Eq. 13)
    recipe: str = "flow_grpo"  # or "dance": DanceGRPO's advantage rule and a random 60% of the steps
    reward_image: str = "final"  # or "x0_hat": the reward scores the last step's x0_hat, without residual noise

    @property
    def label(self) -> str:
        lp = {"": "", "cps": ", CPS log-prob", "gaussian": ", Gaussian log-prob"}[self.log_prob]
        return (f"{NAMES[self.sampler]} η {self.eta:g}{lp}" + (", Dance recipe" if self.recipe == "dance" else "")
                + (", reward on x0_hat" if self.reward_image == "x0_hat" else ""))

    @property
    def slug(self) -> str:
        return (f"{self.sampler}-eta{self.eta:g}-lp_{self.log_prob or 'own'}-{self.recipe}-"
                f"reward_{self.reward_image}")

    def argv(self, task: Task, seed: int, iterations: int, eval_every: int, eval_per_prompt: int) -> tuple:
        return (*task.args, *(x for k, v in RUN.items() for x in (f"--{k}", str(v))),
                "--iterations", str(iterations), "--eval_every", str(eval_every),
                "--eval_per_prompt", str(eval_per_prompt), "--eval_split", task.eval_split,
                "--sampler", self.sampler, "--eta", f"{self.eta:g}", "--seed", str(seed),
                "--checkpoint_every", str(iterations), "--reward_image", self.reward_image,
                *(DANCE_ARGS if self.recipe == "dance" else ()), *(("--log_prob", self.log_prob) if self.log_prob
                                                                    else ()))


NAMES = {"cps": "CPS", "flow_sde": "Flow-SDE", "dance_sde": "Dance-SDE", "ode": "ODE"}


@dataclass(frozen=True)
class Comparison:
    """a - b, paired by seed, of the judge's `auc`."""
    label: str
    a: Group
    b: Group


@dataclass(frozen=True)
class Prediction:
    """The mechanism's prediction as a difference of differences, paired by seed: (a_hi - b_hi) - (a_lo - b_lo) > 0,
    the gap grows where the residual noise distorts the advantages more."""
    label: str
    hi: Comparison
    lo: Comparison


@dataclass(frozen=True)
class Design:
    task: Task
    seeds: tuple[int, ...]
    iterations: int
    eval_every: int
    eval_per_prompt: int
    primary: Comparison
    prediction: Prediction
    secondary: tuple[Comparison, ...]
    margin: float | None  # the TOST margin, where the pilots allowed one (None: no equivalence claims)
    residual_samples: int = 128  # final training samples whose residual noise each run measures

    @property
    def groups(self) -> list[Group]:
        """Every group, the primary's first (a study run in parts finishes those first)."""
        cs = [self.primary, self.prediction.hi, self.prediction.lo, *self.secondary]
        return list(dict.fromkeys(g for c in cs for g in (c.a, c.b)))

    def jobs(self, seeds: tuple[int, ...] | None = None) -> list[runs.Job]:
        """Seed-major within each group, groups in priority order."""
        return [runs.Job(self.task.name, g.slug, k, g.argv(self.task, k, self.iterations, self.eval_every,
                                                         self.eval_per_prompt), measure_final,
                         dict(task=self.task.name, sampler=g.sampler, eta=g.eta, log_prob=g.log_prob,
                              residual_samples=self.residual_samples, eval_per_prompt=self.eval_per_prompt))
                for g in self.groups for k in (seeds or self.seeds)]


# -- what a run measures after training -----------------------------------------------------------------------------
def objective(sampler: str, eta: float, log_prob: str = "") -> train.Objective:
    """The objective of a rollout: only the sampler, eta and the log-prob (the sampler's own by default) roll out."""
    lp = log_prob or sampling.DEFAULT_LOG_PROB.get(sampler, "gaussian")
    return train.Objective(sampling.SAMPLERS[sampler], eta, sampling.LOG_PROBS[lp], grpo.kl_mse, 0.0, 1.0)


def sample(backbone, texts: list[str], sampler: str, eta: float, seed: int, log_prob: str = ""):
    """Training samples as a run draws them (10 steps, fixed noises): the trajectory, with its final x0_hat."""
    gens = train.generators(train.Stream.SAMPLE_NOISE, [(seed, 0, i, 0) for i in range(len(texts))])
    samples = train.Samples(texts, [None] * len(texts), gens, gens)
    return train.rollout(backbone, objective(sampler, eta, log_prob), backbone.sigmas(10), samples, None, 64)[0]


def residual(traj) -> float:
    """std(final sample - the last step's x0_hat), per sample, mean, in latent units (images x 2 - 1): exactly 0
    for a coefficients-preserving sampler, whose last step returns x0_hat."""
    return float((traj.final - traj.x0_hat).flatten(1).std(1).mean())


@torch.no_grad()
def measure_final(policy, job: runs.Job) -> dict:
    """After training: the residual noise and quality of the trained policy's training samples (fixed prompts and
    noises, the run's own sampler and eta), and the judge on the task's second split (held-out compositions) with
    the EMA weights, on the same fixed noises as the evaluation."""
    o = job.options
    task = TASKS[o["task"]]
    texts = (prompts.load(task.name, "train")[0] * o["residual_samples"])[:o["residual_samples"]]
    traj = quiet(sample, policy.backbone, texts, o["sampler"], o["eta"], 999, o["log_prob"])
    quality = scoring.RewardModel(task.quality)(policy.backbone.decode(traj.final), texts).total
    out = dict(residual=residual(traj), quality=float(quality.mean()))
    if task.final_split:
        texts, meta = prompts.load(task.name, task.final_split)
        metrics = scoring.RewardModel(f"{task.judge},scene_credit" if task.name == "shapes" else task.judge)
        ev = train.evaluate(policy, HeldOut(texts, meta, metrics, steps=10, per_prompt=o["eval_per_prompt"],
                                            micro_batch=64))
        out[task.final_split] = ev.metrics
    return out


def trained_backbone(task: Task, run_dir: Path):
    """The task's model with a finished run's final LoRA (the live weights that drew its last training samples)."""
    bb = models.load_builtin_backbone(task.name)
    ckpt = sorted((Path(run_dir) / "checkpoints").glob("iter_*"))[-1]
    bb.transformer.load_lora_adapter(str(ckpt / "lora"), weight_name="pytorch_lora_weights.safetensors")
    return bb


# -- what a run's held-out curve says -------------------------------------------------------------------------------
def curve(record: dict, metric: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [e for e in record["evals"] if f"eval/{metric}" in e]
    return np.array([e["iteration"] for e in rows]), np.array([e[f"eval/{metric}"] for e in rows])


def at(record: dict, metric: str, iteration: int) -> float:
    its, values = curve(record, metric)
    return float(values[its == iteration][0]) if iteration in its else math.nan


def auc(record: dict, metric: str) -> float:
    """The mean of the held-out metric over the evaluations after training starts (iterations e, 2e, ..., T): the
    base point, shared by every group, is left out, so it cannot dilute a difference; evaluations are equally spaced
    at every setting, so this is the trapezoid area but for the end points' weights."""
    its, values = curve(record, metric)
    return float(values[its > 0].mean())


def training_reward(record: dict, first: bool, window: int = 5) -> float:
    """The mean training reward (stochastic samples, the reward GRPO sees) of the first or last `window` iterations."""
    r = record["training"]["reward"]
    return float(np.mean(r[:window] if first else r[-window:]))


def describe(task: Task, records: list[dict], iterations: int) -> dict:
    """A group's runs: the judge's AUC and its value at each quarter of the run, the reward against the judge and
    the quality measure (training reward first and last 5 iterations; held-out base -> final), the residual noise
    of the trained policy's training samples, the second split's judge, minutes per run."""
    quarters = [iterations * k // 4 for k in range(1, 5)]

    def change(metric):
        return stats.summary([at(r, metric, iterations) - at(r, metric, 0) for r in records])
    out = dict(auc=stats.summary([auc(r, task.judge) for r in records]),
               at={q: stats.summary([at(r, task.judge, q) for r in records]) for q in quarters},
               base=stats.summary([at(r, task.judge, 0) for r in records]),
               hacking=dict(reward_first=stats.summary([training_reward(r, True) for r in records]),
                            reward_last=stats.summary([training_reward(r, False) for r in records]),
                            judge=change(task.judge), reward=change(task.reward), quality=change(task.quality)),
               residual=stats.summary([r["measured"]["residual"] for r in records]),
               minutes=float(np.mean([r["wall"] for r in records]) / 60))
    if task.final_split:
        out[task.final_split] = {m: stats.summary([r["measured"][task.final_split][m] for r in records])
                                 for m in records[0]["measured"][task.final_split]}
    return out


def compare(task: Task, a: list[dict], b: list[dict], margin: float | None) -> dict:
    """a - b of the judge's AUC, paired by seed: difference, interval, p, sign test, and TOST where a margin is
    allowed."""
    x, y = [auc(r, task.judge) for r in a], [auc(r, task.judge) for r in b]
    return dict(stats.paired(x, y), tost=stats.tost(x, y, margin) if margin else None)


def difference_of_differences(task: Task, hi: tuple[list, list], lo: tuple[list, list]) -> dict:
    """(a_hi - b_hi) - (a_lo - b_lo) of the judge's AUC, paired by seed; one-sided p for > 0 beside the two-sided."""
    d_hi = [auc(a, task.judge) - auc(b, task.judge) for a, b in zip(*hi)]
    d_lo = [auc(a, task.judge) - auc(b, task.judge) for a, b in zip(*lo)]
    out = stats.paired(d_hi, d_lo)
    from scipy import stats as sps

    out["p_greater"] = float(sps.ttest_rel(d_hi, d_lo, alternative="greater").pvalue) if out["sd"] > 0 else math.nan
    return out


def verdict(d: dict, p: float, margin: float | None) -> str:
    """The words a table may use: a difference only where the (adjusted) test rejects; "level" only where a margin
    was allowed and TOST shows equivalence within it; otherwise "inconclusive"."""
    within = margin is not None and d["tost"] is not None and d["tost"]["p"] < 0.05
    if p < 0.05:
        return ("higher" if d["diff"] > 0 else "lower") + (f", by less than {margin:g}" if within else "")
    return f"level (within ±{margin:g})" if within else "inconclusive"


# -- a design's results from its records ----------------------------------------------------------------------------
def analyse(design: Design, records: dict[str, dict]) -> dict:
    """Everything the report says of one task, from the runs' records; a comparison whose groups are not complete is
    listed as pending, never computed on part of its seeds."""
    task, done = design.task, {}
    for g in design.groups:
        rs = [records.get(f"{task.name}/{g.slug}/seed{k}") for k in design.seeds]
        if all(rs):
            done[g] = rs
    complete = lambda *gs: all(g in done for g in gs)  # noqa: E731
    out = dict(task=task.name, judge=task.judge, reward=task.reward, quality=task.quality, held_out=task.held_out,
               eval_prompts=task.eval_prompts, final_split=task.final_split, seeds=list(design.seeds),
               iterations=design.iterations, eval_every=design.eval_every, eval_per_prompt=design.eval_per_prompt,
               margin=design.margin, samples=SAMPLES_PER_ITERATION,
               progress={g.label: sum(f"{task.name}/{g.slug}/seed{k}" in records for k in design.seeds)
                         for g in design.groups},
               groups={g.label: describe(task, rs, design.iterations) for g, rs in done.items()},
               primary=None, prediction=None, secondary={}, pending=[])
    p = design.primary
    if complete(p.a, p.b):
        d = compare(task, done[p.a], done[p.b], design.margin)
        out["primary"] = dict(d, label=p.label, verdict=verdict(d, d["p"], design.margin))
    else:
        out["pending"].append(p.label)
    pr = design.prediction
    if complete(pr.hi.a, pr.hi.b, pr.lo.a, pr.lo.b):
        d = difference_of_differences(task, (done[pr.hi.a], done[pr.hi.b]), (done[pr.lo.a], done[pr.lo.b]))
        out["prediction"] = dict(d, label=pr.label, verdict="the gap grows" if d["p_greater"] < 0.05 else
                                 "not shown (one-sided p >= 0.05)")
    else:
        out["pending"].append(pr.label)
    family = [c for c in design.secondary if complete(c.a, c.b)]
    if len(family) == len(design.secondary):  # Holm needs the whole family
        comps = {c.label: compare(task, done[c.a], done[c.b], design.margin) for c in family}
        holm = stats.holm({k: d["p"] for k, d in comps.items()})
        tost_holm = stats.holm({k: d["tost"]["p"] for k, d in comps.items()}) if design.margin else {}
        for k, d in comps.items():
            if design.margin:
                d["tost"]["p_holm"] = tost_holm[k]
            adjusted = dict(d, tost=dict(d["tost"], p=tost_holm[k]) if design.margin else None)
            out["secondary"][k] = dict(d, p_holm=holm[k], verdict=verdict(adjusted, holm[k], design.margin))
    else:
        out["pending"] += [c.label for c in design.secondary]
    out["runs"] = sum(out["progress"].values())
    out["of"] = len(design.groups) * len(design.seeds)
    out["process_minutes"] = sum(r["wall"] for rs in done.values() for r in rs) / 60
    return out


# -- the design (docs/STUDY.md) -------------------------------------------------------------------------------------
REPORT_SEEDS = tuple(range(3001, 3011))  # never used by any run of this repository before this design (docs/STUDY.md)
PILOT_SEEDS = (2001,)  # the pilots' only seed: pilots choose the shapes run length and the margins, nothing else
LO, HI = 0.7, 1.4  # Flow-SDE's eta levels, chosen from the mechanism table (docs/STUDY.md, "The design")
DANCE_ETA = 0.3  # DanceGRPO's own eta
C7, C7_DANCE = Group("cps", LO, "cps"), Group("cps", LO, "cps", recipe="dance")
F_LO, F_LO_X0 = Group("flow_sde", LO, "cps"), Group("flow_sde", LO, "cps", reward_image="x0_hat")
F_HI, F_HI_X0 = Group("flow_sde", HI, "cps"), Group("flow_sde", HI, "cps", reward_image="x0_hat")
F_LO_OWN = Group("flow_sde", LO, "gaussian")
DANCE = Group("dance_sde", DANCE_ETA, "gaussian", recipe="dance", reward_image="x0_hat")  # DanceGRPO as run


def design(task: Task, iterations: int, eval_every: int, eval_per_prompt: int, margin: float | None,
           seeds: tuple[int, ...] = REPORT_SEEDS) -> Design:
    """The same comparisons on every task."""
    return Design(
        task, seeds, iterations, eval_every, eval_per_prompt,
        primary=Comparison(f"Flow-SDE η {HI:g}: reward on x0_hat − reward on the final sample (the residual noise "
                           "alone)", F_HI_X0, F_HI),
        prediction=Prediction(f"the residual noise's cost grows with η: (x0_hat − final) at η {HI:g} − at η {LO:g}",
                              hi=Comparison("", F_HI_X0, F_HI), lo=Comparison("", F_LO_X0, F_LO)),
        secondary=(
            Comparison(f"Flow-SDE η {LO:g}: reward on x0_hat − on the final sample", F_LO_X0, F_LO),
            Comparison(f"CPS − Flow-SDE, both η {LO:g} with CPS's log-prob (the sampler alone, App. D)", C7, F_LO),
            Comparison(f"CPS − Flow-SDE, both η {LO:g}, each with its own log-prob (as the papers run them)", C7,
                       F_LO_OWN),
            Comparison(f"Flow-SDE η {LO:g}: CPS log-prob − Gaussian log-prob (App. D)", F_LO, F_LO_OWN),
            Comparison(f"CPS η {LO:g} − Dance-SDE η {DANCE_ETA:g}, each on its own recipe", C7, DANCE),
            Comparison(f"CPS η {LO:g} − Dance-SDE η {DANCE_ETA:g}, both on the Dance recipe (the sampler alone)",
                       C7_DANCE, DANCE)),
        margin=margin)


# digits' margin: its pilots moved the judge by 0.090 (CPS) and 0.072 (Flow-SDE η 1.4); 0.072 / 5 rounds down to 0.01.
# The shapes task is not trained: its pilots lowered the judge on every split in every recipe tried (docs/STUDY.md).
DESIGNS = {"digits": design(TASKS["digits"], iterations=80, eval_every=10, eval_per_prompt=50, margin=0.01)}
NOT_TRAINED = {"shapes": "its pilots (results/pilots) lowered the judge on training, fresh and held-out prompts alike "
                         "while the training reward rose: GRPO hacks `scene_reward`, so the judge cannot show which "
                         "sampler learns faster (docs/STUDY.md, \"Pilots\")"}


def probe_jobs(designs: dict[str, Design] = DESIGNS) -> list[runs.Job]:
    """The probe (tools/runs.py): every group of each design, 3 iterations, one seed (0)."""
    return [j for d in designs.values()
            for j in dataclasses.replace(design(d.task, 3, 3, 2, None, seeds=(0,)), residual_samples=8).jobs()]


# -- the pilots: what chose the shapes run length and the margins (docs/STUDY.md, "Pilots") ------------------------
PILOT_ROOT = runs.RECORDS.parent / "pilots"  # records of the pilots; their run folders in results/cache-pilots


def pilot(task: Task, iterations: int, eval_every: int, eval_per_prompt: int, groups=(C7, F_HI)) -> Design:
    """Groups on the pilot seed: how far the judge moves, and when it stops rising."""
    a, b = groups if len(groups) == 2 else (groups[0], groups[0])
    pair = Comparison("pilot", a, b)
    return Design(task, PILOT_SEEDS, iterations, eval_every, eval_per_prompt, primary=pair,
                  prediction=Prediction("", pair, pair), secondary=(), margin=None)


def recipe(task: Task, *flags: str) -> Task:
    """The task with other training flags: a recipe the shapes pilots tried (docs/STUDY.md, "Pilots")."""
    return dataclasses.replace(task, name=task.name, args=(*task.args, *flags))


PILOTS = {"digits": pilot(TASKS["digits"], 80, 10, 50), "shapes": pilot(TASKS["shapes"], 200, 20, 12),
          # the shapes preset's CPS pilot hacked its reward (docs/STUDY.md): two recipes tried next, CPS only
          "shapes-lr1e-3": pilot(recipe(TASKS["shapes"], "--lr", "1e-3"), 120, 20, 12, groups=(C7,)),
          "shapes-kl": pilot(recipe(TASKS["shapes"], "--beta", "0.04"), 120, 20, 12, groups=(C7,))}


def pilot_summary(root: Path = PILOT_ROOT) -> dict:
    """Every pilot's record in brief (the report's pilot table), and the shapes models' judge per split."""
    out = []
    for path in sorted(root.glob("*/*/seed*.json")):
        r = runs.load(path)
        task = TASKS[path.parent.parent.name]
        its, judge = curve(r, task.judge)
        out.append(dict(task=task.name, pilot=path.parent.name, seed=int(path.stem[4:]), judge=task.judge,
                        curve=[[int(i), float(v)] for i, v in zip(its, judge)],
                        quality=[at(r, task.quality, 0), at(r, task.quality, int(its[-1]))],
                        reward=[training_reward(r, True), training_reward(r, False)],
                        residual=r["measured"]["residual"], minutes=r["wall"] / 60,
                        argv=" ".join(a for a in r["argv"] if a not in ("--report_to", "none"))))
    return dict(runs=out, shapes_splits=runs.load(root / "shapes_splits.json"))


@torch.no_grad()
def split_judge(backbone, split: str, per_tag: int = 24, noises: int = 4, seed: int = 11) -> dict:
    """The shapes judge (mean over tags) and clean_background of 10-step ODE samples of up to `per_tag` prompts per
    tag of a split (a fixed draw), `noises` fixed noises each."""
    texts, meta = prompts.load("shapes", split)
    by_tag: dict[str, list[int]] = {}
    for i, m in enumerate(meta):
        by_tag.setdefault(m["tag"], []).append(i)
    rng = np.random.default_rng(seed)
    chosen = [i for tag in sorted(by_tag) for i in rng.permutation(by_tag[tag])[:per_tag].tolist()]
    texts, meta = [texts[i] for i in chosen], [meta[i] for i in chosen]
    metric, cond = scoring.RewardModel("scene_judge,clean_background"), backbone.encode(texts)
    judge, background = [], []
    for k in range(noises):
        gens = train.generators(train.Stream.EVAL_NOISE, [(10_000 + i, k) for i in range(len(texts))])
        x1 = torch.stack([sampling.randn(backbone.latent_shape, g) for g in gens])
        traj = sampling.rollout(lambda x, t: backbone.velocity(x, t, cond), x1, backbone.sigmas(10), "ode")
        out = metric(backbone.decode(traj.final), texts, meta).components
        judge += out["scene_judge"].tolist()
        background += out["clean_background"].tolist()
    tags = [m["tag"] for m in meta] * noises
    per_tag_mean = [np.mean([j for j, t in zip(judge, tags) if t == tag]) for tag in sorted(set(tags))]
    return dict(judge=float(np.mean(per_tag_mean)), clean_background=float(np.mean(background)),
                images=len(judge), prompts=len(texts))


def main(argv: list[str] | None = None) -> None:
    """python -m tools.study pilots [task ...]: run the pilots (records under results/pilots) and print what they
    show; python -m tools.study splits: the shapes judge of the base model and of every finished shapes pilot's final
    weights on the training, fresh and held-out splits (results/pilots/shapes_splits.json)."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("what", choices=["pilots", "splits"])
    p.add_argument("tasks", nargs="*", default=list(PILOTS))
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.what == "splits":
        models_ = {"base model": models.load_builtin_backbone("shapes")}
        for folder in sorted(runs.scratch(PILOT_ROOT).glob("shapes/*/seed*")):
            if (folder / "checkpoints").is_dir():
                models_[folder.parent.name] = trained_backbone(TASKS["shapes"], folder)
        out = {name: {split: split_judge(bb, split) for split in ("train", "fresh", "test")}
               for name, bb in models_.items()}
        runs.write(PILOT_ROOT / "shapes_splits.json", out)
        for name, splits in out.items():
            print(name, {k: (round(v["judge"], 3), round(v["clean_background"], 3)) for k, v in splits.items()})
        return
    jobs = [dataclasses.replace(j, group=f"{t}-{j.group}" if t != j.task else j.group)
            for t in args.tasks for j in PILOTS[t].jobs()]
    version = runs.code_version(measure_final)
    todo = [(j, PILOT_ROOT) for j in jobs if runs.load(j.path(PILOT_ROOT)) is None]
    runs.pool(todo, version, args.workers, desc="pilot runs")
    for j in jobs:
        r = runs.load(j.path(PILOT_ROOT))
        task = TASKS[j.task]
        its, values = curve(r, task.judge)
        print(f"{j.name}: {task.judge} " + ", ".join(f"{i}: {v:.3f}" for i, v in zip(its, values)) +
              f"; residual {r['measured']['residual']:.3f}; {r['wall'] / 60:.1f} min")


if __name__ == "__main__":
    main()
