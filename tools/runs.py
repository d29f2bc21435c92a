"""The study's training runs as committed records, so that the study can run in parts and every number of its report
is rebuilt from files in the repository:

    results/runs/<task>/<group>/seed<k>.json    one finished run (a few KB)
    results/runs/probes/<code version>.json     the probe: a fixed set of short runs on that code version
    results/cache-runs/...                       the runs' folders (checkpoints, logs, images; not committed)

A record holds what the report needs of a run and nothing else: its argv, the code version it ran on, every held-out
evaluation (iteration and metrics), the training reward and approx_kl per iteration, the measurements taken after
training (the residual noise of its final training samples, ...), its wall time, and when and where it ran. It is
written atomically as its run finishes, so an interrupted study loses only the runs in flight.

Reuse across code versions. A record made on code version V (`code_version`: the text of every module train.py
imports, this measuring code and the library versions) is reused on the current version C when V == C, or when the
probe of V equals the probe of C bit for bit. The probe (`PROBE`) runs each sampler and recipe of the study for a
few iterations on both tasks and keeps their records; so a change that claims "no numeric change" shows it, by a
committed file, before any old record is reused, and a change that moves a number makes every record stale.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import inspect
import io
import json
import multiprocessing
import os
import platform
import shutil
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import peft
import torch
import transformers
from tqdm.auto import tqdm

import train

ROOT = Path(__file__).resolve().parent.parent  # the repository root
RECORDS = ROOT / "results" / "runs"
KEPT_PER_ITERATION = ("reward", "reward_std", "approx_kl")  # of each training iteration's metrics
VOLATILE = ("code", "wall", "finished", "machine")  # what may differ between two records of the same computation


@dataclass(frozen=True)
class Job:
    """One training run: `argv` decides it. `measure(policy, job) -> dict` (a module-level function, so that worker
    processes can receive it) runs after training on the trained policy; its result is kept in the record."""
    task: str
    group: str  # a folder name: the group's slug
    seed: int
    argv: tuple[str, ...]
    measure: Callable | None = None
    options: dict = field(default_factory=dict, hash=False, compare=False)  # what `measure` needs

    @property
    def name(self) -> str:
        return f"{self.task}/{self.group}/seed{self.seed}"

    def path(self, root: Path = RECORDS) -> Path:
        return root / self.task / self.group / f"seed{self.seed}.json"


def training_modules(entry: Path = ROOT / "train.py") -> list[Path]:
    """Every project file the entry point imports, directly or through others (read from the import graph with ast,
    so a module added to the training path joins the code version without anyone listing it)."""
    import ast

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


def code_version(*measuring: Callable) -> str:
    """The text of every module train.main imports, of this file and of the measuring functions given, and the
    versions of the libraries that compute the numbers."""
    h = hashlib.sha256(" ".join(f"{m.__name__} {m.__version__}" for m in (torch, diffusers, transformers, peft))
                       .encode())
    for path in [*training_modules(), Path(__file__)]:
        h.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    for fn in measuring:
        h.update(inspect.getsource(fn).encode())
    return h.hexdigest()[:12]


def quiet(fn, *args, **kwargs):
    """fn with stdout/stderr captured (a training run prints its plan, a progress bar and a line per iteration)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        return fn(*args, **kwargs)


def record_of(job: Job, history: list[dict], measured: dict, wall: float, version: str) -> dict:
    """What a record keeps of a run's history: every evaluation row's held-out metrics (and the held-out metrics of
    that iteration's training samples), and per training iteration KEPT_PER_ITERATION."""
    evals = [{k: v for k, v in h.items() if k == "iteration" or k.startswith(("eval/", "train/"))}
             for h in history if any(k.startswith("eval/") for k in h)]
    training = {k: [h[k] for h in history if "reward" in h] for k in KEPT_PER_ITERATION}
    return dict(name=job.name, argv=list(job.argv), code=version, evals=evals, training=training, measured=measured,
                wall=wall, finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                machine=f"{platform.node()}: {os.cpu_count()} CPU cores, torch {torch.__version__}")


def scratch(root: Path) -> Path:
    """Where the runs of a records folder keep their run folders (checkpoints, logs, images): beside it, named
    cache-<name> (results/cache-runs for results/runs: not committed, .gitignore's results/cache-*/)."""
    return root.parent / f"cache-{root.name}"


