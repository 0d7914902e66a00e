"""CPS sampler step, policy log-prob and the fused PPO clip loss (docs/method.md §2.1, §5.1, §5.4; docs/kernels.md §3).

Both the CPS mean and Flow-GRPO's "sde" mean are affine in (x, v) with per-sample coefficients,
``mean = a*x + k*v``; every kernel here takes (a, k, ...) per sample (Python floats, or a packed
``[B, 4]`` table with PER_SAMPLE) and never forms x0, eps_hat or the mean twice.

What moves per element (fp32 inputs; bf16/fp16 halve those bytes):
  cps_step       fwd reads x, v, noise                -> writes x_next, mean            12 R + 8 W
                 bwd reads grad x_next, grad mean     -> writes dx, dv                   8 R + 8 W
  cps_logprob    fwd reads x, v, x_next               -> per-chunk sums of (x_next-mean)^2   12 R
                 bwd reads x, v, x_next (recomputes)  -> writes dv                      12 R + 4 W
  ppo_clip_loss  pass 1 reads x, v, x_next, [v_ref]   -> residual x_next - mean (fp32), [k*(v - v_ref)],
                                                         per-chunk sums of squares    12-16 R + 4-8 W
                 finalize: one program over B         -> logp, ratio, loss, stats, per-sample coefficients
                 bwd reads the residual(s)            -> dv = go*(c1_b*res + c2_b*res2)  4-8 R + 4 W
Why fused this way: the PPO loss needs a full per-sample reduction before any gradient can be
formed, and the gradient in v is a per-sample coefficient times the residual (docs/method.md §5.4), so pass 1
writes the residual and the tiny finalize turns the partial sums into every scalar at once; backward
is one multiply. Partial sums are per (sample, chunk), reduced in a fixed order: deterministic, and
cps_logprob and ppo_clip_loss share pass 1 and the finalize, so a log-prob recomputed from the same
inputs gives a ratio of exactly 1.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _common as C
from ._backend import backend_for, triton_available
from ._shared import affine_grad, cps_coefficients

__all__ = ["cps_step", "cps_logprob", "ppo_clip_loss"]

KINDS = ("cps", "sde")
_KIND_CODE = {"cps": 0, "sde": 1}
LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))

BLOCK = 1024  # elements per inner iteration of a program
EW_BLOCK = 2048  # elements per program of the elementwise kernels
NUM_WARPS = 4
MAX_CHUNKS = 128  # chunks per sample of the reduction pass
FINAL_BLOCK_B = 32  # samples per iteration of the finalize program
NCOL = 4  # per-sample table columns: the StepCoefficients fields


class StepCoefficients(NamedTuple):
    """Per-sample coefficients of a sampler step, the columns of its ``[B, 4]`` table in this order:
    ``mean = a*x + k*v``; ``noise_scale`` the step's noise scale (cps: sigma_next*sin(eta*pi/2); sde: the
    Gaussian's sd = std*sqrt(-dt)); ``kl_std`` the std the KL term divides by."""

    a: C.Scalar
    k: C.Scalar
    noise_scale: C.Scalar
    kl_std: C.Scalar


class PPOParams(NamedTuple):
    """The PPO loss' scalars, the first entries of the finalize kernel's parameter vector."""

    clip_lo: float
    clip_hi: float
    clip_range: float
    adv_clip: float
    kl_coef: float


_PolicyOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

