"""Plain, readable PyTorch of every op, in the reference implementation's op order and precision.

This is the executable spec, the test oracle (call it on float64 inputs) and the "what people run
today" baseline of the benchmarks (call it on the trainer's dtypes). Nothing here is fused or fast.
Source of the semantics: the authors' code at Harahan/RTDMD@6c3cb03 as docs/method.md describes it, written anew.
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
    """docs/method.md §3 step by step: the no-grad part in ``x.dtype``, then the float64 surrogate MSE."""
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


def _eta_cos_sin(eta_v):
    """CPS coefficients (cos(eta*pi/2), sin(eta*pi/2)) of a float or a per-sample tensor."""
    if isinstance(eta_v, torch.Tensor):
        return torch.cos(eta_v * math.pi / 2), torch.sin(eta_v * math.pi / 2)
    return math.cos(eta_v * math.pi / 2), math.sin(eta_v * math.pi / 2)


def cps_transition(x, v, sigma, sigma_next, eta, noise):
    """One CPS step (docs/method.md §2.1) computed in at least float32: Euler where sigma_next = 0 or eta = 0."""
    work = torch.promote_types(x.dtype, torch.float32)
    x, v, noise = x.to(work), v.to(work), noise.to(work)
    sigma, sigma_next, eta_v = _per_sample(sigma, x), _per_sample(sigma_next, x), _per_sample(eta, x)
    c_eta, s_eta = _eta_cos_sin(eta_v)
    x0 = x - sigma * v
    eps_hat = x + (1 - sigma) * v
    mean = (1 - sigma_next) * x0 + sigma_next * c_eta * eps_hat
    stochastic = mean + sigma_next * s_eta * noise
    euler = x + (sigma_next - sigma) * v
    deterministic = (torch.as_tensor(sigma_next, device=x.device) == 0) | (torch.as_tensor(eta_v, device=x.device) == 0)
    return torch.where(deterministic, euler, stochastic)


def ac_dmd_loss(x_s, x_t, v_real, v_fake, noise, sigma_s, sigma_t, *, v_real_uncond=None,
                guidance_scale=1.0, eta=0.9, normalize="per_sample", eps=0.0, return_stats=False):
    """docs/method.md §4.3: teacher CFG in the inputs' dtype, both CPS transitions back to sigma_s with the
    shared noise (each cast to ``x_t.dtype``), then ``dmd_loss``."""
    with torch.no_grad():
        if v_real_uncond is not None:
            v_r = v_real_uncond + _per_sample(guidance_scale, v_real) * (v_real - v_real_uncond)
        else:
            v_r = v_real
        xs_real = cps_transition(x_t, v_r, sigma_t, sigma_s, eta, noise).to(x_t.dtype)
        xs_fake = cps_transition(x_t, v_fake, sigma_t, sigma_s, eta, noise).to(x_t.dtype)
    return dmd_loss(x_s, xs_fake, xs_real, normalize=normalize, eps=eps, return_stats=return_stats)


# ---------------------------------------------------------------------------------------------
# Sampler step with log-prob and the PPO clip loss (docs/method.md §2.1, §5.1, §5.4)


def cps_step_with_logprob(x, v, sigma, sigma_next, eta, noise=None, x_next=None, kind="cps", sigma_max=None):
    """``sde_step_with_logprob``: one step from ``(x, sigma)`` to ``sigma_next`` in at least float32.

    Returns ``(x_next, log_prob [B], mean, std)``. ``kind="cps"``: the CPS mean (docs/method.md §2.1), std =
    sigma_next*sin(eta*pi/2) and the surrogate ``-mean_d (x_next - mean)^2`` (docs/method.md §5.1). ``kind="sde"``:
    Flow-GRPO's mean, ``std = sqrt(sigma/(1-sigma'))*eta`` (sigma' = sigma_max where sigma >= 1) and
    the Gaussian log-density of ``x_next`` with ``sd = std*sqrt(-dt)``, averaged over elements.
    ``x_next`` given: scored (detached); else drawn with ``noise`` (standard normal when None).
    """
    work = torch.promote_types(x.dtype, torch.float32)
    x, v = x.to(work), v.to(work)
    s, sn, eta_v = _per_sample(sigma, x), _per_sample(sigma_next, x), _per_sample(eta, x)
    dims = tuple(range(1, x.dim()))
    if kind == "cps":
        c_eta, s_eta = _eta_cos_sin(eta_v)
        x0 = x - s * v
        eps_hat = x + (1 - s) * v
        mean = (1 - sn) * x0 + sn * c_eta * eps_hat
        std = sn * s_eta
        sd = std
    elif kind == "sde":
        if sigma_max is None:
            raise ValueError("sigma_max is required for kind='sde'")
        dt = sn - s
        s_max = _per_sample(sigma_max, x)
        if isinstance(s, torch.Tensor):  # only the denominator uses sigma_max where sigma >= 1
            s_den = torch.where(s >= 1, torch.as_tensor(s_max, dtype=s.dtype, device=s.device), s)
        else:
            s_den = s_max if s >= 1 else s
        std = (s / (1 - s_den)) ** 0.5 * eta_v
        mean = x * (1 + std**2 * dt / (2 * s)) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
        sd = std * (-dt) ** 0.5
    else:
        raise ValueError(f"kind must be 'cps' or 'sde', got {kind!r}")
    if x_next is None:
        if noise is None:
            noise = torch.randn(x.shape, dtype=torch.float32, device=x.device)
        x_next = mean + sd * noise.to(work)  # differentiable in x and v through the mean
    else:
        x_next = x_next.to(work)
    target = x_next.detach()  # the log-prob scores the stored sample: a constant
    if kind == "cps":
        log_prob = -((target - mean) ** 2).mean(dim=dims)
    else:
        lp = -((target - mean) ** 2) / (2 * sd**2) - torch.log(torch.as_tensor(sd, dtype=work, device=x.device)) \
            - math.log(math.sqrt(2 * math.pi))
        log_prob = lp.mean(dim=dims)
    return x_next, log_prob, mean, std


def ppo_clip_loss(x, v, x_next, old_logp, advantages, sigma, sigma_next, *, eta, kind="cps", clip_range=1e-5,
                  adv_clip=5.0, sigma_max=None, v_ref=None, kl_coef=0.0, return_stats=False):
    """docs/method.md §5.4 with plain torch ops and autograd (gradient in ``v`` only): log-prob of the stored
    ``x_next`` under the current ``v``, ratio, advantage clamp, clipped surrogate, optional KL."""
    x, x_next = x.detach(), x_next.detach()
    _, log_prob, mean, std = cps_step_with_logprob(x, v, sigma, sigma_next, eta, x_next=x_next, kind=kind,
                                                   sigma_max=sigma_max)
    old_logp, advantages = old_logp.detach(), advantages.detach()
    adv = torch.clamp(advantages, -adv_clip, adv_clip)
    ratio = torch.exp(log_prob - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.mean(torch.maximum(unclipped, clipped))
    if v_ref is not None and kl_coef > 0:
        with torch.no_grad():
            _, _, mean_ref, _ = cps_step_with_logprob(x, v_ref.detach(), sigma, sigma_next, eta, x_next=x_next,
                                                      kind=kind, sigma_max=sigma_max)
        std_b = torch.as_tensor(std, dtype=mean.dtype, device=mean.device).reshape(-1)
        std_b = std_b.expand(x.shape[0]) if std_b.numel() == 1 else std_b
        denom = torch.where(std_b == 0, torch.ones_like(std_b), 2 * std_b**2)
        kl = ((mean - mean_ref) ** 2).mean(dim=tuple(range(1, x.dim()))) / denom
        kl = torch.where(std_b == 0, torch.zeros_like(kl), kl)  # samples with std = 0 contribute 0
        loss = loss + kl_coef * torch.mean(kl)
    if return_stats:
        with torch.no_grad():
            stats = {
                "ratio_mean": ratio.mean(),
                "clip_fraction": ((ratio - 1.0).abs() > clip_range).to(ratio.dtype).mean(),
                "approx_kl": 0.5 * ((log_prob - old_logp) ** 2).mean(),
                "logp": log_prob.detach(),
            }
        return loss, stats
    return loss


# ---------------------------------------------------------------------------------------------
# AC-DMD fake-score side (docs/method.md §4.1-4.2): renoise, the fake-score target and loss, consistency


def _sub_interval(x, sigma_s, sigma_t):
    """``(sigma_s, sigma_t, a, sigma_ts)`` of ``flow_forward_v2`` broadcast against ``x`` (in x's dtype)."""
    ss, st = _per_sample(sigma_s, x), _per_sample(sigma_t, x)
    a = (1 - st) / (1 - ss)
    var = torch.as_tensor(st**2 - a**2 * ss**2, dtype=x.dtype, device=x.device)
    sigma_ts = torch.sqrt(torch.clamp(var, min=1e-12))
    return ss, st, a, sigma_ts


def renoise(x_s, noise, sigma_s, sigma_t):
    """``flow_forward_v2`` (method.md §4.1.3) in at least float32: ``a*x_s + sigma_ts*noise``, cast to x_s's dtype."""
    work = torch.promote_types(x_s.dtype, torch.float32)
    x, n = x_s.to(work), noise.to(work)
    _, _, a, sigma_ts = _sub_interval(x, sigma_s, sigma_t)
    return (a * x + sigma_ts * n).to(x_s.dtype)


def fake_score_target(x_s, noise, sigma_s, sigma_t, move_scale_out=True):
    """``flow_forward_target_v2`` (docs/method.md §4.1.4) in at least float32: returns ``(target, scale)``.

    ``move_scale_out=True`` (shipped): ``target = -(sigma_ts/(1-sigma_s))*x_s + beta*noise``,
    ``scale = sigma_ts``; False: ``target = -x_s/(1-sigma_s) + (beta/sigma_ts)*noise``, ``scale = 1``.
    """
    work = torch.promote_types(x_s.dtype, torch.float32)
    x, n = x_s.to(work), noise.to(work)
    ss, st, _, sigma_ts = _sub_interval(x, sigma_s, sigma_t)
    beta = st + (1 - st) * ss**2 / (1 - ss) ** 2
    if move_scale_out:
        return -(sigma_ts / (1 - ss)) * x + beta * n, sigma_ts
    return -x / (1 - ss) + (beta / sigma_ts) * n, torch.ones_like(sigma_ts)


def fake_score_loss(v_hat, x_s, noise, sigma_s, sigma_t, *, weight_max=10.0, move_scale_out=True):
    """docs/method.md §4.2: ``loss_raw = (v_hat*scale - target)^2``, ``w = nan_to_num(clamp(1/max(scale^2, 1e-12),
    0, weight_max), nan->0, +inf->weight_max, -inf->0)``, ``mean(w*loss_raw)``; gradient in v_hat only."""
    work = torch.promote_types(torch.promote_types(v_hat.dtype, x_s.dtype), torch.float32)
    target, scale = fake_score_target(x_s.detach().to(work), noise.detach().to(work), sigma_s, sigma_t,
                                      move_scale_out)
    loss_raw = (v_hat.to(work) * scale - target) ** 2
    w = torch.clamp(1.0 / torch.clamp(scale**2, min=1e-12), 0.0, weight_max)
    w = torch.nan_to_num(w, nan=0.0, posinf=weight_max, neginf=0.0)
    return torch.mean(w * loss_raw)


def consistency_loss(x_t, v_hat, sigma_t, x1, v1, x2, v2, sigma_p):
    """docs/method.md §4.2 consistency: ``h = x - sigma*v`` (fp32 at least), ``nan_to_num(mean((h1-h0)*(h2-h0)))``;
    gradients in v_hat, v1, v2 (x_t, x1, x2 are constants)."""
    work = torch.promote_types(torch.promote_types(x_t.dtype, v_hat.dtype), torch.float32)
    for t in (x1, v1, x2, v2):
        work = torch.promote_types(work, t.dtype)
    xt = x_t.detach().to(work)
    st, sp = _per_sample(sigma_t, xt), _per_sample(sigma_p, xt)
    h0 = xt - st * v_hat.to(work)
    h1 = x1.detach().to(work) - sp * v1.to(work)
    h2 = x2.detach().to(work) - sp * v2.to(work)
    return torch.nan_to_num(torch.mean((h1 - h0) * (h2 - h0)))


# ---------------------------------------------------------------------------------------------
# GRPO advantages (docs/method.md §5.3, docs/kernels.md §4.1): what flow_grpo / RTDMD, TRL and DanceGRPO run today.
# numpy on the host (flow_grpo / RTDMD) or eager torch (TRL, DanceGRPO), loops over prompts and all.


def _np():
    import numpy  # local: rtdmd_kernels imports torch only; the references may use numpy

    return numpy


class PerPromptStatTracker:
    """The reference trainer's per-prompt tracker (flow_grpo ``stat_tracking.py``, RTDMD ``grpo_utils``).

    ``update(prompts, rewards)`` appends the rewards to each prompt's history, then returns
    ``(r - mean_history(prompt)) / (std + 1e-4)`` with ``std = np.std`` (ddof=0) of the prompt's
    history, or of ALL the rewards passed in this call when ``global_std``. ``rewards`` is ``[N]`` or
    ``[N, T]`` (tiled over timesteps: the mean is per column, the std over every element, as numpy
    does). Returns float64 numpy. ``clear()`` drops the history (RTDMD clears every epoch).
    """

    def __init__(self, global_std: bool = False):
        self.global_std = global_std
        self.stats: dict = {}

    def update(self, prompts, rewards):
        np = _np()
        prompts = np.asarray(prompts)
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.zeros_like(rewards)
        unique = np.unique(prompts)
        for prompt in unique:
            self.stats.setdefault(prompt, []).extend(rewards[prompts == prompt])
        for prompt in unique:
            history = np.stack(self.stats[prompt])
            mean = np.mean(history, axis=0, keepdims=True)
            std = (np.std(rewards) if self.global_std else np.std(history)) + 1e-4
            advantages[prompts == prompt] = (rewards[prompts == prompt] - mean) / std
        return advantages

    def clear(self):
        self.stats = {}


def rtdmd_weighted_advantages(rewards, prompts, weights):
    """RTDMD's ``weight_advantages`` mode (docs/method.md §5.3): for each reward k a FRESH tracker with the
    global std gives ``A_k``; then ``A = Σ_k w_k A_k`` and ``A = (A - mean A) / (std A + 1e-4)``.

    ``rewards``: a dict ``name -> [N]`` (then ``weights`` is a dict with the same names) or an
    ``[N, R]`` matrix (then ``weights`` is a sequence of R numbers). Returns float64 numpy ``[N]``.
    """
    np = _np()
    if isinstance(rewards, dict):
        columns = [np.asarray(rewards[name], dtype=np.float64) for name in rewards]
        w = [weights[name] for name in rewards]
    else:
        matrix = np.asarray(rewards, dtype=np.float64)
        columns = [matrix[:, k] for k in range(matrix.shape[1])]
        w = list(weights)
    total = np.zeros_like(columns[0])
    for w_k, r_k in zip(w, columns, strict=True):
        total = total + w_k * PerPromptStatTracker(global_std=True).update(prompts, r_k)
    return (total - np.mean(total)) / (np.std(total) + 1e-4)


def trl_advantages(rewards, group_ids, scale_rewards: str = "group"):
    """TRL ``GRPOTrainer`` advantages for one reward column (eager torch, float64 in, float64 out).

    NaN-aware baseline ``nanmean`` per group; ``scale_rewards``: ``"group"`` divides by the group's
    Bessel-corrected ``nanstd`` + 1e-4, ``"batch"`` by the ``nanstd`` of all rewards + 1e-4, ``"none"``
    not at all (Dr. GRPO). NaN (unscorable) rewards end at 0. Groups are given by ids (TRL's
    contiguous ``num_generations`` blocks are the special case ``ids = arange(N) // G``). As in TRL, a
    group with a single valid reward gives NaN under ``"group"`` (0/0 in the Bessel correction).
    """
    r = torch.as_tensor(rewards, dtype=torch.float64)
    ids = torch.as_tensor(group_ids)

    def nanstd(t):
        valid = ~torch.isnan(t)
        var = torch.nanmean((t - torch.nanmean(t)) ** 2)
        count = valid.sum()
        return torch.sqrt(var * count / (count - 1))

    mean = torch.empty_like(r)
    std = torch.empty_like(r)
    for g in torch.unique(ids):
        members = ids == g
        mean[members] = torch.nanmean(r[members])
        std[members] = nanstd(r[members])
    advantages = r - mean
    if scale_rewards == "group":
        advantages = advantages / (std + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / (nanstd(r) + 1e-4)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale_rewards!r}")
    return torch.where(torch.isnan(r), torch.zeros_like(advantages), advantages)


def dancegrpo_advantages(rewards, num_generations: int):
    """DanceGRPO: a loop over contiguous groups of ``num_generations``, ``(r - mean) / (torch.std + 1e-8)``
    (Bessel-corrected). ``rewards`` ``[N]`` with N a multiple of ``num_generations``."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    advantages = torch.zeros_like(r)
    for start in range(0, r.shape[0], num_generations):
        group = r[start:start + num_generations]
        advantages[start:start + num_generations] = (group - group.mean()) / (group.std() + 1e-8)
    return advantages
