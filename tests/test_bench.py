"""bench.py --quick end to end: every section runs and the report has its structure (never its timings)."""
import json

import bench


def test_quick_report_structure(tmp_path):
    out = tmp_path / "bench"
    report = bench.main(["--quick", "--out", str(out), "--workers", "2"]).read_text()
    for heading in ["## 1. Sampler cost", "## 2. Where an iteration goes", "## 3. Scaling",
                    "## 4. Convergence: the paper's claim", "## 5. Noise in training samples",
                    "## 6. Where the claim holds, and why"]:
        assert heading in report
    for png in ["convergence.png", "cost_and_split.png", "noise_samples_base.png"]:
        assert (out / png).stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())
    assert set(res["cost"]["ratio_vs_ode"]) == {"cps", "flow_sde", "dance_sde"}
    assert abs(sum(res["split"]["fractions"].values()) - 1) < 1e-6
    table = res["analysis"]["table"]
    assert {"cps/0.7", "flow_sde/0.7", "dance_sde/0.7"} <= table.keys()
    # CPS's last step returns x0_hat exactly: no residual noise, before or after training; the SDEs leave some
    assert table["cps/0.7"]["train_residual"] == 0.0 and res["noise_base"]["cps/0.7"]["residual"] == 0.0
    assert res["noise_base"]["flow_sde/0.7"]["residual"] > 0.01 and table["flow_sde/0.7"]["train_residual"] > 0.01
    assert "matched_noise" in res["analysis"]["factors"]
    # cached runs: a second invocation reuses them instead of retraining
    assert len(list((out / "runs").glob("*.json"))) == 4
