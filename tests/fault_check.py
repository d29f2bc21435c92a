"""For test writers: run by tests/test_failures.py under `torchrun --nproc_per_node=2 --log-dir D --redirects 3`
with train.py flags. On rank 1 only: the reward `fails_on_rank1` cannot score the samples of the first prompt it
sees (as the training reward and as a held-out metric; rank 0 must report both, naming rank 1), and at the second
update rank 1 raises ValueError("injected fault") while rank 0 waits for it in a collective, with a non-daemon
thread keeping rank 1's process alive as a stuck writer would. Every rank must stop at once, with one message naming
rank 1 and the cause."""
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards  # noqa: E402
import train  # noqa: E402

RANK = int(os.environ["RANK"])


@rewards.register("fails_on_rank1")
def fails_on_rank1(device="cpu"):
    bad = []

    def fn(images, prompts, metadata=None):
        bad[:] = bad or prompts[:1]
        if RANK == 1 and bad[0] in prompts:
            raise RuntimeError("cannot score this prompt")
        return images.mean((1, 2, 3))
    return fn


update, calls = train.update, []


def update_with_a_fault(*args, **kwargs):
    calls.append(1)
    if RANK == 1 and len(calls) == 2:
        threading.Thread(target=time.sleep, args=(3600,)).start()
        raise ValueError("injected fault")
    return update(*args, **kwargs)


train.update = update_with_a_fault
train.main(sys.argv[1:])
