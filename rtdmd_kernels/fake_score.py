"""Fake-score side of AC-DMD (docs/method.md §4.1-4.2, docs/kernels.md §5): renoise, the fake-score loss and the
consistency regularizer. Triton kernels, a torch path, autograd, custom ops.

What moves per element (fp32 inputs; bf16/fp16 halve those bytes):
  renoise           fwd reads x_s, noise                      -> writes x_t                 8 R + 4 W
                    bwd reads grad x_t                        -> writes dx_s, dnoise        4 R + 8 W
  fake_score_loss   fwd reads v_hat, x_s, noise               -> writes h (v_hat.dtype), per-chunk
                                                                 sums of w*(v_hat*scale - target)^2   12 R + 4 W
                    bwd reads h                               -> writes dv_hat              4 R + 4 W
  consistency_loss  fwd reads x_t, v_hat, x1, v1, x2, v2      -> writes d1, d2 (fp32), per-chunk
                                                                 sums of d1*d2            24 R + 8 W
                    bwd reads d1, d2                          -> writes dv_hat, dv1, dv2    8 R + 12 W
Why fused this way: every coefficient is per sample (a, sigma_ts, sigma_ts/(1-sigma_s), beta, w are
made once per call from the sigmas, in float64), so the kernels are affine maps of their inputs.
The fake-score target ``-(sigma_ts/(1-sigma_s))*x_s + beta*noise`` is formed in registers, never
materialised; its gradient ``2*w*scale*(v_hat*scale - target)`` is made in the same pass (as h, with
the 2 folded in) and backward only scales it (``_shared.scale_saved_grad``). The consistency gradients are
per-sample multiples of the two residuals d1 = h1-h0, d2 = h2-h0, so the forward writes them once
and one backward kernel makes all three gradients. The partial sums are per (sample, chunk) and
reduced in a fixed order: deterministic and independent of the launch grid. The loss' NaN/inf mask
(nan_to_num of the reference) stays on the device: backward reads it, nothing syncs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _common as C
from ._backend import backend_for, triton_available
from ._shared import affine_grad, scale_saved_grad

__all__ = ["renoise", "fake_score_loss", "consistency_loss"]

BLOCK = 1024  # elements per inner iteration of a reduction program
EW_BLOCK = 2048  # elements per program of the elementwise kernels
NUM_WARPS = 4
MAX_CHUNKS = 128  # chunks per sample of the reduction passes
FINAL_BLOCK = 1024
VAR_FLOOR = 1e-12  # the reference's floor of sigma_ts^2 and of scale^2


class SubInterval(NamedTuple):
    """Per-sample coefficients of the renoise from sigma_s to sigma_t (docs/method.md §4.1.3-4):
    ``x_t = a*x_s + sigma_ts*noise``; the fake-score target is ``-cx*x_s + beta*noise``,
    ``cx = sigma_ts/(1-sigma_s)``."""

    a: C.Scalar
    sigma_ts: C.Scalar
    cx: C.Scalar
    beta: C.Scalar


class FakeScoreCoefficients(NamedTuple):
    """The columns of fake_score_loss' ``[B, 4]`` table: ``r = scale*v_hat + cx*x_s - beta*noise``, weight w."""

    scale: C.Scalar
    cx: C.Scalar
    beta: C.Scalar
    weight: C.Scalar


class ConsistencyCoefficients(NamedTuple):
    """The columns of consistency_loss' ``[B, 2]`` table."""

    sigma_t: C.Scalar
    sigma_p: C.Scalar

