"""The one backbone interface every stage and the sampler talk to (README.md's layout).

A backbone turns prompts into conditioning (``encode``), predicts the flow-matching velocity
``v = ε - x0`` at noise level σ (``velocity``), and turns latents into the space rewards read
(``decode``). CFG is not inside a backbone: callers ask for the conditional and the unconditional
(``encode([""])``) velocities and combine them — fused into ``rk.ac_dmd_loss`` for the teacher.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

Cond = dict[str, torch.Tensor]  # batch-first tensors; every entry has the batch size as its first dim


def cond_select(cond: Cond, index: torch.Tensor | slice) -> Cond:
    """The conditioning of a subset of the batch."""
    return {k: v[index] for k, v in cond.items()}


def cond_cat(conds: Sequence[Cond]) -> Cond:
    """Concatenate conditionings along the batch."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


class Backbone(nn.Module):
    """Base class of the trainer's models (teacher, generator, fake score)."""

    #: latent shape of one sample, ``(C, H, W)``
    latent_shape: tuple[int, ...]

    def encode(self, prompts: Sequence[str]) -> Cond:
        raise NotImplementedError

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """``v(x, σ | cond)`` with ``sigma`` a ``[B]`` tensor; returns a tensor shaped and typed like ``x``."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, *, chunk: int = 0, checkpoint: bool = False) -> torch.Tensor:
        """What rewards read: images ``[B, 3, H, W]`` in [0, 1] for image models (the toy: the latents).
        ``chunk``/``checkpoint`` bound the memory of a VAE decode; backbones without one ignore them."""
        return latents

    def velocity_fn(self, cond: Cond):
        """``velocity_fn(x, sigma)`` bound to ``cond``, the form ``rk.checkpointed_rollout`` takes."""
        return lambda x, sigma: self.velocity(x, sigma, cond)
