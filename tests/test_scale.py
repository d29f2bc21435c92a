"""Two-process `torchrun` GRPO runs (gloo, CPU) on the tiny pipelines, through the same `--model /path` a user gives:

  * FLUX.1-dev-style under FSDP2 (sharded per transformer block, activation checkpointing, KL to the adapter-off
    reference): both ranks gather the same LoRA, it equals the exported checkpoint and a one-process run of the same
    config (to 1e-5; FSDP2 and DDP agree bitwise), and a resume from a sharded (torch.distributed.checkpoint)
    checkpoint continues bit for bit;
  * 1 node x 2 processes and 2 nodes x 1 process (two launchers, a c10d rendezvous on localhost) end bitwise
    identical: an SD3.5-style DDP LoRA run with true CFG (ranks identical, no buffer broadcasts, on-policy at every
    first update) and a FLUX.1-dev-style FSDP2 full fine-tuning run whose diffusers export, written shard by shard,
    reloads with from_pretrained and gives the trained velocities; the EMA equals a one-process run's;
  * DanceGRPO-style full fine-tuning under FSDP2 in one process: its sharded checkpoint (a safetensors file per
    rank) consolidates with `checkpoints.read_sharded` into the diffusers transformer and its export, matches the
    unsharded run and resumes bit for bit;
  * FSDP2 full fine-tuning on 2 ranks keeps each rank's gradient at its shard while an update accumulates
    (tests/fsdp_grads_check.py), with the same gradient as the old accumulation and as one process.
Each launch costs ~10 s, mostly imports.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fsdp_grads_check as check
import multinode_check
import pytest
import tiny_pipelines
import torch
from safetensors.torch import load_file

import train
from flow_cps import checkpoints, config, distributed, models
from flow_cps.lora import LoRA
from flow_cps.policy import Policy
from flow_cps.precision import precision

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red cat", "a blue dog", "two birds", "a green apple"]
# updates_per_iter 1: one update per iteration sees the same samples whatever the world size, so the two-rank run
# can be compared with a one-process run (with 2 updates, each rank shuffles its own half into the updates).
RUN = ["--resolution", "32", "--max_sequence_length", "16", "--reward", "clean_background", "--eval_metrics",
       "clean_background", "--iterations", "2", "--eval_every", "2", "--checkpoint_every", "1",
       "--keep_checkpoints", "3", "--eval_per_prompt", "1", "--prompts_per_iter", "2", "--group_size", "4",
       "--micro_batch", "2", "--updates_per_iter", "1", "--num_steps", "4", "--eval_steps", "4", "--lora_rank", "4",
       "--lora_alpha", "8", "--report_to", "none"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_pipelines.cached()


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def _torchrun(*args, script="tests/scale_check.py"):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if p.returncode != 0:
        raise AssertionError(f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _lora(run: Path, it: int, which: str = "lora") -> dict:
    return load_file(run / "checkpoints" / f"iter_{it:06d}" / which / "pytorch_lora_weights.safetensors")


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_fsdp2_flux_matches_one_process_and_resumes_exactly(tiny, prompts, tmp_path):
    n = torch.get_num_threads()
    args = [*RUN, "--model", str(tiny["flux-dev"]), "--prompts", prompts, "--beta", "0.01"]
    run = tmp_path / "fsdp"
    _torchrun(*args, "--parallel", "fsdp", "--gradient_checkpointing", "true", "--output_dir", run)
    # the ranks agree, and the export (gathered LoRA tensors only) is what they hold
    r0, r1 = load_file(run / "rank0.safetensors"), load_file(run / "rank1.safetensors")
    exported = _lora(run, 2)
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert all(torch.equal(r0[k], exported["transformer." + k]) for k in r0)
    assert any(v.abs().max() > 0 for k, v in r0.items() if "lora_B" in k)  # it trained
    ckpt = run / "checkpoints" / "iter_000002"
    assert len(list((ckpt / "dcp").iterdir())) == 2  # one safetensors file per rank, nothing gathered or pickled
    assert all(f.suffix == ".safetensors" for f in (ckpt / "dcp").iterdir())
    whole = checkpoints.read_sharded(ckpt / "dcp")  # the two ranks' shards, assembled in one process
    assert all(torch.equal(whole["model." + k.replace(".weight", ".default.weight")], r0[k]) for k in r0)
    assert "params" not in torch.load(ckpt / "training_state.pt", weights_only=True)
    assert all(r["first_ratio_max_dev"] == 0.0 for r in _rows(run)[1:])  # on-policy at every first update
    # the same config in one process (no sharding, no checkpointing): the same training up to float rounding
    torch.set_num_threads(1)
    try:
        one = train.main([*args, "--output_dir", str(tmp_path / "single")])
    finally:
        torch.set_num_threads(n)
    # the disk estimate: numel() of an FSDP2 parameter is already global, so 2 ranks estimate what one process does
    # (the old formula multiplied by the world size), and the estimate is the checkpoint's size
    estimate = checkpoints.checkpoint_bytes(one["policy"])
    assert [json.loads((run / f"rank{r}.json").read_text())["checkpoint_bytes"] for r in (0, 1)] == [estimate] * 2
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    assert 0.8 < size / estimate < 1.5, (size, estimate)
    single = _lora(tmp_path / "single", 2)
    assert max(float((exported[k] - single[k]).abs().max()) for k in single) < 1e-5
    assert [r["reward"] for r in _rows(run)[1:]] == pytest.approx([r["reward"] for r in
                                                                   _rows(tmp_path / "single")[1:]], abs=1e-5)
    # resume: rewind to the iteration-1 checkpoint and continue from its shards
    before = {w: _lora(run, 2, w) for w in ("lora", "lora_ema")}
    rows = _rows(run)
    shutil.rmtree(ckpt)
    (run / "checkpoints" / "latest").write_text("iter_000001")
    _torchrun(*args, "--parallel", "fsdp", "--gradient_checkpointing", "true", "--output_dir", run, "--resume", "true")
    for w, tensors in before.items():
        after = _lora(run, 2, w)
        assert all(torch.equal(tensors[k], after[k]) for k in tensors), w
    assert [(r["iteration"], r.get("reward"), r.get("grad_norm")) for r in _rows(run)] == \
        [(r["iteration"], r.get("reward"), r.get("grad_norm")) for r in rows]


def _two_nodes(out: Path, *args) -> None:
    """2 nodes x 1 process on this machine: two torchrun launchers meeting at a c10d rendezvous on localhost, the
    second in a working directory of its own (nothing may be written relative to a node's working directory)."""
    node1 = out.parent / f"{out.name}-node1-cwd"
    node1.mkdir()
    endpoint, run_id = f"127.0.0.1:{_free_port()}", f"flow-cps-test-{os.getpid()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
           f"--rdzv_endpoint={endpoint}", f"--rdzv_id={run_id}", str(ROOT / "tests" / "multinode_check.py"),
           str(out), *map(str, args)]
    nodes = [subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for cwd in (ROOT, node1)]
    logs = [n.communicate(timeout=600)[0] for n in nodes]
    if any(n.returncode for n in nodes):
        raise AssertionError("two-node launch failed:\n" + "\n---\n".join(x[-3000:] for x in logs))
    assert not any(node1.iterdir()), list(node1.iterdir())


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_two_nodes_equal_one_node_ddp_and_fsdp2_with_exports(tiny, prompts, tmp_path):
    """One launch of 1 node x 2 processes and one of 2 nodes x 1 process (tests/multinode_check.py: a DDP LoRA run
    of the SD3.5-style pipeline and an FSDP2 full fine-tuning run of the FLUX.1-dev-style one) end identical: every
    metric, the trained weights and the EMA, bit for bit. DDP keeps the ranks identical without re-broadcasting its
    buffers (SD3.5's position embedding). The full fine-tuning export (transformer/, transformer_ema/: diffusers
    folders cut into shards, no optimizer state) reloads with from_pretrained and gives the trained velocities. The
    EMA of several updates per optimizer step is the same at 1 and 2 ranks (a one-process run, to float rounding)."""
    from diffusers import FluxTransformer2DModel

    folders = (tiny["sd3.5"], tiny["flux-dev"], prompts)
    _torchrun(tmp_path / "one", *folders, script="tests/multinode_check.py")
    _two_nodes(tmp_path / "two", *folders)
    for name in ("ddp", "fsdp"):
        one, two = tmp_path / "one" / name, tmp_path / "two" / name
        held = {(n, r): torch.load(n / f"rank{r}.pt", weights_only=False) for n in (one, two) for r in (0, 1)}
        for key in ("weights", "ema", "buffers"):  # the ranks agree, and the two launches agree
            assert all(_same(held[(one, 0)][key], h[key]) for h in held.values()), (name, key)
        assert all(torch.equal(held[(one, 0)][k], held[(two, 0)][k]) for k in ("velocity", "ema_velocity"))
        assert _without_times(_rows(one)) == _without_times(_rows(two))
        assert all(r["first_ratio_max_dev"] == 0.0 for r in _rows(one)[1:])  # on-policy at every first update
        assert not _same(held[(one, 0)]["weights"], held[(one, 0)]["ema"])  # both trained, and differ
    ddp = torch.load(tmp_path / "one" / "ddp" / "rank0.pt", weights_only=False)
    assert ddp["forward_sync_buffers"] is False and any(b.numel() for b in ddp["buffers"].values())
    # the full fine-tuning export reloads in diffusers and is the trained model
    fsdp = torch.load(tmp_path / "two" / "fsdp" / "rank0.pt", weights_only=False)
    bb = models.load_backbone(str(tiny["flux-dev"]), "cpu", resolution=32, max_sequence_length=16)
    ckpt = tmp_path / "two" / "fsdp" / "checkpoints" / "iter_000002"
    for folder, which in (("transformer", ""), ("transformer_ema", "ema_")):
        files = sorted(p.name for p in (ckpt / folder).iterdir())
        assert files[0] == "config.json" and files[-1].endswith(".index.json") and len(files) > 3, files  # shards
        loaded = FluxTransformer2DModel.from_pretrained(ckpt / folder)
        assert _same(dict(loaded.named_parameters()), fsdp["weights" if not which else "ema"])
        v = multinode_check.probe(bb, loaded)
        assert float((v - fsdp[which + "velocity"]).abs().max()) < 1e-6, folder
    # one process: the same EMA as two ranks (DDP run's flags without DDP)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main([*multinode_check.runs(*map(str, folders))["ddp"], "--output_dir", str(tmp_path / "single")])
    finally:
        torch.set_num_threads(n)
    for w in ("lora", "lora_ema"):
        single, two_ranks = _lora(tmp_path / "single", 2, w), _lora(tmp_path / "one" / "ddp", 2, w)
        assert max(float((two_ranks[k] - single[k]).abs().max()) for k in single) < 1e-5, w


