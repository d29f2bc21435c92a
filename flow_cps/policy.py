"""The Policy: the backbone and what trains (a LoRA, or every transformer weight), wrapped for DDP or sharded by FSDP2,
with fp32 master weights, AdamW, the EMA and its checkpoint state. train.py's update calls into it:

    policy = Policy(backbone, device, world, lora=lora.LoRA(8, 16.0, targets), lr=1e-3, precision=prec, ...)
    with policy.grad_sync(last_micro_batch): policy.backward(loss)
    grad_norm = policy.step(max_grad_norm)                          # clip, AdamW, EMA; stops on non-finite values
    with policy.ema_weights(): ...                                  # evaluate / export the EMA weights

The backbone's forwards run under the precision's autocast from construction on (`backbone.autocast`).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from contextlib import nullcontext

import torch
from torch import Tensor

from flow_cps import models
from flow_cps.distributed import all_reduce, local_shard
from flow_cps.ema import EMA, EMASchedule
from flow_cps.lora import LoRA, add_lora
from flow_cps.precision import LossScaler, Precision

PARALLEL = ("ddp", "fsdp")  # a replica per rank (DistributedDataParallel), or FSDP2 shards per transformer block


class Diverged(RuntimeError):
    """Non-finite loss, gradients or weights: the run stops before anything non-finite is checkpointed."""


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


class Policy:
    """The backbone + what trains (a LoRA, or every transformer weight), the module to call for gradients (the
    transformer, its DDP wrapper, or the transformer sharded in place by FSDP2), AdamW and the EMA.

    lora: the LoRA to train, or None for full fine-tuning. precision (default fp32): under bf16 / fp16 FSDP2
    all-gathers a LoRA model's weights in that dtype (full fine-tuning: fp32, see below) and reduces gradients in
    fp32; fp16 adds dynamic loss scaling (`backward` scales, `step` unscales and skips a step whose gradients
    overflowed). ema: the EMA's schedule, or None for no EMA. The backbone's forwards run under the precision's
    autocast from here on (`backbone.autocast`): no caller threads it through."""

    def __init__(self, backbone, device: torch.device, world: int, *, lora: LoRA | None,
                 parallel: str = "ddp", gradient_checkpointing: bool = False, precision: Precision | None = None,
                 lr: float = 1e-3, weight_decay: float = 1e-4, ema: EMASchedule | None = None, seed: int = 0):
        self.backbone, self.world, self.fsdp = backbone, world, parallel == "fsdp"
        self.precision = precision or Precision("fp32", device.type)
        backbone.autocast = self.precision.autocast
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
            # full fine-tuning: reduce-scatter every micro-batch (grad_sync), so gradients stay sharded
            tr.keep_grads_sharded = lora is None
        else:
            _fp32_masters(self.params)
            if world > 1:
                from torch.nn.parallel import DistributedDataParallel

                # forward_sync_buffers off (torch 2.13's name for broadcast_buffers): the buffers are constants
                # (SD3.5's 226.5 M-element position embedding), equal on every rank from loading; DDP's default
                # re-sent them before every training forward. They are still sent once, when DDP starts.
                self.module = DistributedDataParallel(tr, device_ids=[device.index] if device.type == "cuda" else
                                                      None, forward_sync_buffers=False)
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
    def grad_sync(self, enabled: bool):
        """The context of one micro-batch's backward: the gradients are reduced over the ranks only when `enabled` (an
        update's last micro-batch; `grad_sync`)."""
        return grad_sync(self.module, enabled)

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
        finite = torch.tensor([float(all(bool(torch.isfinite(local_shard(p)).all()) for p in self.params))])
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

