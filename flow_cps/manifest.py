"""What makes a checkpoint good (`verify`), and its MANIFEST.json: every file under it with its size and sha256,
written last, and with a key an HMAC-SHA256 that binds those entries to the checkpoint's name. Plumbing for
checkpoints.py.

    {"files": {"training_state.pt": {"size": 612345, "sha256": "9f2c..."}, ...}, "hmac_sha256": "41d0..."}

Without a key the manifest detects corruption (a truncated copy, a flipped bit, a missing or added file), not
tampering: whoever can write the run folder can rewrite a file and its manifest entry together. With a key
(FLOW_CPS_CHECKPOINT_KEY, or FLOW_CPS_CHECKPOINT_KEY_FILE naming a file outside the run folder) a manifest that does
not verify, or none signed, makes the checkpoint damaged, and a checkpoint counts only when this user owns every
part of it and no one else can write any: what was verified cannot change before it is loaded (docs/RUN_FOLDER.md).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open

from flow_cps.folder import Folder

NAME = "MANIFEST.json"
MAX_BYTES = 4 * 2 ** 20  # a manifest lists tens of files (hundreds for a sharded full fine-tuning), ~150 bytes each
KEY_ENV, KEY_FILE_ENV = "FLOW_CPS_CHECKPOINT_KEY", "FLOW_CPS_CHECKPOINT_KEY_FILE"
MAX_KEY_BYTES = 4096


def key(run: Path) -> bytes | None:
    """The checkpoint key, or None without one. Stops with one line if both variables are set, the key is empty,
    or its file cannot be read or lies inside the run folder (where the folder's writers could read it)."""
    text, path = os.environ.get(KEY_ENV), os.environ.get(KEY_FILE_ENV)
    if text is not None and path is not None:
        raise SystemExit(f"set one of {KEY_ENV} and {KEY_FILE_ENV}, not both")
    if path is not None:
        where = Path(path).expanduser().resolve()
        if where.is_relative_to(Path(run).resolve()):
            raise SystemExit(f"{KEY_FILE_ENV} {path} is inside the run folder, where anyone who can write the folder "
                             "can read it: keep the key file outside the run folder")
        try:
            with Folder.open(where.parent) as parent:
                text = parent.read(where.name, MAX_KEY_BYTES).decode().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"{KEY_FILE_ENV} {path}: cannot read the key ({e}); give a readable text file of at most "
                             f"{MAX_KEY_BYTES} bytes") from None
    if text is not None and not text.strip():
        raise SystemExit(f"the checkpoint key ({KEY_FILE_ENV if path else KEY_ENV}) is empty; give a secret, e.g. "
                         "`openssl rand -hex 32`")
    return text.strip().encode() if text is not None else None


def sign(secret: bytes, checkpoint: str, files: dict) -> str:
    """HMAC-SHA256 of the checkpoint's name and its entries, canonically encoded (a renamed checkpoint fails too)."""
    message = json.dumps({"checkpoint": checkpoint, "files": files}, sort_keys=True, separators=(",", ":"))
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()


