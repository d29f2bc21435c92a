"""bench.py's results as results/report.md: every table with the seeds it rests on, its 95% interval and, for each
difference, the smallest one the design could detect."""
from __future__ import annotations

import math
from pathlib import Path

NAMES = {"cps": "CPS", "flow_sde": "Flow-SDE", "dance_sde": "Dance-SDE"}


def f(x, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return "never" if isinstance(x, float) and math.isinf(x) else f"{x:.{nd}f}"


def ci(s: dict, nd: int = 3) -> str:
    """mean [lo, hi] (n), or what reached it."""
    if not s["n"]:
        return "never" if s["of"] else "–"
    text = f"{f(s['mean'], nd)} [{f(s['lo'], nd)}, {f(s['hi'], nd)}]"
    return text + (f" ({s['n']} of {s['of']} reached)" if s["n"] < s["of"] else "")


def diff(d: dict) -> str:
    verdict = "**detected**" if d["detected"] else "no detectable difference"
    return (f"{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] | {f(d['p'])} | {f(d['mdd'], 4)} | {verdict} | "
            + ", ".join(f"{x:+.3f}" for x in d["diffs"]))


def write(res: dict, out: Path) -> Path:
    """res as results.json holds it (JSON keys are strings)."""
    quick = res["quick"]
    L = [f"# Flow-CPS benchmark report{' (quick mode: smoke-test budgets, not results)' if quick else ''}", "",
         f"Machine: {res['machine']}. Command: `python -m tools.bench{' --quick' if quick else ''}`; this invocation "
         f"took "
         f"{res['wall'] / 60:.1f} min" + (f", its {res['study']['runs']} training runs "
                                          f"{res['study']['process_minutes']:.0f} process-minutes (cached in runs/)"
                                          if "study" in res else "") + ".", ""]
    if "cost" in res:
        c = res["cost"]
        L += ["## 1. Sampler cost", "", f"Rollout of {c['batch']} samples × 10 steps; ratio to the ODE's rollout over "
              "interleaved repeats.", "", "| sampler | ratio vs ODE (min / median / max) | sampler arithmetic per step "
              "(µs) |", "|---|---|---|"]
        L += [f"| {NAMES[s]} | {r['min']:.3f} / {r['median']:.3f} / {r['max']:.3f} | {c['step_math_us'][s]:.0f} |"
              for s, r in c["ratio_vs_ode"].items()] + [f"| ODE | 1 | {c['step_math_us']['ode']:.0f} |", ""]
    ref = f"baseline `{res['baseline_ref']}`" if res.get("baseline_ref") else ""
    name = {"this": "this commit", "baseline": ref}
    if "speed" in res:
        s = res["speed"]
        L += ["## 2. Speed of the default iteration", "", "64 samples, 10 steps, 9 trained, one process, 2 threads "
              "(`python train.py`), steady-state iterations without evaluation, each code tree run as a fresh process, "
              "interleaved.", "", "| code | seconds per iteration (min / median / max) | samples / s |",
              "|---|---|---|"]
        for k in ("baseline", "this"):
            if k in s:
                r = s[k]["seconds_per_iteration"]
                L.append(f"| {name[k]} | {r['min']:.3f} / {r['median']:.3f} / {r['max']:.3f} | "
                         f"{s[k]['samples_per_second']:.1f} |")
        if "speedup" in s:
            L += ["", f"Speed-up: **{s['speedup']:.2f}×** samples per second."]
        total = sum(s["split"].values())
        L += ["", "Where this commit's iteration goes (median seconds): " + ", ".join(
            f"{p} {v:.3f} ({100 * v / total:.0f}%)" for p, v in s["split"].items()) + ".", ""]
    if "scaling" in res:
        L += ["## 3. Data-parallel efficiency", "", "`torchrun`, 32 samples per process per iteration (each code's "
              "default micro-batch), steady state, no evaluation.", "",
              "| code | 1 × 1 images/s | 2 × 1 images/s | 1 × 2 images/s | efficiency of 2 processes |",
              "|---|---|---|---|---|"]
        for k in ("baseline", "this"):
            if k in res["scaling"]:
                sc = res["scaling"][k]
                L.append(f"| {name[k]} | " + " | ".join(f"{sc[c]['images_per_second']:.1f}" for c in ("1x1", "2x1",
                                                                                                    "1x2"))
                         + f" | **{sc['efficiency']:.2f}** |")
        L += ["", "Efficiency = images/s of 2 processes × 1 thread over 2 × that of 1 process × 1 thread.", ""]
    if "main_job" in res:
        L += ["## 4. The Quickstart", "", "`torchrun --standalone --nproc_per_node=2 train.py` in a fresh folder.", "",
              "| code | cache | wall time | held-out accuracy, base → trained | first_ratio_max_dev |",
              "|---|---|---|---|---|"]
        for k in ("baseline", "this"):
            m = res["main_job"].get(k)
            L += [f"| {name[k]} | {c} | {m[c]['wall']:.0f} s | {m[c]['base']:.3f} → {m[c]['trained']:.3f} | "
                  f"{m[c]['first_ratio_max_dev']} |" for c in ("cold", "warm")] if m else []
        L.append("")
    if "study" in res:
        L += study_section(res["study"], res["budget"])
    path = out / "report.md"
    path.write_text("\n".join(L) + "\n")
    return path


def study_section(st: dict, b: dict) -> list[str]:
    budgets = b["budgets"]
    L = ["## 5. The comparison", "",
         f"Built-in digits task, {b['run']['iterations']} GRPO iterations of 64 samples, one process and thread per "
         f"run. "
         f"Held-out metric: judge accuracy of deterministic ODE samples (EMA weights) of the 10 held-out prompts × "
         f"{b['run']['eval_per_prompt']} fixed noises = {10 * b['run']['eval_per_prompt']} images. **Tuning seeds "
         f"{b['tuning_seeds']}** chose each sampler's η (largest mean area under the held-out curve, AUC); **report "
         f"seeds {b['report_seeds']}** (n = {len(b['report_seeds'])}) measured everything below and chose nothing. "
         f"Intervals are 95% t-intervals over report seeds; differences are paired by seed; 'MDD' is the smallest "
         f"difference this design detects (two-sided 5%, power 80%, the observed spread). Base model accuracy "
         f"{f(st['base'])}.", "", "### 5.1 Tuning (tuning seeds only)", "", "| sampler | η | AUC, mean [95% CI] |",
         "|---|---|---|"]
    for key, s in st["tuning"].items():
        sampler, eta = key.split("/")
        chosen = " ← chosen" if float(eta) == st["tuned"][sampler] else ""
        L.append(f"| {NAMES[sampler]} | {eta} | {ci(s)}{chosen} |")
    L += ["", "### 5.2 Convergence on the report seeds", "",
          "| run | " + " | ".join(f"accuracy @{k}" for k in budgets) + " | AUC | " +
          " | ".join(f"iterations to {t}" for t in b["thresholds"]) + " | residual noise of final training samples |",
          "|---" * (4 + len(budgets) + len(b["thresholds"]) - 1) + "|"]
    for label, g in st["groups"].items():
        if "@" in label:
            continue
        L.append(f"| {label} | " + " | ".join(ci(g["acc"][str(k)]) for k in budgets) + f" | {ci(g['auc'])} | " +
                 " | ".join(ci(g["reach"][str(t)], 1) for t in b["thresholds"]) + f" | {ci(g['residual'], 4)} |")
    L += ["", "![convergence](convergence.png)", "", "### 5.3 Paired differences (report seeds)", "",
          "| comparison | measure | difference [95% CI] | p | MDD | verdict | per seed |",
          "|---|---|---|---|---|---|---|"]
    for name, cmp in st["comparisons"].items():
        for measure, d in cmp.items():
            L.append(f"| {name} | {measure} | {diff(d)} |")
    L += ["", "### 5.4 Image size: CPS − Flow-SDE against the number of image tokens", "",
          "| size | tokens | η | AUC difference [95% CI] | p | MDD | verdict | per seed | final accuracy difference "
          "| residual noise CPS / Flow-SDE | minutes per run |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in st["dose"]:
        res_c, res_f = (v["mean"] for v in r["residual"].values())
        tag = "" if r["size"] == 8 else f" @{r['size']}"
        wall = st["groups"][("cps tuned" if r["kind"] == "tuned" else "cps 0.7") + tag]["wall"] / 60
        L.append(f"| {r['size']}×{r['size']} | {r['tokens']} | {'tuned' if r['kind'] == 'tuned' else '0.7'} | "
                 f"{diff(r['auc'])} | {r['final']['diff']:+.4f} [{r['final']['lo']:+.4f}, {r['final']['hi']:+.4f}] | "
                 f"{f(res_c, 4)} / {f(res_f, 4)} | {wall:.1f} |")
    skipped = [s for s in b["sizes"] if s not in b.get("equal_sizes", b["sizes"])]
    if skipped:
        L += ["", "The equal-η pair (η 0.7) ran at " + ", ".join(f"{s}×{s}" for s in b["equal_sizes"]) + "; at " +
              ", ".join(f"{s}×{s}" for s in skipped) + " only the tuned pair, to fit the CPU budget (minutes per run "
              "in the table)."]
    L += ["", "![dose-response](dose_response.png)", "", "### 5.5 The paper's Figure 1, from a trained model", "",
          "Final training samples of the CPS-trained model (first report seed, largest size), the same prompts and "
          "initial noises, drawn with each sampler at its tuned η. Residual noise std(final − last x0_hat): " +
          ", ".join(f"{k} {v:.4f}" for k, v in st["figure1_residual"].items()) + ".", "",
          "![figure 1](figure1.png)", ""]
    return L
