"""bench.py --quick end to end: every section runs and the report has its structure (never its timings), and a second
invocation reuses the cached training runs."""
import json

from tools import bench


def test_quick_report_structure(tmp_path):
    out = tmp_path / "bench"
    report = bench.main(["--quick", "--out", str(out), "--workers", "2"]).read_text()
    for heading in ["## 1. Sampler cost", "## 2. Speed of the default iteration", "## 3. Data-parallel efficiency",
                    "## 5. The comparison", "### 5.1 Tuning", "### 5.3 Paired differences", "### 5.4 Image size",
                    "### 5.5 The paper's Figure 1"]:
        assert heading in report
    for png in ["convergence.png", "dose_response.png", "figure1.png"]:
        assert (out / png).stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())
    assert set(res["cost"]["ratio_vs_ode"]) == {"cps", "flow_sde", "dance_sde"}
    assert 0 < res["scaling"]["this"]["efficiency"] < 1.5 and res["speed"]["this"]["samples_per_second"] > 0
    st = res["study"]
    assert st["tuned"] == {"cps": 0.7, "flow_sde": 0.7, "dance_sde": 0.7}
    # CPS's last step returns x0_hat exactly: no residual noise in its training samples; the SDEs leave some
    assert st["groups"]["cps tuned"]["residual"]["mean"] == 0.0 and st["figure1_residual"]["cps"] == 0.0
    assert st["groups"]["flow_sde tuned"]["residual"]["mean"] > 0.01 and st["figure1_residual"]["dance_sde"] > 0.01
    assert {"CPS − Flow-SDE, both at η 0.7", "Flow-SDE with CPS's log-prob − with its Gaussian (η 0.7)"} <= \
        st["comparisons"].keys()
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == st["runs"] == 8  # 3 tuning + 5 distinct report runs (tuned = 0.7 here): each trained once
    before = {p: p.stat().st_mtime for p in (out / "runs").glob("*/result.json")}
    bench.main(["--quick", "--out", str(out), "--only", "study"])
    assert {p: p.stat().st_mtime for p in (out / "runs").glob("*/result.json")} == before  # cached, not retrained
