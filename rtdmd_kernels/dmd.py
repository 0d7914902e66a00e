"""DMD and AC-DMD generator losses (docs/method.md §3, §4.3): Triton kernels, a torch path, autograd, custom ops.

What moves per element (fp32 inputs; bf16/fp16 halve the input bytes):
  dmd_loss     pass A reads x, x_real            -> per-chunk partial sums of |x - x_real|   8 B
               pass B reads x_fake, x_real        -> writes g (x.dtype), partial sums of g^2  12 B
               backward reads g                   -> writes dx                               8 B
  ac_dmd_loss  pass A reads x_s, x_t, v_real, [v_real_uncond], noise -> |x_s - xs_real|  16-20 B
               pass B reads v_fake, v_real, [v_real_uncond]          -> g, g^2           12-16 B
Why fused this way: the per-sample normalizer needs a full reduction before any g can be formed,
so two passes are the minimum without a grid-wide barrier. Pass B forms g = x_fake - x_real
directly (the reference's (x - x_real) - (x - x_fake) is the same up to rounding, and this needs
no read of x); for AC-DMD the two CPS transitions share their noise, so
xs_fake - xs_real = k(sigma_s, sigma_t, eta) * (v_fake - v_teacher) and pass B never reads x_t or the
noise. Neither xs_real nor xs_fake is ever materialised. The gradient dL/dx = grad_out * g / N is
made in the forward; backward only scales it (``_shared.scale_saved_grad``). Partial sums are per
(sample, chunk) and reduced in a fixed order, so results are deterministic and do not depend on the
launch grid's scheduling.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _common as C
from ._backend import backend_for, triton_available
from ._shared import cps_coefficients, scale_saved_grad

__all__ = ["dmd_loss", "ac_dmd_loss"]

NORMALIZE_MODES = ("per_sample", "global", "none")
_NORM_CODE = {"per_sample": 0, "global": 1, "none": 2}

BLOCK = 1024  # elements per inner iteration of a program
NUM_WARPS = 4
MAX_CHUNKS = 128  # chunks per sample: enough programs to fill a GPU at B = 8 and 512 px
FINAL_BLOCK = 1024

if triton_available():
    import triton
    import triton.language as tl

    from ._shared import cps_transition
    from ._triton_utils import chunk_coords, chunk_offsets, chunk_program, per_sample_value, stream_f32, to_element

    @triton.jit
    def _transition(sched_ptr, b, s_s, s_t, gs, c_eta, s_eta, PER_SAMPLE: tl.constexpr):
        # CPS transition (x_t, sigma_t) -> sigma_s as a*x_t + k*v + c*noise (docs/method.md §2.1); also the CFG scale.
        # Table columns: the Transition fields.
        a, k, c = cps_transition(per_sample_value(sched_ptr, b, 1, 5, s_t, PER_SAMPLE),
                                 per_sample_value(sched_ptr, b, 0, 5, s_s, PER_SAMPLE),
                                 per_sample_value(sched_ptr, b, 3, 5, c_eta, PER_SAMPLE),
                                 per_sample_value(sched_ptr, b, 4, 5, s_eta, PER_SAMPLE))
        return a, k, c, per_sample_value(sched_ptr, b, 2, 5, gs, PER_SAMPLE)

    @triton.jit
    def _teacher_velocity(v_ptr, vu_ptr, offs, mask, gs, HAS_UNCOND: tl.constexpr, POLICY: tl.constexpr):
        # CFG combine in fp32: v_u + s * (v_c - v_u), or v_c alone.
        v = tl.load(v_ptr + offs, mask=mask, other=0.0, eviction_policy=POLICY).to(tl.float32)
        if HAS_UNCOND:
            vu = tl.load(vu_ptr + offs, mask=mask, other=0.0, eviction_policy=POLICY).to(tl.float32)
            v = vu + gs * (v - vu)
        return v

    @triton.jit
    def _normalizer_partials_kernel(
        x_ptr, r_ptr, v_ptr, vu_ptr, noise_ptr, part_ptr, sched_ptr,
        s_s, s_t, gs, c_eta, s_eta,
        D, CHUNK, S,
        AC: tl.constexpr, HAS_UNCOND: tl.constexpr, PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # Pass A: part[b, s] = sum over chunk s of sample b of |x - x_real| (x_real = xs_real for AC).
        pid, b, base, start = chunk_program(S, D, CHUNK)
        if AC:
            a, k, c, g_s = _transition(sched_ptr, b, s_s, s_t, gs, c_eta, s_eta, PER_SAMPLE)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, CHUNK, BLOCK):
            offs, mask = chunk_offsets(base, start, i, D, BLOCK)
            x = stream_f32(x_ptr, offs, mask)
            if AC:
                xt = stream_f32(r_ptr, offs, mask)
                v = _teacher_velocity(v_ptr, vu_ptr, offs, mask, g_s, HAS_UNCOND, "evict_last")
                nz = stream_f32(noise_ptr, offs, mask)
                real = a * xt + k * v + c * nz
            else:
                real = tl.load(r_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
            acc += tl.abs(x - real)
        tl.store(part_ptr + pid, tl.sum(acc, axis=0))

    @triton.jit
    def _grad_kernel(
        f_ptr, r_ptr, vu_ptr, g_ptr, part_ptr, norm_ptr, sq_ptr, sched_ptr,
        s_s, s_t, gs, c_eta, s_eta,
        D, CHUNK, S, count, eps, gmax,
        AC: tl.constexpr, HAS_UNCOND: tl.constexpr, PER_SAMPLE: tl.constexpr,
        NORM: tl.constexpr, S_BLOCK: tl.constexpr, STORE_G: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # Pass B: n_b from the partials, g = nan_to_num((x_fake - x_real) / n_b) clamped to the
        # finite range of x's dtype, stored; sq[b, s] = sum of g^2 over the chunk.
        # Samples run last-to-first: the x_real-side data pass A touched last is still in L2.
        pid = tl.num_programs(0) - 1 - tl.program_id(0)
        b, base, start = chunk_coords(pid, S, D, CHUNK)
        if NORM == 0:
            idx = tl.arange(0, S_BLOCK)
            p = tl.load(part_ptr + b * S + idx, mask=idx < S, other=0.0)
            n = tl.sum(p, axis=0) / count + eps
        elif NORM == 1:
            n = tl.load(part_ptr) / count + eps
        else:
            n = 1.0 + eps
        if AC:
            # xs_fake - xs_real = k * (v_fake - v_teacher): the shared noise and x_t cancel.
            _a, k, _c, g_s = _transition(sched_ptr, b, s_s, s_t, gs, c_eta, s_eta, PER_SAMPLE)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, CHUNK, BLOCK):
            offs, mask = chunk_offsets(base, start, i, D, BLOCK)
            f = stream_f32(f_ptr, offs, mask)
            if AC:
                v = _teacher_velocity(r_ptr, vu_ptr, offs, mask, g_s, HAS_UNCOND, "evict_first")
                diff = k * (f - v)
            else:
                r = stream_f32(r_ptr, offs, mask)
                diff = f - r
            g = diff / n
            g = tl.where(g != g, 0.0, g)
            g = tl.minimum(tl.maximum(g, -gmax), gmax)
            g = tl.where(mask, g, 0.0)
            if STORE_G:
                tl.store(g_ptr + offs, to_element(g, g_ptr), mask=mask)
            acc += g * g
        tl.store(sq_ptr + pid, tl.sum(acc, axis=0))
        if start == 0:  # one program per sample records its normalizer
            tl.store(norm_ptr + b, n)

    @triton.jit
    def _finalize_kernel(sq_ptr, n_part, loss_ptr, gnorm_ptr, numel, BLOCK: tl.constexpr):
        # loss = 0.5 * sum(g^2) / N and ||g||_2, reduced in a fixed order (deterministic).
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, n_part, BLOCK):
            idx = i + tl.arange(0, BLOCK)
            acc += tl.load(sq_ptr + idx, mask=idx < n_part, other=0.0)
        total = tl.sum(acc, axis=0)
        tl.store(loss_ptr, 0.5 * (total / numel))
        tl.store(gnorm_ptr, tl.sqrt(total))


def _triton_forward(x, reals, fakes, sched, vals, ac, has_uncond, normalize, eps, store_grad):
    """Launch passes A and B and the finalizer. ``reals``: pass-A operands, ``fakes``: pass-B operands."""
    B, D = x.shape
    dev = x.device
    chunk, S = C.chunking(D, BLOCK, MAX_CHUNKS)
    part = torch.empty(B * S, device=dev, dtype=torch.float32)
    sq = torch.empty(B * S, device=dev, dtype=torch.float32)
    normalizer = torch.empty(B, device=dev, dtype=torch.float32)
    loss = torch.empty((), device=dev, dtype=torch.float32)
    grad_norm = torch.empty((), device=dev, dtype=torch.float32)
    g = torch.empty_like(x) if store_grad else x  # x is a placeholder pointer when g is not stored
    sched_ptr = sched if sched is not None else part  # placeholder pointer when all are scalars
    per_sample = sched is not None
    grid = (B * S,)
    _normalizer_partials_kernel[grid](
        x, *reals, part, sched_ptr, *vals, D, chunk, S,
        AC=ac, HAS_UNCOND=has_uncond, PER_SAMPLE=per_sample, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    norm = _NORM_CODE[normalize]
    if norm == 1:
        part = part.sum().reshape(1)  # fixed-order torch reduction: deterministic
    count = float(B * D) if norm == 1 else float(D)
    gmax = torch.finfo(x.dtype).max
    _grad_kernel[grid](
        *fakes, g, part, normalizer, sq, sched_ptr, *vals, D, chunk, S, count, eps, gmax,
        AC=ac, HAS_UNCOND=has_uncond, PER_SAMPLE=per_sample, NORM=norm,
        S_BLOCK=triton.next_power_of_2(S), STORE_G=store_grad, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    _finalize_kernel[(1,)](sq, B * S, loss, grad_norm, B * D, BLOCK=FINAL_BLOCK, num_warps=NUM_WARPS)
    return loss, (g if store_grad else x.new_empty(0)), normalizer, grad_norm


def _torch_tail(abs_sum, diff, normalize, eps, store_grad, out_dtype):
    """Torch path once the elementwise inputs are formed, in the compute dtype.

    ``abs_sum``: per-sample sum of |x - x_real| (``[B]``, None for ``"none"``); ``diff``:
    x_fake - x_real ``[B, D]``, owned (turned into g in place).
    """
    B, D = diff.shape
    cd = diff.dtype
    if normalize == "none":
        n = torch.full((B,), 1.0 + eps, dtype=cd, device=diff.device)
    elif normalize == "per_sample":
        n = abs_sum / D + eps
    else:
        n = (abs_sum.sum() / (B * D) + eps).expand(B).contiguous()
    g = diff.div_(n.unsqueeze(1))
    g_flat = g.view(-1)
    total = torch.dot(g_flat, g_flat)
    gmax = torch.finfo(out_dtype).max
    # On CPU, reading the total back costs nothing (no device to wait for): when sum(g^2) is finite and at most
    # gmax^2, every g is finite and within x.dtype's range, so the nan_to_num/clamp pass is a no-op. (For float64
    # gmax^2 overflows to inf, so finiteness must be asked for on its own: inf <= inf.)
    t = float(total)
    if g.device.type != "cpu" or not (math.isfinite(t) and t <= gmax * gmax):
        torch.nan_to_num_(g, nan=0.0, posinf=gmax, neginf=-gmax)
        if out_dtype != cd:
            g.clamp_(-gmax, gmax)  # values beyond x's dtype saturate, as the reference's nan_to_num in x.dtype
        total = torch.dot(g_flat, g_flat)
    loss = 0.5 * (total / (B * D))
    g_out = g.to(out_dtype) if store_grad else diff.new_empty(0, dtype=out_dtype)
    return loss, g_out, n, total.sqrt()


def _empty_forward(x, cd, normalize, eps):
    """N == 0 (empty batch or no elements per sample): loss 0, no gradient to make."""
    B = x.shape[0]
    n = torch.full((B,), math.nan if normalize != "none" else 1.0 + eps, dtype=cd, device=x.device)
    zero = torch.zeros((), dtype=cd, device=x.device)
    return zero, torch.empty_like(x), n, zero.clone()


_Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class Transition(NamedTuple):
    """Per-sample schedule of ac_dmd_loss, the columns of its ``[B, 5]`` table in this order."""

    sigma_s: C.Scalar
    sigma_t: C.Scalar
    guidance_scale: C.Scalar
    cos_eta: C.Scalar
    sin_eta: C.Scalar


# ---------------------------------------------------------------------------------------------
# launchers (the torch path inside), each registered once as a custom op


def _dmd_fwd(
    x: torch.Tensor, x_fake: torch.Tensor, x_real: torch.Tensor, normalize: str, eps: float, store_grad: bool
) -> _Outputs:
    """(loss, g, normalizer [B], ||g||): g = dL/dx * N in x's dtype, empty unless ``store_grad``."""
    shape = x.shape
    cd = C.compute_dtype(x, x_fake, x_real)
    if x.numel() == 0:
        return _empty_forward(x, cd, normalize, eps)
    x2, f2, r2 = C.flat(x), C.flat(x_fake), C.flat(x_real)
    if backend_for(x) == "torch" or cd == torch.float64:
        abs_sum, buf = None, None
        if normalize != "none":
            buf = C.sub_upcast(x2, r2, cd)
            abs_sum = buf.abs_().sum(dim=1)
        diff = C.sub_upcast(f2, r2, cd, out=buf)  # reuses the residual's memory
        loss, g, n, gn = _torch_tail(abs_sum, diff, normalize, eps, store_grad, x.dtype)
    else:
        loss, g, n, gn = _triton_forward(
            x2, (r2, r2, r2, r2), (f2, r2, r2), None, [0.0] * 5, False, False, normalize, eps, store_grad
        )
    return loss, g.view(shape) if store_grad else g, n, gn


