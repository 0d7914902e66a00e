"""Few-step sampling and rollouts (docs/method.md §2.3) and the randomness contract."""

from __future__ import annotations

import math

import pytest
import torch

import rtdmd_kernels as rk
from rtdmd import rng
from rtdmd.models.toy import ExactTeacher
from rtdmd.models.toy_world import ToyWorld
from rtdmd.rollout import draw_noises, generate, rollout, sample
from rtdmd.sigmas import sd3_sigmas

SIGMAS = sd3_sigmas()


@pytest.fixture(autouse=True)
def _torch_backend():
    with rk.use_backend("torch"):  # the trainer's CPU path (the interpreter is tested in the kernel tests)
        yield


@pytest.fixture(scope="module")
def teacher():
    return ExactTeacher(ToyWorld.build())


def hand_loop(vel, x, noises, eta=0.9):
    c, s_ = math.cos(eta * math.pi / 2), math.sin(eta * math.pi / 2)
    x = x.double()
    for j, (s, sn) in enumerate(zip(SIGMAS[:-1], SIGMAS[1:], strict=False)):
        v = vel(x, torch.full((x.shape[0],), s)).double()
        x = (1 - sn) * (x - s * v) + sn * c * (x + (1 - s) * v) + sn * s_ * noises[j].double()
    return x


def test_sample_matches_hand_written_loop(teacher):
    idx = list(range(6))
    cond = teacher.encode([f"toy prompt {i % 4}" for i in idx])
    x_t, noises = draw_noises(0, "t", 0, idx, (4, 8, 8), 4)
    out = sample(teacher.velocity_fn(cond), x_t, SIGMAS, eta=0.9, noises=noises)
    ref = hand_loop(teacher.velocity_fn(cond), x_t, noises)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, atol=1e-4, rtol=1e-4)
    # the last step is deterministic: its noise does not matter
    noises2 = noises.clone()
    noises2[-1].normal_()
    assert torch.equal(sample(teacher.velocity_fn(cond), x_t, SIGMAS, eta=0.9, noises=noises2), out)


def test_rollout_trajectory_and_logprobs(teacher):
    idx = list(range(5))
    cond = teacher.encode(["toy prompt 1"] * 5)
    x_t, noises = draw_noises(1, "r", 3, idx, (4, 8, 8), 4)
    ro = rollout(teacher.velocity_fn(cond), x_t, SIGMAS, eta=0.9, noises=noises)
    assert ro.latents.shape == (5, 4, 4, 8, 8) and ro.log_probs.shape == (5, 4)
    assert torch.equal(ro.latents[:, 0], x_t) and torch.equal(ro.latents[:, 1:], ro.next_latents[:, :-1])
    assert torch.equal(ro.final, sample(teacher.velocity_fn(cond), x_t, SIGMAS, eta=0.9, noises=noises))
    assert torch.equal(ro.noises, noises.transpose(0, 1))
    # surrogate log-prob: -mean((ρ ξ)²) at stochastic steps, 0 at the deterministic last step
    rho = torch.tensor(SIGMAS[1:4]) * math.sin(0.9 * math.pi / 2)
    expect = -(rho[None, :] ** 2) * noises[:3].transpose(0, 1).reshape(5, 3, -1).square().mean(-1)
    assert torch.allclose(ro.log_probs[:, :3], expect, rtol=1e-4)
    assert ro.log_probs[:, 3].abs().max() < 1e-12  # 0 up to the rounding of recomputing the mean


def test_rng_contract_per_sample_noise_is_independent_of_batching():
    full = rng.normal(7, "s", 2, range(10), (3, 4))
    part = rng.normal(7, "s", 2, [4, 5, 6], (3, 4))
    assert torch.equal(full[4:7], part)
    assert not torch.equal(rng.normal(7, "s", 3, [4], (3, 4))[0], full[4])  # the step matters
    assert not torch.equal(rng.normal(7, "t", 2, [4], (3, 4))[0], full[4])  # the stream matters
    assert not torch.equal(rng.normal(8, "s", 2, [4], (3, 4))[0], full[4])  # the seed matters
    assert torch.equal(rng.uniform(1, "u", 0, range(6))[2:4], rng.uniform(1, "u", 0, [2, 3]))


def test_generate_same_samples_whatever_the_batch_size(teacher):
    prompts = [f"toy prompt {i % 4}" for i in range(13)]
    a = generate(teacher, prompts, sigmas=SIGMAS, eta=0.9, seed=5, batch_size=13)
    b = generate(teacher, prompts, sigmas=SIGMAS, eta=0.9, seed=5, batch_size=4)
    c = generate(teacher, prompts[7:], sigmas=SIGMAS, eta=0.9, seed=5, indices=range(7, 13), batch_size=2)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a[7:], c, atol=1e-6)
    assert not torch.allclose(a, generate(teacher, prompts, sigmas=SIGMAS, eta=0.9, seed=6))


def test_sampler_errors(teacher):
    x_t, noises = draw_noises(0, "e", 0, range(2), (4, 8, 8), 4)
    vel = teacher.velocity_fn(teacher.encode(["toy prompt 0"] * 2))
    with pytest.raises(ValueError, match="noises must have shape"):
        sample(vel, x_t, SIGMAS, eta=0.9, noises=noises[:3])
    with pytest.raises(ValueError, match="at least 2"):
        sample(vel, x_t, [1.0], eta=0.9, noises=noises[:0])
    with pytest.raises(ValueError, match="indices"):
        generate(teacher, ["toy prompt 0"], sigmas=SIGMAS, eta=0.9, seed=0, indices=[1, 2])
