"""GenEval's rules, in-process: object presence, counting, colour, position and colour attribution.

GenEval (Ghosh, Hajishirzi & Schmidt, NeurIPS 2023 Datasets & Benchmarks, arXiv 2310.11513) checks a generated
image against a prompt's metadata with an instance segmenter (Mask2Former, Swin-S, COCO instances) and CLIP
ViT-L/14 zero-shot colour classification of each detected object. The paper's GenEval row (SD3.5-M 0.63 -> 0.97
with Flow-GRPO and with Flow-CPS) is the benchmark's *overall* score: per-tag accuracy of this binary rule,
averaged over the six tags (`summarize`). Flow-GRPO trains on a *partial-credit* score instead (`Verdict.score`).

Metadata, one dict per prompt, in GenEval's jsonl format (what `prompts.load("geneval", ...)` produces):
    {"tag": "counting", "prompt": "a photo of three clocks",
     "include": [{"class": "clock", "count": 3}], "exclude": [{"class": "clock", "count": 4}]}
    include items may carry "color": "red" and "position": ["left of", i] (relative to the i-th include item).

The rules (the benchmark's `evaluate_images.py`, restated; thresholds are its defaults):
  1. detections of a class are kept if score > 0.3 (0.9 for the counting tag), most confident first, at most 16;
  2. include {class, count}: at least `count` kept detections; colour and position are judged on the `count` most
     confident ones only; colour = CLIP's argmax over the 10 colours of the masked, cropped object;
  3. position: offset = A's box centre - B's; each axis shrunk towards 0 by 0.1 x (A's + B's size on that axis),
     the benchmark's margin; with (dx, dy) = shrunk / |offset|: "left of" dx < -0.5, "right of" dx > 0.5,
     "above" dy < -0.5, "below" dy > 0.5 (image y grows downwards); no relation if both shrunk offsets vanish;
  4. exclude {class, count}: fewer than `count` kept detections (this is how counting is exact: include n,
     exclude n + 1); includes combine with AND, excludes with OR.

Partial credit (training reward, in [0, 1]; the mean over the prompt's checks):
  * count, per include: max(0, 1 - |found - count| / count), found = all kept detections of the class. Extra
    objects cost credit for every tag (Flow-GRPO's reward server does the same; the benchmark's rule only caps
    counts for the counting tag). Deviation: floored at 0 (Flow-GRPO's can go negative for found > 2 x count);
  * colour, per include with "color": (number of the `count` most confident objects of the right colour) / count;
  * position, per include with "position": fraction of (object, target object) pairs in the right relation,
    over count x target count pairs (missing objects count as failed pairs);
  * exclude on a class no include names: 1 if respected, else 0.

Model path (`Scorer`): transformers' `Mask2FormerForUniversalSegmentation` with `facebook/mask2former-swin-small-
coco-instance` (the benchmark's architecture and training data; the weights are the original Mask2Former release
converted to transformers, not mmdet's retrained checkpoint, so scores can differ slightly from the official
evaluator) and `CLIPModel` `openai/clip-vit-large-patch14` (the same OpenAI weights as open_clip's "ViT-L-14/openai").
Instance post-processing follows the benchmark's mmdet Mask2Former: top 100 (query, class) pairs by softmax score,
masks upsampled to the image, score = class probability x mean mask probability inside the mask, box = the mask's
extent.

Run `python rewards.py geneval IMAGE --prompt ... --metadata '{...}'` to score files.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

# The 80 COCO instance classes in COCO's contiguous label order (= the segmenter's label ids 0..79), named as
# GenEval's object_names.txt names them (it says "computer mouse", "tv remote", "computer keyboard" where COCO says
# "mouse", "remote", "keyboard", so the prompts are unambiguous).
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


@dataclass
class Detection:
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels, x1/y1 exclusive
    score: float
    mask: Tensor | None = None  # (H, W) bool, for the colour classifier
    color: str | None = None  # set by hand in tests; the model path classifies colours on demand


@dataclass
class Verdict:
    correct: bool  # the benchmark's binary rule
    score: float  # partial credit in [0, 1] (training reward)
    reasons: list[str] = field(default_factory=list)  # why `correct` is False, in the benchmark's words


# -- the rules ---------------------------------------------------------------------------------------------------
def box_iou(a, b) -> float:
    """IoU with the benchmark's inclusive-pixel areas ((x1 - x0 + 1) (y1 - y0 + 1))."""
    def area(x0, y0, x1, y1):
        return max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)
    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a[:4]) + area(*b[:4]) - inter
    return inter / union if union else 0.0


