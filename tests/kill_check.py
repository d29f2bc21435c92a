"""For test writers: `python tests/kill_check.py N <train.py flags>` runs train.main and SIGKILLs the process right
after the checkpoint of iteration N is complete (what a crash, a preemption or the OOM killer does), so a test can
resume it with `python train.py ... --resume true` and compare with a straight run. The hook lives here, not among
the user's flags."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from flow_cps import session  # noqa: E402

at = int(sys.argv[1])
checkpoint = session.Session.checkpoint


def checkpoint_then_die(self, it: int) -> None:
    checkpoint(self, it)
    if it == at:
        os.kill(os.getpid(), signal.SIGKILL)


session.Session.checkpoint = checkpoint_then_die
train.main(sys.argv[2:])
