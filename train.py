"""GRPO fine-tuning of flow-matching models with Coefficients-Preserving Sampling (Wang & Yu, arXiv 2509.05952).

    torchrun --standalone --nproc_per_node=2 train.py          # the built-in tiny FLUX on digits, CPU, ~3 min
    python train.py --sampler flow_sde --eta 0.7               # the paper's baseline sampler, one flag
    python train.py --help                                     # every option, with its meaning
    python train.py --preset flux-dev-pickscore --dry_run true # batch arithmetic + per-GPU memory, loads nothing
    torchrun --nproc_per_node=8 train.py --preset sd3.5-geneval                # the paper's settings (config.PRESETS)

One loop for every model (PAPER.md §4): rollout with the chosen sampler -> decode -> rewards -> group advantages ->
per-(sample, trained step) recomputed log-probs -> clipped surrogate (+ KL to the adapter-off reference) ->
gradient accumulation -> clipped AdamW step on the LoRA. Deliberate choices, where the peers differ:
  1. Seeds derive from (seed, iteration, prompt, group member), never from a global RNG stream: a run is
     reproducible, independent of the world size's slicing, and a resumed run continues exactly.
  2. Invalid samples (a reward returned NaN) are excluded from advantages and loss and counted, never scored 0.
  3. The loss is a mean over all kept (sample, step) terms of the whole world (not per micro-batch), so it does not
     depend on how samples fall into micro-batches or ranks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import grpo
import logs
import sampling
from config import RESUMABLE_CHANGES, Config, describe, dry_run, load_prompts, parse_config, prompt_error, validate


# -- distributed ---------------------------------------------------------------------------------------------------
def setup_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE; plain `python train.py` runs as a world of one with no process group."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        # cuDNN's fused attention backward crashed (illegal memory access) on FLUX.1-dev's shapes in bf16 on an H200
        # with torch 2.11; the flash and memory-efficient kernels ran them fine, so SDPA uses those.
        torch.backends.cuda.enable_cudnn_sdp(False)
    if not dist.is_initialized() and (world > 1 or cfg.parallel == "fsdp"):
        # NCCL for CUDA tensors, gloo for the small CPU tensors the loop also reduces (kept-sample counts, metrics)
        backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
        if world > 1 or "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend)
        else:  # `python train.py --parallel fsdp` without torchrun: FSDP2 needs a process group, here one of one
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return rank, world, device


def all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from all ranks in rank order (gloo/nccl-safe: on the tensor's device)."""
    if not dist.is_initialized():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


@contextlib.contextmanager
def rank_zero_first():
    """Rank 0 runs the block first (pre-training, downloads, caches); the others then find the result on disk."""
    first = not dist.is_initialized() or dist.get_rank() == 0
    if not first:
        dist.barrier()
    yield
    if first and dist.is_initialized():
        dist.barrier()


