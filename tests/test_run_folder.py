"""The run folder (checkpoints.RunFolder, lock.py, files.py) tried as an attacker and as a cluster would: a folder
is claimed before it is inspected, a fresh run clears only what an earlier run of this project wrote, no write
follows a link planted in the folder, a filesystem without locks is named, and another host's live run is refused;
and the model cache, which concurrent processes build, a killed build leaves behind, a group shares and a bad disk
damages."""
import errno
import fcntl
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train
from flow_cps import cache, checkpoints, lock
from flow_cps.folder import Folder

ROOT = Path(__file__).resolve().parent.parent

RUN = ["--iterations", "2", "--eval_every", "2", "--checkpoint_every", "2", "--eval_per_prompt", "1",
       "--prompts_per_iter", "4", "--group_size", "4", "--micro_batch", "72", "--report_to", "none"]


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """A finished 2-iteration run to copy."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    train.main([*RUN, "--output_dir", str(out)])
    return out


def test_new_run_folders_are_reserved_and_locked_before_anything_is_inspected(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = (checkpoints.resolve("", "tiny", resume=False) for _ in range(2))  # two launches at once
    assert (str(first), str(second)) == ("runs/tiny/run-001", "runs/tiny/run-002") and first.is_dir()
    (tmp_path / "runs" / "tiny" / "latest").write_text("run-001")  # not a link (a copy made by a sync tool)
    with pytest.raises(SystemExit, match=r"runs/tiny/latest is missing or not a link to a run folder"):
        checkpoints.resolve("", "tiny", resume=True)
    folder = checkpoints.RunFolder(tmp_path / "new", True)
    assert folder.check(resume=False) is None
    record = json.loads((tmp_path / "new" / ".lock").read_text())
    assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid())  # who holds it
    with open(tmp_path / "new" / ".lock") as f, pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held from the first look, not from the first write
    with pytest.raises(SystemExit, match=f"is in use by a running training run \\(pid {os.getpid()}"):
        checkpoints.RunFolder(tmp_path / "new", True).check(resume=False)
    folder.close()
    assert not (tmp_path / "new").exists()  # created, never written into: removed with its lock


def test_a_fresh_run_clears_only_an_earlier_runs_files(earlier, tmp_path):
    cats = tmp_path / "cats"  # a user's folder that happens to hold names a run writes
    (cats / "images").mkdir(parents=True)
    (cats / "images" / "cat.jpg").write_bytes(b"meow")
    (cats / "metrics.jsonl").write_text("mine\n")
    with pytest.raises(SystemExit, match=r"holds files that no run of this project wrote \(images, metrics.jsonl\)"):
        train.main([*RUN, "--output_dir", str(cats)])
    assert (cats / "images" / "cat.jpg").read_bytes() == b"meow" and (cats / "metrics.jsonl").read_text() == "mine\n"
    assert sorted(os.listdir(cats)) == ["images", "metrics.jsonl"]  # not even a lock file is left behind
    crashed = tmp_path / "crashed"  # an earlier run of this project, without a complete checkpoint
    shutil.copytree(earlier, crashed)
    shutil.rmtree(crashed / "checkpoints")
    (crashed / "images" / "cat.jpg").write_bytes(b"meow")  # ... into which the user put a file
    with pytest.raises(SystemExit, match=r"no run of this project wrote \(images\)"):
        train.main([*RUN, "--output_dir", str(crashed)])
    (crashed / "images" / "cat.jpg").unlink()
    train.main([*RUN, "--output_dir", str(crashed)])  # now provably an earlier run's: cleared and reused


def test_no_write_follows_a_link_planted_in_the_run_folder(earlier, tmp_path):
    out, victim = tmp_path / "run", tmp_path / "victim"
    shutil.copytree(earlier, out)
    victim.mkdir()
    planted = ["config.json", "metrics.jsonl", "reward_curve.png", "checkpoints/latest"]
    for name in planted:
        (victim / name.replace("/", "_")).write_text("the victim's file\n")
        (out / name).unlink()
        (out / name).symlink_to(victim / name.replace("/", "_"))
    train.main([*RUN, "--iterations", "4", "--output_dir", str(out), "--resume", "true"])
    assert all(p.read_text() == "the victim's file\n" for p in victim.iterdir())
    assert not any((out / name).is_symlink() for name in planted)  # replaced by the run's own files
    (out / ".lock").unlink()
    (out / ".lock").symlink_to(victim / "config.json")
    with pytest.raises(SystemExit, match=r"\.lock is a symbolic link, not a lock file written by a run"):
        train.main([*RUN, "--iterations", "6", "--output_dir", str(out), "--resume", "true"])
    (out / ".lock").unlink()
    for name in ("images", "tensorboard", "wandb", "checkpoints"):
        (out / name).mkdir(exist_ok=True)
        (out / name).rename(out / f"{name}.real")
        (out / name).symlink_to(victim)
        with pytest.raises(SystemExit, match=f"{name} is a symbolic link; a run writes only into real folders"):
            train.main([*RUN, "--iterations", "6", "--output_dir", str(out), "--resume", "true"])
        (out / name).unlink()
        (out / f"{name}.real").rename(out / name)
    assert sorted(p.name for p in victim.iterdir()) == sorted(n.replace("/", "_") for n in planted)


def test_a_filesystem_without_locks_is_named_with_the_fix(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(SystemExit) as e:
        train.main([*RUN, "--output_dir", str(tmp_path / "nfs")])
    assert "cannot lock .lock (ENOLCK: No locks available): this filesystem does not support file locks" in \
        str(e.value) and "FLOW_CPS_NO_FLOCK=1" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "nfs").exists()
    monkeypatch.setenv(lock.NO_FLOCK, "1")  # the documented override: the host/pid record alone
    train.main([*RUN, "--output_dir", str(tmp_path / "nfs")])


def test_the_lock_record_is_refreshed_while_held(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "LOCK_REFRESH_S", 0.05)
    held = lock.Lock(tmp_path)
    held.acquire(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY))
    old = time.time() - 3600
    os.utime(tmp_path / ".lock", (old, old))
    time.sleep(0.5)
    assert time.time() - (tmp_path / ".lock").stat().st_mtime < 60  # refreshed by the holder's thread
    held.release()


def test_another_hosts_live_record_is_refused_a_stale_one_taken_over(tmp_path):
    """Where flock is node-local (some NFS mounts), both hosts would "hold" the lock: the record decides."""
    out = tmp_path / "run"
    out.mkdir()
    record = dict(host="node7", pid=4242, since="today", command="train.py --seed 1")
    (out / ".lock").write_text(json.dumps(record))  # refreshed just now by a run on node7
    with pytest.raises(SystemExit, match=r"in use by a running training run \(pid 4242 on node7 since today: "
                                         r"train.py --seed 1, its record refreshed \d+ s ago\); file locks"):
        train.main([*RUN, "--output_dir", str(out)])
    old = time.time() - lock.LOCK_STALE_S - 60
    os.utime(out / ".lock", (old, old))  # node7's run stopped long ago without clearing its record
    train.main([*RUN, "--output_dir", str(out)])
    assert (out / ".lock").read_text() == ""  # a finished run clears its record


def test_two_builders_of_a_cache_entry_agree(tmp_path, monkeypatch):
    """Two processes build the same cache entry at once (ranks, bench workers): the other's rename lands between
    this one's build and its rename. The rename decides: the second finds the first's result and keeps it (a check
    before the rename could not see it coming, and the rename then failed with ENOTEMPTY)."""
    path, replace = tmp_path / "digits-key", os.replace

    def racing(src, dst, **kw):
        if dst == path.name and not path.exists():
            (tmp_path / "theirs").mkdir()
            (tmp_path / "theirs" / "info.json").write_text('{"built_by": "the other process"}')
            with Folder.open(tmp_path / "theirs") as theirs:
                cache.seal(theirs)
            replace(tmp_path / "theirs", path)
        return replace(src, dst, **kw)
    monkeypatch.setattr(os, "replace", racing)
    built = cache.cached(path, lambda out: (out / "info.json").write_text('{"built_by": "this one"}'), "a test")
    assert built == path and json.loads((path / "info.json").read_text()) == {"built_by": "the other process"}
    assert [p.name for p in tmp_path.iterdir()] == ["digits-key"]  # this one's build is gone


def _build(out):
    (out / "weights.bin").write_bytes(b"w" * 1000)
    (out / "info.json").write_text("{}")


def test_a_cache_entry_is_checked_on_every_use_and_a_damaged_one_rebuilt(tmp_path, capsys):
    """A flipped byte in a cached model (a bad disk, a copy cut short): it was used as it was; now the entry's
    manifest finds it and the entry is built again."""
    path = cache.cached(tmp_path / "judge-key", _build, "a test")
    data = bytearray((path / "weights.bin").read_bytes())
    data[500] ^= 1
    (path / "weights.bin").write_bytes(bytes(data))
    assert cache.cached(path, _build, "a test") == path and (path / "weights.bin").read_bytes() == b"w" * 1000
    assert "is damaged (weights.bin is corrupt (checksum mismatch)): building it again" in capsys.readouterr().out


def test_a_killed_build_leaves_no_folder_behind_for_long(tmp_path):
    """A build killed by SIGKILL (no cleanup runs) leaves its .tmp-build-* folder; the next build removes it once
    no builder holds it. A live builder's folder (its lock held) is left alone."""
    script = ("import sys, time; from pathlib import Path; from flow_cps import cache; "
              "cache.cached(Path(sys.argv[1]), lambda out: (print('building', flush=True), time.sleep(600)), 'x')")
    p = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "entry")], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().startswith("[flow_cps] first use") and p.stdout.readline() == "building\n"
    (live,) = tmp_path.glob(".tmp-build-*")
    old = time.time() - cache.STALE_S - 60
    os.utime(live, (old, old))  # a build that has run for over an hour
    cache.cached(tmp_path / "other", _build, "a test")
    assert live.exists()  # its builder holds it: still building
    p.kill()
    p.wait()
    cache.cached(tmp_path / "third", _build, "a test")
    assert not live.exists() and sorted(q.name for q in tmp_path.iterdir()) == ["other", "third"]


def test_a_shared_cache_is_readable_by_the_group(tmp_path, monkeypatch):
    """Entries were 0700 (the build's temporary folder, renamed into place): a second user could not load them.
    They get the umask's permissions, group-writable with umask 002 (docs/RUN_FOLDER.md, "The model cache")."""
    monkeypatch.setattr(cache, "UMASK", 0o002)
    old = os.umask(0o002)
    try:
        path = cache.cached(tmp_path / "entry", _build, "a test")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o775
    assert {stat.S_IMODE(q.stat().st_mode) for q in path.iterdir()} == {0o664}
