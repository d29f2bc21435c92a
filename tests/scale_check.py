"""Run by tests/test_scale.py under `torchrun --nproc_per_node=2`: trains with train.main, then every rank gathers the
full LoRA (under FSDP2 this all-gathers the shards: the path the checkpoint export takes) and writes it, so the test
can check that the ranks agree and match the exported checkpoint; and the checkpoint size the run estimated."""
import json
import os
import sys

import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from flow_cps import checkpoints, lora  # noqa: E402

destroy = dist.destroy_process_group
dist.destroy_process_group = lambda *a, **k: None  # keep the group alive for the gather below
result = train.main(sys.argv[1:])
out = sys.argv[sys.argv.index("--output_dir") + 1]
state = lora.lora_state_dict(result["policy"].backbone.transformer)  # collective under FSDP2
save_file(state, os.path.join(out, f"rank{os.environ['RANK']}.safetensors"))
with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:  # the disk estimate the run warned with
    json.dump({"checkpoint_bytes": checkpoints.checkpoint_bytes(result["policy"])}, f)
destroy()