def run(job: Job, version: str, root: Path = RECORDS) -> dict:
    """Train one run in this process (one thread), measure it, write its record atomically; returns the record."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = scratch(root) / job.task / job.group / f"seed{job.seed}"
    if folder.exists():  # an interrupted attempt: start over (a record exists only for finished runs)
        shutil.rmtree(folder)
    t0 = time.perf_counter()
    try:
        out = quiet(train.main, [*job.argv, "--output_dir", str(folder)])
        measured = job.measure(out["policy"], job) if job.measure else {}
    finally:
        torch.set_num_threads(threads)
    record = record_of(job, out["history"], measured, time.perf_counter() - t0, version)
    write(job.path(root), record)
    return record


def write(path: Path, data: dict) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=None, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def numbers(record: dict) -> dict:
    """A record without what may differ between two runs of the same computation (time, place, code version)."""
    return {k: v for k, v in record.items() if k not in VOLATILE}


# -- the probe: is an old code version numerically this one? -------------------------------------------------------
def probe(jobs: list[Job], version: str, root: Path = RECORDS, workers: int = 2) -> dict:
    """The probe records of `version` (run and stored if missing): {job name: record without VOLATILE}."""
    path = root / "probes" / f"{version}.json"
    if not path.is_file():
        with tempfile_dir() as tmp:
            records = pool([(j, tmp) for j in jobs], version, workers, desc="probe runs")
        write(path, {name: numbers(r) for name, r in sorted(records.items())})
    return load(path)


@contextlib.contextmanager
def tempfile_dir():
    import tempfile

    with tempfile.TemporaryDirectory(prefix="flow_cps-probe-") as tmp:
        yield Path(tmp)


def equivalent_versions(version: str, root: Path = RECORDS) -> set[str]:
    """The code versions whose probe equals `version`'s bit for bit (version itself included); none without a
    probe, or with an empty one (it would equal every other empty probe)."""
    mine = load(root / "probes" / f"{version}.json")
    same = {version}
    for p in (root / "probes").glob("*.json"):
        if mine and p.stem != version and load(p) == mine:
            same.add(p.stem)
    return same


def reusable(job: Job, versions: set[str], root: Path = RECORDS) -> dict | None:
    """The job's record, if there is one for its argv made on a code version numerically equal to this one."""
    r = load(job.path(root))
    return r if r is not None and r["argv"] == list(job.argv) and r["code"] in versions else None


# -- running many --------------------------------------------------------------------------------------------------
def _run_in_worker(job: Job, version: str, root: Path) -> dict:
    return run(job, version, root)


def pool(jobs: list[tuple[Job, Path]], version: str, workers: int, deadline: float | None = None,
         desc: str = "training runs") -> dict[str, dict]:
    """Run (job, records root) pairs in `workers` single-threaded processes (0: one after another in this process);
    a run is started only before the deadline (time.time()), so a study can be run in parts. Returns the records of
    the runs that finished."""
    out: dict[str, dict] = {}
    todo = list(jobs)
    if workers == 0:
        for job, root in tqdm(todo, desc=desc):
            if deadline is None or time.time() < deadline:
                out[job.name] = run(job, version, root)
        return out
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as ex, \
            tqdm(total=len(todo), desc=desc) as bar:  # spawn: a fresh interpreter per worker, no forked threads
        running = {}
        while todo or running:
            while todo and len(running) < workers and (deadline is None or time.time() < deadline):
                job, root = todo.pop(0)
                running[ex.submit(_run_in_worker, job, version, root)] = job
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                job = running.pop(f)
                out[job.name] = f.result()
                bar.update()
    return out


def run_missing(jobs: list[Job], probe_jobs: list[Job], measuring: tuple[Callable, ...], workers: int = 2,
                hours: float | None = None, root: Path = RECORDS) -> tuple[dict[str, dict], list[Job]]:
    """Every job's record: reused where a numerically equal code version made it, run otherwise (new runs start only
    in the first `hours`). Returns (records by job name, the jobs still missing)."""
    version = code_version(*measuring)
    if probe_jobs:  # this version's probe: what later versions compare themselves with
        probe(probe_jobs, version, root, workers)
    versions = equivalent_versions(version, root)
    records = {j.name: r for j in jobs if (r := reusable(j, versions, root)) is not None}
    todo = [j for j in jobs if j.name not in records]
    deadline = time.time() + hours * 3600 if hours is not None else None
    records.update(pool([(j, root) for j in todo], version, workers, deadline))
    return records, [j for j in jobs if j.name not in records]
