"""The toy evaluation of docs/toy.md §7: Fréchet distances to the exact teacher and to its reward-tilted
family, the β that fits best, mode coverage, within-mode spread and the in-mode tilt.

All metric math runs on the CPU in float64. The reference side (exact samples of the tilted family on a β grid,
drawn once with common random numbers so the FD-vs-β curve is smooth) is fitted once at construction; scoring a
row then costs one symmetric eigenvalue problem per (β, prompt).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from .. import rng
from ..distributed import DistEnv
from ..models.toy_world import ToyWorld
from ..rollout import generate
from ..sigmas import sd3_sigmas

log = logging.getLogger(__name__)

ROW_KEYS = ("reward_mean", "fd_teacher", "fd_tilted", "beta_hat", "beta_shift", "fd_tilted_at_beta",
            "mode_coverage", "std_ratio")
DISTANCE_KEYS = ("fd_teacher", "fd_tilted", "fd_tilted_at_beta")


# ---------------------------------------------------------------------------------------------- Fréchet distance
def _sym_sqrt(cov: torch.Tensor) -> torch.Tensor:
    """PSD square root of symmetric ``[..., D, D]``; tiny negative eigenvalues (rounding) are clamped to 0."""
    evals, evecs = torch.linalg.eigh(cov)
    return (evecs * evals.clamp(min=0).sqrt().unsqueeze(-2)) @ evecs.mT


def _mean_cov(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[..., D]`` and unbiased covariance ``[..., D, D]`` of ``x [..., N, D]`` in float64."""
    x = x.double()
    if x.shape[-2] < 2:
        raise ValueError(f"need at least 2 samples to fit a Gaussian, got {x.shape[-2]}")
    mean = x.mean(-2)
    xc = x - mean.unsqueeze(-2)
    return mean, xc.mT @ xc / (x.shape[-2] - 1)


@dataclass(frozen=True)
class GaussianStats:
    """A fitted Gaussian kept in the form the FD needs: ``mean [..., D]``, ``cov_sqrt [..., D, D]`` (symmetric
    PSD square root) and ``trace [...]`` = Tr(cov). Leading dims index a batch of references (β, prompt)."""

    mean: torch.Tensor
    cov_sqrt: torch.Tensor
    trace: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor) -> GaussianStats:
        """Fit ``x [..., N, D]`` (batched over leading dims) in float64."""
        mean, cov = _mean_cov(x)
        return cls(mean, _sym_sqrt(cov), cov.diagonal(dim1=-2, dim2=-1).sum(-1))

    @property
    def cov(self) -> torch.Tensor:
        return self.cov_sqrt @ self.cov_sqrt

    def __getitem__(self, idx: int | slice | tuple) -> GaussianStats:
        return GaussianStats(self.mean[idx], self.cov_sqrt[idx], self.trace[idx])

    @staticmethod
    def stack(stats: list[GaussianStats], dim: int = 0) -> GaussianStats:
        return GaussianStats(torch.stack([s.mean for s in stats], dim), torch.stack([s.cov_sqrt for s in stats], dim),
                             torch.stack([s.trace for s in stats], dim))


def frechet_distance_to(mean: torch.Tensor, cov: torch.Tensor, ref: GaussianStats) -> torch.Tensor:
    """FD between ``N(mean, cov)`` and every Gaussian of ``ref`` (leading dims broadcast), float64.

    Uses ``Tr((C1^½ C2 C1^½)^½) = Σ sqrt(eig(R C R))`` with the cached reference root ``R``: the eigenvalues of
    ``A^½ B A^½`` and ``B^½ A B^½`` coincide (both are similar to ``AB``), so either side's root works."""
    mean, cov = mean.double(), cov.double()
    m = ref.cov_sqrt @ cov @ ref.cov_sqrt
    m = 0.5 * (m + m.mT)  # exact symmetry for eigvalsh despite rounding
    tr_cross = torch.linalg.eigvalsh(m).clamp(min=0).sqrt().sum(-1)
    tr_cov = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (mean - ref.mean).square().sum(-1) + tr_cov + ref.trace - 2 * tr_cross


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of ``x [N, D]`` and ``y [M, D]`` (float64)."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected [N, D] and [M, D] with the same D, got {tuple(x.shape)} and {tuple(y.shape)}")
    mean, cov = _mean_cov(x)
    return float(frechet_distance_to(mean, cov, GaussianStats.fit(y)))


