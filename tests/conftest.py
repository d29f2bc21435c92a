"""Shared test set-up: offline Hugging Face, few threads, and the hypothesis profiles.

`pytest` (see pyproject.toml) runs with `--hypothesis-profile=ci`: derandomized, so every CI run draws the same
examples. `pytest --hypothesis-profile=dev` draws fresh random examples for local exploration.
"""

import os
import tempfile

# huggingface_hub reads this at import time: nothing in the tests may touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The built-in digits model and judge are pre-trained once (~20 s) into this cache and shared by all tests and the
# subprocesses they start; a developer's own FLOW_CPS_CACHE is respected.
os.environ.setdefault("FLOW_CPS_CACHE", os.path.join(tempfile.gettempdir(), "flow_cps_test_cache"))
# The shapes model of the study pre-trains for many minutes (flow_cps/shapes.py, PRETRAIN_STEPS); the tests need its
# code path, not its quality: a short pre-training, cached under its own key (the step count is part of it), which the
# subprocesses the tests start inherit.
os.environ.setdefault("FLOW_CPS_SHAPES_STEPS", "200")

import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=300)
