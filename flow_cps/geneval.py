"""GenEval's rules, in-process: object presence, counting, colour, position and colour attribution.

GenEval (Ghosh, Hajishirzi & Schmidt, NeurIPS 2023 Datasets & Benchmarks, arXiv 2310.11513) checks a generated
image against a prompt's metadata with an instance segmenter (Mask2Former, Swin-S, COCO instances) and CLIP
ViT-L/14 zero-shot colour classification of each detected object. The paper's GenEval row (SD3.5-M 0.63 -> 0.97
with Flow-GRPO and with Flow-CPS) is the benchmark's *overall* score: per-tag accuracy of this binary rule,
averaged over the six tags (`summarize`; the rewards carry `tag_of` as their `group_key` so a trainer can log it).

Metadata, one dict per prompt, in GenEval's jsonl format (what `prompts.load("geneval", ...)` produces):
    {"tag": "counting", "prompt": "a photo of three clocks",
     "include": [{"class": "clock", "count": 3}], "exclude": [{"class": "clock", "count": 4}]}
    include items may carry "color": "red" and "position": ["left of", i] (relative to the i-th include item).

The rules (the benchmark's `evaluate_images.py`, restated; thresholds are its defaults):
  1. detections of a class are kept if score > 0.3 (0.9 for the counting tag), most confident first, at most 16;
     compared as the benchmark compares them, in float32 (mmdet's scores are a float32 array, so a score of exactly
     float32(0.3) is dropped), and ordered as its `argsort(scores)[::-1]` orders them: among exactly equal scores
     the later detection comes first;
  2. include {class, count}: at least `count` kept detections; colour and position are judged on the `count` most
     confident ones only; colour = CLIP's argmax over the 10 colours of the masked, cropped object;
  3. position: offset = A's box centre - B's; each axis shrunk towards 0 by 0.1 x (A's + B's size on that axis),
     the benchmark's margin; with (dx, dy) = shrunk / |offset|: "left of" dx < -0.5, "right of" dx > 0.5,
     "above" dy < -0.5, "below" dy > 0.5 (image y grows downwards); no relation if both shrunk offsets vanish;
     all in float32 arithmetic, as the benchmark's numpy on mmdet's float32 boxes;
  4. exclude {class, count}: fewer than `count` kept detections (this is how counting is exact: include n,
     exclude n + 1); includes combine with AND, excludes with OR.

Two partial-credit rules for training (the mean over a prompt's checks):
`evaluate` (`Verdict.score`, this project's `geneval` reward, in [0, 1]):
  * count, per include: max(0, 1 - |found - count| / count), found = all kept detections of the class. Extra
    objects cost credit for every tag (Flow-GRPO's reward server does the same; the benchmark's rule only caps
    counts for the counting tag). Deviation: floored at 0 (Flow-GRPO's can go negative for found > 2 x count);
  * colour, per include with "color": (number of the `count` most confident objects of the right colour) / count;
  * position, per include with "position": fraction of (object, target object) pairs in the right relation,
    over count x target count pairs (missing objects count as failed pairs);
  * exclude on a class no include names: 1 if respected, else 0.
`evaluate_flow_grpo` (the `geneval_flow_grpo` reward): Flow-GRPO's reward server as it is, quirks included, on
JPEG-compressed images with red and blue swapped for the detector, as the server does (its docstring).

Model path (`Scorer`): transformers' `Mask2FormerForUniversalSegmentation` with `facebook/mask2former-swin-small-
coco-instance` (the benchmark's architecture and training data; the weights are the original Mask2Former release
converted to transformers, not mmdet's retrained checkpoint, so scores can differ slightly from the official
evaluator) and `CLIPModel` `openai/clip-vit-large-patch14` (the same OpenAI weights as open_clip's "ViT-L-14/openai").
Instance post-processing follows the benchmark's mmdet Mask2Former: top 100 (query, class) pairs by softmax score,
masks upsampled to the image, score = class probability x mean mask probability inside the mask, box = the mask's
extent. To score files: `python rewards.py geneval_overall IMAGE --prompt ... --metadata '{...}'`.
"""
from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flow_cps.clip import CLIP_MEAN, CLIP_STD, as_dtype, clip_preprocess, load_pretrained, rgb, to_uint8

