"""Sigma schedules of the few-step sampler (SPEC §1).

The config names the denoising steps as the reference does (``[1000, 750, 500, 250]``); the raw levels
are ``u = step / 1000``, a terminal 0 is appended, and the model's shift maps ``u`` to ``σ``:
SD3/SD3.5 use the static shift ``σ = s·u / (1 + (s-1)·u)`` with ``s = 3.0`` and round to 6 decimals,
which gives ``[1.0, 0.9, 0.75, 0.5] -> 0``. (FLUX.2's dynamic shift comes with its backbone.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000


def check_denoising_steps(steps: Sequence[int]) -> list[int]:
    """The step list must be strictly decreasing integers in (0, 1000]."""
    out = [int(s) for s in steps]
    if not out:
        raise ValueError("denoising_steps must not be empty")
    if any(not 0 < s <= NUM_TRAIN_TIMESTEPS for s in out):
        raise ValueError(f"denoising_steps must lie in (0, {NUM_TRAIN_TIMESTEPS}], got {out}")
    if any(a <= b for a, b in zip(out, out[1:], strict=False)):
        raise ValueError(f"denoising_steps must be strictly decreasing, got {out}")
    return out


def static_shift(u: float, shift: float) -> float:
    """SD3's time shift ``s·u / (1 + (s-1)·u)`` of a raw level ``u`` in [0, 1]."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def sd3_sigmas(denoising_steps: Sequence[int] = (1000, 750, 500, 250), shift: float = 3.0) -> list[float]:
    """``[σ_0, ..., σ_{K-1}, 0]`` for SD3/SD3.5 (and the toy world), rounded to 6 decimals as the reference does."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    steps = check_denoising_steps(denoising_steps)
    return [round(static_shift(s / NUM_TRAIN_TIMESTEPS, shift), 6) for s in steps] + [0.0]


def uniform_denoising_steps(num_steps: int) -> list[int]:
    """The reference's rule for a K-step list: ``1000, 1000-1000/K, ...`` (``[1000, 750, 500, 250]`` for K = 4)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return [round(NUM_TRAIN_TIMESTEPS * (num_steps - i) / num_steps) for i in range(num_steps)]


def sigma_tensor(sigmas: Sequence[float], device: torch.device | str = "cpu") -> torch.Tensor:
    """The schedule as a float32 tensor (what ``rk.cps_step`` and the networks consume)."""
    return torch.tensor(list(sigmas), dtype=torch.float32, device=device)
