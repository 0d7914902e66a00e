"""The analytic toy world (docs/toy.md): exact velocity, exact (tilted) sampling, rewards."""

from __future__ import annotations

import math

import pytest
import torch

from rtdmd import rng
from rtdmd.models.toy_world import UNCONDITIONAL, ToyWorld
from rtdmd.rewards import BinaryReward, LinearReward, RewardMixture, WeightedReward


@pytest.fixture(scope="module")
def world():
    return ToyWorld.build()


def test_pinned_construction(world):
    assert world.weights.shape == (4, 3) and world.means.shape == (4, 3, 256)
    assert torch.allclose(world.weights.sum(-1), torch.ones(4, dtype=torch.float64))
    assert world.weights.min() >= 0.15
    assert torch.allclose(world.means.norm(dim=-1), torch.full((4, 3), 8.0, dtype=torch.float64))
    assert world.stds.min() >= 0.3 and world.stds.max() <= 0.6
    assert torch.allclose(world.reward_dirs.norm(dim=-1), torch.ones(4, dtype=torch.float64))
    assert torch.einsum("pkd,pd->pk", world.means, world.reward_dirs).abs().max() < 1e-12
    again = ToyWorld.build()
    assert torch.equal(again.means, world.means) and torch.equal(again.weights, world.weights)
    assert not torch.equal(ToyWorld.build(seed=1).means, world.means)


def test_prompt_index(world):
    assert world.prompt_index("toy prompt 3") == 3 and world.prompt_index("") == UNCONDITIONAL
    with pytest.raises(ValueError, match="unknown toy prompt"):
        world.prompt_index("toy prompt 4")


def test_build_rejects_impossible_weights():
    with pytest.raises(ValueError, match="min_weight"):
        ToyWorld.build(num_components=3, min_weight=0.4)


@pytest.mark.parametrize("sigma", [0.3, 0.6, 0.9])
def test_velocity_matches_monte_carlo_posterior(sigma):
    """Low-dimensional world: self-normalised importance sampling of E[ε - x0 | x_σ = x] from prior draws."""
    w = ToyWorld.build(num_prompts=2, latent_shape=(1, 2, 2), seed=3)
    g = torch.Generator().manual_seed(0)
    n, p = 400_000, 1
    comp = torch.multinomial(w.weights[p], n, replacement=True, generator=g)
    x0 = w.means[p][comp] + w.stds[p][comp, None] * torch.randn(n, 4, generator=g, dtype=torch.float64)
    for _ in range(3):
        x = (1 - sigma) * x0[torch.randint(n, (1,), generator=g)] + sigma * torch.randn(1, 4, generator=g,
                                                                                          dtype=torch.float64)
        logw = -((x - (1 - sigma) * x0) ** 2).sum(-1) / (2 * sigma**2)
        wts = torch.softmax(logw, 0)
        eps = (x - (1 - sigma) * x0) / sigma
        mc = (wts[:, None] * (eps - x0)).sum(0)
        exact = w.velocity(x.reshape(1, 1, 2, 2), sigma, torch.tensor([p])).reshape(4)
        ess = 1 / (wts**2).sum()
        assert ess > 1000
        assert torch.allclose(exact, mc, atol=6 / math.sqrt(ess) + 1e-3), (exact, mc)


def test_velocity_is_the_regression_minimiser_in_full_dimension(world):
    """The exact v* makes the residual (ε - x0) - v*(x_σ) mean-zero and uncorrelated with x_σ (D = 256)."""
    g = torch.Generator().manual_seed(1)
    n, sigma = 60_000, 0.7
    idx = torch.full((n,), 2)
    x0 = world.sample(idx, torch.rand(n, generator=g, dtype=torch.float64),
                      torch.randn(n, 256, generator=g, dtype=torch.float64)).reshape(n, -1)
    eps = torch.randn(n, 256, generator=g, dtype=torch.float64)
    xs = (1 - sigma) * x0 + sigma * eps
    v = world.velocity(xs.reshape(n, 4, 8, 8), sigma, idx).reshape(n, -1)
    res = (eps - x0) - v
    se = res.std() / math.sqrt(n)
    assert res.mean(0).abs().max() < 5 * se
    xc = xs[:, :8] - xs[:, :8].mean(0)
    cross = res.T @ xc / n  # [D, 8]: residual uncorrelated with the input (every output x 8 input coords)
    assert cross.abs().max() < 6 * se * xc.std()


