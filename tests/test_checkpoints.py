"""The run folder (checkpoints.py) and loud failures, tried as a hostile user would: a crash while writing the first
checkpoint, a damaged newest checkpoint, a second run into a running one's folder, a full disk, a planted pickle,
rerunning the Quickstart, a reward that always fails, a diverging run. Each ends in a folder that recovers and a
message that names the problem."""
import fcntl
import hashlib
import json
import os
import pickle
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch

import rewards
import train
from flow_cps import checkpoints, files, manifest
from flow_cps.folder import Folder

RUN = ["--iterations", "4", "--eval_every", "2", "--checkpoint_every", "2", "--eval_per_prompt", "1",
       "--prompts_per_iter", "4", "--group_size", "4", "--micro_batch", "72", "--report_to", "none"]


def _lora(run, it):
    return (run / "checkpoints" / f"iter_{it:06d}" / "lora" / "pytorch_lora_weights.safetensors").read_bytes()


def _rewrite_manifest(ckpt):
    """What anyone who can write the folder can do: a manifest that matches the files as they now are."""
    with Folder.open(ckpt) as held:
        manifest.write(held, ckpt.name)


def _rows(run):
    return [json.loads(x, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
            for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A reference run of 4 iterations, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train.main([*RUN, "--output_dir", str(out)])
    return out


def test_crash_in_the_first_checkpoint_then_restart(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    write = manifest.write  # (the model cache writes manifests too)
    monkeypatch.setattr(manifest, "write", lambda folder, name, *a: (_ for _ in ()).throw(KeyboardInterrupt)
                        if name.startswith("iter_") else write(folder, name, *a))
    with pytest.raises(KeyboardInterrupt):
        train.main([*RUN, "--output_dir", str(out)])
    monkeypatch.undo()
    (tmp,) = (out / "checkpoints").iterdir()
    assert tmp.name.startswith(".tmp-iter_000002-") and tmp.stat().st_mode & 0o777 == 0o700  # closed while written
    with pytest.raises(SystemExit, match="no complete checkpoint in .*run without --resume to start fresh"):
        train.main([*RUN, "--output_dir", str(out), "--resume", "true"])
    train.main([*RUN, "--output_dir", str(out)])  # without --resume: the partial files are cleared, in one line
    assert "cleared an earlier run that left no complete checkpoint" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_000002", "iter_000004", "latest"]
    assert [r["iteration"] for r in _rows(out)] == [0, 1, 2, 3, 4]  # a fresh log, not appended to the crashed one


@pytest.mark.parametrize("damage,reason", [
    ("truncate", "training_state.pt has"), ("delete", "lora_ema/pytorch_lora_weights.safetensors is missing"),
    ("lora", "lora/pytorch_lora_weights.safetensors is corrupt"),
    ("pickle", "training_state.pt cannot be loaded safely (UnpicklingError")])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(straight, tmp_path, damage, reason, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    newest = out / "checkpoints" / "iter_000004"
    if damage == "truncate":
        state = newest / "training_state.pt"
        state.write_bytes(state.read_bytes()[:1000])
    elif damage == "delete":
        (newest / "lora_ema" / "pytorch_lora_weights.safetensors").unlink()
    elif damage == "lora":  # same size, other bytes: only the checksum sees it
        f = newest / "lora" / "pytorch_lora_weights.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    else:  # a training state carrying a pickled object (a planted file): weights_only refuses to run it
        st = checkpoints.load_state(newest / "training_state.pt")
        st["payload"] = _Planted()
        torch.save(st, newest / "training_state.pt")
        _rewrite_manifest(newest)  # even with a matching manifest
    (out / "checkpoints" / "latest").write_text("")  # and an emptied pointer
    res = train.main([*RUN, "--output_dir", str(out), "--resume", "true"])
    text = capsys.readouterr().out
    assert f"skipped damaged checkpoint(s): iter_000004 ({reason}" in text and "using iter_000002" in text
    assert "resumed from iter_000002" in text
    assert _lora(out, 4) == _lora(straight, 4)  # the resumed run redid iterations 3-4 exactly
    assert [h["iteration"] for h in res["history"]] == [0, 1, 2, 3, 4]


class _Planted:
    pass


def test_a_second_run_into_a_running_ones_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as lock:  # another process holds the folder
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 4242 on node7 since today: train.py --seed 1\n")
        lock.flush()
        with pytest.raises(SystemExit, match=r"is in use by a running training run \(pid 4242 on node7"):
            train.main([*RUN, "--output_dir", str(out)])
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    train.main([*RUN, "--iterations", "2", "--output_dir", str(out)])  # released (the holder exited): it runs


def test_a_full_disk_stops_with_a_message_and_keeps_the_earlier_checkpoint(straight, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    save = torch.save

    def full(obj, f, *a, **k):
        if obj.get("iteration") == 6:  # the training state of checkpoint 6
            raise OSError(28, "No space left on device")
        return save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SystemExit, match="no space left on the device writing checkpoint iter_000006"):
        train.main([*RUN, "--iterations", "6", "--output_dir", str(out), "--resume", "true"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_000002", "iter_000004", "latest"]
    assert checkpoints.verify(out / "checkpoints" / "iter_000004") is None


def test_rerunning_the_quickstart_starts_a_new_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = train.main(RUN)["output_dir"]  # no --output_dir: runs/<preset>/run-NNN
    second = train.main(RUN)["output_dir"]
    assert (str(first), str(second)) == ("runs/tiny/run-001", "runs/tiny/run-002")
    assert (tmp_path / "runs/tiny/latest").resolve() == (tmp_path / "runs/tiny/run-002").resolve()
    assert (tmp_path / first / "checkpoints" / "iter_000004").is_dir()  # the first run is untouched
    resumed = train.main([*RUN, "--iterations", "6", "--resume", "true"])  # continues the newest
    assert str(resumed["output_dir"]) == "runs/tiny/run-002" and resumed["history"][-1]["iteration"] == 6


def test_a_reward_that_always_fails_stops_the_run(tmp_path):
    @rewards.register("always_fails_test_reward")
    def broken(device="cpu"):
        def fn(images, prompts, metadata=None):
            raise RuntimeError("the scoring server is down")
        return fn
    try:
        with pytest.raises(SystemExit, match="iteration 1: reward 'always_fails_test_reward' failed for all 16 "
                                             "samples .*the scoring server is down"):
            train.main([*RUN, "--reward", "always_fails_test_reward", "--output_dir", str(tmp_path / "run")])
    finally:
        rewards.REGISTRY.pop("always_fails_test_reward")
    assert not any((tmp_path / "run" / "checkpoints").glob("iter_*"))


def test_divergence_stops_before_anything_is_checkpointed(tmp_path):
    with pytest.raises(SystemExit, match=r"iteration 1: training diverged: the optimizer step overflowed .*learning "
                                         r"rate \(1e\+38\) is likely too high"):
        train.main([*RUN, "--lr", "1e38", "--output_dir", str(tmp_path / "run")])
    assert not any((tmp_path / "run" / "checkpoints").glob("iter_*"))
    # finite but huge weights after the first update: the second one's gradients are NaN
    with pytest.raises(SystemExit, match=r"iteration 1: training diverged: the gradient norm is nan"):
        train.main([*RUN, "--lr", "1e30", "--output_dir", str(tmp_path / "run2")])
    assert not any((tmp_path / "run2" / "checkpoints").glob("iter_*"))


# -- round 2: a checkpoint no one can poison, numbers not names, durable and fully verified -------------------------
class _Bomb:
    """A pickle that, if anything unpickled it, would create `marker` (the planted code of a hostile file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The reference run under FSDP2 (a gloo group of one, in-process): LoRA exports, dcp/ shards, training state."""
    out = tmp_path_factory.mktemp("sharded") / "run"
    train.main([*RUN, "--parallel", "fsdp", "--output_dir", str(out)])
    return out


def test_a_planted_pickle_in_any_file_of_a_sharded_checkpoint_never_runs(sharded, tmp_path, capsys):
    """FSDP2 shards are safetensors read by torch's HuggingFaceStorageReader: nothing on the resume path unpickles.
    Each file of the newest checkpoint replaced by a pickle, the manifest rewritten to match (the attacker can write
    it too): verify names the file; a planted copy of DCP's old pickled `.metadata` is never opened; and with every
    file replaced, the resume falls back to the previous checkpoint and continues exactly. The code never runs."""
    out, marker = tmp_path / "run", tmp_path / "the_planted_code_ran"
    shutil.copytree(sharded, out)
    newest = out / "checkpoints" / "iter_000004"
    names = [n for n in files.files_under(newest)[0] if n != "MANIFEST.json"]
    assert sorted(n.split("/")[0] for n in names) == ["dcp", "lora", "lora_ema", "training_state.pt"]

    def plant(name):
        torch.save(_Bomb(marker), newest / name) if name.endswith(".pt") else \
            (newest / name).write_bytes(pickle.dumps(_Bomb(marker)))
    for name in names:
        original = (newest / name).read_bytes()
        plant(name)
        _rewrite_manifest(newest)
        assert name in checkpoints.verify(newest)
        (newest / name).write_bytes(original)
    _rewrite_manifest(newest)
    (newest / "dcp" / ".metadata").write_bytes(pickle.dumps(_Bomb(marker)))  # DCP's default format: a pickle
    assert checkpoints.verify(newest) == "dcp/.metadata is not in the manifest"
    assert checkpoints.read_sharded(newest / "dcp")  # the reader opens the safetensors files only
    _rewrite_manifest(newest)
    assert checkpoints.verify(newest).startswith("dcp/.metadata is not a safetensors shard")
    for name in names:
        plant(name)
    _rewrite_manifest(newest)
    res = train.main([*RUN, "--parallel", "fsdp", "--output_dir", str(out), "--resume", "true"])
    assert "skipped damaged checkpoint(s): iter_000004 (" in capsys.readouterr().out
    assert not marker.exists()
    assert _lora(out, 4) == _lora(sharded, 4) and res["history"][-1]["iteration"] == 4


def test_a_flipped_byte_in_any_file_is_found_and_unlisted_files_refused(sharded, straight, tmp_path):
    """Every file is hashed whatever its size (the old limit left FSDP2 shards and large states unchecked), a file the
    manifest does not list makes the checkpoint damaged, and a damaged shard falls back like any other file."""
    for kind, run in (("ddp", straight), ("fsdp", sharded)):
        ckpt = tmp_path / kind / "iter_000004"
        shutil.copytree(run / "checkpoints" / "iter_000004", ckpt)
        for name in (n for n in files.files_under(ckpt)[0] if n != "MANIFEST.json"):
            data = bytearray((ckpt / name).read_bytes())
            data[len(data) // 2] ^= 0x01
            (ckpt / name).write_bytes(bytes(data))
            assert checkpoints.verify(ckpt) == f"{name} is corrupt (checksum mismatch)"
            data[len(data) // 2] ^= 0x01
            (ckpt / name).write_bytes(bytes(data))
        assert checkpoints.verify(ckpt) is None
        (ckpt / "lora" / "notes.txt").write_text("added later")
        assert checkpoints.verify(ckpt) == "lora/notes.txt is not in the manifest"
        (ckpt / "lora" / "notes.txt").unlink()
        state = ckpt / "training_state.pt"
        state.rename(tmp_path / f"{kind}.pt")
        state.symlink_to(tmp_path / f"{kind}.pt")  # the same bytes, behind a link
        assert checkpoints.verify(ckpt) == "training_state.pt is a link or not a regular file"
        (ckpt / "MANIFEST.json").write_text('{"training_state.pt": {"size": 1}}')  # a manifest of the wrong shape
        assert checkpoints.verify(ckpt) == "MANIFEST.json is not a manifest (every file's size and sha256)"


def test_a_full_disk_under_fsdp2_stops_with_a_message(sharded, tmp_path, monkeypatch):
    """torch.distributed.checkpoint gathers a rank's write error into a CheckpointException (a BaseException, which
    the old handler missed): the message and the intact earlier checkpoints are the same as without FSDP2."""
    import safetensors.torch

    out = tmp_path / "run"
    shutil.copytree(sharded, out)

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save", full)  # what DCP's safetensors writer calls, on every rank
    with pytest.raises(SystemExit, match="no space left on the device writing checkpoint iter_000006"):
        train.main([*RUN, "--parallel", "fsdp", "--iterations", "6", "--output_dir", str(out), "--resume", "true"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_000002", "iter_000004", "latest"]
    assert checkpoints.verify(out / "checkpoints" / "iter_000004") is None


def test_the_manifest_hashes_in_a_stream(tmp_path):
    """Hashing reads in blocks: a 32 MiB file costs under 4 MiB of memory, so a many-GiB shard can be hashed."""
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.write(os.urandom(2 ** 20) * 32)
    tracemalloc.start()
    digest = files.sha256(big)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert digest == hashlib.sha256(big.read_bytes()).hexdigest() and peak < 4 * 2 ** 20


def test_checkpoints_are_numbers_not_names(straight, tmp_path, capsys):
    """A user's copies (iter_best, iter_000004_keep) are never resumed from, counted or deleted; order is by the
    parsed iteration (iteration 1,000,000 is newer than 999,999); the one resumed from is never pruned."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    ck = out / "checkpoints"
    shutil.copytree(ck / "iter_000002", ck / "iter_best")
    shutil.copytree(ck / "iter_000004", ck / "iter_000004_keep")
    res = train.main([*RUN, "--iterations", "6", "--keep_checkpoints", "1", "--output_dir", str(out),
                      "--resume", "true"])
    assert "resumed from iter_000004" in capsys.readouterr().out and res["history"][-1]["iteration"] == 6
    assert sorted(p.name for p in ck.iterdir()) == ["iter_000004", "iter_000004_keep", "iter_000006", "iter_best",
                                                     "latest"]  # 2 pruned; 4 kept: resumed from
    assert checkpoints.verify(ck / "iter_best") is None and checkpoints.verify(ck / "iter_000004_keep") is None
    folder = checkpoints.RunFolder(tmp_path / "numbers", True)
    for it in (999_999, 1_000_000, 7):
        (folder.path / "checkpoints" / checkpoints.checkpoint_name(it)).mkdir(parents=True)
        (folder.path / "checkpoints" / checkpoints.checkpoint_name(it) / "MANIFEST.json").write_text("{}")
    assert folder.complete_checkpoints() == ["iter_1000000", "iter_999999", "iter_000007"]
    assert checkpoints.iteration_of("iter_0000007") is None and checkpoints.iteration_of("iter_000007") == 7


def test_a_fallback_with_a_new_checkpoint_every_keeps_the_good_checkpoints(straight, tmp_path, capsys):
    """Resume past a damaged newest checkpoint (4) with --checkpoint_every 1 --keep_checkpoints 1: the checkpoint
    resumed from (2) is never pruned, the damaged one is replaced when its iteration is written again."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    ck = out / "checkpoints"
    (ck / "iter_000004" / "training_state.pt").write_bytes(b"damaged")
    train.main([*RUN, "--iterations", "5", "--checkpoint_every", "1", "--keep_checkpoints", "1",
                "--output_dir", str(out), "--resume", "true"])
    assert "using iter_000002" in capsys.readouterr().out
    assert sorted(p.name for p in ck.iterdir()) == ["iter_000002", "iter_000005", "latest"]
    assert checkpoints.verify(ck / "iter_000005") is None and (ck / "latest").read_text() == "iter_000005"


def test_every_file_is_durable_before_the_rename_and_the_rename_before_a_prune(straight, tmp_path, monkeypatch):
    """fsync of every file and folder of the new checkpoint, then the rename, then the checkpoints folder's fsync,
    and only then the removal of an old checkpoint (recorded by wrapping os.fsync, os.replace and shutil.rmtree)."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    events = []
    fsync, replace, rmtree = os.fsync, os.replace, shutil.rmtree

    def at(fd, name=None):  # the path a descriptor (with a name: a name relative to it) has now
        if fd is None:
            return str(name)
        return os.readlink(f"/proc/self/fd/{fd}") + ("" if name is None else f"/{name}")
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", at(fd))) or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b, src_dir_fd=None, dst_dir_fd=None: events.append(
        ("replace", at(src_dir_fd, a), at(dst_dir_fd, b))) or replace(a, b, src_dir_fd=src_dir_fd,
                                                                        dst_dir_fd=dst_dir_fd))
    monkeypatch.setattr(shutil, "rmtree", lambda p, *a, dir_fd=None, **k: events.append(("rmtree", at(dir_fd, p)))
                        or rmtree(p, *a, dir_fd=dir_fd, **k))
    train.main([*RUN, "--iterations", "6", "--output_dir", str(out), "--resume", "true"])
    monkeypatch.undo()
    ck = out / "checkpoints"
    rename = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(ck / "iter_000006"))
    tmp = events[rename][1]
    synced = {e[1] for e in events[:rename] if e[0] == "fsync"}
    written = {str(Path(tmp) / n) for n in files.files_under(ck / "iter_000006")[0] if n != "MANIFEST.json"}
    folders = {tmp, *(str(Path(p).parent) for p in written)}
    assert written <= synced and folders <= synced
    assert any(p.startswith(f"{tmp}/.tmp-MANIFEST.json-") for p in synced)  # the manifest, before its own rename
    after = events[rename + 1:]
    latest = next(i for i, e in enumerate(after) if e[0] == "replace" and e[2] == str(ck / "latest"))
    prune = next(i for i, e in enumerate(after) if e[0] == "rmtree")
    assert ("fsync", str(ck)) in after[:min(latest, prune)]  # the rename is on disk before the pointer and the prune
    assert sorted(p.name for p in ck.iterdir()) == ["iter_000004", "iter_000006", "latest"]
    assert (ck / "iter_000006").stat().st_mode & 0o777 == 0o777 & ~files.UMASK  # opened up once complete
