"""The toy evaluation (docs/toy.md §7): Fréchet distance, the metric rows and the table."""

from __future__ import annotations

import math

import pytest
import torch

from rtdmd.evaluate import (
    DISTANCE_KEYS,
    ROW_KEYS,
    GaussianStats,
    ToyEvaluator,
    format_table,
    frechet_distance,
    frechet_distance_to,
)
from rtdmd.models.toy_world import ToyWorld


def _whitened(n: int, d: int, seed: int) -> torch.Tensor:
    """Samples with exactly zero mean and identity (unbiased) covariance, so fitted moments are known exactly."""
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(z.T @ z / (n - 1))
    return torch.linalg.solve_triangular(chol, z.T, upper=False).T


# ---------------------------------------------------------------------------------------------- Fréchet distance
def test_fd_identical_is_zero():
    x = torch.randn(500, 8, dtype=torch.float64) @ torch.randn(8, 8, dtype=torch.float64)
    assert abs(frechet_distance(x, x)) < 1e-8


def test_fd_closed_form_diagonal():
    d = 6
    m1, m2 = torch.linspace(-1, 1, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64) + 0.3
    v1, v2 = torch.linspace(0.5, 2.0, d, dtype=torch.float64), torch.linspace(3.0, 0.2, d, dtype=torch.float64)
    x = m1 + _whitened(1000, d, 0) * v1.sqrt()
    y = m2 + _whitened(1500, d, 1) * v2.sqrt()
    # For commuting covariances FD = |Δm|² + Σ (√v1 - √v2)².
    want = float((m1 - m2).square().sum() + (v1.sqrt() - v2.sqrt()).square().sum())
    assert frechet_distance(x, y) == pytest.approx(want, rel=1e-9)


def test_fd_symmetric_and_translation():
    a = torch.randn(5, 5, dtype=torch.float64)
    x = torch.randn(800, 5, dtype=torch.float64) @ a
    y = torch.randn(600, 5, dtype=torch.float64) @ a.T + 0.5
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-8)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    assert frechet_distance(x, x + shift) == pytest.approx(float(shift.square().sum()), rel=1e-8)


def test_fd_precomputed_stats_match():
    x, y = torch.randn(400, 7, dtype=torch.float64), 2 * torch.randn(300, 7, dtype=torch.float64) + 1
    refs = GaussianStats.stack([GaussianStats.fit(y), GaussianStats.fit(x)])
    xm, xc = x.mean(0), torch.cov(x.T)
    got = frechet_distance_to(xm, xc, refs)  # one row against a batch of references
    assert got[0].item() == pytest.approx(frechet_distance(x, y), rel=1e-9)
    assert abs(got[1].item()) < 1e-8


# ---------------------------------------------------------------------------------------------- the evaluator
@pytest.fixture(scope="module")
def world() -> ToyWorld:
    return ToyWorld.build(latent_shape=(2, 4, 4))


@pytest.fixture(scope="module")
def ev(world: ToyWorld) -> ToyEvaluator:
    return ToyEvaluator(world, n_eval=2048, beta=1.0)


@pytest.fixture(scope="module")
def floor(ev: ToyEvaluator) -> dict[str, float]:
    return ev.teacher_row()


def test_layout_and_grid(ev: ToyEvaluator, world: ToyWorld):
    assert ev.prompt_idx.tolist() == [p for p in range(world.num_prompts) for _ in range(ev.n_eval)]
    assert torch.equal(ev.global_indices, torch.arange(world.num_prompts * ev.n_eval))
    assert len(ev.beta_grid) == 41 and ev.beta_grid[0] == 0.0 and ev.beta_grid[-1] == 4.0 and 0.3 in ev.beta_grid
    x = ev.tilted_samples(0.5, "eval/layout")
    assert x.shape == (world.num_prompts * ev.n_eval, *world.latent_shape) and x.dtype == torch.float64
    assert torch.equal(x, ev.tilted_samples(0.5, "eval/layout"))  # reproducible from (seed, stream)
    with pytest.raises(ValueError):
        ToyEvaluator(world, n_eval=8, beta_max=4.05)


