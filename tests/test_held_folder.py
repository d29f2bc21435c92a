"""Round 3: the run folder is the run's while it runs. Each test does what someone who can write a shared run folder
(or a fault) does: a subfolder swapped for a link mid-run, the checkpoint being written moved and replaced by a link,
a temporary file swapped between its write and its rename, a FIFO or a sparse giant at a name the run reads, a
link or an unreadable file inside a checkpoint, a lock file removed under a run about to lock it, a checkpoint
rewritten with its manifest (with and without a key). The run stops with one line or falls back, and nothing outside
the run folder is written, chmodded or deleted."""
import contextlib
import fcntl
import json
import os
import shutil
import stat
import tempfile
import threading
import tracemalloc
from pathlib import Path

import pytest
import torch

import train
from flow_cps import checkpoints, files, lock, lora, manifest, session
from flow_cps.folder import Folder

RUN = ["--iterations", "2", "--eval_every", "2", "--checkpoint_every", "1", "--eval_per_prompt", "1",
       "--prompts_per_iter", "4", "--group_size", "4", "--micro_batch", "72", "--report_to", "none"]
KEY = "a checkpoint key for the tests"


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """A finished 2-iteration run, checkpoints 1 and 2, signed with KEY."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    with pytest.MonkeyPatch.context() as m:
        m.setenv(manifest.KEY_ENV, KEY)
        train.main([*RUN, "--output_dir", str(out)])
    return out


def _snapshot(folder: Path) -> dict:
    """Every entry under `folder`: its bytes (files), its target (links), its permission bits."""
    return {str(p.relative_to(folder)): (os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else
                                         stat.S_IMODE(p.stat().st_mode)) for p in sorted(folder.rglob("*"))}


def _resume(out, *flags):
    return train.main([*RUN, "--iterations", "4", "--checkpoint_every", "2", *flags, "--output_dir", str(out),
                       "--resume", "true"])


# -- the run folder is held by descriptor ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["checkpoints", "images"])
def test_a_subfolder_swapped_mid_run_for_a_link_to_another_run_stops_the_run(earlier, tmp_path, monkeypatch, name):
    """The run's checkpoints/ (or images/) is replaced mid-run by a link to another run's: the old code published,
    pruned (--keep_checkpoints 1 deleted the other run's checkpoints) and wrote images there, and exited 0."""
    out, other = tmp_path / "run", tmp_path / "other"
    shutil.copytree(earlier, out)
    shutil.copytree(earlier, other)
    before = _snapshot(other)
    log = session.Session.log

    def swap_then_log(self, rep):
        if rep.iteration == 3 and not (out / name).is_symlink():
            (out / name).rename(out / f"{name}.moved")
            (out / name).symlink_to(other / name)
        return log(self, rep)
    monkeypatch.setattr(session.Session, "log", swap_then_log)
    with pytest.raises(SystemExit, match=f"run/{name} is no longer the folder this run opened"):
        _resume(out, "--keep_checkpoints", "1")
    assert _snapshot(other) == before


def test_the_checkpoint_being_written_cannot_be_redirected(earlier, tmp_path, monkeypatch):
    """Its 0700 temporary folder is renamed inside the group-writable checkpoints/ and a link to the attacker's own
    0700 folder put at its name, in which training_state.pt links to a victim file: the old code wrote the checkpoint
    there, overwrote the victim with it, and opened the folder to 0755."""
    out, elsewhere, victim = tmp_path / "run", tmp_path / "elsewhere", tmp_path / "victim.txt"
    shutil.copytree(earlier, out)
    elsewhere.mkdir(mode=0o700)
    victim.write_text("precious\n")
    (elsewhere / "training_state.pt").symlink_to(victim)
    save_lora = lora.save_lora

    def swap_then_save(*a, **k):
        ck = out / "checkpoints"
        tmp = next((p for p in ck.iterdir() if p.name.startswith(".tmp-iter_")), None)
        if tmp is not None and not tmp.is_symlink():
            tmp.rename(ck / "moved-away")
            tmp.symlink_to(elsewhere)
        return save_lora(*a, **k)
    monkeypatch.setattr(lora, "save_lora", swap_then_save)
    with pytest.raises(SystemExit, match=r"the checkpoint being written, was moved or replaced"):
        _resume(out)
    assert victim.read_text() == "precious\n"
    assert os.listdir(elsewhere) == ["training_state.pt"] and stat.S_IMODE(elsewhere.stat().st_mode) == 0o700


def test_interrupted_writes_are_cleared_only_inside_the_held_folders(earlier, tmp_path, monkeypatch):
    """images/ swapped for a link between the folder's check and the run's first write: the old code's clearing of
    interrupted temporary files globbed through the link and deleted another folder's .tmp-* entries."""
    out, victim = tmp_path / "run", tmp_path / "victim"
    shutil.copytree(earlier, out)
    victim.mkdir()
    (victim / ".tmp-their-work").write_text("keep me")
    start = checkpoints.RunFolder.start

    def swap_then_start(self, *a, **k):
        (out / "images").rename(out / "images.moved")
        (out / "images").symlink_to(victim)
        return start(self, *a, **k)
    monkeypatch.setattr(checkpoints.RunFolder, "start", swap_then_start)
    with pytest.raises(SystemExit, match="run/images is no longer the folder this run opened"):
        _resume(out)
    assert (victim / ".tmp-their-work").read_text() == "keep me"


def test_a_temporary_file_swapped_before_its_rename_changes_nothing_outside(tmp_path, monkeypatch):
    """Between the write of config.json's temporary file and its rename, the temporary name becomes a link to a
    victim file: the old code chmodded the temporary file by name, so the victim's permissions changed."""
    victim = tmp_path / "victim"
    victim.write_text("secret")
    victim.chmod(0o600)
    fsync = os.fsync

    def swap_after_sync(fd):
        fsync(fd)
        name = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.basename(name).startswith(".tmp-config.json"):
            os.rename(name, name + ".moved")
            os.symlink(victim, name)
    monkeypatch.setattr(os, "fsync", swap_after_sync)
    with contextlib.suppress(OSError):  # the new code notices the name no longer leads to what it wrote
        files.write_atomic(tmp_path / "config.json", "{}")
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600 and victim.read_text() == "secret"


# -- reads: regular files only, non-blocking, capped -------------------------------------------------------------
def _fresh_check(out: Path) -> str:
    folder = checkpoints.RunFolder(out, True)
    try:
        folder.check(resume=False)
        return "accepted"
    except SystemExit as e:
        return str(e)
    finally:
        folder.close()


def test_a_fifo_at_config_json_does_not_hang_the_run(earlier, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(earlier, out)
    shutil.rmtree(out / "checkpoints")  # an earlier run without a complete checkpoint: a fresh run reads config.json
    (out / "config.json").unlink()
    os.mkfifo(out / "config.json")
    result = []
    reader = threading.Thread(target=lambda: result.append(_fresh_check(out)), daemon=True)
    reader.start()
    reader.join(60)
    if reader.is_alive():  # the old code blocks in open(); a writer's open and close frees it
        os.close(os.open(out / "config.json", os.O_WRONLY | os.O_NONBLOCK))
        reader.join(10)
        pytest.fail("a FIFO planted at config.json hung the run")
    assert "holds files that no run of this project wrote" in result[0]


def test_sparse_giants_at_config_json_and_a_manifest_are_not_read_whole(earlier, tmp_path):
    """A 32 MiB sparse file takes no disk and claims 32 MiB; read whole it took twice that in memory."""
    out = tmp_path / "run"
    shutil.copytree(earlier, out)
    ckpt = out / "checkpoints" / "iter_000002"
    for target in (ckpt / "MANIFEST.json", out / "config.json"):
        target.unlink()
        with open(target, "wb") as f:
            f.truncate(32 * 2 ** 20)
    tracemalloc.start()
    problem = checkpoints.verify(ckpt)
    shutil.rmtree(out / "checkpoints")
    refused = _fresh_check(out)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert problem and "holds files that no run of this project wrote" in refused
    assert peak < 8 * 2 ** 20, f"{peak / 2 ** 20:.0f} MiB"


def test_a_link_or_an_unreadable_file_in_a_checkpoint_falls_back_with_the_reason(earlier, tmp_path, capsys):
    """MANIFEST.json behind a link (as DVC or git-annex leave files): the old code crashed with ValueError instead of
    falling back. A file the user may not read (really: as another user, or mode 000): a PermissionError is damage."""
    out = tmp_path / "run"
    shutil.copytree(earlier, out)
    newest = out / "checkpoints" / "iter_000002"
    shutil.copy(newest / "MANIFEST.json", tmp_path / "annexed.json")
    (newest / "MANIFEST.json").unlink()
    (newest / "MANIFEST.json").symlink_to(tmp_path / "annexed.json")
    folder = checkpoints.RunFolder(out, True)
    try:
        assert folder.check(resume=True).name == "iter_000001"
    finally:
        folder.close()
    assert "skipped damaged checkpoint(s): iter_000002 (cannot be checked (NotRegular: [Errno 40] a symbolic link" \
        in capsys.readouterr().out
    shared = Path(tempfile.mkdtemp())  # a folder another user can enter
    try:
        shared.chmod(0o755)
        ckpt = shared / "iter_000001"
        shutil.copytree(out / "checkpoints" / "iter_000001", ckpt)
        (ckpt / "lora" / "pytorch_lora_weights.safetensors").chmod(0o600 if os.geteuid() == 0 else 0)
        assert _verify_as_another_user(ckpt).startswith("cannot be checked (PermissionError")
    finally:
        shutil.rmtree(shared)


def _verify_as_another_user(ckpt: Path) -> str:
    """checkpoints.verify(ckpt) as `nobody` (a forked child drops root) or, not root, as this user."""
    if os.geteuid() != 0:
        return str(checkpoints.verify(ckpt))
    read, write = os.pipe()
    if os.fork() == 0:  # the child: no torch work, only files; ends with os._exit
        try:
            os.setgid(65534)
            os.setuid(65534)
            text = str(checkpoints.verify(ckpt))
        except BaseException as e:
            text = f"raised {type(e).__name__}: {e}"
        os.write(write, text.encode()[:4000])
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.wait()
    return text


# -- the lock: only the holder removes it, and only the file named .lock counts ------------------------------------
def test_a_run_refused_by_the_lock_removes_nothing(tmp_path, monkeypatch):
    """Two launches into one new folder: the other one takes the lock between this one's open and its flock. The old
    code, having seen no lock file, deleted the holder's .lock and its (then empty) folder."""
    out, holder = tmp_path / "new", {}
    flock = fcntl.flock

    def the_other_run_first(fd, op):
        if not holder:
            holder["f"] = open(out / ".lock", "a")  # noqa: SIM115 (held until the test ends)
            flock(holder["f"], fcntl.LOCK_EX | fcntl.LOCK_NB)
        return flock(fd, op)
    monkeypatch.setattr(fcntl, "flock", the_other_run_first)
    folder = checkpoints.RunFolder(out, True)
    with pytest.raises(SystemExit, match="is in use by a running training run"):
        folder.check(resume=False)
    folder.close()
    assert (out / ".lock").stat().st_ino == os.fstat(holder["f"].fileno()).st_ino
    holder["f"].close()


def test_a_lock_on_a_file_no_longer_named_lock_does_not_count(tmp_path, monkeypatch):
    """This run opens .lock; before its flock, the holder stops before its first write and removes .lock. The old
    code then held a lock on a deleted file, and a third run created and locked a new .lock: two runs in one
    folder."""
    out = tmp_path / "run"
    out.mkdir()
    first = checkpoints.RunFolder(out, True)
    first.check(resume=False)
    flock, calls = fcntl.flock, []

    def holder_leaves_first(fd, op):
        if not calls:
            calls.append(fd)
            first.close()  # unlocks and removes the .lock it made (it never started)
        return flock(fd, op)
    monkeypatch.setattr(fcntl, "flock", holder_leaves_first)
    second = checkpoints.RunFolder(out, True)
    second.check(resume=False)
    monkeypatch.undo()
    third = checkpoints.RunFolder(out, True)
    try:
        with pytest.raises(SystemExit, match="is in use by a running training run"):
            third.check(resume=False)
    finally:
        third.close()
        second.close()


def test_the_lock_refuses_what_is_not_a_lock_file(tmp_path):
    os.mkfifo(tmp_path / ".lock")
    with pytest.raises(SystemExit, match=r"\.lock is not a regular file"):
        lock.Lock(tmp_path).acquire(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY))


# -- integrity that can be promised: the key ----------------------------------------------------------------------
def _tamper(ckpt: Path, secret: bytes | None = None) -> None:
    """What a writer of the folder can do: new weights and history in training_state.pt, and a manifest to match."""
    state = checkpoints.load_state(ckpt / "training_state.pt")
    state["history"] = [{"iteration": 0, "note": "rewritten"}]
    torch.save(state, ckpt / "training_state.pt")
    with Folder.open(ckpt) as held:
        manifest.write(held, ckpt.name, secret=secret)


def _resumes_from(out: Path, capsys) -> tuple[str, str]:
    folder = checkpoints.RunFolder(out, True)
    try:
        return folder.check(resume=True).name, capsys.readouterr().out
    finally:
        folder.close()


def test_with_a_key_a_rewritten_checkpoint_is_refused_without_one_it_is_not(earlier, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(earlier, out)
    newest = out / "checkpoints" / "iter_000002"
    monkeypatch.setenv(manifest.KEY_ENV, KEY)
    assert _resumes_from(out, capsys)[0] == "iter_000002"  # signed: verifies
    _tamper(newest)
    assert _resumes_from(out, capsys) == ("iter_000001", "resume: skipped damaged checkpoint(s): iter_000002 "
                                          "(MANIFEST.json is not signed (written without the checkpoint key)); "
                                          "using iter_000001\n")
    _tamper(newest, secret=b"another key")
    assert "MANIFEST.json does not verify with the checkpoint key" in _resumes_from(out, capsys)[1]
    (out / "checkpoints" / "iter_000002").rename(out / "checkpoints" / "iter_000003")  # a genuine one, renamed
    assert "iter_000003 (MANIFEST.json does not verify" in _resumes_from(out, capsys)[1]
    (out / "checkpoints" / "iter_000003").rename(out / "checkpoints" / "iter_000002")
    _tamper(newest)
    monkeypatch.delenv(manifest.KEY_ENV)  # without a key the manifest detects corruption only: this verifies
    assert _resumes_from(out, capsys)[0] == "iter_000002"
    assert checkpoints.load_state(newest / "training_state.pt")["history"][0]["note"] == "rewritten"


def test_a_keyed_checkpoint_counts_only_if_no_one_else_can_change_it(earlier, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(earlier, out)
    ckpt = out / "checkpoints" / "iter_000002"
    assert checkpoints.verify(ckpt, key=KEY.encode()) is None
    assert all(not p.stat().st_mode & 0o022 for p in [ckpt, *ckpt.rglob("*")])  # written writable by the owner only
    (ckpt / "lora").chmod(0o775)  # a group member could now swap the LoRA after it was verified
    assert checkpoints.verify(ckpt, key=KEY.encode()) == "lora can be changed by another user (with a checkpoint " \
        "key, every part of a checkpoint must be this user's and writable by no one else)"
    monkeypatch.setenv(manifest.KEY_FILE_ENV, str(out / "key.txt"))  # where the folder's writers could read it
    (out / "key.txt").write_text(KEY)
    with pytest.raises(SystemExit, match="is inside the run folder"):
        checkpoints.RunFolder(out, True)


def test_the_iteration_resumed_from_is_the_folders_name(earlier, tmp_path, capsys):
    """A checkpoint folder holding another iteration's state (a copy put in its place) is damaged: the old code took
    the iteration from the file, so the pruning protection landed on another folder."""
    out = tmp_path / "run"
    shutil.copytree(earlier, out)
    ck = out / "checkpoints"
    shutil.rmtree(ck / "iter_000002")
    shutil.copytree(ck / "iter_000001", ck / "iter_000002")
    with Folder.open(ck / "iter_000002") as held:
        manifest.write(held, "iter_000002")
    name, text = _resumes_from(out, capsys)
    assert name == "iter_000001" and "iter_000002 (training_state.pt holds iteration 1, not 2 as its folder's " \
        "name says)" in text


def test_a_run_that_never_starts_removes_the_parent_folders_it_made(tmp_path):
    folder = checkpoints.RunFolder(tmp_path / "a" / "b" / "run", True)
    folder.check(resume=False)
    folder.close()
    assert os.listdir(tmp_path) == []


def test_the_manifest_format(earlier):
    doc = json.loads((earlier / "checkpoints" / "iter_000001" / "MANIFEST.json").read_text())
    assert sorted(doc) == ["files", "hmac_sha256"] and "training_state.pt" in doc["files"]
