"""GenEval as a reward (rtdmd/rewards/geneval.py; docs/method.md §11): the benchmark's rules and the reference's
partial-credit score on synthetic detections with known answers, the reward's plumbing (uint8 images, prompt
metadata from a .jsonl file, errors) with stand-in models, and the model path on a tiny random Mask2Former
(tests/tiny_mask2former.py) and a tiny random CLIP (tests/tiny_clip.py) compared with direct transformers
computations written out here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_clip import save_tiny_clip, tiny_image_processor
from tiny_mask2former import save_tiny_mask2former
from tiny_tokenizers import clip_tokenizer

from rtdmd.data import load_prompts, prompt_metadata
from rtdmd.rewards.geneval import (
    COLORS,
    ClipColorClassifier,
    ColorClassifier,
    Detection,
    Detector,
    GenEvalReward,
    Mask2FormerDetector,
    box_from_mask,
    box_iou,
    build_geneval_reward,
    check_metadata,
    color_requests,
    geneval_correct,
    geneval_score,
    relative_position,
    select_objects,
)


def det(label, box, score=0.95, color=None, mask=None):
    return Detection(label, score, tuple(float(v) for v in box), mask, color)


def meta(tag, include, exclude=()):
    return check_metadata({"tag": tag, "include": list(include), "exclude": list(exclude)})


def both(objects, metadata):
    """(training score, benchmark verdict)"""
    return geneval_score(objects, metadata), geneval_correct(objects, metadata)


# ------------------------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------------------------

def test_relative_position_directions():
    b = (40, 40, 50, 50)  # 10x10 target at the centre
    assert relative_position((10, 40, 20, 50), b) == {"left of"}
    assert relative_position((70, 40, 80, 50), b) == {"right of"}
    assert relative_position((40, 10, 50, 20), b) == {"above"}  # image y grows downwards
    assert relative_position((40, 70, 50, 80), b) == {"below"}
    # diagonal: both components are 0.707 of the offset after a 2-pixel shrink per axis -> (28/42.4) each
    assert relative_position((70, 70, 80, 80), b) == {"right of", "below"}
    # 30 degrees below the horizontal: dx = (cos30·L - 2)/L > 0.5, dy = (0.5·L - 2)/L < 0.5
    assert relative_position((40 + 52, 40 + 30, 50 + 52, 50 + 30), b) == {"right of"}


def test_relative_position_minimum_distance_and_overlap():
    # identical or concentric boxes: no offset, no relation (and no division by zero)
    assert relative_position((0, 0, 10, 10), (0, 0, 10, 10)) == set()
    assert relative_position((2, 2, 8, 8), (0, 0, 10, 10)) == set()
    # centres 3 px apart, boxes 20 wide: 3 < 0.1·(20+20) = 4 -> too close on x; same y -> no relation at all
    assert relative_position((3, 0, 23, 10), (0, 0, 20, 10)) == set()
    # the shrunk component is measured against the unshrunk offset: 7 px -> 3/7 < 0.5, none; 9 px -> 5/9, "right of"
    assert relative_position((7, 0, 27, 10), (0, 0, 20, 10)) == set()
    assert relative_position((9, 0, 29, 10), (0, 0, 20, 10)) == {"right of"}
    assert relative_position((0, 0, 20, 10), (9, 0, 29, 10)) == {"left of"}
    # tall boxes: offset (10, 10); y shrinks by 0.1·80 = 8 to 2, x by 0.1·20 = 2 to 8 -> dx 8/14.1 = 0.57 only
    assert relative_position((10, 10, 20, 50), (0, 0, 10, 40)) == {"right of"}
    # a larger threshold removes it; a zero threshold makes it diagonal
    assert relative_position((10, 10, 20, 50), (0, 0, 10, 40), position_threshold=0.5) == set()
    assert relative_position((10, 10, 20, 50), (0, 0, 10, 40), position_threshold=0.0) == {"right of", "below"}


def test_box_iou_and_box_from_mask():
    # GenEval counts pixels inclusively: 10x10 boxes overlapping on 5 columns -> 50 / 150
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0
    mask = np.zeros((20, 30), dtype=bool)
    mask[4:9, 10:13] = True
    mask[15, 2] = True
    assert box_from_mask(mask) == (2.0, 4.0, 13.0, 16.0)  # one past the last column/row
    assert box_from_mask(np.zeros((4, 4), dtype=bool)) == (0.0, 0.0, 0.0, 0.0)


# ------------------------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------------------------

def test_select_objects_thresholds_order_and_cap():
    dets = [det("cat", (0, 0, 5, 5), 0.3), det("cat", (10, 0, 15, 5), 0.31), det("cat", (20, 0, 25, 5), 0.95),
            det("dog", (0, 0, 5, 5), 0.2), det("cat", (30, 0, 35, 5), 0.89)]
    got = select_objects(dets, "two_object")
    assert list(got) == ["cat"]  # dog below 0.3 is dropped; a class with nothing left is absent
    assert [d.score for d in got["cat"]] == [0.95, 0.89, 0.31]  # strictly above 0.3, best first
    assert [d.score for d in select_objects(dets, "counting")["cat"]] == [0.95]  # counting: above 0.9
    many = [det("cat", (i, 0, i + 1, 1), 0.5 + i / 100) for i in range(20)]
    kept = select_objects(many, "single_object")["cat"]
    assert len(kept) == 16 and kept[0].score == pytest.approx(0.69) and kept[-1].score == pytest.approx(0.54)
    assert len(select_objects(many, "single_object", max_objects=3)["cat"]) == 3


def test_select_objects_overlap_suppression_off_by_default():
    dets = [det("cat", (0, 0, 9, 9), 0.9), det("cat", (1, 0, 10, 9), 0.8), det("cat", (50, 50, 59, 59), 0.7)]
    assert len(select_objects(dets, "colors")["cat"]) == 3  # GenEval: no suppression
    kept = select_objects(dets, "colors", max_overlap=0.5)["cat"]
    assert [d.score for d in kept] == [0.9, 0.7]


# ------------------------------------------------------------------------------------------------------------------
# Metadata
# ------------------------------------------------------------------------------------------------------------------

def test_check_metadata_normalises():
    m = check_metadata({"tag": "position", "prompt": "x", "include": [
        {"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}]})
    assert m == {"tag": "position", "include": [{"class": "dog", "count": 1},
                                                {"class": "cat", "count": 1, "position": ("left of", 0)}],
                 "exclude": []}


@pytest.mark.parametrize("bad, match", [
    ({"include": [{"class": "cat", "count": 1}]}, r'"tag" must be one of single_object'),
    ({"tag": "shapes", "include": [{"class": "cat", "count": 1}]}, r"got 'shapes'"),
    ({"tag": "colors", "include": []}, r'"include" must be a non-empty list'),
    ({"tag": "colors", "include": [{"class": "cat"}]}, r'"include"\[0\]: "count" must be an integer >= 1'),
    ({"tag": "colors", "include": [{"class": "cat", "count": 0}]}, r'"count" must be an integer >= 1, got 0'),
    ({"tag": "colors", "include": [{"class": "cat", "count": True}]}, r'"count" must be an integer'),
    ({"tag": "colors", "include": [{"class": "", "count": 1}]}, r'"class" must be a non-empty string'),
    ({"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "teal"}]}, r'"color" must be one of red'),
    ({"tag": "position", "include": [{"class": "cat", "count": 1, "position": ["left of", 0]}]},
     r'"include"\[0\]: "position" must be \[relation, index\]'),
    ({"tag": "position", "include": [{"class": "a", "count": 1}, {"class": "b", "count": 1,
                                                                  "position": ["near", 0]}]}, r"got \['near', 0\]"),
    ({"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": {"class": "cat"}},
     r'"exclude" must be a list'),
    ({"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": -1}]},
     r'"exclude"\[0\]: "count"'),
    (["tag"], r"must be an object, got list"),
])
def test_check_metadata_errors(bad, match):
    with pytest.raises(ValueError, match=match) as e:
        check_metadata(bad, where="geneval: prompt 'x'")
    assert str(e.value).startswith("geneval: prompt 'x'") and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------------------------
# The rules, task by task (known answers)
# ------------------------------------------------------------------------------------------------------------------

def test_single_object():
    m = meta("single_object", [{"class": "cat", "count": 1}])
    assert both({"cat": [det("cat", (0, 0, 9, 9))]}, m) == (1.0, True)
    assert both({}, m) == (0.0, False)
    assert both({"dog": [det("dog", (0, 0, 9, 9))]}, m) == (0.0, False)
    # two cats: the benchmark asks for at least one; the training reward for exactly one (1 - |1-2|/1 = 0)
    assert both({"cat": [det("cat", (0, 0, 9, 9)), det("cat", (20, 0, 29, 9))]}, m) == (0.0, True)


def test_two_object():
    m = meta("two_object", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}])
    cat, dog = det("cat", (0, 0, 9, 9)), det("dog", (20, 0, 29, 9))
    assert both({"cat": [cat], "dog": [dog]}, m) == (1.0, True)
    assert both({"cat": [cat]}, m) == (0.5, False)


def test_counting_and_its_exclude_clause():
    m = meta("counting", [{"class": "cat", "count": 3}], [{"class": "cat", "count": 4}])
    cats = [det("cat", (10 * i, 0, 10 * i + 9, 9)) for i in range(7)]
    assert both({"cat": cats[:3]}, m) == (1.0, True)
    s, ok = both({"cat": cats[:2]}, m)
    assert s == pytest.approx(2 / 3) and not ok
    s, ok = both({"cat": cats[:4]}, m)  # one too many: the exclude clause fails the benchmark
    assert s == pytest.approx(2 / 3) and not ok
    # seven cats: the reference's 1 - 4/3 is negative; clipped to 0 here. The exclude clause on the counted class
    # adds no term (the exact-count term already covers it), so GenEval prompts score as in the reference.
    assert both({"cat": cats}, m) == (0.0, False)


def test_colors():
    m = meta("colors", [{"class": "cat", "count": 1, "color": "red"}])
    assert both({"cat": [det("cat", (0, 0, 9, 9), color="red")]}, m) == (1.0, True)
    assert both({"cat": [det("cat", (0, 0, 9, 9), color="blue")]}, m) == (0.5, False)  # terms: count 1, colour 0
    assert both({}, m) == (0.0, False)  # terms: count 0, and 0 for the colour check it never reached
    # two cats, the best one red: the benchmark colours the best `count`; the reward wants exactly one cat
    two = {"cat": [det("cat", (0, 0, 9, 9), 0.9, color="red"), det("cat", (20, 0, 29, 9), 0.8)]}
    assert both(two, m) == (0.0, True)


def test_color_fraction_with_counts():
    m = meta("colors", [{"class": "cat", "count": 2, "color": "red"}])
    one_red = {"cat": [det("cat", (0, 0, 9, 9), color="red"), det("cat", (20, 0, 29, 9), color="green")]}
    assert both(one_red, m) == (pytest.approx(0.75), False)  # mean(count 1, colour 1/2)


def test_position():
    m = meta("position", [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}])
    dog = det("dog", (50, 0, 59, 9))
    assert both({"dog": [dog], "cat": [det("cat", (0, 0, 9, 9))]}, m) == (1.0, True)
    # wrong side: terms dog 1, cat 1, relation 0 (the reference also appends a 1 after the 0, giving 0.75)
    s, ok = both({"dog": [dog], "cat": [det("cat", (80, 0, 89, 9))]}, m)
    assert s == pytest.approx(2 / 3) and not ok
    # overlapping boxes are in no relation at all
    s, ok = both({"dog": [dog], "cat": [det("cat", (51, 0, 60, 9))]}, m)
    assert s == pytest.approx(2 / 3) and not ok
    # no target: dog 0, cat 1, relation 0
    s, ok = both({"cat": [det("cat", (0, 0, 9, 9))]}, m)
    assert s == pytest.approx(1 / 3) and not ok
    # cat missing: dog 1, cat 0, and one 0 for the relation it never reached
    s, ok = both({"dog": [dog]}, m)
    assert s == pytest.approx(1 / 3) and not ok


def test_position_checks_every_pair():
    m = meta("position", [{"class": "dog", "count": 2}, {"class": "cat", "count": 1, "position": ["above", 0]}])
    dogs = [det("dog", (0, 50, 9, 59)), det("dog", (20, 50, 29, 59))]
    assert both({"dog": dogs, "cat": [det("cat", (10, 0, 19, 9))]}, m) == (1.0, True)
    low_dog = [dogs[0], det("dog", (20, 0, 29, 9))]  # level with the cat: not every pair has the cat above
    assert both({"dog": low_dog, "cat": [det("cat", (10, 0, 19, 9))]}, m) == (pytest.approx(2 / 3), False)


def test_color_attr():
    m = meta("color_attr", [{"class": "cat", "count": 1, "color": "red"},
                            {"class": "dog", "count": 1, "color": "blue"}])
    red_cat = det("cat", (0, 0, 9, 9), color="red")
    assert both({"cat": [red_cat], "dog": [det("dog", (20, 0, 29, 9), color="blue")]}, m) == (1.0, True)
    # the colours swapped onto the wrong object: each clause fails its colour check
    s, ok = both({"cat": [det("cat", (0, 0, 9, 9), color="blue")], "dog": [det("dog", (20, 0, 29, 9),
                                                                                  color="red")]}, m)
    assert s == pytest.approx(0.5) and not ok
    assert both({"cat": [red_cat], "dog": [det("dog", (20, 0, 29, 9), color="red")]}, m) == (0.75, False)


def test_exclude_on_another_class():
    m = meta("single_object", [{"class": "cat", "count": 1}], [{"class": "dog", "count": 1}])
    cat = det("cat", (0, 0, 9, 9))
    assert both({"cat": [cat]}, m) == (1.0, True)
    assert both({"cat": [cat], "dog": [det("dog", (20, 0, 29, 9))]}, m) == (0.5, False)


def test_color_requests_and_missing_colours():
    m = meta("color_attr", [{"class": "cat", "count": 2, "color": "red"}, {"class": "dog", "count": 1,
                                                                          "color": "blue"}])
    cats = [det("cat", (10 * i, 0, 10 * i + 9, 9)) for i in range(3)]
    assert color_requests({"cat": cats, "dog": []}, m) == {"cat": 2}  # no dog: nothing to colour there
    assert color_requests({"cat": cats[:1]}, m) == {}  # too few cats: the colour check is never reached
    with pytest.raises(ValueError, match="detection 0 of 'cat' has no colour label"):
        geneval_score({"cat": cats[:2], "dog": []}, m)


# ------------------------------------------------------------------------------------------------------------------
# The reward with stand-in models: uint8 images, metadata from a .jsonl file, errors
# ------------------------------------------------------------------------------------------------------------------

class BoxDetector:
    """Returns given detections per image; records what it was asked."""

    def __init__(self, per_image, classes=("cat", "dog", "computer mouse")):
        self.per_image, self.calls = per_image, []
        self._classes = frozenset(classes)

    @property
    def classes(self):
        return self._classes

    def detect(self, images, classes=None):
        self.calls.append((images.copy(), set(classes)))
        return [list(d) for d in self.per_image[:len(images)]]


class MeanColor:
    """Names the colour of a box by its mean pixel: red, green or blue, whichever channel dominates."""

    def __init__(self):
        self.calls = []

    def classify(self, image, detections, classname):
        self.calls.append((classname, len(detections)))
        out = []
        for d in detections:
            x0, y0, x1, y1 = (int(v) for v in d.box)
            out.append(("red", "green", "blue")[int(image[y0:y1, x0:x1].reshape(-1, 3).mean(0).argmax())])
        return out


def _painted(n=2, h=32, w=48):
    """Float images in [0, 1]: a red square left, a blue square right, noise elsewhere."""
    x = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0)) * 0.2
    x[:, 0, 8:16, 4:12] = 0.9
    x[:, 2, 8:16, 30:38] = 0.9
    return x


def _jsonl(tmp_path, records):
    p = tmp_path / "geneval.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return load_prompts(p)


RECORDS = [
    {"tag": "color_attr", "include": [{"class": "cat", "count": 1, "color": "red"},
                                      {"class": "dog", "count": 1, "color": "blue"}],
     "prompt": "a photo of a red cat and a blue dog"},
    {"tag": "position", "include": [{"class": "dog", "count": 1},
                                    {"class": "cat", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a cat right of a dog"},
]


def test_reward_from_jsonl_prompts(tmp_path):
    prompts = _jsonl(tmp_path, RECORDS)
    assert prompt_metadata(prompts[1])["include"][1]["position"] == ["right of", 0]
    cat, dog = det("cat", (4, 8, 12, 16), 0.8), det("dog", (30, 8, 38, 16), 0.7)
    detector, colors = BoxDetector([[cat, dog, det("dog", (0, 0, 4, 4), 0.1)], [cat, dog]]), MeanColor()
    reward = GenEvalReward(detector, colors)
    assert isinstance(detector, Detector) and isinstance(colors, ColorClassifier) and not reward.differentiable
    x = _painted()
    results = reward.evaluate(x, prompts)
    # image 0: red cat, blue dog (the 0.1 dog is below the threshold); image 1: the cat is left of the dog
    assert [(r.score, r.correct, r.tag) for r in results] == [(1.0, True, "color_attr"),
                                                              (pytest.approx(2 / 3), False, "position")]
    images, classes = detector.calls[0]
    assert images.dtype == np.uint8 and images.shape == (2, 32, 48, 3) and classes == {"cat", "dog"}
    np.testing.assert_array_equal(images, (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
    assert colors.calls == [("cat", 1), ("dog", 1)]  # only the colour clauses' objects are classified
    s = reward(x.requires_grad_(True), prompts)
    assert s.dtype == torch.float32 and s.shape == (2,) and not s.requires_grad
    torch.testing.assert_close(s, torch.tensor([1.0, 2 / 3]))
    torch.testing.assert_close(reward.advantage_score(x, prompts), s)


def test_reward_scores_uint8_levels():
    prompts = _meta_prompts()
    reward = GenEvalReward(BoxDetector([[det("cat", (0, 0, 4, 4))]] * 2), MeanColor())
    x = (_painted() * 255).round() / 255
    off_grid = x + torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) * 0.98 / 255 - 0.49 / 255
    assert not torch.equal(off_grid, x)  # a different float image on the same uint8 levels
    reward(off_grid, prompts)
    reward(x, prompts)
    a, b = (c[0] for c in reward.detector.calls)
    np.testing.assert_array_equal(a, b)


def _meta_prompts():
    from rtdmd.data import Prompt

    m = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    return [Prompt("a photo of a cat", m), Prompt("a photo of a cat", m)]


def test_reward_errors(tmp_path):
    from rtdmd.data import Prompt

    reward = GenEvalReward(BoxDetector([[]] * 2), MeanColor(), name="gen")
    x = _painted()
    with pytest.raises(ValueError) as e:
        reward(x, ["a photo of a cat", "a dog"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("gen: prompt 'a photo of a cat' has no GenEval metadata")
    assert ".jsonl" in msg and "GenEval's format" in msg
    txt = tmp_path / "p.txt"
    txt.write_text("a photo of a cat\na dog\n", encoding="utf-8")
    with pytest.raises(ValueError, match="has no GenEval metadata"):
        reward(x, load_prompts(txt))  # .txt prompts carry no metadata
    with pytest.raises(ValueError, match=r"gen: prompt 'a cat': \"tag\" must be one of"):
        reward(x, [Prompt("a cat", {"include": [{"class": "cat", "count": 1}]}), Prompt("b", {})])
    bad = Prompt("a zebra", {"tag": "single_object", "include": [{"class": "zebra", "count": 1}]})
    with pytest.raises(ValueError, match="asks for 'zebra', which the detector does not know"):
        reward(x, [bad, bad])
    with pytest.raises(ValueError, match="2 samples but 1 prompts"):
        reward(x, _meta_prompts()[:1])
    with pytest.raises(ValueError, match=r"samples must be \[N, 3, H, W\]"):
        reward.evaluate(x[:, :1], _meta_prompts())


# ------------------------------------------------------------------------------------------------------------------
# The model path: tiny random Mask2Former + tiny random CLIP, loaded through build_geneval_reward
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("geneval")
    return {
        "m2f": save_tiny_mask2former(root / "m2f", seed=0),
        "m2f_model": save_tiny_mask2former(root / "m2f_model", seed=0, processor=False),
        "m2f_proc": save_tiny_mask2former(root / "m2f_proc", model=False),
        "clip": save_tiny_clip(root / "clip", seed=0),
        "empty": root / "empty",
    }


@pytest.fixture(scope="module")
def reward(dirs):
    return build_geneval_reward("geneval", {"path": str(dirs["m2f"]), "clip_path": str(dirs["clip"])})


def _model_images(n=3, h=48, w=64):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(1))


def _direct_detections(folder, images_u8):
    """Mask2Former straight through transformers: processor, model, post-processing with every score kept."""
    from transformers import Mask2FormerForUniversalSegmentation
    from transformers import Mask2FormerImageProcessorPil as Proc

    model = Mask2FormerForUniversalSegmentation.from_pretrained(str(folder), local_files_only=True).eval()
    proc = Proc.from_pretrained(str(folder))
    enc = proc(images=list(images_u8), return_tensors="pt", input_data_format="channels_last")
    with torch.no_grad():
        out = model(pixel_values=enc["pixel_values"], pixel_mask=enc["pixel_mask"])
    res = proc.post_process_instance_segmentation(out, threshold=0.0, target_sizes=[im.shape[:2] for im in images_u8],
                                                  return_binary_maps=True)
    names = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
    dets = []
    for r in res:
        masks = r["segmentation"].bool().numpy() if r["segments_info"] else None
        dets.append([(names.get(model.config.id2label[s["label_id"]], model.config.id2label[s["label_id"]]),
                      s["score"], masks[k]) for k, s in enumerate(r["segments_info"])])
    return dets


def _direct_color_logits(folder, image_u8, dets, classname):
    """GenEval's colour classifier written out: PIL composite on #999, crop, CLIP processor, templates averaged."""
    from PIL import Image
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).float().eval()
    tok = clip_tokenizer()

    def unit(v):
        return v / v.norm(dim=-1, keepdim=True)

    def feats(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    weights = []
    for c in COLORS:
        texts = [f"a photo of a {c} {classname}", f"a photo of a {c}-colored {classname}", f"a photo of a {c} object"]
        t = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        with torch.no_grad():
            e = unit(feats(model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])))
        weights.append(unit(e.mean(0)))
    weights = torch.stack(weights)
    image = Image.fromarray(image_u8)
    crops = [Image.composite(image, Image.new("RGB", image.size, "#999"), Image.fromarray(d.mask)).crop(d.box)
             for d in dets]
    px = tiny_image_processor()(images=crops, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        e = unit(feats(model.get_image_features(pixel_values=px)))
    return e @ weights.T


def test_detector_matches_transformers(reward, dirs):
    detector = reward.detector
    assert isinstance(detector, Mask2FormerDetector) and isinstance(detector, Detector)
    # COCO's names from id2label, read as GenEval's
    assert detector.classes == {"person", "cat", "dog", "computer mouse", "tv remote", "computer keyboard"}
    x = _model_images()
    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    got = detector.detect(u8)
    want = _direct_detections(dirs["m2f"], u8)
    assert len(got) == 3 and sum(map(len, got)) > 0
    for g_img, w_img in zip(got, want, strict=True):
        assert [d.label for d in g_img] == [w[0] for w in w_img]
        assert [d.score for d in g_img] == pytest.approx([w[1] for w in w_img], abs=1e-5)
        for d, w in zip(g_img, w_img, strict=True):
            assert d.mask.shape == (48, 64) and d.mask.dtype == bool
            np.testing.assert_array_equal(d.mask, w[2])
            assert d.box == box_from_mask(w[2])
    # the class filter
    only_dogs = detector.detect(u8, {"dog"})
    assert all(d.label == "dog" for img in only_dogs for d in img)
    assert [len(a) for a in only_dogs] == [sum(d.label == "dog" for d in img) for img in got]


def test_color_classifier_matches_transformers(reward, dirs):
    colors = reward.color_classifier
    assert isinstance(colors, ClipColorClassifier) and isinstance(colors, ColorClassifier)
    x = _model_images(n=1)
    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()[0]
    mask = np.zeros((48, 64), dtype=bool)
    mask[5:30, 10:41] = True
    mask[12:20, 20:25] = False
    # a holed mask with its tight box, and a full mask with a fractional box (PIL rounds the crop)
    dets = [det("cat", box_from_mask(mask), mask=mask), det("cat", (3.4, 2.6, 40.5, 33.5), mask=np.ones_like(mask))]
    got = colors.logits(u8, dets, "cat")
    want = _direct_color_logits(dirs["clip"], u8, dets, "cat")
    assert got.shape == (2, len(COLORS))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert colors.classify(u8, dets, "cat") == [COLORS[i] for i in want.argmax(1).tolist()]
    assert colors.classify(u8, [], "cat") == []


def _model_prompts():
    from rtdmd.data import Prompt

    return [
        Prompt("a photo of a dog", {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}),
        Prompt("a photo of a red computer mouse and a blue dog", {"tag": "color_attr", "include": [
            {"class": "computer mouse", "count": 1, "color": "red"}, {"class": "dog", "count": 1, "color": "blue"}]}),
        Prompt("a photo of a dog above a computer mouse", {"tag": "position", "include": [
            {"class": "computer mouse", "count": 1}, {"class": "dog", "count": 1, "position": ["above", 0]}]}),
    ]


def test_model_reward_equals_rules_on_direct_outputs(reward, dirs):
    x = _model_images()
    prompts = _model_prompts()
    got = reward(x, prompts)
    assert got.shape == (3,) and got.dtype == torch.float32 and bool(((got >= 0) & (got <= 1)).all())
    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    want = []
    for image, raw, p in zip(u8, _direct_detections(dirs["m2f"], u8), prompts, strict=True):
        m = check_metadata(prompt_metadata(p))
        objects = select_objects([Detection(lbl, s, box_from_mask(mk), mk) for lbl, s, mk in raw], m["tag"])
        for cls, n in color_requests(objects, m).items():
            logits = _direct_color_logits(dirs["clip"], image, objects[cls][:n], cls)
            objects[cls] = [Detection(o.label, o.score, o.box, o.mask, COLORS[int(i)])
                            for o, i in zip(objects[cls][:n], logits.argmax(1), strict=True)] + objects[cls][n:]
        want.append(geneval_score(objects, m))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))