def grad_sync(model, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an update (DDP no_sync / FSDP2)."""
    if hasattr(model, "no_sync"):
        return nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


# -- seeds ---------------------------------------------------------------------------------------------------------
def seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def generators(parts: list[tuple[int, ...]]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed_of(*p)) for p in parts]


# -- the policy --------------------------------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor (element-wise EMA maths needs no communication); plain tensors as is."""
    return t.to_local() if hasattr(t, "to_local") else t


class Policy:
    """The backbone + what trains (a LoRA, or every transformer weight), the module to call for gradients (the
    transformer itself, its DDP wrapper, or the transformer sharded in place by FSDP2), the optimizer and the EMA."""

    def __init__(self, cfg: Config, backbone, device: torch.device, world: int):
        import models

        self.backbone, self.cfg = backbone, cfg
        self.fsdp = cfg.parallel == "fsdp"
        tr = backbone.transformer
        torch.manual_seed(cfg.seed)  # identical LoRA init on every rank (DDP also broadcasts it)
        if cfg.lora_rank > 0:
            self.params = models.add_lora(tr, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","))
        else:  # full fine-tuning (DanceGRPO): every transformer weight trains
            tr.requires_grad_(True)
            self.params = list(tr.parameters())
        if cfg.gradient_checkpointing:
            tr.enable_gradient_checkpointing()  # diffusers recomputes each block (non-reentrant checkpoint)
        tr.to(device)
        self.names = [n for n, p in tr.named_parameters() if p.requires_grad]
        self.module = tr
        if self.fsdp:  # fp32 masters are made block by block inside, so 12B weights are never all fp32 at once
            self._shard(tr, device, world)
            self.params = [p for p in tr.parameters() if p.requires_grad]  # now DTensors holding this rank's shard
        else:
            self._fp32_masters(self.params)
            if world > 1:
                from torch.nn.parallel import DistributedDataParallel

                self.module = DistributedDataParallel(tr, device_ids=[device.index] if device.type == "cuda" else
                                                      None)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                                     eps=1e-8)
        self.ema = [p.detach().clone() for p in self.params] if cfg.ema_decay > 0 else None

    @staticmethod
    def _fp32_masters(params) -> None:
        """Trained weights are fp32 (base weights may be bf16 on CUDA): AdamW's small updates vanish in bf16."""
        for p in params:
            if p.dtype != torch.float32:
                p.data = p.data.float()

    def _shard(self, tr, device: torch.device, world: int) -> None:
        """FSDP2: fully_shard each transformer block (FLUX: transformer_blocks + single_transformer_blocks; SD3:
        transformer_blocks), then the root for the remaining embedders and output layers. On CUDA the all-gathers
        run in bf16 and gradients are reduced in fp32; on CPU (tests) everything stays fp32."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        import models

        # diffusers' blocks return views of a split tensor and FSDP2 warns that an in-place op on them would skip
        # its hooks; none follows (tests/test_scale.py checks FSDP2 against DDP and a single process).
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
        mesh = init_device_mesh(device.type, (world,))
        bf16 = device.type == "cuda" and self.cfg.precision == "auto"
        # cast_forward_inputs=False: bf16 autocast decides the compute dtype, as under DDP. FSDP2's own input cast
        # is not re-applied when activation checkpointing recomputes a block (FLUX's fp32 rotary embeddings came
        # back fp32, and torch.utils.checkpoint refused the mismatch; seen on an H200 with torch 2.11).
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32 if bf16 else None, cast_forward_inputs=False)
        for block in models.transformer_blocks(tr):
            self._fp32_masters([p for p in block.parameters() if p.requires_grad])
            fully_shard(block, mesh=mesh, mp_policy=mp)
        self._fp32_masters([p for p in tr.parameters() if p.requires_grad])
        fully_shard(tr, mesh=mesh, mp_policy=mp)

    def backbone_guidance(self, scale: float):
        """Evaluation's guidance (eval_guidance; -1 keeps the training guidance)."""
        return self.backbone.guidance_scale(scale) if hasattr(self.backbone, "guidance_scale") else nullcontext()

    def update_ema(self) -> None:
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_([_local(e) for e in self.ema], [_local(p.detach()) for p in self.params],
                                     1 - self.cfg.ema_decay)

    def swap_ema(self) -> None:
        """Exchange live and EMA weights in place (call twice to restore)."""
        if self.ema is not None:
            with torch.no_grad():
                for p, e in zip(self.params, self.ema):
                    p, e = _local(p), _local(e)
                    tmp = p.detach().clone()
                    p.copy_(e)
                    e.copy_(tmp)

    def state(self) -> dict:
        return dict(params={n: p.detach().cpu() for n, p in zip(self.names, self.params)},
                    ema=None if self.ema is None else {n: e.cpu() for n, e in zip(self.names, self.ema)},
                    optimizer=self.opt.state_dict())

    def load_state(self, st: dict) -> None:
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(st["params"][n])
            if self.ema is not None:
                for n, e in zip(self.names, self.ema):
                    e.copy_(st["ema"][n])
        self.opt.load_state_dict(st["optimizer"])

    # FSDP2: torch.distributed.checkpoint writes each rank's shards of the trained weights, AdamW state and EMA; no
    # rank ever holds the whole model (frozen base weights are not saved: they are the pretrained ones).
    def _sharded_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, [self.opt],
                                            options=StateDictOptions(ignore_frozen_params=True))
        state = {"model": model_sd, "optim": optim_sd}
        if self.ema is not None:
            state["ema"] = dict(zip(self.names, self.ema))
        return state

    def save_sharded(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._sharded_state(), checkpoint_id=str(path))  # collective; every rank writes its own file

    def load_sharded(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._sharded_state()
        dcp.load(state, checkpoint_id=str(path))  # in place, into this rank's shards (the EMA included)
        set_state_dict(self.module, [self.opt], model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))


