"""Edge rules the ops keep in every dtype and on every backend (docs/kernels.md): float64 data get float64
arithmetic whatever dtype the schedule tensors come in; a group of equal rewards gets advantage exactly 0 and
NaN advantages stay NaN; values the contract fixes (0 for a NaN, the saturation at ±max) are the same bits on
every backend."""

from __future__ import annotations

import pytest
import torch
from conftest import available_backends

import rtdmd_kernels as rk

B, SHAPE = 4, (4, 3, 4, 4)


def _data(device, n):
    return [torch.randn(SHAPE, dtype=torch.float64, device=device) for _ in range(n)]


def _sigmas(device):
    s = torch.rand(B, device=device) * 0.4 + 0.45  # float32 values
    return s, s - 0.3, torch.full((B,), 0.9, device=device)


# every op with schedule arguments: a function of (data, sigma, sigma_next/other level, eta) -> tensors
OPS = {
    "cps_step": lambda d, s, sn, et: rk.cps_step(d[0], d[1], s, sn, eta=et, noise=d[2]),
    "cps_logprob": lambda d, s, sn, et: rk.cps_logprob(d[0], d[1], d[2], s, sn, eta=et),
    "ppo_clip_loss": lambda d, s, sn, et: rk.ppo_clip_loss(d[0], d[1], d[2], -d[3].flatten(1).mean(1) ** 2,
                                                           d[4].flatten(1).mean(1), s, sn, eta=et, clip_range=0.1,
                                                           return_stats=True),
    "ac_dmd_loss": lambda d, s, sn, et: rk.ac_dmd_loss(d[0], d[1], d[2], d[3], d[4], sn, s, eta=et,
                                                       guidance_scale=torch.full_like(s, 2.5), v_real_uncond=d[5],
                                                       return_stats=True),
    "renoise": lambda d, s, sn, et: rk.renoise(d[0], d[1], sn, s),
    "fake_score_loss": lambda d, s, sn, et: rk.fake_score_loss(d[0], d[1], d[2], sn, s),
    "consistency_loss": lambda d, s, sn, et: rk.consistency_loss(d[0], d[1], s, d[2], d[3], d[4], d[5], sn),
}


def _flat(out):
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flat(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return [out] if torch.is_tensor(out) else []


@pytest.mark.parametrize("op", sorted(OPS))
def test_float64_data_keep_float64_coefficients(device_backend, op):
    """float32 schedule tensors with float64 data give what the same values as float64 tensors give: the
    coefficients are made in float64 (they were made in float32 for some ops, errors ~1e-8)."""
    device, _ = device_backend
    data = _data(device, 6)
    s, sn, et = _sigmas(device)
    got = _flat(OPS[op](data, s, sn, et))
    want = _flat(OPS[op](data, s.double(), sn.double(), et.double()))
    assert got and len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-14, atol=1e-14)


ADVANTAGE_PRESETS = {
    "rtdmd": dict(scale="global", ddof=0, eps=1e-4, weights=[1.0, 0.5, 2.0], restandardize=True),
    "group_restandardize": dict(scale="group", ddof=0, eps=1e-4, restandardize=True),
    "trl": dict(scale="group", ddof=1, eps=1e-4),
    "dancegrpo": dict(scale="group", ddof=1, eps=1e-8),
    "none": dict(scale="none"),
}


@pytest.mark.parametrize("masked", [False, True], ids=["finite", "with_nan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("preset", sorted(ADVANTAGE_PRESETS))
def test_a_group_of_equal_rewards_gets_exactly_zero(device_backend, preset, dtype, masked):
    """Equal rewards have no advantage: exactly 0 in every preset, dtype and backend, also next to large
    rewards (an ulp of a rounded mean, divided by a tiny std, once gave up to 0.8) and under restandardize
    (whose mean of A is 0 by construction, so it is not subtracted). The other groups stay the float64 answer."""
    device, _ = device_backend
    n, groups = 96, 4
    ids = torch.arange(n, device=device) % groups
    rewards = (torch.rand(n, 3, device=device, dtype=torch.float64) * 3e5).to(dtype)
    rewards[ids == 1] = torch.tensor([0.3e5, 0.71e5, 0.123e5], dtype=torch.float64, device=device).to(dtype)
    if masked:
        rewards[2, 1] = float("nan")  # group 2: one missing reward; the masked path runs
    kw = ADVANTAGE_PRESETS[preset]
    a = rk.group_advantages(rewards, ids, num_groups=groups, **kw)
    assert torch.equal(a[ids == 1], torch.zeros_like(a[ids == 1]))
    with rk.use_backend("torch"):
        a64 = rk.group_advantages(rewards.double(), ids, num_groups=groups, **kw)
    torch.testing.assert_close(a.double(), a64, rtol=2e-6, atol=2e-6 * float(a64.abs().max()))


@pytest.mark.parametrize("restandardize", [False, True])
def test_nan_advantages_stay_nan_on_every_backend(device_backend, restandardize):
    """eps=0 and a group of zero spread: 0/0, NaN, on every backend, and ``clip`` keeps it NaN (the Triton
    path once clamped NaN to -clip)."""
    device, _ = device_backend
    rewards = torch.tensor([1.0, 1.0, 2.0, 3.0], device=device)
    ids = torch.tensor([0, 0, 1, 1], device=device)
    a = rk.group_advantages(rewards, ids, num_groups=2, scale="group", eps=0.0, restandardize=restandardize,
                            clip=5.0)
    with rk.use_backend("torch"):
        want = rk.group_advantages(rewards, ids, num_groups=2, scale="group", eps=0.0,
                                   restandardize=restandardize, clip=5.0)
    assert torch.isnan(a[:2]).all()
    assert torch.equal(torch.isnan(a), torch.isnan(want))
    torch.testing.assert_close(a, want, equal_nan=True)



@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inf/NaN warnings in the Triton interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_dmd_fixed_values_agree_bit_for_bit_across_backends(dtype):
    """Where the contract fixes a value — 0 for a NaN, ±max/N·grad_out for a saturated g — every backend of the
    machine gives the same bits as the torch path, in every dtype. In bfloat16 the saturated max/N lies between
    two bfloat16 values: the kernels round to nearest even as torch does (by hand where the CPU interpreter's
    conversion would truncate)."""
    backends = available_backends("cpu")
    assert "torch" in backends
    shape = (3, 4, 50)
    x = torch.randn(shape).to(dtype)
    real = torch.randn(shape).to(dtype)
    fake = (real.float() + 0.3 * torch.randn(shape)).to(dtype)
    fake[0, 0, :5] = float("nan")  # g -> 0
    fake[0, 1, 3] = float("inf")  # g -> +max
    real[1] = x[1]  # sample 1: zero normalizer with eps=0 -> ±max where fake != real
    fixed = torch.isnan(fake) | torch.isinf(fake)
    fixed[1] = True
    grads = {}
    for backend in backends:
        with rk.use_backend(backend):
            xg = x.clone().requires_grad_(True)
            rk.dmd_loss(xg, fake, real, eps=0.0).backward()
            grads[backend] = xg.grad
    for backend, g in grads.items():
        assert torch.isfinite(g).all()
        assert torch.equal(g[fixed], grads["torch"][fixed]), backend
