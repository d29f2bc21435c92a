"""prompts.py: deterministic built-in sets with disjoint splits, GenEval metadata the rules accept, and users' files
with clear errors."""
import json
import re
import tracemalloc

import pytest

from flow_cps import digits, geneval, prompts
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
        assert geneval.metadata_problem(m) is None  # what a GenEval-format .jsonl is checked against
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
    assert prompts.load(str(txt), "all") == (["a cat", "a dog on a sofa"], [None, None])
    assert prompts.load_file(txt) == (["a cat", "a dog on a sofa"], [None, None])
    jl = tmp_path / "mine.jsonl"
    rows = [{"prompt": "a photo of a dog", "tag": "single_object", "include": [{"class": "dog", "count": 1}]},
            {"prompt": 'A sign that says "HI"', "text": "HI"}]
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    texts, meta = prompts.load(str(jl), "all")
    assert texts == ["a photo of a dog", 'A sign that says "HI"'] and meta == rows


PROMPTS_20 = [f"a photo of {n} {thing}" for n in ("one", "two", "three", "four")
              for thing in ("cats", "dogs", "red apples", "blue cars", "old clocks")]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_single_file_is_split_by_prompt_hash(tmp_path, suffix):
    path = tmp_path / f"mine{suffix}"
    lines = PROMPTS_20 + PROMPTS_20[:3]  # repeated prompts stay on one side
    path.write_text("\n".join(json.dumps({"prompt": p, "i": i}) if suffix == ".jsonl" else p
                               for i, p in enumerate(lines)) + "\n")
    train, train_meta = prompts.load(str(path), "train")
    test, test_meta = prompts.load(str(path), "test")
    assert train and test and not set(train) & set(test)  # held out: no prompt on both sides
    assert sorted(train + test) == sorted(lines) and len(test) == sum(map(prompts._is_test, lines))
    assert {p for p in PROMPTS_20 if prompts._is_test(p)} == set(test)  # the generators' crc32 rule, on the text
    for seed in (0, 1, 7):  # the same split on every call and seed, in file order
        assert prompts.load(str(path), "train", seed) == (train, train_meta)
        assert prompts.load(str(path), "test", seed) == (test, test_meta)
    assert [p for p in lines if p in set(train)] == train
    if suffix == ".jsonl":
        assert [m["prompt"] for m in test_meta] == test  # metadata travels with its prompt
    assert prompts.split_sizes(str(path)) == (len(train), len(test))


def test_a_tiny_file_has_no_test_split(tmp_path):
    path = tmp_path / "three.txt"
    path.write_text("a red cat\ntwo dogs on a sofa\na sign that says OPEN\n")  # all three hash to train
    assert prompts.split_sizes(str(path)) == (3, 0)
    assert prompts.load(str(path), "train")[0] == ["a red cat", "two dogs on a sofa", "a sign that says OPEN"]
    with pytest.raises(ValueError, match=r"three\.txt: the 'test' split of this file is empty.* 3 prompt\(s\) give 3 "
                                         r"train / 0 test\. Give more prompts, a folder with train\.txt and test\.txt"
                                         r".*explicit evaluation file \(--eval_prompts FILE\)"):
        prompts.load(str(path), "test")
    assert prompts.load(str(path), "all")[0] == prompts.load(str(path), "train")[0]  # usable as an eval file


def test_folder_and_generator_splits_are_not_all(tmp_path):
    (tmp_path / "train.txt").write_text("one\n")
    for name in (str(tmp_path), "ocr"):
        with pytest.raises(ValueError, match="'all' is for a single prompt file"):
            prompts.load(name, "all")
    assert prompts.split_sizes("digits") == (40, 10)


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


