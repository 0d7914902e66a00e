"""The toy world's rewards (docs/toy.md §4)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models.toy_world import ToyWorld
from .base import Reward


def _prompt_idx(world: ToyWorld, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    return torch.tensor([world.prompt_index(p) for p in prompts], dtype=torch.long, device=device)


class LinearReward(Reward):
    """``r(x; p) = ⟨a_p, x⟩`` — differentiable and unbounded on purpose: maximised alone it walks off the data."""

    name = "linear"
    differentiable = True

    def __init__(self, world: ToyWorld):
        self.world = world

    def score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.world.linear_reward(samples, _prompt_idx(self.world, prompts, samples.device)).float()


class BinaryReward(Reward):
    """1 if the sample's nearest component of its prompt is the preferred one (component 0), else 0 —
    non-differentiable, like GenEval: it enters the advantages only."""

    name = "binary"
    differentiable = False

    def __init__(self, world: ToyWorld, preferred: int = 0):
        if not 0 <= preferred < world.num_components:
            raise ValueError(f"preferred component {preferred} out of range [0, {world.num_components})")
        self.world = world
        self.preferred = preferred

    def score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        idx = _prompt_idx(self.world, prompts, torch.device("cpu"))
        nearest = self.world.nearest_component(samples.detach().cpu(), idx)
        return (nearest == self.preferred).float().to(samples.device)


TOY_REWARDS = {"linear": LinearReward, "binary": BinaryReward}