def _ac_dmd_fwd(
    x_s: torch.Tensor, x_t: torch.Tensor, v_real: torch.Tensor, v_fake: torch.Tensor, noise: torch.Tensor,
    v_real_uncond: torch.Tensor | None, sched: torch.Tensor | None, sched_vals: list[float],
    normalize: str, eps: float, store_grad: bool,
) -> _Outputs:
    """As ``_dmd_fwd`` with x_fake, x_real the two CPS transitions; ``sched``/``sched_vals``: a Transition."""
    shape = x_s.shape
    cd = C.compute_dtype(x_s, x_t, v_real, v_fake, noise, v_real_uncond)
    if x_s.numel() == 0:
        return _empty_forward(x_s, cd, normalize, eps)
    xs2, xt2, vr2, vf2, nz2 = (C.flat(t) for t in (x_s, x_t, v_real, v_fake, noise))
    vu2 = C.flat(v_real_uncond) if v_real_uncond is not None else None
    if backend_for(x_s) == "torch" or cd == torch.float64:
        tr = Transition(*C.table_columns(sched, sched_vals, cd))
        a, k, c = cps_coefficients(tr.sigma_t, tr.sigma_s, tr.cos_eta, tr.sin_eta)
        vr = C.cast(vr2, cd)
        v = vr if vu2 is None else torch.lerp(C.cast(vu2, cd), vr, tr.guidance_scale)  # CFG combine
        abs_sum, buf = None, None
        if normalize != "none":
            buf = C.cast(xt2, cd) * (-a)  # x_s - xs_real
            C.add_scaled_(C.add_scaled_(buf, v, -k), C.cast(nz2, cd), -c).add_(C.cast(xs2, cd))
            abs_sum = buf.abs_().sum(dim=1)
        diff = torch.sub(C.cast(vf2, cd), v, out=buf).mul_(k)  # xs_fake - xs_real: the noise cancels
        loss, g, n, gn = _torch_tail(abs_sum, diff, normalize, eps, store_grad, x_s.dtype)
    else:
        vu_ptr = vu2 if vu2 is not None else vr2
        loss, g, n, gn = _triton_forward(
            xs2, (xt2, vr2, vu_ptr, nz2), (vf2, vr2, vu_ptr), sched, sched_vals,
            True, vu2 is not None, normalize, eps, store_grad,
        )
    return loss, g.view(shape) if store_grad else g, n, gn