# The 80 COCO instance classes in label order (the segmenter's ids 0..79), named as GenEval's object_names.txt
# names them ("computer mouse", "tv remote", "computer keyboard" for COCO's "mouse", "remote", "keyboard").
COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
POSITIONS = ["left of", "right of", "above", "below"]
TAGS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]

# The benchmark's defaults (evaluate_images.py options threshold, counting_threshold, max_objects, max_overlap,
# position_threshold).
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
MAX_OVERLAP = 1.0  # 1.0 = no extra non-maximum suppression
POSITION_MARGIN = 0.1
COLOR_TEMPLATES = ["a photo of a {color} {cls}", "a photo of a {color}-colored {cls}", "a photo of a {color} object"]
BACKGROUND_GREY = 0x99 / 255  # the benchmark pastes each object's mask onto a "#999" background before CLIP
DETECTOR_HUB_ID = "facebook/mask2former-swin-small-coco-instance"
CLIP_HUB_ID = "openai/clip-vit-large-patch14"


def metadata_problem(meta: dict) -> str | None:
    """What makes a GenEval metadata object unusable by the rules below (None: usable): include/exclude must be
    lists of clauses {class: one of COCO_CLASSES, count: a whole number >= 1, optional color: one of COLORS,
    optional position: [one of POSITIONS, the index of an earlier include]}, and at least one clause; the tag, if
    given, one of TAGS (it picks the counting threshold, and the overall score is a mean over tags)."""
    if "tag" in meta and (not isinstance(meta["tag"], str) or meta["tag"] not in TAGS):
        return f"'tag' must be one of {', '.join(TAGS)} (got {meta['tag']!r})"
    clauses = {k: meta.get(k, []) for k in ("include", "exclude")}
    if not all(isinstance(v, list) for v in clauses.values()) or not any(clauses.values()):
        return "'include' / 'exclude' must be lists of clauses, at least one clause in all"
    for key, items in clauses.items():
        for i, c in enumerate(items):
            where = f"{key}[{i}]"
            if not isinstance(c, dict) or c.get("class") not in COCO_CLASSES:
                return f"{where}: 'class' must be one of GenEval's 80 COCO classes (got {c!r})"
            n = c.get("count")
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                return f"{where}: 'count' must be a whole number >= 1 (got {n!r})"
            if key == "include" and "color" in c and c["color"] not in COLORS:
                return f"{where}: 'color' must be one of {', '.join(COLORS)} (got {c['color']!r})"
            pos = c.get("position") if key == "include" else None
            if pos is not None and not (isinstance(pos, list) and len(pos) == 2 and pos[0] in POSITIONS and
                                        isinstance(pos[1], int) and 0 <= pos[1] < i):
                return f"{where}: 'position' must be [one of {', '.join(POSITIONS)}, an earlier include's index] " \
                       f"(got {pos!r})"
    return None


@dataclass
class Detection:
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels, x1/y1 exclusive
    score: float
    mask: Tensor | None = None  # (H, W) bool, for the colour classifier
    color: str | None = None  # set by hand in tests; the model path classifies colours on demand


@dataclass
class Verdict:
    correct: bool  # the benchmark's binary rule
    score: float  # partial credit (training reward): in [0, 1] for `evaluate`, <= 1 for `evaluate_flow_grpo`
    reasons: list[str] = field(default_factory=list)  # why `correct` is False, in the benchmark's words


