"""prompts.py: deterministic built-in sets with disjoint splits, GenEval metadata the rules accept, and users' files
with clear errors."""
import json
import re

import pytest

import digits
import geneval
import prompts
from rewards import ocr_target


@pytest.mark.parametrize("name", ["geneval", "ocr", "digits"])
def test_builtin_sets_are_deterministic_and_splits_disjoint(name):
    train, meta = prompts.load(name, "train", seed=0)
    assert (train, meta) == prompts.load(name, "train", seed=0)
    assert len(train) == len(meta) and all(isinstance(p, str) and p for p in train)
    test, _ = prompts.load(name, "test", seed=0)
    assert prompts.load(name, "test", seed=7)[0] == test  # the test split does not depend on the seed
    if name == "digits":
        assert train == digits.prompts("train") and test == digits.prompts("test")
        return
    assert not set(train) & set(test)
    other = prompts.load(name, "train", seed=1)[0]
    assert other != train and not set(other) & set(test)  # another seed: another draw, still disjoint from test


def test_geneval_metadata_follows_the_benchmark_format():
    texts, meta = prompts.load("geneval", "test")
    assert len(texts) > 300 and {m["tag"] for m in meta} == set(geneval.TAGS)
    for text, m in zip(texts, meta):
        assert m["prompt"] == text and text.startswith("a photo of ")
        for req in m["include"]:
            assert req["class"] in geneval.COCO_CLASSES
            assert (req["class"] if m["tag"] != "counting" else prompts.plural(req["class"])) in text
            assert req.get("color", "red") in geneval.COLORS
            assert not ("color" in req and req["class"] == "person")
        if m["tag"] == "counting":
            (inc,), (exc,) = m["include"], m["exclude"]
            assert 2 <= inc["count"] <= 4 and exc == {"class": inc["class"], "count": inc["count"] + 1}
        if m["tag"] == "position":
            rel, target = m["include"][1]["position"]
            assert rel in geneval.POSITIONS and target == 0 and f" {rel} " in text
    # no "a cat and a dog" in one split with "a dog and a cat" in the other
    pair = lambda m: frozenset(r["class"] for r in m["include"])  # noqa: E731
    train_pairs = {pair(m) for m in prompts.load("geneval", "train")[1] if m["tag"] == "two_object"}
    assert not train_pairs & {pair(m) for m in meta if m["tag"] == "two_object"}


def _perfect_detections(meta):
    """Objects that satisfy the metadata: right classes, counts and colours, laid out per the relation."""
    where = {"left of": (-60, 0), "right of": (60, 0), "above": (0, -60), "below": (0, 60)}
    objects, centres = {}, []
    for i, req in enumerate(meta["include"]):
        cx, cy = 200 + 20 * i, 200
        if "position" in req:
            dx, dy = where[req["position"][0]]
            cx, cy = centres[req["position"][1]][0] + dx, centres[req["position"][1]][1] + dy
        centres.append((cx, cy))
        objects[req["class"]] = [geneval.Detection((cx - 10 + 3 * k, cy - 10, cx + 10 + 3 * k, cy + 10), 0.95,
                                                   color=req.get("color")) for k in range(req["count"])]
    return objects


def test_every_generated_geneval_prompt_is_satisfiable():
    _, meta = prompts.load("geneval", "test")
    for m in meta:
        v = geneval.evaluate(geneval.select_objects(_perfect_detections(m), m["tag"]), m)
        assert v.correct and v.score == 1, (m, v)


def test_ocr_prompts_quote_their_target():
    texts, meta = prompts.load("ocr", "train")
    assert len(texts) == 2048 and meta == [None] * len(texts)
    for t in texts[:200]:
        target = ocr_target(t)
        assert target and 1 <= len(target.split()) <= 3 and re.fullmatch(r"[A-Za-z ]+", target)
    test_targets = {ocr_target(t).lower() for t in prompts.load("ocr", "test")[0]}
    assert not test_targets & {ocr_target(t).lower() for t in texts}


def test_plural_and_article():
    assert [prompts.plural(c) for c in ("clock", "bus", "wine glass", "person", "computer mouse", "knife", "bench",
                                        "toothbrush", "skis")] == [
        "clocks", "buses", "wine glasses", "people", "computer mice", "knives", "benches", "toothbrushes", "skis"]
    assert prompts.with_article("apple") == "an apple" and prompts.with_article("dog") == "a dog"


def test_txt_and_jsonl_files(tmp_path):
    txt = tmp_path / "mine.txt"
    txt.write_text("a cat\n\n  a dog on a sofa  \n\n")
    assert prompts.load(str(txt), "train") == (["a cat", "a dog on a sofa"], [None, None])
    jl = tmp_path / "mine.jsonl"
    rows = [{"prompt": "a photo of a dog", "tag": "single_object", "include": [{"class": "dog", "count": 1}]},
            {"prompt": 'A sign that says "HI"', "text": "HI"}]
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    texts, meta = prompts.load(str(jl), "test")
    assert texts == ["a photo of a dog", 'A sign that says "HI"'] and meta == rows


def test_folder_in_flow_grpo_layout(tmp_path):
    (tmp_path / "train.txt").write_text("one\ntwo\n")
    (tmp_path / "test_metadata.jsonl").write_text(json.dumps({"prompt": "three", "tag": "x"}) + "\n")
    assert prompts.load(str(tmp_path), "train")[0] == ["one", "two"]
    assert prompts.load(str(tmp_path), "test") == (["three"], [{"prompt": "three", "tag": "x"}])
    (tmp_path / "train.txt").unlink()
    with pytest.raises(ValueError, match="train.txt"):
        prompts.load(str(tmp_path), "train")


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "ok"}\n{"prompt": "broken",\n', r"bad\.jsonl:2: not valid JSON"),
    ('{"prompt": "ok"}\n\n["a list"]\n', r"bad\.jsonl:3: expected a JSON object .* got list"),
    ('{"text": "no prompt"}\n', r"bad\.jsonl:1: missing or empty 'prompt' .* \['text'\]"),
    ('{"prompt": "   "}\n', r"bad\.jsonl:1: missing or empty 'prompt'"),
    ('\n\n', r"bad\.jsonl: no prompts"),
])
def test_malformed_jsonl_names_file_line_and_problem(tmp_path, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(ValueError, match=message):
        prompts.load(str(bad), "train")


def test_unknown_names_extensions_and_splits(tmp_path):
    with pytest.raises(ValueError, match="not one of digits, geneval, ocr"):
        prompts.load("pickapic", "train")
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"\.txt .* or \.jsonl"):
        prompts.load(str(tmp_path / "p.csv"), "train")
    with pytest.raises(ValueError, match="split"):
        prompts.load("ocr", "validation")
