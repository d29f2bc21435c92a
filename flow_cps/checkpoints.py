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

The folder is held by its descriptor (folder.py): every write, rename and delete goes through it, so a subfolder
swapped mid-run is never written through. A checkpoint is written into a new private `.tmp-` folder; every file is
fsynced and its size and sha256 go into MANIFEST.json (manifest.py), written last; the folder is renamed to
`iter_<iteration>` and the rename made durable before any older checkpoint is removed. A checkpoint counts when its
name is exactly one the run writes and it has a manifest; it is good when the files under it are exactly those the
manifest lists, with their sizes and hashes (and signed, with a key), its training state and safetensors files open
without running code, and the state's iteration is its name's. Resume takes the newest good one by iteration number
and names each damaged one it skipped. docs/RUN_FOLDER.md says what this holds against.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from flow_cps import distributed, export, lora, manifest
from flow_cps.files import UMASK
from flow_cps.folder import TMP_PREFIX, Folder, NotRegular
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
MAX_CONFIG_BYTES = 2 ** 20  # config.json is a few KiB: a bigger one is not a run's (a sparse file can claim TiB)


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


class Checkpoint(NamedTuple):
    """A checkpoint `check` verified: its folder's name and inode, so that every rank opens that very folder."""
    name: str
    inode: int

    @property
    def iteration(self) -> int:
        return iteration_of(self.name)


