"""gpu_check.py, what a CPU can check of it: the stand-in pipelines of the GPU run have the released architectures
(built on the meta device: no memory), and `--tiny` runs every preset's GRPO iteration through train.main on tiny
shapes (the same code path the GPU run takes: in-memory pipeline, Session, update, checkpoint, the report)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flow_cps import memory
from tools import gpu_check

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kind", ["flux-dev", "sd3.5"])
def test_stand_ins_have_the_released_architectures(kind):
    pipe = gpu_check.stand_in_pipeline(kind, tiny=False, dtype=torch.bfloat16, device="meta")
    known = memory.KNOWN_MODELS[gpu_check.HUB_IDS[kind]]
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(pipe.transformer) == {"flux-dev": 11_901_408_320, "sd3.5": 2_243_171_520}[kind]
    assert n(pipe.vae) == known["vae"] and pipe.vae_scale_factor == 8 and pipe.vae.dtype == torch.float32
    assert pipe.transformer.dtype == torch.bfloat16
    t5 = pipe.text_encoder_2 if kind == "flux-dev" else pipe.text_encoder_3
    assert t5.config.d_model == 4096
    if kind == "flux-dev":  # FLUX: CLIP-L's pooled 768
        assert pipe.text_encoder.config.hidden_size == 768 and pipe.transformer.config.guidance_embeds
    else:  # SD3: CLIP-L 768 + CLIP-G 1280 = the pooled 2048; their hidden states fit T5's 4096
        assert [pipe.text_encoder.config.projection_dim, pipe.text_encoder_2.config.projection_dim] == [768, 1280]
    depth = gpu_check.stand_in_pipeline("flux-dev", tiny=False, dtype=torch.bfloat16, device="meta", depth=(2, 4))
    assert len(depth.transformer.transformer_blocks) == 2 and len(depth.transformer.single_transformer_blocks) == 4


def test_tiny_gpu_check_runs_every_preset(tmp_path):
    out = tmp_path / "gpu.md"
    p = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--tiny", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [r for r in out.read_text().splitlines() if r.startswith("| `") and r.count("|") == 13]  # the main table
    assert [r.split("`")[1] for r in rows] == gpu_check.PRESETS
    for r in rows:
        cells = [c.strip() for c in r.split("|")[1:-1]]
        assert cells[5] == "0.0e+00" and cells[-1] == "yes", r  # on-policy first update; a checkpoint was written
        assert float(cells[7]) > 0 and float(cells[8]) > 0  # throughput measured


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5), ("NVIDIA GH200 480GB", 989.4),
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.1), ("NVIDIA B200", 2250.0),
    ("NVIDIA H800", None), ("NVIDIA H20", None), ("NVIDIA GeForce RTX 4090", None), ("NVIDIA H100 MIG 1g.10gb", None),
])
def test_gpu_peak_is_read_from_the_whole_name(name, peak):
    """Model and form factor, word by word: an H200 NVL is not given the SXM H200's peak (which understated its
    utilisation), and a part not in the table gets none (the report then asks for --peak_tflops)."""
    assert gpu_check.peak_tflops(name) == peak

