"""GenEval as a native, non-differentiable reward (docs/method.md §5.3, §11).

GenEval (Ghosh, Hajishirzi and Schmidt, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image
Alignment", NeurIPS 2023 Datasets and Benchmarks, arXiv:2310.11513; benchmark code: github.com/djghosh13/geneval,
``evaluation/evaluate_images.py``) checks an image against its prompt's object list with an instance segmenter
(Mask2Former, COCO) and a CLIP zero-shot colour classifier. The RTDMD reference (github.com/Harahan/RTDMD,
``rtdmd/rewards/geneval_scorer.py``) turns the same checks into a partial-credit score and trains on it with weight
1 next to clipscore, hpsv2 and pickscore. This module is our own implementation of both, in three layers:

* **Rules** — pure functions over a detector's output (:class:`Detection`: class name, score, box, mask, a colour
  label when asked): :func:`check_metadata`, :func:`select_objects`, :func:`relative_position`,
  :func:`color_requests`, :func:`geneval_correct` (the benchmark's pass/fail) and :func:`geneval_score` (the
  training reward, in [0, 1]).
* **Models** — :class:`Detector` and :class:`ColorClassifier` (protocols) with one implementation each:
  :class:`Mask2FormerDetector` (transformers' ``Mask2FormerForUniversalSegmentation`` and its image processor's
  ``post_process_instance_segmentation``) and :class:`ClipColorClassifier` (transformers' ``CLIPModel``).
* **Reward** — :class:`GenEvalReward` and :func:`build_geneval_reward` (``rewards.<name>`` with ``kind: geneval``).

Prompts carry GenEval's metadata from a ``.jsonl`` prompt file (docs/training.md §4.3; read with
:func:`rtdmd.data.prompt_metadata`): ``{"tag": task, "include": [{"class", "count", "color"?, "position"?:
[relation, index]}], "exclude": [{"class", "count"}]}`` with the six tasks of :data:`GENEVAL_TASKS`.

**The benchmark's selection** (both scores): per class, detections scoring above 0.3 (0.9 for ``counting``
prompts), best first, at most 16, no non-maximum suppression (``max_overlap`` 1). Colours are CLIP's zero-shot
choice among GenEval's ten colours, on the object's masked region (grey ``#999`` outside the mask) cropped to its
box, with GenEval's three prompt templates averaged per colour. ``A`` is ``relation`` of ``B`` when the offset of
their box centres, shrunk towards 0 on each axis by 0.1 × the sum of the two boxes' sizes on that axis, has a
shrunk component along the relation's axis beyond half the unshrunk offset's length (left/above: below −0.5;
right/below: above 0.5); when both shrunk components vanish (< 1e-3 px) the boxes are too close for any relation.

**The benchmark's pass/fail** (:func:`geneval_correct`, the GenEval number): every ``include`` clause needs at least
``count`` objects; colour and position are checked on the ``count`` best ones (all ``count`` of the colour; every
pair with every object of the target clause, which must itself have passed); any ``exclude`` clause with at least
``count`` objects fails the image.

**The training reward** (:func:`geneval_score`, the reference's partial credit): the mean of one term per check —
per ``include`` clause ``max(0, 1 − |count − n|/count)`` with ``n`` all its selected objects; if ``n ≠ count``, one
0 for its colour/position check; else the fraction of the objects with the asked colour, and for a position clause
whose colour (if any) passed, 1 if every pair is in the relation (target clause passed) else 0. A clause passes
when ``n = count``, all colours match and the relation holds. It departs from the reference in three places, each
noted where it happens: the count term is clipped at 0 (the reference's goes negative beyond ``2·count`` objects,
outside [0, 1]); a failed relation adds one term, 0 (the reference adds 0 and then 1, so a GenEval position
prompt with both objects but the wrong relation scores 0.75 there, 2/3 here); an ``exclude`` clause on a class
that no ``include`` clause counts adds a term (1 if fewer than ``count`` objects, else 0) — the reference scores no
exclude clause, but on GenEval's own prompts every exclude clause repeats an included class (``counting``:
``count + 1``), which the exact-count term already covers, so there the two agree.

**Models**: the benchmark runs mmdetection with its own Mask2Former Swin-S COCO instance checkpoint
(``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``) and open_clip's ViT-L-14 with OpenAI's weights. Here the models
are transformers' and load from local folders, never downloaded: the CLIP folder can hold the very same OpenAI
ViT-L/14 weights (``openai/clip-vit-large-patch14``); for Mask2Former the transformers port of the Mask2Former
authors' Swin-S COCO instance model (``facebook/mask2former-swin-small-coco-instance``) has the same architecture
and training data but is another training run than mmdetection's, so its detections are close to, not identical
with, the benchmark's. The HF post-processing also resizes mask logits through 384 × 384 (mmdetection resizes them
to the image directly) and drops empty masks, so masks and mask scores differ slightly at object borders; the
folder's image processor sets the input resize (transformers' default, shorter side 800 and longer at most 1333,
is mmdetection's test scale). COCO's ``mouse``, ``remote`` and ``keyboard`` are GenEval's ``computer mouse``,
``tv remote`` and ``computer keyboard`` (:data:`LABEL_ALIASES`). Building Mask2Former needs scipy (its training
loss, built with the model), which the ``train`` extra installs.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from ..data import prompt_metadata
from ._load import (
    check_spec_keys,
    load_clip_model,
    load_image_processor,
    load_processor,
    load_tokenizer,
    one_line,
    spec_dict,
    spec_folder,
)
from .base import Reward
from .image import pooled, to_uint8_arrays, unit

__all__ = [
    "BACKGROUND", "COLORS", "COLOR_TEMPLATES", "COUNTING_THRESHOLD", "GENEVAL_TASKS", "LABEL_ALIASES", "MAX_OBJECTS",
    "MAX_OVERLAP", "POSITION_THRESHOLD", "RELATIONS", "THRESHOLD", "ClipColorClassifier", "ColorClassifier",
    "Detection", "Detector", "GenEvalResult", "GenEvalReward", "Mask2FormerDetector", "box_from_mask", "box_iou",
    "build_geneval_reward", "check_metadata", "color_requests", "geneval_correct", "geneval_score",
    "load_mask2former", "load_mask2former_processor", "metadata_classes",
    "relative_position", "select_objects",
]

GENEVAL_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
#: GenEval's colour prompts, one embedding per colour averaged over the three
COLOR_TEMPLATES = ("a photo of a {color} {object}", "a photo of a {color}-colored {object}",
                   "a photo of a {color} object")
BACKGROUND = (153, 153, 153)  # "#999": what replaces the pixels outside an object's mask before colour classification
THRESHOLD = 0.3  # detection score a selected object must exceed
COUNTING_THRESHOLD = 0.9  # the same for "counting" prompts
MAX_OBJECTS = 16  # per class, best first
MAX_OVERLAP = 1.0  # same-class IoU at or above which a lower-scoring box is dropped; 1 = no suppression
POSITION_THRESHOLD = 0.1  # per axis, a centre offset shrinks by this fraction of the two boxes' summed size
#: detector labels (lower case, "_" read as " ") that GenEval's class list spells differently
LABEL_ALIASES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard",
                 "tvmonitor": "tv", "tv monitor": "tv", "hair dryer": "hair drier", "motorbike": "motorcycle",
                 "aeroplane": "airplane", "sofa": "couch", "diningtable": "dining table",
                 "pottedplant": "potted plant"}


# --------------------------------------------------------------------------------------------------------------
# Detections and metadata
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Detection:
    """One detected object: GenEval class name, confidence, box ``(x0, y0, x1, y1)`` in pixels (``x1``/``y1`` one
    past the last column/row), an optional boolean ``[H, W]`` mask and, once classified, its colour."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None
    color: str | None = None


