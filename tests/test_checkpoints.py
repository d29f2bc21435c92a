"""The run folder (checkpoints.py) and loud failures, tried as a hostile user would: a crash while writing the first
checkpoint, a damaged newest checkpoint, a second run into a running one's folder, a full disk, a planted pickle,
rerunning the Quickstart, a reward that always fails, a diverging run. Each ends in a folder that recovers and a
message that names the problem."""
import fcntl
import json
import shutil

import pytest
import torch

import rewards
import train
from flow_cps import checkpoints

RUN = ["--iterations", "4", "--eval_every", "2", "--checkpoint_every", "2", "--eval_per_prompt", "1",
       "--prompts_per_iter", "4", "--group_size", "4", "--micro_batch", "72", "--report_to", "none"]


def _lora(run, it):
    return (run / "checkpoints" / f"iter_{it:06d}" / "lora" / "pytorch_lora_weights.safetensors").read_bytes()


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
    monkeypatch.setattr(checkpoints, "write_manifest", lambda folder: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train.main([*RUN, "--output_dir", str(out)])
    monkeypatch.undo()
    assert list((out / "checkpoints").iterdir()) == [out / "checkpoints" / ".tmp-iter_000002"]
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
        checkpoints.write_manifest(newest)  # even with a matching manifest
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

    def full(obj, path, *a, **k):
        if "iter_000006" in str(path):
            raise OSError(28, "No space left on device")
        return save(obj, path, *a, **k)
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
