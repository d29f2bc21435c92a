"""The run folder (checkpoints.RunFolder, lock.py, files.py) tried as an attacker and as a cluster would: a folder
is claimed before it is inspected, a fresh run clears only what an earlier run of this project wrote, no write
follows a link planted in the folder, a filesystem without locks is named, and another host's live run is refused;
and the digits cache, which concurrent processes build."""
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

import train
from flow_cps import checkpoints, digits, lock

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


def test_two_builders_of_the_digits_cache_agree(tmp_path, monkeypatch):
    """Two processes pre-train the same cache entry at once (ranks, bench workers): the other's rename lands between
    this one's build and its rename. The rename decides: the second finds the first's result and keeps it (a check
    before the rename could not see it coming, and the rename then failed with ENOTEMPTY)."""
    path, replace = tmp_path / "digits-key", os.replace

    def racing(src, dst):
        if Path(dst) == path and not path.exists():
            (tmp_path / "theirs").mkdir()
            (tmp_path / "theirs" / "info.json").write_text('{"built_by": "the other process"}')
            replace(tmp_path / "theirs", path)
        return replace(src, dst)
    monkeypatch.setattr(os, "replace", racing)
    built = digits.cached(path, lambda out: (out / "info.json").write_text('{"built_by": "this one"}'), "a test")
    assert built == path and json.loads((path / "info.json").read_text()) == {"built_by": "the other process"}
    assert [p.name for p in tmp_path.iterdir()] == ["digits-key"]  # this one's build is gone