@dataclass(frozen=True)
class GenEvalResult:
    """One image's outcome: the training reward, the benchmark's pass/fail, and the prompt's task."""

    score: float
    correct: bool
    tag: str


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def check_metadata(metadata: Any, *, where: str = "metadata") -> dict[str, Any]:
    """GenEval metadata, validated and normalised (``position`` as a tuple, ``exclude`` always present).

    ``tag`` is one of :data:`GENEVAL_TASKS`; ``include`` a non-empty list of ``{"class": str, "count": int >= 1,
    "color"?: one of COLORS, "position"?: [one of RELATIONS, index of an earlier include clause]}``; ``exclude`` a
    list of ``{"class", "count"}``. Other fields are ignored. A one-line ``ValueError`` starting with ``where``
    names the first problem."""
    if not isinstance(metadata, Mapping):
        raise ValueError(f"{where}: GenEval metadata must be an object, got {type(metadata).__name__}")
    tag = metadata.get("tag")
    if tag not in GENEVAL_TASKS:
        raise ValueError(f"{where}: \"tag\" must be one of {', '.join(GENEVAL_TASKS)}; got {tag!r}")
    include = metadata.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError(f"{where}: \"include\" must be a non-empty list of {{\"class\", \"count\"}} objects")
    exclude = metadata.get("exclude", [])
    if not isinstance(exclude, list):
        raise ValueError(f"{where}: \"exclude\" must be a list of {{\"class\", \"count\"}} objects")
    out_inc, out_exc = [], []
    for part, clauses, out in (("include", include, out_inc), ("exclude", exclude, out_exc)):
        for i, clause in enumerate(clauses):
            at = f"{where}: \"{part}\"[{i}]"
            if not isinstance(clause, Mapping):
                raise ValueError(f"{at} must be an object, got {type(clause).__name__}")
            cls, count = clause.get("class"), clause.get("count")
            if not isinstance(cls, str) or not cls:
                raise ValueError(f"{at}: \"class\" must be a non-empty string, got {cls!r}")
            if not _is_count(count):
                raise ValueError(f"{at}: \"count\" must be an integer >= 1, got {count!r}")
            norm: dict[str, Any] = {"class": cls, "count": count}
            if part == "include" and "color" in clause:
                if clause["color"] not in COLORS:
                    raise ValueError(f"{at}: \"color\" must be one of {', '.join(COLORS)}; got {clause['color']!r}")
                norm["color"] = clause["color"]
            if part == "include" and "position" in clause:
                pos = clause["position"]
                if (not isinstance(pos, (list, tuple)) or len(pos) != 2 or pos[0] not in RELATIONS
                        or not isinstance(pos[1], int) or isinstance(pos[1], bool) or not 0 <= pos[1] < i):
                    raise ValueError(f"{at}: \"position\" must be [relation, index] with a relation among "
                                     f"{', '.join(RELATIONS)} and the index of an earlier include clause; got {pos!r}")
                norm["position"] = (pos[0], pos[1])
            out.append(norm)
    return {"tag": tag, "include": out_inc, "exclude": out_exc}


