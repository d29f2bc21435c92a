"""A training session: everything around train.py's loop. Ranks and device (distributed.py), the run folder
(checkpoints.py), the prompt sets, the models and the policy (policy.py), the held-out evaluation (evaluation.py), the
logs and figures (logs.py), the final summary. Every check
that can fail runs before the run folder is written, and an error stops all ranks with one message.

What an iteration reports reaches `Session.log` as one `Report` (its `Scores`, its `Evaluation`, ...), computed by
train.py with every collective already done: logging only formats and writes, on rank 0.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flow_cps import checkpoints, distributed, hub, logs, models, plan, prompts, scoring
from flow_cps.config import RESUMABLE_CHANGES, Config, reward_options, sampler_problem, validate
from flow_cps.evaluation import Evaluation, HeldOut
from flow_cps.policy import Diverged, Policy
from flow_cps.precision import Precision, precision

EVAL = "eval/"  # the prefix of the held-out metrics in the logs
TRAIN_GRID = 8  # the training-sample grid: up to 8 members of each of the first 8 prompts' groups


@dataclass
class Scores:
    """An iteration's rewards: this rank's (`mine`: total, components, valid) and the world's."""
    mine: scoring.RewardOutput
    totals: Tensor  # (world samples,) every rank's totals in rank order, NaN where invalid
    components: dict[str, float]  # a weighted sum's components: the world's mean of each (empty for one reward)

    @property
    def invalid(self) -> int:
        """Samples of the world no reward could score."""
        return int((~torch.isfinite(self.totals)).sum())


@dataclass
class Report:
    """What one iteration logs (iteration 0: the base model's evaluation only)."""
    iteration: int
    scores: Scores | None = None
    stats: dict = field(default_factory=dict)  # train.Tally.reduce(): loss, clipfrac, approx_kl, ratios, ...
    evaluation: Evaluation | None = None
    train_metrics: dict = field(default_factory=dict)  # the held-out metrics on the training samples ('train/...')
    timer: dict = field(default_factory=dict)  # seconds per phase
    images: Tensor | None = None  # this rank's training samples, on evaluation iterations
    texts: list[str] = field(default_factory=list)  # their prompts (the training grid's row labels)


class Timer(dict):
    """Seconds per phase of the current iteration: `with timer("rollout"): ...`."""

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self[name] = self.get(name, 0.0) + time.perf_counter() - t0


def load_prompt_sets(cfg: Config):
    """(train, held-out) prompt sets, each (texts, metadata); --eval_prompt_file replaces the held-out split and
    --eval_prompts caps it."""
    try:  # an explicit evaluation file: a single training file is then used whole
        if cfg.eval_prompt_file and not os.path.isfile(cfg.eval_prompt_file):
            raise FileNotFoundError(f"--eval_prompt_file {cfg.eval_prompt_file}: no such file")
        whole = cfg.eval_prompt_file and os.path.isfile(cfg.prompts)
        train = prompts.load(cfg.prompts, "all" if whole else "train", cfg.seed)
        held_out = prompts.load(cfg.eval_prompt_file, "all") if cfg.eval_prompt_file else \
            prompts.load(cfg.prompts, cfg.eval_split, cfg.seed)
    except (ValueError, OSError) as e:
        raise SystemExit("prompt error: " + plan.prompt_error(cfg, e)) from None
    n = cfg.eval_prompts or len(held_out[0])
    return train, (held_out[0][:n], held_out[1][:n])


