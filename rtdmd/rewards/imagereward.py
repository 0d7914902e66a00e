"""ImageReward v1.0 (THUDM) as a native reward: its BLIP checkpoint run as transformers BLIP modules.

ImageReward scores how well an image fits a prompt and how much people would like it (docs/method.md §11; the
reference evaluates with it and falls back to it for reward back-propagation). The released ``ImageReward.pt`` is the
state dict of the ``image-reward`` package's ``ImageReward`` module. We read it, map every tensor onto stock
transformers modules and run those; neither ``image-reward`` nor its ``timm``/``fairscale``/``clip`` dependencies
are needed. The network, as that package builds it:

* **Image tower** — BLIP's ViT-L/16 at 224 px: patch convolution, a learned class token, learned positions, 24
  pre-norm blocks (fused q/k/v with bias, exact GELU MLP of ratio 4, LayerNorm eps 1e-6), a final LayerNorm over
  every token. Widths 1024, 16 heads of 64. This is transformers' ``BlipVisionModel`` exactly: its
  ``last_hidden_state`` is the final-normed token sequence.
* **Text tower** — BLIP's BERT-base (12 post-norm layers, width 768, 12 heads, LayerNorm eps 1e-12, exact GELU,
  absolute positions, no token types, no pooler) where every layer also cross-attends to the image tokens. This is
  transformers' ``BlipTextModel`` built with ``is_decoder=True`` (which is what creates the cross-attention layers)
  and called with ``is_decoder=False`` (bidirectional self-attention, as ImageReward runs it). The cross-attention
  mask is all ones, i.e. no mask.
* **Head** — the hidden state of the first token (``[CLS]``) goes through five linear layers with no activation
  (768→1024→128→64→16→1, dropout between the first four) and the score is normalised with fixed statistics:
  ``r = (mlp(h_cls) − 0.16717362830052426) / 1.0333394966054072``.
* **Tokenizer** — ``bert-base-uncased`` plus the special tokens ``[DEC]`` (as the BOS token) and ``[ENC]``
  (vocabulary 30524), prompts padded/truncated to 35 tokens, with the padding mask.
* **Preprocessing** — ``Resize(224)`` on the shorter side (bicubic), ``CenterCrop(224)``, OpenAI-CLIP mean/std.
  ``ImageReward.score`` applies it to PIL images (PIL bicubic); the package's differentiable ``score_gard``, used by
  its ReFL trainer, takes tensors that went through the same torchvision transforms as tensors (antialiased bicubic
  interpolation).

Checkpoint keys (``ImageReward.pt``) → modules here:

* ``blip.visual_encoder.``: ``cls_token`` → ``vision.embeddings.class_embedding``; ``pos_embed`` →
  ``vision.embeddings.position_embedding``; ``patch_embed.proj.{weight,bias}`` →
  ``vision.embeddings.patch_embedding.*``; ``blocks.{i}.norm1/norm2`` → ``vision.encoder.layers.{i}.layer_norm1/2``;
  ``blocks.{i}.attn.qkv`` → ``…self_attn.qkv`` (the same fused layout); ``blocks.{i}.attn.proj`` →
  ``…self_attn.projection``; ``blocks.{i}.mlp.fc1/fc2`` → ``…mlp.fc1/fc2``; ``norm`` → ``vision.post_layernorm``.
* ``blip.text_encoder.*`` → ``text.*`` under the same names (BLIP's BERT and transformers' BLIP text model share
  them): ``embeddings.{word_embeddings,position_embeddings,LayerNorm}``, and per layer
  ``encoder.layer.{i}.{attention,crossattention}.self.{query,key,value}``,
  ``…{attention,crossattention}.output.{dense,LayerNorm}``, ``…intermediate.dense``, ``…output.{dense,LayerNorm}``.
  ``embeddings.position_ids`` (a saved buffer) must be ``0..P−1`` and is rebuilt, not loaded.
* ``mlp.layers.{0,2,4,6,7}.{weight,bias}`` → ``head.layers.*``.
* ``blip.vision_proj.*`` and ``blip.text_proj.*`` are BLIP's contrastive projections, which the ImageReward score
  never uses: they are checked to be linear layers from the tower widths and set aside.

Any other key, or any missing one, is an error naming the file. Sizes are read from the tensors (head width 64,
as in ViT-L and BERT-base); an explicit :class:`ImageRewardConfig` overrides them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._load import check_spec_keys, one_line, read_state_dict, spec_dict, unused_keys_message
from .base import Reward
from .image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageReward, normalize, resize_shorter_center_crop

__all__ = [
    "IMAGEREWARD_MAX_LENGTH", "IMAGEREWARD_MEAN", "IMAGEREWARD_STD", "ImageRewardConfig", "ImageRewardHead",
    "ImageRewardModel", "ImageRewardScore", "build_imagereward", "convert_imagereward_state_dict",
    "infer_imagereward_config", "load_blip_tokenizer", "load_imagereward_checkpoint", "pil_resize_center_crop",
]

IMAGEREWARD_MEAN = 0.16717362830052426  # ImageReward-v1.0's score statistics (the package's ImageReward.mean/std)
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_LENGTH = 35  # prompts are padded/truncated to 35 BERT tokens
BLIP_BOS_TOKEN = "[DEC]"
BLIP_ENC_TOKEN = "[ENC]"

_VISION_EPS = 1e-6  # timm-style ViT LayerNorm
_TEXT_EPS = 1e-12  # BERT LayerNorm (BLIP's med_config)
_HEAD_WIDTH = 64
_HEAD_LINEARS = (0, 2, 4, 6, 7)  # Linear positions in ImageReward's MLP; Dropout(0.2, 0.2, 0.1) at 1, 3, 5
_HEAD_DROPOUT = {1: 0.2, 3: 0.2, 5: 0.1}

_V = "blip.visual_encoder."
_T = "blip.text_encoder."
_POSITION_IDS = _T + "embeddings.position_ids"
_PROJECTIONS = ("blip.vision_proj", "blip.text_proj")  # BLIP's contrastive heads: in the file, unused by the score

_VISION_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VISION_BLOCK = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_TEXT_TOP = ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
             "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias")
_TEXT_LAYER = tuple(
    f"{attn}.{part}" for attn in ("attention", "crossattention")
    for part in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")
) + ("intermediate.dense", "output.dense", "output.LayerNorm")


@dataclass
class ImageRewardConfig:
    """The architecture: transformers configs of the two towers and the head's layer widths
    ``(in, h1, h2, h3, h4, 1)`` (ImageReward-v1.0: ``(768, 1024, 128, 64, 16, 1)``)."""

    vision: Any  # BlipVisionConfig
    text: Any  # BlipTextConfig
    head_dims: tuple[int, ...]


def _err(msg: str) -> ValueError:
    return ValueError(f"ImageReward state dict: {msg}")


def _need(sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise _err(f"missing key {key!r}")
    return sd[key]


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    ids = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    if ids != set(range(len(ids))):
        raise _err(f"layers under {prefix!r} are not numbered 0..n-1: {sorted(ids)}")
    if not ids:
        raise _err(f"no layers found under {prefix!r}")
    return len(ids)


def _heads(width: int, tower: str) -> int:
    if width % _HEAD_WIDTH:
        raise _err(f"cannot infer the {tower} head count (width {width} is not a multiple of {_HEAD_WIDTH}); "
                   "pass an explicit ImageRewardConfig")
    return width // _HEAD_WIDTH


def _head_dims(sd: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    dims: list[int] = []
    for i in _HEAD_LINEARS:
        w, b = _need(sd, f"mlp.layers.{i}.weight"), _need(sd, f"mlp.layers.{i}.bias")
        if w.dim() != 2 or tuple(b.shape) != (w.shape[0],):
            raise _err(f"mlp.layers.{i} is not a linear layer (weight {tuple(w.shape)}, bias {tuple(b.shape)})")
        if dims and w.shape[1] != dims[-1]:
            raise _err(f"mlp.layers.{i} takes {w.shape[1]} inputs but the layer before gives {dims[-1]}")
        dims += [int(w.shape[1]), int(w.shape[0])] if not dims else [int(w.shape[0])]
    if dims[-1] != 1:
        raise _err(f"the head ends with {dims[-1]} outputs, expected 1")
    return tuple(dims)


def infer_imagereward_config(sd: Mapping[str, torch.Tensor]) -> ImageRewardConfig:
    """The :class:`ImageRewardConfig` of an ImageReward state dict, sizes read from the tensor shapes.

    Head counts assume 64-wide heads (ViT-L: 16, BERT-base: 12); LayerNorm eps (1e-6 image, 1e-12 text) and the
    exact GELU are ImageReward's constants, not stored in the file.
    """
    from transformers import BlipTextConfig, BlipVisionConfig

    conv = _need(sd, _V + "patch_embed.proj.weight")
    if conv.dim() != 4 or conv.shape[1] != 3 or conv.shape[2] != conv.shape[3]:
        raise _err(f"{_V}patch_embed.proj.weight has shape {tuple(conv.shape)}, expected [width, 3, p, p]")
    v_width, patch = int(conv.shape[0]), int(conv.shape[-1])
    pos = _need(sd, _V + "pos_embed")
    n_patches = pos.shape[-2] - 1
    grid = math.isqrt(max(n_patches, 0))
    if pos.dim() != 3 or grid * grid != n_patches:
        raise _err(f"{_V}pos_embed has shape {tuple(pos.shape)}, expected [1, 1 + grid², width]")
    vision = BlipVisionConfig(
        hidden_size=v_width, intermediate_size=int(_need(sd, _V + "blocks.0.mlp.fc1.weight").shape[0]),
        num_hidden_layers=_count(sd, _V + "blocks."), num_attention_heads=_heads(v_width, "image"),
        image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=_VISION_EPS,
        attention_dropout=0.0)

    vocab, t_width = _need(sd, _T + "embeddings.word_embeddings.weight").shape
    text = BlipTextConfig(
        vocab_size=int(vocab), hidden_size=int(t_width),
        encoder_hidden_size=int(_need(sd, _T + "encoder.layer.0.crossattention.self.key.weight").shape[1]),
        intermediate_size=int(_need(sd, _T + "encoder.layer.0.intermediate.dense.weight").shape[0]),
        num_hidden_layers=_count(sd, _T + "encoder.layer."), num_attention_heads=_heads(int(t_width), "text"),
        max_position_embeddings=int(_need(sd, _T + "embeddings.position_embeddings.weight").shape[0]),
        hidden_act="gelu", layer_norm_eps=_TEXT_EPS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        pad_token_id=0, bos_token_id=None, eos_token_id=None, sep_token_id=None,
        is_decoder=True,  # makes BlipTextLayer build its cross-attention; forward runs it bidirectionally
        use_cache=False)
    return ImageRewardConfig(vision=vision, text=text, head_dims=_head_dims(sd))


def _check_projection(sd: Mapping[str, torch.Tensor], name: str, in_width: int) -> None:
    w, b = _need(sd, name + ".weight"), _need(sd, name + ".bias")
    if w.dim() != 2 or w.shape[1] != in_width or tuple(b.shape) != (w.shape[0],):
        raise _err(f"{name} has weight {tuple(w.shape)} and bias {tuple(b.shape)}, expected a linear layer from "
                   f"width {in_width}")


def _check_position_ids(t: torch.Tensor, n: int) -> None:
    if t.numel() < 1 or t.shape[-1] != n or not torch.equal(t.reshape(-1).long(), torch.arange(n)):
        raise _err(f"{_POSITION_IDS!r} is not the position range 0..{n - 1}")


def convert_imagereward_state_dict(sd: Mapping[str, torch.Tensor], config: ImageRewardConfig | None = None
                                   ) -> tuple[ImageRewardConfig, dict[str, torch.Tensor]]:
    """Map an ImageReward state dict onto :class:`ImageRewardModel`'s keys.

    Returns ``(config, state_dict)``; tensors become float32. ``config`` overrides the architecture inferred by
    :func:`infer_imagereward_config`. A missing key, a key the mapping does not use, or a shape the config does not
    expect raises ``ValueError``.
    """
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise _err("expected a non-empty mapping of parameter names to tensors")
    sd = {str(k): v.detach() for k, v in sd.items()}
    if config is None:
        config = infer_imagereward_config(sd)
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def take(src: str, dst: str) -> None:
        out[dst] = _need(sd, src).float()
        used.add(src)

    for src, dst in _VISION_TOP.items():
        take(_V + src, "vision." + dst)
    for i in range(_count(sd, _V + "blocks.")):
        for src, dst in _VISION_BLOCK.items():
            for p in ("weight", "bias"):
                take(f"{_V}blocks.{i}.{src}.{p}", f"vision.encoder.layers.{i}.{dst}.{p}")
    for name in _TEXT_TOP:
        take(_T + name, "text." + name)
    for i in range(_count(sd, _T + "encoder.layer.")):
        for name in _TEXT_LAYER:
            for p in ("weight", "bias"):
                take(f"{_T}encoder.layer.{i}.{name}.{p}", f"text.encoder.layer.{i}.{name}.{p}")
    for i in _HEAD_LINEARS:
        for p in ("weight", "bias"):
            take(f"mlp.layers.{i}.{p}", f"head.layers.{i}.{p}")

    if _POSITION_IDS in sd:
        _check_position_ids(sd[_POSITION_IDS], config.text.max_position_embeddings)
        used.add(_POSITION_IDS)
    for name, width in zip(_PROJECTIONS, (config.vision.hidden_size, config.text.hidden_size), strict=True):
        _check_projection(sd, name, width)
        used.update({name + ".weight", name + ".bias"})

    if (unused := unused_keys_message(sd, used)) is not None:
        raise _err(unused)
    _check_against_config(out, config)
    return config, out


def _check_against_config(out: Mapping[str, torch.Tensor], config: ImageRewardConfig) -> None:
    with torch.device("meta"):
        ref = ImageRewardModel(config).state_dict()
    missing, extra = sorted(set(ref) - set(out)), sorted(set(out) - set(ref))
    if missing or extra:
        raise _err(f"the config expects keys {missing[:3]} and does not know {extra[:3]}")
    for k, t in ref.items():
        if tuple(t.shape) != tuple(out[k].shape):
            raise _err(f"{k} has shape {tuple(out[k].shape)}, the config expects {tuple(t.shape)}")


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------

class ImageRewardHead(nn.Module):
    """ImageReward's MLP: ``layers`` is an ``nn.Sequential`` of Linear and Dropout in the checkpoint's order
    (Linear at 0, 2, 4, 6, 7), no activations."""

    def __init__(self, dims: Sequence[int]):
        super().__init__()
        if len(dims) != len(_HEAD_LINEARS) + 1:
            raise ValueError(f"ImageReward head: expected {len(_HEAD_LINEARS) + 1} widths, got {tuple(dims)}")
        mods: list[nn.Module] = []
        widths = iter(zip(dims[:-1], dims[1:], strict=True))
        for i in range(_HEAD_LINEARS[-1] + 1):
            mods.append(nn.Linear(*next(widths)) if i in _HEAD_LINEARS else nn.Dropout(_HEAD_DROPOUT[i]))
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ImageRewardModel(nn.Module):
    """``vision`` (``BlipVisionModel``), ``text`` (``BlipTextModel`` with cross-attention, no pooler) and ``head``;
    :meth:`forward` gives the normalised ImageReward score ``[N]`` of preprocessed images and tokenised prompts."""

    def __init__(self, config: ImageRewardConfig, *, mean: float = IMAGEREWARD_MEAN, std: float = IMAGEREWARD_STD):
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.config = config
        self.vision = BlipVisionModel(config.vision)
        self.text = BlipTextModel(config.text, add_pooling_layer=False)
        self.head = ImageRewardHead(config.head_dims)
        self.mean, self.std = float(mean), float(std)

    @property
    def image_size(self) -> int:
        return int(self.config.vision.image_size)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        image_tokens = self.vision(pixel_values=pixel_values).last_hidden_state
        # every image token is attended to (ImageReward's all-ones encoder mask), so no cross-attention mask
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
                         is_decoder=False)
        raw = self.head(text.last_hidden_state[:, 0]).squeeze(-1)
        return (raw - self.mean) / self.std


def load_imagereward_checkpoint(path: str | Path, *, config: ImageRewardConfig | None = None,
                                device: torch.device | str | None = None, key: str = "path") -> ImageRewardModel:
    """A frozen float32 :class:`ImageRewardModel` from ``ImageReward.pt`` (or a ``.safetensors`` of the same state
    dict). Every error is a one-line ``ValueError`` naming ``key`` and the file."""
    sd = read_state_dict(path, key=key)
    try:
        config, converted = convert_imagereward_state_dict(sd, config)
    except ValueError as e:
        raise ValueError(f"{key}: {path}: {e}") from e
    with torch.device("meta"):
        model = ImageRewardModel(config)
    model.load_state_dict(converted, strict=True, assign=True)
    for module in model.modules():  # the non-persistent position_ids buffers are still on the meta device
        ids = getattr(module, "position_ids", None)
        if isinstance(ids, torch.Tensor) and ids.is_meta:
            module.register_buffer("position_ids", torch.arange(ids.shape[-1]).expand((1, -1)), persistent=False)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{key}: {path}: the conversion left {left[:3]} unset")
    model = model.to(device=torch.device(device or "cpu"), dtype=torch.float32)
    return model.eval().requires_grad_(False)


def load_blip_tokenizer(folder: str | Path, *, key: str = "tokenizer_path") -> Any:
    """BLIP's tokenizer: the ``bert-base-uncased`` tokenizer in ``folder`` plus ``[DEC]`` (BOS) and ``[ENC]``,
    as ImageReward's ``init_tokenizer`` makes it (tokens already in the folder are kept as they are)."""
    from transformers import BertTokenizer

    p = Path(folder).expanduser()
    if not p.is_dir():
        raise ValueError(f"{key}: no such folder: {p}")
    if not ((p / "vocab.txt").is_file() or (p / "tokenizer.json").is_file()):
        raise ValueError(f"{key}: cannot load a BERT tokenizer from {p}: no vocab.txt or tokenizer.json there")
    try:
        tok = BertTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{key}: cannot load a BERT tokenizer from {p}: {one_line(e)}") from e
    tok.add_special_tokens({"bos_token": BLIP_BOS_TOKEN})
    tok.add_special_tokens({"additional_special_tokens": [BLIP_ENC_TOKEN]})
    return tok


