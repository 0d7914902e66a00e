"""CLIP-family image rewards (method.md §7, §11, §13.15): CLIPScore, PickScore, HPS v2.1 and the LAION aesthetic score.

Samples are float images ``[N, 3, H, W]`` in [0, 1] (the decoded ``clamp(img/2 + 0.5, 0, 1)``). Two paths, as in the
reference:

* :meth:`~rtdmd.rewards.base.Reward.score` — the float path of reward back-propagation (docs/method.md §7): tensor
  preprocessing as the reference's torchvision transforms do it, gradient flowing to the images for the
  differentiable scorers (the models themselves are frozen).
* :meth:`advantage_score` — the GRPO rollout path (docs/method.md §11, §13.15): images quantized to uint8 levels first,
  ``(x*255).round().clamp(0, 255)/255``, then the rollout preprocessing (the HF processor, i.e. PIL bicubic, for
  PickScore and the aesthetic score), no gradient.

Models load from local folders with the stock ``from_pretrained(..., local_files_only=True)``; nothing is
downloaded. Weights are float32. :func:`rtdmd.rewards.builder.build_image_reward` builds any of them (or a plug-in)
from a ``rewards.<name>`` spec.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward, quantize_uint8

__all__ = [
    "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "Aesthetic", "AestheticHead", "CLIPScore", "HPSv2", "ImageReward",
    "PickScore", "build_aesthetic_head", "normalize", "pooled", "processor_transform", "resize_max_pad",
    "resize_shorter_center_crop", "to_uint8_arrays", "unit",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PICKSCORE_SCALE = 26.0  # PickScore's reward is exp(logit_scale)·cos / 26 (docs/method.md §7)


# --------------------------------------------------------------------------------------------------------------
# Tensor preprocessing (the reference's torchvision / open_clip transforms on float tensors)
# --------------------------------------------------------------------------------------------------------------

def _resize(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):  # torchvision returns the image untouched at its own size
        return images
    return F.interpolate(images, size=size, mode=mode, align_corners=False, antialias=True)


def resize_shorter_center_crop(images: torch.Tensor, size: int | tuple[int, int], crop: tuple[int, int], *,
                               mode: str = "bilinear", crop_rounding: str = "round") -> torch.Tensor:
    """torchvision ``Resize(size)`` (shorter side to ``size``, longer ``int(size*long/short)``, antialiased)
    then ``CenterCrop(crop)``. A ``(h, w)`` size resizes to exactly that. ``crop_rounding="round"`` places the
    crop like torchvision (``round((H-h)/2)``), ``"floor"`` like the HF image processors (``(H-h)//2``)."""
    h, w = images.shape[-2:]
    if isinstance(size, int):
        short, long = min(h, w), max(h, w)
        new_long = int(size * long / short)
        new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    else:
        new_h, new_w = size
    x = _resize(images, (new_h, new_w), mode)
    ch, cw = crop
    if ch > new_h or cw > new_w:  # torchvision pads with zeros when the crop is larger than the image
        pw, ph = max(cw - new_w, 0), max(ch - new_h, 0)
        x = F.pad(x, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2), value=0.0)
        new_h, new_w = x.shape[-2:]
    if crop_rounding == "round":
        top, left = int(round((new_h - ch) / 2.0)), int(round((new_w - cw) / 2.0))
    elif crop_rounding == "floor":
        top, left = (new_h - ch) // 2, (new_w - cw) // 2
    else:
        raise ValueError(f"crop_rounding: expected 'round' or 'floor', got {crop_rounding!r}")
    return x[..., top:top + ch, left:left + cw]


