"""HPS v2.1 weights: an open_clip CLIP checkpoint (ViT-H-14) converted to a transformers ``CLIPModel``.

The HPS v2.1 scorer (docs/method.md §7, §11) is open_clip's ViT-H-14 fine-tuned on human preferences; its checkpoint
(``HPS_v2.1_compressed.pt``) is an open_clip state dict. The same network is a transformers ``CLIPModel`` with
``hidden_act="gelu"`` (not ``quick_gelu``) and LayerNorm eps 1e-5, so we convert the weights once at load time and
run the stock transformers model. Every checkpoint key must be consumed by the mapping; anything left over is an
error, never silently dropped.

open_clip layout -> transformers layout:

* ``visual.conv1.weight`` -> ``vision_model.embeddings.patch_embedding.weight``; ``visual.class_embedding`` and
  ``visual.positional_embedding`` -> the vision embeddings; ``visual.ln_pre``/``visual.ln_post`` ->
  ``pre_layrnorm``/``post_layernorm``; ``visual.proj`` ``[width, dim]`` -> ``visual_projection.weight`` (transposed).
* ``token_embedding``, ``positional_embedding``, ``ln_final`` -> the text embeddings and ``final_layer_norm``;
  ``text_projection`` ``[width, dim]`` -> ``text_projection.weight`` (transposed); ``logit_scale`` as is.
  The ``text.``-prefixed layout of open_clip's ``CustomTextCLIP`` is accepted too.
* each ``resblocks.{i}``: ``ln_1``/``ln_2`` -> ``layer_norm1``/``layer_norm2``; ``attn.in_proj_weight``/``_bias``
  split in three (q, k, v) -> ``self_attn.{q,k,v}_proj``; ``attn.out_proj`` -> ``self_attn.out_proj``;
  ``mlp.c_fc``/``mlp.c_proj`` -> ``mlp.fc1``/``mlp.fc2``.

Text pooling: open_clip takes the token with the largest id (``argmax``), which for the CLIP BPE vocabulary is the
first ``<|endoftext|>``; transformers pools at the first ``eos_token_id``, the same token. The converted config uses
the last vocabulary id as ``eos_token_id`` (open_clip's tokenizer), and :func:`load_open_clip_checkpoint` takes the
tokenizer's id when given.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ._load import read_state_dict, unused_keys_message

__all__ = ["convert_open_clip_state_dict", "infer_clip_config", "load_open_clip_checkpoint"]

# open_clip's vision head width per ViT width (ViT-H-14: 80, ViT-g-14: 88, ViT-bigG-14: 104; 64 otherwise);
# its text towers all use 64-wide heads.
_VISION_HEAD_WIDTH = {1280: 80, 1408: 88, 1664: 104}
_DEFAULT_HEAD_WIDTH = 64

_BLOCK_MAP = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}


def _strip_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a DataParallel/DDP ``module.`` prefix (the HPS checkpoints carry one)."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def _text_prefix(sd: Mapping[str, torch.Tensor]) -> str:
    """``""`` for open_clip's ``CLIP`` layout, ``"text."`` for ``CustomTextCLIP``."""
    return "text." if "text.token_embedding.weight" in sd else ""