def _fake_outputs(x: torch.Tensor, cd: torch.dtype, store_grad: bool) -> _Outputs:
    g = torch.empty_like(x, memory_format=torch.contiguous_format) if store_grad else x.new_empty(0)
    return x.new_empty((), dtype=cd), g, x.new_empty((x.shape[0],), dtype=cd), x.new_empty((), dtype=cd)


_dmd_fwd_op = C.KernelOp("dmd_fwd", _dmd_fwd, lambda x, x_fake, x_real, normalize, eps, store_grad: _fake_outputs(
    x, C.compute_dtype(x, x_fake, x_real), store_grad))
_ac_dmd_fwd_op = C.KernelOp(
    "ac_dmd_fwd", _ac_dmd_fwd,
    lambda x_s, x_t, v_real, v_fake, noise, v_real_uncond, sched, sched_vals, normalize, eps, store_grad:
    _fake_outputs(x_s, C.compute_dtype(x_s, x_t, v_real, v_fake, noise, v_real_uncond), store_grad))


# ---------------------------------------------------------------------------------------------
# autograd: the forward makes g, the backward scales it (eager and under torch.compile alike)


def _keep_grad(ctx, x, outputs):
    """Save g for the backward; the statistics are constants. Returns (loss, normalizer, grad_norm)."""
    loss, g, normalizer, grad_norm = outputs
    ctx.mark_non_differentiable(normalizer, grad_norm)
    ctx.numel = x.numel()
    ctx.save_for_backward(g)
    return loss, normalizer, grad_norm