def metadata_classes(metadata: Mapping[str, Any]) -> set[str]:
    """The class names a (checked) metadata mentions."""
    return {c["class"] for c in metadata["include"]} | {c["class"] for c in metadata.get("exclude", [])}


# --------------------------------------------------------------------------------------------------------------
# Rules (pure functions over detections)
# --------------------------------------------------------------------------------------------------------------

def box_from_mask(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The tight box of a boolean mask, ``(x0, y0, x1, y1)`` with ``x1``/``y1`` one past the last pixel (as
    mmdetection derives Mask2Former's boxes); ``(0, 0, 0, 0)`` for an empty mask."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if cols.size == 0 or rows.size == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with GenEval's inclusive-pixel convention (a side spans ``x1 − x0 + 1`` pixels); 0 for empty unions."""
    def area(x0: float, y0: float, x1: float, y1: float) -> float:
        return max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a[:4]) + area(*b[:4]) - inter
    return inter / union if union else 0.0


def select_objects(detections: Sequence[Detection], tag: str, *, threshold: float = THRESHOLD,
                   counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS,
                   max_overlap: float = MAX_OVERLAP) -> dict[str, list[Detection]]:
    """GenEval's per-class selection: detections scoring strictly above the threshold (``counting_threshold`` for a
    ``counting`` prompt), best first (ties keep the detector's order), the first ``max_objects``, then greedy
    same-class suppression of boxes with IoU >= ``max_overlap`` to a kept one (none when ``max_overlap`` is 1).
    Classes with nothing selected are absent."""
    thr = counting_threshold if tag == "counting" else threshold
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        by_class.setdefault(det.label, []).append(det)
    out: dict[str, list[Detection]] = {}
    for label, dets in by_class.items():
        ranked = sorted((d for d in dets if d.score > thr), key=lambda d: -d.score)[:max_objects]
        kept: list[Detection] = []
        for d in ranked:
            if max_overlap >= 1 or all(box_iou(k.box, d.box) < max_overlap for k in kept):
                kept.append(d)
        if kept:
            out[label] = kept
    return out


def relative_position(box_a: Sequence[float], box_b: Sequence[float], *,
                      position_threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Where box ``a`` lies relative to box ``b``: a subset of :data:`RELATIONS` (image y grows downwards).

    The centre offset ``a − b`` is shrunk towards 0 on each axis by ``position_threshold`` × the sum of the two
    boxes' sizes on that axis (never past 0); if both shrunk components are below 1e-3 pixels the boxes are too
    close for any relation. Otherwise each shrunk component divided by the length of the unshrunk offset gives
    ``left of`` (< −0.5), ``right of`` (> 0.5), ``above`` (< −0.5) and ``below`` (> 0.5)."""
    ax0, ay0, ax1, ay1 = (float(v) for v in box_a[:4])
    bx0, by0, bx1, by1 = (float(v) for v in box_b[:4])
    offset = ((ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2)
    sizes = (abs(ax1 - ax0) + abs(bx1 - bx0), abs(ay1 - ay0) + abs(by1 - by0))
    shrunk = [math.copysign(max(abs(o) - position_threshold * s, 0.0), o) for o, s in zip(offset, sizes, strict=True)]
    if all(abs(v) < 1e-3 for v in shrunk):
        return set()
    norm = math.hypot(*offset)
    dx, dy = shrunk[0] / norm, shrunk[1] / norm
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


def color_requests(objects: Mapping[str, Sequence[Detection]], metadata: Mapping[str, Any]) -> dict[str, int]:
    """How many leading selected objects of each class need a colour label: ``count`` for every colour clause whose
    class has at least ``count`` objects (the benchmark colours the best ``count``; the training reward colours all
    ``n`` when ``n = count``). Classes not listed need none."""
    need: dict[str, int] = {}
    for clause in metadata["include"]:
        if "color" in clause and len(objects.get(clause["class"], ())) >= clause["count"]:
            need[clause["class"]] = max(need.get(clause["class"], 0), clause["count"])
    return need


def _colors(objs: Sequence[Detection], cls: str) -> list[str]:
    missing = [i for i, o in enumerate(objs) if o.color is None]
    if missing:
        raise ValueError(f"detection {missing[0]} of {cls!r} has no colour label (classify the objects that "
                         "color_requests names first)")
    return [o.color for o in objs]  # type: ignore[misc]


def _in_relation(objs: Sequence[Detection], targets: Sequence[Detection], relation: str,
                 position_threshold: float) -> bool:
    return all(relation in relative_position(o.box, t.box, position_threshold=position_threshold)
               for o in objs for t in targets)


def geneval_correct(objects: Mapping[str, Sequence[Detection]], metadata: Mapping[str, Any], *,
                    position_threshold: float = POSITION_THRESHOLD) -> bool:
    """The benchmark's verdict on one image (``objects`` from :func:`select_objects`, coloured per
    :func:`color_requests`): every include clause has at least ``count`` objects, of which the best ``count`` all have
    the asked colour and all lie in the asked relation to every object kept for the target clause (which must have
    passed); no exclude clause has ``count`` or more objects."""
    correct = True
    kept: list[Sequence[Detection] | None] = []
    for clause in metadata["include"]:
        cls, count = clause["class"], clause["count"]
        found = list(objects.get(cls, ()))[:count]
        ok = len(found) >= count
        if ok and "color" in clause:
            ok = _colors(found, cls).count(clause["color"]) >= count
        if ok and "position" in clause:
            relation, target = clause["position"]
            ok = kept[target] is not None and _in_relation(found, kept[target], relation, position_threshold)
        kept.append(found if ok else None)
        correct = correct and ok
    for clause in metadata.get("exclude", []):
        if len(objects.get(clause["class"], ())) >= clause["count"]:
            correct = False
    return correct


def geneval_score(objects: Mapping[str, Sequence[Detection]], metadata: Mapping[str, Any], *,
                  position_threshold: float = POSITION_THRESHOLD) -> float:
    """The partial-credit training reward in [0, 1] (the RTDMD reference's, with the departures listed in the module
    docstring): the mean of the count, colour, position and exclude terms described there."""
    terms: list[float] = []
    kept: list[Sequence[Detection] | None] = []
    for clause in metadata["include"]:
        cls, count = clause["class"], clause["count"]
        found = list(objects.get(cls, ()))
        # reference: 1 - |count - n|/count unclipped (negative beyond 2*count objects); clipped to stay in [0, 1]
        terms.append(max(0.0, 1.0 - abs(count - len(found)) / count))
        ok = len(found) == count
        if not ok:
            if "color" in clause or "position" in clause:
                terms.append(0.0)
        else:
            if "color" in clause:
                hits = _colors(found, cls).count(clause["color"])
                terms.append(hits / count)
                ok = hits == count
            if "position" in clause and ok:
                relation, target = clause["position"]
                ok = kept[target] is not None and _in_relation(found, kept[target], relation, position_threshold)
                # reference: a failed relation appends 0 and then 1 as well; one term per check here
                terms.append(1.0 if ok else 0.0)
        kept.append(found if ok else None)
    counted = {c["class"] for c in metadata["include"]}
    for clause in metadata.get("exclude", []):
        # reference: exclude clauses are not scored; here only those on a class no include clause counts add a term
        if clause["class"] not in counted:
            terms.append(1.0 if len(objects.get(clause["class"], ())) < clause["count"] else 0.0)
    return float(sum(terms) / len(terms)) if terms else 0.0


# --------------------------------------------------------------------------------------------------------------
# Model interfaces
# --------------------------------------------------------------------------------------------------------------

@runtime_checkable
class Detector(Protocol):
    """Finds objects: ``detect(images, classes)`` with ``images`` uint8 ``[N, H, W, 3]`` returns, per image, its
    detections (GenEval class names, every score: the rules threshold them) of the classes asked for (``None``: all
    of :attr:`classes`)."""

    @property
    def classes(self) -> frozenset[str]: ...

    def detect(self, images: np.ndarray, classes: Collection[str] | None = None) -> list[list[Detection]]: ...


@runtime_checkable
class ColorClassifier(Protocol):
    """Names the colour of detected objects: ``classify(image, detections, classname)`` with ``image`` uint8
    ``[H, W, 3]`` returns one of :data:`COLORS` per detection."""

    def classify(self, image: np.ndarray, detections: Sequence[Detection], classname: str) -> list[str]: ...


def _norm_label(label: str, aliases: Mapping[str, str]) -> str:
    key = " ".join(str(label).replace("_", " ").lower().split())
    return aliases.get(key, key)


class Mask2FormerDetector:
    """COCO instance segmentation with transformers' ``Mask2FormerForUniversalSegmentation``: the image processor
    prepares the uint8 images, ``post_process_instance_segmentation`` turns the queries into instances (score =
    class probability × mean mask probability, the top ``num_queries`` (query, class) pairs, binary masks at the
    image's size), labels come from ``config.id2label`` through :data:`LABEL_ALIASES`, boxes are the masks' tight
    boxes. Every instance with a non-empty mask is returned; the thresholds are the rules'. Frozen, float32."""

    def __init__(self, model: nn.Module, image_processor: Any, *, device: torch.device | str | None = None,
                 label_aliases: Mapping[str, str] | None = None, batch_size: int = 8):
        self.device = torch.device(device or "cpu")
        self.model = model.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.image_processor = image_processor
        self.batch_size = int(batch_size)
        aliases = dict(LABEL_ALIASES if label_aliases is None else label_aliases)
        self.labels = {int(k): _norm_label(v, aliases) for k, v in model.config.id2label.items()}

    @property
    def classes(self) -> frozenset[str]:
        return frozenset(self.labels.values())

    def to(self, device: torch.device | str) -> Mask2FormerDetector:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def detect(self, images: np.ndarray, classes: Collection[str] | None = None) -> list[list[Detection]]:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"Mask2FormerDetector: expected uint8 [N, H, W, 3] images, got {images.dtype} "
                             f"{tuple(images.shape)}")
        wanted = None if classes is None else set(classes)
        out: list[list[Detection]] = []
        for start in range(0, len(images), self.batch_size):
            batch = list(images[start:start + self.batch_size])
            enc = self.image_processor(images=batch, return_tensors="pt", input_data_format="channels_last")
            kwargs = {"pixel_values": enc["pixel_values"].to(self.device, torch.float32)}
            if "pixel_mask" in enc:
                kwargs["pixel_mask"] = enc["pixel_mask"].to(self.device)
            outputs = self.model(**kwargs)
            sizes = [tuple(im.shape[:2]) for im in batch]
            results = self.image_processor.post_process_instance_segmentation(
                outputs, threshold=0.0, target_sizes=sizes, return_binary_maps=True)
            for res in results:
                dets: list[Detection] = []
                infos = res["segments_info"]
                masks = res["segmentation"].bool().cpu().numpy() if infos else None
                for k, info in enumerate(infos):
                    label = self.labels.get(int(info["label_id"]))
                    if label is None or (wanted is not None and label not in wanted):
                        continue
                    mask = masks[k]
                    dets.append(Detection(label, float(info["score"]), box_from_mask(mask), mask))
                out.append(dets)
        return out


class ClipColorClassifier:
    """GenEval's colour classifier on a transformers ``CLIPModel``: each object's pixels outside its mask become
    grey (:data:`BACKGROUND`), the image is cropped to the object's box (PIL rounding), preprocessed by the CLIP
    image processor, and compared by cosine with one text embedding per colour — the normalised mean of the
    normalised embeddings of :data:`COLOR_TEMPLATES` filled with the colour and the class name. The colour with the
    largest cosine wins. Frozen, float32; text embeddings are cached per class."""

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, *,
                 device: torch.device | str | None = None, colors: Sequence[str] = COLORS,
                 templates: Sequence[str] = COLOR_TEMPLATES, background: tuple[int, int, int] = BACKGROUND):
        self.device = torch.device(device or "cpu")
        self.model = model.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.colors, self.templates = tuple(colors), tuple(templates)
        self.background = np.asarray(background, dtype=np.uint8)
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self._text: dict[str, torch.Tensor] = {}

    def to(self, device: torch.device | str) -> ClipColorClassifier:
        self.device = torch.device(device)
        self.model.to(self.device)
        self._text = {k: v.to(self.device) for k, v in self._text.items()}
        return self

    @torch.no_grad()
    def text_weights(self, classname: str) -> torch.Tensor:
        """``[len(colors), D]`` unit colour embeddings for objects of ``classname``."""
        if classname not in self._text:
            texts = [t.format(color=c, object=classname) for c in self.colors for t in self.templates]
            tok = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="pt")
            emb = unit(pooled(self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device),
                attention_mask=tok["attention_mask"].to(self.device))).float())
            emb = emb.view(len(self.colors), len(self.templates), -1).mean(dim=1)
            self._text[classname] = unit(emb)
        return self._text[classname]

    def crops(self, image: np.ndarray, detections: Sequence[Detection]) -> list:
        """The PIL crops the classifier sees: mask applied on the grey background, then cropped to the box."""
        from PIL import Image

        out = []
        for det in detections:
            pixels = image
            if det.mask is not None:
                if tuple(det.mask.shape) != tuple(image.shape[:2]):
                    raise ValueError(f"a {det.label} mask is {tuple(det.mask.shape)}, the image "
                                     f"{tuple(image.shape[:2])}")
                pixels = np.where(det.mask[..., None], image, self.background).astype(np.uint8)
            out.append(Image.fromarray(pixels).crop(tuple(float(v) for v in det.box[:4])))
        return out

    @torch.no_grad()
    def logits(self, image: np.ndarray, detections: Sequence[Detection], classname: str) -> torch.Tensor:
        """``[len(detections), len(colors)]`` cosine similarities of each crop with each colour."""
        weights = self.text_weights(classname)
        if not detections:
            return torch.zeros(0, len(self.colors), device=self.device)
        pixels = self.image_processor(images=self.crops(np.asarray(image), detections),
                                      return_tensors="pt")["pixel_values"]
        emb = unit(pooled(self.model.get_image_features(pixel_values=pixels.to(self.device, torch.float32))).float())
        return emb @ weights.T

    def classify(self, image: np.ndarray, detections: Sequence[Detection], classname: str) -> list[str]:
        return [self.colors[i] for i in self.logits(image, detections, classname).argmax(dim=1).tolist()]