def hash_files(folder: Folder, names: list[str]) -> dict[str, list]:
    """{name: [size, sha256]} of files under `folder`, up to 8 at a time: hashlib releases the GIL while it hashes,
    so each file gets a core."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(names, map(list, pool.map(folder.sha256, names))))


def write(folder: Folder, checkpoint: str, hashed: dict | None = None, secret: bytes | None = None) -> None:
    """MANIFEST.json for the finished files under `folder` (`hashed`: those the ranks already hashed). Every file is
    fsynced, then the folders, then the manifest is written (atomically, durably)."""
    names = [n for n in folder.files()[0] if n != NAME]
    hashed = dict(hashed or {})
    hashed.update(hash_files(folder, [n for n in names if n not in hashed]))
    files = {n: dict(size=hashed[n][0], sha256=hashed[n][1]) for n in names}
    doc = dict(files=files, **({"hmac_sha256": sign(secret, checkpoint, files)} if secret else {}))
    folder.fsync_tree()
    folder.write(NAME, json.dumps(doc, indent=1))


def check(folder: Folder, checkpoint: str, secret: bytes | None = None) -> str | None:
    """None if the files under `folder` are exactly those the manifest lists, each of its size and sha256 (with a key:
    the manifest signed, and nothing writable by anyone else); else what is wrong, naming the file. An OSError (a link,
    a FIFO, an unreadable file) propagates: the caller reports it as damage."""
    doc = json.loads(folder.read(NAME, MAX_BYTES))
    files = doc.get("files", doc) if isinstance(doc, dict) else None  # without "files": the earlier flat format
    if not isinstance(files, dict) or not all(isinstance(m, dict) and isinstance(m.get("size"), int) and
                                              isinstance(m.get("sha256"), str) for m in files.values()):
        return f"{NAME} is not a manifest (every file's size and sha256)"
    present, odd = folder.files()
    if odd:
        return f"{odd[0]} is a link or not a regular file"
    if secret is not None:
        signed = doc.get("hmac_sha256")
        if not isinstance(signed, str):
            return f"{NAME} is not signed (written without the checkpoint key)"
        if not hmac.compare_digest(signed, sign(secret, checkpoint, files)):
            return f"{NAME} does not verify with the checkpoint key (changed, or signed with another key)"
        loose = _writable_by_others(folder)
        if loose:
            return f"{loose} can be changed by another user (with a checkpoint key, every part of a checkpoint must " \
                   "be this user's and writable by no one else)"
    present.remove(NAME)
    for name in sorted(set(present) - set(files)):
        return f"{name} is not in the manifest"
    for name, meta in files.items():
        if name not in present:
            return f"{name} is missing"
        if name.startswith("dcp/") and not name.endswith(".safetensors"):  # what torch's pickled format writes
            return f"{name} is not a safetensors shard (dcp/ holds only those; a planted file, or an older version's " \
                   "pickled format, which is not read)"
        size = folder.lstat(name).st_size  # sizes first: a truncated copy is named without hashing anything
        if size != meta["size"]:
            return f"{name} has {size} bytes, {meta['size']} expected"
    for name, (size, digest) in hash_files(folder, list(files)).items():
        if size != files[name]["size"] or digest != files[name]["sha256"]:
            return f"{name} is corrupt (checksum mismatch)"
    return None


def _writable_by_others(folder: Folder) -> str | None:
    """The first part of `folder` (the folder itself, a folder or file under it) that another user owns or that
    anyone but its owner may write; None if there is none."""
    def loose(st: os.stat_result) -> bool:
        return st.st_uid != os.geteuid() or bool(stat.S_IMODE(st.st_mode) & 0o022)
    if loose(os.fstat(folder.fd)):
        return "the checkpoint folder"
    for parent, dirs, names, fd in folder.walk():
        for n in dirs + names:
            if loose(os.stat(n, dir_fd=fd, follow_symlinks=False)):
                return f"{parent}/{n}" if parent else n
    return None


def verify(ckpt: Folder, name: str, key: bytes | None = None, iteration: int | None = None) -> str | None:
    """None if the checkpoint `name` is good: its files exactly those its manifest lists, each of its size and sha256
    (every file, streamed), signed with `key` if one is given (`check`), its safetensors files and training state
    open without running code, and the state's iteration `iteration` (its folder's name's). Else what is wrong,
    naming the file; anything unexpected on the way (a link, a FIFO, a file it may not read) is damage too."""
    try:
        problem = check(ckpt, name, key)
        if problem:
            return problem
        for f in (n for n in ckpt.files()[0] if n.endswith(".safetensors")):
            try:
                with safe_open(f"{ckpt.path}/{f}", "pt") as st:
                    st.keys()
            except Exception as e:  # the hash matched a rewritten manifest: not a safetensors file
                return f"{f} cannot be read as safetensors ({type(e).__name__}: {_first_line(e)})"
        try:
            state = read_state(ckpt)
        except Exception as e:  # e.g. a pickled object that weights_only refuses
            return f"training_state.pt cannot be loaded safely ({type(e).__name__}: {_first_line(e)})"
        if iteration is not None and state.get("iteration") != iteration:
            return f"training_state.pt holds iteration {state.get('iteration')!r}, not {iteration} as its folder's " \
                   "name says"
    except Exception as e:  # OSError (NotRegular: a link, a FIFO, too big; PermissionError), ValueError (JSON), ...
        return f"cannot be checked ({type(e).__name__}: {_first_line(e)})"
    return None


def read_state(folder: Folder, name: str = "training_state.pt") -> dict:
    """training_state.pt holds only tensors, numbers, strings, lists and dicts: read with weights_only=True, so a
    file planted in a shared run folder cannot run code when someone resumes; opened as a regular file only."""
    with os.fdopen(folder.open_file(name), "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def load_state(path: str | Path) -> dict:
    """`read_state` of a training_state.pt given by path (tools, tests)."""
    path = Path(path)
    with Folder.open(path.parent) as folder:
        return read_state(folder, path.name)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:200]