def resize_max_pad(images: torch.Tensor, size: int, *, mode: str = "bicubic") -> torch.Tensor:
    """open_clip's ``ResizeMaxSize(size)`` as HPS v2 uses it: the longer side to ``size`` (each side
    ``round(side*size/max(H, W))``, bicubic, antialiased), then zero padding to ``size × size``, centred
    (``pad//2`` before, the rest after)."""
    h, w = images.shape[-2:]
    scale = size / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    x = _resize(images, (new_h, new_w), mode)
    ph, pw = size - new_h, size - new_w
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def _field(obj: Any, name: str) -> Any:
    """A field of an HF size dict (a ``dict`` in transformers 4, a ``SizeDict`` in 5)."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def processor_transform(processor: Any) -> tuple[int | tuple[int, int], tuple[int, int], tuple, tuple]:
    """``(resize, crop, mean, std)`` of a CLIP image processor: ``resize`` is the shorter-side size (or an exact
    ``(h, w)``); CLIP's defaults (224, 224, OpenAI mean/std) fill what the processor does not set."""
    size = getattr(processor, "size", None)
    short = _field(size, "shortest_edge")
    if short is not None:
        resize: int | tuple[int, int] = int(short)
    elif _field(size, "height") is not None and _field(size, "width") is not None:
        resize = (int(_field(size, "height")), int(_field(size, "width")))
    else:
        resize = 224
    crop_size = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", True) is False:
        crop = resize if isinstance(resize, tuple) else (resize, resize)
    elif _field(crop_size, "height") is not None:
        crop = (int(_field(crop_size, "height")), int(_field(crop_size, "width")))
    else:
        crop = (224, 224)
    mean = tuple(float(v) for v in (getattr(processor, "image_mean", None) or OPENAI_CLIP_MEAN))
    std = tuple(float(v) for v in (getattr(processor, "image_std", None) or OPENAI_CLIP_STD))
    return resize, crop, mean, std


