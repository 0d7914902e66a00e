"""Edge rules every op keeps in every dtype and on every backend (docs/kernels.md §1): float64 data get float64
arithmetic whatever dtype the schedule tensors come in."""

from __future__ import annotations

import pytest
import torch

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
