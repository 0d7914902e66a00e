"""Rewards: one interface, the toy rewards, image rewards (CLIPScore, PickScore, HPSv2.1, aesthetic, plug-ins)
and weighted mixtures. Problems with the config's ``rewards`` section raise ``ValueError`` with one line naming the
key; the trainer reports them as config errors."""

import dataclasses
from pathlib import Path

from .base import Reward, RewardMixture, WeightedReward
from .builder import IMAGE_REWARD_KINDS, build_image_reward
from .plugin import resolve_function
from .toy import TOY_REWARDS, BinaryReward, LinearReward

__all__ = ["Reward", "RewardMixture", "WeightedReward", "LinearReward", "BinaryReward", "TOY_REWARDS", "build_rewards",
           "check_reward_specs"]

#: image rewards known by name (``rewards.<name>.kind`` picks one under another name)
IMAGE_REWARDS = IMAGE_REWARD_KINDS
#: those whose score can be back-propagated into the generator
DIFFERENTIABLE_IMAGE_REWARDS = ("clipscore", "pickscore", "hpsv2", "imagereward")


def build_rewards(cfg, world=None, device=None, *, include_unused: bool = False) -> RewardMixture:
    """The config's ``rewards`` section as a mixture: toy presets know ``linear`` and ``binary``; real presets
    load image rewards from local folders or plug-in functions (:func:`rtdmd.rewards.builder.build_image_reward`).
    A real reward with weight 0 and no ``backprop`` is not loaded for training; ``include_unused`` loads it too
    (evaluation-only rewards)."""
    out = {}
    for name, rc in cfg.rewards.items():
        if rc.weight == 0 and not rc.backprop and cfg.model.kind != "toy" and not include_unused:
            continue  # a real reward model with weight 0 would be loaded for nothing
        if cfg.model.kind == "toy":
            if name not in TOY_REWARDS:
                raise ValueError(f"config key 'rewards.{name}': unknown toy reward (known: {', '.join(TOY_REWARDS)})")
            reward = TOY_REWARDS[name](world)
        else:
            reward = build_image_reward(name, dataclasses.asdict(rc), device=device)
        if rc.backprop and not reward.differentiable:
            raise ValueError(f"config key 'rewards.{name}.backprop': the {name} reward is not differentiable")
        out[name] = WeightedReward(reward, rc.weight, rc.backprop)
    if not out:
        raise ValueError("config key 'rewards': no reward with a weight or backprop=true")
    return RewardMixture(out)


def check_reward_specs(cfg) -> None:
    """Cheap checks of the rewards before anything is loaded or trained: toy presets know ``linear`` and
    ``binary``; real presets need a known kind or a plug-in function, and paths that exist; ``backprop`` only on
    a differentiable reward; at least one reward in use. A reward with weight 0 and no ``backprop`` is not used
    (nor loaded), so it is not checked. A plug-in's module is imported here (it runs that module's code)."""
    used = {name: rc for name, rc in cfg.rewards.items() if rc.weight != 0 or rc.backprop}
    if not used:
        raise ValueError("config key 'rewards': no reward with a weight or backprop=true")
    for name, rc in used.items():
        if cfg.model.kind == "toy":
            if name not in TOY_REWARDS:
                raise ValueError(f"config key 'rewards.{name}': unknown toy reward (known: {', '.join(TOY_REWARDS)};"
                                  f" remove it with --set rewards.{name}=null)")
            if rc.backprop and not TOY_REWARDS[name].differentiable:
                raise ValueError(f"config key 'rewards.{name}.backprop': the {name} reward is not differentiable")
            continue
        kind = rc.kind or name
        if rc.function is not None:
            try:
                resolve_function(rc.function, key=f"rewards.{name}.function")
            except ValueError as e:
                raise ValueError(str(e).splitlines()[0]) from e
        if rc.function is None and kind not in IMAGE_REWARDS:
            raise ValueError(f"config key 'rewards.{name}': unknown reward kind {kind!r} (known: "
                              f"{', '.join(IMAGE_REWARDS)}; or set rewards.{name}.function=module:function)")
        differentiable = rc.differentiable if rc.function is not None else kind in DIFFERENTIABLE_IMAGE_REWARDS
        if rc.backprop and not differentiable:
            raise ValueError(f"config key 'rewards.{name}.backprop': the {kind} reward is not differentiable")
        if rc.function is None and not rc.path:
            raise ValueError(f"config key 'rewards.{name}.path' must be set (a local folder of the {kind} model)")
        if rc.function is None and kind == "geneval" and not rc.clip_path:
            raise ValueError(f"config key 'rewards.{name}.clip_path' must be set (a local CLIP ViT-L/14 folder: "
                              "the geneval colour classifier)")
        for key in ("path", "processor_path", "tokenizer_path", "clip_path"):
            value = getattr(rc, key)
            if value and not Path(value).expanduser().exists():
                raise ValueError(f"config key 'rewards.{name}.{key}': no such file or folder: {value}")