if triton_available():
    import triton
    import triton.language as tl

    from ._triton_utils import chunk_offsets, chunk_program, per_sample_value, sample_block, stream_f32, to_element

    @triton.jit
    def _renoise_kernel(x_ptr, n_ptr, out_ptr, sched_ptr, a, k, D, PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr):
        # x_t = a*x_s + sigma_ts*noise; grid (blocks of a sample, sample). Table columns: a, sigma_ts, -, -.
        b, offs, mask = sample_block(D, BLOCK)
        a = per_sample_value(sched_ptr, b, 0, 4, a, PER_SAMPLE)
        k = per_sample_value(sched_ptr, b, 1, 4, k, PER_SAMPLE)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        nz = tl.load(n_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, to_element(a * x + k * nz, out_ptr), mask=mask)

    @triton.jit
    def _fake_score_partials_kernel(
        v_ptr, x_ptr, n_ptr, h_ptr, part_ptr, sched_ptr, scale, cx, beta, w,
        D, CHUNK, S,
        STORE: tl.constexpr, PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # r = v_hat*scale - target = scale*v + cx*x_s - beta*noise; h = 2*w*scale*r (stored);
        # part[b, s] = w * sum of r^2 over chunk s of sample b.
        pid, b, base, start = chunk_program(S, D, CHUNK)
        scale = per_sample_value(sched_ptr, b, 0, 4, scale, PER_SAMPLE)
        cx = per_sample_value(sched_ptr, b, 1, 4, cx, PER_SAMPLE)
        beta = per_sample_value(sched_ptr, b, 2, 4, beta, PER_SAMPLE)
        w = per_sample_value(sched_ptr, b, 3, 4, w, PER_SAMPLE)
        hw = 2.0 * w * scale
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, CHUNK, BLOCK):
            offs, mask = chunk_offsets(base, start, i, D, BLOCK)
            v = stream_f32(v_ptr, offs, mask)
            x = stream_f32(x_ptr, offs, mask)
            nz = stream_f32(n_ptr, offs, mask)
            r = scale * v + cx * x - beta * nz
            acc += r * r
            if STORE:
                tl.store(h_ptr + offs, to_element(hw * r, h_ptr), mask=mask)
        tl.store(part_ptr + pid, w * tl.sum(acc, axis=0))

    @triton.jit
    def _consistency_partials_kernel(
        xt_ptr, vh_ptr, x1_ptr, v1_ptr, x2_ptr, v2_ptr, d1_ptr, d2_ptr, part_ptr, sched_ptr, st, sp,
        D, CHUNK, S,
        STORE: tl.constexpr, PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # h0 = x_t - st*v_hat, d1 = (x1 - sp*v1) - h0, d2 = (x2 - sp*v2) - h0 (stored, fp32);
        # part[b, s] = sum of d1*d2 over chunk s of sample b. Table columns: sigma_t, sigma_p.
        pid, b, base, start = chunk_program(S, D, CHUNK)
        st = per_sample_value(sched_ptr, b, 0, 2, st, PER_SAMPLE)
        sp = per_sample_value(sched_ptr, b, 1, 2, sp, PER_SAMPLE)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, CHUNK, BLOCK):
            offs, mask = chunk_offsets(base, start, i, D, BLOCK)
            xt = stream_f32(xt_ptr, offs, mask)
            vh = stream_f32(vh_ptr, offs, mask)
            x1 = stream_f32(x1_ptr, offs, mask)
            v1 = stream_f32(v1_ptr, offs, mask)
            x2 = stream_f32(x2_ptr, offs, mask)
            v2 = stream_f32(v2_ptr, offs, mask)
            h0 = xt - st * vh
            d1 = (x1 - sp * v1) - h0
            d2 = (x2 - sp * v2) - h0
            acc += d1 * d2
            if STORE:
                tl.store(d1_ptr + offs, d1, mask=mask)
                tl.store(d2_ptr + offs, d2, mask=mask)
        tl.store(part_ptr + pid, tl.sum(acc, axis=0))

    @triton.jit
    def _mean_finalize_kernel(part_ptr, n_part, loss_ptr, ok_ptr, numel, fmax,
                              NAN_TO_NUM: tl.constexpr, BLOCK: tl.constexpr):
        # loss = sum(partials) / N in a fixed order; with NAN_TO_NUM the reference's nan_to_num of the
        # scalar (NaN -> 0, +-inf -> +-fmax) and ok = isfinite(loss) as 1.0 / 0.0 (the gradient's mask).
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, n_part, BLOCK):
            idx = i + tl.arange(0, BLOCK)
            acc += tl.load(part_ptr + idx, mask=idx < n_part, other=0.0)
        loss = tl.sum(acc, axis=0) / numel
        if NAN_TO_NUM:
            finite = tl.abs(loss) <= fmax  # False for NaN and +-inf
            tl.store(ok_ptr, tl.where(finite, 1.0, 0.0))
            loss = tl.where(loss != loss, 0.0, tl.minimum(tl.maximum(loss, -fmax), fmax))
        tl.store(loss_ptr, loss)

    @triton.jit
    def _consistency_grad_kernel(
        d1_ptr, d2_ptr, ok_ptr, go_ptr, dvh_ptr, dv1_ptr, dv2_ptr, sched_ptr, st, sp, D, numel,
        NEED_VH: tl.constexpr, NEED_V1: tl.constexpr, NEED_V2: tl.constexpr,
        PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # c = ok * grad_out / N; dv_hat = c*st*(d1 + d2), dv1 = -c*sp*d2, dv2 = -c*sp*d1 (0 where not ok).
        b, offs, mask = sample_block(D, BLOCK)
        ok = tl.load(ok_ptr) != 0.0
        c = tl.load(go_ptr).to(tl.float32) / numel
        d1 = tl.load(d1_ptr + offs, mask=mask, other=0.0)
        d2 = tl.load(d2_ptr + offs, mask=mask, other=0.0)
        if NEED_VH:
            cst = c * per_sample_value(sched_ptr, b, 0, 2, st, PER_SAMPLE)
            tl.store(dvh_ptr + offs, to_element(tl.where(ok, cst * (d1 + d2), 0.0), dvh_ptr), mask=mask)
        if NEED_V1 or NEED_V2:
            csp = -c * per_sample_value(sched_ptr, b, 1, 2, sp, PER_SAMPLE)
            if NEED_V1:
                tl.store(dv1_ptr + offs, to_element(tl.where(ok, csp * d2, 0.0), dv1_ptr), mask=mask)
            if NEED_V2:
                tl.store(dv2_ptr + offs, to_element(tl.where(ok, csp * d1, 0.0), dv2_ptr), mask=mask)


def _use_torch(t: torch.Tensor, cd: torch.dtype) -> bool:
    return t.numel() == 0 or cd == torch.float64 or backend_for(t) == "torch"


def _finalize(part: torch.Tensor, numel: int, nan_to_num: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, ok) from the fp32 per-(sample, chunk) partial sums, one program."""
    loss = torch.empty((), device=part.device, dtype=torch.float32)
    ok = torch.ones((), device=part.device, dtype=torch.float32) if not nan_to_num else torch.empty_like(loss)
    _mean_finalize_kernel[(1,)](part, part.numel(), loss, ok, numel, torch.finfo(torch.float32).max,
                                NAN_TO_NUM=nan_to_num, BLOCK=FINAL_BLOCK, num_warps=NUM_WARPS)
    return loss, ok


# ---------------------------------------------------------------------------------------------
# renoise: launcher, custom op, autograd (backward: _shared.affine_grad with (a, k) = (a, sigma_ts))


def _renoise_fwd(x_s: torch.Tensor, noise: torch.Tensor, sched: torch.Tensor | None, vals: list[float]) -> torch.Tensor:
    """x_t = a*x_s + sigma_ts*noise in x_s's dtype; table columns a, sigma_ts, 0, 0."""
    shape = x_s.shape
    cd = C.compute_dtype(x_s, noise)
    x2, n2 = C.flat(x_s), C.flat(noise)
    B, D = x2.shape
    if _use_torch(x_s, cd):
        a, k, _, _ = C.table_columns(sched, vals, cd)
        out = C.cast(x2, cd) * a
        return C.add_scaled_(out, C.cast(n2, cd), k).to(x_s.dtype).view(shape)
    out = torch.empty((B, D), dtype=x_s.dtype, device=x_s.device)
    grid = (triton.cdiv(D, EW_BLOCK), B)
    _renoise_kernel[grid](x2, n2, out, sched if sched is not None else out, vals[0], vals[1], D,
                          PER_SAMPLE=sched is not None, BLOCK=EW_BLOCK, num_warps=NUM_WARPS)
    return out.view(shape)


_renoise_fwd_op = C.KernelOp("renoise_fwd", _renoise_fwd, lambda x_s, noise, sched, vals: torch.empty_like(
    x_s, memory_format=torch.contiguous_format))


class _Renoise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_s, noise, sched, vals):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(sched)
        ctx.vals, ctx.n_dtype = vals, noise.dtype
        return _renoise_fwd_op(x_s, noise, sched, vals)

    @staticmethod
    def backward(ctx, g):
        (sched,) = ctx.saved_tensors
        need_x, need_n = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if g is None or not (need_x or need_n):
            return None, None, None, None
        dx, dn = affine_grad(g, None, sched, ctx.vals, need_x, need_n, ctx.n_dtype)
        return (dx if need_x else None), (dn if need_n else None), None, None