class RunFolder:
    """The run folder, held by its descriptor from `check` (rank 0; the other ranks open it on first use), and the
    subfolders the run writes into (Folder.child: opened once, and checked on each use to still be there)."""

    def __init__(self, path: Path, is_main: bool, auto: bool = False):
        self.path, self.is_main, self.auto = Path(path), is_main, auto
        self.lock = Lock(self.path)
        self.key = manifest.key(self.path)  # None: the manifest detects corruption, not tampering
        self.dir: Folder | None = None
        self.made: list[Path] = []  # the folders `check` created, outermost first (removed if the run never starts)
        self.created = self.started = False  # made by this run / written into (so a failure before removes it)
        self.resumed_from: int | None = None  # never pruned
        self._clear: list[str] = []  # what `start` removes for a fresh run (approved by `check`)
        self._resume: Folder | None = None  # the checkpoint `check` verified, held until it is loaded
        self._state: dict | None = None  # its training state, read once

    # -- before any work: claim the folder, then decide whether this run may use it ----------------------------------
    def check(self, resume: bool) -> Checkpoint | None:
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
        self.made = _make_folders(p)
        self.created = bool(self.made) or (self.auto and not resume)  # or resolve() reserved a new run-NNN
        self.dir = Folder.open(p)
        self.lock.acquire(self.dir.fd)
        for name in RUN_FOLDERS:  # a link or a file where a run writes a folder stops the run now, not mid-run
            if self.dir.lstat(name) is not None:
                self.dir.child(name)
        good = self.complete_checkpoints()
        if resume and not good:
            raise SystemExit(f"--resume: no complete checkpoint in {p / 'checkpoints'}; run without --resume to start "
                             "fresh (its incomplete files are then cleared)")
        if not resume and good:
            raise SystemExit(f"{p} already holds a run (checkpoint {good[0]}); pass --resume true to continue it, or "
                             "choose another --output_dir")
        if not resume:
            self._clear = self._earlier_run()
        return self.newest_valid(good) if resume else None

    def _earlier_run(self) -> list[str]:
        """The entries an earlier run of this project left (a fresh run clears them in `start`): every entry must be
        a name the run writes, and config.json must carry WRITTEN_BY. Otherwise stops, naming the files."""
        entries = [n for n in self.dir.names() if n != ".lock"]
        if not entries:
            return []
        try:
            ours = json.loads(self.dir.read("config.json", MAX_CONFIG_BYTES)).get("written_by") == WRITTEN_BY
        except (OSError, ValueError, AttributeError):  # missing, a link, a FIFO, too big, not JSON, not an object
            ours = False
        foreign = [n for n in entries if not self._written_by_a_run(n)] if ours else entries
        if foreign:
            raise SystemExit(f"--output_dir {self.path} holds files that no run of this project wrote "
                             f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); a fresh run clears "
                             "only an earlier run's folder (its config.json names this project): choose an empty or "
                             "new --output_dir")
        return entries

    def _written_by_a_run(self, name: str) -> bool:
        st = self.dir.lstat(name)
        if name.startswith(TMP_PREFIX):
            return True
        if st is None or stat.S_ISLNK(st.st_mode):
            return False
        if name in RUN_FILES:
            return stat.S_ISREG(st.st_mode)
        if name not in RUN_FOLDERS or not stat.S_ISDIR(st.st_mode):
            return False
        ok = RUN_FOLDERS[name].fullmatch if RUN_FOLDERS[name] else is_checkpoint_entry
        sub = self.dir.child(name)
        return all(c.startswith(TMP_PREFIX) or ((not stat.S_ISLNK(sub.lstat(c).st_mode) or name == "wandb") and ok(c))
                   for c in sub.names())  # wandb links its latest run and logs itself

    def start(self, config: dict, fresh: bool) -> None:
        """The first write: clear what `check` approved (fresh) or interrupted temporary files (resume), write
        config.json. Rank 0 only; the others wait at the barrier."""
        if self.is_main:
            if fresh and self._clear:
                print(f"{self.path}: cleared an earlier run that left no complete checkpoint "
                      f"({', '.join(self._clear)})")
            for name in self._clear:
                self.dir.remove(name)
            for d in [self.dir, *(self.dir.child(n) for n in RUN_FOLDERS if self.dir.is_dir(n))]:
                for name in d.names():  # interrupted writes, through held folders only (never a link swapped in)
                    if name.startswith(TMP_PREFIX):
                        d.remove(name)
            self.dir.write("config.json", json.dumps({"written_by": WRITTEN_BY, **config}, indent=1))
            self.started = True
            if self.auto:  # runs/<preset>/latest -> this run, replaced atomically
                link = self.path.parent / f"{TMP_PREFIX}latest-{os.getpid()}"
                link.unlink(missing_ok=True)
                link.symlink_to(self.path.name)
                os.replace(link, self.path.parent / "latest")
        distributed.barrier()

    def warn_if_disk_is_short(self, checkpoint_bytes: int, keep: int) -> None:
        """A warning at the start when the free space cannot hold keep + 1 checkpoints (rank 0)."""
        if self.is_main and (free := _free(self.dir)) < (keep + 1) * checkpoint_bytes:
            print(f"warning: {self.path} has {free / 2 ** 30:.1f} GiB free, less than {keep + 1} checkpoints of "
                  f"~{checkpoint_bytes / 2 ** 30:.1f} GiB need (--keep_checkpoints {keep} + the one being written)")

    def close(self) -> None:
        """Release the lock. A run that stops before its first write leaves nothing: the lock file it created goes,
        and so do the folders it created (bad input writes nothing). A run refused by the lock removes nothing."""
        self.lock.release(remove=self.lock.made and not self.started)
        if self.created and not self.started:  # rmdir: only folders this run made, and only while empty
            for q in reversed(self.made or [self.path]):
                try:
                    q.rmdir()
                except OSError:  # no longer empty: someone else's now
                    break
        for f in (self._resume, self.dir):
            if f is not None:
                f.close()
        self._resume = self.dir = None

    def _run(self) -> Folder:
        """The run folder: rank 0's from `check`; another rank's opened on first use, after rank 0 made it."""
        if self.dir is None:
            self.dir = Folder.open(self.path)
        return self.dir

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def complete_checkpoints(self) -> list[str]:
        """The checkpoints named as the run names them that have a manifest, newest (highest iteration) first; their
        files are checked by `newest_valid`."""
        if not self._run().is_dir("checkpoints"):
            return []
        ck = self.dir.child("checkpoints")
        found = [n for n in ck.names() if iteration_of(n) is not None and ck.is_dir(n)
                 and ck.lstat(f"{n}/{manifest.NAME}") is not None]
        return sorted(found, key=iteration_of, reverse=True)

    def newest_valid(self, candidates: list[str]) -> Checkpoint:
        """The newest checkpoint that `verify` finds good, held open until it is loaded; says which damaged ones it
        skipped. Stops if none is."""
        problems, ck = [], self.dir.child("checkpoints")
        for name in candidates:
            try:
                held = ck.sub(name)
            except OSError as e:
                problems.append(f"{name} (cannot be opened: {e.strerror})")
                continue
            problem = verify(held, name, self.key)
            if problem is None:
                if problems and self.is_main:
                    print("resume: skipped damaged checkpoint(s): " + "; ".join(problems) + f"; using {name}")
                self._resume = held
                return Checkpoint(name, held.identity()[1])
            held.close()
            problems.append(f"{name} ({problem})")
        raise SystemExit("--resume: every checkpoint is damaged: " + "; ".join(problems) +
                         "; run without --resume (and another --output_dir) to start again")

    def _checkpoint(self, ckpt: Checkpoint) -> Folder:
        """The verified checkpoint: rank 0 holds it; another rank opens it and checks it is the same folder."""
        if self._resume is None:
            held = self._run().child("checkpoints").sub(ckpt.name)
            if held.identity()[1] != ckpt.inode:
                held.close()
                raise SystemExit(f"{self.path}/checkpoints/{ckpt.name} was replaced after rank 0 verified it; resume "
                                 "again (and keep other processes out of the run folder)")
            self._resume = held
        return self._resume

    def resume_state(self, ckpt: Checkpoint) -> dict:
        """The training state of the checkpoint to resume from (iteration, history, RNG, config, ...): every rank."""
        if self._state is None:
            self._state = manifest.read_state(self._checkpoint(ckpt))
        return self._state

    def load(self, ckpt: Checkpoint, policy: Policy) -> tuple[list[dict], int]:
        """Restore the policy (and the global RNG) from `ckpt`; returns (history, iteration). Every rank reads."""
        st, held = self.resume_state(ckpt), self._checkpoint(ckpt)
        if policy.fsdp:
            policy.load_sharded(f"{held.path}/dcp")
            policy.steps = int(st.get("steps", 0))
        else:
            policy.load_state(st)
        torch.set_rng_state(st["torch_rng"])
        self.resumed_from = ckpt.iteration  # the folder's name: what verify matched the state against
        self._state = None
        held.close()
        self._resume = None
        return st["history"], ckpt.iteration

    def save(self, iteration: int, policy: Policy, history: list[dict], config: dict, keep: int) -> str:
        """Write checkpoint `iteration` atomically and durably (call on every rank under FSDP2, else on rank 0). The
        earlier checkpoints stay intact until this one is complete and its rename is on disk; then all but the newest
        `keep` up to this one are removed, never this one nor the one the run resumed from. Every write goes into a
        0700 folder this run made and holds; a moved or swapped folder stops the run (docs/RUN_FOLDER.md)."""
        final, name, tmp = checkpoint_name(iteration), None, None
        try:
            if policy.fsdp:  # one folder every rank writes into, each through its own descriptor
                name, inode = distributed.from_rank_zero(lambda: self._temporary(final))
                tmp = self._tmp if self.is_main else self._join_temporary(name, inode)
            else:
                name, _ = self._temporary(final)
                tmp = self._tmp
            self._write(tmp, iteration, policy, history, config)
            hashed = _hash_shares(tmp) if policy.fsdp else {}  # every rank hashes a share of the files
            if self.is_main:
                if self.key is not None:  # no one else may change what a keyed manifest vouches for
                    tmp.seal(0o022)
                manifest.write(tmp, final, hashed, self.key)
                tmp.chmod(0o777 & ~UMASK & ~(0o022 if self.key is not None else 0))  # 0700 kept others out meanwhile
                ck = self.dir.child("checkpoints")
                self._publish(ck, name, tmp, final)
                ck.write("latest", final)
                self._prune(ck, iteration, keep)
        except (OSError, RuntimeError, CheckpointException) as e:
            if self.is_main and name is not None:
                with contextlib.suppress(OSError, SystemExit):
                    self.dir.child("checkpoints").remove(name)
            cause, free = _cause(e), _free(self._run())
            if isinstance(cause, NotRegular):
                raise SystemExit(f"writing checkpoint {final}: {cause.filename} is {cause.strerror}; the run stops so "
                                 "that it writes nothing outside its folder: keep other processes out of the run "
                                 "folder and continue with --resume true") from None
            if getattr(cause, "errno", None) == errno.ENOSPC or free < 2 ** 20 or "unexpected pos" in str(cause):
                raise SystemExit(f"no space left on the device writing checkpoint {final} into {self.path}/checkpoints "
                                 f"({free / 2 ** 20:.0f} MiB free); the earlier checkpoints are intact: free space "
                                 "and continue with --resume true") from None
            raise
        finally:
            if tmp is not None:
                tmp.close()
            self._tmp = None
        return final

    def _temporary(self, final: str) -> tuple[str, int]:
        """Rank 0: a new private folder checkpoints/.tmp-<final>-<random> (self._tmp): (its name, its inode)."""
        name, self._tmp = self._run().child("checkpoints", create=True).private(f"{TMP_PREFIX}{final}-")
        return name, self._tmp.identity()[1]

    def _join_temporary(self, name: str, inode: int) -> Folder:
        """Another rank (FSDP2): rank 0's temporary folder, checked to be that folder and not one swapped in."""
        tmp = self._run().child("checkpoints").sub(name)
        if tmp.identity()[1] != inode:
            tmp.close()
            raise SystemExit(f"{self.path}/checkpoints/{name}, the checkpoint being written, was replaced before rank "
                             "joined it; the run stops so that it writes nothing outside its folder")
        return tmp

    def _publish(self, ck: Folder, name: str, tmp: Folder, final: str) -> None:
        """Rename the finished folder into place (an earlier checkpoint of this number, damaged, is replaced) and make
        the rename durable. Before and after, the name must lead to the folder this run wrote."""
        if not ck.holds(name, tmp):
            raise SystemExit(f"{ck.where}/{name}, the checkpoint being written, was moved or replaced; nothing was "
                             "published and the run stops: keep other processes out of the run folder and continue "
                             "with --resume true")
        aside, old = None, ck.lstat(final)
        if old is not None and stat.S_ISDIR(old.st_mode):
            aside = f"{TMP_PREFIX}old-{final}-{os.getpid()}"
            ck.remove(aside)
            ck.rename(final, aside)
        elif old is not None:
            ck.remove(final)  # a link or a file at the name: replaced, its target untouched
        ck.rename(name, final)
        ck.fsync()
        if not ck.holds(final, tmp):
            raise SystemExit(f"{ck.where}/{final} is not the checkpoint this run wrote (its folder was swapped while "
                             "it was published); the run stops: remove it and continue with --resume true")
        if aside is not None:
            ck.remove(aside)

    def _prune(self, ck: Folder, iteration: int, keep: int) -> None:
        """Keep the newest `keep` checkpoints up to `iteration` (this one included) and the one resumed from; a
        checkpoint of a later iteration (one that resume skipped as damaged) is neither counted nor removed. Each
        removed folder is renamed to a temporary name first, so a half-removed one never looks complete. Only
        entries of the run's own checkpoints/ folder, through its descriptor."""
        older = [c for c in self.complete_checkpoints() if iteration_of(c) < iteration]
        for old in older[keep - 1:]:
            if iteration_of(old) != self.resumed_from:
                aside = f"{TMP_PREFIX}pruned-{old}"
                ck.remove(aside)
                ck.rename(old, aside)
                ck.remove(aside)

    def _write(self, out: Folder, iteration: int, policy: Policy, history: list[dict], config: dict) -> None:
        """The weights as diffusers loads them, live and EMA: lora/ and lora_ema/ (`pipe.load_lora_weights`), or
        for full fine-tuning transformer/ and transformer_ema/ (`from_pretrained`; under FSDP2 gathered tensor by
        tensor, written shard by shard: export.py). training_state.pt: iteration, history, RNG, config; without
        FSDP also the trained weights, EMA, AdamW state and step counter, which under FSDP2 go to dcp/, one
        safetensors file per rank (Policy.save_sharded; `read_sharded` assembles them). The libraries take
        paths: out.path reaches the held folder itself."""
        tr, kind = policy.backbone.transformer, policy.backbone.kind
        exports = [("", contextlib.nullcontext)] + ([("_ema", policy.ema_weights)] if policy.ema is not None else [])
        for suffix, weights in exports:
            with weights():
                if getattr(tr, "peft_config", None) is not None:
                    state = lora.lora_state_dict(tr)  # under FSDP: a collective gather of the LoRA tensors only
                    if self.is_main:
                        lora.save_lora(tr, f"{out.path}/lora{suffix}", state_dict=state, pipeline=kind)
                else:
                    export.save_transformer(tr, f"{out.path}/transformer{suffix}", self.is_main)
        if policy.fsdp:
            policy.save_sharded(f"{out.path}/dcp")
        if self.is_main:
            state = dict(iteration=iteration, history=history, config=config, torch_rng=torch.get_rng_state(),
                         steps=policy.steps)
            state.update({} if policy.fsdp else policy.state())
            with out.create("training_state.pt") as f:
                torch.save(state, f)


