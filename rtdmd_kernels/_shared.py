"""Pieces more than one op is made of: the gradient-scale backward, the affine backward and the CPS transition.

  scale_grad     dx = grad_out * g / N for a gradient g made in the forward: the backward of dmd_loss,
                 ac_dmd_loss and fake_score_loss. Reads g, writes dx (4 R + 4 W per element in fp32); written
                 over g when the backward is its last use (scale_saved_grad).
  affine_grad    dx = a*g, dv = k*g with g the sum of up to two incoming gradients and (a, k) per sample:
                 the backward of every map ``a*x + k*v (+ c*noise)`` (cps_step, renoise).
  cps_coefficients / cps_transition
                 the CPS step from sigma to sigma_next as ``a*x + k*v + c*noise`` (docs/method.md §2.1), as
                 torch/float math for the schedule tables and as a ``@triton.jit`` helper for kernels that form
                 it in registers (ac_dmd_loss). One formula, written the same way in both.
Each launcher is registered as a custom op (``rtdmd_kernels::scale_grad``, ``::affine_grad``) and called through
it under torch.compile (``_common.KernelOp``).
"""

from __future__ import annotations

import torch

from . import _common as C
from ._backend import backend_for, triton_available

__all__ = ["scale_grad", "scale_saved_grad", "affine_grad", "cps_coefficients"]

SCALE_BLOCK = 4096  # elements per program of the gradient-scale kernel
EW_BLOCK = 2048  # elements per program of the affine backward
NUM_WARPS = 4