def test_model_reward_is_deterministic(reward, dirs):
    x = _model_images()
    prompts = _model_prompts()
    first = reward(x, prompts)
    torch.testing.assert_close(reward(x, prompts), first, atol=0, rtol=0)
    torch.testing.assert_close(reward.advantage_score(x, prompts), first, atol=0, rtol=0)
    # a second load, with the image processor from its own folder
    other = build_geneval_reward("g2", {"kind": "geneval", "path": str(dirs["m2f_model"]),
                                        "processor_path": str(dirs["m2f_proc"]), "clip_path": str(dirs["clip"]),
                                        "weight": 1.0, "backprop": False, "differentiable": False,
                                        "tokenizer_path": None})
    torch.testing.assert_close(other(x, prompts), first, atol=0, rtol=0)
    assert [r.tag for r in reward.evaluate(x, prompts)] == ["single_object", "color_attr", "position"]


@pytest.mark.parametrize("spec, match", [
    ({"clip_path": "CLIP"}, r"rewards\.geneval\.path: required for the geneval reward"),
    ({"path": "M2F"}, r"rewards\.geneval\.clip_path: required for the geneval reward"),
    ({"path": "M2F", "clip_path": "CLIP", "tokenizer_path": "CLIP"},
     r"rewards\.geneval\.tokenizer_path: unknown key for the geneval reward \(known: clip_path, path, processor_path"),
    ({"path": "M2F", "clip_path": "CLIP", "function": "m:f"}, r"rewards\.geneval\.function: .*only plug-in"),
    ({"path": "M2F", "clip_path": "CLIP", "differentiable": True},
     r"rewards\.geneval\.differentiable: the geneval reward is not differentiable"),
    ({"path": "M2F", "clip_path": "CLIP", "kind": "clipscore"}, r"rewards\.geneval\.kind: expected 'geneval'"),
    ({"path": "NOWHERE", "clip_path": "CLIP"}, r"rewards\.geneval\.path: no such folder: .*NOWHERE"),
    ({"path": "M2F", "clip_path": "NOWHERE"}, r"rewards\.geneval\.clip_path: no such folder"),
    ({"path": "M2F", "processor_path": "NOWHERE", "clip_path": "CLIP"}, r"rewards\.geneval\.processor_path: no such"),
    ({"path": "EMPTY", "clip_path": "CLIP"},
     r"rewards\.geneval\.path: cannot load a Mask2FormerForUniversalSegmentation from .*empty"),
    ({"path": "M2F", "clip_path": "EMPTY"}, r"rewards\.geneval\.clip_path: cannot load a CLIPModel"),
])
def test_spec_errors(dirs, tmp_path, spec, match):
    dirs["empty"].mkdir(exist_ok=True)
    where = {"M2F": str(dirs["m2f"]), "CLIP": str(dirs["clip"]), "EMPTY": str(dirs["empty"]),
             "NOWHERE": str(tmp_path / "NOWHERE")}
    spec = {k: where.get(v, v) if isinstance(v, str) else v for k, v in spec.items()}
    with pytest.raises(ValueError, match=match) as e:
        build_geneval_reward("geneval", spec)
    assert "\n" not in str(e.value)