def _scaled(ctx, grad_loss):
    (g,) = ctx.saved_tensors
    if g.numel() != ctx.numel:  # forward ran without grad enabled for x
        raise RuntimeError("rtdmd_kernels: the loss was computed with x.requires_grad=False or under no_grad")
    return scale_saved_grad(g, grad_loss, ctx.numel)


class _DMDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_fake, x_real, normalize, eps, store_grad):
        return _keep_grad(ctx, x, _dmd_fwd_op(x, x_fake, x_real, normalize, eps, store_grad))

    @staticmethod
    def backward(ctx, grad_loss, _grad_normalizer, _grad_norm):
        return _scaled(ctx, grad_loss), None, None, None, None, None


class _ACDMDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_s, x_t, v_real, v_fake, noise, v_real_uncond, sched, sched_vals, normalize, eps, store_grad):
        return _keep_grad(ctx, x_s, _ac_dmd_fwd_op(x_s, x_t, v_real, v_fake, noise, v_real_uncond, sched, sched_vals,
                                               normalize, eps, store_grad))

    @staticmethod
    def backward(ctx, grad_loss, _grad_normalizer, _grad_norm):
        return (_scaled(ctx, grad_loss),) + (None,) * 10


def _result(outputs, return_stats):
    loss, normalizer, grad_norm = outputs
    if return_stats:
        return loss, {"grad_norm": grad_norm, "normalizer": normalizer}
    return loss