# -- the rules ---------------------------------------------------------------------------------------------------
# The benchmark computes on mmdet's float32 arrays; numpy keeps float32 when an array meets a Python float, so its
# thresholds and position arithmetic are float32. Written out here with explicit np.float32.
def box_iou(a, b) -> float:
    """IoU with the benchmark's inclusive-pixel areas ((x1 - x0 + 1) (y1 - y0 + 1)), in float32."""
    a, b = np.asarray(a[:4], np.float32), np.asarray(b[:4], np.float32)

    def area(x0, y0, x1, y1):
        return max(x1 - x0 + 1, np.float32(0)) * max(y1 - y0 + 1, np.float32(0))
    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a) + area(*b) - inter
    return float(inter / union) if union else 0.0


def select_objects(candidates: dict[str, list[Detection]], tag: str, threshold: float = THRESHOLD,
                   counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS,
                   max_overlap: float = MAX_OVERLAP) -> dict[str, list[Detection]]:
    """Rule 1: per class, the confident detections, most confident first (the counting tag demands 0.9)."""
    min_score = np.float32(counting_threshold if tag == "counting" else threshold)
    kept = {}
    for cls, dets in candidates.items():
        # the benchmark's order, argsort(float32 scores)[::-1]: numpy's argsort keeps equal scores in list order (it
        # is an insertion sort below 17 elements; longer lists of exact ties have no specified order), so after the
        # reversal the later of two equal detections comes first
        order = sorted(range(len(dets)), key=lambda i: (np.float32(dets[i].score), i), reverse=True)
        order = [dets[i] for i in order if np.float32(dets[i].score) > min_score][:max_objects]
        chosen = []
        while order:
            best = order.pop(0)
            chosen.append(best)
            if max_overlap < 1:  # optional greedy NMS; off in the benchmark
                order = [d for d in order if box_iou(best.box, d.box) < max_overlap]
        if chosen:
            kept[cls] = chosen
    return kept


def relative_position(a, b, margin: float = POSITION_MARGIN) -> set[str]:
    """Rule 3: the relations of box `a` to box `b` ({"left of", "above"}, ...); empty when the centres are within
    the margin on both axes. float32 throughout, as the benchmark."""
    boxes = np.asarray([a[:4], b[:4]], np.float32).reshape(2, 2, 2)  # (box, corner, xy)
    centre, size = boxes.mean(axis=1), np.abs(boxes[:, 1] - boxes[:, 0])
    offset = centre[0] - centre[1]
    # shrink each axis by the margin so that barely-offset objects relate on neither side of that axis
    shrunk = np.maximum(np.abs(offset) - np.float32(margin) * (size[0] + size[1]), 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < np.float32(1e-3)):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)  # image y grows downwards, so dy < 0 is "above"
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


ColourFn = Callable[[list[Detection], str], list[str]]


def _given_colours(dets: list[Detection], cls: str) -> list[str]:
    return [d.color for d in dets]