def test_teacher_floor(floor: dict[str, float]):
    assert set(floor) == set(ROW_KEYS)
    assert 0 < floor["fd_teacher"] < 0.2
    assert floor["fd_tilted"] <= floor["fd_teacher"]
    assert floor["beta_hat"] <= 0.2
    assert floor["mode_coverage"] >= 0.95
    assert abs(floor["std_ratio"] - 1) < 0.03
    assert abs(floor["beta_shift"]) < 0.15
    assert abs(floor["reward_mean"]) < 0.05


def test_shifted_collapsed_shrunk(ev: ToyEvaluator, world: ToyWorld, floor: dict[str, float]):
    xb = ev.tilted_samples(0.0, "eval/teacher_b").reshape(len(ev.prompt_idx), -1)
    direction = torch.randn(world.dim, dtype=torch.float64)
    shifted = ev.row(xb + direction / direction.norm())
    assert shifted["fd_teacher"] > floor["fd_teacher"] + 0.8  # |Δm|² = 1 per prompt

    # Every sample from its prompt's component 0: the other modes are missing.
    z = torch.randn(xb.shape, dtype=torch.float64)
    collapsed = world.means[ev.prompt_idx, 0] + world.stds[ev.prompt_idx, 0, None] * z
    assert ev.row(collapsed)["mode_coverage"] < min(0.8, floor["mode_coverage"] - 0.15)

    comp = world.nearest_component(xb, ev.prompt_idx)
    mu = world.means[ev.prompt_idx, comp]
    assert ev.row(mu + 0.5 * (xb - mu))["std_ratio"] == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("beta", [1.5, 3.0])
def test_beta_recovered_from_exact_tilted_samples(ev: ToyEvaluator, floor: dict[str, float], beta: float):
    r = ev.row(ev.tilted_samples(beta, "eval/test_tilt"))  # independent of the reference draw
    assert abs(r["beta_hat"] - beta) <= 0.1 + 1e-9
    # beta_shift is read through nearest-mean assignment; at this small D a few cross-mode assignments bias it up.
    assert abs(r["beta_shift"] - beta) < 0.2
    assert r["mode_coverage"] >= 0.95
    assert r["fd_tilted"] < 1.5 * floor["fd_teacher"]
    assert r["fd_teacher"] > r["fd_tilted"]


def test_reward_mean_increases_with_beta(ev: ToyEvaluator):
    rewards = [ev.row(ev.tilted_samples(b, "eval/test_reward"))["reward_mean"] for b in (0.0, 1.0, 2.0)]
    assert rewards[0] < rewards[1] < rewards[2]


def test_format_table(floor: dict[str, float]):
    model = dict(floor, fd_teacher=floor["fd_teacher"] + 1.25, reward_mean=math.nan)
    table = format_table({"teacher": floor, "my_model": model})
    lines = table.splitlines()
    assert len(lines) == 3 and lines[1].startswith("teacher") and lines[2].startswith("my_model")
    assert all(key in lines[0] for key in ROW_KEYS)
    assert "(+1.250)" in lines[2] and lines[2].count("(") == len(DISTANCE_KEYS)
    assert "(" not in lines[1]  # the floor row shows plain values
    assert "(" not in format_table({"my_model": model})  # no floor, no excess


def test_bad_samples_raise(ev: ToyEvaluator, world: ToyWorld):
    x = ev.tilted_samples(0.0, "eval/test_bad")
    assert ev.row(x) == ev.row(x.reshape(len(x), -1))  # [N, C, H, W] and [N, D] agree
    assert ev.row(x.float()) == pytest.approx(ev.row(x), rel=1e-5, abs=1e-6)  # float32 is upcast
    bad = x.clone()
    bad[3, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        ev.row(bad)
    bad[3, 0, 0, 0] = math.inf
    with pytest.raises(ValueError):
        ev.row(bad)
    for wrong in (x[:-1], x.reshape(len(x), -1)[:, :-1], x.reshape(len(x), 4, 2, 4), x[None]):
        with pytest.raises(ValueError):
            ev.row(wrong)