def is_checkpoint_entry(name: str) -> bool:
    """What a run writes into checkpoints/: its checkpoint folders and the `latest` pointer."""
    return iteration_of(name) is not None or name == "latest"


load_state = manifest.load_state  # a training_state.pt by path (tools, tests)


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


def verify(ckpt: Folder | str | Path, name: str | None = None, key: bytes | None = None) -> str | None:
    """manifest.verify of a checkpoint folder (held, or given by path), against the iteration its name says."""
    if not isinstance(ckpt, Folder):
        with Folder.open(ckpt) as held:
            return verify(held, Path(ckpt).name, key)
    return manifest.verify(ckpt, name, key, iteration_of(name))


def checkpoint_bytes(policy: Policy) -> int:
    """About the size of one checkpoint: per trained parameter (numel is the global count, FSDP2 included), fp32
    (4 bytes) weights, AdamW's two moments (8) and the EMA (4) in the training state or dcp/ shards, plus the
    diffusers exports of the weights and of the EMA (4 + 4): 24 bytes with an EMA, 16 without."""
    return sum(p.numel() for p in policy.params) * (16 if policy.ema is None else 24)


def _hash_shares(folder: Folder) -> dict[str, list]:
    """(Every rank, once every file is written) size and sha256 of the files under `folder`, each rank a share of
    them: {name: [size, sha256]} of all of them on every rank."""
    distributed.barrier()  # rank 0's exports and training state are written
    names = folder.files()[0]
    rank, world = distributed.rank_and_world()
    mine = manifest.hash_files(folder, names[rank::world])
    return {k: v for part in distributed.all_gather_objects(mine) for k, v in part.items()}


def _cause(e: BaseException) -> BaseException:
    """The first rank's exception inside torch.distributed.checkpoint's CheckpointException; others as they are."""
    if isinstance(e, CheckpointException) and e.failures:
        return next(iter(e.failures.values()))[0]
    return e


def _free(folder: Folder) -> int:
    st = os.fstatvfs(folder.fd)
    return st.f_bavail * st.f_frsize


def _make_folders(path: Path) -> list[Path]:
    """mkdir -p `path`; returns the folders this call created, outermost first (a run that never starts removes
    exactly those; one another process made at the same moment is not counted)."""
    missing = []
    q = path
    while not os.path.lexists(q):
        missing.append(q)
        q = q.parent
    made = []
    for q in reversed(missing):
        try:
            q.mkdir()
            made.append(q)
        except FileExistsError:
            pass
    return made
