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

import torch

from . import _common as C
from ._backend import backend_for, triton_available

__all__ = ["cps_step", "cps_logprob", "ppo_clip_loss"]

KINDS = ("cps", "sde")
_KIND_CODE = {"cps": 0, "sde": 1}
LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))

BLOCK = 1024  # elements per inner iteration of a program
EW_BLOCK = 2048  # elements per program of the elementwise kernels
NUM_WARPS = 4
MAX_CHUNKS = 128  # chunks per sample of the reduction pass
FINAL_BLOCK_B = 32  # samples per iteration of the finalize program
NCOL = 4  # per-sample table columns: a, k, c (cps_step) or sd (log-prob), kl_std

if triton_available():
    import triton
    import triton.language as tl

    from ._triton_utils import chunk_offsets, chunk_program, per_sample_value, sample_block, stream_f32

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
        tl.store(mean_ptr + offs, mean.to(mean_ptr.dtype.element_ty), mask=mask)
        tl.store(xn_ptr + offs, (mean + c * nz).to(xn_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _cps_step_grad_kernel(
        gxn_ptr, gm_ptr, dx_ptr, dv_ptr, sched_ptr, a, k, D,
        HAS_GXN: tl.constexpr, HAS_GMEAN: tl.constexpr, NEED_DX: tl.constexpr, NEED_DV: tl.constexpr,
        PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # g = grad x_next + grad mean (same Jacobians); dx = a*g, dv = k*g.
        b, offs, mask = sample_block(D, BLOCK)
        g = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_GXN:
            g += tl.load(gxn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GMEAN:
            g += tl.load(gm_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if NEED_DX:
            a = per_sample_value(sched_ptr, b, 0, 4, a, PER_SAMPLE)
            tl.store(dx_ptr + offs, (a * g).to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DV:
            k = per_sample_value(sched_ptr, b, 1, 4, k, PER_SAMPLE)
            tl.store(dv_ptr + offs, (k * g).to(dv_ptr.dtype.element_ty), mask=mask)

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
        part_ptr, part2_ptr, old_ptr, adv_ptr, sched_ptr, logp_ptr, c1_ptr, c2_ptr, loss_ptr, stats_ptr,
        k, sd, kl_std, B, S, Df, Bf, clip_lo, clip_hi, clip_range, adv_clip, kl_coef, log_sqrt_2pi,
        KIND: tl.constexpr, PPO: tl.constexpr, HAS_REF: tl.constexpr, PER_SAMPLE: tl.constexpr,
        BLOCK_B: tl.constexpr, S_BLOCK: tl.constexpr,
    ):
        # One program, samples in a fixed order: logp_b from the partials; with PPO the ratio, the
        # clipped surrogate, the KL term, the statistics and the per-sample gradient coefficients
        # c1_b (of the residual) and c2_b (of k*(v - v_ref)); without PPO c1_b = dlogp_b/dres-scale.
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
                kb = k
                sdb = sd
                klb = kl_std
            if KIND == 0:
                logp = -(sq / Df)
                coef = 2.0 * kb / Df
            else:
                logp = -((sq / (2.0 * sdb * sdb)) / Df) - tl.log(sdb) - log_sqrt_2pi
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
        tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=mask)


def _use_torch(t: torch.Tensor, cd: torch.dtype) -> bool:
    return t.numel() == 0 or cd == torch.float64 or backend_for(t) == "torch"


def _columns(sched: torch.Tensor | None, vals: list[float], cd: torch.dtype, column: bool):
    """The four per-sample coefficients in ``cd``: ``[B, 1]`` columns (``column``) or ``[B]``, or floats."""
    if sched is None:
        return vals
    return [sched[:, i].to(cd).unsqueeze(1) if column else sched[:, i].to(cd) for i in range(NCOL)]


# ---------------------------------------------------------------------------------------------
# cps_step


def _cps_step_impl(x, v, noise, sched, vals):
    shape = x.shape
    cd = C.compute_dtype(x, v, noise)
    x2, v2, n2 = C.flat(x), C.flat(v), C.flat(noise)
    B, D = x2.shape
    if _use_torch(x, cd):
        a, k, c, _ = _columns(sched, vals, cd, True)
        mean = x2 * a if x2.dtype == cd else x2.to(cd) * a
        C.add_scaled_(mean, v2, k)
        xn = torch.addcmul(mean, n2, c) if isinstance(c, torch.Tensor) else torch.add(mean, n2, alpha=c)
        return xn.to(x.dtype).view(shape), mean.to(x.dtype).view(shape)
    xn = torch.empty((B, D), dtype=x.dtype, device=x.device)
    mean = torch.empty_like(xn)
    grid = (triton.cdiv(D, EW_BLOCK), B)
    _cps_step_kernel[grid](x2, v2, n2, xn, mean, sched if sched is not None else xn, *vals[:3], D,
                           PER_SAMPLE=sched is not None, BLOCK=EW_BLOCK, num_warps=NUM_WARPS)
    return xn.view(shape), mean.view(shape)


def _cps_step_grad_impl(g_xn, g_mean, sched, vals, need_x, need_v, v_dtype):
    like = g_xn if g_xn is not None else g_mean
    shape = like.shape
    none = like.new_empty(0)
    if like.numel() == 0 or not (need_x or need_v):
        return (torch.zeros_like(like) if need_x else none), (torch.zeros_like(like, dtype=v_dtype) if need_v else none)
    cd = C.compute_dtype(g_xn, g_mean)
    gx2 = C.flat(g_xn) if g_xn is not None else None
    gm2 = C.flat(g_mean) if g_mean is not None else None
    B, D = (gx2 if gx2 is not None else gm2).shape
    if _use_torch(like, cd):
        a, k, _, _ = _columns(sched, vals, cd, True)
        g = gx2.to(cd) if gx2 is not None else None
        g = gm2.to(cd) if g is None else (g + gm2 if gm2 is not None else g)
        dx = (g * a).to(like.dtype).view(shape) if need_x else none
        dv = (g * k).to(v_dtype).view(shape) if need_v else none
        return dx, dv
    dx = torch.empty((B, D), dtype=like.dtype, device=like.device) if need_x else none
    dv = torch.empty((B, D), dtype=v_dtype, device=like.device) if need_v else none
    first = gx2 if gx2 is not None else gm2
    grid = (triton.cdiv(D, EW_BLOCK), B)
    _cps_step_grad_kernel[grid](
        first, gm2 if gm2 is not None else first, dx if need_x else first, dv if need_v else first,
        sched if sched is not None else first, *vals[:2], D,
        HAS_GXN=gx2 is not None, HAS_GMEAN=gm2 is not None, NEED_DX=need_x, NEED_DV=need_v,
        PER_SAMPLE=sched is not None, BLOCK=EW_BLOCK, num_warps=NUM_WARPS,
    )
    return (dx.view(shape) if need_x else none), (dv.view(shape) if need_v else none)


# ---------------------------------------------------------------------------------------------
# log-prob and PPO: pass 1 + finalize, and the one backward kernel


def _residual(x2, v2, xn2, a, k, cd):
    """x_next - (a*x + k*v) in ``cd``, two passes: xn + (-a)*x into a new tensor, then += (-k)*v."""
    xn = xn2 if xn2.dtype == cd else xn2.to(cd)
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


def _policy_forward_impl(x, v, x_next, v_ref, old_logp, advantages, sched, vals, kind, ppo, store,
                         clip_range, adv_clip, kl_coef):
    """(loss, logp [B], stats [3], res, res2, c1 [B], c2 [B]); res/res2 are stored only with ppo and store."""
    cd = C.compute_dtype(x, v, x_next, v_ref)
    x2, v2, xn2 = C.flat(x), C.flat(v), C.flat(x_next)
    B, D = x2.shape
    has_ref = v_ref is not None
    empty = x2.new_empty(0, dtype=cd)
    keep = ppo and store
    if _use_torch(x, cd):
        a, k, sd, kl_std = _columns(sched, vals, cd, True)
        res = _residual(x2, v2, xn2, a, k, cd)
        sq = _row_sumsq(res)
        sq2 = res2 = None
        if has_ref:
            res2 = torch.sub(v2.to(cd), v_ref.reshape(B, D).to(cd)).mul_(k)  # mean - mean_ref
            sq2 = _row_sumsq(res2)
        k1, sd1, kl1 = _columns(sched, vals, cd, False)[1:]
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
    _policy_finalize_kernel[(1,)](
        part, part2, old_logp if ppo else part, advantages if ppo else part, sched_ptr, logp, c1,
        c2 if c2.numel() else c1, loss, stats, vals[1], vals[2], vals[3], B, S, float(D), float(B),
        1.0 - clip_range, 1.0 + clip_range, clip_range, adv_clip, kl_coef, LOG_SQRT_2PI,
        KIND=_KIND_CODE[kind], PPO=ppo, HAS_REF=has_ref, PER_SAMPLE=per_sample,
        BLOCK_B=FINAL_BLOCK_B, S_BLOCK=triton.next_power_of_2(S), num_warps=NUM_WARPS,
    )
    return loss, logp, stats, res, res2, c1, c2


def _policy_grad_impl(res, res2, x, v, x_next, c1, c2, go, sched, vals, recompute, shape, v_dtype):
    """dv = go_b * (c1_b * res + c2_b * res2) in ``v_dtype``; res recomputed from x, v, x_next if asked."""
    B = shape[0]
    like = x if recompute else res
    if math.prod(shape) == 0:
        return torch.zeros(shape, dtype=v_dtype, device=c1.device)
    has_ref = res2.numel() > 0
    cd = C.compute_dtype(like, v if recompute else None, c1)
    if _use_torch(like, cd):
        scale1 = (go.to(cd) * c1.to(cd)).reshape(-1, 1).expand(B, 1)
        if recompute:
            a, k, _, _ = _columns(sched, vals, cd, True)
            x2, v2, xn2 = C.flat(x), C.flat(v), C.flat(x_next)
            dv = _residual(x2, v2, xn2, a, k, cd).mul_(scale1)
        else:
            dv = res * scale1
            if has_ref:
                dv.addcmul_(res2, (go.to(cd) * c2.to(cd)).reshape(-1, 1).expand(B, 1))
        return dv.to(v_dtype).view(shape)
    D = math.prod(shape[1:])
    dv = torch.empty((B, D), dtype=v_dtype, device=c1.device)
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


# ---------------------------------------------------------------------------------------------
# custom ops (torch.compile traces through them) and the eager autograd Functions

_PolicyOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("rtdmd_kernels::cps_step", mutates_args=())
def _cps_step_op(
    x: torch.Tensor, v: torch.Tensor, noise: torch.Tensor, sched: torch.Tensor | None, vals: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    return _cps_step_impl(x, v, noise, sched, vals)


@_cps_step_op.register_fake
def _(x, v, noise, sched, vals):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        x, memory_format=torch.contiguous_format)


@torch.library.custom_op("rtdmd_kernels::cps_step_grad", mutates_args=())
def _cps_step_grad_op(
    g_xn: torch.Tensor | None, g_mean: torch.Tensor | None, sched: torch.Tensor | None, vals: list[float],
    need_x: bool, need_v: bool, v_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _cps_step_grad_impl(g_xn, g_mean, sched, vals, need_x, need_v, v_dtype)


@_cps_step_grad_op.register_fake
def _(g_xn, g_mean, sched, vals, need_x, need_v, v_dtype):
    like = g_xn if g_xn is not None else g_mean
    return (torch.empty_like(like, memory_format=torch.contiguous_format) if need_x else like.new_empty(0),
            torch.empty_like(like, dtype=v_dtype, memory_format=torch.contiguous_format) if need_v
            else like.new_empty(0))


def _cps_setup_context(ctx, inputs, output):
    x, v, _noise, sched, vals = inputs
    ctx.save_for_backward(sched)
    ctx.vals, ctx.v_dtype = vals, v.dtype


def _cps_grads(ctx, g_xn, g_mean, grad_fn):
    """Backward of cps_step (eager Function and custom op alike): dx = a*g, dv = k*g, g = the sum of
    the incoming gradients (x_next and mean share their Jacobians)."""
    (sched,) = ctx.saved_tensors
    need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if g_xn is None and g_mean is None:
        return None, None, None, None, None
    dx, dv = grad_fn(g_xn, g_mean, sched, ctx.vals, need_x, need_v, ctx.v_dtype)
    return (dx if need_x else None), (dv if need_v else None), None, None, None


def _cps_backward(ctx, g_xn, g_mean):
    return _cps_grads(ctx, g_xn, g_mean, _cps_step_grad_op)


_cps_step_op.register_autograd(_cps_backward, setup_context=_cps_setup_context)


class _CPSStepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, v, noise, sched, vals):
        xn, mean = _cps_step_impl(x, v, noise, sched, vals)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(sched)
        ctx.vals, ctx.v_dtype = vals, v.dtype
        return xn, mean

    @staticmethod
    def backward(ctx, g_xn, g_mean):
        return _cps_grads(ctx, g_xn, g_mean, _cps_step_grad_impl)


@torch.library.custom_op("rtdmd_kernels::policy_forward", mutates_args=())
def _policy_forward_op(
    x: torch.Tensor, v: torch.Tensor, x_next: torch.Tensor, v_ref: torch.Tensor | None,
    old_logp: torch.Tensor | None, advantages: torch.Tensor | None, sched: torch.Tensor | None,
    vals: list[float], kind: str, ppo: bool, store: bool, clip_range: float, adv_clip: float, kl_coef: float,
) -> _PolicyOut:
    return _policy_forward_impl(x, v, x_next, v_ref, old_logp, advantages, sched, vals, kind, ppo, store,
                                clip_range, adv_clip, kl_coef)


@_policy_forward_op.register_fake
def _(x, v, x_next, v_ref, old_logp, advantages, sched, vals, kind, ppo, store, clip_range, adv_clip, kl_coef):
    cd = C.compute_dtype(x, v, x_next, v_ref)
    B, D = x.shape[0], math.prod(x.shape[1:])
    keep = ppo and store
    res = x.new_empty((B, D), dtype=cd) if keep else x.new_empty(0, dtype=cd)
    res2 = x.new_empty((B, D), dtype=cd) if (keep and v_ref is not None) else x.new_empty(0, dtype=cd)
    c2 = x.new_empty(B, dtype=cd) if (ppo and v_ref is not None) else x.new_empty(0, dtype=cd)
    return (x.new_empty((), dtype=cd), x.new_empty(B, dtype=cd), x.new_empty(3, dtype=cd), res, res2,
            x.new_empty(B, dtype=cd), c2)


@torch.library.custom_op("rtdmd_kernels::policy_grad", mutates_args=())
def _policy_grad_op(
    res: torch.Tensor, res2: torch.Tensor, x: torch.Tensor | None, v: torch.Tensor | None,
    x_next: torch.Tensor | None, c1: torch.Tensor, c2: torch.Tensor, go: torch.Tensor,
    sched: torch.Tensor | None, vals: list[float], recompute: bool, shape: list[int], v_dtype: torch.dtype,
) -> torch.Tensor:
    return _policy_grad_impl(res, res2, x, v, x_next, c1, c2, go, sched, vals, recompute, shape, v_dtype)


@_policy_grad_op.register_fake
def _(res, res2, x, v, x_next, c1, c2, go, sched, vals, recompute, shape, v_dtype):
    return c1.new_empty(shape, dtype=v_dtype)


def _policy_setup_context(ctx, inputs, output):
    x, v, x_next, _v_ref, _old, _adv, sched, vals, _kind, ppo, store, *_ = inputs
    _loss, logp, stats, res, res2, c1, c2 = output
    ctx.mark_non_differentiable(stats, res, res2, c1, c2)
    if ppo:
        ctx.mark_non_differentiable(logp)
        ctx.save_for_backward(res, res2, None, None, None, c1, c2, sched)
    else:
        ctx.save_for_backward(res, res2, x, v, x_next, c1, c2, sched)
    ctx.ppo, ctx.store, ctx.vals, ctx.shape, ctx.v_dtype = ppo, store, vals, list(v.shape), v.dtype


def _policy_backward(ctx, g_loss, g_logp, *_unused):
    res, res2, x, v, x_next, c1, c2, sched = ctx.saved_tensors
    if ctx.ppo and not ctx.store:
        raise RuntimeError("rtdmd_kernels: the loss was computed with v.requires_grad=False or under no_grad")
    go = g_loss if ctx.ppo else g_logp
    dv = _policy_grad_op(res, res2, x, v, x_next, c1, c2, go, sched, ctx.vals, not ctx.ppo, ctx.shape, ctx.v_dtype)
    return (None, dv) + (None,) * 12


_policy_forward_op.register_autograd(_policy_backward, setup_context=_policy_setup_context)


class _PolicyFunction(torch.autograd.Function):
    """Eager autograd of cps_logprob (``ppo=False``: output logp, backward recomputes the residual)
    and ppo_clip_loss (output loss; backward scales the residual written in the forward).
    Under torch.compile the same impls run through the custom ops above instead."""

    @staticmethod
    def forward(ctx, args, v):
        x, x_next, v_ref, old, adv, sched, vals, kind, ppo, store, clip_range, adv_clip, kl_coef = args
        loss, logp, stats, res, res2, c1, c2 = _policy_forward_impl(
            x, v, x_next, v_ref, old, adv, sched, vals, kind, ppo, store, clip_range, adv_clip, kl_coef)
        ctx.ppo, ctx.vals, ctx.shape, ctx.v_dtype = ppo, vals, list(v.shape), v.dtype
        if ppo:
            ctx.save_for_backward(res, res2, c1, c2, sched)
            ctx.mark_non_differentiable(logp, stats)
        else:
            ctx.save_for_backward(res, res2, c1, c2, sched, x, v.detach(), x_next)
            ctx.mark_non_differentiable(loss, stats)
        return loss, logp, stats

    @staticmethod
    def backward(ctx, g_loss, g_logp, _g_stats):
        if ctx.ppo:
            res, res2, c1, c2, sched = ctx.saved_tensors
            x = v = x_next = None
            go = g_loss
        else:
            res, res2, c1, c2, sched, x, v, x_next = ctx.saved_tensors
            go = g_logp
        if ctx.ppo and res.numel() != math.prod(ctx.shape):
            raise RuntimeError("rtdmd_kernels: the loss was computed with v.requires_grad=False or under no_grad")
        dv = _policy_grad_impl(res, res2, x, v, x_next, c1, c2, go, sched, ctx.vals, not ctx.ppo,
                               ctx.shape, ctx.v_dtype)
        return None, dv


def _policy_run(v, args):
    """Dispatch to the custom op under torch.compile, else to the eager Function."""
    if torch.compiler.is_compiling():
        x, x_next, v_ref, old, adv, sched, vals, kind, ppo, store, clip_range, adv_clip, kl_coef = args
        loss, logp, stats, *_ = _policy_forward_op(x, v, x_next, v_ref, old, adv, sched, vals, kind, ppo, store,
                                                   clip_range, adv_clip, kl_coef)
        return loss, logp, stats.detach()  # constants, as in eager (indexing them in the graph made them require grad)
    return _PolicyFunction.apply(args, v)


# ---------------------------------------------------------------------------------------------
# schedule coefficients and argument checks


def _coefficients(kind, sigma, sigma_next, eta, sigma_max):
    """Per-sample ``(a, k, c, kl_std)`` with ``mean = a*x + k*v``; ``c`` is the noise scale of the step
    (cps: sigma_next*sin(eta*pi/2); sde: the Gaussian's sd = std*sqrt(-dt)); ``kl_std`` the std the
    KL term divides by. Floats stay floats (math in double); tensors are computed in float64 and
    returned in float32 (float64 if any schedule tensor is float64)."""
    (s, sn, et, sm), out_dtype = C.schedule_math((sigma, sigma_next, eta, sigma_max))
    tensors = out_dtype is not None
    if kind == "cps":
        c_eta, s_eta = C.eta_cos_sin(et)
        omc = 1.0 - c_eta
        a = 1.0 - sn * omc  # (1 - sn) + sn*cos: exactly 1 at eta = 0
        k = (sn - s) - sn * omc * (1.0 - s)  # -(1 - sn)*s + sn*cos*(1 - s): exactly sn - s at eta = 0
        c = sn * s_eta
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
        return tuple(t.to(out_dtype).contiguous() for t in (a, k, c, kl_std))
    return float(a), float(k), float(c), float(kl_std)


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
    noise = noise.detach()
    if torch.compiler.is_compiling():
        return _cps_step_op(x, v, noise, sched, vals)
    return _CPSStepFunction.apply(x, v, noise, sched, vals)


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
    args = (x.detach(), x_next.detach(), None, None, None, sched, vals, kind, False, False, 0.0, 1.0, 0.0)
    return _policy_run(v, args)[1]


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
    args = (x.detach(), x_next.detach(), v_ref, old_logp, advantages, sched, vals, kind, True, store,
            clip_range, adv_clip, kl_coef)
    loss, logp, stats = _policy_run(v, args)
    if return_stats:
        return loss, {"ratio_mean": stats[0], "clip_fraction": stats[1], "approx_kl": stats[2], "logp": logp}
    return loss
