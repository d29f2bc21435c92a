"""Run by tests/test_train.py under `torchrun --nproc_per_node=2`: trains, then writes each rank's LoRA weights so
the test can check that DDP kept the ranks identical."""
import os
import sys

from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from flow_cps import lora  # noqa: E402

result = train.main(sys.argv[1:])
out = sys.argv[sys.argv.index("--output_dir") + 1]
save_file(lora.lora_state_dict(result["policy"].backbone.transformer),
          os.path.join(out, f"rank{os.environ['RANK']}.safetensors"))
