"""Toy backbones: the exact teacher, the tiny SD3 network, and the cached base pretraining."""

from __future__ import annotations

import pytest
import torch

from rtdmd.config import load_config
from rtdmd.models.base import cond_cat, cond_select
from rtdmd.models.toy import ExactTeacher, ToyNetwork, build_network, build_world, pretrain_base
from rtdmd.models.toy_world import UNCONDITIONAL


@pytest.fixture(scope="module")
def world():
    return build_world(load_config("toy"))


def test_exact_teacher_is_the_world_velocity(world):
    teacher = ExactTeacher(world)
    cond = teacher.encode(["toy prompt 1", "", "toy prompt 3"])
    assert cond["prompt"].tolist() == [1, UNCONDITIONAL, 3]
    x, s = torch.randn(3, 4, 8, 8), torch.tensor([0.9, 0.5, 0.2])
    assert torch.equal(teacher.velocity(x, s, cond), world.velocity(x, s, cond["prompt"]))
    assert torch.equal(teacher.velocity_fn(cond)(x, s), teacher.velocity(x, s, cond))
    with pytest.raises(ValueError, match="unknown toy prompt"):
        teacher.encode(["a cat"])


def test_network_shapes_dtypes_and_conditioning(world):
    net = build_network(world, load_config("toy").toy)
    cond = net.encode(["toy prompt 0", ""])
    x = torch.randn(2, 4, 8, 8)
    v = net.velocity(x, torch.tensor([0.7, 0.7]), cond)
    assert v.shape == x.shape and v.dtype == torch.float32
    assert net.velocity(x.double(), torch.tensor([0.7, 0.7]), cond).dtype == torch.float64
    # the empty prompt has its own learned embedding row, distinct from prompt 0's
    v_same = net.velocity(x[:1].expand(2, -1, -1, -1), torch.tensor([0.7, 0.7]), cond)
    assert not torch.allclose(v_same[0], v_same[1])
    v.square().mean().backward()
    assert net.prompt_embeds.grad is not None and net.prompt_embeds.grad[world.num_prompts].abs().sum() > 0
    both = cond_cat([cond, cond_select(cond, slice(0, 1))])
    assert both["prompt"].tolist() == [0, UNCONDITIONAL, 0]
    with pytest.raises(ValueError, match="square latents"):
        ToyNetwork(build_world(load_config("toy", overrides=["toy.latent_shape=[4,8,6]"])))


def test_pretraining_learns_and_is_cached(world, tmp_path, monkeypatch):
    monkeypatch.setenv("RTDMD_CACHE", str(tmp_path))
    cfg = load_config("toy", overrides=["toy.base_steps=60", "toy.base_batch_size=64", "log.interval=1"])
    logs = []
    net, info = pretrain_base(world, cfg, log_fn=logs.append)
    assert not info["cached"] and len(logs) == 60 and {x["stage"] for x in logs} == {"base"}
    first, last = sum(x["loss"] for x in logs[:10]), sum(x["loss"] for x in logs[-10:])
    assert last < 0.5 * first
    again, info2 = pretrain_base(world, cfg, log_fn=logs.append)
    assert info2["cached"] and info2["path"] == info["path"] and len(logs) == 60
    for (k, a), (_, b) in zip(net.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # same recipe, cache off: retrains to bit-identical weights (deterministic)
    cfg_off = load_config("toy", overrides=["toy.base_steps=60", "toy.base_batch_size=64", "toy.base_cache=false"])
    fresh, info3 = pretrain_base(world, cfg_off)
    assert not info3["cached"]
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), fresh.state_dict().values(), strict=True))
    # anything that changes the base changes the cache key
    other = load_config("toy", overrides=["toy.base_steps=61", "toy.base_batch_size=64"])
    from rtdmd._io import stable_hash
    from rtdmd.models.toy import base_recipe
    assert stable_hash(base_recipe(other)) != stable_hash(base_recipe(cfg))
