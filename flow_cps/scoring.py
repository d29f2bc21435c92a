"""A run's reward: registered rewards (rewards.py) combined, checked and made loud, scored on every rank.

    reward = RewardModel("digit_judge:1,clean_background:0.5", device, **options)
    out = reward(images, prompts, metadata)     # out.total (B,), out.components {name: (B,)}, out.valid (B,) bool
    out, sums = on_every_rank(reward, images, prompts, metadata)   # and every rank's GroupedSums, failures gathered
    GroupedSums.means(sums)                     # {component: mean}: the one rule for every logged reward mean

A weighted sum normalises each component first (rewards.Normaliser) and logs each raw component; a single reward trains
on its own scale. Samples a reward cannot score are invalid (excluded by GRPO), and failures are loud: non-finite
images are never scored, each distinct per-sample error is warned once and counted, and a component that scores
nothing raises `RewardError`, which stops the run. `parse_options` checks `--reward_options` before any work.

The command line that scores image files is rewards.py's (`python rewards.py ocr sign.png --prompt '...'`).
"""
from __future__ import annotations

import inspect
import json
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flow_cps import distributed
from rewards import REGISTRY, check_images, combine, normaliser, parse_spec


# -- combination and failure handling ----------------------------------------------------------------------------
@dataclass
class RewardOutput:
    total: Tensor  # (B,) weighted sum of normalised components; NaN where invalid
    components: dict[str, Tensor]  # raw (un-normalised) per-reward scores, NaN where that reward failed
    valid: Tensor  # (B,) bool: every component scored the sample


class RewardError(RuntimeError):
    """A batch the rewards scored nothing of: every image non-finite, or a component that raised or returned NaN
    for every sample. Training on it would train on nothing, so it stops the run with what to check."""


class RewardWarning(UserWarning):
    """Some samples of a batch could not be scored (warned once per distinct cause; see RewardModel.failures)."""


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


class RewardModel:
    """A weighted combination of registered rewards, with loud, per-sample failure handling.

    * Images holding NaN/inf (a diverged model) are never scored: NaN for every component; all of them: RewardError.
    * A reward that raises is retried one sample at a time; those that still raise score NaN. Each distinct cause
      (component, exception type, message) is warned once ("reward ocr: 3 of 64 samples failed: ValueError: ...")
      and counted in `failures` ({cause: samples}) for the trainer to log.
    * A component that scores no sample of a non-empty batch of finite images (all raised, or all NaN: e.g. OCR on
      prompts without quoted text) raises RewardError naming it, the cause and what to check.
    """

    def __init__(self, spec: str, device="cpu", **options):
        self.weights = parse_spec(spec)
        for name in self.weights:
            check_options(name, options.get(name, {}))
        self.fns = {name: REGISTRY[name](device=device, **options.get(name, {})) for name in self.weights}
        self.normalisers = {name: normaliser(name, fn) for name, fn in self.fns.items()}
        self.failures: dict[str, int] = {}  # "who: Type: message" -> number of samples it cost, over all calls

    def _count(self, who: str, cause: str, k: int, n: int, what: str = "samples failed", depth: int = 4) -> None:
        key = f"{who}: {cause}"
        if key not in self.failures:  # depth: the warning points at the line that called the RewardModel
            warnings.warn(f"reward {who}: {k} of {n} {what}: {cause} (reported once; later ones are counted in "
                          f"RewardModel.failures)", RewardWarning, stacklevel=depth)
        self.failures[key] = self.failures.get(key, 0) + k

    def failures_since(self, before: dict[str, int]) -> dict[str, int]:
        """The failures counted since `before` (a copy of `failures` taken earlier): what a rank sends rank 0."""
        return {k: n - before.get(k, 0) for k, n in self.failures.items() if n != before.get(k, 0)}

    def merge_failures(self, per_rank: list[dict[str, int]]) -> None:
        """(rank 0) The failures each other rank counted (`failures_since`, index = rank; ranks > 0 do not warn):
        each distinct cause is warned once here, naming the rank, and counted under "rank R: <cause>"."""
        for rank, counts in enumerate(per_rank[1:], 1):
            for cause, k in counts.items():
                key = f"rank {rank}: {cause}"
                if key not in self.failures:
                    warnings.warn(f"reward {cause}: {k} samples failed on rank {rank} (reported once; later ones are "
                                  "counted in RewardModel.failures)", RewardWarning, stacklevel=3)
                self.failures[key] = self.failures.get(key, 0) + k

    def _score(self, name: str, images: Tensor, prompts: list[str], metadata) -> Tensor:
        fn, n = self.fns[name], len(prompts)
        try:
            return fn(images, prompts, metadata).detach().float().cpu().reshape(n)
        except Exception:  # isolate the failing sample(s): score one at a time, NaN for those that still fail
            pass
        out, errors = torch.full((n,), float("nan")), {}
        for i in range(n):
            try:
                out[i] = fn(images[i:i + 1], prompts[i:i + 1], None if metadata is None else metadata[i:i + 1]
                            ).detach().float().reshape(1)[0]
            except Exception as e:
                errors.setdefault(_describe(e), []).append(e)
        if errors and not torch.isfinite(out).any():
            causes = "; ".join(f"{len(v)} x {k}" for k, v in errors.items())
            rest = n - sum(map(len, errors.values()))
            raise RewardError(f"reward {name!r} failed for all {n} samples of the batch ({causes}"
                              f"{f'; {rest} returned NaN' if rest else ''}). Check its options (--reward_options), "
                              f"that its model loaded, and its inputs; the first failure's traceback is above."
                              ) from next(iter(errors.values()))[0]
        for cause, errs in errors.items():
            self._count(name, cause, len(errs), n)
        return out

    def __call__(self, images: Tensor, prompts: list[str], metadata: list | None = None) -> RewardOutput:
        check_images(images)
        n = len(prompts)
        if len(images) != n:
            raise ValueError(f"{len(images)} images but {n} prompts")
        finite = torch.isfinite(images.flatten(1)).all(1).cpu() if n else torch.ones(0, dtype=torch.bool)
        keep = finite.nonzero()[:, 0].tolist()
        if n and not keep:
            raise RewardError(f"all {n} images contain NaN or inf: the model diverged, nothing can be scored. Lower "
                              f"the learning rate or clip_range, check the sampler's eta, or resume from an earlier "
                              f"checkpoint.")
        if len(keep) < n:
            self._count("inputs", "images with NaN/inf values, not scored", n - len(keep), n, "images not finite", 3)
            images, prompts = images[keep], [prompts[i] for i in keep]
            metadata = None if metadata is None else [metadata[i] for i in keep]
        comps = {}
        for name in self.weights:
            scores = self._score(name, images, prompts, metadata)
            if keep and not torch.isfinite(scores).any():
                raise RewardError(f"reward {name!r} returned NaN for all {len(keep)} (finite) images of the batch: "
                                  f"it found nothing to score, so this run would train on nothing. Check that the "
                                  f"prompts carry what it needs (ocr: text in double quotes or metadata 'text'; "
                                  f"geneval*: GenEval metadata, from prompts.load('geneval') or a GenEval .jsonl).")
            comps[name] = torch.full((n,), float("nan"))
            comps[name][keep] = scores
        total = combine(self.weights, comps, self.normalisers)
        valid = torch.isfinite(total)
        return RewardOutput(total=torch.where(valid, total, torch.nan), components=comps, valid=valid)

    def group_keys(self, metadata: list) -> dict[str, list[str | None]]:
        """Per component, one group key per sample: `fn.group_key(metadata[i])` for a reward that has one (the
        GenEval rewards: the tag), else None. Log such a component as the mean over groups of the group means."""
        return {name: [key(m) for m in metadata] if (key := getattr(fn, "group_key", None)) else [None] * len(metadata)
                for name, fn in self.fns.items()}


