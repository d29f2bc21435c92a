"""logs.py: the logs are the run, and its image grids are labelled. metrics.jsonl is strict JSON (null, never NaN)
and starts fresh; after a resume it holds exactly the checkpoint's history, and TensorBoard shows every iteration once
(the events a killed run wrote past its checkpoint are purged). --report_to wandb logs the same scalars and images as
TensorBoard (wandb's offline mode, no network), and nothing imports wandb unless it is asked for."""
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flow_cps import config, logs

ROOT = Path(__file__).resolve().parent.parent


def test_metrics_are_strict_json_and_tensorboard_is_purged_on_resume(tmp_path):
    rows = [dict(iteration=i, reward=0.1 * i, kl=math.nan) for i in range(5)]
    first = logs.Logger(tmp_path, True, "tensorboard")
    for r in rows:  # a run that logs iterations 0-4, then is killed after its iteration-2 checkpoint
        first.log(r)
    first.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and json.loads(text.splitlines()[1])["kl"] is None
    resumed = logs.Logger(tmp_path, True, "tensorboard", history=rows[:3])
    assert [json.loads(x)["iteration"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    for r in rows[3:]:  # the resumed run redoes iterations 3 and 4, with other values
        resumed.log(dict(r, reward=1.0 + r["iteration"]))
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    rewards = [(e.step, round(e.value, 4)) for e in events.Scalars("reward")]
    assert rewards == [(0, 0.0), (1, 0.1), (2, 0.2), (3, 4.0), (4, 5.0)]  # each iteration once: the resumed values
    fresh = logs.Logger(tmp_path, True, "none")  # a fresh run never appends to an earlier log
    fresh.log(dict(iteration=0, reward=0.5))
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def _log_a_run(logger: logs.Logger, images: torch.Tensor) -> None:
    for it in range(3):
        logger.log(dict(iteration=it, reward=0.5 + it, kl=math.nan if it == 1 else 0.01 * it, invalid=it))
        if it != 1:
            logger.image("eval", images[:4] * (it + 1) / 3, 2, it)
    logger.close()


def test_wandb_logs_what_tensorboard_logs(tmp_path, monkeypatch):
    """The same calls, one Logger per backend: W&B (offline) receives exactly the scalars (at the same steps) and the
    image grids that TensorBoard holds and images/ saves. A resumed W&B run starts with the checkpoint's history."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sent = []  # what reaches wandb, recorded on the way through to the real (offline) run
    real_log = wandb.Run.log
    monkeypatch.setattr(wandb.Run, "log", lambda run, data, step=None, **kw: (sent.append((step, data)),
                                                                                real_log(run, data, step=step, **kw)))
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    (tmp_path / "tb").mkdir(), (tmp_path / "wb").mkdir()
    _log_a_run(logs.Logger(tmp_path / "tb", True, "tensorboard"), images)
    _log_a_run(logs.Logger(tmp_path / "wb", True, "wandb", config=dict(preset="tiny")), images)
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tb_scalars = {(e.step, k, round(e.value, 6)) for k in events.Tags()["scalars"] for e in events.Scalars(k)}
    wb_scalars = {(s, k, round(v, 6)) for s, d in sent for k, v in d.items() if not isinstance(v, wandb.Image)}
    assert tb_scalars == wb_scalars and ("kl" in events.Tags()["scalars"]) and len(tb_scalars) == 8  # no NaN kl
    tb_images = {e.step: np.array(Image.open(io.BytesIO(e.encoded_image_string))) for e in events.Images("eval")}
    wb_images = {s: np.array(d["eval"].image) for s, d in sent if "eval" in d}
    files = {int(p.stem[-5:]): np.array(Image.open(p)) for p in (tmp_path / "wb" / "images").glob("eval_*.png")}
    assert tb_images.keys() == wb_images.keys() == files.keys() == {0, 2}
    assert all(np.array_equal(tb_images[s], wb_images[s]) and np.array_equal(files[s], wb_images[s]) for s in files)
    assert len(list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))) == 1  # a real offline run
    sent.clear()
    history = [json.loads(x) for x in (tmp_path / "wb" / "metrics.jsonl").read_text().splitlines()]
    logs.Logger(tmp_path / "wb", True, "wandb", history=history[:2]).close()
    assert [(s, d) for s, d in sent] == [(0, logs.scalars(history[0])), (1, logs.scalars(history[1]))]


def test_wandb_is_imported_only_when_asked(monkeypatch):
    code = ("import pathlib, sys, train; from flow_cps import session, logs, config; cfg = config.parse_config([]); "
            "config.validate(cfg); logs.Logger(pathlib.Path('.'), False, cfg.report_to); "
            "assert cfg.report_to == 'tensorboard' and 'wandb' not in sys.modules, 'wandb imported'")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name: None)  # wandb not installed
    with pytest.raises(SystemExit, match="--report_to wandb needs the wandb package: pip install wandb"):
        config.validate(config.parse_config(["--report_to", "wandb"]))


@pytest.mark.skipif(os.environ.get("WANDB_MODE") == "online", reason="offline only")
def test_a_run_reports_to_wandb(tmp_path, monkeypatch):
    """train.py with --report_to wandb (offline): every logged row's scalars and the run's image grids reach W&B."""
    import wandb

    import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sent = []
    real_log = wandb.Run.log
    monkeypatch.setattr(wandb.Run, "log", lambda run, data, step=None, **kw: (sent.append((step, data)),
                                                                                real_log(run, data, step=step, **kw)))
    out = tmp_path / "run"
    train.main(["--iterations", "2", "--eval_every", "2", "--eval_per_prompt", "1", "--prompts_per_iter", "2",
                "--group_size", "4", "--report_to", "wandb", "--output_dir", str(out)])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(s, d) for s, d in sent if not any(isinstance(v, wandb.Image) for v in d.values())] == \
        [(r["iteration"], logs.scalars(r)) for r in rows]
    grids = sorted((s, k) for s, d in sent for k, v in d.items() if isinstance(v, wandb.Image))
    assert grids == [(0, "eval"), (2, "eval"), (2, "train")]
    assert sorted(p.stem for p in (out / "images").glob("*.png")) == ["eval_00000", "eval_00002", "train_00002"]


def test_image_grids_label_their_rows_and_columns():
    """Each image lands in its cell, pixel for pixel, and the labels are drawn in the margins around the grid."""
    images = torch.rand(6, 3, 16, 16)
    plain = logs.image_grid(images, 2)
    labelled = logs.image_grid(images, 2, row_labels=["noise 0", "noise 1"],
                               col_labels=["a red square above a blue circle", "two", "x"])
    up, pad = 4, 1  # 16 px upscaled to min_side 64, padding up // 4
    top, left = labelled.shape[0] - plain.shape[0], labelled.shape[1] - plain.shape[1]
    assert top > 24 and left > 20  # the long column label wraps to several lines
    cell = images[4].permute(1, 2, 0).numpy().repeat(up, 0).repeat(up, 1)  # row 1, column 1
    y, x = top + pad + (16 * up + pad), left + pad + (16 * up + pad)
    np.testing.assert_array_equal(labelled[y:y + 16 * up, x:x + 16 * up], (cell * 255).round().astype(np.uint8))
    assert (labelled[:top, left:] < 128).any() and (labelled[top:, :left] < 128).any()  # ink in both margins
    assert (plain[:pad] == 255).all()
