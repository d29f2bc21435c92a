"""The distributed engine: process group and device, the collectives the loop uses, and the `Policy` (what trains,
wrapped for DDP or sharded by FSDP2, with fp32 master weights, AdamW and the EMA). Plumbing only: train.py holds
the algorithm and calls into this file.

    rank, world, device = engine.setup("auto", need_group=False)   # torchrun sets RANK/WORLD_SIZE; else a world of 1
    prec = engine.precision("auto", device)                         # frozen-weight dtype, autocast, loss scaling
    policy = engine.Policy(backbone, device, world, lora=lora.LoRA(8, 16.0, targets), lr=1e-3, precision=prec, ...)
    with engine.grad_sync(policy.module, last_micro_batch): policy.backward(loss)
    grad_norm = policy.step(max_grad_norm)                          # clip, AdamW, EMA; stops on non-finite values
    with policy.ema_weights(): ...                                  # evaluate / export the EMA weights
"""
from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import threading
import time
import traceback
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from flow_cps import models
from flow_cps.lora import LoRA, add_lora

# The engine's choices, declared once: config.py gives them to argparse and validation, the code below reads them.
PARALLEL = ("ddp", "fsdp")  # a replica per rank (DistributedDataParallel), or FSDP2 shards per transformer block
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # see Precision; and "auto"


class Diverged(RuntimeError):
    """Non-finite loss, gradients or weights: the run stops before anything non-finite is checkpointed."""


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


