"""The run folder: one run at a time, checkpoints that are either complete or ignored, and a resume that always finds
the newest good one. Plumbing for train.py.

    runs/tiny/run-003/                 a fresh folder per run when --output_dir is not given (runs/tiny/latest -> it)
      .lock                            held by the running process (fcntl: released when it exits, even by SIGKILL)
      config.json  metrics.jsonl  tensorboard/ or wandb/  images/  reward_curve.png
      checkpoints/iter_000150/         lora/ lora_ema/ (LoRA) or transformer/ transformer_ema/ (full fine-tuning),
                                       dcp/ (FSDP2 shards), training_state.pt, and MANIFEST.json, written last
      checkpoints/latest               "iter_000150"

A checkpoint is written into `.tmp-iter_N/`, its MANIFEST.json (every file's size, and sha256 of those under
256 MiB) written last, and the folder renamed into place: a checkpoint without a manifest, or whose files do not
match it, is incomplete. Resume takes the newest complete checkpoint and says which damaged one it skipped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

from flow_cps import engine, export, lora

HASH_LIMIT = 256 * 2 ** 20  # files up to this size are hashed into the manifest; larger ones (FSDP2 shards) by size
# What a run writes into its folder: the only names a fresh run clears when an earlier run left no checkpoint.
RUN_FILES = {".lock", "config.json", "metrics.jsonl", "tensorboard", "wandb", "images", "reward_curve.png",
             "checkpoints"}


def resolve(output_dir: str, preset: str, resume: bool) -> Path:
    """The run's folder. An explicit --output_dir is used as given. Without one: --resume continues the run that
    `runs/<preset>/latest` points to; a new run gets the next free `runs/<preset>/run-NNN`, so rerunning a command
    never touches an earlier run."""
    if output_dir:
        return Path(output_dir)
    root = Path("runs") / preset
    if resume:
        if not (root / "latest").exists():
            raise SystemExit(f"--resume: no earlier run under {root}/ (no {root}/latest); give --output_dir of the run "
                             "to continue, or run without --resume to start one")
        return root / os.readlink(root / "latest")
    taken = [int(p.name[4:]) for p in root.glob("run-*") if p.name[4:].isdigit()]
    return root / f"run-{max(taken, default=0) + 1:03d}"


class RunFolder:
    def __init__(self, path: Path, is_main: bool, auto: bool = False):
        self.path, self.is_main, self.auto = Path(path), is_main, auto
        self.root = self.path / "checkpoints"
        self._lock = None

    # -- before any work: what is there, and may this run use it? -------------------------------------------------
    def check(self, resume: bool) -> Path | None:
        """The checkpoint to resume from (None for a fresh run). Stops with a message, writing nothing, if the folder
        cannot be used: a file, not writable, holding a finished run without --resume, or locked by a running one."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise SystemExit(f"--output_dir {p} is a file, not a folder; choose another --output_dir")
        existing = next((q for q in [p, *p.absolute().parents] if q.exists()), Path("."))
        try:  # a real probe (permission bits say little for root, or on read-only and network filesystems)
            tempfile.TemporaryFile(dir=existing).close()
        except OSError as e:
            raise SystemExit(f"--output_dir {p}: cannot write into {existing} ({e.strerror}); choose a folder you can "
                             "write to") from None
        if p.is_dir():
            self._acquire()
        good = self.complete_checkpoints()
        if resume and not good:
            raise SystemExit(f"--resume: no complete checkpoint in {self.root}; run without --resume to start fresh "
                             "(its incomplete files are then cleared)")
        if not resume and good:
            raise SystemExit(f"{p} already holds a run (checkpoint {good[0].name}); pass --resume true to continue "
                             "it, or choose another --output_dir")
        foreign = sorted(q.name for q in p.iterdir() if q.name not in RUN_FILES) if p.is_dir() else []
        if not resume and foreign:
            raise SystemExit(f"--output_dir {p} holds files that no run wrote ({', '.join(foreign[:5])}); choose an "
                             "empty or new folder")
        return self.newest_valid(good) if resume else None

    def _acquire(self) -> None:
        """An exclusive lock on `.lock`: a second run into this folder is refused, naming the running one."""
        if not self.is_main or self._lock is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise SystemExit(f"{self.path} is in use by a running training run ({holder}); wait for it to finish, or "
                             "choose another --output_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{' '.join(sys.argv)}\n")
        f.flush()
        self._lock = f

    def start(self, config: dict, fresh: bool) -> None:
        """Create (or take over) the folder: lock it, clear an earlier run's incomplete leftovers (fresh) or the
        temporary checkpoint folders (resume), write config.json. Rank 0 only; others wait at the barrier."""
        if self.is_main:
            self._acquire()
            leftovers = sorted(q.name for q in self.path.iterdir() if q.name in RUN_FILES - {".lock"})
            if fresh and leftovers:
                print(f"{self.path}: cleared an earlier run that left no complete checkpoint ({', '.join(leftovers)})")
                for name in leftovers:
                    q = self.path / name
                    shutil.rmtree(q) if q.is_dir() and not q.is_symlink() else q.unlink()
            for tmp in self.root.glob(".tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)
            (self.path / "config.json").write_text(json.dumps(config, indent=1))
            if self.auto:  # runs/<preset>/latest -> this run, replaced atomically
                link = self.path.parent / ".latest.tmp"
                link.unlink(missing_ok=True)
                link.symlink_to(self.path.name)
                os.replace(link, self.path.parent / "latest")
        engine.barrier()

    def warn_if_disk_is_short(self, checkpoint_bytes: int, keep: int) -> None:
        """A warning at the start when the free space cannot hold keep + 1 checkpoints (rank 0)."""
        free = shutil.disk_usage(self.path).free
        if self.is_main and free < (keep + 1) * checkpoint_bytes:
            print(f"warning: {self.path} has {free / 2 ** 30:.1f} GiB free, less than {keep + 1} checkpoints of "
                  f"~{checkpoint_bytes / 2 ** 30:.1f} GiB need (--keep_checkpoints {keep} + the one being written)")

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def complete_checkpoints(self) -> list[Path]:
        """The checkpoint folders that have a manifest, newest first (their files are checked by `newest_valid`)."""
        return sorted((q for q in self.root.glob("iter_*") if (q / "MANIFEST.json").is_file()), reverse=True)

    def newest_valid(self, candidates: list[Path]) -> Path:
        """The newest checkpoint whose files match its manifest and whose training state loads; says which damaged
        ones it skipped. Stops if none is usable."""
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

    def save(self, iteration: int, policy: engine.Policy, history: list[dict], config: dict, keep: int) -> Path:
        """Write checkpoint `iteration` atomically (call on every rank under FSDP2, else on rank 0). The previous
        checkpoints stay intact until this one is complete; then all but the newest `keep` are removed."""
        final, tmp = self.root / f"iter_{iteration:06d}", self.root / f".tmp-iter_{iteration:06d}"
        try:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            if policy.fsdp:
                engine.barrier()  # the folder exists before any rank writes into it (a shared filesystem)
            self._write(tmp, iteration, policy, history, config)
            if policy.fsdp:
                engine.barrier()  # every rank's shard is on disk before the manifest lists it
            if self.is_main:
                write_manifest(tmp)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                latest_tmp = self.root / ".latest.tmp"
                latest_tmp.write_text(final.name)
                os.replace(latest_tmp, self.root / "latest")
                for old in self.complete_checkpoints()[keep:]:
                    shutil.rmtree(old, ignore_errors=True)
        except (OSError, RuntimeError) as e:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            free = shutil.disk_usage(self.root if self.root.exists() else self.path).free
            if isinstance(e, OSError) and e.errno == 28 or free < 2 ** 20 or "unexpected pos" in str(e):
                raise SystemExit(f"no space left on the device writing checkpoint {final.name} into {self.root} "
                                 f"({free / 2 ** 20:.0f} MiB free); the earlier checkpoints are intact: free space "
                                 "and continue with --resume true") from None
            raise
        return final

    def _write(self, out: Path, iteration: int, policy: engine.Policy, history: list[dict], config: dict) -> None:
        """The weights as diffusers loads them, live and EMA: lora/ and lora_ema/ (`pipe.load_lora_weights`), or
        for full fine-tuning transformer/ and transformer_ema/ (`from_pretrained`; under FSDP2 gathered tensor by
        tensor, written shard by shard: export.py). training_state.pt: iteration, history, RNG, config; without
        FSDP also the trained weights, EMA, AdamW state and step counter, which under FSDP2 go to dcp/, one file
        per rank."""
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

    def load(self, ckpt: Path, policy: engine.Policy) -> tuple[list[dict], int]:
        """Restore the policy (and the global RNG) from `ckpt`; returns (history, iteration). Every rank reads."""
        st = load_state(ckpt / "training_state.pt")
        if policy.fsdp:
            policy.load_sharded(ckpt / "dcp")
            policy.steps = int(st.get("steps", 0))
        else:
            policy.load_state(st)
        torch.set_rng_state(st["torch_rng"])
        return st["history"], st["iteration"]


def load_state(path: Path) -> dict:
    """training_state.pt holds only tensors, numbers, strings, lists and dicts: read with weights_only=True, so a
    file planted in a shared run folder cannot run code when someone resumes."""
    return torch.load(path, map_location="cpu", weights_only=True)


def check_config(saved: dict, given: dict, resumable: set[str], defaults: dict) -> None:
    """--resume continues the saved run exactly: only length, logging and output options may change."""
    diff = {k: (saved.get(k, defaults[k]), v) for k, v in given.items()
            if k not in resumable and saved.get(k, defaults[k]) != v}
    if diff:
        raise SystemExit(f"--resume with a different config: {diff} (saved, given). Resume with the saved values, or "
                         "start a new run.")


# -- the manifest ------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2 ** 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in ("MANIFEST.json", ".MANIFEST.tmp"))
    entries = {str(p.relative_to(folder)): dict(size=p.stat().st_size,
                                               sha256=_sha256(p) if p.stat().st_size <= HASH_LIMIT else None)
               for p in files}
    tmp = folder / ".MANIFEST.tmp"
    tmp.write_text(json.dumps(entries, indent=1))
    os.replace(tmp, folder / "MANIFEST.json")


def verify(ckpt: Path) -> str | None:
    """None if every file the manifest lists is there, of its size (and hash), and the training state loads; else
    what is wrong, naming the file."""
    try:
        entries = json.loads((ckpt / "MANIFEST.json").read_text())
    except (OSError, ValueError) as e:
        return f"MANIFEST.json unreadable: {e}"
    for name, meta in entries.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{name} has {f.stat().st_size} bytes, {meta['size']} expected"
        if meta.get("sha256") and _sha256(f) != meta["sha256"]:
            return f"{name} is corrupt (checksum mismatch)"
    try:
        load_state(ckpt / "training_state.pt")
    except Exception as e:  # e.g. a pickled object that weights_only refuses
        return f"training_state.pt cannot be loaded safely ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    return None


def run_config(cfg) -> dict:
    return dataclasses.asdict(cfg)