def velocity_fn(backbone, cond: dict, model=None, autocast=nullcontext):
    def v(x, t):
        with autocast():
            return backbone.velocity(x, t, cond, model)
    return v


def sample(backbone, prompts: list[str], gens: list[torch.Generator], num_steps: int, sampler: str, eta: float,
           micro_batch: int, device, *, window=None, log_prob=None, same_noise: list | None = None,
           autocast=nullcontext):
    """Rollouts in micro-batches (the same batch shapes the training forward uses). Returns the trajectories,
    concatenated over micro-batches, and the conditioning."""
    grid = backbone.sigmas(num_steps)
    cond = backbone.encode(prompts)
    x1 = torch.stack([sampling.randn(backbone.latent_shape, g, "cpu") for g in (same_noise or gens)]).to(device)
    parts = []
    for i in range(0, len(prompts), micro_batch):
        sl = slice(i, i + micro_batch)
        c = {k: (v[sl] if k != "txt_ids" else v) for k, v in cond.items()}
        parts.append(sampling.rollout(velocity_fn(backbone, c, autocast=autocast), x1[sl], grid, sampler, eta,
                                      gens[sl], window=window, log_prob=log_prob))
    traj = sampling.Trajectory(latents=torch.cat([p.latents for p in parts]),
                               log_probs=torch.cat([p.log_probs for p in parts]), stochastic=parts[0].stochastic,
                               x0_hat=torch.cat([p.x0_hat for p in parts]), sigmas=grid)
    return traj, cond


def step_terms(policy: Policy, cfg: Config, traj, cond: dict, rows: torch.Tensor, steps: torch.Tensor, adv,
               autocast=nullcontext):
    """The loss terms of one trained step j for samples `rows`: each sample at its own step steps[rows] (B,).

    Returns per-sample clipped-surrogate loss, KL (or None) and stats. At the first update of an iteration the
    weights are those of the rollout, so logp_new == logp_old bitwise: ratio exactly 1 (tests check it)."""
    bb = policy.backbone
    x, x_next = traj.latents[rows, steps], traj.latents[rows, steps + 1]
    grid = traj.sigmas.to(x.device)  # the grid lives on the CPU, the step indices with the samples
    t, t_next = grid[steps], grid[steps + 1]
    c = {k: (v[rows] if k != "txt_ids" else v) for k, v in cond.items()}
    with autocast():
        v = bb.velocity(x, t, c, policy.module)
    logp, mean, std = sampling.step_log_prob(v, x, x_next, t, t_next, cfg.sampler, cfg.eta, cfg.log_prob or None)
    loss, stats = grpo.clipped_surrogate(logp, traj.log_probs[rows, steps], adv[rows], cfg.clip_range)
    kl = None
    if cfg.beta > 0:
        import models

        with torch.no_grad(), models.adapter_disabled(bb.transformer), autocast():
            v_ref = bb.velocity(x, t, c, bb.transformer)
        mean_ref, _ = sampling.get_sampler(cfg.sampler)(x, v_ref, t, t_next, cfg.eta)
        kl = grpo.kl_penalty(mean, mean_ref, std, t - t_next, cfg.kl_form)
    return loss, kl, stats