DANCE = ["--lora_rank", "0", "--lr", "1e-4", "--ema_decay", "0.995", "--timesteps", "random", "--timestep_fraction",
         "0.6", "--advantage", "dance", "--same_noise_in_group", "true", "--reward_image", "x0_hat", "--shift", "3",
         "--micro_batch", "4", "--iterations", "2", "--eval_every", "2"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_full_fine_tuning_consolidates_and_resumes(tiny, prompts, tmp_path, monkeypatch):
    """World 1 keeps it in-process (a gloo group of one): the sharding maths is the two-rank test's; this one covers
    full fine-tuning's sharded checkpoint (weights, AdamW state, EMA), its consolidation and its diffusers export."""
    from diffusers import FluxTransformer2DModel

    args = [*RUN, *DANCE, "--model", str(tiny["flux-dev"]), "--prompts", prompts]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")

    def fsdp_run(out, *extra):
        monkeypatch.setenv("MASTER_PORT", str(_free_port()))
        return train.main([*args, "--parallel", "fsdp", "--output_dir", str(out), *extra])

    def consolidated(out, it):  # {"model": {name: tensor}, "ema": ..., "optim": ...} from the ranks' files
        full = checkpoints.read_sharded(out / "checkpoints" / f"iter_{it:06d}" / "dcp")
        parts: dict = {}
        for key, value in full.items():
            part, name = key.split(".", 1)
            parts.setdefault(part, {})[name] = value
        return parts

    try:
        fsdp_run(tmp_path / "fsdp")
        train.main([*args, "--output_dir", str(tmp_path / "plain")])  # no sharding: writes transformer/
        full = consolidated(tmp_path / "fsdp", 2)
        plain = dict(FluxTransformer2DModel.from_pretrained(
            tmp_path / "plain" / "checkpoints" / "iter_000002" / "transformer").named_parameters())
        assert full["model"].keys() == plain.keys()  # diffusers' names: load_state_dict into the transformer
        assert max(float((full["model"][k] - plain[k]).abs().max()) for k in plain) < 1e-6
        exported = dict(FluxTransformer2DModel.from_pretrained(  # FSDP2 also writes the diffusers folder
            tmp_path / "fsdp" / "checkpoints" / "iter_000002" / "transformer").named_parameters())
        assert all(torch.equal(exported[k], full["model"][k]) for k in plain)
        base = dict(FluxTransformer2DModel.from_pretrained(tiny["flux-dev"] / "transformer").named_parameters())
        assert max(float((full["model"][k] - base[k]).abs().max()) for k in base) > 1e-5  # every weight trains
        shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / "iter_000002")
        (tmp_path / "fsdp" / "checkpoints" / "latest").write_text("iter_000001")
        fsdp_run(tmp_path / "fsdp", "--resume", "true")
        again = consolidated(tmp_path / "fsdp", 2)
        for part in ("model", "ema"):
            assert all(torch.equal(full[part][k], again[part][k]) for k in full[part]), part
    finally:
        torch.set_num_threads(n)


