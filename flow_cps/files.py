"""Files a run writes: replaced atomically, durable before they count, never written through a link, checksummed in
streams (memory stays flat whatever the file's size). Plumbing for the run folder (checkpoints.py) and logs.py.

    write_atomic(path, data)     # a new file beside `path`, fsynced, renamed over it, the folder fsynced
    digest = sha256(path)        # streamed; sha256_many(paths): several files at once
    fsync_tree(folder)           # every file, then every folder bottom-up: before a rename that publishes them
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TMP_PREFIX = ".tmp-"  # every temporary name in a run folder starts so: an interrupted write leaves nothing else


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """`data` into `path`: written to a new file in the same folder (mkstemp: O_EXCL | O_NOFOLLOW, so a link planted
    at any name is never followed), fsynced, renamed over `path` (the rename replaces a link at `path` itself, not
    its target), and the folder fsynced. A reader sees the old file or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + "-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; a run's files get the permissions open() would give
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def open_append(path: str | Path) -> int:
    """A descriptor that appends to `path` (created if missing): O_NOFOLLOW refuses a link there, and later swaps
    of the name cannot redirect the writes, which go to the file that was opened."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)


def sha256(path: str | Path) -> str:
    """The file's sha256, read in blocks (hashlib.file_digest)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_many(paths: list[Path]) -> list[str]:
    """sha256 of each file, up to 8 at a time: hashlib releases the GIL while it hashes, so each file gets a core."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(sha256, paths))


def fsync_dir(folder: str | Path) -> None:
    """Make the folder's entries (creations, renames, deletions) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file under `folder`, then every folder bottom-up, so that a rename published after it cannot reach
    the disk before the data it publishes (after a power loss)."""
    for parent, _, names in os.walk(folder, topdown=False):
        for name in names:
            fd = os.open(os.path.join(parent, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(parent)


def files_under(folder: str | Path) -> tuple[list[str], list[str]]:
    """(regular files, links and other non-regular entries) under `folder`, as sorted '/'-separated relative paths.
    Links are listed, never followed."""
    files, odd = [], []
    for parent, dirs, names in os.walk(folder):
        rel = Path(parent).relative_to(folder)
        for name in names + [d for d in dirs if os.path.islink(os.path.join(parent, d))]:
            p = Path(parent) / name
            (files if p.is_file() and not p.is_symlink() else odd).append((rel / name).as_posix())
    return sorted(files), sorted(odd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()
