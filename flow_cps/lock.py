"""The run folder's lock: one run at a time in a folder, and a refusal that names the running one.

Two guards, because neither holds everywhere (docs/RUN_FOLDER.md, "The lock"):
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
import stat
import sys
import threading
import time
from pathlib import Path

LOCK_REFRESH_S = 60
LOCK_STALE_S = 300
RETRIES = 5  # looks at a .lock that keeps being replaced before giving up
NO_FLOCK = "FLOW_CPS_NO_FLOCK"  # "1": do not flock (a filesystem without locks); the host/pid record still guards


class Lock:
    """`.lock` in the run folder, held from `acquire` to `release` (rank 0 of a run). Only the run that holds it
    removes it, and a lock taken on a file no longer named `.lock` does not count."""

    def __init__(self, folder: Path):
        self.path, self.fd, self._stop = Path(folder) / ".lock", None, threading.Event()
        self.dir_fd: int | None = None  # the run folder's descriptor (the caller's: not closed here)
        self.made = False  # this run created the lock file (removed again if the run never starts)
        self.refused = False  # another run holds the folder: nothing of it may be touched

    def acquire(self, dir_fd: int) -> None:
        """Take the lock in the folder open as `dir_fd`, or stop with one line naming the holder (or the problem and
        its fix)."""
        for _ in range(RETRIES):
            opened = self._open(dir_fd)
            if opened is None:  # removed between a look and the open: look again
                continue
            fd, made = opened
            try:
                self._flock(fd)
                # A holder that removes the file as it stops releases its lock on a name no longer there: a run that
                # opened the file before the removal now holds a lock no one else can see. Only the file still named
                # .lock counts; otherwise look again (a new file, or the next holder's).
                if _same_file(dir_fd, fd):
                    break
            except BaseException:
                if made and not self.refused and _same_file(dir_fd, fd):  # no locks here: leave no lock file
                    os.unlink(".lock", dir_fd=dir_fd)
                os.close(fd)
                raise
            os.close(fd)
        else:
            raise SystemExit(f"{self.path} was replaced {RETRIES} times while this run tried to lock it; another "
                             "process keeps removing the lock file: stop it, or choose another --output_dir")
        try:
            holder = _read(fd)
            if _alive(holder) and (holder["host"] != socket.gethostname() or os.environ.get(NO_FLOCK) == "1"):
                self.refused = True
                raise SystemExit(f"{self.path.parent} is in use by a running training run ({_describe(holder)}, "
                                 f"its record refreshed {_age(holder):.0f} s ago); file locks on this filesystem do "
                                 f"not reach that run. Wait for it to finish, or choose another --output_dir (a record"
                                 f" not refreshed for {LOCK_STALE_S} s is taken as a stopped run's)")
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.dir_fd, self.made = fd, dir_fd, made
        self._write(dict(host=socket.gethostname(), pid=os.getpid(), since=time.strftime("%Y-%m-%d %H:%M:%S"),
                         command=" ".join(sys.argv)))
        threading.Thread(target=self._refresh, daemon=True, name="flow_cps-lock").start()

    def _open(self, dir_fd: int) -> tuple[int, bool] | None:
        """(descriptor, made by this call) of `.lock`, created if missing (O_EXCL decides who made it); None if it
        vanished between the two opens. O_NOFOLLOW: a link planted at .lock is never followed, let alone truncated."""
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            try:
                return os.open(".lock", flags | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd), True
            except FileExistsError:
                fd = os.open(".lock", flags, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise SystemExit(f"{self.path} is a symbolic link, not a lock file written by a run; remove it and "
                                 "start again") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise SystemExit(f"{self.path} is not a regular file, so not a lock file written by a run; remove it and "
                             "start again")
        return fd, False

    def _flock(self, fd: int) -> None:
        if os.environ.get(NO_FLOCK) == "1":
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.refused = True
            raise SystemExit(f"{self.path.parent} is in use by a running training run ({_describe(_read(fd))}); "
                             "wait for it to finish, or choose another --output_dir") from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP, ENOSYS, ...: no locks on this mount
            code = errno.errorcode.get(e.errno, "?")
            raise SystemExit(f"{self.path.parent}: cannot lock {self.path.name} ({code}: {e.strerror}): this "
                             "filesystem does not support file locks (an NFS mount without lockd, Lustre mounted with "
                             f"noflock, ...). Use a --output_dir on a local disk, or set {NO_FLOCK}=1 to rely on the "
                             "lock file's host/pid record alone (docs/RUN_FOLDER.md, 'The lock')") from None

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

    def release(self, remove: bool = False) -> None:
        """Unlock; before that, clear the record (so that a run on another host need not wait for it to go stale),
        or with `remove` delete the lock file, if it is still the one this run holds. Nothing if not held."""
        if self.fd is None:
            return
        self._stop.set()
        try:
            if remove and _same_file(self.dir_fd, self.fd):
                os.unlink(".lock", dir_fd=self.dir_fd)
            else:
                self._write({})
        finally:
            os.close(self.fd)
            self.fd = None


def _same_file(dir_fd: int, fd: int) -> bool:
    """Whether `.lock` in the folder is the file open as `fd` (not a link, not a replacement)."""
    try:
        st = os.stat(".lock", dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


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
