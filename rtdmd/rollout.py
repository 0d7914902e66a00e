"""Few-step CPS sampling and GRPO rollouts (docs/method.md §2.3, §2.4), every step through ``rtdmd_kernels``.

The randomness contract (:mod:`rtdmd.rng`): the starting noise ``x_T`` and the CPS noise ``ξ_j`` of
step ``j`` for the sample with global index ``i`` come from ``(seed, stream, step_or_epoch, i)``, so a
sample is the same whatever the batch size, the chunking or the process it lands on.
:func:`draw_noises` makes them; :func:`sample` and :func:`rollout` take them explicitly (stage 2
replaces some steps' noise by prompt-shared noise, docs/method.md §6).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import rtdmd_kernels as rk

from . import rng
from .distributed import DistEnv

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def draw_noises(seed: int, stream: str, step: int, indices: Sequence[int] | torch.Tensor,
                latent_shape: Sequence[int], num_steps: int, *, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_T [N, *latent], noises [K, N, *latent])`` for the samples ``indices`` under the RNG contract:
    streams ``{stream}/x_T`` and ``{stream}/xi{j}``. Noise is drawn for every step, the last (σn = 0) too,
    so the stream does not depend on the schedule."""
    x_t = rng.normal(seed, f"{stream}/x_T", step, indices, latent_shape, dtype=dtype, device=device)
    noises = torch.stack([rng.normal(seed, f"{stream}/xi{j}", step, indices, latent_shape, dtype=dtype,
                                     device=device) for j in range(num_steps)]) if num_steps else \
        torch.empty(0, *x_t.shape, dtype=dtype, device=device)
    return x_t, noises


def _check(x_T: torch.Tensor, sigmas: Sequence[float] | torch.Tensor, noises: torch.Tensor) -> list[float]:
    sig = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    if len(sig) < 2:
        raise ValueError(f"sigmas needs at least 2 levels, got {sig}")
    if noises.shape != (len(sig) - 1, *x_T.shape):
        raise ValueError(f"noises must have shape {(len(sig) - 1, *x_T.shape)}, got {tuple(noises.shape)}")
    return sig


def _sigma(value: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), value, dtype=torch.float32, device=x.device)


@torch.no_grad()
def sample(velocity_fn: VelocityFn, x_T: torch.Tensor, sigmas: Sequence[float] | torch.Tensor, *, eta: float,
           noises: torch.Tensor) -> torch.Tensor:
    """Run the CPS sampler (``rk.cps_step``) over ``sigmas`` (ending at 0: the result is the last step's
    x0 prediction, docs/method.md §2.4) with the given noises ``[K, *x_T.shape]``; no gradient."""
    sig = _check(x_T, sigmas, noises)
    x = x_T
    for j, (s, sn) in enumerate(zip(sig[:-1], sig[1:], strict=False)):
        v = velocity_fn(x, _sigma(s, x))
        x, _ = rk.cps_step(x, v, s, sn, eta=eta, noise=noises[j])
    return x


@dataclass
class Rollout:
    """A rollout's stored trajectory (docs/method.md §2.3): ``trajectory [N, K+1, ...]`` holds ``x_T`` and every CPS
    output once — ``latents`` (step inputs) and ``next_latents`` (step outputs) are views of it — plus the
    surrogate ``log_probs [N, K]``, the ``noises [N, K, ...]`` used and ``sigmas [K+1]``."""

    trajectory: torch.Tensor
    log_probs: torch.Tensor
    noises: torch.Tensor
    sigmas: torch.Tensor

    @property
    def latents(self) -> torch.Tensor:
        return self.trajectory[:, :-1]

    @property
    def next_latents(self) -> torch.Tensor:
        return self.trajectory[:, 1:]

    @property
    def final(self) -> torch.Tensor:
        """The last CPS output (the x0 prediction when the schedule ends at 0)."""
        return self.trajectory[:, -1]


@torch.no_grad()
def rollout(velocity_fn: VelocityFn, x_T: torch.Tensor, sigmas: Sequence[float] | torch.Tensor, *, eta: float,
            noises: torch.Tensor) -> Rollout:
    """:func:`sample` that keeps the trajectory and the CPS log-probs (``rk.cps_logprob``, the reference's
    surrogate ``-mean((x' - μ)²)``, 0 at the deterministic last step) for GRPO. The chain is float32."""
    sig = _check(x_T, sigmas, noises)
    traj, lps = [x_T.float()], []
    for j, (s, sn) in enumerate(zip(sig[:-1], sig[1:], strict=False)):
        x = traj[-1]
        v = velocity_fn(x, _sigma(s, x)).float()
        x_next, _ = rk.cps_step(x, v, s, sn, eta=eta, noise=noises[j])
        lps.append(rk.cps_logprob(x, v, x_next, s, sn, eta=eta))
        traj.append(x_next)
    return Rollout(trajectory=torch.stack(traj, 1), log_probs=torch.stack(lps, 1),
                   noises=noises.transpose(0, 1).contiguous(), sigmas=torch.tensor(sig, dtype=torch.float32))


def generate(backbone, prompts: Sequence[str], *, sigmas: Sequence[float], eta: float, seed: int,
             stream: str = "eval", step: int = 0, indices: Sequence[int] | None = None, batch_size: int = 1024,
             device: torch.device | str | None = None, env: DistEnv | None = None) -> torch.Tensor:
    """Samples of ``backbone`` for ``prompts`` (one each) under the RNG contract, float32 on the CPU.

    Sample ``i`` uses global index ``indices[i]`` (default ``i``) of ``stream``/``step`` for its ``x_T``
    and CPS noises, and the prompts are encoded chunk by chunk — so the result does not depend on
    ``batch_size``. Under several processes (``env``) every rank samples its block and all get the whole result
    (a collective); ``device`` defaults to the env's (else the CPU)."""
    indices = list(range(len(prompts))) if indices is None else [int(i) for i in indices]
    if len(indices) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(indices)} indices")
    device = device if device is not None else env.device if env is not None else "cpu"
    if env is not None and env.active:  # each rank its block, padded to equal sizes (FSDP: the same calls everywhere)
        per = -(-len(prompts) // env.world)
        mine = [min(i, len(prompts) - 1) for i in range(env.rank * per, (env.rank + 1) * per)] if prompts else []
        local = _generate_local(backbone, [prompts[i] for i in mine], [indices[i] for i in mine], sigmas, eta, seed,
                                stream, step, batch_size, device)
        return env.all_gather(local.to(env.device)).cpu()[: len(prompts)]
    return _generate_local(backbone, list(prompts), indices, sigmas, eta, seed, stream, step, batch_size, device)


def _generate_local(backbone, prompts, indices, sigmas, eta, seed, stream, step, batch_size, device) -> torch.Tensor:
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        x_t, noises = draw_noises(seed, stream, step, indices[chunk], backbone.latent_shape, len(sigmas) - 1,
                                  device=device)
        cond = backbone.encode(prompts[chunk])
        out.append(sample(backbone.velocity_fn(cond), x_t, sigmas, eta=eta, noises=noises).float().cpu())
    return torch.cat(out) if out else torch.empty(0, *backbone.latent_shape)
