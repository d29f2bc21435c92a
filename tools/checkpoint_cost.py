"""What holding the run folder by descriptor costs: the Quickstart's checkpoint saved (and verified, as a resume does)
by this code and by another commit's checkpoints.py, interleaved in one process on this machine. Prints numbers; it
is a measurement, not a test.

    python -m tools.checkpoint_cost                     # against main, 30 saves each
    python -m tools.checkpoint_cost --baseline HEAD~3 --repeats 50

The baseline's checkpoints.py, files.py and lock.py are read with `git show` and loaded as modules of a temporary
package (their `flow_cps.files` / `flow_cps.lock` imports pointed at it); the model, collectives and exports are shared
(the baseline's `engine` collectives are today's `distributed`).
Each repetition saves one checkpoint with each code, in alternating order, into its own run folder (with pruning, as
a run does), then verifies the newest one with each code.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import train
from flow_cps import checkpoints

ROOT = Path(__file__).resolve().parent.parent
RUN = ["--iterations", "1", "--eval_every", "1", "--checkpoint_every", "1", "--eval_per_prompt", "1",
       "--prompts_per_iter", "4", "--group_size", "4", "--micro_batch", "72", "--report_to", "none"]


def baseline_module(commit: str, where: Path):
    """`commit`'s checkpoints.py, with its files.py and lock.py, as a module."""
    package = where / "baseline_cps"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("files", "lock", "checkpoints"):
        text = subprocess.run(["git", "show", f"{commit}:flow_cps/{name}.py"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout
        text = text.replace("from flow_cps import engine, export, files, lora",
                            "from flow_cps import distributed as engine, export, lora\nfrom baseline_cps import files")
        text = text.replace("from flow_cps.lock import", "from baseline_cps.lock import")
        (package / f"{name}.py").write_text(text)
    sys.path.insert(0, str(where))
    spec = importlib.util.spec_from_file_location("baseline_cps.checkpoints", package / "checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default="main", help="the commit whose checkpoints.py is the baseline")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="checkpoint-cost-") as tmp:
        tmp = Path(tmp)
        codes = {"baseline": baseline_module(args.baseline, tmp), "this": checkpoints}
        res = train.main([*RUN, "--output_dir", str(tmp / "model")])
        policy, history, config = res["policy"], res["history"], {"note": "checkpoint_cost"}
        folders = {}
        for name, code in codes.items():
            folders[name] = code.RunFolder(tmp / name, True)
            folders[name].check(resume=False)
            folders[name].start(config, fresh=True)
        saves, verifies = {n: [] for n in codes}, {n: [] for n in codes}
        for r in range(args.repeats):
            order = list(codes) if r % 2 == 0 else list(codes)[::-1]
            for name in order:
                t0 = time.perf_counter()
                folders[name].save(r + 1, policy, history, config, keep=2)
                saves[name].append(time.perf_counter() - t0)
            for name in order:
                ckpt = tmp / name / "checkpoints" / checkpoints.checkpoint_name(r + 1)
                t0 = time.perf_counter()
                problem = codes[name].verify(ckpt)
                verifies[name].append(time.perf_counter() - t0)
                assert problem is None, problem
        for f in folders.values():
            f.close()
        size = sum(q.stat().st_size for q in (tmp / "this" / "checkpoints" / checkpoints.checkpoint_name(
            args.repeats)).rglob("*") if q.is_file())
    print(f"checkpoint of the Quickstart ({size / 1024:.0f} KiB), {args.repeats} repetitions, interleaved; "
          f"baseline = {args.baseline}")
    for what, times in (("save", saves), ("verify", verifies)):
        for name, t in times.items():
            ms = [x * 1000 for x in t]
            print(f"  {what:<6} {name:<8} median {statistics.median(ms):7.1f} ms  mean {statistics.mean(ms):7.1f}  "
                  f"min {min(ms):7.1f}  max {max(ms):7.1f}  (stdev {statistics.stdev(ms):.1f})")
        diffs = [(a - b) * 1000 for a, b in zip(times["this"], times["baseline"])]
        print(f"  {what:<6} this - baseline, paired: median {statistics.median(diffs):+.1f} ms, mean "
              f"{statistics.mean(diffs):+.1f} ms (stdev of the differences {statistics.stdev(diffs):.1f})")


if __name__ == "__main__":
    main()
