"""Prompt sets: the paper's tasks as deterministic generators with train/test splits, and users' own prompt files.

    from flow_cps import prompts
    texts, metadata = prompts.load("geneval", "train", seed=0)   # GenEval-style prompts + their GenEval metadata
    texts, metadata = prompts.load("ocr", "test")                 # 'A sign that says "OPEN LATE"', ...; metadata None
    texts, metadata = prompts.load("digits", "train")             # the built-in task (digits.prompts)
    texts, metadata = prompts.load("shapes", "test")              # the shapes task: held-out compositions
    texts, metadata = prompts.load("shapes", "fresh")             # the shapes task: fresh prompts, trained compositions
    texts, metadata = prompts.load("my_prompts.txt", "train")     # the file's train part (see below)
    texts, metadata = prompts.load("my_eval.txt", "all")          # every prompt of a file (an explicit eval set)
    texts, metadata = prompts.load("flow_grpo/dataset/geneval", "test")   # a folder with test_metadata.jsonl, ...
    n_train, n_test = prompts.split_sizes("my_prompts.txt")

`metadata[i]` is None or a dict that rewards receive alongside the prompt (GenEval's tag/include/exclude; OCR's
optional "text" overriding the quoted span). Splits:
  * train and test never share an item: membership is a fixed hash of the item's content (the class pair for
    "a cat and a dog" and "a dog and a cat" alike, the target text for OCR), independent of the seed;
  * a single .txt/.jsonl file is split the same way, by a crc32 of each prompt's text: about one prompt in 4 is
    held out for "test", the same ones on every call and seed, and a prompt repeated in the file stays on one side.
    A file too small to leave both sides non-empty (1-3 prompts, typically) raises ValueError for the empty side:
    give more prompts, a folder with train/test files, or evaluate on an explicit file (`load(path, "all")`);
  * a folder with {split}.txt / {split}.jsonl / {split}_metadata.jsonl is used as its files say;
  * the test split is the same for every seed, so evaluations compare across runs; `seed` draws and orders the
    training split of the generators (a file keeps its order).
The GenEval generator follows the benchmark's templates (six tags, COCO's 80 classes, counts 2-4, ten colours,
four relations; no "[colour] person" prompts), but draws its own prompts: its test split is GenEval-like, not
GenEval's 553 prompts. For the paper's exact sets, point `load` at Flow-GRPO's dataset folders or GenEval's
evaluation_metadata.jsonl. The OCR prompts are this project's own word list and templates.
"""
from __future__ import annotations

import json
import random
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

from flow_cps import digits, scenes
from flow_cps.geneval import COCO_CLASSES, COLORS, POSITIONS, metadata_problem

SPLITS = ("train", "test")
MAX_FILE_BYTES = 256 * 2 ** 20  # a prompt file is read on every rank; the paper's sets are a few MiB
MAX_LINE_BYTES = 64 * 2 ** 10  # one prompt and its metadata (GenEval's lines are ~200 bytes)
MAX_PROMPT_MEMORY = 512 * 2 ** 20  # the kept prompts and metadata as Python objects, per load (the paper's: ~50 MiB)
TEST_FRACTION = 4  # one item in 4 (by content hash) belongs to the test split


def _is_test(key: str) -> bool:
    return zlib.crc32(key.encode()) % TEST_FRACTION == 0  # crc32, not hash(): stable across processes and versions


def _draw(split: str, seed: int, name: str, n: int,
          candidate: Callable[[random.Random], tuple[str, dict]]) -> list[dict]:
    """Up to n distinct items of `split`, drawn by rejection from `candidate(rng) -> (content key, item)`."""
    rng = random.Random(f"{name}/{split}/{seed if split == 'train' else 0}")  # str seeds hash with sha512: stable
    items: dict[str, dict] = {}
    for _ in range(50 * n + 2000):  # enough draws to exhaust the small pools (80 single objects), bounded
        if len(items) >= n:
            break
        key, item = candidate(rng)
        if key not in items and _is_test(key) == (split == "test"):
            items[key] = item
    return list(items.values())


# -- GenEval-style prompts ----------------------------------------------------------------------------------------
_NUMBERS = {2: "two", 3: "three", 4: "four"}
_IRREGULAR = {"person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep", "skis": "skis",
              "scissors": "scissors"}


def with_article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def plural(noun: str) -> str:
    head, _, last = noun.rpartition(" ")
    if last in _IRREGULAR:
        last = _IRREGULAR[last]
    elif last.endswith(("s", "sh", "ch", "x")):
        last += "es"
    else:
        last += "s"
    return f"{head} {last}".strip()