# --------------------------------------------------------------------------------------------------------------
# Preprocessing and the reward
# --------------------------------------------------------------------------------------------------------------

def pil_resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """ImageReward's benchmark transform on uint8-level images ``[N, 3, H, W]`` in [0, 1]: each becomes a PIL image,
    torchvision's ``Resize(size)`` (shorter side to ``size``, longer ``int(size·long/short)``, PIL bicubic) and
    ``CenterCrop(size)`` (offsets ``round((side − size)/2)``), then ``ToTensor`` (``/255``). Returns float
    ``[N, 3, size, size]`` in [0, 1], not normalised."""
    from PIL import Image

    q = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    out = []
    for arr in q.permute(0, 2, 3, 1).cpu().numpy():
        img = Image.fromarray(arr)  # [H, W, 3] uint8: RGB
        w, h = img.size
        short, long = min(w, h), max(w, h)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.BICUBIC)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1))
    return torch.stack(out).float().div(255)


class ImageRewardScore(ImageReward):
    """ImageReward-v1.0: BLIP ViT-L/16 image tokens, cross-attended by BLIP's BERT from the prompt, an MLP on the
    ``[CLS]`` state, normalised by ImageReward's fixed mean/std (typical scores in about [−2, 2]).

    * Float path (back-propagation, what the package's ``score_gard`` is fed by its ReFL trainer): antialiased
      bicubic ``F.interpolate`` of the shorter side to 224, centre crop (torchvision's rounding), CLIP mean/std.
      Differentiable with respect to the images; the model is frozen.
    * Rollout path (:meth:`advantage_score`): uint8-quantised images through ImageReward's own PIL bicubic resize and
      centre crop, as ``ImageReward.score`` does on PIL images.

    Prompts: BLIP's BERT tokenizer, padded/truncated to 35 tokens, with the padding mask.
    """

    differentiable = True

    def __init__(self, model: ImageRewardModel, tokenizer: Any, *, name: str = "imagereward",
                 device: torch.device | str | None = None, max_length: int = IMAGEREWARD_MAX_LENGTH):
        super().__init__(name, device)
        self.model = model.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.image_size = model.image_size

    def _modules(self) -> list[nn.Module]:
        return [self.model]

    def tokens(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` ``[N, 35]`` on the reward's device."""
        tok = self.tokenizer([str(p) for p in prompts], padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The float path's transform (differentiable)."""
        s = self.image_size
        x = resize_shorter_center_crop(images, s, (s, s), mode="bicubic", crop_rounding="round")
        return normalize(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def preprocess_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """The rollout path's transform (PIL, no gradient) of uint8-level images."""
        x = pil_resize_center_crop(images, self.image_size).to(self.device)
        return normalize(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def score_pixels(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The score of already-preprocessed images ``[N, 3, S, S]`` (ImageReward's ``score_gard``)."""
        ids, mask = self.tokens(prompts)
        return self.model(pixel_values, ids, mask)

    def _score_float(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.score_pixels(self.preprocess(images), prompts)

    def _score_quantized(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.score_pixels(self.preprocess_uint8(images), prompts)


# --------------------------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------------------------

_REQUIRED = ("path", "tokenizer_path")


def build_imagereward(name: str, spec: Mapping[str, Any], device: torch.device | str | None = None) -> Reward:
    """The ``imagereward`` reward ``rewards.<name>`` from its spec: ``path`` (``ImageReward.pt`` or a
    ``.safetensors`` of it) and ``tokenizer_path`` (a ``bert-base-uncased`` tokenizer folder). ``weight``,
    ``backprop`` and ``kind: imagereward`` are accepted; ``None`` values and ``differentiable: false`` count as unset.
    Wrong, unknown or missing keys raise a one-line ``ValueError`` naming ``rewards.<name>.<key>``. Never downloads.
    """
    s = spec_dict(name, spec)
    if s.get("differentiable") is False:
        del s["differentiable"]
    if s.get("kind", "imagereward") != "imagereward":
        raise ValueError(f"rewards.{name}.kind: build_imagereward builds kind 'imagereward', got {s['kind']!r}")
    check_spec_keys(name, "imagereward", s, _REQUIRED)
    ckpt = Path(str(s["path"])).expanduser()
    if not ckpt.is_file():
        raise ValueError(f"rewards.{name}.path: no such file: {ckpt}")
    tokenizer = load_blip_tokenizer(str(s["tokenizer_path"]), key=f"rewards.{name}.tokenizer_path")
    model = load_imagereward_checkpoint(ckpt, device=device, key=f"rewards.{name}.path")
    vocab = model.config.text.vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(f"rewards.{name}.tokenizer_path: the tokenizer has {len(tokenizer)} tokens (with [DEC] and "
                         f"[ENC]), the ImageReward model's vocabulary {vocab}")
    return ImageRewardScore(model, tokenizer, name=name, device=device)
