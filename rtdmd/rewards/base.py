"""The one reward interface (README.md's layout) and weighted mixtures of rewards.

A reward scores decoded samples against their prompts: ``score(samples, prompts) -> [N]`` float32.
``differentiable`` says whether the score may be back-propagated (reward back-propagation, docs/method.md §7);
non-differentiable rewards (binary checks, detectors, VLM judges) only enter the group advantages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


def quantize_uint8(images: torch.Tensor) -> torch.Tensor:
    """The rollout's uint8 quantization, back in [0, 1] floats: ``(x*255).round().clamp(0, 255) / 255``."""
    return (images.detach().float() * 255).round().clamp(0, 255) / 255


class Reward:
    """Base class: subclasses set ``name``/``differentiable`` and implement :meth:`score`."""

    name: str = "reward"
    differentiable: bool = False

    def score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != samples.shape[0]:
            raise ValueError(f"{self.name}: {samples.shape[0]} samples but {len(prompts)} prompts")
        if self.differentiable:
            out = self.score(samples, prompts)
        else:
            with torch.no_grad():
                out = self.score(samples.detach(), prompts)
        if out.shape != (samples.shape[0],):
            raise ValueError(f"reward {self.name!r} returned shape {tuple(out.shape)}, expected ({samples.shape[0]},)")
        return out

    def advantage_score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The score that enters the group advantages, without gradient. Image rewards override this to
        score uint8-quantized images with the rollout preprocessing, as the reference does (docs/method.md §11, §13.15);
        back-propagation uses :meth:`__call__` on the float images."""
        with torch.no_grad():
            return self(samples.detach(), prompts)


@dataclass
class WeightedReward:
    reward: Reward
    weight: float = 1.0
    backprop: bool = False  # also used by reward back-propagation (needs a differentiable reward)


class RewardMixture:
    """Named rewards with weights (docs/method.md §5.3 ``weight_advantages``; §7 training-reward BP)."""

    def __init__(self, rewards: Mapping[str, WeightedReward]):
        if not rewards:
            raise ValueError("a reward mixture needs at least one reward")
        for name, wr in rewards.items():
            if wr.backprop and not wr.reward.differentiable:
                raise ValueError(f"reward {name!r} is not differentiable and cannot be used for back-propagation "
                                 f"(set rewards.{name}.backprop=false)")
        self.rewards = dict(rewards)

    @property
    def names(self) -> list[str]:
        return list(self.rewards)

    @property
    def weights(self) -> torch.Tensor:
        return torch.tensor([wr.weight for wr in self.rewards.values()], dtype=torch.float32)

    @property
    def backprop_names(self) -> list[str]:
        return [n for n, wr in self.rewards.items() if wr.backprop]

    @torch.no_grad()
    def score_all(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Every reward, no gradient: ``[N, R]`` float32 in :attr:`names` order (the advantage input)."""
        return torch.stack([wr.reward.advantage_score(samples, prompts).float() for wr in self.rewards.values()], dim=1)

    def weighted_sum(self, scores: torch.Tensor) -> torch.Tensor:
        """``Σ_k w_k r_k`` of a ``[N, R]`` score table (the reference's logged "mean" reward)."""
        return scores @ self.weights.to(scores.device)

    def backprop_score(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``Σ_k w_k r_k`` over the back-propagated rewards, with gradient: ``[N]``."""
        names = self.backprop_names
        if not names:
            raise ValueError("no reward has backprop=true")
        return sum(self.rewards[n].weight * self.rewards[n].reward(samples, prompts).float() for n in names)
