"""Ranks and collectives: the process group and each rank's device, the collectives the loop uses (all of them no-ops in
a world of one), and the failure watch that stops every rank when one fails.

    rank, world, device = distributed.setup("auto")  # torchrun sets RANK/WORLD_SIZE; else a world of 1
    distributed.all_reduce(x, "max"); distributed.all_gather_objects(obj); distributed.gather_to_rank_zero(obj)
    distributed.stop_every_rank(error)                                   # on any rank: every rank ends, one message
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

# -- process group and collectives ---------------------------------------------------------------------------------
# Waits that last as long as loading does (rank 0 resolving or downloading weights, pre-training the digits model,
# verifying checkpoints, while the others wait) run on their own group with this timeout; everything else has
# --collective_timeout, the backstop for a rank that hangs without failing.
LOADING_TIMEOUT = timedelta(hours=6)
DEVICES = ("auto", "cpu", "cuda")  # --device; under torchrun each process takes cuda:LOCAL_RANK
_groups: dict = {}  # "loading": the long-timeout group; "watch": the failure watch (store, stop event, thread)


def setup(device: str = "auto", need_group: bool = False, timeout_minutes: float = 30.0
          ) -> tuple[int, int, torch.device]:
    """(rank, world, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python train.py` is a world of one
    with no process group, unless `need_group` (FSDP2 needs one: then a gloo/nccl group of one on a free port).
    With more than one rank, a failure on any rank stops every rank (`stop_every_rank`)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
        # cuDNN's fused attention backward crashed (illegal memory access) on FLUX.1-dev's shapes in bf16 on an H200
        # with torch 2.11; the flash and memory-efficient kernels ran them fine, so SDPA uses those.
        torch.backends.cuda.enable_cudnn_sdp(False)
    if not dist.is_initialized() and (world > 1 or need_group):
        # NCCL for CUDA tensors, gloo for the small CPU tensors the loop also reduces (kept-sample counts, metrics)
        backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
        timeout = timedelta(minutes=timeout_minutes)
        if world > 1 or "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                    timeout=timeout)
        _groups["loading"] = dist.new_group(backend="gloo", timeout=LOADING_TIMEOUT)
        if world > 1:
            _watch_failures(rank)
    return rank, world, dev


def teardown(wait: bool = True) -> None:
    """Destroy the process group (after a barrier: every rank is done), if there is one."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        _stop_watch()
        dist.destroy_process_group()
    _groups.clear()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_reduce(x: Tensor, op: str = "sum") -> Tensor:
    """In place over all ranks ('sum', 'max' or 'min'); a no-op in a world of one."""
    if dist.is_initialized():
        dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return x


def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate equal-shaped tensors from all ranks in rank order (on the tensor's device: gloo/nccl-safe)."""
    if not dist.is_initialized():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def all_gather_objects(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out




def gather_to_rank_zero(obj) -> list | None:
    """Every rank's `obj` on rank 0, in rank order (None on the other ranks): what only rank 0 writes, without
    sending it to every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def rank_zero_first():
    """Rank 0 runs the block first (pre-training, downloads, caches); the others then find the result on disk. The
    others' wait has LOADING_TIMEOUT."""
    first = not dist.is_initialized() or dist.get_rank() == 0
    if not first:
        dist.barrier(group=_groups.get("loading"))
    yield
    if first and dist.is_initialized():
        dist.barrier(group=_groups.get("loading"))


def from_rank_zero(fn):
    """fn() on rank 0, its result on every rank (the others wait up to LOADING_TIMEOUT); a SystemExit on rank 0
    stops every rank with the same message."""
    out = [None, None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            out[1] = fn()
        except SystemExit as e:
            out[0] = str(e)
    if dist.is_initialized():
        dist.broadcast_object_list(out, src=0, group=_groups.get("loading"))
    if out[0]:
        raise SystemExit(out[0])
    return out[1]


# -- every rank stops when one fails ---------------------------------------------------------------------------------
# A rank that raises posts "rank R failed: ..." to the launcher's key-value store (the TCPStore that torchrun, or
# rank 0's init_process_group, serves at MASTER_ADDR:MASTER_PORT) and ends its process; every rank polls that key
# from a thread and ends its own process when another rank's failure appears, even while blocked in a collective.
# The first failure posted is the one reported, once, by the rank that had it.
FAILED_KEY = "flow_cps/failed"
POLL_S = 0.5


def _watch_failures(rank: int) -> None:
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=60), wait_for_workers=False)
    key = f"{FAILED_KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    stop = threading.Event()

    def watch() -> None:
        misses = 0
        while not stop.wait(POLL_S):
            try:
                if store.check([key]) and store.get(key).decode().split("\n")[0] != str(rank):
                    store.add(key + "/seen", 1)  # the failing rank waits for this before it ends
                    os._exit(1)  # another rank failed and said so; this one ends silently
                misses = 0
            except Exception:  # the store is gone: the launcher serving it stopped
                misses += 1
                if misses == 3 and not stop.is_set():
                    print(f"rank {rank}: lost the launcher's store at {os.environ['MASTER_ADDR']}:"
                          f"{os.environ['MASTER_PORT']} (another node stopped?); stopping", file=sys.stderr, flush=True)
                    os._exit(1)
    thread = threading.Thread(target=watch, daemon=True, name="flow_cps-failures")
    thread.start()
    _groups["watch"] = (store, key, stop, thread, rank)


def _stop_watch() -> None:
    if "watch" in _groups:
        _, _, stop, thread, _ = _groups.pop("watch")
        stop.set()
        thread.join()


def stop_every_rank(error: BaseException) -> None:
    """Call with the exception that is ending this rank. In a world of one, returns (the caller re-raises). With
    more ranks, the first rank to fail prints one line, "rank R failed: <cause>" (after its traceback, unless the
    cause is a SystemExit message, which is printed alone), and every rank's process ends with exit code 1 within
    about a second; a rank that fails after another ends silently."""
    if "watch" not in _groups:
        return
    store, key, _, _, rank = _groups["watch"]
    if isinstance(error, SystemExit):
        text = str(error.code) if error.code not in (None, 0, 1) else type(error).__name__
    else:
        text = f"rank {rank} failed: {type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:500]}"
        if "timed out" in text.lower() or "timeout" in text.lower():
            text += " (a collective waited longer than --collective_timeout: another rank is stuck or slower)"
    posted = f"{rank}\n{text}"
    try:
        first = store.compare_set(key, "", posted).decode() == posted
    except Exception:  # no store: report anyway
        first = True
    if first:
        if not isinstance(error, SystemExit):
            traceback.print_exception(error)
        print(text, file=sys.stderr, flush=True)
        # the store may live in this process (rank 0 without torchrun): stay until the others have read it
        deadline = time.monotonic() + 10 * POLL_S
        with contextlib.suppress(Exception):
            while store.add(key + "/seen", 0) < dist.get_world_size() - 1 and time.monotonic() < deadline:
                time.sleep(POLL_S / 5)
    sys.stdout.flush()
    os._exit(1)



def local_shard(t: Tensor) -> Tensor:
    """This rank's shard of an FSDP2 DTensor (element-wise maths needs no communication); plain tensors as is."""
    return t.to_local() if hasattr(t, "to_local") else t