class GroupedSums(dict):
    """{(component, group key): [sum, count]} of a RewardModel's finite scores over batches and ranks: the one rule
    behind every logged mean of a reward (the training reward's components, the held-out metrics on the training
    samples and on the held-out ones). A grouped component (GenEval: its tags) is reported as the mean over its
    groups' means, the others (one group, None) as the plain mean."""

    def add(self, reward: RewardModel, images: Tensor, prompts: list[str], metadata: list) -> None:
        """Score a batch with `reward` and add its finite scores."""
        self.count(reward, reward(images, prompts, metadata), metadata)

    def count(self, reward: RewardModel, out: RewardOutput, metadata: list) -> None:
        """Add the finite scores of `reward`'s output `out` for a batch with this metadata."""
        keys = reward.group_keys(metadata)
        for name, v in out.components.items():
            for j, x in enumerate(v.tolist()):
                if math.isfinite(x):
                    s = self.setdefault((name, keys[name][j]), [0.0, 0])
                    s[0], s[1] = s[0] + x, s[1] + 1

    @staticmethod
    def means(parts: list[GroupedSums]) -> dict[str, float]:
        """Several ranks' sums merged: {component: mean over its groups of the group means}."""
        merged = GroupedSums()
        for sums in parts:
            for key, (total, n) in sums.items():
                s = merged.setdefault(key, [0.0, 0])
                s[0], s[1] = s[0] + total, s[1] + n
        names = dict.fromkeys(name for name, _ in merged)
        return {m: float(np.mean([t / n for (name, _), (t, n) in merged.items() if name == m])) for m in names}



# -- on every rank ---------------------------------------------------------------------------------------------------
def gather(reward: RewardModel, before: dict[str, int], error: str | None, sums: GroupedSums) -> list[GroupedSums]:
    """The one collective after `reward` scored this rank's samples: every rank's `sums`, in rank order. A RewardError
    on any rank (`error`) is raised on every rank, so none waits at the next collective for one that stopped; rank 0
    reports the samples the other ranks could not score since `before` (a copy of `reward.failures` taken before
    scoring): warned once per cause, naming the rank, and counted in its `reward.failures`."""
    parts = distributed.all_gather_objects((sums, error, reward.failures_since(before)))
    if errors := [e for _, e, _ in parts if e]:
        raise RewardError(errors[0])
    if distributed.rank_and_world()[0] == 0:
        reward.merge_failures([f for _, _, f in parts])
    return [s for s, _, _ in parts]


