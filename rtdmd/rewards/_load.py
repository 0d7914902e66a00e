"""Loading what a reward spec names: weights files, local transformers folders, the spec's own checks.

Shared by image.py, hps.py, imagereward.py, geneval.py and builder.py; it imports none of them, so each imports it
at top level without an import cycle. Nothing is downloaded (``local_files_only=True``).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "load_clip_model", "load_image_processor", "load_tokenizer", "one_line", "read_state_dict", "spec_dict",
    "spec_file", "spec_folder", "unused_keys_message",
]


def unused_keys_message(state: Mapping[str, Any], used: set[str]) -> str | None:
    """What a checkpoint converter says about keys it did not map (the first five), or None when it used all."""
    unused = sorted(set(state) - used)
    if not unused:
        return None
    more = f" (+{len(unused) - 5} more)" if len(unused) > 5 else ""
    return f"keys the conversion does not use: {', '.join(unused[:5])}{more}"


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def spec_folder(spec: Mapping[str, Any], name: str, key: str) -> Path:
    """``spec[key]`` as an existing folder; ``ValueError`` naming ``rewards.<name>.<key>`` otherwise."""
    p = Path(str(spec[key])).expanduser()
    if not p.is_dir():
        raise ValueError(f"rewards.{name}.{key}: no such folder: {p}")
    return p


def spec_file(spec: Mapping[str, Any], name: str, key: str) -> Path:
    """``spec[key]`` as an existing file; ``ValueError`` naming ``rewards.<name>.<key>`` otherwise."""
    p = Path(str(spec[key])).expanduser()
    if not p.is_file():
        raise ValueError(f"rewards.{name}.{key}: no such file: {p}")
    return p


def load_clip_model(folder: Path, key: str) -> nn.Module:
    """A frozen float32 transformers ``CLIPModel`` from ``folder``; ``ValueError`` naming ``key`` otherwise."""
    from transformers import CLIPModel

    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{key}: cannot load a CLIPModel from {folder}: {one_line(e)}") from e
    return model.float().eval().requires_grad_(False)


def load_tokenizer(folder: Path, key: str) -> Any:
    """The folder's tokenizer (``AutoTokenizer``); ``ValueError`` naming ``key`` otherwise."""
    from transformers import AutoTokenizer

    # transformers 5 builds an empty CLIP tokenizer from a folder without vocabulary files: refuse that
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        raise ValueError(f"{key}: cannot load a tokenizer from {folder}: no tokenizer.json or vocab.json there")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{key}: cannot load a tokenizer from {folder}: {one_line(e)}") from e


def _pil_processor_class() -> type:
    try:  # transformers 5: the PIL backend is its own class (the default one needs torchvision)
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:  # transformers 4: the slow CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as cls
    return cls


def load_processor(cls: type, folder: Path, key: str, what: str) -> Any:
    """The folder's image processor of class ``cls`` (``what`` names it in errors); ``cls``'s defaults if the
    folder has no preprocessor_config.json."""
    if not (folder / "preprocessor_config.json").is_file():
        return cls()
    try:
        return cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{key}: cannot load {what} from {folder}: {one_line(e)}") from e


def load_image_processor(folder: Path, key: str) -> Any:
    """The folder's CLIP image processor (PIL backend, as the reference ran it); CLIP's defaults if it has none."""
    return load_processor(_pil_processor_class(), folder, key, "an image processor")


#: a reward entry's keys that belong to the mixture: every builder accepts and ignores them
MIXTURE_KEYS = frozenset({"kind", "weight", "backprop"})
#: keys only plug-in rewards take
PLUGIN_KEYS = frozenset({"function", "differentiable"})


def check_spec_keys(name: str, kind: str, spec: Mapping[str, Any], required: Iterable[str],
                    optional: Iterable[str] = ()) -> None:
    """Every key of ``spec`` is known for ``kind`` (or the mixture's) and every required one is there; else a
    one-line ``ValueError`` naming ``rewards.<name>.<key>``."""
    required, known = set(required), set(required) | set(optional)
    for k in spec:
        if k not in known | MIXTURE_KEYS:
            extra = " (only plug-in rewards take it)" if k in PLUGIN_KEYS else ""
            raise ValueError(f"rewards.{name}.{k}: unknown key for the {kind} reward{extra} "
                             f"(known: {', '.join(sorted(known))})")
    for k in sorted(required):
        if k not in spec:
            raise ValueError(f"rewards.{name}.{k}: required for the {kind} reward")


def spec_dict(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """A reward spec as a plain dict with string keys, ``None`` values dropped (they count as unset)."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"rewards.{name}: expected a mapping of settings, got {type(spec).__name__}")
    return {str(k): v for k, v in spec.items() if v is not None}


def read_state_dict(path: str | Path, *, key: str = "path") -> dict[str, torch.Tensor]:
    """A weights file as a flat state dict: ``.safetensors``, or a torch pickle read with ``weights_only=True``
    (a ``{"state_dict": ...}`` wrapper is unwrapped). ``ValueError`` names ``key`` when it cannot be read."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{key}: no such file: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{key}: cannot read {p} as safetensors: {one_line(e)}") from e
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{key}: cannot load {p} with torch.load(weights_only=True) ({one_line(e)}); "
                         "convert it to .safetensors") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{key}: {p} does not hold a state dict of tensors (nor a {{'state_dict': ...}} wrapper)")
    return dict(obj)
