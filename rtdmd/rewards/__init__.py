"""Rewards: one interface, toy rewards, weighted mixtures (CLIP-family scorers come with the real backbones)."""

from .base import Reward, RewardMixture, WeightedReward
from .toy import TOY_REWARDS, BinaryReward, LinearReward

__all__ = ["Reward", "RewardMixture", "WeightedReward", "LinearReward", "BinaryReward", "TOY_REWARDS", "build_rewards"]


def build_rewards(cfg, world=None) -> RewardMixture:
    """The config's ``rewards`` section as a mixture; toy presets know the rewards ``linear`` and ``binary``."""
    from ..config import ConfigError

    out = {}
    for name, rc in cfg.rewards.items():
        if cfg.model.kind == "toy":
            if name not in TOY_REWARDS:
                raise ConfigError(f"config key 'rewards.{name}': unknown toy reward (known: {', '.join(TOY_REWARDS)})")
            reward = TOY_REWARDS[name](world)
        else:
            raise ConfigError(f"config key 'rewards.{name}': rewards for model.kind={cfg.model.kind!r} "
                              "are not built yet")
        if rc.backprop and not reward.differentiable:
            raise ConfigError(f"config key 'rewards.{name}.backprop': the {name} reward is not differentiable")
        out[name] = WeightedReward(reward, rc.weight, rc.backprop)
    return RewardMixture(out)
