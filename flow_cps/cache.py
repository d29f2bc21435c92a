"""The model cache: the built-in models (digits, shapes) and the judges and detectors behind the built-in rewards,
trained on first use and kept under $FLOW_CPS_CACHE (else ~/.cache/flow_cps). Plumbing for digits.py and shapes.py.

    path = cached(cache_dir() / f"judge-{cache_key('judge', 300, 0)}", build, "training the digit judge")

An entry is built in a private folder (folder.Folder.private; `build` writes through its /proc/self/fd path), its
files' sizes and sha256 go into MANIFEST.json, it is opened to the umask's permissions (a group can share the cache:
docs/RUN_FOLDER.md, "The model cache") and renamed into place, so a killed build leaves no entry. Every use checks
the entry's files against its manifest: a damaged entry (a bad disk, a copy cut short, a file edited) is removed and
built again. A build folder a killed build left (`.tmp-build-*`, no live builder
holding its lock, older than STALE_S) is removed by the next build.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from flow_cps import manifest
from flow_cps.files import UMASK
from flow_cps.folder import Folder

BUILD_PREFIX = ".tmp-build-"
FORMAT = 2  # part of every key: entries with a manifest never share a name with an earlier version's (left alone)
STALE_S = 3600  # a build folder older than this that no builder holds is a killed build's (builds take a minute)


def cache_dir() -> Path:
    """Where the pre-trained built-in models and judges live: $FLOW_CPS_CACHE, else ~/.cache/flow_cps."""
    return Path(os.environ.get("FLOW_CPS_CACHE") or Path.home() / ".cache" / "flow_cps")


def cache_key(*spec) -> str:
    return hashlib.sha256(json.dumps([*spec, torch.__version__, FORMAT], sort_keys=True).encode()).hexdigest()[:10]


def cached(path: Path, build, what: str) -> Path:
    """`path` if it holds a good build (every file as its manifest says), else build(tmp) into a private folder
    renamed into place: concurrent builders (ranks, bench workers) agree on one result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with Folder.open(path.parent) as root:
        problem = _problem(root, path.name)
        if problem is None:
            return path
        if problem != "absent":
            print(f"[flow_cps] cache entry {path} is damaged ({problem}): building it again")
            try:  # renamed away first: a process still reading it keeps its files, no one sees half of it
                aside = f"{BUILD_PREFIX}damaged-{os.getpid()}"
                root.rename(path.name, aside)
                root.remove(aside)
            except OSError as e:
                raise SystemExit(f"cache entry {path} is damaged ({problem}) and cannot be removed ({e.strerror}): "
                                 "remove it (or ask its owner to), or set FLOW_CPS_CACHE to a folder of your own") \
                    from None
        _remove_leftovers(root)
        print(f"[flow_cps] first use: {what} into {path}")
        name, tmp = root.private(BUILD_PREFIX)
        with tmp:
            try:
                with contextlib.suppress(OSError):  # held while building: a leftover no one holds is a killed build's
                    fcntl.flock(tmp.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                build(Path(tmp.path))
                seal(tmp)
                try:  # no check-then-rename: the rename itself decides, atomically, which builder's result is kept
                    root.rename(name, path.name)
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or _problem(root, path.name) is not None:
                        raise
                    root.remove(name)  # another process won the race; theirs is identical
                root.fsync()
            except BaseException:
                with contextlib.suppress(OSError):
                    root.remove(name)
                raise
    return path


def seal(entry: Folder) -> None:
    """A finished build: MANIFEST.json of its files (written last, durably), and the umask's permissions on the
    build folder (0700 while it was written), so that others sharing the cache can read it."""
    manifest.write(entry, "cache entry")
    entry.chmod(0o777 & ~UMASK)


def _problem(root: Folder, name: str) -> str | None:
    """None if the entry `name` is good; "absent"; or what is wrong with it."""
    if root.lstat(name) is None:
        return "absent"
    try:
        with root.sub(name) as entry:
            return manifest.check(entry, "cache entry")
    except (OSError, ValueError) as e:  # a link, no manifest (an older version's entry), unreadable, not JSON
        return f"{type(e).__name__}: {e}"


def _remove_leftovers(root: Folder) -> None:
    """Remove the build folders of killed builds: older than STALE_S and not locked by a live builder (flock is
    exact on a local disk; the age guards a filesystem whose locks do not reach other hosts)."""
    for name in root.names():
        st = root.lstat(name)
        if not name.startswith(BUILD_PREFIX) or st is None or time.time() - st.st_mtime < STALE_S:
            continue
        with contextlib.suppress(OSError), root.sub(name) as leftover:
            fcntl.flock(leftover.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: its builder runs
            root.remove(name)  # another user's leftover: PermissionError, left alone
