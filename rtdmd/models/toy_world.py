"""The analytic toy world of docs/toy.md: one isotropic Gaussian mixture per prompt, known in closed form.

Everything here is exact: the teacher's velocity at any noise level (with CFG against the
unconditional mixture), exact samples of the teacher and of its reward-tilted family
``p_β(x) ∝ p(x)·exp(β⟨a_p, x⟩)``, and the tilted mixture weights. The trainer and the evaluation
use it as the ground truth a distilled generator is measured against.

Conventions: ``x_σ = (1-σ)·x0 + σ·ε`` (docs/method.md §1), velocity ``v = ε - x0``. Latents are image-shaped
``[B, C, H, W]``; internally samples are flattened to ``[B, D]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

UNCONDITIONAL = -1  # prompt index of the empty prompt "" (the CFG unconditional branch)


def prompt_text(index: int) -> str:
    """The toy prompts are ``"toy prompt 0"`` ... (docs/toy.md)."""
    return f"toy prompt {index}"


@dataclass(frozen=True)
class ToyWorld:
    """Mixture parameters (float64): ``weights [P, K]``, ``means [P, K, D]``, ``stds [P, K]``,
    ``reward_dirs [P, D]`` (unit, orthogonal to their prompt's means), ``latent_shape (C, H, W)``."""

    weights: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor
    reward_dirs: torch.Tensor
    latent_shape: tuple[int, int, int]

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        *,
        num_prompts: int = 4,
        num_components: int = 3,
        latent_shape: tuple[int, int, int] | list[int] = (4, 8, 8),
        seed: int = 20260526,
        min_weight: float = 0.15,
        std_range: tuple[float, float] | list[float] = (0.3, 0.6),
    ) -> ToyWorld:
        """docs/toy.md's pinned construction from one seed: Dirichlet(2) weights (redrawn until none is below
        ``min_weight``), smooth random means of norm √D/2, stds uniform in ``std_range``, and a random
        unit reward direction per prompt orthogonal to all of that prompt's means."""
        c, h, w = (int(s) for s in latent_shape)
        d = c * h * w
        if num_components * min_weight > 1.0:
            raise ValueError(f"min_weight {min_weight} is impossible with {num_components} components")
        if num_components >= d:
            raise ValueError(f"need fewer components ({num_components}) than latent elements ({d})")
        rng = np.random.default_rng(seed)
        weights = np.empty((num_prompts, num_components))
        for p in range(num_prompts):
            while True:  # rejection keeps Dirichlet(2)'s shape while guaranteeing every mode is visible
                pi = rng.dirichlet(np.full(num_components, 2.0))
                if pi.min() >= min_weight:
                    break
            weights[p] = pi
        # Smooth patterns: a coarse random field upsampled bilinearly to the latent's H x W.
        coarse = rng.standard_normal((num_prompts * num_components, c, max(1, h // 4), max(1, w // 4)))
        smooth = F.interpolate(torch.from_numpy(coarse), size=(h, w), mode="bilinear", align_corners=False)
        smooth = smooth + 0.25 * torch.from_numpy(rng.standard_normal(smooth.shape))  # keep means linearly independent
        means = smooth.reshape(num_prompts, num_components, d)
        means = means / means.norm(dim=-1, keepdim=True) * (math.sqrt(d) / 2)
        lo, hi = std_range
        stds = torch.from_numpy(rng.uniform(lo, hi, size=(num_prompts, num_components)))
        dirs = torch.from_numpy(rng.standard_normal((num_prompts, d)))
        for p in range(num_prompts):
            q, _ = torch.linalg.qr(means[p].T)  # orthonormal basis of the prompt's means
            a = dirs[p] - q @ (q.T @ dirs[p])
            dirs[p] = a / a.norm()
        return cls(torch.from_numpy(weights), means.contiguous(), stds, dirs, (c, h, w))

    @property
    def num_prompts(self) -> int:
        return self.weights.shape[0]

    @property
    def num_components(self) -> int:
        return self.weights.shape[1]

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    def prompts(self) -> list[str]:
        return [prompt_text(p) for p in range(self.num_prompts)]

    def prompt_index(self, prompt: str) -> int:
        """``"toy prompt i"`` -> i, ``""`` -> UNCONDITIONAL; anything else is an error."""
        if prompt == "":
            return UNCONDITIONAL
        for p in range(self.num_prompts):
            if prompt == prompt_text(p):
                return p
        last = prompt_text(self.num_prompts - 1)
        raise ValueError(f"unknown toy prompt {prompt!r}: expected '' or '{prompt_text(0)}'..'{last}'")

    # ------------------------------------------------------------------ the exact teacher
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, prompt_idx: torch.Tensor,
                 guidance: float = 1.0) -> torch.Tensor:
        """Exact flow-matching velocity ``E[ε - x0 | x_σ = x]`` of prompt ``prompt_idx[b]`` (docs/toy.md), with CFG
        ``v_u + guidance·(v_c - v_u)`` against the unconditional mixture when ``guidance != 1``.
        Computed in float64 with log-sum-exp (exact at every σ in [0, 1]); returned in ``x.dtype``."""
        shape, dtype = x.shape, x.dtype
        xf = x.reshape(shape[0], -1).to(torch.float64)
        sig = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(shape[0]).reshape(-1, 1)
        idx = torch.as_tensor(prompt_idx, device=x.device).long().expand(shape[0])
        v_c = self._velocity(xf, sig, idx)
        if guidance != 1.0:
            v_u = self._velocity(xf, sig, torch.full_like(idx, UNCONDITIONAL))
            v_c = v_u + guidance * (v_c - v_u)
        return v_c.reshape(shape).to(dtype)

    def _velocity(self, x: torch.Tensor, sig: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        dev = x.device
        mu = self.means.to(dev).reshape(-1, self.dim)  # [M, D], M = P*K: every component of every prompt
        s2 = self.stds.to(dev).reshape(1, -1) ** 2  # [1, M]
        logpi = self._log_weights(idx).to(dev)  # [B, M], -inf outside the prompt's mixture
        one_m = 1.0 - sig  # [B, 1]
        var = one_m**2 * s2 + sig**2  # [B, M]
        # |x - (1-σ)μ_k|² without the [B, M, D] tensor.
        dist2 = (x * x).sum(-1, keepdim=True) - 2 * one_m * (x @ mu.T) + one_m**2 * (mu * mu).sum(-1)
        logw = logpi - 0.5 * self.dim * var.log() - dist2 / (2 * var)
        w = torch.softmax(logw, dim=-1)  # posterior over components
        # v* = Σ_k w_k [α_k (x - (1-σ)μ_k) - μ_k],  α_k = (σ - (1-σ)s_k²) / v_k
        alpha = (sig - one_m * s2) / var
        coef_mu = w * (alpha * one_m + 1.0)
        return (w * alpha).sum(-1, keepdim=True) * x - coef_mu @ mu

    def _log_weights(self, idx: torch.Tensor) -> torch.Tensor:
        p, k = self.weights.shape
        cond = torch.full((p, p * k), -math.inf, dtype=torch.float64)
        for q in range(p):
            cond[q, q * k:(q + 1) * k] = self.weights[q].log()
        uncond = (self.weights.reshape(-1) / p).log().unsqueeze(0)
        table = torch.cat([cond, uncond])  # row P is the unconditional mixture
        return table[torch.where(idx.cpu() < 0, p, idx.cpu())]

    def x0_mean(self, x: torch.Tensor, sigma: torch.Tensor | float, prompt_idx: torch.Tensor) -> torch.Tensor:
        """``E[x0 | x_σ = x] = x - σ·v*`` (the teacher's x0 prediction)."""
        sig = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0]).reshape(-1, *[1] * (x.dim() - 1))
        return (x.double() - sig * self.velocity(x, sigma, prompt_idx).double()).to(x.dtype)

    # ------------------------------------------------------------------ exact sampling
    def tilted_weights(self, beta: float | torch.Tensor) -> torch.Tensor:
        """``π_k(β) ∝ π_k·exp(β⟨a_p, μ_k⟩ + β² s_k² / 2)`` per prompt, ``[P, K]`` (or ``[G, P, K]`` for a β grid)."""
        beta = torch.as_tensor(beta, dtype=torch.float64)
        b = beta.reshape(-1, 1, 1)
        proj = torch.einsum("pkd,pd->pk", self.means, self.reward_dirs)
        logw = self.weights.log() + b * proj + 0.5 * b**2 * self.stds**2
        out = torch.softmax(logw, dim=-1)
        return out[0] if beta.dim() == 0 else out

    def tilted_means(self, beta: float | torch.Tensor) -> torch.Tensor:
        """Component means of the tilted mixture, ``μ_k + β s_k² a_p``: ``[P, K, D]`` (``[G, P, K, D]`` for a grid)."""
        beta = torch.as_tensor(beta, dtype=torch.float64)
        b = beta.reshape(-1, 1, 1, 1)
        out = self.means + b * (self.stds**2).unsqueeze(-1) * self.reward_dirs.unsqueeze(1)
        return out[0] if beta.dim() == 0 else out

    def sample(self, prompt_idx: torch.Tensor, uniforms: torch.Tensor, normals: torch.Tensor,
               beta: float = 0.0) -> torch.Tensor:
        """Exact samples of the (β-tilted) teacher for prompts ``prompt_idx [N]``, float64 ``[N, C, H, W]``.

        The randomness is passed in — ``uniforms [N]`` pick the component by inverse CDF, ``normals [N, D]``
        are the within-component noise — so the same draws give samples for every β (common random
        numbers: the FD-vs-β curve is smooth) and follow the trainer's per-sample RNG contract."""
        idx = torch.as_tensor(prompt_idx).long()
        pi = self.tilted_weights(beta)[idx]  # [N, K]
        cdf = pi.cumsum(-1)
        comp = torch.searchsorted(cdf, uniforms.double().unsqueeze(-1).clamp(max=1 - 1e-12)).squeeze(-1)
        comp = comp.clamp(max=self.num_components - 1)
        mean = self.tilted_means(beta)[idx, comp]
        std = self.stds[idx, comp].unsqueeze(-1)
        x = mean + std * normals.reshape(len(idx), -1).double()
        return x.reshape(len(idx), *self.latent_shape)

    def nearest_component(self, x: torch.Tensor, prompt_idx: torch.Tensor) -> torch.Tensor:
        """Index of the nearest (Euclidean) component mean of the sample's own prompt, ``[N]``."""
        xf = x.reshape(x.shape[0], self.dim).double()
        mu = self.means[torch.as_tensor(prompt_idx).long()]  # [N, K, D]
        return (xf.unsqueeze(1) - mu).square().sum(-1).argmin(-1)

    def linear_reward(self, x: torch.Tensor, prompt_idx: torch.Tensor) -> torch.Tensor:
        """``⟨a_p, x⟩`` per sample, differentiable in ``x``, in ``x``'s floating dtype (float32 minimum)."""
        dt = torch.promote_types(x.dtype, torch.float32)
        a = self.reward_dirs.to(device=x.device, dtype=dt)[torch.as_tensor(prompt_idx, device=x.device).long()]
        return (x.reshape(x.shape[0], -1).to(dt) * a).sum(-1)