# --------------------------------------------------------------------------------------------------------------
# The reward
# --------------------------------------------------------------------------------------------------------------

def _short(prompt: str) -> str:
    text = str(prompt)
    return text if len(text) <= 60 else text[:57] + "..."


class GenEvalReward(Reward):
    """GenEval on decoded images ``[N, 3, H, W]`` in [0, 1]: images are quantised to uint8 (as every reward's
    advantage path, docs/method.md §11), each prompt's GenEval metadata (``rtdmd.data.prompt_metadata``) is
    checked, the detector finds the prompt's classes, :func:`select_objects` keeps GenEval's objects, the colour
    classifier labels those :func:`color_requests` names, and :func:`geneval_score` gives the reward.
    :meth:`evaluate` also returns the benchmark's pass/fail. Not differentiable: it enters the advantages only."""

    differentiable = False

    def __init__(self, detector: Detector, color_classifier: ColorClassifier, *, name: str = "geneval",
                 threshold: float = THRESHOLD, counting_threshold: float = COUNTING_THRESHOLD,
                 max_objects: int = MAX_OBJECTS, max_overlap: float = MAX_OVERLAP,
                 position_threshold: float = POSITION_THRESHOLD):
        self.name = name
        self.detector = detector
        self.color_classifier = color_classifier
        self.selection = dict(threshold=threshold, counting_threshold=counting_threshold, max_objects=max_objects,
                              max_overlap=max_overlap)
        self.position_threshold = position_threshold

    def to(self, device: torch.device | str) -> GenEvalReward:
        for part in (self.detector, self.color_classifier):
            if hasattr(part, "to"):
                part.to(device)
        return self

    def metadata(self, prompt: str) -> dict[str, Any]:
        """The prompt's checked GenEval metadata; a one-line ``ValueError`` naming the reward otherwise."""
        meta = prompt_metadata(prompt)
        short = _short(prompt)
        if not meta or ("include" not in meta and "tag" not in meta):
            raise ValueError(f"{self.name}: prompt {short!r} has no GenEval metadata; the geneval reward needs its "
                             "prompts from a .jsonl file in GenEval's format (one {\"prompt\", \"tag\", \"include\", "
                             "\"exclude\"} object per line; docs/training.md §4.3)")
        return check_metadata(meta, where=f"{self.name}: prompt {short!r}")

    def _check(self, samples: torch.Tensor, prompts: Sequence[str]) -> None:
        if samples.dim() != 4 or samples.shape[1] != 3:
            raise ValueError(f"{self.name}: samples must be [N, 3, H, W] images, got shape {tuple(samples.shape)}")
        if len(prompts) != samples.shape[0]:
            raise ValueError(f"{self.name}: {samples.shape[0]} samples but {len(prompts)} prompts")

    @torch.no_grad()
    def evaluate(self, samples: torch.Tensor, prompts: Sequence[str]) -> list[GenEvalResult]:
        """Per image: the training reward, the benchmark's pass/fail and the task."""
        self._check(samples, prompts)
        metas = [self.metadata(p) for p in prompts]
        known = self.detector.classes
        for p, meta in zip(prompts, metas, strict=True):
            unknown = sorted(metadata_classes(meta) - known)
            if unknown:
                raise ValueError(f"{self.name}: prompt {_short(p)!r} asks for {unknown[0]!r}, which the detector "
                                 f"does not know (it knows {len(known)} classes)")
        images = np.stack(to_uint8_arrays(samples))
        wanted = set().union(*(metadata_classes(m) for m in metas))
        detections = self.detector.detect(images, wanted)
        if len(detections) != len(metas):
            raise ValueError(f"{self.name}: the detector returned {len(detections)} results for {len(metas)} images")
        results = []
        for image, dets, meta in zip(images, detections, metas, strict=True):
            objects = select_objects(dets, meta["tag"], **self.selection)
            for cls, n in color_requests(objects, meta).items():
                objs = objects[cls]
                colors = self.color_classifier.classify(image, objs[:n], cls)
                if len(colors) != n:
                    raise ValueError(f"{self.name}: the colour classifier returned {len(colors)} colours for {n} "
                                     "objects")
                objects[cls] = [replace(o, color=c) for o, c in zip(objs[:n], colors, strict=True)] + objs[n:]
            results.append(GenEvalResult(
                score=geneval_score(objects, meta, position_threshold=self.position_threshold),
                correct=geneval_correct(objects, meta, position_threshold=self.position_threshold),
                tag=meta["tag"]))
        return results

    def score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The training reward ``[N]`` float32 on the uint8-quantised images (the float images are never scored)."""
        results = self.evaluate(samples, list(prompts))
        return torch.tensor([r.score for r in results], dtype=torch.float32, device=samples.device)

    def advantage_score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The same score (uint8-quantised images, no gradient): what the group advantages use."""
        with torch.no_grad():
            return self(samples.detach(), prompts)