# ---------------------------------------------------------------------------------------------
# public API


def dmd_loss(
    x: torch.Tensor,
    x_fake: torch.Tensor,
    x_real: torch.Tensor,
    *,
    normalize: str = "per_sample",
    eps: float = 0.0,
    return_stats: bool = False,
):
    """DMD generator loss with the gradient made in the forward (docs/method.md §3, docs/kernels.md §2).

    ``g = nan_to_num((x_fake - x_real) / n)`` with ``n = mean|x - x_real| + eps`` per sample
    (``"per_sample"``: DMD2, RTDMD), over the batch (``"global"``: FastVideo) or ``1 + eps``
    (``"none"``); NaN -> 0, values beyond ``x.dtype``'s finite range saturate at its max (the
    reference's ``nan_to_num`` in ``x.dtype``). Returns ``0.5 * mean(g**2)`` (float32; float64 for
    float64 inputs), the value of the reference's ``0.5*mean((x - sg(x - g))**2)``; the gradient is
    ``grad_out * g / x.numel()`` in ``x.dtype``. Only ``x`` is differentiable. With
    ``return_stats=True`` also returns ``{"grad_norm": ||g||_2, "normalizer": n [B]}`` as tensors.
    An empty input gives loss 0.
    """
    C.check_tensor("x", x)
    C.check_like("x", x, "x_fake", x_fake)
    C.check_like("x", x, "x_real", x_real)
    C.check_choice("normalize", normalize, NORMALIZE_MODES)
    eps = C.check_eps(eps)
    store = torch.is_grad_enabled() and x.requires_grad
    return _result(_DMDLoss.apply(x, x_fake.detach(), x_real.detach(), normalize, eps, store), return_stats)


