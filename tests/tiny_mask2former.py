"""A tiny Mask2Former COCO-style instance segmenter for the GenEval tests, built offline and deterministically.

:func:`save_tiny_mask2former` writes a transformers folder (``Mask2FormerForUniversalSegmentation`` with a one-block
Swin backbone and a handful of COCO class names, plus a Mask2Former image processor at 64 px) with
``save_pretrained``, so the reward loads it through the stock ``from_pretrained``. The class head is scaled up so
that most queries commit to one class: random weights then give confident, varied detections (scores near the
mean mask probability, about 0.5: above GenEval's 0.3, below its counting threshold 0.9).
"""

from __future__ import annotations

from pathlib import Path

import torch

#: COCO names as a COCO checkpoint's id2label spells them ("mouse", "remote", "keyboard" are GenEval's
#: "computer mouse", "tv remote", "computer keyboard")
LABELS = ("person", "cat", "dog", "mouse", "remote", "keyboard")
SIZE = 64


def tiny_mask2former_config(labels=LABELS, *, num_queries: int = 8):
    from transformers import Mask2FormerConfig, SwinConfig

    backbone = SwinConfig(image_size=SIZE, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"])
    return Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                             encoder_feedforward_dim=64, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                             dim_feedforward=64, num_queries=num_queries,
                             id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})


def tiny_mask2former_model(seed: int = 0, labels=LABELS, *, class_scale: float = 30.0):
    """A random, frozen float32 ``Mask2FormerForUniversalSegmentation``, the same for the same seed."""
    from transformers import Mask2FormerForUniversalSegmentation

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Mask2FormerForUniversalSegmentation(tiny_mask2former_config(labels))
    with torch.no_grad():
        model.class_predictor.weight.mul_(class_scale)
        model.class_predictor.bias[-1] = -10.0  # the "no object" class
    return model.float().eval().requires_grad_(False)


def tiny_mask2former_processor():
    try:
        from transformers import Mask2FormerImageProcessorPil as cls  # transformers 5
    except ImportError:
        from transformers import Mask2FormerImageProcessor as cls  # transformers 4
    return cls(size={"shortest_edge": SIZE, "longest_edge": SIZE})


def save_tiny_mask2former(folder: str | Path, *, seed: int = 0, model: bool = True, processor: bool = True,
                          labels=LABELS) -> Path:
    """Write a tiny Mask2Former folder (model and/or image processor) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if model:
        tiny_mask2former_model(seed, labels).save_pretrained(folder)
    if processor:
        tiny_mask2former_processor().save_pretrained(folder)
    return folder
