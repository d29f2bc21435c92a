"""A run's reward: registered rewards (rewards.py) combined, checked and made loud.

    reward = RewardModel("digit_judge:1,clean_background:0.5", device, **options)
    out = reward(images, prompts, metadata)     # out.total (B,), out.components {name: (B,)}, out.valid (B,) bool

A weighted sum normalises each component first (`Normaliser`) and logs each raw component; a single reward trains on
its own scale. Samples a reward cannot score are invalid (excluded by GRPO), and failures are loud: non-finite images
are never scored, each distinct per-sample error is warned once and counted, and a component that scores nothing
raises `RewardError`, which stops the run. `parse_options` checks `--reward_options` before any work.

    python scoring.py ocr sign.png --prompt 'A sign that says "OPEN LATE"'        # score image files
    python scoring.py pickscore a.png --prompt "a cat" --options '{"pickscore": {"model": "/models/PickScore_v1"}}'
    python scoring.py --scales                                                   # the built-in rewards' scales
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

import digits
from rewards import NORMALISERS, REGISTRY, Normaliser, check_images


# -- options -----------------------------------------------------------------------------------------------------
def accepted_options(name: str) -> list[str] | None:
    """The option names reward `name` takes: its factory's parameters but `device` (and, for a factory that
    forwards **options, those of `factory.forwards_to`). None for a factory that takes any (**kwargs)."""
    factory = REGISTRY[name]
    forwards = getattr(factory, "forwards_to", None)
    params = [p for p in inspect.signature(factory).parameters.values() if not (forwards and p.kind is p.VAR_KEYWORD)]
    params += list(inspect.signature(forwards).parameters.values()) if forwards else []
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return sorted({p.name for p in params if p.name != "device" and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                              p.KEYWORD_ONLY)})


def check_options(name: str, options: dict) -> None:
    accepted = accepted_options(name)
    unknown = sorted(set(options) - set(accepted)) if accepted is not None else []
    if unknown:
        raise ValueError(f"--reward_options: reward {name!r} has no option {', '.join(map(repr, unknown))}; its "
                         f"options are: {', '.join(accepted) or '(none)'}")


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


# -- combination and failure handling ----------------------------------------------------------------------------
def parse_spec(spec: str) -> dict[str, float]:
    """'digit_judge:1,smoothness:0.5' -> {'digit_judge': 1.0, 'smoothness': 0.5}; a bare name has weight 1."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, w = part.partition(":")
        if name not in REGISTRY:
            raise ValueError(f"unknown reward {name!r} in {spec!r}; available: {', '.join(sorted(REGISTRY))}")
        try:
            out[name] = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"reward weight {w!r} in {spec!r} is not a number; write e.g. 'digit_judge:0.7'") from None
        if not math.isfinite(out[name]):
            raise ValueError(f"reward weight for {name!r} must be finite, got {w!r}")
    if not out:
        raise ValueError("empty reward spec; give at least one reward name, e.g. --reward digit_judge")
    return out


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
        self.normalisers = {name: getattr(fn, "normaliser", None) or NORMALISERS.get(name, Normaliser())
                            for name, fn in self.fns.items()}
        self.failures: dict[str, int] = {}  # "who: Type: message" -> number of samples it cost, over all calls

    def _count(self, who: str, cause: str, k: int, n: int, what: str = "samples failed", depth: int = 4) -> None:
        key = f"{who}: {cause}"
        if key not in self.failures:  # depth: the warning points at the line that called the RewardModel
            warnings.warn(f"reward {who}: {k} of {n} {what}: {cause} (reported once; later ones are counted in "
                          f"RewardModel.failures)", RewardWarning, stacklevel=depth)
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
        if len(self.weights) == 1:  # a single reward trains on its own scale (as the paper's runs do)
            (name, w), = self.weights.items()
            total = w * comps[name]
        else:
            total = torch.zeros(n)
            for name, w in self.weights.items():
                nrm = self.normalisers[name]
                total = total + w * (comps[name] - nrm.shift) / nrm.scale
        valid = torch.isfinite(total)
        return RewardOutput(total=torch.where(valid, total, torch.nan), components=comps, valid=valid)

    def group_keys(self, metadata: list) -> dict[str, list[str | None]]:
        """Per component, one group key per sample: `fn.group_key(metadata[i])` for a reward that has one (the
        GenEval rewards: the tag), else None. Log such a component as the mean over groups of the group means."""
        return {name: [key(m) for m in metadata] if (key := getattr(fn, "group_key", None)) else [None] * len(metadata)
                for name, fn in self.fns.items()}


def nan_mean(x: Tensor) -> float:
    x = x[torch.isfinite(x)]
    return float(x.mean()) if x.numel() else float("nan")


# -- command line: score image files; the built-in rewards' scales -----------------------------------------------
def score_files(spec: str, paths: list, prompt: str, options: dict | None = None, metadata: dict | None = None,
                device="cpu") -> list[dict]:
    """Score image files against one prompt: [{"image": path, "total": ..., <reward>: ...}, ...]."""
    from PIL import Image  # only the command line reads image files

    model, rows = RewardModel(spec, device, **(options or {})), []
    for path in paths:  # one at a time: files may differ in size
        with Image.open(path) as im:
            image = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
        out = model(image, [prompt], None if metadata is None else [metadata])
        rows.append({"image": str(path), "total": float(out.total[0]),
                     **{k: float(v[0]) for k, v in out.components.items()}})
    return rows


def print_scales() -> None:
    """The noise-sensitive rewards on the clean digits and with added noise (the numbers in their docstrings)."""
    imgs, _ = digits.load("test")
    g = torch.Generator().manual_seed(0)
    for name in ("clean_background", "smoothness", "jpeg_compressibility"):
        fn = REGISTRY[name]()
        row = [f"clean {float(fn(imgs, []).mean()):.3f}"]
        for s in (0.025, 0.05, 0.1, 0.2):
            noisy = (imgs + s * torch.randn(imgs.shape, generator=g)).clamp(0, 1)
            row.append(f"+N(0,{s}) {float(fn(noisy, []).mean()):.3f}")
        row.append(f"uniform {float(fn(torch.rand(imgs.shape, generator=g), []).mean()):.3f}")
        print(f"{name:>22}: " + "  ".join(row))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Score image files with a reward (or a weighted spec such as "
                                "'ocr:1,pickscore:0.5'), or print the built-in rewards' scales.")
    p.add_argument("reward", nargs="?", help=f"reward spec; one of {', '.join(sorted(REGISTRY))}")
    p.add_argument("images", nargs="*", help="image files (PNG, JPEG, ...)")
    p.add_argument("--prompt", default="", help="the prompt every image is scored against")
    p.add_argument("--options", default="{}", help='per-reward options as JSON, e.g. \'{"pickscore": {"model": '
                   '"/local/PickScore_v1"}}\'')
    p.add_argument("--metadata", default=None, help="per-prompt metadata as JSON (GenEval: tag/include/exclude)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--scales", action="store_true", help="print the built-in noise rewards' scales on the digits")
    args = p.parse_args(argv)
    if args.scales:
        return print_scales()
    if not args.reward or not args.images:
        p.error("give a reward and at least one image file (or --scales)")
    try:
        options = parse_options(args.options, list(parse_spec(args.reward)))
    except ValueError as e:
        p.error(str(e).replace("--reward_options", "--options"))
    rows = score_files(args.reward, args.images, args.prompt, options,
                       None if args.metadata is None else json.loads(args.metadata), args.device)
    for row in rows:
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else str(v) for k, v in row.items()))


if __name__ == "__main__":
    main()