def _geneval_candidates() -> dict[str, Callable[[random.Random], tuple[str, dict]]]:
    C = COCO_CLASSES
    colourable = [c for c in C if c != "person"]  # the benchmark has no "[colour] person" prompts
    inverse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

    def single(rng):
        c = rng.choice(C)
        return c, dict(tag="single_object", include=[{"class": c, "count": 1}], prompt=f"a photo of {with_article(c)}")

    def two(rng):
        a, b = rng.sample(C, 2)
        return "+".join(sorted((a, b))), dict(tag="two_object", include=[{"class": a, "count": 1}, {"class": b,
                                              "count": 1}], prompt=f"a photo of {with_article(a)} and "
                                              f"{with_article(b)}")

    def counting(rng):
        c, n = rng.choice(C), rng.randint(2, 4)
        return f"{c}#{n}", dict(tag="counting", include=[{"class": c, "count": n}],
                                exclude=[{"class": c, "count": n + 1}], prompt=f"a photo of {_NUMBERS[n]} {plural(c)}")

    def colors(rng):
        c, col = rng.choice(colourable), rng.choice(COLORS)
        return f"{col} {c}", dict(tag="colors", include=[{"class": c, "count": 1, "color": col}],
                                  prompt=f"a photo of {with_article(col)} {c}")

    def position(rng):
        a, b = rng.sample(C, 2)
        rel = rng.choice(POSITIONS)
        key = f"{a} {rel} {b}" if a < b else f"{b} {inverse[rel]} {a}"  # "A left of B" is "B right of A"
        return key, dict(tag="position", include=[{"class": b, "count": 1},
                                                  {"class": a, "count": 1, "position": [rel, 0]}],
                         prompt=f"a photo of {with_article(a)} {rel} {with_article(b)}")

    def color_attr(rng):
        (a, b), (ca, cb) = rng.sample(colourable, 2), rng.sample(COLORS, 2)
        return "+".join(sorted((f"{ca} {a}", f"{cb} {b}"))), dict(
            tag="color_attr", include=[{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
            prompt=f"a photo of {with_article(ca)} {a} and {with_article(cb)} {b}")

    return dict(single_object=single, two_object=two, counting=counting, colors=colors, position=position,
                color_attr=color_attr)


def geneval(split: str = "train", seed: int = 0, per_tag: int | None = None) -> tuple[list[str], list[dict]]:
    """GenEval-style prompts and metadata: per tag, `per_tag` items (default 500 train, 100 test), fewer where the
    split's pool is smaller (single_object: ~20 test / ~60 train classes; counting: ~60 / ~180)."""
    _check_split(split)
    n = per_tag or (500 if split == "train" else 100)
    items = []
    for tag, cand in _geneval_candidates().items():
        items += _draw(split, seed, f"geneval/{tag}", n, cand)
    if split == "train":
        random.Random(f"geneval/shuffle/{seed}").shuffle(items)  # mix the tags within a training epoch
    return [it["prompt"] for it in items], items


# -- OCR (visual text rendering) prompts -------------------------------------------------------------------------
# Written for this project: everyday sign and label words, 3-9 letters, no proper nouns.
OCR_WORDS = """open late fresh bread coffee bakery sale exit hello world garden hotel pizza market school library
danger stop welcome home summer winter river mountain city night morning star moon ocean forest dream party tickets
flowers candy pharmacy taxi parking robot galaxy pixel flow noise signal orbit lemon apple honey cookie pasta
noodle sushi tacos burger salad juice water soda milk cheese butter jazz blues rock dance cinema theater museum
gallery studio office bank post station airport harbor bridge tunnel castle tower island beach desert valley canyon
winner champion hero legend magic wonder quiet silence thunder storm rain snow sunny cloudy breeze spring autumn
today tomorrow always never maybe happy lucky brave kind gentle wild free slow fast north south east west push pull
enter closed repair paint glass wood stone paper""".split()
OCR_TEMPLATES = [
    'A sign that says "{t}"', 'A neon sign that reads "{t}"', 'A storefront with the words "{t}" above the door',
    'A chalkboard with "{t}" written on it', 'A t-shirt printed with the text "{t}"', 'A coffee mug with "{t}" on it',
    'A book cover titled "{t}"', 'A street banner reading "{t}"', 'A birthday cake decorated with the words "{t}"',
    'A vintage poster with the title "{t}"', 'A wooden sign carved with "{t}"', 'A road sign that says "{t}"',
    'A handwritten note that says "{t}"', 'A billboard displaying "{t}"', 'A glowing arcade screen showing "{t}"',
    'A paper bag stamped with "{t}"',
]


def ocr(split: str = "train", seed: int = 0, n: int | None = None) -> tuple[list[str], list[None]]:
    """Prompts with one to three quoted words to render (default 2048 train, 256 test); metadata None (the OCR
    reward reads the target from the quotes). Split by target text, so test words-combinations are never trained."""
    _check_split(split)
    n = n or (2048 if split == "train" else 256)

    def candidate(rng):
        words = rng.sample(OCR_WORDS, rng.choice((1, 1, 2, 2, 2, 3)))
        text = " ".join(words)
        text = text.upper() if rng.random() < 0.7 else text.title()
        return " ".join(words), {"prompt": rng.choice(OCR_TEMPLATES).format(t=text)}

    items = _draw(split, seed, "ocr", n, candidate)
    return [it["prompt"] for it in items], [None] * len(items)


def digit_prompts(split: str = "train", seed: int = 0) -> tuple[list[str], list[None]]:
    """The built-in digits task (digits.prompts): 40 training phrasings, 10 held-out evaluation prompts."""
    _check_split(split)
    texts = digits.prompts(split)
    return texts, [None] * len(texts)


def shape_prompts(split: str = "train", seed: int = 0, per_tag: int = 8) -> tuple[list[str], list[dict]]:
    """The shapes task (scenes.py), metadata {"tag": ...}. Train: every scene without a held-out composition or a
    fresh prompt, each tag's list repeated to the length of the longest, so the four tags are drawn equally often.
    Test: `per_tag` scenes of each tag that has held-out ones (counting, two-object, position: 24 prompts), each
    holding a composition never trained on; the same for every seed. Fresh: every fresh prompt (scenes.fresh_scenes:
    20 prompts of trained compositions that neither this train list nor the pre-training ever held)."""
    _check_split(split, (*SPLITS, "fresh"))
    by_tag = scenes.scenes(split)
    if split == "fresh":
        chosen = [s for tag in scenes.TAGS for s in by_tag[tag]]
        return [scenes.text(s) for s in chosen], [{"tag": s.tag} for s in chosen]
    if split == "test":
        rng = random.Random("shapes/test")
        chosen = [s for tag in scenes.TAGS for s in rng.sample(by_tag[tag], min(per_tag, len(by_tag[tag])))]
    else:
        longest = max(map(len, by_tag.values()))
        chosen = [ss[k % len(ss)] for ss in by_tag.values() for k in range(longest)]
    return [scenes.text(s) for s in chosen], [{"tag": s.tag} for s in chosen]


GENERATORS = {"digits": digit_prompts, "geneval": geneval, "ocr": ocr, "shapes": shape_prompts}


# -- users' own files ----------------------------------------------------------------------------------------------
def load_file(path, split: str = "all") -> tuple[list[str], list[dict | None]]:
    """The prompts of a file: .txt (one prompt per line; blank lines skipped; metadata None) or .jsonl (one JSON
    object per line with a non-empty string "prompt"; the whole object is that prompt's metadata, as in GenEval's
    format). `split` "train" or "test" keeps only that split's prompts (`_is_test`), "all" every one.

    Read line by line in bounded memory: a line is at most MAX_LINE_BYTES, and the kept prompts and their metadata at
    most MAX_PROMPT_MEMORY bytes as Python objects (a file of short lines grows ~25x in memory: the byte cap alone
    did not bound it). An empty split raises ValueError naming the counts."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"{path}: prompt files are .txt (one prompt per line) or .jsonl (one JSON object with a "
                         f"'prompt' field per line); got {path.suffix or 'no extension'!r}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"{path} is {path.stat().st_size / 2 ** 20:.0f} MiB; prompt files are read whole on every "
                         f"rank and capped at {MAX_FILE_BYTES // 2 ** 20} MiB: give a file of the prompts to train on")
    texts: list[str] = []
    metadata: list[dict | None] = []
    used, counts = 0, [0, 0]  # bytes of the kept prompts; prompts seen in (train, test)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
            if len(raw) > MAX_LINE_BYTES:
                raise ValueError(f"{path}:{lineno}: a line longer than {MAX_LINE_BYTES // 1024} KiB; a prompt and its "
                                 "metadata fit on a short line: is this a prompt file?")
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line:
                continue
            text, meta = (line, None) if path.suffix == ".txt" else _jsonl_item(path, lineno, line)
            test = _is_test(text)
            counts[test] += 1
            if split != "all" and test != (split == "test"):
                continue
            used += _bytes(text) + _bytes(meta) + 16  # + the two list slots
            if used > MAX_PROMPT_MEMORY:
                raise ValueError(f"{path}:{lineno}: the prompts up to this line take more than "
                                 f"{MAX_PROMPT_MEMORY // 2 ** 20} MiB of memory on every rank; give a file of the "
                                 "prompts to train on (or a folder with train and test files)")
            texts.append(text)
            metadata.append(meta)
    if not sum(counts):
        raise ValueError(f"{path}: no prompts (the file is empty or only blank lines)")
    if not texts:
        raise ValueError(f"{path}: the {split!r} split of this file is empty: a single prompt file is split by a hash "
                         f"of each prompt (about 1 in {TEST_FRACTION} goes to 'test'), and its {sum(counts)} prompt(s) "
                         f"give {counts[0]} train / {counts[1]} test. Give more prompts, a folder with "
                         f"train.txt and test.txt (or train/test .jsonl), or an explicit evaluation file "
                         f"(--eval_prompts FILE).")
    return texts, metadata


def _jsonl_item(path: Path, lineno: int, line: str) -> tuple[str, dict]:
    """(prompt, metadata) of one .jsonl line, its metadata checked (GenEval's clauses, the tag, OCR's text)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}): {line[:80]!r}") from None
    except RecursionError:
        raise ValueError(f"{path}:{lineno}: JSON nested too deeply: {line[:80]!r}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'prompt' field, got "
                         f"{type(obj).__name__}: {line[:80]!r}")
    if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        raise ValueError(f"{path}:{lineno}: missing or empty 'prompt' (a non-empty string); keys present: "
                         f"{sorted(obj)}")
    problem = metadata_problem(obj) if "include" in obj or "exclude" in obj else None
    if problem:
        raise ValueError(f"{path}:{lineno}: GenEval metadata: {problem}")
    for key in ("tag", "text"):  # a reward groups by the tag, OCR reads the text: a list there failed mid-run
        if key in obj and (not isinstance(obj[key], str) or not obj[key].strip()):
            raise ValueError(f"{path}:{lineno}: '{key}' must be a non-empty string (got {obj[key]!r})")
    return obj["prompt"].strip(), obj


