"""tools/runs.py: a run's record is written once, atomically, and reused only on a code version whose probe computes
the same numbers bit for bit; a study cut off by its deadline resumes with the runs still missing. train.main is
replaced by a stand-in here (the real one runs in test_bench), so these tests check the bookkeeping alone."""
import json

import pytest

from tools import runs

CALLS = []


def fake_main(argv):
    """A stand-in for train.main whose numbers depend on its argv and on a 'code' global the tests change."""
    CALLS.append(list(argv))
    seed = int(argv[argv.index("--seed") + 1])
    history = [{"iteration": 0, "eval/judge": 0.5}]
    for it in (1, 2):
        history.append({"iteration": it, "reward": seed + it * CODE["slope"], "reward_std": 0.1, "approx_kl": 0.0,
                        "eval/judge": 0.5 + it * CODE["slope"], "train/judge": 0.4, "time/rollout": 1.0})
    return {"history": history, "policy": None}


CODE = {"slope": 0.1}


def measure(policy, job):
    return {"residual": 0.0, "options": job.options["x"]}


def jobs(seeds=(1, 2)):
    return [runs.Job("digits", "g", k, ("--seed", str(k)), measure, {"x": 3}) for k in seeds]


@pytest.fixture
def fake(monkeypatch, tmp_path):
    monkeypatch.setattr(runs.train, "main", fake_main)
    CALLS.clear()
    CODE["slope"] = 0.1
    return tmp_path / "runs"


def test_a_record_keeps_what_the_report_needs(fake):
    rec = runs.run(jobs()[0], "v1", fake)
    assert rec == runs.load(fake / "digits" / "g" / "seed1.json")
    assert rec["evals"] == [{"iteration": 0, "eval/judge": 0.5}, {"iteration": 1, "eval/judge": 0.6,
                                                                  "train/judge": 0.4},
                            {"iteration": 2, "eval/judge": 0.7, "train/judge": 0.4}]
    assert rec["training"] == {"reward": [1.1, 1.2], "reward_std": [0.1, 0.1], "approx_kl": [0.0, 0.0]}
    assert rec["measured"] == {"residual": 0.0, "options": 3} and rec["code"] == "v1" and rec["argv"] == ["--seed", "1"]
    assert CALLS[0][-2:] == ["--output_dir", str(runs.scratch(fake) / "digits" / "g" / "seed1")]
    assert not list(fake.rglob(".*.tmp-*")) and len(json.dumps(rec)) < 2000  # atomic, and small


def test_records_are_reused_only_where_the_probe_says_the_numbers_are_the_same(fake, monkeypatch):
    probe = [runs.Job("digits", "probe", 0, ("--seed", "0"), measure, {"x": 0})]
    version = {"v": "v1"}
    monkeypatch.setattr(runs, "code_version", lambda *fns: version["v"])
    records, missing = runs.run_missing(jobs(), probe, (), workers=0, root=fake)
    assert missing == [] and len(CALLS) == 3  # the probe, then the two runs
    assert (fake / "probes" / "v1.json").is_file()
    version["v"] = "v2"  # a change that computes the same numbers: its probe equals v1's, the records are reused
    CALLS.clear()
    again, _ = runs.run_missing(jobs(), probe, (), workers=0, root=fake)
    assert len(CALLS) == 1 and again == records and runs.equivalent_versions("v2", fake) == {"v1", "v2"}
    version["v"], CODE["slope"] = "v3", 0.2  # a change that moves a number: every record is stale
    CALLS.clear()
    moved, _ = runs.run_missing(jobs(), probe, (), workers=0, root=fake)
    assert len(CALLS) == 3 and all(r["code"] == "v3" for r in moved.values())
    assert runs.equivalent_versions("v3", fake) == {"v3"}
    # a record for another argv (a changed design) is not reused either
    changed = [runs.Job("digits", "g", 1, ("--seed", "1", "--eta", "2"), measure, {"x": 3})]
    assert runs.reusable(changed[0], {"v3"}, fake) is None


def test_a_study_cut_off_by_its_deadline_resumes(fake, monkeypatch):
    monkeypatch.setattr(runs, "code_version", lambda *fns: "v1")
    records, missing = runs.run_missing(jobs(), [], (), workers=0, hours=0, root=fake)  # no time: nothing starts
    assert records == {} and [j.name for j in missing] == ["digits/g/seed1", "digits/g/seed2"]
    runs.run(jobs()[0], "v1", fake)  # one run finished in an earlier part
    CALLS.clear()
    records, missing = runs.run_missing(jobs(), [], (), workers=0, root=fake)
    assert missing == [] and len(CALLS) == 1 and CALLS[0][:2] == ["--seed", "2"]
    assert runs.equivalent_versions("v1", fake) == {"v1"}  # no probe: no other version is equivalent


def test_the_code_version_follows_the_training_code(tmp_path):
    modules = {p.name for p in runs.training_modules()}
    assert {"train.py", "sampling.py", "grpo.py", "rewards.py"} <= modules and "runs.py" not in modules
    assert runs.code_version() != runs.code_version(measure)  # the measuring code counts