def grad_sync(model, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an update (DDP no_sync / FSDP2
    set_requires_gradient_sync), except under FSDP2 full fine-tuning (`Policy` marks the module keep_grads_sharded):
    there a skipped reduce-scatter leaves each rank an unsharded fp32 gradient of the whole model (FLUX.1-dev:
    44 GiB), so every micro-batch is reduce-scattered into the shard, where FSDP2 accumulates it (the same sum)."""
    if hasattr(model, "no_sync"):
        return nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled or bool(getattr(model, "keep_grads_sharded", False)))
    return nullcontext()


def _local(t: Tensor) -> Tensor:
    """This rank's shard of an FSDP2 DTensor (element-wise maths needs no communication); plain tensors as is."""
    return t.to_local() if hasattr(t, "to_local") else t


# -- precision ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """What --precision means on a device. `dtype` is the frozen weights' (transformer, text encoders) and the
    autocast dtype; trained weights are fp32 masters, the sampler maths fp32 and the VAE fp32 whatever it is.

    bf16: bf16 frozen weights under bf16 autocast (Flow-GRPO's FLUX configs, DanceGRPO).
    fp16: fp16 frozen weights under fp16 autocast, with dynamic loss scaling (`LossScaler`), as accelerate runs
          Flow-GRPO's SD3 configs (mixed_precision "fp16"; there the frozen weights stay fp32 and autocast casts them
          to fp16 op by op: the matmuls see the same fp16 operands, only the memory differs).
    fp32: everything fp32 (the CPU default)."""
    name: str
    device_type: str

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.name]

    def autocast(self):
        """The context the transformer's forwards run in (rollouts, training, evaluation)."""
        if self.name == "fp32":
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def loss_scaling(self) -> bool:
        return self.name == "fp16"


def precision(name: str, device: torch.device) -> Precision:
    """--precision on `device`: 'auto' is bf16 on CUDA and fp32 on the CPU; 'bf16', 'fp16', 'fp32' as named (the
    CPU runs them too, slowly: that is how the tests exercise them)."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    if name not in PRECISIONS:  # for callers in code; a run's flag is checked by config.validate
        raise ValueError(f"precision must be 'auto' or one of {', '.join(PRECISIONS)} (got {name!r})")
    return Precision(name, device.type)


@dataclass
class LossScaler:
    """Dynamic loss scaling for fp16 (torch.amp.GradScaler's rule and defaults, which accelerate uses): the loss is
    multiplied by `scale` before backward so that small gradients survive fp16; the optimizer step divides them back.
    A step whose gradients overflowed is skipped and the scale halved; after `interval` good steps it doubles."""
    scale: float = 2.0 ** 16
    good_steps: int = 0
    interval: int = 2000

    def unscale(self, params: list[Tensor]) -> bool:
        """Divide the gradients by the scale in place; True when they are finite on every rank."""
        grads = [_local(p.grad) for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)
        finite = torch.tensor([float(all(bool(torch.isfinite(g).all()) for g in grads))])
        return all_reduce(finite, "min").item() == 1

    def update(self, finite: bool) -> None:
        if not finite:
            self.scale, self.good_steps = self.scale / 2, 0
            return
        self.good_steps += 1
        if self.good_steps == self.interval:
            self.scale, self.good_steps = self.scale * 2, 0


# -- the EMA ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EMASchedule:
    """When and how strongly the EMA follows the trained weights (§4 step 6): plain data, a property of the preset
    (what the paper's run did), the same at any world size.

    After optimizer step s the EMA is updated `updates_per_step` times in all, each time only if (s + 1) % interval
    == 0: e <- e + (1 - d_s)(w - e), d_s = decay, or with warm-up min((1 + s)/(10 + s), decay).

    Flow-GRPO (`EMAModuleWrapper(decay=0.9, update_step_interval=8)`, stepped after every training batch with
    s = the optimizer steps so far) is interval 8 with warm-up, and an optimizer step there closes a window of
    gradient-accumulation batches: the window's last batch sees the new step count n and new weights, its first
    updates_per_step - 1 batches still the previous n and weights. The paper's 32-GPU configs accumulate 2 batches
    per optimizer step for SD3.5 and 6 for FLUX.1; on 8 GPUs the same configs would give 8 and 24, so the count is
    taken from the paper's runs, not from this run's world size. The default (interval 1, one update, no warm-up)
    is the plain EMA, e <- e + (1 - decay)(w - e) after every optimizer step. plan.ema_words says it in words."""
    decay: float
    interval: int = 1
    updates_per_step: int = 1
    warmup: bool = False

    def decay_at(self, s: int) -> float:
        return min((1 + s) / (10 + s), self.decay) if self.warmup else self.decay


class EMA:
    """An exponential moving average of the trained weights, owning its copy of them (`weights`: one tensor per
    trained parameter, sharded like it under FSDP2); evaluation and the `*_ema` exports use it (`swapped_in`)."""

    def __init__(self, params: list[Tensor], schedule: EMASchedule):
        self.schedule = schedule
        self.weights = [p.detach().clone() for p in params]

    def _update(self, params: list[Tensor], s: int, times: int) -> None:
        if times < 1 or (s + 1) % self.schedule.interval:
            return
        with torch.no_grad():
            local_e, local_p = [_local(e) for e in self.weights], [_local(p.detach()) for p in params]
            for _ in range(times):
                torch._foreach_lerp_(local_e, local_p, 1 - self.schedule.decay_at(s))

    def before_step(self, params: list[Tensor], s: int) -> None:
        """The updates that precede optimizer step s + 1 (the first updates_per_step - 1 batches of its window)."""
        self._update(params, s, self.schedule.updates_per_step - 1)

    def after_step(self, params: list[Tensor], s: int) -> None:
        """The update right after optimizer step s (s counts from 1)."""
        self._update(params, s, 1)

    @contextlib.contextmanager
    def swapped_in(self, params: list[Tensor]):
        """Within the block `params` hold the EMA weights (and the EMA the live ones); swapped back after."""
        self._swap(params)
        try:
            yield
        finally:
            self._swap(params)

    def _swap(self, params: list[Tensor]) -> None:
        with torch.no_grad():
            for p, e in zip(params, self.weights):
                p, e = _local(p), _local(e)
                tmp = p.detach().clone()
                p.copy_(e)
                e.copy_(tmp)


# -- the policy --------------------------------------------------------------------------------------------------
class Policy:
    """The backbone + what trains (a LoRA, or every transformer weight), the module to call for gradients (the
    transformer, its DDP wrapper, or the transformer sharded in place by FSDP2), AdamW and the EMA.

    lora: the LoRA to train, or None for full fine-tuning. precision (default fp32): under bf16 / fp16 FSDP2
    all-gathers a LoRA model's weights in that dtype (full fine-tuning: fp32, see below) and reduces gradients in
    fp32; fp16 adds dynamic loss scaling (`backward` scales, `step` unscales and skips a step whose gradients
    overflowed). ema: the EMA's schedule, or None for no EMA."""

    def __init__(self, backbone, device: torch.device, world: int, *, lora: LoRA | None,
                 parallel: str = "ddp", gradient_checkpointing: bool = False, precision: Precision | None = None,
                 lr: float = 1e-3, weight_decay: float = 1e-4, ema: EMASchedule | None = None, seed: int = 0):
        self.backbone, self.fsdp = backbone, parallel == "fsdp"
        self.precision = precision or Precision("fp32", device.type)
        self.scaler = LossScaler() if self.precision.loss_scaling else None
        tr = backbone.transformer
        torch.manual_seed(seed)  # identical LoRA init on every rank (DDP also broadcasts it)
        if lora is not None:
            self.params = add_lora(tr, lora)
        else:  # full fine-tuning (DanceGRPO): every transformer weight trains
            tr.requires_grad_(True)
            self.params = list(tr.parameters())
        if gradient_checkpointing:
            tr.enable_gradient_checkpointing()  # diffusers recomputes each block (non-reentrant checkpoint)
        tr.to(device)
        self.names = [n for n, p in tr.named_parameters() if p.requires_grad]
        self.module = tr
        if self.fsdp:  # fp32 masters are made block by block inside, so 12B weights are never all fp32 at once
            # All-gather dtype. LoRA: the precision's (the frozen half-precision weights and the fp32 LoRA must share
            # one dtype in a shard group; Flow-GRPO's DeepSpeed bf16 also runs the LoRA in bf16). Full fine-tuning:
            # fp32, as DanceGRPO's FSDP1 (master_weight_type fp32): autocast casts per matmul, and operations
            # outside autocast (FLUX's q/k RMSNorm weights) see the fp32 weights. Costs 2x the all-gather traffic.
            half = self.precision.name != "fp32" and lora is not None
            self._shard(tr, device, world, self.precision.dtype if half else None)
            self.params = [p for p in tr.parameters() if p.requires_grad]  # now DTensors holding this rank's shard
            # full fine-tuning: reduce-scatter every micro-batch (engine.grad_sync), so gradients stay sharded
            tr.keep_grads_sharded = lora is None
        else:
            _fp32_masters(self.params)
            if world > 1:
                from torch.nn.parallel import DistributedDataParallel

                # broadcast_buffers off: the buffers are constants (SD3.5's 226.5 M-element position embedding),
                # equal on every rank from loading; DDP's default re-sent them before every training forward.
                self.module = DistributedDataParallel(tr, device_ids=[device.index] if device.type == "cuda" else
                                                      None, broadcast_buffers=False)
        # full fine-tuning: the per-tensor AdamW, whose temporaries are one tensor's (the multi-tensor one allocates
        # a 4 B/param square root of v for all of them at once: 44 GiB for FLUX.1-dev unsharded)
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, eps=1e-8,
                                     foreach=False if lora is None else None)
        self.ema = EMA(self.params, ema) if ema is not None else None
        self.steps = 0  # optimizer steps so far (the EMA's s; checkpointed)

    def _shard(self, tr, device: torch.device, world: int, mixed: torch.dtype | None) -> None:
        """FSDP2: fully_shard each transformer block (FLUX: transformer_blocks + single_transformer_blocks; SD3:
        transformer_blocks), then the root for the remaining embedders and output layers."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # diffusers' blocks return views of a split tensor and FSDP2 warns that an in-place op on them would skip
        # its hooks; none follows (tests/test_scale.py checks FSDP2 against DDP and a single process).
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
        mesh = init_device_mesh(device.type, (world,))
        # cast_forward_inputs=False: autocast decides the compute dtype, as under DDP. FSDP2's own input cast
        # is not re-applied when activation checkpointing recomputes a block (FLUX's fp32 rotary embeddings came
        # back fp32, and torch.utils.checkpoint refused the mismatch; seen on an H200 with torch 2.11).
        mp = MixedPrecisionPolicy(param_dtype=mixed, reduce_dtype=torch.float32 if mixed else None,
                                  cast_forward_inputs=False)
        for block in models.transformer_blocks(tr):
            _fp32_masters([p for p in block.parameters() if p.requires_grad])
            fully_shard(block, mesh=mesh, mp_policy=mp)
        _fp32_masters([p for p in tr.parameters() if p.requires_grad])
        fully_shard(tr, mesh=mesh, mp_policy=mp)

    # -- one optimizer step ----------------------------------------------------------------------------------------
    def backward(self, loss: Tensor) -> None:
        """loss.backward(), the loss multiplied by the fp16 loss scale first (accumulates into the gradients)."""
        (loss * self.scaler.scale if self.scaler is not None else loss).backward()

    def step(self, max_grad_norm: float) -> float:
        """Clip the accumulated gradients, AdamW, EMA; returns the gradient norm before clipping. Raises Diverged
        (before the weights change) if the gradients are not finite, and after the step if the weights are not.
        fp16: gradients that overflowed skip the step instead (returns inf) and halve the loss scale; the step still
        counts for the EMA schedule, as in Flow-GRPO (accelerate counts an optimizer step the scaler skipped)."""
        skip = False
        if self.scaler is not None:
            finite = self.scaler.unscale(self.params)
            self.scaler.update(finite)
            if not finite and self.scaler.scale < 1:
                raise Diverged("the gradients are not finite even at a loss scale below 1")
            skip = not finite
        norm = math.inf if skip else torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not skip and not math.isfinite(norm):
            raise Diverged(f"the gradient norm is {norm}")
        if self.ema is not None:
            self.ema.before_step(self.params, self.steps)
        try:
            if not skip:
                self.opt.step()
        except RuntimeError as e:  # AdamW's step size itself overflowed (an absurd learning rate)
            if "overflow" not in str(e):
                raise
            raise Diverged(f"the optimizer step overflowed ({e})") from None
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        finite = torch.tensor([float(all(bool(torch.isfinite(_local(p)).all()) for p in self.params))])
        if all_reduce(finite, "min").item() < 1:
            raise Diverged("the weights are not finite after the optimizer step")
        if self.ema is not None:
            self.ema.after_step(self.params, self.steps)
        return norm

    @contextlib.contextmanager
    def ema_weights(self):
        """Within the block the live weights are the EMA's (evaluation, exports); restored after. No EMA: as is."""
        if self.ema is None:
            yield
            return
        self._reshard()  # forwards within the block gather the EMA's shards
        try:
            with self.ema.swapped_in(self.params):
                yield
        finally:
            self._reshard()  # and forwards after it the live ones

    def _reshard(self) -> None:
        """FSDP2 keeps the root module's gathered weights after a forward without backward (its root does not
        reshard after forward), so a forward after a swap would still see the weights from before it: drop every
        gathered copy, and the next forward gathers the swapped shards."""
        for m in self.module.modules() if self.fsdp else ():
            if hasattr(m, "reshard"):
                m.reshard()

    # -- state for checkpoints ---------------------------------------------------------------------------------
    def state(self) -> dict:
        """Trained weights, EMA, AdamW and the step counter, as plain tensors (not under FSDP2: see sharded_state)."""
        return dict(params={n: p.detach().cpu() for n, p in zip(self.names, self.params)},
                    ema=None if self.ema is None else {n: e.cpu() for n, e in zip(self.names, self.ema.weights)},
                    optimizer=self.opt.state_dict(), steps=self.steps, loss_scale=self._scale_state().tolist())

    def _scale_state(self) -> Tensor:
        s = self.scaler
        return torch.tensor([s.scale, float(s.good_steps)] if s is not None else [], dtype=torch.float64)

    def _load_scale(self, values) -> None:
        if self.scaler is not None and len(values) == 2:
            self.scaler.scale, self.scaler.good_steps = float(values[0]), int(values[1])

    def load_state(self, st: dict) -> None:
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(st["params"][n])
            if self.ema is not None:
                for n, e in zip(self.names, self.ema.weights):
                    e.copy_(st["ema"][n])
        self.opt.load_state_dict(st["optimizer"])
        self.steps = int(st.get("steps", 0))
        self._load_scale(st.get("loss_scale", []))

    # FSDP2: torch.distributed.checkpoint writes each rank's shards of the trained weights, AdamW state and EMA as one
    # safetensors file per rank (HuggingFaceStorageWriter; the shard offsets are JSON in each file's header), and
    # reads them back with HuggingFaceStorageReader: no pickle is written to disk or loaded from it (DCP's default
    # format keeps its metadata as a pickle and unpickles non-tensor items; its planning still passes pickles between
    # ranks in memory, over the trusted network), and no rank ever holds the whole model. Only tensors are saved;
    # AdamW's hyperparameters come from the config. Frozen base weights are not saved (pretrained).
    def _sharded_state(self) -> tuple[dict, list]:
        """(the tensors to save or load into, AdamW's param_groups)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, [self.opt],
                                            options=StateDictOptions(ignore_frozen_params=True))
        state = {"model": model_sd, "optim": optim_sd["state"]}
        if self.scaler is not None:  # fp16's loss scale and its good-step count, replicated
            state["loss_scale"] = self._scale_state()
        if self.ema is not None:
            state["ema"] = dict(zip(self.names, self.ema.weights))
        return state, optim_sd["param_groups"]

    def save_sharded(self, path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._sharded_state()[0],  # collective; every rank writes its own file
                 storage_writer=dcp.HuggingFaceStorageWriter(str(path), save_distributed=True))

    def load_sharded(self, path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state, groups = self._sharded_state()
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(path)))  # in place, into this rank's shards
        set_state_dict(self.module, [self.opt], model_state_dict=state["model"],
                       optim_state_dict={"state": state["optim"], "param_groups": groups},
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
        if "loss_scale" in state:
            self._load_scale(state["loss_scale"].tolist())


def _fp32_masters(params) -> None:
    """Trained weights are fp32 (base weights may be bf16 on CUDA): AdamW's small updates vanish in bf16."""
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()


# -- padding: every rank runs as many forwards (DDP / FSDP2 collectives) ---------------------------------------------
def padding_row(traj, adv, keep) -> Tensor:
    """The sample a rank pads its forwards with when another rank has more: its loss is multiplied by 0, and 0 x NaN
    is NaN in backward (all-reduced to every rank), so it must be finite: a kept sample if there is one, else any
    sample whose trajectory, log-probs and advantage are finite."""
    finite = (torch.isfinite(traj.latents.flatten(1)).all(1) & torch.isfinite(traj.log_probs).all(1)).to(adv.device)
    finite &= torch.isfinite(adv)
    rows = torch.cat([torch.nonzero(keep & finite)[:, 0], torch.nonzero(finite)[:, 0]])[:1]
    if len(rows) == 0:
        raise Diverged("every sample of this rank is non-finite (trajectory or advantage)")
    return rows


def eval_slots(n_prompts: int, per_prompt: int, rank: int, world: int, pad: bool) -> tuple[list, int]:
    """This rank's (noise k, prompt p) pairs, noise-major so that rank 0 sees every prompt, and how many are real:
    under FSDP2 (`pad`) forwards are collectives, so every rank runs as many (repeating the last pair)."""
    order = [(k, p) for k in range(per_prompt) for p in range(n_prompts)]
    per = math.ceil(len(order) / world)
    mine = order[rank * per:(rank + 1) * per]
    return mine + [order[-1]] * (per - len(mine) if pad else 0), len(mine)