def evaluate(objects: dict[str, list[Detection]], metadata: dict, colours: ColourFn = _given_colours,
             position_margin: float = POSITION_MARGIN) -> Verdict:
    """Rules 2-4 (binary `correct`) and the partial credit (`score`) for one image's kept objects."""
    includes, excludes = metadata.get("include", []), metadata.get("exclude", [])
    if not includes and not excludes:
        raise ValueError(f"GenEval metadata needs 'include' and/or 'exclude' clauses; got {metadata!r}")
    correct, reasons, credits = True, [], []
    matched: list[list[Detection] | None] = []  # per include: its top objects if it passed, else None
    tops: list[list[Detection]] = []  # per include: its top objects, passed or not (for partial credit)
    for req in includes:
        cls, n = req["class"], int(req["count"])
        found = objects.get(cls, [])
        top = found[:n]  # colour and position are judged on the most confident `count` objects only
        tops.append(top)
        ok = len(top) >= n
        credits.append(max(0.0, 1 - abs(len(found) - n) / n))
        if not ok:
            reasons.append(f"expected {cls}>={n}, found {len(found)}")
        if "color" in req:
            got = colours(top, cls) if top else []
            credits.append(got.count(req["color"]) / n)
            if ok and got.count(req["color"]) < n:
                ok = False
                reasons.append(f"expected {req['color']} {cls}>={n}, found {got.count(req['color'])} {req['color']}"
                               f" ({', '.join(got)})")
        if "position" in req:
            rel, target = req["position"][0], int(req["position"][1])
            if not 0 <= target < len(tops) - 1:
                raise ValueError(f"position target {target} of {req!r} must name an earlier include clause")
            pairs = [rel in relative_position(o.box, t.box, position_margin) for o in top for t in tops[target]]
            credits.append(sum(pairs) / (n * max(1, int(includes[target]["count"]))))
            if ok and matched[target] is None:
                ok = False
                reasons.append(f"no target for {cls} to be {rel}")
            elif ok and not all(pairs):
                ok = False
                reasons.append(f"expected {cls} {rel} target")
        matched.append(top if ok else None)
        correct &= ok
    included = {req["class"] for req in includes}
    for req in excludes:
        cls, n = req["class"], int(req["count"])
        if len(objects.get(cls, [])) >= n:
            correct = False
            reasons.append(f"expected {cls}<{n}, found {len(objects[cls])}")
        if cls not in included:  # an exclude on an included class is already priced by its count credit
            credits.append(float(len(objects.get(cls, [])) < n))
    return Verdict(correct=correct, score=sum(credits) / len(credits), reasons=reasons)


def evaluate_flow_grpo(objects: dict[str, list[Detection]], metadata: dict, colours: ColourFn = _given_colours,
                       position_margin: float = POSITION_MARGIN) -> Verdict:
    """Flow-GRPO's training reward, as its reward server (yifan123/reward-server, `evaluate_reward` in
    reward_server/gen_eval.py) computes it; `score` = the mean of the credits below, `correct` = its "strict" flag.

    Per include {class, count}, with found = all kept detections of the class:
      * count credit 1 - |count - found| / count, NOT floored (negative when found > 2 x count);
      * colour and position need the exact count: with found != count the include gets one 0 credit if it asks for
        colour or position (one 0, even if it asks for both), and neither is judged;
      * colour: credit 1 - |count - right| / count (= right / count) over the found objects' CLIP colours;
      * position, judged only if the colour (if any) passed: no target (its include failed) -> credit 0; some
        (object, target) pair in the wrong relation -> credits 0 AND 1 (the server appends a 1 after its pair loop
        whether or not a pair failed; reproduced as it is, so a wrong relation still earns half); all pairs right
        -> credit 1.
    Excludes are ignored. No credits at all (no includes) -> 0. `correct` demands exact counts, colours and
    relations of every include.
    """
    correct, reasons, credits = True, [], []
    matched: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        cls, n = req["class"], int(req["count"])
        found = objects.get(cls, [])
        ok = len(found) == n
        credits.append(1 - abs(n - len(found)) / n)
        if not ok:
            reasons.append(f"expected {cls}=={n}, found {len(found)}")
            if "color" in req or "position" in req:
                credits.append(0.0)
        if ok and "color" in req:
            right = colours(found, cls).count(req["color"])
            credits.append(1 - abs(n - right) / n)
            if right != n:
                ok = False
                reasons.append(f"expected {req['color']} {cls}=={n}, found {right} {req['color']}")
        if ok and "position" in req:
            rel, target = req["position"][0], int(req["position"][1])
            if not 0 <= target < len(matched):
                raise ValueError(f"position target {target} of {req!r} must name an earlier include clause")
            if matched[target] is None:
                ok = False
                reasons.append(f"no target for {cls} to be {rel}")
                credits.append(0.0)
            else:
                if not all(rel in relative_position(o.box, t.box, position_margin) for o in found
                           for t in matched[target]):
                    ok = False
                    reasons.append(f"expected {cls} {rel} target")
                    credits.append(0.0)
                credits.append(1.0)
        matched.append(found if ok else None)
        correct &= ok
    return Verdict(correct=correct, score=sum(credits) / len(credits) if credits else 0.0, reasons=reasons)