def ac_dmd_loss(
    x_s: torch.Tensor,
    x_t: torch.Tensor,
    v_real: torch.Tensor,
    v_fake: torch.Tensor,
    noise: torch.Tensor,
    sigma_s: C.Scalar,
    sigma_t: C.Scalar,
    *,
    v_real_uncond: torch.Tensor | None = None,
    guidance_scale: C.Scalar = 1.0,
    eta: C.Scalar = 0.9,
    normalize: str = "per_sample",
    eps: float = 0.0,
    return_stats: bool = False,
):
    """AC-DMD generator loss, fused (docs/method.md §4.3, docs/kernels.md §2).

    Teacher velocity ``v_r = v_real_uncond + guidance_scale * (v_real - v_real_uncond)`` (or
    ``v_real``); CPS transitions from ``(x_t, sigma_t)`` back to ``sigma_s`` with ``v_r`` and with
    ``v_fake``, sharing ``noise``; then exactly ``dmd_loss(x_s, xs_fake, xs_real)``. Neither
    transition is materialised. ``sigma_s``, ``sigma_t``, ``guidance_scale`` and ``eta`` are floats
    or ``[B]`` tensors. Only ``x_s`` is differentiable.
    """
    C.check_tensor("x_s", x_s)
    for name, t in (("x_t", x_t), ("v_real", v_real), ("v_fake", v_fake), ("noise", noise)):
        C.check_like("x_s", x_s, name, t)
    if v_real_uncond is not None:
        C.check_like("x_s", x_s, "v_real_uncond", v_real_uncond)
    C.check_choice("normalize", normalize, NORMALIZE_MODES)
    eps = C.check_eps(eps)
    B, dev = x_s.shape[0], x_s.device
    exact = C.compute_dtype(x_s, x_t, v_real, v_fake, noise, v_real_uncond) == torch.float64
    s_s = C.schedule_value("sigma_s", sigma_s, B, dev, exact)
    s_t = C.schedule_value("sigma_t", sigma_t, B, dev, exact)
    gs = C.schedule_value("guidance_scale", guidance_scale, B, dev, exact)
    et = C.schedule_value("eta", eta, B, dev, exact)
    sched, vals = C.pack_schedule(Transition(s_s, s_t, gs, *C.eta_cos_sin(et)), B, dev)
    store = torch.is_grad_enabled() and x_s.requires_grad
    detached = [t.detach() for t in (x_t, v_real, v_fake, noise)]
    uncond = v_real_uncond.detach() if v_real_uncond is not None else None
    outputs = _ACDMDLoss.apply(x_s, *detached, uncond, sched, vals, normalize, eps, store)
    return _result(outputs, return_stats)
