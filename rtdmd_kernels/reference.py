"""Plain, readable PyTorch of every op, in the reference implementation's op order and precision.

This is the executable spec, the test oracle (call it on float64 inputs) and the "what people run
today" baseline of the benchmarks (call it on the trainer's dtypes). Nothing here is fused or fast.
Source of the semantics: SPEC.md (the authors' code at Harahan/RTDMD@6c3cb03), written anew.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _per_sample(value, like: torch.Tensor):
    """A float, or a ``[B]`` tensor reshaped to broadcast against ``like`` ([B, ...])."""
    if isinstance(value, torch.Tensor):
        return value.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)
    return value


def dmd_loss(x, x_fake, x_real, *, normalize="per_sample", eps=0.0, return_stats=False):
    """SPEC §3 step by step: the no-grad part in ``x.dtype``, then the float64 surrogate MSE."""
    with torch.no_grad():
        p_real = x - x_real
        p_fake = x - x_fake
        g = p_real - p_fake
        if normalize == "per_sample":
            n = torch.abs(p_real).mean(dim=tuple(range(1, x.dim())), keepdim=True)
        elif normalize == "global":
            n = torch.abs(p_real).mean()
        elif normalize == "none":
            n = torch.ones((), dtype=x.dtype, device=x.device)
        else:
            raise ValueError(f"normalize must be per_sample, global or none, got {normalize!r}")
        n = n + eps
        g = g / n
        g = torch.nan_to_num(g)
        grad_norm = torch.norm(g)
        target = (x - g).detach().double()
    loss = 0.5 * F.mse_loss(x.double(), target)
    if return_stats:
        normalizer = n.reshape(-1).expand(x.shape[0]) if n.dim() <= 1 else n.reshape(x.shape[0])
        return loss, {"grad_norm": grad_norm, "normalizer": normalizer}
    return loss


def cps_transition(x, v, sigma, sigma_next, eta, noise):
    """One CPS step (SPEC §2.1) computed in at least float32: Euler where sigma_next = 0 or eta = 0."""
    work = torch.promote_types(x.dtype, torch.float32)
    x, v, noise = x.to(work), v.to(work), noise.to(work)
    sigma, sigma_next, eta_v = _per_sample(sigma, x), _per_sample(sigma_next, x), _per_sample(eta, x)
    if isinstance(eta_v, torch.Tensor):
        c_eta, s_eta = torch.cos(eta_v * math.pi / 2), torch.sin(eta_v * math.pi / 2)
    else:
        c_eta, s_eta = math.cos(eta_v * math.pi / 2), math.sin(eta_v * math.pi / 2)
    x0 = x - sigma * v
    eps_hat = x + (1 - sigma) * v
    mean = (1 - sigma_next) * x0 + sigma_next * c_eta * eps_hat
    stochastic = mean + sigma_next * s_eta * noise
    euler = x + (sigma_next - sigma) * v
    deterministic = (torch.as_tensor(sigma_next, device=x.device) == 0) | (torch.as_tensor(eta_v, device=x.device) == 0)
    return torch.where(deterministic, euler, stochastic)


def ac_dmd_loss(x_s, x_t, v_real, v_fake, noise, sigma_s, sigma_t, *, v_real_uncond=None,
                guidance_scale=1.0, eta=0.9, normalize="per_sample", eps=0.0, return_stats=False):
    """SPEC §4.3: teacher CFG in the inputs' dtype, both CPS transitions back to sigma_s with the
    shared noise (each cast to ``x_t.dtype``), then ``dmd_loss``."""
    with torch.no_grad():
        if v_real_uncond is not None:
            v_r = v_real_uncond + _per_sample(guidance_scale, v_real) * (v_real - v_real_uncond)
        else:
            v_r = v_real
        xs_real = cps_transition(x_t, v_r, sigma_t, sigma_s, eta, noise).to(x_t.dtype)
        xs_fake = cps_transition(x_t, v_fake, sigma_t, sigma_s, eta, noise).to(x_t.dtype)
    return dmd_loss(x_s, xs_fake, xs_real, normalize=normalize, eps=eps, return_stats=return_stats)