def on_every_rank(reward: RewardModel, images: Tensor, prompts: list[str], metadata: list
                  ) -> tuple[RewardOutput, list[GroupedSums]]:
    """`reward` on this rank's samples: its output, and every rank's GroupedSums (`gather`)."""
    before, sums, out, error = dict(reward.failures), GroupedSums(), None, None
    try:
        out = reward(images, prompts, metadata)
        sums.count(reward, out, metadata)
    except RewardError as e:
        error = str(e)
    return out, gather(reward, before, error, sums)


# -- options, checked at start-up ------------------------------------------------------------------------------------
def _parameters(name: str) -> dict[str, inspect.Parameter] | None:
    """Reward `name`'s options: its factory's parameters but `device` (and, for a factory that forwards **options,
    those of `factory.forwards_to`). None for a factory that takes any (**kwargs)."""
    factory = REGISTRY[name]
    forwards = getattr(factory, "forwards_to", None)
    params = [p for p in inspect.signature(factory).parameters.values() if not (forwards and p.kind is p.VAR_KEYWORD)]
    params += list(inspect.signature(forwards).parameters.values()) if forwards else []
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name: p for p in params if p.name not in ("device", "reward") and p.kind in
            (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


# Option values with a fixed set of meanings; integer options count something (>= 1), except those with their own
# range: a JPEG quality is in [0, 100] (geneval_flow_grpo: 0 = no JPEG); these float options are fractions.
OPTION_CHOICES = {"dtype": ("float32", "float16", "bfloat16"), "scale": ("raw", "flow_grpo")}
INT_RANGES = {"quality": (0, 100), "jpeg_quality": (0, 100)}
FRACTIONS = {"threshold", "counting_threshold", "max_overlap", "position_margin"}


def _value_problem(key: str, value, param: inspect.Parameter | None) -> str | None:
    """What is wrong with an option's value (None: fine), judged by its default's type and the rules above."""
    if key in OPTION_CHOICES:
        return None if value in OPTION_CHOICES[key] else f"must be one of {', '.join(OPTION_CHOICES[key])}"
    default = None if param is None else param.default
    kind = type(default) if default not in (None, inspect.Parameter.empty) else \
        next((t for t in (int, str) if param is not None and t.__name__ in str(param.annotation)), None)
    if value is None and default is None:
        return None
    if kind is bool and not isinstance(value, bool):
        return "must be true or false"
    low, high = INT_RANGES.get(key, (1, math.inf))
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
        return f"must be a whole number in [{low}, {high}]" if key in INT_RANGES else "must be a whole number >= 1"
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                          or value < 0 or (key in FRACTIONS and value > 1)):
        return "must be a number in [0, 1]" if key in FRACTIONS else "must be a finite number >= 0"
    if kind is str and not isinstance(value, str):
        return "must be a string"
    return None


def check_options(name: str, options: dict) -> None:
    params = _parameters(name)
    unknown = sorted(set(options) - set(params)) if params is not None else []
    if unknown:
        raise ValueError(f"--reward_options: reward {name!r} has no option {', '.join(map(repr, unknown))}; its "
                         f"options are: {', '.join(sorted(params)) or '(none)'}")
    for key, value in options.items():
        problem = _value_problem(key, value, None if params is None else params[key])
        if problem:
            raise ValueError(f"--reward_options: {name}'s {key} {problem} (got {json.dumps(value)})")


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "true/false",
               type(None): "null"}


def parse_options(text: str, names: list[str]) -> dict[str, dict]:
    """--reward_options validated at config time: JSON, an object {reward name: {option: value}} whose names are
    among `names` (the rewards the run uses) and whose options are parameters of that reward's factory."""
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--reward_options is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} (char "
                         f"{e.pos}) of {text!r}") from None
    example = '\'{"pickscore": {"model": "/local/PickScore_v1"}}\''
    if not isinstance(opts, dict):
        raise ValueError(f"--reward_options must be a JSON object {{reward name: {{option: value}}}}, e.g. {example}; "
                         f"got a JSON {_JSON_TYPES.get(type(opts), type(opts).__name__)}: {text!r}")
    used = list(dict.fromkeys(names))
    for name, o in opts.items():
        if name not in used:
            raise ValueError(f"--reward_options has options for {name!r}, which this run does not use; its rewards "
                             f"are: {', '.join(used)}")
        if not isinstance(o, dict):
            raise ValueError(f"--reward_options: the value for {name!r} must be a JSON object of options, e.g. "
                             f"{{\"{name}\": {{\"option\": value}}}}; got a JSON "
                             f"{_JSON_TYPES.get(type(o), type(o).__name__)}: {json.dumps(o)}")
        check_options(name, o)
    return opts


