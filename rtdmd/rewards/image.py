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
downloaded. Weights are float32. :func:`build_image_reward` builds any of them (or a plug-in) from a
``rewards.<name>`` spec.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward

__all__ = [
    "IMAGE_REWARD_KINDS", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "Aesthetic", "AestheticHead", "CLIPScore", "HPSv2",
    "ImageReward", "PickScore", "build_aesthetic_head", "build_image_reward", "normalize", "processor_transform",
    "quantize_uint8", "resize_max_pad", "resize_shorter_center_crop",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PICKSCORE_SCALE = 26.0  # PickScore's reward is exp(logit_scale)·cos / 26 (docs/method.md §7)
IMAGE_REWARD_KINDS = ("clipscore", "pickscore", "hpsv2", "aesthetic", "geneval", "imagereward")
#: the kinds built in modules of their own: kind -> (module, builder)
_OWN_MODULE_KINDS = {"geneval": ("geneval", "build_geneval_reward"),
                     "imagereward": ("imagereward", "build_imagereward")}


# --------------------------------------------------------------------------------------------------------------
# Tensor preprocessing (the reference's torchvision / open_clip transforms on float tensors)
# --------------------------------------------------------------------------------------------------------------

def quantize_uint8(images: torch.Tensor) -> torch.Tensor:
    """The rollout's uint8 quantization, back in [0, 1] floats: ``(x*255).round().clamp(0, 255) / 255``."""
    return (images.detach().float() * 255).round().clamp(0, 255) / 255


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


def _pooled(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and an output object in 5 (docs/training.md §5.5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _to_uint8_arrays(images: torch.Tensor) -> list:
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
        return _unit(_pooled(out).float())

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``[N, D]`` (gradient flows to ``pixel_values``)."""
        return _unit(_pooled(self.model.get_image_features(pixel_values=pixel_values)).float())

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
        pixels = self.image_processor(images=_to_uint8_arrays(images), return_tensors="pt",
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
        emb = _unit(_pooled(self.model.get_image_features(pixel_values=pixel_values)).float())
        return self.head(emb).squeeze(-1)

    def _score_float(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = resize_shorter_center_crop(images, self.resize, self.crop, mode="bicubic", crop_rounding="floor")
        return self._from_pixels(normalize(x, self.mean, self.std))

    def _score_quantized(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = self.image_processor(images=_to_uint8_arrays(images), return_tensors="pt",
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


# --------------------------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------------------------

_KIND_KEYS = {
    "clipscore": ({"path"}, {"processor_path", "tokenizer_path"}),
    "pickscore": ({"path"}, {"processor_path", "tokenizer_path"}),
    "hpsv2": ({"path", "tokenizer_path"}, set()),
    "aesthetic": ({"path", "clip_path"}, {"processor_path"}),
}
_PLUGIN_KEYS = {"function", "differentiable"}
_MIXTURE_KEYS = {"kind", "weight", "backprop"}  # weight/backprop belong to the mixture; accepted and ignored here


def unused_keys_message(state: Mapping[str, Any], used: set[str]) -> str | None:
    """What a checkpoint converter says about keys it did not map (the first five), or None when it used all."""
    unused = sorted(set(state) - used)
    if not unused:
        return None
    more = f" (+{len(unused) - 5} more)" if len(unused) > 5 else ""
    return f"keys the conversion does not use: {', '.join(unused[:5])}{more}"


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _folder(spec: Mapping[str, Any], name: str, key: str) -> Path:
    p = Path(str(spec[key])).expanduser()
    if not p.is_dir():
        raise ValueError(f"rewards.{name}.{key}: no such folder: {p}")
    return p


def _file(spec: Mapping[str, Any], name: str, key: str) -> Path:
    p = Path(str(spec[key])).expanduser()
    if not p.is_file():
        raise ValueError(f"rewards.{name}.{key}: no such file: {p}")
    return p


def _load_clip_model(folder: Path, key: str) -> nn.Module:
    from transformers import CLIPModel

    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{key}: cannot load a CLIPModel from {folder}: {_one_line(e)}") from e
    return model.float().eval().requires_grad_(False)


def _load_tokenizer(folder: Path, key: str) -> Any:
    from transformers import AutoTokenizer

    # transformers 5 builds an empty CLIP tokenizer from a folder without vocabulary files: refuse that
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        raise ValueError(f"{key}: cannot load a tokenizer from {folder}: no tokenizer.json or vocab.json there")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{key}: cannot load a tokenizer from {folder}: {_one_line(e)}") from e


def _pil_processor_class() -> type:
    try:  # transformers 5: the PIL backend is its own class (the default one needs torchvision)
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:  # transformers 4: the slow CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as cls
    return cls


def _load_image_processor(folder: Path, key: str) -> Any:
    """The folder's CLIP image processor (PIL backend, as the reference ran it); CLIP's defaults if it has none."""
    cls = _pil_processor_class()
    if not (folder / "preprocessor_config.json").is_file():
        return cls()
    try:
        return cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{key}: cannot load an image processor from {folder}: {_one_line(e)}") from e


def _spec_dict(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(spec, Mapping):
        raise ValueError(f"rewards.{name}: expected a mapping of settings, got {type(spec).__name__}")
    return {str(k): v for k, v in spec.items() if v is not None}


def build_image_reward(name: str, spec: Mapping[str, Any], device: torch.device | str | None = None) -> Reward:
    """The reward ``rewards.<name>`` from its spec.

    ``spec["function"] = "module:function"`` makes a :class:`~rtdmd.rewards.plugin.PluginReward` (keys
    ``function``, ``differentiable``). Otherwise the kind is ``spec["kind"]`` or ``name``, one of
    ``clipscore`` / ``pickscore`` (``path``: model folder; optional ``processor_path``, default ``path``;
    ``tokenizer_path``, default ``processor_path``), ``hpsv2`` (``path``: the HPS v2.1 open_clip checkpoint,
    ``.pt`` or ``.safetensors``; ``tokenizer_path``: a CLIP tokenizer folder), ``aesthetic`` (``path``: the
    predictor's weights, ``.pth`` or ``.safetensors``; ``clip_path``: the CLIP ViT-L/14 folder; optional
    ``processor_path``, default ``clip_path``). ``weight``/``backprop`` are accepted and ignored (the mixture's);
    ``None`` values count as unset, and so does ``differentiable: false`` on a built-in kind. Unknown, missing or
    wrong keys raise a one-line ``ValueError`` naming ``rewards.<name>.<key>``. Never downloads.
    """
    s = _spec_dict(name, spec)
    if "function" in s:
        from .plugin import PluginReward

        allowed = _PLUGIN_KEYS | _MIXTURE_KEYS
        for k in s:
            if k not in allowed:
                raise ValueError(f"rewards.{name}.{k}: unknown key for a plug-in reward "
                                 f"(known: {', '.join(sorted(allowed))})")
        if s.get("kind", "plugin") != "plugin":
            raise ValueError(f"rewards.{name}.kind: a reward with a function is a plug-in; got kind {s['kind']!r}")
        diff = s.get("differentiable", False)
        if not isinstance(diff, bool):
            raise ValueError(f"rewards.{name}.differentiable: expected true or false, got {diff!r}")
        return PluginReward(name, s["function"], differentiable=diff, key=f"rewards.{name}.function")

    kind = s.get("kind", name)
    if kind in _OWN_MODULE_KINDS:
        import importlib

        module, builder = _OWN_MODULE_KINDS[kind]
        return getattr(importlib.import_module(f".{module}", __package__), builder)(name, s, device=device)
    if kind not in _KIND_KEYS:
        where = f"rewards.{name}.kind" if "kind" in s else f"rewards.{name}"
        raise ValueError(f"{where}: unknown image reward kind {kind!r} (known: {', '.join(IMAGE_REWARD_KINDS)}; "
                         f"or set rewards.{name}.function to 'module:function')")
    required, optional = _KIND_KEYS[kind]
    if s.get("differentiable") is False:  # the config's default for every entry; only a plug-in may set it
        del s["differentiable"]
    for k in s:
        if k not in required | optional | _MIXTURE_KEYS:
            extra = " (only plug-in rewards take it)" if k in _PLUGIN_KEYS else ""
            raise ValueError(f"rewards.{name}.{k}: unknown key for the {kind} reward{extra} "
                             f"(known: {', '.join(sorted(required | optional))})")
    for k in sorted(required):
        if k not in s:
            raise ValueError(f"rewards.{name}.{k}: required for the {kind} reward")
    key = f"rewards.{name}"

    if kind in ("clipscore", "pickscore"):
        model_dir = _folder(s, name, "path")
        proc_key = "processor_path" if "processor_path" in s else "path"
        proc_dir = _folder(s, name, proc_key)
        tok_key = "tokenizer_path" if "tokenizer_path" in s else proc_key
        tok_dir = _folder(s, name, tok_key)
        model = _load_clip_model(model_dir, f"{key}.path")
        tokenizer = _load_tokenizer(tok_dir, f"{key}.{tok_key}")
        processor = _load_image_processor(proc_dir, f"{key}.{proc_key}")
        if kind == "pickscore":
            return PickScore(model, tokenizer, processor, name=name, device=device)
        resize, crop, mean, std = processor_transform(processor)
        return CLIPScore(model, tokenizer, resize=resize, crop=crop, mean=mean, std=std, name=name, device=device)

    if kind == "hpsv2":
        from .hps import load_open_clip_checkpoint

        ckpt = _file(s, name, "path")
        tokenizer = _load_tokenizer(_folder(s, name, "tokenizer_path"), f"{key}.tokenizer_path")
        model = load_open_clip_checkpoint(ckpt, eos_token_id=tokenizer.eos_token_id, device=device,
                                          key=f"{key}.path")
        vocab = model.config.text_config.vocab_size
        if len(tokenizer) > vocab:
            raise ValueError(f"{key}.tokenizer_path: the tokenizer has {len(tokenizer)} tokens, the HPS model's "
                             f"vocabulary {vocab}")
        return HPSv2(model, tokenizer, name=name, device=device)

    # aesthetic
    from .hps import read_state_dict

    head = build_aesthetic_head(read_state_dict(_file(s, name, "path"), key=f"{key}.path"), key=f"{key}.path")
    clip_dir = _folder(s, name, "clip_path")
    proc_key = "processor_path" if "processor_path" in s else "clip_path"
    processor = _load_image_processor(_folder(s, name, proc_key), f"{key}.{proc_key}")
    model = _load_clip_model(clip_dir, f"{key}.clip_path")
    if head.in_features != model.config.projection_dim:
        raise ValueError(f"{key}.path: the predictor takes {head.in_features}-d embeddings, the CLIP model at "
                         f"{clip_dir} gives {model.config.projection_dim}")
    return Aesthetic(model, head, processor, name=name, device=device)
