"""The image-reward builder: any built-in kind (CLIPScore, PickScore, HPS v2.1, aesthetic, GenEval, ImageReward) or
a plug-in, from its ``rewards.<name>`` spec.

It sits above every reward module and imports them all at top level; none of them imports it (no import cycle).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ._load import (
    MIXTURE_KEYS,
    PLUGIN_KEYS,
    check_spec_keys,
    load_clip_model,
    load_image_processor,
    load_tokenizer,
    read_state_dict,
    spec_dict,
    spec_file,
    spec_folder,
)
from .base import Reward
from .geneval import build_geneval_reward
from .hps import load_open_clip_checkpoint
from .image import Aesthetic, CLIPScore, HPSv2, PickScore, build_aesthetic_head, processor_transform
from .imagereward import build_imagereward
from .plugin import PluginReward

__all__ = ["IMAGE_REWARD_KINDS", "build_image_reward"]

IMAGE_REWARD_KINDS = ("clipscore", "pickscore", "hpsv2", "aesthetic", "geneval", "imagereward")
#: the kinds built in modules of their own: kind -> builder
_OWN_MODULE_KINDS = {"geneval": build_geneval_reward, "imagereward": build_imagereward}

_KIND_KEYS = {
    "clipscore": ({"path"}, {"processor_path", "tokenizer_path"}),
    "pickscore": ({"path"}, {"processor_path", "tokenizer_path"}),
    "hpsv2": ({"path", "tokenizer_path"}, set()),
    "aesthetic": ({"path", "clip_path"}, {"processor_path"}),
}


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
    s = spec_dict(name, spec)
    if "function" in s:
        allowed = PLUGIN_KEYS | MIXTURE_KEYS
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
        return _OWN_MODULE_KINDS[kind](name, s, device=device)
    if kind not in _KIND_KEYS:
        where = f"rewards.{name}.kind" if "kind" in s else f"rewards.{name}"
        raise ValueError(f"{where}: unknown image reward kind {kind!r} (known: {', '.join(IMAGE_REWARD_KINDS)}; "
                         f"or set rewards.{name}.function to 'module:function')")
    required, optional = _KIND_KEYS[kind]
    if s.get("differentiable") is False:  # the config's default for every entry; only a plug-in may set it
        del s["differentiable"]
    check_spec_keys(name, kind, s, required, optional)
    key = f"rewards.{name}"

    if kind in ("clipscore", "pickscore"):
        model_dir = spec_folder(s, name, "path")
        proc_key = "processor_path" if "processor_path" in s else "path"
        proc_dir = spec_folder(s, name, proc_key)
        tok_key = "tokenizer_path" if "tokenizer_path" in s else proc_key
        tok_dir = spec_folder(s, name, tok_key)
        model = load_clip_model(model_dir, f"{key}.path")
        tokenizer = load_tokenizer(tok_dir, f"{key}.{tok_key}")
        processor = load_image_processor(proc_dir, f"{key}.{proc_key}")
        if kind == "pickscore":
            return PickScore(model, tokenizer, processor, name=name, device=device)
        resize, crop, mean, std = processor_transform(processor)
        return CLIPScore(model, tokenizer, resize=resize, crop=crop, mean=mean, std=std, name=name, device=device)

    if kind == "hpsv2":
        ckpt = spec_file(s, name, "path")
        tokenizer = load_tokenizer(spec_folder(s, name, "tokenizer_path"), f"{key}.tokenizer_path")
        model = load_open_clip_checkpoint(ckpt, eos_token_id=tokenizer.eos_token_id, device=device,
                                          key=f"{key}.path")
        vocab = model.config.text_config.vocab_size
        if len(tokenizer) > vocab:
            raise ValueError(f"{key}.tokenizer_path: the tokenizer has {len(tokenizer)} tokens, the HPS model's "
                             f"vocabulary {vocab}")
        return HPSv2(model, tokenizer, name=name, device=device)

    # aesthetic
    head = build_aesthetic_head(read_state_dict(spec_file(s, name, "path"), key=f"{key}.path"), key=f"{key}.path")
    clip_dir = spec_folder(s, name, "clip_path")
    proc_key = "processor_path" if "processor_path" in s else "clip_path"
    processor = load_image_processor(spec_folder(s, name, proc_key), f"{key}.{proc_key}")
    model = load_clip_model(clip_dir, f"{key}.clip_path")
    if head.in_features != model.config.projection_dim:
        raise ValueError(f"{key}.path: the predictor takes {head.in_features}-d embeddings, the CLIP model at "
                         f"{clip_dir} gives {model.config.projection_dim}")
    return Aesthetic(model, head, processor, name=name, device=device)