def test_fsdp2_full_fine_tuning_keeps_gradients_sharded(tiny, tmp_path):
    """Two micro-batches per rank, accumulated as train.update does. With the reduce-scatter skipped before the last
    micro-batch (the old rule), FSDP2 kept an unsharded gradient of the whole model on every rank (FLUX.1-dev:
    44 GiB); now each rank holds its shard only, and the accumulated gradient is unchanged."""
    _torchrun(tiny["flux-dev"], tmp_path, script="tests/fsdp_grads_check.py")
    res = torch.load(tmp_path / "grads.pt", weights_only=False)
    shards = [r["new"]["shard"] for r in res["stats"]]
    model = res["stats"][0]["new"]["model"]
    assert sum(shards) == model and max(shards) < 0.55 * model  # two disjoint halves of the transformer
    for r in res["stats"]:  # per rank, after the first micro-batch
        new, old = r["new"], r["old"]
        assert new["unsharded"] == 0 and new["sharded"] == new["shard"]  # the shard: a DTensor grad's local part
        assert old["unsharded"] == old["model"] and old["sharded"] == 0  # the old rule: the whole model, unsharded
    new, old = res["grads_new"], res["grads_old"]
    assert max(float((a - b).abs().max()) for a, b in zip(new, old)) < 1e-6
    # one process: the mean over the ranks of each rank's summed micro-batch gradients (what FSDP2 applies)
    bb = models.load_backbone(str(tiny["flux-dev"]), "cpu", resolution=check.RES, max_sequence_length=check.MSL)
    tr = bb.transformer.requires_grad_(True)
    for rank in range(2):
        for x, t, cond in check.batches(bb, rank):
            (check.loss_of(bb, tr, x, t, cond) / 2).backward()
    ref = [p.grad for p in tr.parameters()]
    assert len(ref) == len(new) and all(a.shape == b.shape for a, b in zip(ref, new))
    assert max(float((a - b).abs().max()) for a, b in zip(ref, new)) < 1e-6


