"""The run folder: claimed by one run at a time, checkpoints that are complete or ignored, and a resume that finds the
newest good one and reads nothing that can run code. Plumbing for train.py.

    runs/tiny/run-003/                 a fresh folder per run when --output_dir is not given (runs/tiny/latest -> it),
                                       reserved by creating it: two launches at once never share one
      .lock                            the lock and its holder's host and pid (lock.py)
      config.json                      the run's config; its "written_by" marks the folder as this project's
      metrics.jsonl  tensorboard/ or wandb/  images/  reward_curve.png
      checkpoints/iter_000150/         lora/ lora_ema/ (LoRA) or transformer/ transformer_ema/ (full fine-tuning),
                                       dcp/ (FSDP2: one safetensors file per rank), training_state.pt, MANIFEST.json
      checkpoints/latest               "iter_000150", for people (resume reads the checkpoint folders themselves)

A checkpoint is written into a new `.tmp-` folder; every file is fsynced and its size and sha256 go into
MANIFEST.json, written last; the folder is renamed to `iter_<iteration>` and the rename made durable before any
older checkpoint is removed. A checkpoint counts when its name is exactly one the run writes and it has a manifest;
it is good when the files under it are exactly those the manifest lists, with their sizes and hashes, and its
training state and safetensors files open without running code. Resume takes the newest good one by iteration
number and names each damaged one it skipped.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint.api import CheckpointException

from flow_cps import distributed, export, files, lora
from flow_cps.lock import Lock
from flow_cps.policy import Policy

WRITTEN_BY = "flow_cps train.py"  # config.json's mark: a fresh run clears only a folder that carries it
RUN_FILES = {"config.json", "metrics.jsonl", "reward_curve.png"}  # the files a run writes at the top of its folder
# The folders it writes, and the names it writes inside them (checkpoints: `is_checkpoint_entry`)
RUN_FOLDERS = {"images": re.compile(r"(eval|train)_\d{5,}\.png"),
               "tensorboard": re.compile(r"events\.out\.tfevents\..+"),
               "wandb": re.compile(r"(offline-)?run-\d{8}_\d{6}-\w+|latest-run|debug(-internal)?\.log"),
               "checkpoints": None}
_ITER = re.compile(r"iter_(\d{6,})")


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:06d}"


def iteration_of(name: str) -> int | None:
    """The iteration of a checkpoint folder named exactly as the run names it; None for any other name (a user's
    copy such as iter_best or iter_000150_keep is never resumed from, counted or deleted)."""
    m = _ITER.fullmatch(name)
    return int(m[1]) if m and name == checkpoint_name(int(m[1])) else None


def resolve(output_dir: str, preset: str, resume: bool) -> Path:
    """The run's folder. An explicit --output_dir is used as given. Without one: --resume continues the run that
    `runs/<preset>/latest` points to; a new run reserves the next free `runs/<preset>/run-NNN` by creating it
    (mkdir fails if another launch took that number first: it tries the next), so a rerun never touches an earlier
    run and two launches at once never share a folder."""
    if output_dir:
        return Path(output_dir)
    root = Path("runs") / preset
    if resume:
        latest = root / "latest"
        if not latest.is_symlink():
            raise SystemExit(f"--resume: no earlier run under {root}/ ({latest} is missing or not a link to a run "
                             "folder); give --output_dir of the run to continue, or run without --resume to start one")
        return root / os.readlink(latest)
    try:
        root.mkdir(parents=True, exist_ok=True)
        n = max((int(p.name[4:]) for p in root.glob("run-*") if p.name[4:].isdigit()), default=0) + 1
        while True:
            try:
                (root / f"run-{n:03d}").mkdir()
                return root / f"run-{n:03d}"
            except FileExistsError:
                n += 1
    except OSError as e:
        raise SystemExit(f"cannot create a run folder under {root}/ ({e.strerror}); run from a folder you can write "
                         "to, or give --output_dir") from None


class RunFolder:
    def __init__(self, path: Path, is_main: bool, auto: bool = False):
        self.path, self.is_main, self.auto = Path(path), is_main, auto
        self.root = self.path / "checkpoints"
        self.lock = Lock(self.path)
        self.created = self.started = False  # made by this run / written into (so a failure before removes it)
        self.resumed_from: int | None = None  # never pruned
        self._clear: list[str] = []  # what `start` removes for a fresh run (approved by `check`)

    # -- before any work: claim the folder, then decide whether this run may use it ----------------------------------
    def check(self, resume: bool) -> Path | None:
        """Rank 0. Lock the folder (creating it if needed) before looking inside, then return the checkpoint to
        resume from (None for a fresh run). Stops with one line if the folder cannot be used: a file, not writable,
        locked by a running run, holding a run without --resume, or holding files no run of this project wrote."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise SystemExit(f"--output_dir {p} is a file, not a folder; choose another --output_dir")
        existing = next((q for q in [p, *p.absolute().parents] if q.exists()), Path("."))
        try:  # a real probe (permission bits say little for root, or on read-only and network filesystems)
            tempfile.TemporaryFile(dir=existing).close()
        except OSError as e:
            raise SystemExit(f"--output_dir {p}: cannot write into {existing} ({e.strerror}); choose a folder you can "
                             "write to") from None
        self.created = not p.exists() or (self.auto and not resume)  # resolve() reserved a new run-NNN
        p.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        links = [n for n in RUN_FOLDERS if (p / n).is_symlink()]
        if links:
            raise SystemExit(f"{p / links[0]} is a symbolic link; a run writes only into real folders inside its run "
                             "folder: replace it with a folder (or make --output_dir itself the link)")
        good = self.complete_checkpoints()
        if resume and not good:
            raise SystemExit(f"--resume: no complete checkpoint in {self.root}; run without --resume to start fresh "
                             "(its incomplete files are then cleared)")
        if not resume and good:
            raise SystemExit(f"{p} already holds a run (checkpoint {good[0].name}); pass --resume true to continue "
                             "it, or choose another --output_dir")
        if not resume:
            self._clear = self._earlier_run()
        return self.newest_valid(good) if resume else None

    def _earlier_run(self) -> list[str]:
        """The entries an earlier run of this project left (a fresh run clears them in `start`): every entry must be
        a name the run writes, and config.json must carry WRITTEN_BY. Otherwise stops, naming the files."""
        entries = sorted(q.name for q in self.path.iterdir() if q.name != ".lock")
        if not entries:
            return []
        config = self.path / "config.json"
        try:
            ours = not config.is_symlink() and json.loads(config.read_text()).get("written_by") == WRITTEN_BY
        except (OSError, ValueError, AttributeError):
            ours = False
        foreign = [n for n in entries if not self._written_by_a_run(n)] if ours else entries
        if foreign:
            raise SystemExit(f"--output_dir {self.path} holds files that no run of this project wrote "
                             f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); a fresh run clears "
                             "only an earlier run's folder (its config.json names this project): choose an empty or "
                             "new --output_dir")
        return entries

    def _written_by_a_run(self, name: str) -> bool:
        q = self.path / name
        if name.startswith(files.TMP_PREFIX):
            return True
        if q.is_symlink():
            return False
        if name in RUN_FILES:
            return q.is_file()
        if name not in RUN_FOLDERS or not q.is_dir():
            return False
        ok = RUN_FOLDERS[name].fullmatch if RUN_FOLDERS[name] else is_checkpoint_entry
        return all(c.startswith(files.TMP_PREFIX) or ((not (q / c).is_symlink() or name == "wandb") and ok(c))
                   for c in os.listdir(q))  # wandb links its latest run and logs itself

    def start(self, config: dict, fresh: bool) -> None:
        """The first write: clear what `check` approved (fresh) or interrupted temporary files (resume), write
        config.json. Rank 0 only; the others wait at the barrier."""
        if self.is_main:
            if fresh and self._clear:
                print(f"{self.path}: cleared an earlier run that left no complete checkpoint "
                      f"({', '.join(self._clear)})")
            for q in [*(self.path / n for n in self._clear), *self._temporaries()]:
                _remove(q)
            files.write_atomic(self.path / "config.json", json.dumps({"written_by": WRITTEN_BY, **config}, indent=1))
            self.started = True
            if self.auto:  # runs/<preset>/latest -> this run, replaced atomically
                link = self.path.parent / f"{files.TMP_PREFIX}latest-{os.getpid()}"
                link.unlink(missing_ok=True)
                link.symlink_to(self.path.name)
                os.replace(link, self.path.parent / "latest")
        distributed.barrier()

    def _temporaries(self) -> list[Path]:
        return [q for d in (self.path, *(self.path / n for n in RUN_FOLDERS)) if d.is_dir()
                for q in d.glob(files.TMP_PREFIX + "*")]

    def warn_if_disk_is_short(self, checkpoint_bytes: int, keep: int) -> None:
        """A warning at the start when the free space cannot hold keep + 1 checkpoints (rank 0)."""
        free = shutil.disk_usage(self.path).free
        if self.is_main and free < (keep + 1) * checkpoint_bytes:
            print(f"warning: {self.path} has {free / 2 ** 30:.1f} GiB free, less than {keep + 1} checkpoints of "
                  f"~{checkpoint_bytes / 2 ** 30:.1f} GiB need (--keep_checkpoints {keep} + the one being written)")

    def close(self) -> None:
        """Release the lock. A run that stops before its first write leaves nothing: the lock file it created goes,
        and so does the folder if it created that (bad input writes nothing)."""
        self.lock.release()
        if not self.started and self.lock.made:
            (self.path / ".lock").unlink(missing_ok=True)
        if self.created and not self.started:
            try:
                self.path.rmdir()
            except OSError:  # no longer empty: someone else's now
                pass

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def complete_checkpoints(self) -> list[Path]:
        """The checkpoints named as the run names them that have a manifest, newest (highest iteration) first; their
        files are checked by `newest_valid`."""
        found = [q for q in self.root.glob("iter_*") if iteration_of(q.name) is not None and not q.is_symlink()
                 and (q / "MANIFEST.json").is_file()] if self.root.is_dir() else []
        return sorted(found, key=lambda q: iteration_of(q.name), reverse=True)

    def newest_valid(self, candidates: list[Path]) -> Path:
        """The newest checkpoint that `verify` finds good; says which damaged ones it skipped. Stops if none is."""
        problems = []
        for ckpt in candidates:
            problem = verify(ckpt)
            if problem is None:
                if problems and self.is_main:
                    print("resume: skipped damaged checkpoint(s): " + "; ".join(problems) + f"; using {ckpt.name}")
                return ckpt
            problems.append(f"{ckpt.name} ({problem})")
        raise SystemExit("--resume: every checkpoint is damaged: " + "; ".join(problems) +
                         "; run without --resume (and another --output_dir) to start again")

    def save(self, iteration: int, policy: Policy, history: list[dict], config: dict, keep: int) -> Path:
        """Write checkpoint `iteration` atomically and durably (call on every rank under FSDP2, else on rank 0). The
        earlier checkpoints stay intact until this one is complete and its rename is on disk; then all but the newest
        `keep` up to this one are removed, never this one nor the one the run resumed from."""
        final, tmp = self.root / checkpoint_name(iteration), None
        try:
            make = lambda: Path(tempfile.mkdtemp(prefix=f"{files.TMP_PREFIX}{final.name}-", dir=self.root))  # noqa: E731
            self.root.mkdir(exist_ok=True)
            tmp = distributed.from_rank_zero(make) if policy.fsdp else make()  # one folder every rank writes into
            self._write(tmp, iteration, policy, history, config)
            hashed = _hash_shares(tmp) if policy.fsdp else {}  # every rank hashes a share of the files
            if self.is_main:
                write_manifest(tmp, hashed)
                os.chmod(tmp, 0o777 & ~files.UMASK)  # mkdtemp's 0700 kept others out while it was written
                self._publish(tmp, final)
                files.write_atomic(self.root / "latest", final.name)
                self._prune(iteration, keep)
        except (OSError, RuntimeError, CheckpointException) as e:
            if self.is_main and tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            cause = _cause(e)
            free = shutil.disk_usage(self.root if self.root.exists() else self.path).free
            if getattr(cause, "errno", None) == errno.ENOSPC or free < 2 ** 20 or "unexpected pos" in str(cause):
                raise SystemExit(f"no space left on the device writing checkpoint {final.name} into {self.root} "
                                 f"({free / 2 ** 20:.0f} MiB free); the earlier checkpoints are intact: free space "
                                 "and continue with --resume true") from None
            raise
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename the finished folder into place (an earlier checkpoint of this number, damaged, is replaced) and make
        the rename durable."""
        if final.is_symlink():
            final.unlink()
        aside = None
        if final.exists():
            aside = Path(tempfile.mkdtemp(prefix=f"{files.TMP_PREFIX}old-{final.name}-", dir=self.root))
            os.replace(final, aside)  # a rename onto an empty folder
        os.replace(tmp, final)
        files.fsync_dir(self.root)
        if aside is not None:
            shutil.rmtree(aside)

    def _prune(self, iteration: int, keep: int) -> None:
        """Keep the newest `keep` checkpoints up to `iteration` (this one included) and the one resumed from; a
        checkpoint of a later iteration (one that resume skipped as damaged) is neither counted nor removed. Each
        removed folder is renamed to a temporary name first, so a half-removed one never looks complete."""
        older = [c for c in self.complete_checkpoints() if iteration_of(c.name) < iteration]
        for old in older[keep - 1:]:
            if iteration_of(old.name) != self.resumed_from:
                aside = self.root / f"{files.TMP_PREFIX}pruned-{old.name}"
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(old, aside)
                shutil.rmtree(aside)

    def _write(self, out: Path, iteration: int, policy: Policy, history: list[dict], config: dict) -> None:
        """The weights as diffusers loads them, live and EMA: lora/ and lora_ema/ (`pipe.load_lora_weights`), or
        for full fine-tuning transformer/ and transformer_ema/ (`from_pretrained`; under FSDP2 gathered tensor by
        tensor, written shard by shard: export.py). training_state.pt: iteration, history, RNG, config; without
        FSDP also the trained weights, EMA, AdamW state and step counter, which under FSDP2 go to dcp/, one
        safetensors file per rank (Policy.save_sharded; `read_sharded` assembles them)."""
        tr, kind = policy.backbone.transformer, policy.backbone.kind
        exports = [("", contextlib.nullcontext)] + ([("_ema", policy.ema_weights)] if policy.ema is not None else [])
        for suffix, weights in exports:
            with weights():
                if getattr(tr, "peft_config", None) is not None:
                    state = lora.lora_state_dict(tr)  # under FSDP: a collective gather of the LoRA tensors only
                    if self.is_main:
                        lora.save_lora(tr, out / f"lora{suffix}", state_dict=state, pipeline=kind)
                else:
                    export.save_transformer(tr, out / f"transformer{suffix}", self.is_main)
        if policy.fsdp:
            policy.save_sharded(out / "dcp")
        if self.is_main:
            state = dict(iteration=iteration, history=history, config=config, torch_rng=torch.get_rng_state(),
                         steps=policy.steps)
            state.update({} if policy.fsdp else policy.state())
            torch.save(state, out / "training_state.pt")

    def load(self, ckpt: Path, policy: Policy) -> tuple[list[dict], int]:
        """Restore the policy (and the global RNG) from `ckpt`; returns (history, iteration). Every rank reads."""
        st = load_state(ckpt / "training_state.pt")
        if policy.fsdp:
            policy.load_sharded(ckpt / "dcp")
            policy.steps = int(st.get("steps", 0))
        else:
            policy.load_state(st)
        torch.set_rng_state(st["torch_rng"])
        self.resumed_from = st["iteration"]
        return st["history"], st["iteration"]


def is_checkpoint_entry(name: str) -> bool:
    """What a run writes into checkpoints/: its checkpoint folders and the `latest` pointer."""
    return iteration_of(name) is not None or name == "latest"


def load_state(path: Path) -> dict:
    """training_state.pt holds only tensors, numbers, strings, lists and dicts: read with weights_only=True, so a
    file planted in a shared run folder cannot run code when someone resumes."""
    return torch.load(path, map_location="cpu", weights_only=True)


def read_sharded(folder: str | Path) -> dict[str, torch.Tensor]:
    """The whole tensors of an FSDP2 checkpoint's dcp/ folder, assembled in one process from the ranks' safetensors
    files: 'model.<parameter>' (diffusers' names), 'ema.<parameter>', 'optim.<parameter>.exp_avg', ... Holds the
    whole model in host memory."""
    meta = dcp.HuggingFaceStorageReader(str(folder)).read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()}
    dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(folder)), no_dist=True)
    return state


def check_config(saved: dict, given: dict, resumable: set[str], defaults: dict) -> None:
    """--resume continues the saved run exactly: only length, logging and output options may change."""
    diff = {k: (saved.get(k, defaults[k]), v) for k, v in given.items()
            if k not in resumable and saved.get(k, defaults[k]) != v}
    if diff:
        raise SystemExit(f"--resume with a different config: {diff} (saved, given). Resume with the saved values, or "
                         "start a new run.")


# -- the manifest ------------------------------------------------------------------------------------------------
def write_manifest(folder: Path, hashed: dict[str, str] | None = None) -> None:
    """MANIFEST.json: every file under `folder` with its size and sha256 (streamed; `hashed` holds those the ranks
    already computed). Each file is fsynced, then the folders, then the manifest itself."""
    names = [n for n in files.files_under(folder)[0] if n != "MANIFEST.json"]
    hashed = dict(hashed or {})
    missing = [n for n in names if n not in hashed]
    hashed.update(zip(missing, files.sha256_many([folder / n for n in missing])))
    entries = {n: dict(size=(folder / n).stat().st_size, sha256=hashed[n]) for n in names}
    files.fsync_tree(folder)
    files.write_atomic(folder / "MANIFEST.json", json.dumps(entries, indent=1))


def verify(ckpt: Path) -> str | None:
    """None if the files under `ckpt` are exactly those its manifest lists, each of its size and sha256 (every file,
    streamed), and the training state and every safetensors file open without running code; else what is wrong,
    naming the file."""
    try:
        entries = json.loads((ckpt / "MANIFEST.json").read_text())
        if not isinstance(entries, dict) or not all(isinstance(m, dict) and isinstance(m.get("size"), int) and
                                                    isinstance(m.get("sha256"), str) for m in entries.values()):
            return "MANIFEST.json is not a manifest (every file's size and sha256)"
    except (OSError, ValueError) as e:
        return f"MANIFEST.json unreadable: {e}"
    present, odd = files.files_under(ckpt)
    present.remove("MANIFEST.json")
    if odd:
        return f"{odd[0]} is a link or not a regular file"
    for name in sorted(set(present) - set(entries)):
        return f"{name} is not in the manifest"
    for name, meta in entries.items():
        if name not in present:
            return f"{name} is missing"
        if name.startswith("dcp/") and not name.endswith(".safetensors"):  # what torch's pickled format writes
            return f"{name} is not a safetensors shard (dcp/ holds only those; a planted file, or an older version's " \
                   "pickled format, which is not read)"
        size = (ckpt / name).stat().st_size
        if size != meta["size"]:
            return f"{name} has {size} bytes, {meta['size']} expected"
    for name, digest in zip(entries, files.sha256_many([ckpt / n for n in entries])):
        if digest != entries[name]["sha256"]:
            return f"{name} is corrupt (checksum mismatch)"
    for name in (n for n in entries if n.endswith(".safetensors")):
        try:
            with safe_open(ckpt / name, "pt") as f:
                f.keys()
        except Exception as e:  # the hash matched a rewritten manifest: not a safetensors file
            return f"{name} cannot be read as safetensors ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    try:
        load_state(ckpt / "training_state.pt")
    except Exception as e:  # e.g. a pickled object that weights_only refuses
        return f"training_state.pt cannot be loaded safely ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    return None


def checkpoint_bytes(policy: Policy) -> int:
    """About the size of one checkpoint: per trained parameter (numel is the global count, FSDP2 included), fp32
    (4 bytes) weights, AdamW's two moments (8) and the EMA (4) in the training state or dcp/ shards, plus the
    diffusers exports of the weights and of the EMA (4 + 4): 24 bytes with an EMA, 16 without."""
    return sum(p.numel() for p in policy.params) * (16 if policy.ema is None else 24)


def _hash_shares(folder: Path) -> dict[str, str]:
    """(Every rank, once every file is written) sha256 of the files under `folder`, each rank a share of them:
    {name: sha256} of all of them on every rank."""
    distributed.barrier()  # rank 0's exports and training state are written
    names = files.files_under(folder)[0]
    rank, world = distributed.rank_and_world()
    mine = dict(zip(names[rank::world], files.sha256_many([folder / n for n in names[rank::world]])))
    return {k: v for part in distributed.all_gather_objects(mine) for k, v in part.items()}


def _cause(e: BaseException) -> BaseException:
    """The first rank's exception inside torch.distributed.checkpoint's CheckpointException; others as they are."""
    if isinstance(e, CheckpointException) and e.failures:
        return next(iter(e.failures.values()))[0]
    return e


def _remove(q: Path) -> None:
    if q.is_dir() and not q.is_symlink():
        shutil.rmtree(q)
    else:
        q.unlink(missing_ok=True)
