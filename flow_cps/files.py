"""Files given by path, for code outside a held run folder (lora.py rewriting a header inside a checkpoint being
written, tools, tests): each opens the file's folder once and does what folder.Folder does there. Written files are
replaced atomically, durable before they count, never written through a link; read as regular files only.

    write_atomic(path, data)     # a new file beside `path`, fsynced, renamed over it, the folder fsynced
    digest = sha256(path)        # streamed: memory stays flat whatever the file's size
    files_under(folder)          # (regular files, links and other entries), relative, sorted
"""
from __future__ import annotations

import os
from pathlib import Path

from flow_cps.folder import TMP_PREFIX, Folder

__all__ = ["TMP_PREFIX", "UMASK", "files_under", "sha256", "write_atomic"]


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """`data` into `path` (Folder.write in its folder). A reader sees the old file or the new one, never a part."""
    path = Path(path)
    with Folder.open(path.parent) as folder:
        folder.write(path.name, data)
    return path


def sha256(path: str | Path) -> str:
    """The regular file's sha256, read in blocks."""
    path = Path(path)
    with Folder.open(path.parent) as folder:
        return folder.sha256(path.name)[1]


def files_under(folder: str | Path) -> tuple[list[str], list[str]]:
    """(regular files, links and other non-regular entries) under `folder`, as sorted '/'-separated relative paths.
    Links are listed, never followed."""
    with Folder.open(folder) as held:
        return held.files()


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: once, at import, before any thread runs
    os.umask(mask)
    return mask


UMASK = _umask()
