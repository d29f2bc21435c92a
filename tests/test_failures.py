"""No rank left waiting: an exception on one rank (not only SystemExit) stops every rank at once with one message that
names the rank and the cause; a rank that hangs without failing is caught by the process group's timeout
(--collective_timeout), which stops every rank the same way; reward failures on rank 1 are reported by rank 0.

Each case is a real multi-process run whose failing rank keeps its process alive (a stuck thread, or asleep): without
the failure channel (distributed.stop_every_rank) the other rank would wait in its collective for the full timeout, 30
minutes by default, and the test would hang until its subprocess timeout."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import train
from flow_cps import distributed, logs

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--iterations", "3", "--eval_every", "100", "--checkpoint_every", "100", "--eval_per_prompt", "1",
         "--prompts_per_iter", "4", "--group_size", "4", "--micro_batch", "8", "--report_to", "none"]


def _logs(folder: Path) -> dict[tuple[int, str], str]:
    """torchrun --redirects 3: {(local rank, 'stdout' | 'stderr'): text}."""
    return {(int(p.parent.name), p.stem): p.read_text() for p in folder.rglob("std*.log")}


def test_an_exception_on_one_rank_stops_every_rank_with_one_message(tmp_path):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "--log-dir", str(tmp_path / "logs"), "--redirects", "3", "tests/fault_check.py", *FLAGS,
                        "--reward", "digit_judge,fails_on_rank1:0.1", "--eval_metrics", "digit_judge,fails_on_rank1",
                        "--output_dir", str(tmp_path / "run")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    logs = _logs(tmp_path / "logs")
    assert p.returncode != 0, p.stderr[-2000:]
    everything = "".join(logs.values())
    assert everything.count("rank 1 failed: ValueError: injected fault") == 1  # one message: the rank and the cause
    assert logs[1, "stderr"].count("Traceback") == 1  # the failing rank's own, for debugging
    assert "Traceback" not in logs[0, "stderr"] and "failed" not in logs[0, "stderr"].replace(
        "samples failed on rank 1", "")  # rank 0 stopped silently: no second, misleading error
    # rank 1's scoring failures (warnings are silenced on ranks > 0) are reported by rank 0, naming the rank: the
    # held-out metric's at the base evaluation (1 image), the training reward's at iteration 1 (a group of 4)
    for n in (1, 4):
        assert f"reward fails_on_rank1: RuntimeError: cannot score this prompt: {n} samples failed on rank 1" in \
            logs[0, "stderr"]
    assert "it    1 |" in logs[0, "stdout"] and "it    2 |" not in logs[0, "stdout"]


def test_a_rank_that_hangs_is_stopped_by_the_collective_timeout_but_loading_may_take_longer(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1"}
    (tmp_path / "ready").mkdir()
    procs = [subprocess.Popen([sys.executable, "tests/hang_check.py", "0.03", "3", str(tmp_path / "ready")], cwd=ROOT,
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]  # a 1.8 s timeout; a 3 s load passes (its wait has its own), then the hang is caught
    (_, err0), (_, err1) = (q.communicate(timeout=300) for q in procs)  # rank 1 would sleep 600 s
    assert [q.returncode for q in procs] == [1, 1]
    last = err0.strip().splitlines()[-1]
    assert last.startswith("rank 0 failed: RuntimeError:") and "Timed out" in last and \
        "longer than --collective_timeout" in last
    assert err1 == ""  # stopped by rank 0's failure, silently


def test_a_failure_while_releasing_still_stops_every_rank(tmp_path, monkeypatch):
    """The logs' close raises while a failing run releases them (as wandb.finish can): the other ranks are still
    told to stop (distributed.stop_every_rank is reached), and the run's own error is the one reported."""
    def close_fails(self):
        raise RuntimeError("the W&B service is gone")
    stopped = []
    stop = distributed.stop_every_rank
    monkeypatch.setattr(logs.Logger, "close", close_fails)
    monkeypatch.setattr(distributed, "stop_every_rank", lambda e: stopped.append(e) or stop(e))
    with pytest.raises(SystemExit, match="training diverged"):
        train.main([*FLAGS, "--iterations", "1", "--lr", "1e38", "--output_dir", str(tmp_path / "run")])
    assert len(stopped) == 1 and "training diverged" in str(stopped[0])