def summarize(tags: list[str], correct) -> dict[str, float]:
    """The benchmark's summary: accuracy per tag and "overall" = their unweighted mean (tags with no sample are
    left out). `correct` is a sequence of bools/0-1 floats aligned with `tags`; NaN entries (unscored) are skipped."""
    per_tag: dict[str, list[float]] = {}
    for tag, c in zip(tags, correct):
        c = float(c)
        if not math.isnan(c):
            per_tag.setdefault(tag, []).append(c)
    out = {tag: sum(v) / len(v) for tag in [*TAGS, *sorted(set(per_tag) - set(TAGS))] if (v := per_tag.get(tag))}
    out["overall"] = sum(out.values()) / len(out) if out else float("nan")
    return out


# -- the models: Mask2Former instances + CLIP colours ------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    """The GenEval rewards' options (`--reward_options`), the benchmark's defaults. detector_size: shorter image side
    fed to Mask2Former; 800 is the benchmark's (mmdet's 1333x800 test scale: 512 px is upsampled); smaller is faster."""
    detector: str = DETECTOR_HUB_ID
    clip: str = CLIP_HUB_ID
    detector_size: int = 800
    threshold: float = THRESHOLD
    counting_threshold: float = COUNTING_THRESHOLD
    max_objects: int = MAX_OBJECTS
    max_overlap: float = MAX_OVERLAP
    position_margin: float = POSITION_MARGIN
    max_per_image: int = 100
    dtype: torch.dtype | str = torch.float32


class Scorer:
    """Images (B, C, H, W) in [0, 1] + GenEval metadata -> one `Verdict` per image; loads both models once. The
    detector runs batched on `device`, CLIP on each image's objects; `reward` names the reward asking, in a
    missing-weights message. Cost per image: docs/NOTES.md, "Measurements"."""

    def __init__(self, options: Options = Options(), device="cpu", reward: str = "geneval_partial"):
        from transformers import AutoTokenizer, CLIPModel, Mask2FormerForUniversalSegmentation

        self.options, self.device, self.dtype = options, torch.device(device), as_dtype(options.dtype)
        self.rules = dict(threshold=options.threshold, counting_threshold=options.counting_threshold,
                          max_objects=options.max_objects, max_overlap=options.max_overlap)
        self.detector = load_pretrained(Mask2FormerForUniversalSegmentation, options.detector, reward, "detector",
                                        DETECTOR_HUB_ID, "the Mask2Former instance segmenter")
        if self.detector.config.num_labels != len(COCO_CLASSES):
            raise ValueError(f"geneval: detector {options.detector!r} has {self.detector.config.num_labels} classes; "
                             f"GenEval needs a COCO instance model with 80 (e.g. {DETECTOR_HUB_ID})")
        self.detector.to(self.device, self.dtype).eval().requires_grad_(False)
        self.clip = load_pretrained(CLIPModel, options.clip, reward, "clip", CLIP_HUB_ID, "the CLIP colour classifier")
        self.clip.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = load_pretrained(AutoTokenizer, options.clip, reward, "clip", CLIP_HUB_ID, "CLIP's tokenizer")
        self.clip_size = self.clip.config.vision_config.image_size
        self._colour_text: dict[str, Tensor] = {}

    # plumbing: preprocessing as mmdet's test pipeline (keep-ratio resize, ImageNet normalisation, pad to 32)
    def _detector_input(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        h, w = images.shape[-2:]
        scale = min(self.options.detector_size / min(h, w), self.options.detector_size * 1333 / 800 / max(h, w))
        rh, rw = int(h * scale + 0.5), int(w * scale + 0.5)
        x = F.interpolate(images, size=(rh, rw), mode="bilinear", align_corners=False) if (rh, rw) != (h, w) \
            else images
        mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        x = F.pad(x, (0, -rw % 32, 0, -rh % 32))  # zeros after normalisation, as mmdet pads the normalised image
        return x, (rh, rw)

    @torch.no_grad()
    def detect(self, images: Tensor, min_score: float = 0.0) -> list[dict[str, list[Detection]]]:
        """Instance detections per image: {class name: [Detection, ...]}, scores > min_score only."""
        images = images.to(self.device, torch.float32)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        h, w = images.shape[-2:]
        x, (rh, rw) = self._detector_input(images)
        out = self.detector(pixel_values=x.to(self.dtype))
        probs = out.class_queries_logits.float().softmax(-1)[..., :-1]  # (B, Q, 80); the last class is "no object"
        results = []
        for b in range(len(images)):
            scores, idx = probs[b].flatten().topk(min(self.options.max_per_image, probs[b].numel()))
            # det score = class prob x mean mask prob <= class prob, so dropping class prob <= min_score is exact
            keep = scores > min_score
            scores, idx = scores[keep], idx[keep]
            query, label = idx // probs.shape[-1], idx % probs.shape[-1]
            dets: dict[str, list[Detection]] = {}
            if len(query):
                logits = out.masks_queries_logits[b, query].float()[None]  # (1, k, h/4, w/4) of the padded input
                logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
                logits = F.interpolate(logits[..., :rh, :rw], size=(h, w), mode="bilinear", align_corners=False)[0]
                binary = logits > 0
                area = binary.flatten(1).sum(1)
                mask_score = (logits.sigmoid() * binary).flatten(1).sum(1) / (area + 1e-6)
                for k in range(len(query)):
                    if area[k] == 0:
                        continue
                    ys, xs = torch.where(binary[k].any(1))[0], torch.where(binary[k].any(0))[0]
                    box = (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1))
                    det = Detection(box=box, score=float(scores[k] * mask_score[k]), mask=binary[k])
                    dets.setdefault(COCO_CLASSES[int(label[k])], []).append(det)
            results.append(dets)
        return results

    def _colour_classifier(self, cls: str) -> Tensor:
        """(10, D) text embeddings: per colour, the mean of the normalised embeddings of the three templates."""
        if cls not in self._colour_text:
            texts = [t.format(color=c, cls=cls) for c in COLORS for t in COLOR_TEMPLATES]
            max_len = min(77, self.clip.config.text_config.max_position_embeddings)
            tok = self.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            emb = self.clip.get_text_features(**tok.to(self.device)).pooler_output.float()
            emb = F.normalize(F.normalize(emb, dim=-1).view(len(COLORS), len(COLOR_TEMPLATES), -1).mean(1), dim=-1)
            self._colour_text[cls] = emb
        return self._colour_text[cls]

    @torch.no_grad()
    def colours(self, image: Tensor, dets: list[Detection], cls: str) -> list[str]:
        """The benchmark's colour of each object: mask onto grey, crop to the box, CLIP zero-shot over COLORS."""
        image = image.to(self.device, torch.float32)
        crops = []
        for d in dets:
            img = image if d.mask is None else torch.where(d.mask.to(self.device), image, BACKGROUND_GREY)
            x0, y0, x1, y1 = (int(round(v)) for v in d.box)
            crop = img[:, max(y0, 0):max(y1, y0 + 1), max(x0, 0):max(x1, x0 + 1)]
            crops.append(clip_preprocess(crop[None], self.clip_size, self.clip_size, CLIP_MEAN, CLIP_STD))
        feats = self.clip.get_image_features(pixel_values=torch.cat(crops).to(self.dtype)).pooler_output.float()
        pred = (F.normalize(feats, dim=-1) @ self._colour_classifier(cls).T).argmax(-1)
        return [COLORS[int(i)] for i in pred]

    def __call__(self, images: Tensor, metadata: list[dict], rule: Callable[..., Verdict] = evaluate,
                 swap_red_blue: bool = False) -> list[Verdict]:
        """`rule` (evaluate or evaluate_flow_grpo) on each image's kept detections. swap_red_blue: the detector sees
        the images with red and blue swapped (what Flow-GRPO's reward server feeds mmdet); colours see them as
        they are."""
        images = rgb(images)
        min_score = min(self.rules["threshold"], self.rules["counting_threshold"])
        verdicts = []
        for image, meta, cands in zip(images, metadata, self.detect(images.flip(1) if swap_red_blue else images,
                                                                    min_score)):
            objects = select_objects(cands, meta.get("tag", ""), **self.rules)
            verdicts.append(rule(objects, meta, lambda dets, cls, image=image: self.colours(image, dets, cls),
                                 self.options.position_margin))
        return verdicts


