"""Plug-in rewards: any ``module:function`` scoring images against prompts (``rewards.<name>.function``).

The function is called as ``fn(images, prompts)`` with ``images`` float ``[N, 3, H, W]`` in [0, 1] and ``prompts``
the list of prompt strings; a prompt read from a ``.jsonl`` file carries its record, which
``rtdmd.data.prompt_metadata(prompt)`` returns (GenEval-style metadata). It returns a tensor of ``N`` scores or a
sequence of ``N`` numbers. Plug-ins are not differentiable unless the spec says so. For the group advantages the
images are quantized to uint8 levels first, as the reference's rollout does for every reward (docs/method.md §11).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .base import Reward, quantize_uint8

__all__ = ["PluginReward", "resolve_function"]


def resolve_function(spec: str, *, key: str = "function") -> Callable:
    """Import ``"package.module:attr"`` (``attr`` may be dotted); ``ValueError`` naming ``key`` otherwise."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"{key}: expected 'module:function', got {spec!r}")
    mod_name, attr = spec.split(":")
    if not mod_name or not attr:
        raise ValueError(f"{key}: expected 'module:function', got {spec!r}")
    try:
        obj = importlib.import_module(mod_name)
    except Exception as e:  # an import runs arbitrary module code; report whatever it raised, in one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{key}: cannot import module {mod_name!r}: {type(e).__name__}: {msg}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{key}: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{key}: {spec!r} is not callable")
    return obj


class PluginReward(Reward):
    """A user scoring function behind the :class:`Reward` interface."""

    def __init__(self, name: str, function: str | Callable, *, differentiable: bool = False,
                 key: str | None = None):
        self.name = name
        self.key = key or f"rewards.{name}.function"
        self.fn = resolve_function(function, key=self.key) if isinstance(function, str) else function
        if not callable(self.fn):
            raise ValueError(f"{self.key}: expected a callable or 'module:function', got {function!r}")
        self.differentiable = bool(differentiable)

    def score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if samples.dim() != 4 or samples.shape[1] != 3:
            raise ValueError(f"{self.name}: samples must be [N, 3, H, W] images, got shape {tuple(samples.shape)}")
        out = self.fn(samples, list(prompts))
        return self._as_scores(out, samples)

    def advantage_score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The plug-in on uint8-quantized images (``(x*255).round().clamp(0,255)/255``), without gradient."""
        if len(prompts) != samples.shape[0]:
            raise ValueError(f"{self.name}: {samples.shape[0]} samples but {len(prompts)} prompts")
        with torch.no_grad():
            return self.score(quantize_uint8(samples), prompts)

    def _as_scores(self, out, samples: torch.Tensor) -> torch.Tensor:
        n = samples.shape[0]
        if not isinstance(out, torch.Tensor) and hasattr(out, "__array__"):  # numpy arrays and scalars
            out = torch.as_tensor(np.asarray(out))
        if isinstance(out, torch.Tensor):
            if out.is_complex():
                raise ValueError(f"{self.key}: returned a {out.dtype} tensor, expected real scores")
            scores = out.reshape(-1) if out.dim() == 2 and out.shape[1] == 1 else out
            if scores.shape != (n,):
                raise ValueError(f"{self.key}: returned shape {tuple(out.shape)}, expected ({n},)")
            scores = scores.to(device=samples.device, dtype=torch.float32)
        else:
            if isinstance(out, (str, bytes)) or not isinstance(out, Sequence):
                raise ValueError(f"{self.key}: returned {type(out).__name__}, expected a tensor or a sequence of "
                                 f"{n} numbers")
            if len(out) != n:
                raise ValueError(f"{self.key}: returned {len(out)} scores for {n} images")
            values = []
            for v in out:
                try:
                    if isinstance(v, (str, bytes)):
                        raise TypeError
                    values.append(float(v))
                except (TypeError, ValueError, RuntimeError):
                    raise ValueError(f"{self.key}: returned a non-number score {v!r}") from None
            scores = torch.tensor(values, dtype=torch.float32, device=samples.device)
        if not bool(torch.isfinite(scores.detach()).all()):
            raise ValueError(f"{self.key}: returned non-finite scores")
        return scores
