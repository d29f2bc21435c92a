"""A folder held by its descriptor. A name is looked up once, when the folder is opened; every later create, write,
read, rename, chmod and delete goes through the descriptor (`dir_fd=`), so renaming the folder, or replacing it by a
link or another folder, cannot redirect them. Plumbing for the run folder (checkpoints.py), the logs (logs.py) and
the model cache (cache.py); docs/RUN_FOLDER.md says what this holds against.

    run = Folder.open("runs/tiny/run-001")     # the path as given (it may itself be a link)
    ck = run.child("checkpoints", create=True)  # O_NOFOLLOW; opened once, and checked to be still there on each call
    name, tmp = ck.private(".tmp-iter_000002-") # a new 0700 folder only this user can write into
    torch.save(state, tmp.path + "/x.pt")       # libraries that take a path: /proc/self/fd/N reaches the held folder
    ck.write("latest", "iter_000002")           # atomic and durable: a new file, fsynced, renamed over the name
    ck.read("latest", cap=4096)                 # a regular file only: no link, a FIFO cannot block, size capped
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import stat
from collections.abc import Iterator

TMP_PREFIX = ".tmp-"  # every temporary name in a run folder starts so: an interrupted write leaves nothing else
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class NotRegular(OSError):
    """A name that should be a regular file of this project is something else: a link, a FIFO, a folder, too big."""


class Folder:
    def __init__(self, fd: int, where: str):
        self.fd, self.where = fd, where  # `where`: the path for messages only; nothing is looked up by it
        self._children: dict[str, Folder] = {}

    @classmethod
    def open(cls, path, follow: bool = True) -> Folder:
        """The folder at `path`. follow=True lets `path` itself be a link (a user's --output_dir may be one)."""
        flags = _DIR if not follow else _DIR & ~os.O_NOFOLLOW
        return cls(os.open(path, flags), str(path))

    def __enter__(self) -> Folder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for c in self._children.values():
            c.close()
        self._children.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def path(self) -> str:
        """A path to this very folder wherever it is now, for libraries that take paths (safetensors, diffusers,
        torch.distributed.checkpoint): the kernel resolves /proc/self/fd/N to the open folder, not to a name. Valid in
        this process only."""
        return f"/proc/self/fd/{self.fd}"

    def identity(self) -> tuple[int, int]:
        st = os.fstat(self.fd)
        return st.st_dev, st.st_ino

    # -- subfolders ------------------------------------------------------------------------------------------------
    def sub(self, name: str, create: bool = False, mode: int = 0o777) -> Folder:
        """Open the subfolder `name` (made first if `create`); a link there is refused (OSError ELOOP), as is a file."""
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, mode, dir_fd=self.fd)
        try:
            return Folder(os.open(name, _DIR, dir_fd=self.fd), f"{self.where}/{name}")
        except OSError as e:  # a link there fails with ELOOP or (O_DIRECTORY first) ENOTDIR
            st = self.lstat(name) if e.errno in (errno.ELOOP, errno.ENOTDIR) else None
            if st is not None and stat.S_ISLNK(st.st_mode):
                raise NotRegular(errno.ELOOP, "a symbolic link, not a folder", f"{self.where}/{name}") from None
            raise

    def child(self, name: str, create: bool = False) -> Folder:
        """The subfolder `name`, opened once and held. Every later call checks that the name still leads to it and
        stops the run with one line if not: a folder moved or swapped mid-run is never written into by name."""
        held = self._children.get(name)
        if held is None:
            try:
                held = self._children[name] = self.sub(name, create)
            except NotRegular:
                raise SystemExit(f"{self.where}/{name} is a symbolic link; a run writes only into real folders inside "
                                 "its run folder: replace it with a folder (or make --output_dir itself the "
                                 "link)") from None
            except NotADirectoryError:
                raise SystemExit(f"{self.where}/{name} is a file; a run writes a folder there: move the file "
                                 "away") from None
        elif not self.holds(name, held):
            raise SystemExit(f"{self.where}/{name} is no longer the folder this run opened (moved, or replaced by a "
                             "link or another folder, while the run was using it); the run stops so that it writes "
                             "nothing outside its folder: put the folder back and continue with --resume true")
        return held

    def holds(self, name: str, folder: Folder) -> bool:
        """Whether the entry `name` here is `folder` itself (the same inode, not a link to it)."""
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) == folder.identity()

    def private(self, prefix: str) -> tuple[str, Folder]:
        """A new folder `prefix<random>` that only this user can enter (0700, as tempfile.mkdtemp), held open:
        (its name, the folder). Checked to be the one made: a folder swapped in between is another user's or a link."""
        while True:
            name = prefix + secrets.token_hex(4)
            try:
                os.mkdir(name, 0o700, dir_fd=self.fd)
                break
            except FileExistsError:
                continue
        made = self.sub(name)
        st = os.fstat(made.fd)
        if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
            made.close()
            raise NotRegular(errno.EPERM, "replaced before it was opened", f"{self.where}/{name}")
        return name, made

    # -- entries ---------------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(os.listdir(self.fd))

    def lstat(self, name: str) -> os.stat_result | None:
        """The entry itself (a link is not followed); None if there is none."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def is_dir(self, name: str) -> bool:
        st = self.lstat(name)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def rename(self, src: str, dst: str) -> None:
        os.replace(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def remove(self, name: str) -> None:
        """Delete the entry `name`, a whole folder included (shutil.rmtree through descriptors: a link inside is
        removed, never followed); nothing if it is gone."""
        held = self._children.pop(name, None)
        if held is not None:  # a held subfolder removed on purpose: the next `child` makes a new one
            held.close()
        st = self.lstat(name)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=self.fd)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.fd)

    def fsync(self) -> None:
        """Make this folder's entries (creations, renames, deletions) durable."""
        os.fsync(self.fd)

    def chmod(self, mode: int) -> None:
        os.fchmod(self.fd, mode)

    # -- files -----------------------------------------------------------------------------------------------------
    def open_file(self, relpath: str) -> int:
        """A read descriptor of the regular file at `relpath` ('a/b' walked one folder at a time, none of them
        followed if a link). Non-blocking, so a FIFO planted at the name cannot hang the run; NotRegular for a link,
        a FIFO, a device or a folder."""
        *parts, last = relpath.split("/")
        if any(p in ("", ".", "..") for p in (*parts, last)):
            raise NotRegular(errno.EINVAL, "not a plain relative name", relpath)
        fd, opened = self.fd, []
        try:
            for p in parts:
                fd = os.open(p, _DIR, dir_fd=fd)
                opened.append(fd)
            try:
                out = os.open(last, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise NotRegular(errno.ELOOP, "a symbolic link", f"{self.where}/{relpath}") from None
                raise
        finally:
            for f in opened:
                os.close(f)
        if not stat.S_ISREG(os.fstat(out).st_mode):
            os.close(out)
            raise NotRegular(errno.EINVAL, "not a regular file", f"{self.where}/{relpath}")
        return out

    def read(self, relpath: str, cap: int) -> bytes:
        """The whole regular file, refused (NotRegular) if it holds more than `cap` bytes (a sparse file can claim
        terabytes it never stored)."""
        with os.fdopen(self.open_file(relpath), "rb") as f:
            data = f.read(cap + 1)
        if len(data) > cap:
            raise NotRegular(errno.EFBIG, f"larger than {cap} bytes", f"{self.where}/{relpath}")
        return data

    def sha256(self, relpath: str) -> tuple[int, str]:
        """(size, sha256) of the regular file, read in blocks (hashlib.file_digest): memory stays flat."""
        with os.fdopen(self.open_file(relpath), "rb") as f:
            return os.fstat(f.fileno()).st_size, hashlib.file_digest(f, "sha256").hexdigest()

    def create(self, name: str, mode: int = 0o666):
        """A new file `name` open for writing (binary); fails if anything, a link included, is at the name."""
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self.fd)
        return os.fdopen(fd, "wb")

    def write(self, name: str, data: bytes | str) -> None:
        """`data` into `name`, atomically and durably: a new file (the umask's permissions, as open() gives), fsynced,
        renamed over `name` (a link there is replaced, its target untouched), then this folder fsynced. A reader sees
        the old file or the new one, never a part."""
        tmp = f"{TMP_PREFIX}{name}-{secrets.token_hex(4)}"
        try:
            with self.create(tmp) as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
                written = os.fstat(f.fileno())
            self.rename(tmp, name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            raise
        self.fsync()
        now = self.lstat(name)  # the name must now lead to the file written, not to one swapped in at `tmp`
        if now is None or (now.st_dev, now.st_ino) != (written.st_dev, written.st_ino):
            raise NotRegular(errno.ESTALE, "replaced while it was written", f"{self.where}/{name}")

    def append(self, name: str) -> int:
        """A descriptor appending to the regular file `name` (created if missing); later swaps of the name cannot
        redirect the writes, which go to the file that was opened."""
        try:
            fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         0o666, dir_fd=self.fd)
        except OSError as e:  # ELOOP: a link; ENXIO: a FIFO no one reads
            raise NotRegular(e.errno, "not a regular file", f"{self.where}/{name}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise NotRegular(errno.EINVAL, "not a regular file", f"{self.where}/{name}")
        return fd

    # -- trees -----------------------------------------------------------------------------------------------------
    def walk(self) -> Iterator[tuple[str, list[str], list[str], int]]:
        """os.fwalk of this folder, bottom-up, links never followed: (relative folder, folders, other entries, its
        descriptor)."""
        for parent, dirs, names, fd in os.fwalk(".", dir_fd=self.fd, topdown=False):
            yield ("" if parent == "." else parent.removeprefix("./")), dirs, names, fd

    def files(self) -> tuple[list[str], list[str]]:
        """(regular files, anything else: links, FIFOs, ...) under this folder, as sorted '/'-separated relative
        paths; a link to a folder is listed, never entered."""
        regular, odd = [], []
        for parent, dirs, names, fd in self.walk():
            for n in dirs + names:  # fwalk lists a link to a folder among the folders, and does not enter it
                mode = os.stat(n, dir_fd=fd, follow_symlinks=False).st_mode
                if not stat.S_ISDIR(mode):
                    (regular if stat.S_ISREG(mode) else odd).append(f"{parent}/{n}" if parent else n)
        return sorted(regular), sorted(odd)

    def fsync_tree(self) -> None:
        """fsync every file under this folder, then every folder bottom-up, so that a rename published after it
        cannot reach the disk before the data it publishes (after a power loss)."""
        for _, _, names, fd in self.walk():
            for n in names:
                f = os.open(n, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
                try:
                    os.fsync(f)
                finally:
                    os.close(f)
            os.fsync(fd)

    def seal(self, strip: int) -> None:
        """Remove the permission bits `strip` from everything under this folder (0o022: no one but the owner can
        change it), through descriptors."""
        for _, _, names, fd in self.walk():
            for n in names:  # Linux has no chmod that refuses a link: open without following, then fchmod
                f = os.open(n, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
                try:
                    os.fchmod(f, stat.S_IMODE(os.fstat(f).st_mode) & ~strip)
                finally:
                    os.close(f)
            os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) & ~strip)
