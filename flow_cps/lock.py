"""The run folder's lock: one run at a time in a folder, and a refusal that names the running one.

Two guards, because neither holds everywhere (docs/SCALE.md, "The run folder"):
  * an exclusive `flock` on `.lock`: released by the kernel when the holder exits, even by SIGKILL. Reliable on a
    local disk; on network filesystems only where the mount makes flock cluster-wide (NFSv4, Lustre's `flock`
    option). Where the mount has no locks at all (ENOLCK, EOPNOTSUPP, ENOSYS) the run stops and says so;
    FLOW_CPS_NO_FLOCK=1 runs on the record alone.
  * a record in `.lock`: host, pid, start time and command, refreshed every LOCK_REFRESH_S seconds while the run
    holds it and cleared when it ends. A run that finds a fresh record of another host refuses, which catches two
    hosts that both "hold" a node-local flock. A record older than LOCK_STALE_S belongs to a run that stopped
    without clearing it (killed) and is taken over.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_REFRESH_S = 60
LOCK_STALE_S = 300
NO_FLOCK = "FLOW_CPS_NO_FLOCK"  # "1": do not flock (a filesystem without locks); the host/pid record still guards


class Lock:
    """`.lock` in `folder`, held from `acquire` to `release` (rank 0 of a run)."""

    def __init__(self, folder: Path):
        self.path, self.fd, self._stop = Path(folder) / ".lock", None, threading.Event()
        self.made = False  # this run created the lock file (removed again if the run never starts)

    def acquire(self) -> None:
        """Take the lock or stop with one line naming the holder (or the filesystem problem and its fix)."""
        self.made = not os.path.lexists(self.path)
        try:  # O_NOFOLLOW: a link planted at .lock is never followed, let alone truncated
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise SystemExit(f"{self.path} is a symbolic link, not a lock file written by a run; remove it and "
                                 "start again") from None
            raise
        try:
            self._flock(fd)
            holder = _read(fd)
            if _alive(holder) and (holder["host"] != socket.gethostname() or os.environ.get(NO_FLOCK) == "1"):
                raise SystemExit(f"{self.path.parent} is in use by a running training run ({_describe(holder)}, "
                                 f"its record refreshed {_age(holder):.0f} s ago); file locks on this filesystem do "
                                 f"not reach that run. Wait for it to finish, or choose another --output_dir (a record"
                                 f" not refreshed for {LOCK_STALE_S} s is taken as a stopped run's)")
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self._write(dict(host=socket.gethostname(), pid=os.getpid(), since=time.strftime("%Y-%m-%d %H:%M:%S"),
                         command=" ".join(sys.argv)))
        threading.Thread(target=self._refresh, daemon=True, name="flow_cps-lock").start()

    def _flock(self, fd: int) -> None:
        if os.environ.get(NO_FLOCK) == "1":
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"{self.path.parent} is in use by a running training run ({_describe(_read(fd))}); "
                             "wait for it to finish, or choose another --output_dir") from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP, ENOSYS, ...: no locks on this mount
            code = errno.errorcode.get(e.errno, "?")
            raise SystemExit(f"{self.path.parent}: cannot lock {self.path.name} ({code}: {e.strerror}): this "
                             "filesystem does not support file locks (an NFS mount without lockd, Lustre mounted with "
                             f"noflock, ...). Use a --output_dir on a local disk, or set {NO_FLOCK}=1 to rely on the "
                             "lock file's host/pid record alone (docs/SCALE.md, 'The run folder')") from None

    def _write(self, record: dict) -> None:
        data = (json.dumps(record) + "\n").encode() if record else b""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def _refresh(self) -> None:
        while not self._stop.wait(LOCK_REFRESH_S):
            try:
                os.utime(self.fd)
            except OSError:  # released meanwhile
                return

    def release(self) -> None:
        """Clear the record (so that a run on another host need not wait for it to go stale) and unlock."""
        if self.fd is None:
            return
        self._stop.set()
        try:
            self._write({})
        finally:
            os.close(self.fd)
            self.fd = None


def _read(fd: int) -> dict:
    """The record in the lock file: {host, pid, since, command, age}; a record that is not ours is {"text": ...}."""
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if not text:
        return {}
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    record = record if isinstance(record, dict) else {"text": text.splitlines()[0][:200]}
    return {**record, "age": time.time() - os.fstat(fd).st_mtime}


def _alive(record: dict) -> bool:
    """A run's record (host and pid), fresh (refreshed within LOCK_STALE_S), and on this host its pid still runs."""
    if "host" not in record or not isinstance(record.get("pid"), int) or _age(record) > LOCK_STALE_S:
        return False
    if record["host"] == socket.gethostname():
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
    return True


def _age(record: dict) -> float:
    return float(record.get("age", 0.0))


def _describe(record: dict) -> str:
    if "pid" in record:
        return f"pid {record['pid']} on {record.get('host', '?')} since {record.get('since', '?')}: " \
               f"{record.get('command', '')}"
    return record.get("text") or "another process"