@pytest.mark.parametrize("clause, message", [
    ({"include": [{"class": "clock", "count": 0}]}, r"include\[0\]: 'count' must be a whole number >= 1 \(got 0\)"),
    ({"include": [{"class": "clock", "count": "2"}]}, r"include\[0\]: 'count' must be a whole number"),
    ({"include": [{"class": "unicorn", "count": 1}]}, r"include\[0\]: 'class' must be one of GenEval's 80 COCO"),
    ({"include": [{"class": "cat", "count": 1, "color": "teal"}]}, r"include\[0\]: 'color' must be one of red, orange"),
    ({"include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 1]}]},
     r"include\[1\]: 'position' must be \[one of left of, right of, above, below, an earlier include's index\]"),
    ({"include": [], "exclude": []}, r"'include' / 'exclude' must be lists of clauses, at least one clause"),
    ({"include": {"class": "cat"}}, r"'include' / 'exclude' must be lists of clauses"),
    ({"tag": ["counting"], "include": [{"class": "clock", "count": 2}]}, r"'tag' must be one of single_object"),
])
def test_geneval_jsonl_metadata_is_checked_when_loaded(tmp_path, clause, message):
    """A clause that would break the rules at scoring time (count 0 divides by zero in every sample's score) stops
    the load, naming file, line and clause."""
    f = tmp_path / "geneval.jsonl"
    good = {"prompt": "a photo of a cat", "tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    f.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "bad", "tag": "counting", **clause}) + "\n")
    with pytest.raises(ValueError, match=r"geneval\.jsonl:2: GenEval metadata: " + message):
        prompts.load_file(f)


def test_unknown_names_extensions_and_splits(tmp_path):
    with pytest.raises(ValueError, match="not one of digits, geneval, ocr"):
        prompts.load("pickapic", "train")
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"\.txt .* or \.jsonl"):
        prompts.load(str(tmp_path / "p.csv"), "train")
    with pytest.raises(ValueError, match="split"):
        prompts.load("ocr", "validation")


def test_a_tag_or_text_that_is_not_a_string_stops_the_load(tmp_path):
    """A list-valued tag crashed the first evaluation (the tag is a dictionary key when metrics are grouped), after
    the model loaded and config.json was written: it is refused when the file is read, naming file and line."""
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"prompt": "a cat", "tag": "animals"}) + "\n" + json.dumps({"prompt": "a sign",
                                                                                       "tag": ["signs"]}) + "\n")
    with pytest.raises(ValueError, match=r"mine\.jsonl:2: 'tag' must be a non-empty string \(got \['signs'\]\)"):
        prompts.load_file(f)
    f.write_text(json.dumps({"prompt": "a sign", "text": {"word": "OPEN"}}) + "\n")
    with pytest.raises(ValueError, match=r"mine\.jsonl:1: 'text' must be a non-empty string"):
        prompts.load_file(f)


@pytest.mark.parametrize("suffix, line", [(".txt", b"a\n"), (".jsonl", b'{"prompt":"a","x":[]}\n')])
def test_a_prompt_file_is_read_in_bounded_memory(tmp_path, monkeypatch, suffix, line):
    """Short lines grow ~25x as Python objects: a file far under the byte cap took far more memory than its size.
    With the memory cap set to 4 MiB, a 2 MiB file of the shortest prompts stops at the cap."""
    monkeypatch.setattr(prompts, "MAX_PROMPT_MEMORY", 4 * 2 ** 20, raising=False)  # (absent before the cap)
    f = tmp_path / f"many{suffix}"
    f.write_bytes(line * (2 * 2 ** 20 // len(line)))
    tracemalloc.start()
    with pytest.raises(ValueError, match=r"take more than 4 MiB of memory"):
        prompts.load_file(f)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2 ** 20, f"{peak / 2 ** 20:.0f} MiB"
    f.write_bytes(b"x" * (prompts.MAX_LINE_BYTES + 1) + b"\n")  # one giant line is refused before it is parsed
    with pytest.raises(ValueError, match=r"many.*:1: a line longer than 64 KiB"):
        prompts.load_file(f)