def select_objects(candidates: dict[str, list[Detection]], tag: str, threshold: float = THRESHOLD,
                   counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS,
                   max_overlap: float = MAX_OVERLAP) -> dict[str, list[Detection]]:
    """Rule 1: per class, the confident detections, most confident first (the counting tag demands 0.9)."""
    min_score = counting_threshold if tag == "counting" else threshold
    kept = {}
    for cls, dets in candidates.items():
        order = [d for d in sorted(dets, key=lambda d: -d.score) if d.score > min_score][:max_objects]
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
    the margin on both axes."""
    ca, cb = ((a[0] + a[2]) / 2, (a[1] + a[3]) / 2), ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
    size_a, size_b = (abs(a[2] - a[0]), abs(a[3] - a[1])), (abs(b[2] - b[0]), abs(b[3] - b[1]))
    offset = [ca[i] - cb[i] for i in range(2)]
    # shrink each axis by the margin so that barely-offset objects relate on neither side of that axis
    shrunk = [math.copysign(max(abs(offset[i]) - margin * (size_a[i] + size_b[i]), 0.0), offset[i]) for i in range(2)]
    if all(abs(s) < 1e-3 for s in shrunk):
        return set()
    norm = math.hypot(*offset)
    dx, dy = shrunk[0] / norm, shrunk[1] / norm  # image y grows downwards, so dy < 0 is "above"
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
class Scorer:
    """Images (B, C, H, W) in [0, 1] + GenEval metadata -> one `Verdict` per image. Loads both models once.

    detector_size: shorter image side fed to Mask2Former. 800 is the benchmark's (mmdet's 1333x800 test scale; a
    512-px image is upsampled); smaller is faster and coarser. The detector runs batched on `device`, CLIP on each
    image's objects; post-processing is per image. Cost: 45-60 ms per 512-px image on one H200 (batch 16, Swin-S +
    ViT-L/14 at real size with random weights, every query a detection: an upper bound)."""

    def __init__(self, detector: str = DETECTOR_HUB_ID, clip: str = CLIP_HUB_ID, device="cpu",
                 detector_size: int = 800, threshold: float = THRESHOLD,
                 counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS,
                 max_overlap: float = MAX_OVERLAP, position_margin: float = POSITION_MARGIN, max_per_image: int = 100,
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoTokenizer, CLIPModel, Mask2FormerForUniversalSegmentation

        from rewards import load_pretrained

        self.device, self.dtype, self.detector_size, self.max_per_image = torch.device(device), dtype, detector_size, \
            max_per_image
        self.rules = dict(threshold=threshold, counting_threshold=counting_threshold, max_objects=max_objects,
                          max_overlap=max_overlap)
        self.position_margin = position_margin
        self.detector = load_pretrained(Mask2FormerForUniversalSegmentation, detector, "geneval", "detector",
                                        DETECTOR_HUB_ID, "the Mask2Former instance segmenter")
        if self.detector.config.num_labels != len(COCO_CLASSES):
            raise ValueError(f"geneval: detector {detector!r} has {self.detector.config.num_labels} classes; GenEval "
                             f"needs a COCO instance model with 80 (e.g. {DETECTOR_HUB_ID})")
        self.detector.to(self.device, dtype).eval().requires_grad_(False)
        self.clip = load_pretrained(CLIPModel, clip, "geneval", "clip", CLIP_HUB_ID, "the CLIP colour classifier")
        self.clip.to(self.device, dtype).eval().requires_grad_(False)
        self.tokenizer = load_pretrained(AutoTokenizer, clip, "geneval", "clip", CLIP_HUB_ID, "CLIP's tokenizer")
        self.clip_size = self.clip.config.vision_config.image_size
        self._colour_text: dict[str, Tensor] = {}

    # plumbing: preprocessing as mmdet's test pipeline (keep-ratio resize, ImageNet normalisation, pad to 32)
    def _detector_input(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        h, w = images.shape[-2:]
        scale = min(self.detector_size / min(h, w), self.detector_size * 1333 / 800 / max(h, w))
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
            scores, idx = probs[b].flatten().topk(min(self.max_per_image, probs[b].numel()))
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
        from rewards import CLIP_MEAN, CLIP_STD, clip_preprocess

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

    def __call__(self, images: Tensor, metadata: list[dict]) -> list[Verdict]:
        min_score = min(self.rules["threshold"], self.rules["counting_threshold"])
        verdicts = []
        for image, meta, cands in zip(images, metadata, self.detect(images, min_score)):
            objects = select_objects(cands, meta.get("tag", ""), **self.rules)
            verdicts.append(evaluate(objects, meta, lambda dets, cls, image=image: self.colours(image, dets, cls),
                                     self.position_margin))
        return verdicts
