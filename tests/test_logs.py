"""logs.py: the logs are the run. metrics.jsonl is strict JSON (null, never NaN) and starts fresh; after a resume it
holds exactly the checkpoint's history, and TensorBoard shows every iteration once (the events a killed run wrote
past its checkpoint are purged)."""
import json
import math

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flow_cps import logs


def test_metrics_are_strict_json_and_tensorboard_is_purged_on_resume(tmp_path):
    rows = [dict(iteration=i, reward=0.1 * i, kl=math.nan) for i in range(5)]
    first = logs.Logger(tmp_path, True, tensorboard=True)
    for r in rows:  # a run that logs iterations 0-4, then is killed after its iteration-2 checkpoint
        first.log(r)
    first.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and json.loads(text.splitlines()[1])["kl"] is None
    resumed = logs.Logger(tmp_path, True, tensorboard=True, history=rows[:3])
    assert [json.loads(x)["iteration"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    for r in rows[3:]:  # the resumed run redoes iterations 3 and 4, with other values
        resumed.log(dict(r, reward=1.0 + r["iteration"]))
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    rewards = [(e.step, round(e.value, 4)) for e in events.Scalars("reward")]
    assert rewards == [(0, 0.0), (1, 0.1), (2, 0.2), (3, 4.0), (4, 5.0)]  # each iteration once: the resumed values
    fresh = logs.Logger(tmp_path, True, tensorboard=False)  # a fresh run never appends to an earlier log
    fresh.log(dict(iteration=0, reward=0.5))
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