def _bytes(obj) -> int:
    """The memory a parsed JSON value holds (sys.getsizeof, recursively)."""
    if isinstance(obj, dict):
        return sys.getsizeof(obj) + sum(_bytes(k) + _bytes(v) for k, v in obj.items())
    if isinstance(obj, list):
        return sys.getsizeof(obj) + sum(map(_bytes, obj))
    return sys.getsizeof(obj)


def split_file(path, split: str) -> tuple[list[str], list[dict | None]]:
    """The `split` part of a single prompt file: "test" holds the prompts whose text hashes into the test split
    (`_is_test`, about one in 4), "train" the others, "all" every prompt. An empty part raises ValueError."""
    return load_file(path, split)


def _check_split(split: str, allowed=SPLITS) -> None:
    if split not in allowed:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(allowed)}" +
                         ("" if "all" in allowed else " ('all' is for a single prompt file)"))


def load(name_or_path: str, split: str, seed: int = 0) -> tuple[list[str], list[dict | None]]:
    """Prompts and per-prompt metadata (None or dict) of a built-in set or a user's file or folder.

    name_or_path: "digits", "geneval", "ocr"; a .txt/.jsonl file (split by prompt hash, see the module docstring;
    split "all" gives every prompt); or a folder holding {split}.txt, {split}.jsonl or {split}_metadata.jsonl
    (Flow-GRPO's dataset layout)."""
    path = Path(name_or_path).expanduser()
    _check_split(split, (*SPLITS, "all") if path.is_file() else (*SPLITS, "fresh") if name_or_path == "shapes" else
                 SPLITS)
    if name_or_path in GENERATORS:
        return GENERATORS[name_or_path](split, seed)
    if path.is_dir():
        names = [f"{split}.txt", f"{split}.jsonl", f"{split}_metadata.jsonl"]
        found = [path / n for n in names if (path / n).is_file()]
        if not found:
            raise ValueError(f"{path}: a prompt folder needs one of {', '.join(names)} for the {split!r} split")
        return load_file(found[0])
    if path.is_file():
        return split_file(path, split)
    raise ValueError(f"unknown prompt set {name_or_path!r}: not one of {', '.join(GENERATORS)}, and no such file or "
                     f"folder (give a .txt/.jsonl file or a folder with {split}.txt / {split}_metadata.jsonl)")


def split_sizes(name_or_path: str, seed: int = 0) -> tuple[int, int]:
    """(number of train prompts, number of test prompts) of a set, for the trainer to print; a single file's sides
    may be 0 here (`load` refuses an empty side)."""
    path = Path(name_or_path).expanduser()
    if name_or_path not in GENERATORS and path.is_file():
        texts = load_file(path)[0]
        return len(texts) - sum(map(_is_test, texts)), sum(map(_is_test, texts))
    return len(load(name_or_path, "train", seed)[0]), len(load(name_or_path, "test", seed)[0])


if __name__ == "__main__":  # sizes and a few examples of each built-in set
    for name in GENERATORS:
        for split in SPLITS:
            texts, meta = load(name, split)
            tags = sorted({m["tag"] for m in meta if m}) if any(meta) else []
            print(f"{name:>8} {split:>5}: {len(texts):5d} prompts {tags if tags else ''}  e.g. {texts[:2]}")