def _num_blocks(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    ids = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    if ids != set(range(len(ids))):
        raise ValueError(f"open_clip state dict: blocks under {prefix!r} are not numbered 0..n-1: {sorted(ids)}")
    return len(ids)


def _need(sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"open_clip state dict: missing key {key!r}")
    return sd[key]


def _heads(width: int, head_width: int, tower: str) -> int:
    if width % head_width:
        raise ValueError(f"open_clip state dict: cannot infer the {tower} head count (width {width} is not a multiple "
                         f"of open_clip's head width {head_width}); pass an explicit CLIPConfig")
    return width // head_width


def infer_clip_config(sd: Mapping[str, torch.Tensor]):
    """The ``CLIPConfig`` of an open_clip ViT state dict, sizes read from the tensor shapes.

    Head counts follow open_clip's conventions (vision head width 80 for ViT-H's width 1280, 88 for ViT-g,
    104 for ViT-bigG, else 64; text head width 64); the activation is ``gelu`` and LayerNorm eps 1e-5, as in
    open_clip's ViT-H-14 (no ``quick_gelu``).
    """
    from transformers import CLIPConfig

    sd = _strip_prefix(sd)
    tp = _text_prefix(sd)
    conv = _need(sd, "visual.conv1.weight")
    v_width, patch = conv.shape[0], conv.shape[-1]
    n_pos = _need(sd, "visual.positional_embedding").shape[0] - 1
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise ValueError(f"open_clip state dict: visual.positional_embedding has {n_pos} patch positions, not a square")
    v_layers = _num_blocks(sd, "visual.transformer.resblocks.")
    t_layers = _num_blocks(sd, tp + "transformer.resblocks.")
    if not v_layers or not t_layers:
        raise ValueError("open_clip state dict: no transformer blocks found (visual.transformer.resblocks.* and "
                         f"{tp}transformer.resblocks.*)")
    tok = _need(sd, tp + "token_embedding.weight")
    vocab, t_width = tok.shape
    ctx = _need(sd, tp + "positional_embedding").shape[0]
    t_proj = _need(sd, tp + "text_projection")
    v_proj = _need(sd, "visual.proj")
    if t_proj.shape[1] != v_proj.shape[1]:
        raise ValueError(f"open_clip state dict: text_projection {tuple(t_proj.shape)} and visual.proj "
                         f"{tuple(v_proj.shape)} disagree on the embedding size")
    v_mlp = _need(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0]
    t_mlp = _need(sd, tp + "transformer.resblocks.0.mlp.c_fc.weight").shape[0]
    vision = dict(hidden_size=v_width, intermediate_size=v_mlp, num_hidden_layers=v_layers,
                  num_attention_heads=_heads(v_width, _VISION_HEAD_WIDTH.get(v_width, _DEFAULT_HEAD_WIDTH), "vision"),
                  image_size=grid * patch, patch_size=patch, projection_dim=v_proj.shape[1], hidden_act="gelu",
                  layer_norm_eps=1e-5)
    text = dict(vocab_size=vocab, hidden_size=t_width, intermediate_size=t_mlp, num_hidden_layers=t_layers,
                num_attention_heads=_heads(t_width, _DEFAULT_HEAD_WIDTH, "text"), max_position_embeddings=ctx,
                projection_dim=t_proj.shape[1], hidden_act="gelu", layer_norm_eps=1e-5,
                bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=t_proj.shape[1])


def _convert_blocks(sd: dict[str, torch.Tensor], used: set[str], src: str, dst: str, n: int,
                    out: dict[str, torch.Tensor]) -> None:
    for i in range(n):
        s, d = f"{src}{i}.", f"{dst}{i}."
        w, b = _need(sd, s + "attn.in_proj_weight"), _need(sd, s + "attn.in_proj_bias")
        used.update({s + "attn.in_proj_weight", s + "attn.in_proj_bias"})
        if w.shape[0] % 3 or b.shape[0] != w.shape[0]:
            raise ValueError(f"open_clip state dict: {s}attn.in_proj_weight has shape {tuple(w.shape)}, "
                             "expected [3*width, width]")
        for name, wq, bq in zip("qkv", w.chunk(3, dim=0), b.chunk(3, dim=0), strict=True):
            out[f"{d}self_attn.{name}_proj.weight"] = wq
            out[f"{d}self_attn.{name}_proj.bias"] = bq
        for a, bname in _BLOCK_MAP.items():
            out[d + bname] = _need(sd, s + a)
            used.add(s + a)


def _check_causal_mask(t: torch.Tensor, key: str) -> None:
    """An ``attn_mask`` buffer saved by old open_clip versions carries no weights; accept only the causal mask."""
    n = t.shape[-1]
    ok = t.dim() == 2 and t.shape[0] == n and bool(torch.equal(
        torch.isneginf(t.float()), torch.ones(n, n, dtype=torch.bool).triu(1)))
    if not ok:
        raise ValueError(f"open_clip state dict: {key!r} is not the causal attention mask")


def convert_open_clip_state_dict(sd: Mapping[str, torch.Tensor], config=None):
    """Convert an open_clip CLIP state dict (optionally ``module.``-prefixed) to a transformers ``CLIPModel`` one.

    Returns ``(CLIPConfig, state_dict)``; tensors become float32. ``config`` (a ``CLIPConfig``) overrides the
    architecture inferred by :func:`infer_clip_config`. Keys the mapping does not consume raise ``ValueError``.
    """
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("open_clip state dict: expected a mapping of parameter names to tensors")
    sd = {k: v.detach().float() for k, v in _strip_prefix(sd).items()}
    if config is None:
        config = infer_clip_config(sd)
    tp = _text_prefix(sd)
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def take(src: str, dst: str, transpose: bool = False) -> None:
        t = _need(sd, src)
        out[dst] = t.t().contiguous() if transpose else t
        used.add(src)

    take("visual.class_embedding", "vision_model.embeddings.class_embedding")
    take("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight")
    take("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight")
    for ln, hf in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        take(f"visual.{ln}.weight", f"vision_model.{hf}.weight")
        take(f"visual.{ln}.bias", f"vision_model.{hf}.bias")
    take("visual.proj", "visual_projection.weight", transpose=True)
    _convert_blocks(sd, used, "visual.transformer.resblocks.", "vision_model.encoder.layers.",
                    _num_blocks(sd, "visual.transformer.resblocks."), out)

    take(tp + "token_embedding.weight", "text_model.embeddings.token_embedding.weight")
    take(tp + "positional_embedding", "text_model.embeddings.position_embedding.weight")
    take(tp + "ln_final.weight", "text_model.final_layer_norm.weight")
    take(tp + "ln_final.bias", "text_model.final_layer_norm.bias")
    take(tp + "text_projection", "text_projection.weight", transpose=True)
    _convert_blocks(sd, used, tp + "transformer.resblocks.", "text_model.encoder.layers.",
                    _num_blocks(sd, tp + "transformer.resblocks."), out)
    take("logit_scale", "logit_scale")
    out["logit_scale"] = out["logit_scale"].reshape(())

    for key in (k for k in ("attn_mask", "text.attn_mask") if k in sd):
        _check_causal_mask(sd[key], key)
        used.add(key)
    if (unused := unused_keys_message(sd, used)) is not None:
        raise ValueError(f"open_clip state dict: {unused}")
    _check_against_config(out, config)
    return config, out


def _check_against_config(out: Mapping[str, torch.Tensor], config) -> None:
    """Every transformers key present with the config's shape (a clear error instead of a failed load)."""
    from transformers import CLIPModel

    with torch.device("meta"):
        ref = CLIPModel(config).state_dict()
    missing = sorted(set(ref) - set(out))
    extra = sorted(set(out) - set(ref))
    if missing or extra:
        raise ValueError(f"open_clip conversion: the config expects keys {missing[:3]} and does not know {extra[:3]}")
    for k, t in ref.items():
        if tuple(t.shape) != tuple(out[k].shape):
            raise ValueError(f"open_clip conversion: {k} has shape {tuple(out[k].shape)}, the config expects "
                             f"{tuple(t.shape)}")


def load_open_clip_checkpoint(path: str | Path, *, config=None, eos_token_id: int | None = None,
                              device: torch.device | str | None = None, key: str = "path"):
    """A frozen float32 transformers ``CLIPModel`` from an open_clip checkpoint file (HPS v2.1's ``.pt``).

    ``eos_token_id`` sets the token the text tower pools at (the tokenizer's ``<|endoftext|>``; open_clip pools
    at the largest id, the same token for the CLIP vocabulary). Errors name ``key``.
    """
    from transformers import CLIPModel

    sd = read_state_dict(path, key=key)
    try:
        config, hf_sd = convert_open_clip_state_dict(sd, config)
    except ValueError as e:
        raise ValueError(f"{key}: {path}: {e}") from e
    if eos_token_id is not None:
        config = copy.deepcopy(config)
        config.text_config.eos_token_id = int(eos_token_id)
    with torch.device("meta"):
        model = CLIPModel(config)
    model.load_state_dict(hf_sd, strict=True, assign=True)
    _reset_position_ids(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{key}: {path}: the conversion left {left[:3]} unset")
    model = model.to(device=torch.device(device or "cpu"), dtype=torch.float32)
    return model.eval().requires_grad_(False)


def _reset_position_ids(model: torch.nn.Module) -> None:
    """Re-create the non-persistent ``position_ids`` buffers left on the meta device by the meta-device build."""
    for module in model.modules():
        ids = getattr(module, "position_ids", None)
        if isinstance(ids, torch.Tensor) and ids.is_meta:
            module.register_buffer("position_ids", torch.arange(ids.shape[-1]).expand((1, -1)), persistent=False)