if triton_available():
    import triton
    import triton.language as tl

    from ._triton_utils import chunk_offsets, chunk_program, per_sample_value, sample_block, stream_f32, to_element

    @triton.jit
    def _cps_step_kernel(
        x_ptr, v_ptr, noise_ptr, xn_ptr, mean_ptr, sched_ptr, a, k, c, D,
        PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # mean = a*x + k*v, x_next = mean + c*noise; grid (blocks of a sample, sample).
        b, offs, mask = sample_block(D, BLOCK)
        a = per_sample_value(sched_ptr, b, 0, 4, a, PER_SAMPLE)
        k = per_sample_value(sched_ptr, b, 1, 4, k, PER_SAMPLE)
        c = per_sample_value(sched_ptr, b, 2, 4, c, PER_SAMPLE)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        nz = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = a * x + k * v
        tl.store(mean_ptr + offs, to_element(mean, mean_ptr), mask=mask)
        tl.store(xn_ptr + offs, to_element(mean + c * nz, xn_ptr), mask=mask)

    @triton.jit
    def _logprob_partials_kernel(
        x_ptr, v_ptr, xn_ptr, vref_ptr, res_ptr, res2_ptr, part_ptr, part2_ptr, sched_ptr, a, k,
        D, CHUNK, S,
        HAS_REF: tl.constexpr, STORE_RES: tl.constexpr, PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # Pass 1: res = x_next - (a*x + k*v); part[b, s] = sum of res^2 over chunk s of sample b.
        # With a reference velocity also res2 = mean - mean_ref = k*(v - v_ref) and its sum of squares.
        pid, b, base, start = chunk_program(S, D, CHUNK)
        a = per_sample_value(sched_ptr, b, 0, 4, a, PER_SAMPLE)
        k = per_sample_value(sched_ptr, b, 1, 4, k, PER_SAMPLE)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, CHUNK, BLOCK):
            offs, mask = chunk_offsets(base, start, i, D, BLOCK)
            x = stream_f32(x_ptr, offs, mask)
            v = stream_f32(v_ptr, offs, mask)
            xn = stream_f32(xn_ptr, offs, mask)
            res = xn - (a * x + k * v)
            acc += res * res
            if STORE_RES:
                tl.store(res_ptr + offs, res, mask=mask)
            if HAS_REF:
                vr = stream_f32(vref_ptr, offs, mask)
                r2 = k * (v - vr)
                acc2 += r2 * r2
                if STORE_RES:
                    tl.store(res2_ptr + offs, r2, mask=mask)
        tl.store(part_ptr + pid, tl.sum(acc, axis=0))
        if HAS_REF:
            tl.store(part2_ptr + pid, tl.sum(acc2, axis=0))

    @triton.jit
    def _policy_finalize_kernel(
        part_ptr, part2_ptr, old_ptr, adv_ptr, sched_ptr, params_ptr, logp_ptr, c1_ptr, c2_ptr, loss_ptr, stats_ptr,
        B, S, D,
        KIND: tl.constexpr, PPO: tl.constexpr, HAS_REF: tl.constexpr, PER_SAMPLE: tl.constexpr,
        BLOCK_B: tl.constexpr, S_BLOCK: tl.constexpr,
    ):
        # One program, samples in a fixed order: logp_b from the partials; with PPO the ratio, the
        # clipped surrogate, the KL term, the statistics and the per-sample gradient coefficients
        # c1_b (of the residual) and c2_b (of k*(v - v_ref)); without PPO c1_b = dlogp_b/dres-scale.
        # params: the PPOParams fields, then the scalar k, sd, kl_std (read when not PER_SAMPLE).
        clip_lo = tl.load(params_ptr)
        clip_hi = tl.load(params_ptr + 1)
        clip_range = tl.load(params_ptr + 2)
        adv_clip = tl.load(params_ptr + 3)
        kl_coef = tl.load(params_ptr + 4)
        Df = D.to(tl.float32)
        Bf = B.to(tl.float32)
        cols = tl.arange(0, S_BLOCK)
        loss_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
        kl_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
        ratio_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
        clip_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
        akl_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
        for i in range(0, B, BLOCK_B):
            idx = i + tl.arange(0, BLOCK_B)
            m = idx < B
            tile_off = idx[:, None] * S + cols[None, :]
            tile_mask = m[:, None] & (cols[None, :] < S)
            sq = tl.sum(tl.load(part_ptr + tile_off, mask=tile_mask, other=0.0), axis=1)
            if PER_SAMPLE:
                kb = tl.load(sched_ptr + idx * 4 + 1, mask=m, other=0.0).to(tl.float32)
                sdb = tl.load(sched_ptr + idx * 4 + 2, mask=m, other=1.0).to(tl.float32)
                klb = tl.load(sched_ptr + idx * 4 + 3, mask=m, other=0.0).to(tl.float32)
            else:
                kb = tl.load(params_ptr + 5)
                sdb = tl.load(params_ptr + 6)
                klb = tl.load(params_ptr + 7)
            if KIND == 0:
                logp = -(sq / Df)
                coef = 2.0 * kb / Df
            else:
                logp = -((sq / (2.0 * sdb * sdb)) / Df) - tl.log(sdb) - 0.9189385332046727  # log(sqrt(2*pi))
                coef = kb / (sdb * sdb * Df)
            tl.store(logp_ptr + idx, logp, mask=m)
            if PPO:
                old = tl.load(old_ptr + idx, mask=m, other=0.0).to(tl.float32)
                adv = tl.load(adv_ptr + idx, mask=m, other=0.0).to(tl.float32)
                adv = tl.minimum(tl.maximum(adv, -adv_clip), adv_clip)
                ratio = tl.exp(logp - old)
                unclipped = -adv * ratio
                clipped = -adv * tl.minimum(tl.maximum(ratio, clip_lo), clip_hi)
                # torch.maximum: gradient to the larger, split 1/2 + 1/2 on ties; clamp passes it on [lo, hi].
                w_u = tl.where(unclipped > clipped, 1.0, tl.where(unclipped == clipped, 0.5, 0.0))
                inside = tl.where((ratio >= clip_lo) & (ratio <= clip_hi), 1.0, 0.0)
                dlogp = unclipped * (w_u + (1.0 - w_u) * inside) / Bf
                tl.store(c1_ptr + idx, dlogp * coef, mask=m)
                loss_acc += tl.where(m, tl.maximum(unclipped, clipped), 0.0)
                ratio_acc += tl.where(m, ratio, 0.0)
                clip_acc += tl.where(m & (tl.abs(ratio - 1.0) > clip_range), 1.0, 0.0)
                akl_acc += tl.where(m, 0.5 * (logp - old) * (logp - old), 0.0)
                if HAS_REF:
                    sq2 = tl.sum(tl.load(part2_ptr + tile_off, mask=tile_mask, other=0.0), axis=1)
                    nz = klb != 0.0
                    var = tl.where(nz, klb * klb, 1.0)
                    kl_acc += tl.where(m, tl.where(nz, (sq2 / Df) / (2.0 * var), 0.0), 0.0)
                    tl.store(c2_ptr + idx, tl.where(nz, kl_coef * kb / (Bf * Df * var), 0.0), mask=m)
            else:
                tl.store(c1_ptr + idx, coef, mask=m)
        if PPO:
            loss = tl.sum(loss_acc, axis=0) / Bf
            if HAS_REF:
                loss = loss + kl_coef * (tl.sum(kl_acc, axis=0) / Bf)
            tl.store(loss_ptr, loss)
            tl.store(stats_ptr, tl.sum(ratio_acc, axis=0) / Bf)
            tl.store(stats_ptr + 1, tl.sum(clip_acc, axis=0) / Bf)
            tl.store(stats_ptr + 2, tl.sum(akl_acc, axis=0) / Bf)

    @triton.jit
    def _policy_grad_kernel(
        res_ptr, res2_ptr, x_ptr, v_ptr, xn_ptr, dv_ptr, c1_ptr, c2_ptr, go_ptr, sched_ptr, a, k, D, GO_STRIDE,
        RECOMPUTE: tl.constexpr, HAS_REF: tl.constexpr, PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # dv = go_b * (c1_b * res + c2_b * res2); res is read (PPO) or recomputed from x, v, x_next.
        b, offs, mask = sample_block(D, BLOCK)
        go = tl.load(go_ptr + b * GO_STRIDE).to(tl.float32)
        if RECOMPUTE:
            a = per_sample_value(sched_ptr, b, 0, 4, a, PER_SAMPLE)
            k = per_sample_value(sched_ptr, b, 1, 4, k, PER_SAMPLE)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            xn = tl.load(xn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            res = xn - (a * x + k * v)
        else:
            res = tl.load(res_ptr + offs, mask=mask, other=0.0)
        dv = (go * tl.load(c1_ptr + b)) * res
        if HAS_REF:
            dv += (go * tl.load(c2_ptr + b)) * tl.load(res2_ptr + offs, mask=mask, other=0.0)
        tl.store(dv_ptr + offs, to_element(dv, dv_ptr), mask=mask)


def _use_torch(t: torch.Tensor, cd: torch.dtype) -> bool:
    return t.numel() == 0 or cd == torch.float64 or backend_for(t) == "torch"


def _vector_columns(sched: torch.Tensor | None, vals: list[float], cd: torch.dtype) -> list:
    """The table's columns as ``[B]`` tensors in ``cd`` (the finalize's per-sample scalars), or the floats."""
    return list(vals) if sched is None else list(C.cast(sched, cd).t().unbind(0))


# ---------------------------------------------------------------------------------------------
# cps_step: launcher, custom op, autograd (backward: _shared.affine_grad)


def _cps_step_fwd(
    x: torch.Tensor, v: torch.Tensor, noise: torch.Tensor, sched: torch.Tensor | None, vals: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_next, mean) in x's dtype; ``sched``/``vals``: StepCoefficients."""
    shape = x.shape
    cd = C.compute_dtype(x, v, noise)
    x2, v2, n2 = C.flat(x), C.flat(v), C.flat(noise)
    B, D = x2.shape
    if _use_torch(x, cd):
        a, k, c = C.table_columns(sched, vals, cd)[:3]
        mean = C.cast(x2, cd) * a
        C.add_scaled_(mean, v2, k)
        xn = C.add_scaled(mean, n2, c)
        return xn.to(x.dtype).view(shape), mean.to(x.dtype).view(shape)
    xn = torch.empty((B, D), dtype=x.dtype, device=x.device)
    mean = torch.empty_like(xn)
    grid = (triton.cdiv(D, EW_BLOCK), B)
    _cps_step_kernel[grid](x2, v2, n2, xn, mean, sched if sched is not None else xn, *vals[:3], D,
                           PER_SAMPLE=sched is not None, BLOCK=EW_BLOCK, num_warps=NUM_WARPS)
    return xn.view(shape), mean.view(shape)


_cps_step_fwd_op = C.KernelOp("cps_step_fwd", _cps_step_fwd, lambda x, v, noise, sched, vals: (
    torch.empty_like(x, memory_format=torch.contiguous_format),
    torch.empty_like(x, memory_format=torch.contiguous_format)))


class _CPSStep(torch.autograd.Function):
    """x_next and mean share their Jacobians (a in x, k in v): backward is one affine map of their sum."""

    @staticmethod
    def forward(ctx, x, v, noise, sched, vals):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(sched)
        ctx.vals, ctx.v_dtype = vals, v.dtype
        return _cps_step_fwd_op(x, v, noise, sched, vals)

    @staticmethod
    def backward(ctx, g_xn, g_mean):
        (sched,) = ctx.saved_tensors
        need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if g_xn is None and g_mean is None:
            return None, None, None, None, None
        dx, dv = affine_grad(g_xn, g_mean, sched, ctx.vals, need_x, need_v, ctx.v_dtype)
        return (dx if need_x else None), (dv if need_v else None), None, None, None


# ---------------------------------------------------------------------------------------------
# cps_logprob and ppo_clip_loss: one forward launcher (pass 1 + finalize), one backward launcher


def _residual(x2, v2, xn2, a, k, cd):
    """x_next - (a*x + k*v) in ``cd``, two passes: xn + (-a)*x into a new tensor, then += (-k)*v."""
    xn = C.cast(xn2, cd)
    res = torch.addcmul(xn, x2, a.neg()) if isinstance(a, torch.Tensor) else torch.add(xn, x2, alpha=-a)
    return C.add_scaled_(res, v2, k.neg() if isinstance(k, torch.Tensor) else -k)


def _row_sumsq(t: torch.Tensor) -> torch.Tensor:
    """Per-row sum of squares of a [B, D] tensor in one pass (a batched dot/bmm is ~15x slower on CPU)."""
    return torch.linalg.vector_norm(t, dim=1).square()


def _per_row(value, like: torch.Tensor) -> torch.Tensor:
    """A float or [B] tensor as a [B] tensor like ``like`` (a fill, never a host-to-device copy)."""
    if isinstance(value, torch.Tensor):
        return value.to(like.dtype).expand(like.shape[0])
    return torch.full(like.shape, value, dtype=like.dtype, device=like.device)


def _finalize_torch(sq, sq2, D, kind, k, sd, kl_std, ppo, old, adv, clip_range, adv_clip, kl_coef):
    """The finalize step as [B] torch ops (k, sd, kl_std: floats or [B] tensors in sq's dtype)."""
    B = sq.shape[0]
    Df, Bf = float(max(D, 1)), float(max(B, 1))
    if kind == "cps":
        logp = -(sq / Df)
        coef = 2.0 * k / Df
    else:
        sd_t = _per_row(sd, sq)
        logp = -((sq / (2.0 * sd_t * sd_t)) / Df) - torch.log(sd_t) - LOG_SQRT_2PI
        coef = k / (sd_t * sd_t * Df)
    coef = _per_row(coef, sq)
    zero = sq.new_zeros(())
    if not ppo:
        return zero, logp, sq.new_zeros(3), coef.contiguous(), sq.new_empty(0)
    old, adv = old.to(sq.dtype), adv.to(sq.dtype).clamp(-adv_clip, adv_clip)
    lo, hi = 1.0 - clip_range, 1.0 + clip_range
    ratio = torch.exp(logp - old)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(lo, hi)
    w_u = torch.where(unclipped > clipped, 1.0, torch.where(unclipped == clipped, 0.5, 0.0)).to(sq.dtype)
    inside = ((ratio >= lo) & (ratio <= hi)).to(sq.dtype)
    c1 = unclipped * (w_u + (1.0 - w_u) * inside) / Bf * coef
    loss = torch.maximum(unclipped, clipped).sum() / Bf
    c2 = sq.new_empty(0)
    if sq2 is not None:
        kl_std = _per_row(kl_std, sq)
        nz = kl_std != 0
        var = torch.where(nz, kl_std * kl_std, 1.0)
        kl = torch.where(nz, (sq2 / Df) / (2.0 * var), 0.0)
        loss = loss + kl_coef * (kl.sum() / Bf)
        c2 = torch.where(nz, kl_coef * k / (Bf * Df * var), 0.0).expand(B).contiguous()
    stats = torch.stack([ratio.sum() / Bf, (((ratio - 1.0).abs() > clip_range).to(sq.dtype)).sum() / Bf,
                         (0.5 * (logp - old) ** 2).sum() / Bf])
    return loss, logp, stats, c1, c2


def _policy_fwd(
    x: torch.Tensor, v: torch.Tensor, x_next: torch.Tensor, v_ref: torch.Tensor | None,
    old_logp: torch.Tensor | None, advantages: torch.Tensor | None, sched: torch.Tensor | None, vals: list[float],
    kind: str, ppo: bool, store: bool, clip_range: float, adv_clip: float, kl_coef: float,
) -> _PolicyOut:
    """(loss, logp [B], stats [3], res, res2, c1 [B], c2 [B]); res/res2 are stored only with ppo and store."""
    cd = C.compute_dtype(x, v, x_next, v_ref)
    x2, v2, xn2 = C.flat(x), C.flat(v), C.flat(x_next)
    B, D = x2.shape
    has_ref = v_ref is not None
    empty = x2.new_empty(0, dtype=cd)
    keep = ppo and store
    if _use_torch(x, cd):
        a, k = C.table_columns(sched, vals, cd)[:2]
        res = _residual(x2, v2, xn2, a, k, cd)
        sq = _row_sumsq(res)
        sq2 = res2 = None
        if has_ref:
            res2 = torch.sub(C.cast(v2, cd), C.cast(v_ref.reshape(B, D), cd)).mul_(k)  # mean - mean_ref
            sq2 = _row_sumsq(res2)
        k1, sd1, kl1 = _vector_columns(sched, vals, cd)[1:]
        loss, logp, stats, c1, c2 = _finalize_torch(sq, sq2, D, kind, k1, sd1, kl1, ppo, old_logp, advantages,
                                                    clip_range, adv_clip, kl_coef)
        return (loss, logp, stats, res if keep else empty, res2 if (keep and has_ref) else empty.clone(), c1, c2)
    vr2 = C.flat(v_ref) if has_ref else v2
    dev = x.device
    chunk, S = C.chunking(D, BLOCK, MAX_CHUNKS)
    part = torch.empty(B * S, device=dev, dtype=torch.float32)
    part2 = torch.empty(B * S, device=dev, dtype=torch.float32) if has_ref else part
    res = torch.empty((B, D), device=dev, dtype=torch.float32) if keep else empty
    res2 = torch.empty((B, D), device=dev, dtype=torch.float32) if (keep and has_ref) else empty.clone()
    sched_ptr = sched if sched is not None else part
    per_sample = sched is not None
    _logprob_partials_kernel[(B * S,)](
        x2, v2, xn2, vr2, res if keep else part, res2 if (keep and has_ref) else part, part, part2, sched_ptr,
        vals[0], vals[1], D, chunk, S,
        HAS_REF=has_ref, STORE_RES=keep, PER_SAMPLE=per_sample, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    logp = torch.empty(B, device=dev, dtype=torch.float32)
    c1 = torch.empty(B, device=dev, dtype=torch.float32)
    c2 = torch.empty(B, device=dev, dtype=torch.float32) if (ppo and has_ref) else x2.new_empty(0, dtype=cd)
    alloc = torch.empty if ppo else torch.zeros  # cps_logprob: loss and stats are unused zeros
    loss, stats = alloc((), device=dev, dtype=torch.float32), alloc(3, device=dev, dtype=torch.float32)
    params = PPOParams(1.0 - clip_range, 1.0 + clip_range, clip_range, adv_clip, kl_coef)
    params = C.to_device(torch.tensor([*params, *vals[1:]], dtype=torch.float32), dev)
    _policy_finalize_kernel[(1,)](
        part, part2, old_logp if ppo else part, advantages if ppo else part, sched_ptr, params, logp, c1,
        c2 if c2.numel() else c1, loss, stats, B, S, D,
        KIND=_KIND_CODE[kind], PPO=ppo, HAS_REF=has_ref, PER_SAMPLE=per_sample,
        BLOCK_B=FINAL_BLOCK_B, S_BLOCK=triton.next_power_of_2(S), num_warps=NUM_WARPS,
    )
    return loss, logp, stats, res, res2, c1, c2


def _policy_bwd(
    res: torch.Tensor, res2: torch.Tensor, x: torch.Tensor | None, v: torch.Tensor | None,
    x_next: torch.Tensor | None, c1: torch.Tensor, c2: torch.Tensor, go: torch.Tensor,
    sched: torch.Tensor | None, vals: list[float], recompute: bool, shape: list[int], v_dtype: torch.dtype,
    donate: bool,
) -> torch.Tensor:
    """dv = go_b * (c1_b * res + c2_b * res2) in ``v_dtype``; res recomputed from x, v, x_next if asked.
    ``donate``: res is read for the last time, so dv may be written over it where the dtypes agree."""
    B = shape[0]
    like = x if recompute else res
    if math.prod(shape) == 0:
        return torch.zeros(shape, dtype=v_dtype, device=c1.device)
    has_ref = res2.numel() > 0
    over_res = donate and not recompute and v_dtype == res.dtype
    cd = C.compute_dtype(like, v if recompute else None, c1)
    if _use_torch(like, cd):
        scale1 = (C.cast(go, cd) * C.cast(c1, cd)).reshape(-1, 1).expand(B, 1)
        if recompute:
            a, k = C.table_columns(sched, vals, cd)[:2]
            x2, v2, xn2 = C.flat(x), C.flat(v), C.flat(x_next)
            dv = _residual(x2, v2, xn2, a, k, cd).mul_(scale1)
        else:
            dv = torch.mul(res, scale1, out=res if over_res else None)
            if has_ref:
                dv.addcmul_(res2, (C.cast(go, cd) * C.cast(c2, cd)).reshape(-1, 1).expand(B, 1))
        return dv.to(v_dtype).view(shape)
    D = math.prod(shape[1:])
    dv = res if over_res else torch.empty((B, D), dtype=v_dtype, device=c1.device)  # each program reads, then writes
    go32 = go.reshape(-1).to(torch.float32).contiguous()
    if recompute:
        x2, v2, xn2 = C.flat(x), C.flat(v), C.flat(x_next)
        r1 = r2 = x2
    else:
        x2 = v2 = xn2 = r1 = res
        r2 = res2 if has_ref else res
    grid = (triton.cdiv(D, EW_BLOCK), B)
    _policy_grad_kernel[grid](
        r1, r2, x2, v2, xn2, dv, c1, c2 if has_ref else c1, go32, sched if sched is not None else c1,
        vals[0], vals[1], D, 1 if go32.numel() > 1 else 0,
        RECOMPUTE=recompute, HAS_REF=has_ref, PER_SAMPLE=sched is not None, BLOCK=EW_BLOCK, num_warps=NUM_WARPS,
    )
    return dv.view(shape)


def _policy_fwd_fake(x, v, x_next, v_ref, old_logp, advantages, sched, vals, kind, ppo, store, clip_range, adv_clip,
                     kl_coef):
    cd = C.compute_dtype(x, v, x_next, v_ref)
    B, D = x.shape[0], math.prod(x.shape[1:])
    keep = ppo and store
    res = x.new_empty((B, D), dtype=cd) if keep else x.new_empty(0, dtype=cd)
    res2 = x.new_empty((B, D), dtype=cd) if (keep and v_ref is not None) else x.new_empty(0, dtype=cd)
    c2 = x.new_empty(B, dtype=cd) if (ppo and v_ref is not None) else x.new_empty(0, dtype=cd)
    return (x.new_empty((), dtype=cd), x.new_empty(B, dtype=cd), x.new_empty(3, dtype=cd), res, res2,
            x.new_empty(B, dtype=cd), c2)


_policy_fwd_op = C.KernelOp("policy_fwd", _policy_fwd, _policy_fwd_fake)
_policy_bwd_op = C.KernelOp(
    "policy_bwd", _policy_bwd,
    lambda res, res2, x, v, x_next, c1, c2, go, sched, vals, recompute, shape, v_dtype, donate:
    c1.new_empty(shape, dtype=v_dtype))


class _LogProb(torch.autograd.Function):
    """cps_logprob: output logp [B]; the backward recomputes the residual from x, v, x_next (nothing kept)."""

    @staticmethod
    def forward(ctx, x, v, x_next, sched, vals, kind):
        _loss, logp, _stats, res, res2, c1, c2 = _policy_fwd_op(
            x, v, x_next, None, None, None, sched, vals, kind, False, False, 0.0, 1.0, 0.0)
        ctx.save_for_backward(res, res2, c1, c2, sched, x, v.detach(), x_next)
        ctx.vals, ctx.shape, ctx.v_dtype = vals, list(v.shape), v.dtype
        return logp

    @staticmethod
    def backward(ctx, g_logp):
        res, res2, c1, c2, sched, x, v, x_next = ctx.saved_tensors
        dv = _policy_bwd_op(res, res2, x, v, x_next, c1, c2, g_logp, sched, ctx.vals, True, ctx.shape, ctx.v_dtype,
                            False)
        return None, dv, None, None, None, None


class _PPOClipLoss(torch.autograd.Function):
    """ppo_clip_loss: outputs (loss, logp, stats); the backward scales the residual(s) written in the forward."""

    @staticmethod
    def forward(ctx, x, v, x_next, v_ref, old_logp, advantages, sched, vals, kind, store, clip_range, adv_clip,
                kl_coef):
        loss, logp, stats, res, res2, c1, c2 = _policy_fwd_op(
            x, v, x_next, v_ref, old_logp, advantages, sched, vals, kind, True, store, clip_range, adv_clip, kl_coef)
        ctx.mark_non_differentiable(logp, stats)
        ctx.save_for_backward(res, res2, c1, c2, sched)
        ctx.vals, ctx.shape, ctx.v_dtype = vals, list(v.shape), v.dtype
        return loss, logp, stats

    @staticmethod
    def backward(ctx, g_loss, _g_logp, _g_stats):
        res, res2, c1, c2, sched = ctx.saved_tensors
        if res.numel() != math.prod(ctx.shape):
            raise RuntimeError("rtdmd_kernels: the loss was computed with v.requires_grad=False or under no_grad")
        dv = _policy_bwd_op(res, res2, None, None, None, c1, c2, g_loss, sched, ctx.vals, False, ctx.shape,
                            ctx.v_dtype, C.saved_tensors_used_once())
        return (None, dv) + (None,) * 11


# ---------------------------------------------------------------------------------------------
# schedule coefficients and argument checks


def _coefficients(kind, sigma, sigma_next, eta, sigma_max) -> StepCoefficients:
    """The step's StepCoefficients. Floats stay floats (math in double); tensors are computed in float64 and
    returned in float32 (float64 if any schedule tensor is float64)."""
    (s, sn, et, sm), out_dtype = C.schedule_math((sigma, sigma_next, eta, sigma_max))
    tensors = out_dtype is not None
    if kind == "cps":
        a, k, c = cps_coefficients(s, sn, *C.eta_cos_sin(et))
        kl_std = c
    else:
        dt = sn - s
        try:
            if tensors:
                s_den = torch.where(s >= 1, sm, s)
                std = torch.sqrt(s / (1.0 - s_den)) * et
                sd = std * torch.sqrt(-dt)
            else:
                s_den = sm if s >= 1 else s
                std = math.sqrt(s / (1.0 - s_den)) * et
                sd = std * math.sqrt(-dt)
            var = std * std
            a = 1.0 + var * dt / (2.0 * s)
            k = (1.0 + var * (1.0 - s) / (2.0 * s)) * dt
        except (ZeroDivisionError, ValueError) as exc:
            raise ValueError(f"kind='sde' needs 0 < sigma_next <= sigma, sigma > 0 and sigma' < 1 "
                             f"(sigma={s}, sigma_next={sn}, sigma_max={sm}): {exc}") from None
        c, kl_std = sd, std
    if tensors:
        return StepCoefficients(*(t.to(out_dtype).contiguous() for t in (a, k, c, kl_std)))
    return StepCoefficients(float(a), float(k), float(c), float(kl_std))


def _schedule(kind, tensors, sigma, sigma_next, eta, sigma_max):
    """Packed per-sample coefficients for the data ``tensors`` (the first sets batch and device; float64 data
    keep float64 coefficients)."""
    x = tensors[0]
    B, dev, exact = x.shape[0], x.device, C.compute_dtype(*tensors) == torch.float64
    s = C.schedule_value("sigma", sigma, B, dev, exact)
    sn = C.schedule_value("sigma_next", sigma_next, B, dev, exact)
    et = C.schedule_value("eta", eta, B, dev, exact)
    sm = None
    if kind == "sde":
        if sigma_max is None:
            raise ValueError("sigma_max is required for kind='sde' (Flow-GRPO passes the schedule's second sigma)")
        sm = C.schedule_value("sigma_max", sigma_max, B, dev, exact)
    return C.pack_schedule(_coefficients(kind, s, sn, et, sm), B, dev)


def _check_nonneg(name: str, value: float, strict: bool = False) -> float:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or value < 0 or (strict and value == 0):
        raise ValueError(f"{name} must be a finite float {'>' if strict else '>='} 0, got {value!r}")
    return float(value)


def _check_per_sample(name: str, t: object, x: torch.Tensor) -> torch.Tensor:
    """A ``[B]`` float tensor on x's device (any float dtype)."""
    t = C.check_tensor(name, t)
    if t.shape != (x.shape[0],):
        raise ValueError(f"{name} must have shape [B]={[x.shape[0]]}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    return t.detach().contiguous()


def _check_policy_inputs(x, v, x_next, kind):
    C.check_tensor("x", x)
    C.check_like("x", x, "v", v)
    C.check_like("x", x, "x_next", x_next)
    C.check_choice("kind", kind, KINDS)


# ---------------------------------------------------------------------------------------------
# public API


def cps_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: C.Scalar,
    sigma_next: C.Scalar,
    *,
    eta: C.Scalar,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One CPS sampler step (docs/method.md §2.1, docs/kernels.md §3): returns ``(x_next, mean)`` in ``x.dtype``.

    ``mean = (1-sn)(x - s*v) + sn*cos(eta*pi/2)*(x + (1-s)*v)``, ``x_next = mean + sn*sin(eta*pi/2)*noise``
    (the Euler step where ``sn = 0`` or ``eta = 0``; with ``eta = 0`` it matches diffusers'
    ``FlowMatchEulerDiscreteScheduler.step``). ``noise=None`` draws float32 standard normal noise of
    x's shape for every sample from ``generator``. Differentiable in ``x`` and ``v`` (both outputs
    have Jacobians ``(1-sn) + sn*cos`` and ``k``), not in ``noise``.
    """
    C.check_tensor("x", x)
    C.check_like("x", x, "v", v)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32, device=x.device)
    else:
        C.check_like("x", x, "noise", noise)
    sched, vals = _schedule("cps", (x, v, noise), sigma, sigma_next, eta, None)
    return _CPSStep.apply(x, v, noise.detach(), sched, vals)


def cps_logprob(
    x: torch.Tensor,
    v: torch.Tensor,
    x_next: torch.Tensor,
    sigma: C.Scalar,
    sigma_next: C.Scalar,
    *,
    eta: C.Scalar,
    kind: str = "cps",
    sigma_max: C.Scalar | None = None,
) -> torch.Tensor:
    """Per-sample log-prob of ``x_next`` under the step from ``(x, sigma)`` with velocity ``v`` (docs/method.md §5.1).

    ``kind="cps"``: the reference's surrogate ``-mean_d (x_next - mean)^2``. ``kind="sde"``:
    Flow-GRPO's Gaussian log-density averaged over elements, ``std = sqrt(s/(1-s'))*eta`` with
    ``s' = sigma_max`` where ``s >= 1`` (``sigma_max`` required). Returns ``[B]`` float32
    (float64 for float64 inputs), differentiable in ``v`` only (backward recomputes the mean).
    """
    _check_policy_inputs(x, v, x_next, kind)
    sched, vals = _schedule(kind, (x, v, x_next), sigma, sigma_next, eta, sigma_max)
    return _LogProb.apply(x.detach(), v, x_next.detach(), sched, vals, kind)


def ppo_clip_loss(
    x: torch.Tensor,
    v: torch.Tensor,
    x_next: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    sigma: C.Scalar,
    sigma_next: C.Scalar,
    *,
    eta: C.Scalar,
    kind: str = "cps",
    clip_range: float = 1e-5,
    adv_clip: float = 5.0,
    sigma_max: C.Scalar | None = None,
    v_ref: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    return_stats: bool = False,
):
    """Fused PPO clip loss of one sampler step (docs/method.md §5.4, docs/kernels.md §3), gradient in ``v`` only.

    ``A = clamp(advantages, +-adv_clip)``, ``logp = cps_logprob(...)``, ``r = exp(logp - old_logp)``,
    loss ``= mean_b max(-A*r, -A*clamp(r, 1-clip_range, 1+clip_range))`` (+ ``kl_coef *
    mean_b[mean_d (mean - mean_ref)^2 / (2 s_b^2)]`` with ``v_ref``; ``s_b = 0`` rows add 0), with
    PyTorch's gradient semantics at ties. The gradient is made in the forward as one per-sample
    coefficient times the residual ``x_next - mean``. Returns a float32 scalar, or ``(loss, stats)``
    with float32 tensors ``ratio_mean``, ``clip_fraction``, ``approx_kl`` and ``logp`` ``[B]``.
    """
    _check_policy_inputs(x, v, x_next, kind)
    old_logp = _check_per_sample("old_logp", old_logp, x)
    advantages = _check_per_sample("advantages", advantages, x)
    clip_range = _check_nonneg("clip_range", clip_range)
    adv_clip = _check_nonneg("adv_clip", adv_clip, strict=True)
    kl_coef = _check_nonneg("kl_coef", kl_coef)
    if v_ref is not None:
        C.check_like("v", v, "v_ref", v_ref)
        v_ref = v_ref.detach() if kl_coef > 0 else None
    sched, vals = _schedule(kind, (x, v, x_next), sigma, sigma_next, eta, sigma_max)
    store = torch.is_grad_enabled() and v.requires_grad
    loss, logp, stats = _PPOClipLoss.apply(x.detach(), v, x_next.detach(), v_ref, old_logp, advantages, sched, vals,
                                           kind, store, clip_range, adv_clip, kl_coef)
    if return_stats:
        return loss, {"ratio_mean": stats[0], "clip_fraction": stats[1], "approx_kl": stats[2], "logp": logp}
    return loss