# ---------------------------------------------------------------------------------------------- the evaluator
class ToyEvaluator:
    """docs/toy.md's evaluation against exact references of one :class:`ToyWorld`.

    Every row is scored on ``prompt_idx`` (``P·n_eval`` samples, prompt ``p``'s block contiguous); the generator
    must produce its samples in exactly this order (global indices ``global_indices``)."""

    def __init__(self, world: ToyWorld, *, n_eval: int, beta: float = 1.0, beta_max: float = 4.0,
                 beta_step: float = 0.1, seed: int = 0) -> None:
        if n_eval < 2:
            raise ValueError(f"n_eval must be >= 2, got {n_eval}")
        if beta_step <= 0 or beta_max < 0:
            raise ValueError(f"need beta_step > 0 and beta_max >= 0, got {beta_step}, {beta_max}")
        steps = round(beta_max / beta_step)
        if not math.isclose(steps * beta_step, beta_max, rel_tol=0, abs_tol=1e-9):
            raise ValueError(f"beta_max {beta_max} is not a multiple of beta_step {beta_step}")
        t0 = time.perf_counter()
        self.world = world
        self.n_eval = int(n_eval)
        self.beta = float(beta)
        self.seed = int(seed)
        p, d = world.num_prompts, world.dim
        self.prompt_idx = torch.arange(p).repeat_interleave(self.n_eval)
        self.global_indices = torch.arange(p * self.n_eval)
        # Rounded so the grid holds 0.1·k exactly as printed (4.0 is in it, 0.30000000000000004 is not).
        self.beta_grid = torch.tensor([round(i * beta_step, 10) for i in range(steps + 1)], dtype=torch.float64)

        # Draw A once; every β reuses the same uniforms and normals (common random numbers). Its component picks
        # are stratified: counts then match π(β) within ±1 at every β, which removes the reference's share of the
        # mode-frequency noise that dominates the FD-vs-β curve (beta_hat scatter ~0.15 -> ~0.1 at n_eval 2048).
        u, z = self._draws("eval/teacher_a", stratified=True)
        grid = [GaussianStats.fit(self._by_prompt(world.sample(self.prompt_idx, u, z, float(b))))
                for b in self.beta_grid]
        self._grid = GaussianStats.stack(grid, dim=1)  # [P, G, ...]: one prompt's whole curve per slice
        self._at_beta = GaussianStats.fit(self._by_prompt(world.sample(self.prompt_idx, u, z, self.beta)))  # [P]
        self._proj_means = torch.einsum("pkd,pd->pk", world.means, world.reward_dirs)  # ⟨a_p, μ_k⟩
        log.debug("ToyEvaluator: %d prompts x %d samples, D=%d, %d betas fitted in %.2fs",
                  p, self.n_eval, d, len(self.beta_grid), time.perf_counter() - t0)

    # ------------------------------------------------------------------ exact samples
    def _draws(self, stream: str, stratified: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        # Separate sub-streams for the component pick and the in-component noise (never reuse one seed twice).
        u = rng.uniform(self.seed, f"{stream}/component", 0, self.global_indices)
        if stratified:  # one uniform per stratum [j/n, (j+1)/n) of each prompt's block; marginals stay exact
            u = (torch.arange(self.n_eval, dtype=torch.float64).repeat(self.world.num_prompts) + u) / self.n_eval
        z = rng.normal(self.seed, f"{stream}/noise", 0, self.global_indices, (self.world.dim,), dtype=torch.float64)
        return u, z

    def tilted_samples(self, beta: float, stream: str) -> torch.Tensor:
        """Exact samples of the β-tilted teacher in the evaluator's layout, float64 ``[P·n_eval, C, H, W]``.
        Draws derive from ``(seed, stream)``; the same stream gives the same draws for every β."""
        u, z = self._draws(stream)
        return self.world.sample(self.prompt_idx, u, z, float(beta))

    def teacher_row(self) -> dict[str, float]:
        """An independent exact teacher draw (draw B) scored like a model: the noise floor of every metric."""
        return self.row(self.tilted_samples(0.0, "eval/teacher_b"))

    # ------------------------------------------------------------------ scoring
    def _by_prompt(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.world.num_prompts, self.n_eval, self.world.dim)

    def _flat(self, samples: torch.Tensor) -> torch.Tensor:
        n, shape = self.world.num_prompts * self.n_eval, tuple(samples.shape)
        ok = (samples.dim() == 2 and shape[1:] == (self.world.dim,)) or (
            samples.dim() == 4 and shape[1:] == tuple(self.world.latent_shape))
        if not ok or shape[0] != n:
            want = ", ".join(map(str, self.world.latent_shape))
            raise ValueError(f"expected samples [{n}, {self.world.dim}] or [{n}, {want}], got {list(shape)}")
        x = samples.detach().to("cpu", torch.float64).reshape(n, -1)
        if not torch.isfinite(x).all():  # a diverged generator must fail loudly, not score as garbage
            bad = int((~torch.isfinite(x)).any(-1).sum())
            raise ValueError(f"{bad} of {n} samples contain NaN/inf")
        return x

    def row(self, samples: torch.Tensor) -> dict[str, float]:
        """All :data:`ROW_KEYS` for ``samples [P·n_eval, C, H, W]`` (or ``[P·n_eval, D]``) in ``prompt_idx`` order."""
        w = self.world
        pn, k = w.num_prompts, w.num_components
        x = self._flat(samples)
        mean, cov = _mean_cov(self._by_prompt(x))  # [P, D], [P, D, D]
        fd_grid = torch.stack([frechet_distance_to(mean[p], cov[p], self._grid[p]) for p in range(pn)])  # [P, G]
        curve = fd_grid.mean(0)
        best = int(curve.argmin())
        beta_hat = float(self.beta_grid[best])
        fd_at_beta = frechet_distance_to(mean, cov, self._at_beta).mean()

        # Per-component statistics over samples assigned to their prompt's nearest (untilted) mean.
        comp = w.nearest_component(x, self.prompt_idx)
        group = self.prompt_idx * k + comp  # flat (prompt, component) id
        counts = torch.bincount(group, minlength=pn * k).double()
        valid = counts >= 2  # one sample says nothing about a spread
        safe = counts.clamp(min=1)
        reward = w.linear_reward(x, self.prompt_idx)
        resid2 = (x - w.tilted_means(beta_hat)[self.prompt_idx, comp]).square().mean(-1)
        s = w.stds.reshape(-1)
        std_ratio = (torch.zeros(pn * k, dtype=torch.float64).index_add_(0, group, resid2) / safe).sqrt() / s
        mean_r = torch.zeros(pn * k, dtype=torch.float64).index_add_(0, group, reward) / safe
        shift = (mean_r - self._proj_means.reshape(-1)) / s**2
        freq = (counts / self.n_eval).reshape(pn, k)
        tv = 0.5 * (freq - w.tilted_weights(beta_hat)).abs().sum(-1)
        nan = torch.tensor(math.nan, dtype=torch.float64)
        return {
            "reward_mean": float(reward.mean()),
            "fd_teacher": float(fd_grid[:, 0].mean()),  # grid[0] is β = 0: the teacher itself
            "fd_tilted": float(curve[best]),
            "beta_hat": beta_hat,
            "beta_shift": float(shift[valid].mean() if valid.any() else nan),
            "fd_tilted_at_beta": float(fd_at_beta),
            "mode_coverage": float((1 - tv).mean()),
            "std_ratio": float(std_ratio[valid].mean() if valid.any() else nan),
        }


# ---------------------------------------------------------------------------------------------- the table
def format_table(rows: dict[str, dict[str, float]], floor: str = "teacher") -> str:
    """Fixed-width text table, one line per row (name first), columns :data:`ROW_KEYS`. Distances of rows other
    than ``floor`` read ``value (+excess)`` over the floor row when it is present."""
    base = rows.get(floor)
    header = ["model", *ROW_KEYS]
    lines = [header]
    for name, r in rows.items():
        cells = [name]
        for key in ROW_KEYS:
            v = float(r.get(key, math.nan))
            cell = f"{v:.4g}" if abs(v) >= 1e4 else f"{v:.3f}"
            if key in DISTANCE_KEYS and base is not None and name != floor:
                cell += f" ({v - float(base[key]):+.3f})"
            cells.append(cell)
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for line in lines:
        out.append("  ".join(c.ljust(wd) if i == 0 else c.rjust(wd)
                             for i, (c, wd) in enumerate(zip(line, widths, strict=True))))
    return "\n".join(out)


def generate_samples(backbone, evaluator: ToyEvaluator, cfg, env: DistEnv | None = None) -> torch.Tensor:
    """A row's samples: ``backbone`` run for the config's few-step CPS schedule on the evaluator's prompts, with
    the evaluation noise of the RNG contract (stream ``eval``) — the same noise for every row, so rows differ
    only by their network. Under several processes (``env``) each rank samples its block (a collective)."""
    prompts = [evaluator.world.prompts()[int(p)] for p in evaluator.prompt_idx]
    was_training = backbone.training
    backbone.eval()
    try:
        return generate(backbone, prompts, sigmas=sd3_sigmas(cfg.schedule.denoising_steps, cfg.schedule.shift),
                        eta=cfg.schedule.eta, seed=cfg.seed, stream="eval", batch_size=cfg.eval.batch_size,
                        env=env)
    finally:
        backbone.train(was_training)
