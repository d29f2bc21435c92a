"""Run by tests/test_train.py under `torchrun --nproc_per_node=4`: the held-out evaluation's bookkeeping on 4 ranks
with 2 noises per prompt (more ranks than noises), without a model: each (noise k, prompt p) "image" is filled with
k + p / 100, so rank 0 can check that its grid holds the first prompts x the first noises, in order, gathered from
every rank, and that every rank reports the same metrics as a world of one would."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flow_cps import distributed, evaluation, scoring  # noqa: E402

N_PROMPTS, NOISES = 12, 2


def image(k: int, p: int) -> torch.Tensor:
    return torch.full((1, 4, 4), k + p / 100)


def evaluate(rank: int, world: int) -> evaluation.Evaluation:
    texts = [f"prompt {p}" for p in range(N_PROMPTS)]
    held_out = evaluation.HeldOut(texts, [None] * N_PROMPTS, scoring.RewardModel("smoothness,clean_background"),
                                  steps=1, per_prompt=NOISES, micro_batch=4, rank=rank, world=world)
    sums = held_out.sums()
    for pairs in held_out.batches():
        sums.add(pairs, torch.stack([image(k, p) for k, p in pairs]))
    return sums.result()


rank, world, _ = distributed.setup("cpu")
mine = evaluate(rank, world)
if rank == 0:
    grid = [(k, p) for k in range(NOISES) for p in range(evaluation.Evaluation.GRID)]
    assert mine.columns == evaluation.Evaluation.GRID and len(mine.images) == len(grid), len(mine.images)
    for (k, p), x in zip(grid, mine.images):
        assert torch.equal(x, image(k, p)), (k, p)
    alone = scoring.GroupedSums()  # every sample scored in one place, as a world of one sums them
    pairs = [(k, p) for k in range(NOISES) for p in range(N_PROMPTS)]
    alone.add(scoring.RewardModel("smoothness,clean_background"), torch.stack([image(k, p) for k, p in pairs]),
              [f"prompt {p}" for _, p in pairs], [None] * len(pairs))
    alone = scoring.GroupedSums.means([alone])
    assert mine.metrics.keys() == alone.keys()
    for key, value in mine.metrics.items():
        assert abs(value - alone[key]) < 1e-12, (key, value, alone[key])
else:
    assert mine.images == []
every = distributed.all_gather_objects(mine.metrics)
assert all(m == every[0] for m in every)
distributed.teardown()
print(f"rank {rank}: ok", flush=True)