def pooled(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and an output object in 5 (docs/training.md §5.5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def unit(x: torch.Tensor) -> torch.Tensor:
    """``x`` L2-normalised along the last dimension."""
    return x / x.norm(dim=-1, keepdim=True)


def to_uint8_arrays(images: torch.Tensor) -> list:
    """uint8 ``[H, W, 3]`` numpy arrays of the quantized images: what the reference hands the HF processor as PIL."""
    q = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    return list(q.permute(0, 2, 3, 1).cpu().numpy())


# --------------------------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------------------------

class ImageReward(Reward):
    """Shared plumbing: input checks, the device, and the uint8 rollout path of :meth:`advantage_score`."""

    def __init__(self, name: str, device: torch.device | str | None):
        self.name = name
        self.device = torch.device(device or "cpu")

    def _modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def to(self, device: torch.device | str) -> ImageReward:
        """Move the models to ``device`` (returns ``self``)."""
        self.device = torch.device(device)
        for m in self._modules():
            m.to(self.device)
        return self

    def _check(self, samples: torch.Tensor, prompts: Sequence[str]) -> None:
        if samples.dim() != 4 or samples.shape[1] != 3:
            raise ValueError(f"{self.name}: samples must be [N, 3, H, W] images, got shape {tuple(samples.shape)}")
        if len(prompts) != samples.shape[0]:
            raise ValueError(f"{self.name}: {samples.shape[0]} samples but {len(prompts)} prompts")

    def score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self._check(samples, prompts)
        x = samples.to(device=self.device, dtype=torch.float32)
        return self._score_float(x, list(prompts)).float().to(samples.device)

    def advantage_score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The rollout score: uint8-quantized images with the rollout preprocessing, no gradient (method.md §11)."""
        self._check(samples, prompts)
        with torch.no_grad():
            q = quantize_uint8(samples.to(self.device))
            out = self._score_quantized(q, list(prompts)).float().to(samples.device)
        if out.shape != (samples.shape[0],):
            raise ValueError(f"reward {self.name!r} returned shape {tuple(out.shape)}, expected ({samples.shape[0]},)")
        return out

    def _score_float(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def _score_quantized(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Default: the float path on the quantized images (CLIPScore and HPS preprocess the same way)."""
        return self._score_float(images, prompts)


class _ClipTextImage(ImageReward):
    """A frozen transformers ``CLIPModel`` plus its tokenizer (prompts padded/truncated to the context length)."""

    def __init__(self, name: str, model: nn.Module, tokenizer: Any, device: torch.device | str | None,
                 *, text_attention_mask: bool = True):
        super().__init__(name, device)
        self.model = model.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.text_attention_mask = text_attention_mask

    def _modules(self) -> list[nn.Module]:
        return [self.model]

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``[N, D]``."""
        tok = self.tokenizer([str(p) for p in prompts], padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="pt")
        mask = tok["attention_mask"].to(self.device) if self.text_attention_mask else None
        out = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device), attention_mask=mask)
        return unit(pooled(out).float())

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``[N, D]`` (gradient flows to ``pixel_values``)."""
        return unit(pooled(self.model.get_image_features(pixel_values=pixel_values)).float())

    def _cosine(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (self.image_embeds(pixel_values) * self.text_embeds(prompts)).sum(dim=-1)


class CLIPScore(_ClipTextImage):
    """CLIPScore with openai CLIP ViT-L/14: ``Resize(224)`` on the shorter side (bilinear, antialiased),
    ``CenterCrop(224)``, CLIP mean/std (sizes and statistics from the folder's preprocessor config); prompts
    padded/truncated to 77 tokens; ``r = cos(image, text)`` (= ``logits_per_image.diag()/100``). Differentiable.
    The rollout path is the same transform on uint8-quantized images."""

    differentiable = True

    def __init__(self, model: nn.Module, tokenizer: Any, *, resize: int | tuple[int, int] = 224,
                 crop: tuple[int, int] = (224, 224), mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 std: Sequence[float] = OPENAI_CLIP_STD, name: str = "clipscore",
                 device: torch.device | str | None = None):
        super().__init__(name, model, tokenizer, device)
        self.resize, self.crop, self.mean, self.std = resize, tuple(crop), tuple(mean), tuple(std)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_shorter_center_crop(images, self.resize, self.crop, mode="bilinear")
        return normalize(x, self.mean, self.std)

    def _score_float(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self._cosine(self.preprocess(images), prompts)


class PickScore(_ClipTextImage):
    """PickScore_v1: ``r = exp(logit_scale)·cos(image, text) / 26`` with L2-normalised embeddings.

    Float (back-propagation) path: torchvision ``Resize`` (bilinear, antialiased) + ``CenterCrop`` + normalize built
    from the processor config. Rollout path: the HF processor (PIL bicubic resize, centre crop) on uint8 images —
    the two differ on purpose, as in the reference (docs/method.md §13.15). Differentiable."""

    differentiable = True

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, *, name: str = "pickscore",
                 device: torch.device | str | None = None):
        super().__init__(name, model, tokenizer, device)
        self.image_processor = image_processor
        self.resize, self.crop, self.mean, self.std = processor_transform(image_processor)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_shorter_center_crop(images, self.resize, self.crop, mode="bilinear")
        return normalize(x, self.mean, self.std)

    def _reward(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.model.logit_scale.exp() * self._cosine(pixel_values, prompts) / PICKSCORE_SCALE

    def _score_float(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self._reward(self.preprocess(images), prompts)

    def _score_quantized(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = self.image_processor(images=to_uint8_arrays(images), return_tensors="pt",
                                      input_data_format="channels_last")["pixel_values"]
        return self._reward(pixels.to(self.device, torch.float32), prompts)


class HPSv2(_ClipTextImage):
    """HPS v2.1: open_clip ViT-H-14 with the HPS weights (run as a converted transformers ``CLIPModel``, see
    :mod:`rtdmd.rewards.hps`). Images: ``ResizeMaxSize(224)`` (longer side, bicubic, antialiased, zero pad),
    OpenAI mean/std; prompts tokenized to the 77-token context; ``r = cos(image, text)``, the diagonal of
    ``image_features @ text_features.T``. Differentiable; the rollout path is the same on uint8 images."""

    differentiable = True

    def __init__(self, model: nn.Module, tokenizer: Any, *, name: str = "hpsv2",
                 device: torch.device | str | None = None):
        # open_clip's text tower uses only the causal mask (padding never reaches the pooled end-of-text token)
        super().__init__(name, model, tokenizer, device, text_attention_mask=False)
        self.image_size = int(model.config.vision_config.image_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(resize_max_pad(images, self.image_size, mode="bicubic"), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def _score_float(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self._cosine(self.preprocess(images), prompts)


class Aesthetic(ImageReward):
    """LAION improved aesthetic predictor v2: CLIP ViT-L/14 image embeddings, L2-normalised, through the
    predictor's MLP (five linear layers, dropout between, no activations). Preprocessing is the HF processor's
    (bicubic shorter-side resize, centre crop): the PIL processor itself on the rollout path, its tensor
    equivalent (antialiased bicubic) on the float path. Not differentiable (evaluation)."""

    differentiable = False

    def __init__(self, model: nn.Module, head: nn.Module, image_processor: Any, *, name: str = "aesthetic",
                 device: torch.device | str | None = None):
        super().__init__(name, device)
        self.model = model.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.head = head.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.image_processor = image_processor
        self.resize, self.crop, self.mean, self.std = processor_transform(image_processor)

    def _modules(self) -> list[nn.Module]:
        return [self.model, self.head]

    def _from_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        emb = unit(pooled(self.model.get_image_features(pixel_values=pixel_values)).float())
        return self.head(emb).squeeze(-1)

    def _score_float(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = resize_shorter_center_crop(images, self.resize, self.crop, mode="bicubic", crop_rounding="floor")
        return self._from_pixels(normalize(x, self.mean, self.std))

    def _score_quantized(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = self.image_processor(images=to_uint8_arrays(images), return_tensors="pt",
                                      input_data_format="channels_last")["pixel_values"]
        return self._from_pixels(pixels.to(self.device, torch.float32))


class AestheticHead(nn.Module):
    """The LAION aesthetic predictor's MLP: ``self.layers`` is the ``nn.Sequential`` its state dict names."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    @property
    def in_features(self) -> int:
        return next(m for m in self.layers if isinstance(m, nn.Linear)).in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def build_aesthetic_head(state_dict: Mapping[str, torch.Tensor], *, key: str = "path") -> AestheticHead:
    """The aesthetic predictor's MLP from its state dict (``layers.{i}.weight/bias``; dims from the tensors):
    ``Linear`` at the indices present, ``Dropout`` in the gaps, as ``Linear(768,1024), Dropout, Linear(1024,128),
    Dropout, Linear(128,64), Dropout, Linear(64,16), Linear(16,1)``."""
    idx: dict[int, set[str]] = {}
    for k in state_dict:
        parts = k.split(".")
        if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in ("weight", "bias"):
            raise ValueError(f"{key}: unexpected key {k!r} in the aesthetic predictor "
                             "(expected layers.<i>.weight/bias)")
        idx.setdefault(int(parts[1]), set()).add(parts[2])
    if not idx:
        raise ValueError(f"{key}: the aesthetic predictor state dict is empty")
    layers: list[nn.Module] = [nn.Dropout() for _ in range(max(idx) + 1)]
    prev_out = None
    for i in sorted(idx):
        if idx[i] != {"weight", "bias"}:
            raise ValueError(f"{key}: layers.{i} needs both a weight and a bias")
        w = state_dict[f"layers.{i}.weight"]
        if w.dim() != 2 or state_dict[f"layers.{i}.bias"].shape != (w.shape[0],):
            raise ValueError(f"{key}: layers.{i} is not a linear layer (weight {tuple(w.shape)})")
        if prev_out is not None and w.shape[1] != prev_out:
            raise ValueError(f"{key}: layers.{i} takes {w.shape[1]} inputs but the layer before gives {prev_out}")
        layers[i] = nn.Linear(w.shape[1], w.shape[0])
        prev_out = w.shape[0]
    if prev_out != 1:
        raise ValueError(f"{key}: the aesthetic predictor ends with {prev_out} outputs, expected 1")
    head = AestheticHead(layers)
    head.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return head