if triton_available():
    import triton
    import triton.language as tl

    from ._triton_utils import per_sample_value, sample_block, to_element

    @triton.jit
    def cps_transition(sigma, sigma_next, cos_eta, sin_eta):
        # (a, k, c) of the CPS step sigma -> sigma_next: mean = a*x + k*v, x_next = mean + c*noise.
        # Written as cps_coefficients below: a is exactly 1 and k exactly sigma_next - sigma at eta = 0.
        omc = 1.0 - cos_eta
        a = 1.0 - sigma_next * omc
        k = (sigma_next - sigma) - sigma_next * omc * (1.0 - sigma)
        return a, k, sigma_next * sin_eta

    @triton.jit
    def _scale_grad_kernel(g_ptr, go_ptr, dx_ptr, numel, BLOCK: tl.constexpr):
        # dx = grad_out * g / N: read g once, write dx once.
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        scale = tl.load(go_ptr).to(tl.float32) / numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, to_element(g * scale, dx_ptr), mask=mask)

    @triton.jit
    def _affine_grad_kernel(
        g1_ptr, g2_ptr, dx_ptr, dv_ptr, sched_ptr, a, k, D,
        HAS_G1: tl.constexpr, HAS_G2: tl.constexpr, NEED_DX: tl.constexpr, NEED_DV: tl.constexpr,
        PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # g = g1 + g2 (outputs that share their Jacobians); dx = a*g, dv = k*g. Table columns: a, k, -, -.
        b, offs, mask = sample_block(D, BLOCK)
        g = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_G1:
            g += tl.load(g1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_G2:
            g += tl.load(g2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if NEED_DX:
            a = per_sample_value(sched_ptr, b, 0, 4, a, PER_SAMPLE)
            tl.store(dx_ptr + offs, to_element(a * g, dx_ptr), mask=mask)
        if NEED_DV:
            k = per_sample_value(sched_ptr, b, 1, 4, k, PER_SAMPLE)
            tl.store(dv_ptr + offs, to_element(k * g, dv_ptr), mask=mask)


def cps_coefficients(sigma: C.Scalar, sigma_next: C.Scalar, cos_eta: C.Scalar, sin_eta: C.Scalar):
    """``(a, k, c)`` of the CPS step ``sigma -> sigma_next`` (floats or tensors, in their own precision):
    ``mean = a*x + k*v = (1-sn)(x - s*v) + sn*cos*(x + (1-s)*v)``, ``x_next = mean + c*noise``, ``c = sn*sin``.
    The kernels' ``cps_transition`` is the same expression."""
    omc = 1.0 - cos_eta
    a = 1.0 - sigma_next * omc  # exactly 1 at eta = 0
    k = (sigma_next - sigma) - sigma_next * omc * (1.0 - sigma)  # exactly sn - s at eta = 0
    return a, k, sigma_next * sin_eta


# ---------------------------------------------------------------------------------------------
# gradient-scale backward


def _scale_grad_into(g: torch.Tensor, grad_loss: torch.Tensor, numel: int, dx: torch.Tensor) -> torch.Tensor:
    """dx = grad_out * g / N in g's dtype (g holds x's dtype); ``dx`` may be ``g`` itself."""
    if backend_for(g) == "torch":
        scale = grad_loss.to(torch.float64 if g.dtype == torch.float64 else torch.float32) / numel
        if g.dtype in (torch.float32, torch.float64):
            return torch.mul(g, scale, out=dx)
        return dx.copy_(g.float() * scale)  # keep the scale out of fp16's subnormal range
    grid = (triton.cdiv(g.numel(), SCALE_BLOCK),)
    _scale_grad_kernel[grid](g, grad_loss.reshape(1), dx, numel, BLOCK=SCALE_BLOCK, num_warps=8)
    return dx


def _scale_grad(g: torch.Tensor, grad_loss: torch.Tensor, numel: int) -> torch.Tensor:
    """dL/dx = grad_out * g / N in g's dtype, in a new tensor."""
    if g.numel() == 0:
        return torch.zeros_like(g)
    return _scale_grad_into(g, grad_loss, numel, torch.empty_like(g))


scale_grad = C.KernelOp("scale_grad", _scale_grad, lambda g, grad_loss, numel: torch.empty_like(g))


def scale_saved_grad(g: torch.Tensor, grad_loss: torch.Tensor, numel: int) -> torch.Tensor:
    """``scale_grad`` of a g that only the calling backward holds (saved by its forward, never returned): when
    this backward is its last use (``C.saved_tensors_used_once``) dx is written over g, saving the allocation
    of a gradient-sized tensor (on CPU a fresh one page-faults on first touch and costs more than the
    multiply). Not on the torch path in float16/bfloat16, whose multiply goes through a float32 copy anyway."""
    in_place = g.numel() > 0 and C.saved_tensors_used_once() and (
        g.dtype in (torch.float32, torch.float64) or backend_for(g) != "torch")
    return _scale_grad_into(g, grad_loss, numel, g) if in_place else scale_grad(g, grad_loss, numel)


# ---------------------------------------------------------------------------------------------
# affine backward


def _affine_grad(
    g1: torch.Tensor | None, g2: torch.Tensor | None, sched: torch.Tensor | None, vals: list[float],
    need_x: bool, need_v: bool, v_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dv)`` = ``(a*g, k*g)``, ``g = g1 + g2`` (either may be None); dx in the gradients' dtype, dv in
    ``v_dtype``; an empty tensor for a gradient not asked for. ``sched``: ``[B, 4]`` table whose first two
    columns are a and k, or None with ``vals[:2]``."""
    like = g1 if g1 is not None else g2
    shape = like.shape
    none = like.new_empty(0)
    if like.numel() == 0 or not (need_x or need_v):
        return (torch.zeros_like(like) if need_x else none), (torch.zeros_like(like, dtype=v_dtype) if need_v else none)
    cd = C.compute_dtype(g1, g2)
    f1 = C.flat(g1) if g1 is not None else None
    f2 = C.flat(g2) if g2 is not None else None
    B, D = (f1 if f1 is not None else f2).shape
    if cd == torch.float64 or backend_for(like) == "torch":
        a, k = C.table_columns(sched, vals, cd)[:2]
        g = C.cast(f1, cd) if f1 is not None else None
        g = C.cast(f2, cd) if g is None else (g + f2 if f2 is not None else g)
        dx = (g * a).to(like.dtype).view(shape) if need_x else none
        dv = (g * k).to(v_dtype).view(shape) if need_v else none
        return dx, dv
    dx = torch.empty((B, D), dtype=like.dtype, device=like.device) if need_x else none
    dv = torch.empty((B, D), dtype=v_dtype, device=like.device) if need_v else none
    first = f1 if f1 is not None else f2
    grid = (triton.cdiv(D, EW_BLOCK), B)
    _affine_grad_kernel[grid](
        first, f2 if f2 is not None else first, dx if need_x else first, dv if need_v else first,
        sched if sched is not None else first, *vals[:2], D,
        HAS_G1=f1 is not None, HAS_G2=f2 is not None, NEED_DX=need_x, NEED_DV=need_v,
        PER_SAMPLE=sched is not None, BLOCK=EW_BLOCK, num_warps=NUM_WARPS,
    )
    return (dx.view(shape) if need_x else none), (dv.view(shape) if need_v else none)


def _affine_grad_fake(g1, g2, sched, vals, need_x, need_v, v_dtype):
    like = g1 if g1 is not None else g2
    return (torch.empty_like(like, memory_format=torch.contiguous_format) if need_x else like.new_empty(0),
            torch.empty_like(like, dtype=v_dtype, memory_format=torch.contiguous_format) if need_v
            else like.new_empty(0))


affine_grad = C.KernelOp("affine_grad", _affine_grad, _affine_grad_fake)