def test_velocity_limits_and_cfg(world):
    x = torch.randn(5, 4, 8, 8, dtype=torch.float64)
    idx = torch.tensor([0, 1, 2, 3, 0])
    # σ = 1: x_1 = ε, so v = x - E[x0] = x - Σ π_k μ_k
    v1 = world.velocity(x, 1.0, idx).reshape(5, -1)
    mean = torch.einsum("pk,pkd->pd", world.weights, world.means)[idx]
    assert torch.allclose(v1, x.reshape(5, -1) - mean, atol=1e-10)
    # x - σ v is the x0 posterior mean; CFG with guidance 1 is the conditional velocity
    assert torch.allclose(world.x0_mean(x, 0.4, idx), x - 0.4 * world.velocity(x, 0.4, idx))
    assert torch.equal(world.velocity(x, 0.4, idx, guidance=1.0), world.velocity(x, 0.4, idx))
    vu = world.velocity(x, 0.4, torch.full((5,), UNCONDITIONAL))
    vc = world.velocity(x, 0.4, idx)
    assert torch.allclose(world.velocity(x, 0.4, idx, guidance=4.5), vu + 4.5 * (vc - vu), atol=1e-10)
    # float32 in, float32 out; finite at σ = 0
    v0 = world.velocity(x.float(), torch.zeros(5), idx)
    assert v0.dtype == torch.float32 and torch.isfinite(v0).all()


def test_tilted_family(world):
    assert torch.allclose(world.tilted_weights(0.0), world.weights)
    b = 2.0
    expect = world.weights * torch.exp(0.5 * b**2 * world.stds**2)  # ⟨a_p, μ_k⟩ = 0
    assert torch.allclose(world.tilted_weights(b), expect / expect.sum(-1, keepdim=True))
    grid = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    assert torch.allclose(world.tilted_weights(grid)[2], world.tilted_weights(b))
    assert torch.allclose(world.tilted_means(grid)[1], world.tilted_means(1.0))
    # exact tilted samples: reward mean is Σ_k π_k(β) β s_k²; within-component std s_k
    n = 40_000
    idx = torch.zeros(n, dtype=torch.long)
    x = world.sample(idx, rng.uniform(0, "t", 0, range(n)), torch.randn(n, 256, dtype=torch.float64), beta=b)
    r = world.linear_reward(x, idx)
    expect_r = (world.tilted_weights(b)[0] * b * world.stds[0] ** 2).sum()
    assert abs(float(r.mean()) - float(expect_r)) < 0.02
    comp = world.nearest_component(x, idx)
    freq = torch.bincount(comp, minlength=3).double() / n
    assert torch.allclose(freq, world.tilted_weights(b)[0], atol=0.015)


def test_toy_rewards(world):
    idx = torch.tensor([0, 1, 2, 3])
    prompts = [f"toy prompt {i}" for i in idx.tolist()]
    x = world.means[idx, torch.tensor([0, 1, 0, 2])].reshape(4, 4, 8, 8).float().requires_grad_()
    lin = LinearReward(world)
    r = lin(x + 2.0 * world.reward_dirs[idx].reshape(4, 4, 8, 8).float(), prompts)
    assert torch.allclose(r, torch.full((4,), 2.0), atol=1e-5)
    r.sum().backward()
    assert torch.allclose(x.grad.reshape(4, -1), world.reward_dirs[idx].float())
    assert BinaryReward(world)(x, prompts).tolist() == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="samples but"):
        lin(x, prompts[:3])
    mix = RewardMixture({"linear": WeightedReward(lin, 1.0, True), "binary": WeightedReward(BinaryReward(world), 0.5)})
    table = mix.score_all(x, prompts)
    assert table.shape == (4, 2) and not table.requires_grad
    assert torch.allclose(mix.weighted_sum(table), table[:, 0] + 0.5 * table[:, 1])
    assert mix.backprop_score(x, prompts).requires_grad
    with pytest.raises(ValueError, match="not differentiable"):
        RewardMixture({"binary": WeightedReward(BinaryReward(world), 1.0, backprop=True)})