class Session:
    """Everything around the loop: ranks and device, the run folder, prompts, models and policy, logs, checkpoints.
    Every check that can fail runs before the folder is written; errors stop all ranks with one message."""

    def __init__(self, cfg: Config):
        self.cfg, self.folder = cfg, None
        validate(cfg)  # before set-up: a bad flag (--device cuda without CUDA) is one line on every rank, not a crash
        self.rank, self.world, self.device = distributed.setup(cfg.device, need_group=cfg.parallel == "fsdp",
                                                          timeout_minutes=cfg.collective_timeout)
        try:
            self.is_main, self.batch = self.rank == 0, plan.batch(cfg, self.world)
            if not self.is_main:  # each distinct reward failure is reported once, by rank 0 (scoring.gather)
                warnings.filterwarnings("ignore", category=scoring.RewardWarning)
            path = distributed.from_rank_zero(lambda: checkpoints.resolve(cfg.output_dir, cfg.preset, cfg.resume))
            self.folder = checkpoints.RunFolder(path, self.is_main, auto=not cfg.output_dir)
            self._open(cfg, path)
        except BaseException as e:
            self._fail(e)
            raise

    def _fail(self, error: BaseException) -> None:
        """With several ranks, stop every rank with one message (distributed.stop_every_rank). In a world of one, leave
        nothing behind for an in-process caller that starts another run: the logs, the run folder's lock and the
        process group (FSDP2's group of one) are released. A failure while releasing (wandb.finish, say) is printed
        and does not keep the other ranks waiting."""
        for release in (getattr(getattr(self, "logger", None), "close", None),
                        getattr(self.folder, "close", None)):
            try:
                if release is not None:
                    release()
            except Exception as e:
                print(f"while stopping: {type(e).__name__}: {e}")
        distributed.stop_every_rank(error)
        distributed.teardown(wait=False)

    def _open(self, cfg: Config, path) -> None:
        ckpt = distributed.from_rank_zero(lambda: self.folder.check(cfg.resume))
        self.config = dict(dataclasses.asdict(cfg), output_dir=str(path))
        if ckpt is not None:
            saved = self.folder.resume_state(ckpt)["config"]
            checkpoints.check_config(saved, self.config, RESUMABLE_CHANGES, dataclasses.asdict(Config()))
        self.train_set, self.eval_set = load_prompt_sets(cfg)
        self.precision = precision(cfg.precision, self.device)  # frozen-weight dtype, autocast, loss scaling
        self.policy, self.reward_fn, self.metrics = self._load(self.precision)
        self.held_out = HeldOut(*self.eval_set, self.metrics, steps=cfg.eval_steps, per_prompt=cfg.eval_per_prompt,
                                micro_batch=self.batch.micro_batch, guidance=cfg.eval_guidance, rank=self.rank,
                                world=self.world, pad=self.policy.fsdp)
        note = {"prompt_set": plan.prompt_note(cfg)} if plan.prompt_note(cfg) else {}
        self.folder.start(dict(self.config, **note), fresh=ckpt is None)  # the first write
        self.folder.warn_if_disk_is_short(checkpoints.checkpoint_bytes(self.policy), cfg.keep_checkpoints)
        self.history, self.start, self.iteration = [], 1, 0
        if ckpt is not None:
            self.history, last = self.folder.load(ckpt, self.policy)
            self.start = last + 1
        if self.is_main:
            print("\n".join(plan.describe(cfg, self.world, check_files=False, device=self.device.type)[0]))
            print(f"output: {path}" + (f" (resumed from {ckpt.name})" if ckpt else ""))
        self.logger = logs.Logger(self.folder.dir or path, self.is_main, cfg.report_to, self.history, self.config)

    def _load(self, prec: Precision):
        cfg = self.cfg
        opts = reward_options(cfg)
        if cfg.model not in models.BUILT_IN:  # weights missing: stop before loading anything, naming the files
            distributed.from_rank_zero(lambda: _resolve(cfg.model))
        try:
            with distributed.rank_zero_first():  # rank 0 fills caches (digits pre-training, downloads) first
                backbone = models.load_backbone(
                    cfg.model, self.device, resolution=cfg.resolution, guidance=cfg.guidance,
                    max_sequence_length=cfg.max_sequence_length, shift=cfg.shift,
                    quantize_timesteps=cfg.quantize_timesteps, offload=cfg.offload, dtype=prec.dtype,
                    cache_bytes=int(cfg.embedding_cache_gb * 2 ** 30))
                try:
                    reward_fn = scoring.RewardModel(cfg.reward, device=self.device, **opts)
                    metrics = scoring.RewardModel(cfg.eval_metrics, device=self.device, **opts)
                except FileNotFoundError as e:  # a reward's weights: the message names them and how to get them
                    raise SystemExit(f"reward error: {e}") from None
            for texts, _ in (self.train_set, self.eval_set):
                backbone.check_prompts(texts)
            problem = sampler_problem(cfg, backbone.sigmas(cfg.num_steps))  # on the model's own schedule
            if problem:
                raise ValueError(problem)
            policy = Policy(
                backbone, self.device, self.world, parallel=cfg.parallel, lr=cfg.lr, weight_decay=cfg.weight_decay,
                lora=cfg.lora, gradient_checkpointing=cfg.gradient_checkpointing, precision=prec,
                ema=plan.ema_schedule(cfg), seed=cfg.seed)
        except ValueError as e:  # a resolution the model cannot split, a prompt it cannot read, unknown LoRA targets
            raise SystemExit(f"config error: {e}") from None
        return policy, reward_fn, metrics

    def iterations(self):
        """The loop's iterations, with a progress bar."""
        for it in tqdm(range(self.start, self.cfg.iterations + 1), disable=not self.is_main, desc="GRPO",
                       dynamic_ncols=True):
            self.iteration = it
            yield it

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind, error, tb) -> None:
        """A diverged model or a failing reward stops the run with the iteration and the likely cause, before
        anything of that iteration is checkpointed; any error on one rank stops every rank (`_fail`)."""
        if error is None:
            return
        if isinstance(error, Diverged):
            error = SystemExit(f"iteration {self.iteration}: training diverged: {error}. Nothing of this iteration "
                               f"was saved. The learning rate ({self.cfg.lr}) is likely too high (or the gradient clip "
                               f"max_grad_norm {self.cfg.max_grad_norm} too loose); resume from the last checkpoint "
                               "with a smaller --lr")
        elif isinstance(error, scoring.RewardError):
            error = SystemExit(f"iteration {self.iteration}: {error}")
        self._fail(error)
        if isinstance(error, SystemExit):
            raise error from None

    def train_metrics(self, images, texts, meta) -> dict:
        """The held-out metrics on this iteration's (stochastic) training samples, over all ranks: the same rule as
        the evaluation's (scoring.GroupedSums: GenEval's per tag)."""
        _, sums = scoring.on_every_rank(self.metrics, images, texts, meta)
        return {f"train/{k}": v for k, v in scoring.GroupedSums.means(sums).items()}

    def log(self, rep: Report) -> None:
        """One row of metrics.jsonl / TensorBoard, the image grids of an evaluation iteration, a progress line."""
        row = dict(iteration=rep.iteration)
        if rep.scores is not None:
            finite = rep.scores.totals[torch.isfinite(rep.scores.totals)]
            row.update(reward=float(finite.mean()) if len(finite) else math.nan,
                       reward_std=float(finite.std()) if len(finite) > 1 else 0.0, invalid=rep.scores.invalid,
                       **rep.stats, **{f"reward/{k}": v for k, v in rep.scores.components.items()})
        row.update(rep.train_metrics)
        ev = rep.evaluation.metrics if rep.evaluation is not None else {}
        row.update({EVAL + k: v for k, v in ev.items()})
        row.update({f"time/{k}": v for k, v in rep.timer.items()})
        self.history.append(row)
        self.logger.log(row)
        if not self.is_main:
            return
        if rep.evaluation is not None:  # rows: fixed noises; columns: the first held-out prompts
            cols = rep.evaluation.columns
            self._image("eval", rep.evaluation.images, cols, rep.iteration,
                        [f"noise {k}" for k in range(Evaluation.GRID)], self.eval_set[0][:cols])
        if rep.images is not None:  # the training samples: the first prompts' groups of rank 0, one row each
            g = self.batch.group_size
            shown = [i for i in range(len(rep.images)) if i // g < TRAIN_GRID and i % g < TRAIN_GRID]
            cols = min(g, TRAIN_GRID)
            self._image("train", list(rep.images[shown]), cols, rep.iteration,
                        [rep.texts[i] for i in shown[::cols]] if rep.texts else [],
                        [f"sample {m + 1}" for m in range(cols)])
        evs = "  ".join(f"{k} {v:.4f}" for k, v in ev.items())
        if rep.scores is None:
            tqdm.write(f"base model (ODE, held-out): {evs}")
            return
        kl, t = f" kl {row['kl']:.2e}" if "kl" in row else "", rep.timer
        tqdm.write(f"it {rep.iteration:4d} | reward {row['reward']:.4f} | clipfrac {row['clipfrac']:.3f} approx_kl "
                   f"{row['approx_kl']:.2e}{kl} | invalid {row['invalid']} | rollout {t['rollout']:.2f}s reward "
                   f"{t['reward']:.2f}s train {t['train']:.2f}s" + (f" | eval: {evs}" if evs else ""))

    def _image(self, tag: str, images: list[Tensor], columns: int, iteration: int, row_labels: list[str],
               col_labels: list[str]) -> None:
        """The complete rows of `columns` images, one labelled grid (images/<tag>_<iteration>.png, TensorBoard /
        W&B)."""
        rows = len(images) // columns
        if rows:
            self.logger.image(tag, torch.stack(images[:rows * columns]), rows, iteration, row_labels[:rows],
                              col_labels)

    def checkpoint(self, it: int) -> None:
        if self.is_main or self.policy.fsdp:  # FSDP2: every rank writes its shards
            self.folder.save(it, self.policy, self.history, self.config, self.cfg.keep_checkpoints)
        distributed.barrier()

    def finish(self) -> dict:
        self.logger.close()
        summary = {}
        if self.is_main:
            base = next(h for h in self.history if h["iteration"] == 0)
            last = [h for h in self.history if any(k.startswith(EVAL) for k in h)][-1]
            self.folder.dir.write("reward_curve.png", logs.reward_curves(
                self.history, f"{self.cfg.sampler} eta={self.cfg.eta} on {self.cfg.model}"))
            print("\nheld-out metrics (ODE, EMA weights)      base  ->  trained")
            for k in base:
                if k.startswith(EVAL):
                    print(f"  {k.removeprefix(EVAL):<36} {base[k]:.4f} -> {last[k]:.4f}")
                    summary[k] = (base[k], last[k])
            out = self.folder.path
            print(f"figures: {out / 'reward_curve.png'}  {out / 'images'}\ncheckpoint: "
                  f"{out / 'checkpoints' / self.folder.complete_checkpoints()[0]}\nlog: {out / 'metrics.jsonl'}")
        self.folder.close()
        distributed.teardown()
        return dict(summary=summary, history=self.history, policy=self.policy, output_dir=self.folder.path)


def _resolve(model: str) -> None:
    try:
        hub.resolve_model(model)
    except ValueError as e:
        raise SystemExit(f"model error: {e}") from None