# ---------------------------------------------------------------------------------------------
# fake_score_loss: one pass makes the loss partials and h = 2*w*scale*r; backward: _shared.scale_grad


def _fake_score_fwd(
    v_hat: torch.Tensor, x_s: torch.Tensor, noise: torch.Tensor, sched: torch.Tensor | None, vals: list[float],
    store: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, h): h = 2*w*scale*(v_hat*scale - target) in v_hat's dtype (empty unless ``store``);
    ``sched``/``vals``: FakeScoreCoefficients."""
    cd = C.compute_dtype(v_hat, x_s, noise)
    N = v_hat.numel()
    if N == 0:
        return v_hat.new_zeros((), dtype=cd), torch.empty_like(v_hat)
    v2, x2, n2 = C.flat(v_hat), C.flat(x_s), C.flat(noise)
    B, D = v2.shape
    if _use_torch(v_hat, cd):
        scale, cx, beta, w = C.table_columns(sched, vals, cd)
        # With a gradient, h = hw*r is formed directly (hw folded into the three coefficients: one pass fewer
        # than r then h) and sum(w*r^2) = sum(h^2) * w/hw^2 = sum(h^2) / (4*w*scale^2), hw = 2*w*scale > 0.
        hw = 2.0 * w * scale if store else 1.0
        r = C.cast(v2, cd) * (hw * scale)
        C.add_scaled_(C.add_scaled_(r, C.cast(x2, cd), hw * cx), C.cast(n2, cd), -(hw * beta))
        row_w = 1.0 / (2.0 * hw * scale) if store else w  # w/hw^2
        sq = torch.linalg.vector_norm(r, dim=1).square_()
        loss = (sq.mul_(row_w.reshape(-1)) if isinstance(row_w, torch.Tensor) else sq.mul_(row_w)).sum() / N
        return loss, (r.to(v_hat.dtype).view(v_hat.shape) if store else v_hat.new_empty(0))
    chunk, S = C.chunking(D, BLOCK, MAX_CHUNKS)
    part = torch.empty(B * S, device=v_hat.device, dtype=torch.float32)
    h = torch.empty((B, D), dtype=v_hat.dtype, device=v_hat.device) if store else v_hat.new_empty(0)
    _fake_score_partials_kernel[(B * S,)](
        v2, x2, n2, h if store else part, part, sched if sched is not None else part, *vals, D, chunk, S,
        STORE=store, PER_SAMPLE=sched is not None, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    loss, _ok = _finalize(part, N, False)
    return loss, (h.view(v_hat.shape) if store else h)


def _fake_score_fwd_fake(v_hat, x_s, noise, sched, vals, store):
    h = torch.empty_like(v_hat, memory_format=torch.contiguous_format) if store else v_hat.new_empty(0)
    return v_hat.new_empty((), dtype=C.compute_dtype(v_hat, x_s, noise)), h


_fake_score_fwd_op = C.KernelOp("fake_score_fwd", _fake_score_fwd, _fake_score_fwd_fake)


class _FakeScoreLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v_hat, x_s, noise, sched, vals, store):
        loss, h = _fake_score_fwd_op(v_hat, x_s, noise, sched, vals, store)
        ctx.numel = v_hat.numel()
        ctx.save_for_backward(h)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (h,) = ctx.saved_tensors
        if h.numel() != ctx.numel:
            raise RuntimeError("rtdmd_kernels: the loss was computed with v_hat.requires_grad=False or under no_grad")
        return scale_saved_grad(h, grad_loss, ctx.numel), None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# consistency_loss: one pass makes the partials and d1, d2; one backward launcher makes three gradients


def _consistency_fwd(
    x_t: torch.Tensor, v_hat: torch.Tensor, x1: torch.Tensor, v1: torch.Tensor, x2: torch.Tensor,
    v2: torch.Tensor, sched: torch.Tensor | None, vals: list[float], store: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ok, d1, d2): loss = nan_to_num(mean(d1*d2)), ok = isfinite(mean) (1/0, loss dtype);
    ``sched``/``vals``: ConsistencyCoefficients."""
    cd = C.compute_dtype(x_t, v_hat, x1, v1, x2, v2)
    N = v_hat.numel()
    empty = v_hat.new_empty(0, dtype=cd)
    if N == 0:
        return v_hat.new_zeros((), dtype=cd), v_hat.new_ones((), dtype=cd), empty, empty.clone()
    t2 = [C.flat(t) for t in (x_t, v_hat, x1, v1, x2, v2)]
    B, D = t2[0].shape
    if _use_torch(v_hat, cd):
        st, sp = C.table_columns(sched, vals, cd)
        xt, vh, a1, b1, a2, b2 = t2
        # d_i = (x_i - x_t) + st*v_hat - sp*v_i, into two new tensors (no h0: one fewer allocation, which on
        # CPU costs more than the extra pass)
        xt, vh = C.cast(xt, cd), C.cast(vh, cd)
        d1 = C.add_scaled_(C.add_scaled_(C.sub_upcast(a1, xt, cd), vh, st), C.cast(b1, cd), -sp)
        d2 = C.add_scaled_(C.add_scaled_(C.sub_upcast(a2, xt, cd), vh, st), C.cast(b2, cd), -sp)
        mean = torch.dot(d1.view(-1), d2.view(-1)) / N
        ok = torch.isfinite(mean).to(cd)
        return torch.nan_to_num(mean), ok, (d1 if store else empty), (d2 if store else empty.clone())
    chunk, S = C.chunking(D, BLOCK, MAX_CHUNKS)
    part = torch.empty(B * S, device=v_hat.device, dtype=torch.float32)
    d1 = torch.empty((B, D), dtype=torch.float32, device=v_hat.device) if store else empty
    d2 = torch.empty((B, D), dtype=torch.float32, device=v_hat.device) if store else empty.clone()
    _consistency_partials_kernel[(B * S,)](
        *t2, d1 if store else part, d2 if store else part, part, sched if sched is not None else part, *vals,
        D, chunk, S, STORE=store, PER_SAMPLE=sched is not None, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    loss, ok = _finalize(part, N, True)
    return loss, ok, d1, d2


def _consistency_bwd(
    d1: torch.Tensor, d2: torch.Tensor, ok: torch.Tensor, go: torch.Tensor, sched: torch.Tensor | None,
    vals: list[float], shape: list[int], needs: list[bool], dt_vh: torch.dtype, dt_v1: torch.dtype,
    dt_v2: torch.dtype, donate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dv_hat, dv1, dv2) in their inputs' dtypes (an empty tensor where not needed). ``donate``: d1 and d2
    are read for the last time, so dv2 and dv1 may be written over them where the dtypes agree."""
    dtypes = (dt_vh, dt_v1, dt_v2)
    over_d2 = donate and needs[1] and dt_v1 == d2.dtype  # dv1 = -c*sp*d2 written over d2
    over_d1 = donate and needs[2] and dt_v2 == d1.dtype  # dv2 = -c*sp*d1 written over d1
    need_vh, need_v1, need_v2 = needs
    none = d1.new_empty(0)
    if math.prod(shape) == 0:
        return tuple(torch.zeros(shape, dtype=dt, device=d1.device) if n else none
                     for n, dt in zip(needs, dtypes, strict=True))
    B = shape[0]
    D = math.prod(shape[1:])
    if _use_torch(d1, d1.dtype):
        st, sp = C.table_columns(sched, vals, d1.dtype)
        c = go.to(d1.dtype) / (B * D)
        # One per-sample factor per gradient: 4 passes in all. On CPU the finite flag is read
        # directly (no device to wait for); elsewhere a mask keeps NaN residuals out without a sync.
        on_cpu = d1.device.type == "cpu"
        if on_cpu and not bool(ok):
            return tuple(torch.zeros(shape, dtype=dt, device=d1.device) if n else none
                         for n, dt in zip(needs, dtypes, strict=True))
        bad = None if on_cpu else ok == 0
        outs = []
        # dv_hat first: it reads both residuals before they may be overwritten
        for need, dt, expr in ((need_vh, dtypes[0], lambda: torch.add(d1, d2).mul_(st * c)),
                               (need_v1, dtypes[1], lambda: torch.mul(d2, sp * -c, out=d2 if over_d2 else None)),
                               (need_v2, dtypes[2], lambda: torch.mul(d1, sp * -c, out=d1 if over_d1 else None))):
            if need:
                g = expr() if bad is None else expr().masked_fill_(bad, 0.0)
                outs.append(g.to(dt).view(shape))
            else:
                outs.append(none)
        return tuple(outs)
    outs = [torch.empty((B, D), dtype=dt, device=d1.device) if n else none for n, dt in zip(needs, dtypes, strict=True)]
    if over_d2:
        outs[1] = d2  # each program loads its d1, d2 before it stores: in place is safe
    if over_d1:
        outs[2] = d1
    ptrs = [o if n else d1 for o, n in zip(outs, needs, strict=True)]
    grid = (triton.cdiv(D, EW_BLOCK), B)
    _consistency_grad_kernel[grid](
        d1, d2, ok, go.reshape(1), *ptrs, sched if sched is not None else d1, *vals, D, B * D,
        NEED_VH=need_vh, NEED_V1=need_v1, NEED_V2=need_v2, PER_SAMPLE=sched is not None, BLOCK=EW_BLOCK,
        num_warps=NUM_WARPS,
    )
    return tuple(o.view(shape) if n else o for o, n in zip(outs, needs, strict=True))


def _consistency_fwd_fake(x_t, v_hat, x1, v1, x2, v2, sched, vals, store):
    cd = C.compute_dtype(x_t, v_hat, x1, v1, x2, v2)
    B, D = v_hat.shape[0], math.prod(v_hat.shape[1:])
    d = (v_hat.new_empty((B, D), dtype=cd), v_hat.new_empty((B, D), dtype=cd)) if store and B * D else (
        v_hat.new_empty(0, dtype=cd), v_hat.new_empty(0, dtype=cd))
    return v_hat.new_empty((), dtype=cd), v_hat.new_empty((), dtype=cd), *d


def _consistency_bwd_fake(d1, d2, ok, go, sched, vals, shape, needs, dt_vh, dt_v1, dt_v2, donate):
    return tuple(d1.new_empty(shape, dtype=dt) if n else d1.new_empty(0)
                 for n, dt in zip(needs, (dt_vh, dt_v1, dt_v2), strict=True))


_consistency_fwd_op = C.KernelOp("consistency_fwd", _consistency_fwd, _consistency_fwd_fake)
_consistency_bwd_op = C.KernelOp("consistency_bwd", _consistency_bwd, _consistency_bwd_fake)


class _ConsistencyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_t, v_hat, x1, v1, x2, v2, sched, vals, store):
        loss, ok, d1, d2 = _consistency_fwd_op(x_t, v_hat, x1, v1, x2, v2, sched, vals, store)
        ctx.save_for_backward(d1, d2, ok, sched)
        ctx.vals, ctx.shape = vals, list(v_hat.shape)
        ctx.dtypes = [v_hat.dtype, v1.dtype, v2.dtype]
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        d1, d2, ok, sched = ctx.saved_tensors
        if math.prod(ctx.shape) and d1.numel() == 0:
            raise RuntimeError("rtdmd_kernels: the consistency loss was computed under no_grad")
        needs = [bool(ctx.needs_input_grad[i]) for i in (1, 3, 5)]
        dvh, dv1, dv2 = _consistency_bwd_op(d1, d2, ok, grad_loss, sched, ctx.vals, ctx.shape, needs, *ctx.dtypes,
                                            C.saved_tensors_used_once())
        return (None, dvh if needs[0] else None, None, dv1 if needs[1] else None, None, dv2 if needs[2] else None,
                None, None, None)


# ---------------------------------------------------------------------------------------------
# schedule coefficients and argument checks


def _sub_interval(sigma_s, sigma_t, exact: bool) -> SubInterval:
    """The SubInterval of docs/method.md §4.1.3-4, from floats (math in double, returned as floats) or ``[B]``
    tensors (float64 math, returned in float32, float64 when ``exact`` or a sigma is float64); the same
    expressions either way."""
    (ss, st), out = C.schedule_math((sigma_s, sigma_t))
    if out is None:
        if sigma_s == 1.0:
            raise ValueError("sigma_s must be < 1 (the renoise kernel divides by 1 - sigma_s)")
        oms = 1.0 - sigma_s
        a = (1.0 - sigma_t) / oms
        sts = math.sqrt(max(sigma_t * sigma_t - (a * sigma_s) ** 2, VAR_FLOOR))
        beta = sigma_t + (1.0 - sigma_t) * (sigma_s / oms) ** 2
        return SubInterval(a, sts, sts / oms, beta)
    out = torch.float64 if exact else out
    # the float expressions above as few [B] ops as possible (each costs more than its arithmetic)
    oms, omt = torch.rsub(ss, 1.0), torch.rsub(st, 1.0)
    a = omt / oms
    sts = torch.mul(st, st).sub_(torch.mul(a, ss).square_()).clamp_(min=VAR_FLOOR).sqrt_()
    beta = torch.div(ss, oms).square_().mul_(omt).add_(st)
    return SubInterval(*torch.stack((a, sts, sts / oms, beta)).to(out))


def _weight(scale, weight_max: float):
    """w = nan_to_num(clamp(1/max(scale^2, 1e-12), 0, weight_max), nan->0, +inf->weight_max, -inf->0)."""
    if isinstance(scale, torch.Tensor):
        w = torch.clamp(torch.square(scale.double()).clamp_(min=VAR_FLOOR).reciprocal_(), 0.0, weight_max)
        return torch.nan_to_num_(w, nan=0.0, posinf=weight_max, neginf=0.0).to(scale.dtype)
    w = min(max(1.0 / max(scale**2, VAR_FLOOR), 0.0), weight_max)
    return 0.0 if math.isnan(w) else w


def _schedules(x, sigma_s, sigma_t, exact: bool):
    B, dev = x.shape[0], x.device
    return (C.schedule_value("sigma_s", sigma_s, B, dev, exact),
            C.schedule_value("sigma_t", sigma_t, B, dev, exact))


def _check_weight_max(weight_max: float) -> float:
    if isinstance(weight_max, bool) or not isinstance(weight_max, (int, float)) or not weight_max > 0:
        raise ValueError(f"weight_max must be a float > 0, got {weight_max!r}")
    return float(weight_max)


# ---------------------------------------------------------------------------------------------
# public API


def renoise(x_s: torch.Tensor, noise: torch.Tensor, sigma_s: C.Scalar, sigma_t: C.Scalar) -> torch.Tensor:
    """Forward renoise from level ``sigma_s`` to ``sigma_t`` (method.md §4.1.3, the reference's ``flow_forward_v2``).

    ``a = (1-sigma_t)/(1-sigma_s)``, ``sigma_ts = sqrt(max(sigma_t^2 - a^2*sigma_s^2, 1e-12))``,
    ``x_t = a*x_s + sigma_ts*noise`` in ``x_s.dtype`` (fp32 arithmetic). ``sigma_s``, ``sigma_t``: floats
    or ``[B]`` tensors. Differentiable in ``x_s`` (``a*g``) and ``noise`` (``sigma_ts*g``).
    """
    C.check_tensor("x_s", x_s)
    C.check_like("x_s", x_s, "noise", noise)
    exact = C.compute_dtype(x_s, noise) == torch.float64
    s_s, s_t = _schedules(x_s, sigma_s, sigma_t, exact)
    sub = _sub_interval(s_s, s_t, exact)
    sched, vals = C.pack_schedule((sub.a, sub.sigma_ts, 0.0, 0.0), x_s.shape[0], x_s.device)
    return _Renoise.apply(x_s, noise, sched, vals)


def fake_score_loss(
    v_hat: torch.Tensor,
    x_s: torch.Tensor,
    noise: torch.Tensor,
    sigma_s: C.Scalar,
    sigma_t: C.Scalar,
    *,
    weight_max: float = 10.0,
) -> torch.Tensor:
    """AC-DMD fake-score loss with the shipped ``move_scale_out=True`` target (docs/method.md §4.2, docs/kernels.md §5).

    With ``a``, ``sigma_ts`` of ``renoise`` and ``beta = sigma_t + (1-sigma_t)*sigma_s^2/(1-sigma_s)^2``:
    ``target = -(sigma_ts/(1-sigma_s))*x_s + beta*noise`` (never materialised), ``scale = sigma_ts``,
    ``w = nan_to_num(clamp(1/max(scale^2, 1e-12), 0, weight_max))`` per sample; returns
    ``mean(w*(v_hat*scale - target)^2)`` as a float32 scalar (float64 for float64 inputs; 0 for an
    empty input). Differentiable in ``v_hat`` only: ``2*w*scale*(v_hat*scale - target)/N``, made in
    the forward.
    """
    C.check_tensor("v_hat", v_hat)
    C.check_like("v_hat", v_hat, "x_s", x_s)
    C.check_like("v_hat", v_hat, "noise", noise)
    weight_max = _check_weight_max(weight_max)
    exact = C.compute_dtype(v_hat, x_s, noise) == torch.float64
    s_s, s_t = _schedules(v_hat, sigma_s, sigma_t, exact)
    sub = _sub_interval(s_s, s_t, exact)
    coefs = FakeScoreCoefficients(sub.sigma_ts, sub.cx, sub.beta, _weight(sub.sigma_ts, weight_max))
    sched, vals = C.pack_schedule(coefs, v_hat.shape[0], v_hat.device)
    store = torch.is_grad_enabled() and v_hat.requires_grad
    return _FakeScoreLoss.apply(v_hat, x_s.detach(), noise.detach(), sched, vals, store)


def consistency_loss(
    x_t: torch.Tensor,
    v_hat: torch.Tensor,
    sigma_t: C.Scalar,
    x1: torch.Tensor,
    v1: torch.Tensor,
    x2: torch.Tensor,
    v2: torch.Tensor,
    sigma_p: C.Scalar,
) -> torch.Tensor:
    """Consistency regularizer of the fake score (docs/method.md §4.2, docs/kernels.md §5).

    ``h0 = x_t - sigma_t*v_hat``, ``h1 = x1 - sigma_p*v1``, ``h2 = x2 - sigma_p*v2``; returns
    ``nan_to_num(mean((h1-h0)*(h2-h0)))`` as a float32 scalar (may be negative; NaN -> 0, +-inf -> +-the
    largest float32; 0 for an empty input). Differentiable in ``v_hat``, ``v1`` and ``v2``
    (``sigma_t*(d1+d2)/N``, ``-sigma_p*d2/N``, ``-sigma_p*d1/N``); where the mean is not finite every
    gradient is 0, as torch's ``nan_to_num`` backward gives. ``sigma_t``, ``sigma_p``: floats or ``[B]``.
    """
    C.check_tensor("x_t", x_t)
    for name, t in (("v_hat", v_hat), ("x1", x1), ("v1", v1), ("x2", x2), ("v2", v2)):
        C.check_like("x_t", x_t, name, t)
    B, dev = x_t.shape[0], x_t.device
    exact = C.compute_dtype(x_t, v_hat, x1, v1, x2, v2) == torch.float64
    s_t = C.schedule_value("sigma_t", sigma_t, B, dev, exact)
    s_p = C.schedule_value("sigma_p", sigma_p, B, dev, exact)
    sched, vals = C.pack_schedule(ConsistencyCoefficients(s_t, s_p), B, dev)
    store = torch.is_grad_enabled() and any(t.requires_grad for t in (v_hat, v1, v2))
    return _ConsistencyLoss.apply(x_t.detach(), v_hat, x1.detach(), v1, x2.detach(), v2, sched, vals, store)
