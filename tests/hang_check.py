"""For test writers: two processes that tests/test_failures.py starts with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set; argv: the process group's timeout in minutes (what --collective_timeout sets), how many seconds
rank 0 "loads", and a folder where the two meet before creating the group. First rank 0 loads for longer than that
timeout while rank 1 waits for it (a loading wait: its own long timeout). Then rank 1 hangs without failing (asleep
in Python, outside any collective); rank 0 waits for it at a barrier until the timeout raises, which must stop both
processes at once with one message from rank 0."""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flow_cps import distributed  # noqa: E402

# start the process group together (its timeout also bounds how long rank 0 waits for rank 1 to join)
ready = Path(sys.argv[3])
(ready / os.environ["RANK"]).touch()
while len(list(ready.iterdir())) < 2:
    time.sleep(0.01)
rank, world, _ = distributed.setup("cpu", timeout_minutes=float(sys.argv[1]))
try:
    assert distributed.from_rank_zero(lambda: time.sleep(float(sys.argv[2])) or "loaded") == "loaded"
    if rank == 1:
        time.sleep(600)
    distributed.barrier()
except BaseException as e:
    distributed.stop_every_rank(e)
    raise
