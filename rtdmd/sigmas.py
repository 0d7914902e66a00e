"""Sigma schedules of the few-step sampler (docs/method.md §1).

The config names the denoising steps as the reference does (``[1000, 750, 500, 250]``); the raw levels
are ``u = step / 1000``, a terminal 0 is appended, and the model's shift maps ``u`` to ``σ``:
SD3/SD3.5 use the static shift ``σ = s·u / (1 + (s-1)·u)`` with ``s = 3.0`` and round to 6 decimals,
which gives ``[1.0, 0.9, 0.75, 0.5] -> 0``. FLUX.2 uses the dynamic (exponential) shift
``σ = e^mu / (e^mu + (1/u - 1))`` with ``mu = flux2_empirical_mu(image_seq_len, K)``, where ``image_seq_len`` is
the number of latent tokens after the 2×2 patchify (``latent_H · latent_W`` of the ``[B, 128, H, W]`` latent):
1024 at 512 px and 4096 at 1024 px, so the schedule depends on the resolution (docs/method.md §1, §13.6).
:func:`sigmas_for` is the one entry point for either rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000

# FLUX.2's empirical mu (docs/method.md §1): mu is linear in the sequence length at 10 steps (A1, B1) and at 200 steps
# (A2, B2) and linear in the step count between the two; past FLUX2_MU_SEQ_SPLIT tokens only the 200-step line counts.
FLUX2_MU_A1, FLUX2_MU_B1 = 8.73809524e-05, 1.89833333
FLUX2_MU_A2, FLUX2_MU_B2 = 1.6927e-04, 0.45666666
FLUX2_MU_SEQ_SPLIT = 4300


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


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def flux2_image_seq_len(height: int, width: int, *, vae_scale_factor: int = 8) -> int:
    """FLUX.2's ``image_seq_len`` for an image of ``height × width`` pixels (method.md §1): the latent tokens after the
    VAE's ``vae_scale_factor``× downsampling and the 2×2 patchify, ``(height // 16) · (width // 16)`` — 1024 at
    512 px, 4096 at 1024 px (the size rule of diffusers' FLUX.2 pipelines)."""
    height, width = _positive_int("height", height), _positive_int("width", width)
    patch = 2 * _positive_int("vae_scale_factor", vae_scale_factor)
    if height < patch or width < patch:
        raise ValueError(f"height and width must be >= {patch} px, got {height}x{width}")
    return (height // patch) * (width // patch)


def flux2_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's resolution- and step-count-dependent shift ``mu`` (docs/method.md §1).

    With ``m10 = A1·L + B1`` and ``m200 = A2·L + B2`` (the fits at 10 and 200 steps for ``L = image_seq_len``
    tokens), ``mu = m200 + (m200 - m10)·(num_steps - 200)/190``; for ``L > 4300`` it is ``m200`` whatever the
    step count. The reference calls it with ``num_steps = K = 4``: ``mu = 2.03069`` at ``L = 1024`` (512 px) and
    ``2.29118`` at ``L = 4096`` (1024 px)."""
    seq = _positive_int("image_seq_len", image_seq_len)
    steps = _positive_int("num_steps", num_steps)
    m200 = FLUX2_MU_A2 * seq + FLUX2_MU_B2
    if seq > FLUX2_MU_SEQ_SPLIT:
        return float(m200)
    m10 = FLUX2_MU_A1 * seq + FLUX2_MU_B1
    return float(m200 + (m200 - m10) * (steps - 200) / 190.0)


def flux2_seq_len_from_mu(mu: float, num_steps: int, *, tol: float = 1e-9) -> int:
    """The inverse of :func:`flux2_empirical_mu` in the sequence length: the integer ``image_seq_len`` with
    ``flux2_empirical_mu(image_seq_len, num_steps) == mu`` (within ``tol``).

    A stock FLUX.2 pipeline computes ``mu`` for its own ``num_inference_steps`` (default 50), not for the
    distilled step count; this recovers the image size so ``mu`` can be recomputed for ``K`` steps (docs/method.md §1).
    Both branches are tried; where both fit (a coincidence of about 1 in 10^5), the short-sequence one wins.
    Raises ``ValueError`` (naming ``mu``) when no sequence length gives ``mu``."""
    steps = _positive_int("num_steps", num_steps)
    mu = float(mu)
    if not math.isfinite(mu):
        raise ValueError(f"mu must be finite, got {mu}")
    c = (steps - 200) / 190.0
    candidates = [
        (mu - FLUX2_MU_B2 - (FLUX2_MU_B2 - FLUX2_MU_B1) * c) / (FLUX2_MU_A2 + (FLUX2_MU_A2 - FLUX2_MU_A1) * c),
        (mu - FLUX2_MU_B2) / FLUX2_MU_A2,
    ]
    for value in candidates:
        seq = round(value)
        if 1 <= seq and abs(flux2_empirical_mu(seq, steps) - mu) <= tol * max(1.0, abs(mu)):
            return seq
    raise ValueError(f"mu={mu} is not FLUX.2's empirical mu of any image_seq_len at num_steps={steps}")


def dynamic_shift(u: float, mu: float) -> float:
    """FLUX.2's exponential time shift ``e^mu / (e^mu + (1/u - 1))`` of a raw level ``u`` in (0, 1] (method.md §1)."""
    if not 0.0 < u <= 1.0:
        raise ValueError(f"u must lie in (0, 1], got {u}")
    e = math.exp(mu)
    return e / (e + (1.0 / u - 1.0))


def dynamic_shift_sigmas(denoising_steps: Sequence[int] = (1000, 750, 500, 250), mu: float = 0.0) -> torch.Tensor:
    """``[σ_0, ..., σ_{K-1}, 0]`` (float64 ``[K+1]``) for FLUX.2's dynamic shift with ``mu`` (method.md §1), unrounded:
    ``mu = flux2_empirical_mu(1024, 4)`` gives ``[1.0, 0.95809, 0.88398, 0.71750, 0]``."""
    mu = float(mu)
    if not math.isfinite(mu):
        raise ValueError(f"mu must be finite, got {mu}")
    steps = check_denoising_steps(denoising_steps)
    u = torch.tensor(steps, dtype=torch.float64) / NUM_TRAIN_TIMESTEPS
    e = torch.tensor(mu, dtype=torch.float64).exp()
    return torch.cat([e / (e + (1.0 / u - 1.0)), torch.zeros(1, dtype=torch.float64)])


def stretch_to_terminal(sigmas: Sequence[float], shift_terminal: float) -> list[float]:
    """The optional terminal stretch of a diffusers flow-matching config (``shift_terminal``, method.md §1): the levels
    before the appended 0 are mapped by ``1 - (1 - σ)·(1 - T)/(1 - σ_{K-1})`` so the last one becomes ``T``."""
    sig = [float(s) for s in sigmas]
    if len(sig) < 2 or sig[-1] != 0.0:
        raise ValueError(f"sigmas must end with the terminal 0, got {sig}")
    if not 0.0 < shift_terminal < 1.0:
        raise ValueError(f"shift_terminal must lie in (0, 1), got {shift_terminal}")
    if sig[-2] >= 1.0:
        raise ValueError(f"shift_terminal needs a last level below 1, got sigmas {sig}")
    scale = (1.0 - sig[-2]) / (1.0 - shift_terminal)
    return [1.0 - (1.0 - s) / scale for s in sig[:-1]] + [0.0]


def sigmas_for(denoising_steps: Sequence[int] = (1000, 750, 500, 250), *, shift: float | None = None,
               mu: float | None = None, shift_terminal: float | None = None) -> list[float]:
    """``[σ_0, ..., σ_{K-1}, 0]`` by either rule of docs/method.md §1 — exactly one of ``shift`` and ``mu``:

    * ``shift``: SD3/SD3.5's static shift, rounded to 6 decimals (:func:`sd3_sigmas`);
    * ``mu``: FLUX.2's dynamic shift (:func:`dynamic_shift_sigmas`), e.g.
      ``mu = flux2_empirical_mu(flux2_image_seq_len(512, 512), len(denoising_steps))``.

    ``shift_terminal`` (a diffusers config key; none for SD3.5 or FLUX.2-klein) applies :func:`stretch_to_terminal`
    after the shift. Returns Python floats, as :func:`sd3_sigmas` does."""
    if (shift is None) == (mu is None):
        raise ValueError(f"pass exactly one of shift and mu, got shift={shift}, mu={mu}")
    if shift is not None:
        sig = sd3_sigmas(denoising_steps, shift)
    else:
        sig = [float(s) for s in dynamic_shift_sigmas(denoising_steps, mu).tolist()]
    return sig if shift_terminal is None else stretch_to_terminal(sig, shift_terminal)