# -- as rewards (registered in rewards.py) -----------------------------------------------------------------------
def tag_of(metadata) -> str | None:
    """The group key of the GenEval rewards: the prompt's tag, so the benchmark's overall score (the mean over
    tags of the per-tag means) can be logged instead of a mean over images."""
    return metadata.get("tag") if isinstance(metadata, dict) else None


def jpeg_roundtrip(images: Tensor, quality: int = 75) -> Tensor:
    """Images as a JPEG file of this quality holds them (PIL's encoder, its default 4:2:0 chroma subsampling), back
    in [0, 1]: what Flow-GRPO's client sends its reward server (PIL's default quality, 75)."""
    from PIL import Image

    arr = to_uint8(rgb(images))
    out = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        with Image.open(buf) as im:
            out.append(torch.from_numpy(np.asarray(im.convert("RGB")).copy()))
    return torch.stack(out).permute(0, 3, 1, 2).float().div(255).to(images.device)


_SCORERS: dict = {}  # one loaded Scorer per (device, options): geneval rewards in one run share the models


def shared_scorer(reward: str, device="cpu", **options) -> Scorer:
    """One loaded Scorer per (device, Options(**options)), shared by the GenEval rewards; `reward` names the one
    asking, in a missing-weights message."""
    options = {k: as_dtype(v) if k == "dtype" else v for k, v in options.items()}  # "bfloat16" = torch.bfloat16
    key = (str(device), Options(**options))
    if key not in _SCORERS:
        _SCORERS[key] = Scorer(key[1], device=device, reward=reward)
    return _SCORERS[key]