def test_fsdp2_gathers_full_fine_tuning_in_fp32_and_a_lora_in_the_precision(tiny, monkeypatch):
    """bf16 precision: full fine-tuning's weights reach a forward in fp32, as DanceGRPO's FSDP1 gathers them
    (autocast casts per matmul; FLUX's q/k RMSNorm weights stay fp32); a LoRA model's in bf16."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    cpu, seen = torch.device("cpu"), {}
    prec = precision("bf16", cpu)
    distributed.setup("cpu", need_group=True)
    try:
        for name, trained in (("full", None), ("lora", LoRA(4, 8.0, tuple(config.FLUX_TARGETS)))):
            bb = models.load_backbone(str(tiny["flux-dev"]), cpu, resolution=32, max_sequence_length=16,
                                      dtype=torch.bfloat16)
            policy = Policy(bb, cpu, 1, lora=trained, parallel="fsdp", precision=prec)
            norm = policy.module.transformer_blocks[0].attn.norm_q
            hook = norm.register_forward_pre_hook(lambda m, args, name=name: seen.update({name: m.weight.dtype}))
            with torch.no_grad(), prec.autocast():
                bb.velocity(torch.randn(1, *bb.latent_shape), torch.tensor([0.5]), bb.encode(["a cat"]),
                            policy.module)
            hook.remove()
    finally:
        distributed.teardown()
    assert seen == {"full": torch.float32, "lora": torch.bfloat16}