# -- checkpoints -------------------------------------------------------------------------------------------------
def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(out: Path, iteration: int, policy: Policy, history: list[dict], cfg: Config,
                    is_main: bool = True) -> Path:
    """Atomic: everything is written into a temporary folder that is renamed into place, then `latest` is
    replaced atomically. A run killed at any moment leaves the previous checkpoint intact.

    Contents: lora/ and lora_ema/ (diffusers' pytorch_lora_weights.safetensors, for `pipe.load_lora_weights`), or
    transformer/ and transformer_ema/ for full fine-tuning without FSDP; training_state.pt (iteration, history,
    RNG, config; without FSDP also the trained weights, EMA and AdamW state). Under FSDP2 (call on every rank) the
    weights, EMA and AdamW state go to dcp/, one file per rank (torch.distributed.checkpoint); the LoRA export
    gathers only the LoRA tensors; full fine-tuning exports nothing consolidated (see the README)."""
    import models

    root = out / "checkpoints"
    final = root / f"iter_{iteration:06d}"
    tmp = root / f".tmp-iter_{iteration:06d}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if policy.fsdp:
        _barrier()  # the folder exists before any rank writes into it (a shared filesystem across nodes)
    kind = policy.backbone.kind
    tr = policy.backbone.transformer
    if cfg.lora_rank > 0:
        live = models.lora_state_dict(tr)  # under FSDP: a collective gather of the LoRA tensors only
        if is_main:
            models.save_lora(tr, tmp / "lora", state_dict=live, pipeline=kind)
        if policy.ema is not None:
            policy.swap_ema()
            ema = models.lora_state_dict(tr)
            policy.swap_ema()
            if is_main:
                models.save_lora(tr, tmp / "lora_ema", state_dict=ema, pipeline=kind)
            if not policy.fsdp:
                assert all(torch.equal(v, models.lora_state_dict(tr)[k]) for k, v in live.items())
    elif not policy.fsdp and is_main:
        tr.save_pretrained(tmp / "transformer")
        if policy.ema is not None:
            policy.swap_ema()
            tr.save_pretrained(tmp / "transformer_ema")
            policy.swap_ema()
    if policy.fsdp:
        policy.save_sharded(tmp / "dcp")
    if is_main:
        torch.save(dict(iteration=iteration, history=history, config=dataclasses.asdict(cfg),
                        torch_rng=torch.get_rng_state(), **({} if policy.fsdp else policy.state())),
                   tmp / "training_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / "latest")
        for old in sorted(root.glob("iter_*"))[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    f = out / "checkpoints" / "latest"
    return out / "checkpoints" / f.read_text().strip() if f.exists() else None


# -- evaluation --------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(policy: Policy, cfg: Config, metrics, eval_prompts: list[str], eval_meta: list, rank: int, world: int,
             device, autocast) -> tuple[dict, torch.Tensor]:
    """Deterministic ODE rollouts with the EMA weights on the held-out prompts and fixed noises (the same for
    every run, sampler and iteration), split across ranks; metric means over all samples."""
    n = len(eval_prompts)
    order = [(k, p) for k in range(cfg.eval_per_prompt) for p in range(n)]  # interleaved: rank 0 sees all prompts
    per = math.ceil(len(order) / world)
    mine = order[rank * per:(rank + 1) * per]
    n_mine = len(mine)
    if policy.fsdp and n_mine < per:  # FSDP2 forwards are collectives: every rank runs as many (padding, dropped)
        mine = mine + [order[-1]] * (per - n_mine)
    prompts = [eval_prompts[p] for _, p in mine]
    policy.swap_ema()
    try:
        with policy.backbone_guidance(cfg.eval_guidance):
            traj, _ = sample(policy.backbone, prompts, generators([(10_007, p, k) for k, p in mine]), cfg.eval_steps,
                             "ode", 0.0, max(cfg.micro_batch, 1) * 4, device, autocast=autocast)
        images = policy.backbone.decode(traj.final)[:n_mine]
    finally:
        policy.swap_ema()
    mine, prompts = mine[:n_mine], prompts[:n_mine]
    out = metrics(images, prompts, [eval_meta[p] for _, p in mine])
    sums = torch.stack([torch.nansum(v) for v in out.components.values()] +
                       [torch.isfinite(v).sum() for v in out.components.values()]).double()
    sums = all_reduce(sums)
    m = len(out.components)
    result = {f"eval/{k}": float(sums[i] / sums[m + i].clamp(min=1)) for i, k in enumerate(out.components)}
    # the image grid: up to 10 fixed noises (rows) x 10 prompts (columns) of this rank's share
    keep = [i for i, (k, p) in enumerate(mine) if k < 10 and p < 10]
    return result, images[keep]


def check_model(cfg: Config, is_main: bool) -> None:
    """Fail before any work when the weights are missing: rank 0 resolves (and, online, downloads) the model and
    tells every rank its verdict, so no rank waits at a barrier for a rank that has exited."""
    import models

    if cfg.model == "digits":
        return
    verdict = [None]
    if is_main:
        try:
            models.resolve_model(cfg.model)
        except ValueError as e:
            verdict = [str(e)]
    if dist.is_initialized():
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise SystemExit(f"model error: {verdict[0]}")


# -- the loop ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    """Run GRPO; returns {'summary': base vs trained metrics (rank 0), 'history': per-iteration logs, 'policy'}."""
    cfg = parse_config(argv)
    if cfg.dry_run:
        return dry_run(cfg)
    world = int(os.environ.get("WORLD_SIZE", 1))
    validate(cfg, world)
    rank, world, device = setup_distributed(cfg)
    is_main = rank == 0
    print0 = print if is_main else (lambda *a, **k: None)
    out = Path(cfg.output_dir)
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and ckpt is None:
        raise SystemExit(f"--resume: no checkpoint in {out / 'checkpoints'}; run without --resume to start fresh")
    if ckpt is not None:
        saved = json.loads((out / "config.json").read_text())
        defaults = dataclasses.asdict(Config())  # fields added after the run started count as their defaults
        diff = {k: (saved.get(k, defaults[k]), v) for k, v in dataclasses.asdict(cfg).items()
                if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != v}
        if diff:
            raise SystemExit(f"--resume with a different config: {diff} (saved, given). Resume with the saved "
                             f"values, or start a new output_dir.")
    elif is_main and (out / "checkpoints").exists():
        raise SystemExit(f"{out} already holds a run; pass --resume to continue it or choose another --output_dir")

    import models
    from rewards import RewardModel, nan_mean

    bf16 = device.type == "cuda" and cfg.precision == "auto"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext
    try:  # every rank reads the prompts (cheap), so a missing file stops all of them alike
        train_prompts, train_meta = load_prompts(cfg.prompts, "train", cfg.seed)
        eval_prompts, eval_meta = load_prompts(cfg.prompts, "test", cfg.seed)
    except (ValueError, OSError) as e:
        raise SystemExit("prompt error: " + prompt_error(cfg, e)) from None
    check_model(cfg, is_main)
    print0("\n".join(describe(cfg, world, check_files=False)[0]))  # the plan and memory estimate, checked above
    reward_opts = json.loads(cfg.reward_options)
    load_options = dict(resolution=cfg.resolution, guidance=cfg.guidance, max_sequence_length=cfg.max_sequence_length,
                        shift=cfg.shift)
    if cfg.model != "digits":
        load_options.update(offload=cfg.offload, dtype=torch.bfloat16 if bf16 else torch.float32)
    try:
        with rank_zero_first():
            reward_fn = RewardModel(cfg.reward, device=device, **reward_opts)  # fails now if weights are missing
            metrics = RewardModel(cfg.eval_metrics, device=device, **reward_opts)
            backbone = models.load_backbone(cfg.model, device=device, **load_options)
    except ValueError as e:  # e.g. guidance for FLUX.1-schnell, a resolution the VAE/patching cannot split
        raise SystemExit(f"config error: {e}") from None
    policy = Policy(cfg, backbone, device, world)
    per_rank_prompts = cfg.prompts_per_iter // world
    n_local = per_rank_prompts * cfg.group_size
    chunk = n_local // cfg.updates_per_iter
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    print0(json.dumps(dataclasses.asdict(cfg), indent=1))
    print0(f"world {world} on {device}; per iteration {cfg.prompts_per_iter} prompts x {cfg.group_size} = "
           f"{cfg.prompts_per_iter * cfg.group_size} samples ({n_local} per rank); {cfg.updates_per_iter} updates "
           f"of {chunk} samples per rank in micro-batches of {cfg.micro_batch}; "
           f"{sum(p.numel() for p in policy.params) * (world if policy.fsdp else 1):,} trainable "
           f"{'LoRA ' if cfg.lora_rank else ''}parameters ({cfg.parallel if world > 1 else 'one process'})")

    history: list[dict] = []
    start = 1
    if ckpt is not None:
        st = torch.load(ckpt / "training_state.pt", weights_only=False)
        if policy.fsdp:
            policy.load_sharded(ckpt / "dcp")
        else:
            policy.load_state(st)
        history, start = st["history"], st["iteration"] + 1
        torch.set_rng_state(st["torch_rng"])
        print0(f"resumed from {ckpt} at iteration {st['iteration']}")
    logger = logs.Logger(out, is_main, cfg.tensorboard)
    if ckpt is not None:
        logger.rewrite(history)
    window = None
    if cfg.sde_window:
        lo, hi = (int(s) for s in cfg.sde_window_range.split(",")) if cfg.sde_window_range else (0, None)

    def run_eval(it: int) -> dict:
        res, images = evaluate(policy, cfg, metrics, eval_prompts, eval_meta, rank, world, device, autocast)
        if is_main:
            logs.image_grid(images, min(10, cfg.eval_per_prompt), out / "images" / f"eval_{it:05d}.png")
        return res

    if start == 1:
        base = run_eval(0)
        history.append(dict(iteration=0, **base))
        logger.log(history[-1])
        print0("base model (ODE, held-out): " + "  ".join(f"{k[5:]} {v:.4f}" for k, v in base.items()))

    from tqdm.auto import tqdm

    bar = tqdm(range(start, cfg.iterations + 1), disable=not is_main, desc="GRPO", dynamic_ncols=True)
    for it in bar:
        tm: dict[str, float] = {}
        t0 = time.perf_counter()
        # 1. prompts and seeds: a deterministic function of (seed, iteration), the same on every rank
        rng = np.random.default_rng(seed_of(cfg.seed, it))
        ids = rng.choice(len(train_prompts), cfg.prompts_per_iter, replace=len(train_prompts) < cfg.prompts_per_iter)
        mine = ids[rank * per_rank_prompts:(rank + 1) * per_rank_prompts]
        prompts = [train_prompts[i] for i in mine for _ in range(cfg.group_size)]
        meta = [train_meta[i] for i in mine for _ in range(cfg.group_size)]
        slots = [(cfg.seed, it, q, m) for q in range(rank * per_rank_prompts, (rank + 1) * per_rank_prompts)
                 for m in range(cfg.group_size)]
        gens = generators(slots)
        # one initial noise per group (DanceGRPO): seeded by member index group_size, which no sample's own noise
        # uses (SeedSequence takes only non-negative parts)
        same = generators([(cfg.seed, it, s[2], cfg.group_size) for s in slots]) if cfg.same_noise_in_group else None
        if cfg.sde_window:
            window = grpo.draw_sde_window(cfg.num_steps, cfg.sde_window, lo, hi,
                                          torch.Generator().manual_seed(seed_of(cfg.seed, it, 1)))
        # 2. rollout with the current policy (no grad)
        policy.module.eval()
        with torch.no_grad():
            traj, cond = sample(backbone, prompts, gens, cfg.num_steps, cfg.sampler, cfg.eta, cfg.micro_batch, device,
                                window=window, log_prob=cfg.log_prob or None, same_noise=same, autocast=autocast)
            tm["rollout"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            images = backbone.decode(traj.final if cfg.reward_image == "final" else traj.x0_hat)
            tm["decode"] = time.perf_counter() - t1
        # 3. rewards -> advantages over the whole world's batch (groups never straddle ranks)
        t1 = time.perf_counter()
        rew = reward_fn(images, prompts, meta)
        train_metrics = metrics(images, prompts, meta) if is_main else None
        tm["reward"] = time.perf_counter() - t1
        all_r = all_gather_cat(rew.total.to(device)).cpu()
        groups = torch.arange(len(all_r)) // cfg.group_size
        adv_all = grpo.ADVANTAGES[cfg.advantage](all_r, groups, clip=cfg.adv_clip,
                                                 **({"global_std": cfg.global_std} if cfg.advantage == "flow_grpo"
                                                    else {}))
        adv = adv_all[rank * n_local:(rank + 1) * n_local].to(device)
        keep = rew.valid.to(device) & ((adv != 0) if cfg.drop_zero_adv else True)
        # 4. which steps each sample trains: (n_local, K)
        step_gen = torch.Generator().manual_seed(seed_of(cfg.seed, it, 2, rank))
        if cfg.timesteps == "ordered":
            steps = grpo.ordered_timesteps(traj.stochastic, cfg.timestep_fraction).expand(n_local, -1)
        else:
            steps = grpo.random_timesteps(traj.stochastic, n_local, cfg.timestep_fraction, step_gen)
        steps = steps.to(device)
        K = steps.shape[1]
        # 5. updates: shuffle, split into chunks, micro-batches with gradient accumulation
        t1 = time.perf_counter()
        policy.module.train()
        perm = torch.randperm(n_local, generator=step_gen).to(device)
        agg: dict[str, list] = {"loss": [], "kl": [], "clipfrac": [], "approx_kl": [], "ratio_mean": [],
                                "ratio_min": [], "ratio_max": [], "grad_norm": []}
        kept_total = 0
        for u in range(cfg.updates_per_iter):
            rows_u = perm[u * chunk:(u + 1) * chunk]
            rows_u = rows_u[keep[rows_u]]
            n_kept = all_reduce(torch.tensor([len(rows_u)], dtype=torch.float64)).item()
            kept_total += int(n_kept)
            if n_kept == 0 or K == 0:
                continue
            n_mb = int(all_reduce(torch.tensor([math.ceil(len(rows_u) / cfg.micro_batch)]), dist.ReduceOp.MAX
                                  if dist.is_initialized() else None).item())
            scale = world / (n_kept * K)  # DDP averages over ranks; this turns it into a world-wide mean
            for b in range(n_mb):
                rows = rows_u[b * cfg.micro_batch:(b + 1) * cfg.micro_batch]
                weight = scale
                if len(rows) == 0:  # padding so every rank runs the same number of forwards (DDP/FSDP collectives)
                    rows, weight = perm[:1], 0.0
                for j in range(K):
                    with grad_sync(policy.module, b == n_mb - 1 and j == K - 1):
                        loss, kl, st = step_terms(policy, cfg, traj, cond, rows, steps[rows, j], adv, autocast)
                        total = loss.sum() + (cfg.beta * kl.sum() if kl is not None else 0.0)
                        (total * weight).backward()
                    if weight:
                        agg["loss"].append(float(loss.detach().mean()))
                        agg["kl"].append(float(kl.detach().mean()) if kl is not None else float("nan"))
                        for k in ("clipfrac", "approx_kl", "ratio_mean", "ratio_min", "ratio_max"):
                            agg[k].append(st[k])
                        if u == 0:
                            agg.setdefault("first_ratio_max_dev", []).append(max(abs(st["ratio_max"] - 1),
                                                                                 abs(st["ratio_min"] - 1)))
            t_opt = time.perf_counter()
            norm = torch.nn.utils.clip_grad_norm_(policy.params, cfg.max_grad_norm)
            agg["grad_norm"].append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
            policy.opt.step()
            policy.opt.zero_grad(set_to_none=True)
            policy.update_ema()
            tm["optim"] = tm.get("optim", 0.0) + time.perf_counter() - t_opt
        tm["train"] = time.perf_counter() - t1 - tm.get("optim", 0.0)  # forward + backward of the loss terms
        # 6. logging, evaluation, checkpoints
        t1 = time.perf_counter()
        row = dict(iteration=it, reward=nan_mean(all_r), reward_std=float(all_r[torch.isfinite(all_r)].std())
                   if torch.isfinite(all_r).sum() > 1 else 0.0,
                   invalid=int(all_reduce(torch.tensor([int((~rew.valid).sum())])).item()), kept=kept_total)
        for k, v in rew.components.items():
            if len(rew.components) > 1:
                row[f"reward/{k}"] = nan_mean(all_gather_cat(v.to(device)).cpu())
        if train_metrics is not None:
            row.update({f"train/{k}": nan_mean(v) for k, v in train_metrics.components.items()})
        for k, v in agg.items():  # extremes for the ratio bounds, means for the rest; NaN when nothing trained
            finite = [x for x in v if not math.isnan(x)]
            reduce = {"ratio_min": min, "ratio_max": max, "first_ratio_max_dev": max}.get(k, np.mean)
            row[k] = float(reduce(finite)) if finite else float("nan")
        if it % cfg.eval_every == 0 or it == cfg.iterations:
            row.update(run_eval(it))
            if is_main:
                shown = [i for i in range(min(n_local, 8 * cfg.group_size)) if i % cfg.group_size < 8]
                logs.image_grid(images[shown], min(8, per_rank_prompts), out / "images" / f"train_{it:05d}.png")
        tm["eval"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        row.update({f"time/{k}": v for k, v in tm.items()})
        history.append(row)
        logger.log(row)
        if is_main:
            evs = "  ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("eval/"))
            bar.write(f"it {it:4d} | reward {row['reward']:.4f} | clipfrac {row['clipfrac']:.3f} approx_kl "
                      f"{row['approx_kl']:.2e} kl {row['kl']:.2e} | invalid {row['invalid']} | rollout "
                      f"{tm['rollout']:.2f}s reward {tm['reward']:.2f}s train {tm['train']:.2f}s" +
                      (f" | eval: {evs}" if evs else ""))
        if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
            if is_main or policy.fsdp:  # FSDP2: every rank writes its shards
                save_checkpoint(out, it, policy, history, cfg, is_main)
            if dist.is_initialized():
                dist.barrier()
            if it == cfg.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        history[-1]["time/log_checkpoint"] = time.perf_counter() - t1  # in the returned history, not the JSONL
    logger.close()
    summary = {}
    if is_main:
        base = next(h for h in history if h["iteration"] == 0)
        last = [h for h in history if any(k.startswith("eval/") for k in h)][-1]
        curve = logs.reward_curves(history, out / "reward_curve.png",
                                   f"{cfg.sampler} eta={cfg.eta} on {cfg.model}")
        print("\nheld-out metrics (ODE, EMA weights)      base  ->  trained")
        for k in base:
            if k.startswith("eval/"):
                print(f"  {k[5:]:<36} {base[k]:.4f} -> {last[k]:.4f}")
                summary[k] = (base[k], last[k])
        print(f"figures: {curve}  {out / 'images'}\ncheckpoint: {latest_checkpoint(out)}\nlog: {out / 'metrics.jsonl'}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return dict(summary=summary, history=history, policy=policy)


if __name__ == "__main__":
    main(sys.argv[1:])