def reward_fn(scorer: Scorer, pick: Callable[[Verdict], float], rule: Callable[..., Verdict] = evaluate,
              jpeg_quality: int | None = None, swap_red_blue: bool = False) -> Callable[..., Tensor]:
    """A reward `fn(images, prompts, metadata) -> Tensor[B]`: `pick(verdict)` per image, NaN for a sample without
    GenEval metadata (nothing to check against: invalid, never a made-up score). Carries `group_key = tag_of`."""
    def fn(images: Tensor, prompts: list[str], metadata=None) -> Tensor:
        meta = list(metadata) if metadata is not None else [None] * len(prompts)
        ok = [i for i, m in enumerate(meta) if isinstance(m, dict) and (m.get("include") or m.get("exclude"))]
        if len(ok) < len(meta):
            warnings.warn("geneval: samples without GenEval metadata (include/exclude) score NaN; load prompts with "
                          "prompts.load('geneval', ...) or a GenEval-format .jsonl", stacklevel=2)
        out = torch.full((len(prompts),), float("nan"))
        if ok:
            x = images[ok] if jpeg_quality is None else jpeg_roundtrip(images[ok], jpeg_quality)
            for i, v in zip(ok, scorer(x, [meta[i] for i in ok], rule, swap_red_blue)):
                out[i] = pick(v)
        return out
    fn.group_key = tag_of
    return fn