# --------------------------------------------------------------------------------------------------------------
# Loading and the builder
# --------------------------------------------------------------------------------------------------------------

_REQUIRED = {"path", "clip_path"}
_OPTIONAL = {"processor_path"}


def _mask2former_processor_class() -> type:
    try:  # transformers 5: the PIL backend is its own class (the default one needs torchvision)
        from transformers import Mask2FormerImageProcessorPil as cls
    except ImportError:  # transformers 4: Mask2FormerImageProcessor is the numpy/PIL one
        from transformers import Mask2FormerImageProcessor as cls
    return cls


def load_mask2former(folder: Path, key: str) -> nn.Module:
    """``Mask2FormerForUniversalSegmentation`` from a local folder (float32, eval, frozen); ``ValueError`` naming
    ``key`` otherwise."""
    from transformers import Mask2FormerForUniversalSegmentation

    try:
        model = Mask2FormerForUniversalSegmentation.from_pretrained(str(folder), local_files_only=True,
                                                                    dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise ValueError(f"{key}: cannot load a Mask2FormerForUniversalSegmentation from {folder}: "
                         f"{one_line(e)}") from e
    if not getattr(model.config, "id2label", None):
        raise ValueError(f"{key}: the Mask2Former model at {folder} has no id2label (class names)")
    return model.float().eval().requires_grad_(False)


def load_mask2former_processor(folder: Path, key: str) -> Any:
    """The folder's Mask2Former image processor (PIL backend); transformers' defaults if it has none."""
    return load_processor(_mask2former_processor_class(), folder, key, "a Mask2Former image processor")


def build_geneval_reward(name: str, spec: Mapping[str, Any], device: torch.device | str | None = None
                         ) -> GenEvalReward:
    """The ``geneval`` reward ``rewards.<name>`` from its spec: ``path`` (a Mask2Former COCO instance-segmentation
    folder, e.g. ``facebook/mask2former-swin-small-coco-instance`` saved locally), ``clip_path`` (a CLIP folder with
    tokenizer and image processor, e.g. ``openai/clip-vit-large-patch14``), optional ``processor_path`` (the
    Mask2Former image processor's folder; default ``path``). ``kind``/``weight``/``backprop`` are accepted and
    ignored (the mixture's); ``None`` values count as unset, and so does ``differentiable: false``. Unknown,
    missing or wrong keys raise a one-line ``ValueError`` naming ``rewards.<name>.<key>``. Never downloads."""
    s = spec_dict(name, spec)
    if s.get("kind", "geneval") != "geneval":
        raise ValueError(f"rewards.{name}.kind: expected 'geneval', got {s['kind']!r}")
    if "differentiable" in s:
        if s["differentiable"] is not False:
            raise ValueError(f"rewards.{name}.differentiable: the geneval reward is not differentiable")
        del s["differentiable"]
    check_spec_keys(name, "geneval", s, _REQUIRED, _OPTIONAL)
    key = f"rewards.{name}"
    model_dir = spec_folder(s, name, "path")
    proc_key = "processor_path" if "processor_path" in s else "path"
    proc_dir = spec_folder(s, name, proc_key)
    clip_dir = spec_folder(s, name, "clip_path")
    detector = Mask2FormerDetector(load_mask2former(model_dir, f"{key}.path"),
                                   load_mask2former_processor(proc_dir, f"{key}.{proc_key}"), device=device)
    colors = ClipColorClassifier(load_clip_model(clip_dir, f"{key}.clip_path"),
                                 load_tokenizer(clip_dir, f"{key}.clip_path"),
                                 load_image_processor(clip_dir, f"{key}.clip_path"), device=device)
    return GenEvalReward(detector, colors, name=name)
