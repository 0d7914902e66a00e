"""Tests of the fused DMD / AC-DMD generator losses (docs/kernels.md §2, docs/method.md §3 and §4.3).

The oracle is ``rtdmd_kernels.reference`` evaluated in float64. Tolerances follow docs/kernels.md §8
(flash-attn style): for every compared quantity,

    max|ours - oracle| <= 2 * max|reference_in_the_same_low_precision - oracle| + atol,

with ``atol`` relative to ``max|oracle|``. Loss, normalizer and grad_norm are computed in float32
whatever the input dtype (docs/kernels.md §1 "All arithmetic is float32 inside"), so on top of that rule they
must match the oracle to float32 accuracy; only the gradient, stored in ``x.dtype``, gets a
dtype-scaled atol.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import rtdmd_kernels as rk
from rtdmd_kernels import _backend
from rtdmd_kernels import reference as ref

LOW_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MODES = ["per_sample", "global", "none"]
DMD_SHAPES = [(3, 5, 7, 9), (2, 1000), (4, 16, 8, 8), (1, 3)]
AC_SHAPES = [(3, 5, 7, 9), (4, 16, 8, 8), (2, 1000)]

# float32-internal quantities (loss, normalizer, grad_norm): inputs are upcast exactly and the sums
# run in fp32, so 1e-5 relative is ~100 fp32 ulps -- room for the summation order of <= 16K terms.
FP32_RTOL = 1e-5
# Gradient atol relative to max|oracle grad|: the gradient is g rounded to x.dtype, then scaled by
# grad_out / N and rounded again, i.e. at most ~1 ulp of x.dtype per element with round-to-nearest.
#   fp32: eps = 1.2e-7 -> 1e-5 leaves room for the fp32 sums inside the normalizer.
#   bf16: eps = 7.8e-3; the Triton interpreter truncates on the fp32 -> bf16 store (up to 1 ulp per
#         rounding, 2 roundings) -> 2e-2 (~2.5 ulps).
#   fp16: eps = 9.8e-4, round-to-nearest on both backends -> 2e-3 (~2 ulps).
GRAD_ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-12}
# ulps allowed when comparing two gradients of the same dtype (e.g. grad_out scaling, saturation).
ULPS = {"torch": 2.0, "triton": 3.0}

TRITON_OK = _backend.triton_available() and (torch.cuda.is_available() or _backend.interpreter_enabled())
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="triton cannot run here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# helpers


def _randn(shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(shape, device=device) * scale).to(dtype)


def _dmd_inputs(shape, dtype, device):
    """Fresh random x, x_fake, x_real (fake and real are close, as real DMD predictions are)."""
    x = _randn(shape, dtype, device)
    x_real = _randn(shape, dtype, device)
    x_fake = (x_real.float() + _randn(shape, torch.float32, device, 0.3)).to(dtype)
    return x, x_fake, x_real


def _run(fn, x, *args, grad_out=None, **kwargs):
    """Call ``fn(x, *args, return_stats=True)`` on a fresh leaf copy of x; return loss, dx, stats."""
    x = x.detach().clone().requires_grad_(True)
    loss, stats = fn(x, *args, return_stats=True, **kwargs)
    go = None if grad_out is None else torch.as_tensor(grad_out, dtype=loss.dtype, device=loss.device)
    (dx,) = torch.autograd.grad(loss, x, grad_outputs=go)
    return loss, dx, stats


def _f64(t):
    return t.double() if isinstance(t, torch.Tensor) else t


def _err(a, b):
    a, b = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()
    return (a - b).abs().max().item() if a.numel() else 0.0


def _amax(t):
    t = torch.as_tensor(t).double()
    return t.abs().max().item() if t.numel() else 0.0


def assert_rule(name, ours, oracle, lowp, atol_rel, strict_rel=None):
    """The rule of docs/kernels.md §8: err(ours) <= 2 * err(reference in low precision) + atol_rel * max|oracle|.

    ``strict_rel``: also require err(ours) <= strict_rel * max|oracle| (fp32-internal quantities).
    """
    assert ours.shape == oracle.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(oracle.shape)}"
    scale = max(_amax(oracle), 1e-30)
    err, ref_err = _err(ours, oracle), _err(lowp, oracle)
    bound = 2 * ref_err + atol_rel * scale
    assert err <= bound, f"{name}: err {err:.3e} > 2*{ref_err:.3e} + {atol_rel:g}*{scale:.3e}"
    if strict_rel is not None:
        assert err <= strict_rel * scale, f"{name}: err {err:.3e} > {strict_rel:g}*{scale:.3e} (fp32-internal)"


def check_against_oracle(fn, x, args, kwargs, oracle_args, dtype, grad_out=None):
    """Run ours, the reference in ``dtype`` and the reference in float64; compare everything."""
    loss, dx, stats = _run(getattr(rk, fn), x, *args, grad_out=grad_out, **kwargs)
    lo_l, lo_dx, lo_st = _run(getattr(ref, fn), x, *args, grad_out=grad_out, **kwargs)
    or_l, or_dx, or_st = _run(getattr(ref, fn), x.double(), *oracle_args, grad_out=grad_out, **kwargs)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert stats["grad_norm"].dtype == torch.float32 and stats["grad_norm"].dim() == 0
    assert stats["normalizer"].dtype == torch.float32 and stats["normalizer"].shape == (x.shape[0],)
    assert_rule("loss", loss, or_l, lo_l, FP32_RTOL, strict_rel=FP32_RTOL)
    assert_rule("grad", dx, or_dx, lo_dx, GRAD_ATOL[dtype])
    assert_rule("grad_norm", stats["grad_norm"], or_st["grad_norm"], lo_st["grad_norm"], FP32_RTOL, FP32_RTOL)
    assert_rule("normalizer", stats["normalizer"], or_st["normalizer"], lo_st["normalizer"], FP32_RTOL, FP32_RTOL)


# AC-DMD schedules: (sigma_s, sigma_t, eta, guidance_scale, with_uncond). "pool" entries become [B]
# tensors (first B values). sigma_t > sigma_s; sigma_s = 0 and eta = 0 give the Euler transition.
AC_CONFIGS = {
    "scalar": (0.5, 0.9, 0.9, 1.0, False),
    "scalar-cfg": (0.75, 0.98, 0.9, 4.5, True),
    "sigma_s0-t0.02-cfg": (0.0, 0.02, 0.9, 4.5, True),
    "eta0": (0.5, 0.9, 0.0, 1.0, False),
    "tensor-sigmas-cfg": ("pool", "pool", 0.9, 4.5, True),
    "tensor-sigmas-eta": ("pool", "pool", "pool", 1.0, False),
    "tensor-all": ("pool", "pool", "pool", "pool", True),
}
POOLS = {  # per-sample mixtures: sigma_s = 0 next to sigma_t at 0.02 and 0.98, eta = 0 next to 0.9
    "sigma_s": [0.0, 0.5, 0.9, 0.75],
    "sigma_t": [0.02, 0.98, 0.98, 0.8],
    "eta": [0.9, 0.0, 0.5, 0.9],
    "guidance_scale": [4.5, 1.0, 3.0, 4.5],
}


def _schedule(config, batch, device):
    """kwargs of ac_dmd_loss (sigma_s/sigma_t included) for one AC_CONFIGS entry; tensors are fp32."""
    s_s, s_t, eta, gs, uncond = AC_CONFIGS[config]
    out = {}
    for name, val in (("sigma_s", s_s), ("sigma_t", s_t), ("eta", eta), ("guidance_scale", gs)):
        out[name] = torch.tensor(POOLS[name][:batch], device=device) if val == "pool" else val
    return out, uncond


def _ac_inputs(shape, dtype, device, uncond):
    x_s, x_t, v_real, v_fake, noise = (_randn(shape, dtype, device) for _ in range(5))
    v_fake = (v_real.float() + _randn(shape, torch.float32, device, 0.3)).to(dtype)
    v_unc = (v_real.float() + _randn(shape, torch.float32, device, 0.5)).to(dtype) if uncond else None
    return x_s, x_t, v_real, v_fake, noise, v_unc


def _ac_call_args(tensors, sched):
    """(args, kwargs) of ac_dmd_loss after x_s, from the tensors and a schedule dict."""
    x_t, v_real, v_fake, noise, v_unc = tensors
    kw = {k: sched[k] for k in ("eta", "guidance_scale")}
    if v_unc is not None:
        kw["v_real_uncond"] = v_unc
    return (x_t, v_real, v_fake, noise, sched["sigma_s"], sched["sigma_t"]), kw


# ---------------------------------------------------------------------------------------------
# 1. dmd_loss parity with the float64 oracle


@pytest.mark.parametrize("shape", DMD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("normalize", MODES)
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_dmd_loss_parity(device_backend, dtype, normalize, shape):
    """Loss, gradient, grad_norm and normalizer match reference.dmd_loss in float64."""
    device, _ = device_backend
    x, f, r = _dmd_inputs(shape, dtype, device)
    check_against_oracle("dmd_loss", x, (f, r), {"normalize": normalize}, (f.double(), r.double()), dtype)


@pytest.mark.parametrize(("normalize", "eps"), [("per_sample", 0.1), ("none", 0.5), ("global", 1e-3)])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_dmd_loss_eps(device_backend, dtype, normalize, eps):
    """eps is added to the normalizer in every mode ("none" divides by 1 + eps); a sample with
    x == x_real has normalizer eps (finite g) in per_sample mode."""
    device, _ = device_backend
    x, f, r = _dmd_inputs((3, 4, 50), dtype, device)
    r[1] = x[1]
    kwargs = {"normalize": normalize, "eps": eps}
    check_against_oracle("dmd_loss", x, (f, r), kwargs, (f.double(), r.double()), dtype)
    _, _, stats = _run(rk.dmd_loss, x, f, r, **kwargs)
    if normalize == "per_sample":
        assert stats["normalizer"][1].item() == pytest.approx(eps, rel=1e-6)
    if normalize == "none":
        assert torch.all(stats["normalizer"] == torch.tensor(1.0 + eps, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# 2. ac_dmd_loss parity with the float64 oracle, and equivalence with dmd_loss on the transitions


@pytest.mark.parametrize("shape", AC_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", list(AC_CONFIGS))
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_ac_dmd_loss_parity(device_backend, dtype, config, shape):
    """Fused AC-DMD matches reference.ac_dmd_loss in float64 (CFG, scalar/[B] schedules, eta = 0,
    sigma_s = 0); normalize modes rotate with the shape to keep the matrix small."""
    device, _ = device_backend
    normalize = MODES[AC_SHAPES.index(shape)]
    sched, uncond = _schedule(config, shape[0], device)
    x_s, *tensors = _ac_inputs(shape, dtype, device, uncond)
    args, kw = _ac_call_args(tensors, sched)
    oracle_args, oracle_kw = _ac_call_args([_f64(t) for t in tensors], {k: _f64(v) for k, v in sched.items()})
    kw["normalize"] = normalize
    # the oracle needs its float64 v_real_uncond / schedule tensors: run it through a wrapper
    oracle = lambda x, *a, return_stats: ref.ac_dmd_loss(  # noqa: E731
        x, *oracle_args, **oracle_kw, normalize=normalize, return_stats=return_stats
    )
    loss, dx, stats = _run(rk.ac_dmd_loss, x_s, *args, **kw)
    lo_l, lo_dx, lo_st = _run(ref.ac_dmd_loss, x_s, *args, **kw)
    or_l, or_dx, or_st = _run(oracle, x_s.double())
    assert loss.dtype == torch.float32 and dx.dtype == dtype and dx.shape == x_s.shape
    assert stats["normalizer"].dtype == torch.float32 and stats["normalizer"].shape == (shape[0],)
    assert_rule("loss", loss, or_l, lo_l, FP32_RTOL, FP32_RTOL)
    assert_rule("grad", dx, or_dx, lo_dx, GRAD_ATOL[dtype])
    assert_rule("grad_norm", stats["grad_norm"], or_st["grad_norm"], lo_st["grad_norm"], FP32_RTOL, FP32_RTOL)
    assert_rule("normalizer", stats["normalizer"], or_st["normalizer"], lo_st["normalizer"], FP32_RTOL, FP32_RTOL)


def _transitions_f64(tensors, sched):
    """xs_real, xs_fake from reference.cps_transition in float64 (teacher CFG in float64)."""
    x_t, v_real, v_fake, noise, v_unc = (_f64(t) for t in tensors)
    s = {k: _f64(v) for k, v in sched.items()}
    v_r = v_real
    if v_unc is not None:
        gs = s["guidance_scale"]
        gs = gs.reshape(-1, *([1] * (v_real.dim() - 1))) if isinstance(gs, torch.Tensor) else gs
        v_r = v_unc + gs * (v_real - v_unc)
    xs_real = ref.cps_transition(x_t, v_r, s["sigma_t"], s["sigma_s"], s["eta"], noise)
    xs_fake = ref.cps_transition(x_t, v_fake, s["sigma_t"], s["sigma_s"], s["eta"], noise)
    return xs_fake, xs_real


@pytest.mark.parametrize("normalize", MODES)
@pytest.mark.parametrize("config", list(AC_CONFIGS))
def test_ac_dmd_equals_dmd_on_transitions(device_backend, config, normalize):
    """ac_dmd_loss(x_s, ...) == dmd_loss(x_s, xs_fake, xs_real) with the CPS transitions made by
    reference.cps_transition in float64 (the fused form loses nothing but fp32 rounding)."""
    device, _ = device_backend
    shape = (4, 3, 9, 11)
    sched, uncond = _schedule(config, shape[0], device)
    x_s, *tensors = _ac_inputs(shape, torch.float32, device, uncond)
    args, kw = _ac_call_args(tensors, sched)
    loss, dx, stats = _run(rk.ac_dmd_loss, x_s, *args, normalize=normalize, **kw)
    xs_fake, xs_real = _transitions_f64(tensors, sched)
    e_l, e_dx, e_st = _run(rk.dmd_loss, x_s.double(), xs_fake, xs_real, normalize=normalize)
    assert e_l.dtype == torch.float64
    assert _err(loss, e_l) <= FP32_RTOL * _amax(e_l)
    assert _err(dx, e_dx) <= GRAD_ATOL[torch.float32] * _amax(e_dx)
    assert _err(stats["grad_norm"], e_st["grad_norm"]) <= FP32_RTOL * _amax(e_st["grad_norm"])
    assert _err(stats["normalizer"], e_st["normalizer"]) <= FP32_RTOL * _amax(e_st["normalizer"])


@pytest.mark.parametrize("normalize", MODES)
@pytest.mark.parametrize("config", ["scalar", "scalar-cfg", "sigma_s0-t0.02-cfg", "eta0"])
def test_ac_dmd_float64_equals_dmd_on_transitions(config, normalize):
    """In float64 (scalar schedules) the fused form equals dmd_loss on the float64 transitions to
    float64 rounding."""
    shape = (3, 4, 5)
    sched, uncond = _schedule(config, shape[0], "cpu")
    x_s, *tensors = (_f64(t) for t in _ac_inputs(shape, torch.float64, "cpu", uncond))
    args, kw = _ac_call_args(tensors, sched)
    loss, dx, stats = _run(rk.ac_dmd_loss, x_s, *args, normalize=normalize, **kw)
    e_l, e_dx, e_st = _run(rk.dmd_loss, x_s, *_transitions_f64(tensors, sched), normalize=normalize)
    assert loss.dtype == torch.float64 and dx.dtype == torch.float64
    assert _err(loss, e_l) <= 1e-12 * _amax(e_l)
    assert _err(dx, e_dx) <= 1e-12 * _amax(e_dx)
    assert _err(stats["normalizer"], e_st["normalizer"]) <= 1e-12 * _amax(e_st["normalizer"])


@pytest.mark.parametrize("config", ["tensor-sigmas-cfg", "tensor-sigmas-eta"])
def test_ac_dmd_float64_tensor_schedules_exact(config):
    """float64 inputs with float64 [B] schedule tensors run in float64 (docs/kernels.md §1 Dtypes)."""
    shape = (4, 3, 5)
    sched, uncond = _schedule(config, shape[0], "cpu")
    sched = {k: (v.double() + 1e-3 if isinstance(v, torch.Tensor) else v) for k, v in sched.items()}
    x_s, *tensors = (_f64(t) for t in _ac_inputs(shape, torch.float64, "cpu", uncond))
    args, kw = _ac_call_args(tensors, sched)
    loss, dx, _ = _run(rk.ac_dmd_loss, x_s, *args, **kw)
    o_l, o_dx, _ = _run(ref.ac_dmd_loss, x_s, *args, **kw)
    assert _err(loss, o_l) <= 1e-12 * _amax(o_l)
    assert _err(dx, o_dx) <= 1e-12 * _amax(o_dx)


# ---------------------------------------------------------------------------------------------
# 3. edge cases


def _expected_saturated(x, f, r, normalize):
    """g of the API in float64 but saturating at x.dtype's max, as the reference's nan_to_num in
    x.dtype does (the float64 oracle would saturate at float64's max instead)."""
    x64, f64, r64 = x.double(), f.double(), r.double()
    dims = tuple(range(1, x.dim()))
    if normalize == "per_sample":
        n = (x64 - r64).abs().mean(dim=dims, keepdim=True)
    elif normalize == "global":
        n = (x64 - r64).abs().mean().reshape([1] * x.dim())
    else:
        n = torch.ones([1] * x.dim(), dtype=torch.float64, device=x.device)
    big = torch.finfo(x.dtype).max
    g = torch.nan_to_num((f64 - r64) / n, nan=0.0, posinf=big, neginf=-big).clamp(-big, big)
    return g, n.expand(x.shape[0], *([1] * (x.dim() - 1))).reshape(x.shape[0])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inf/NaN warnings in the Triton interpreter
@pytest.mark.parametrize(
    ("kind", "normalize"),
    [("nan", "per_sample"), ("nan", "global"), ("inf", "per_sample"), ("inf", "global"), ("inf", "none"),
     ("overflow", "per_sample"), ("zero_normalizer", "per_sample")],
)
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_dmd_loss_nonfinite(device_backend, dtype, kind, normalize):
    """NaN in x_fake -> g = 0 there. +-inf in x_fake, a finite g beyond x.dtype's range (overflow),
    or a sample with x == x_real (zero normalizer) -> g = +-finfo(x.dtype).max (0 where also
    x_fake == x_real). The gradient stays finite and equals +-max * grad_out / N there; the loss is
    0.5*mean(g^2) in fp32 (+inf for fp32/bf16, whose max squared overflows fp32; finite for fp16).
    Checked against the reference run in the same dtype and against g computed in float64 but
    saturated at x.dtype's max (the float64 oracle would saturate at float64's max)."""
    device, backend = device_backend
    shape = (3, 4, 50)
    x, f, r = _dmd_inputs(shape, dtype, device)
    if kind == "nan":
        f[0, 0, :5] = math.nan
        f[2, 3, 7] = math.nan
    elif kind == "inf":
        f[0, 1, 3] = math.inf
        f[1, 2, 10] = -math.inf
        f[2, 0, 0] = math.inf
    elif kind == "overflow":  # small normalizer, huge but finite x_fake - x_real: |g| ~ 60 * max
        x[0] = (r[0].float() + _randn(r[0].shape, device=device, scale=0.01)).to(dtype)
        f[0, 1, 3] = 0.5 * torch.finfo(dtype).max
        f[0, 2, 5] = -0.5 * torch.finfo(dtype).max
    else:
        r[1] = x[1]
        f[1, :, ::4] = r[1, :, ::4]  # 0/0 there -> 0
    grad_out = 0.5
    N = x.numel()
    loss, dx, stats = _run(rk.dmd_loss, x, f, r, normalize=normalize, grad_out=grad_out)
    lo_l, lo_dx, lo_st = _run(ref.dmd_loss, x, f, r, normalize=normalize, grad_out=grad_out)
    g64, n64 = _expected_saturated(x, f, r, normalize)
    big = torch.finfo(dtype).max
    special = g64.abs() == big
    zero = (g64 == 0) & ~torch.isfinite((f.double() - r.double()) / n64.reshape(-1, 1, 1)) | torch.isnan(f)
    assert bool(special.any()) == (kind != "nan")

    assert torch.isfinite(dx).all()
    assert torch.all(dx[zero] == 0) and torch.all(lo_dx[zero] == 0)
    # saturated entries: +-max * grad_out / N, as the reference in the same dtype (within 1-2 ulps)
    want = (g64[special] * grad_out / N).to(dtype).double()
    rtol = ULPS[backend] * torch.finfo(dtype).eps
    torch.testing.assert_close(dx[special].double(), want, rtol=rtol, atol=0)
    torch.testing.assert_close(dx[special].double(), lo_dx[special].double(), rtol=rtol, atol=0)
    # every other entry: g / N to x.dtype rounding
    rest = ~special & ~zero
    want_rest = g64[rest] * grad_out / N
    assert _err(dx[rest], want_rest) <= GRAD_ATOL[dtype] * _amax(want_rest)

    want_loss = (0.5 * g64.pow(2).mean()).float()
    torch.testing.assert_close(loss, want_loss, rtol=FP32_RTOL, atol=0)
    torch.testing.assert_close(stats["grad_norm"], g64.pow(2).sum().sqrt().float(), rtol=FP32_RTOL, atol=0)
    torch.testing.assert_close(stats["normalizer"], n64.float(), rtol=FP32_RTOL, atol=0)
    torch.testing.assert_close(stats["normalizer"].double(), lo_st["normalizer"].double(), rtol=2e-2, atol=0)
    if kind == "nan":
        assert torch.isfinite(loss)
    elif dtype != torch.float16:
        assert loss.item() == math.inf and stats["grad_norm"].item() == math.inf
    if kind == "zero_normalizer":
        assert stats["normalizer"][1].item() == 0.0 and lo_st["normalizer"][1].item() == 0.0


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_dmd_loss_nan_parity(device_backend, dtype):
    """With NaN in x_fake the result still matches the float64 oracle (NaN -> 0 in both)."""
    device, _ = device_backend
    x, f, r = _dmd_inputs((2, 3, 40), dtype, device)
    f[0, 1, ::3] = math.nan
    f[1, 2, 5] = math.nan
    check_against_oracle("dmd_loss", x, (f, r), {}, (f.double(), r.double()), dtype)


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_dmd_loss_tiny_grad_out(device_backend, dtype):
    """The RL stage scales the loss by 0.001 / 48 (docs/method.md §3): grad_out / N is then below fp16's
    smallest subnormal, yet the gradient (a converged generator: x near x_real, so |g| ~ 1e3) is
    still g * grad_out / N to x.dtype rounding -- the scale must not be rounded to x.dtype first."""
    device, _ = device_backend
    x, f, r = _dmd_inputs((3, 5, 7, 9), dtype, device)
    x = (r.float() + _randn(r.shape, device=device, scale=1e-3)).to(dtype)
    check_against_oracle("dmd_loss", x, (f, r), {}, (f.double(), r.double()), dtype, grad_out=0.001 / 48)


@pytest.mark.parametrize("shape", [(0, 3, 4), (0, 7)], ids=["0x3x4", "0x7"])
def test_empty_batch(device_backend, shape):
    """B = 0: loss 0, a gradient of shape (0, ...), normalizer of shape [0]."""
    device, _ = device_backend
    x, f, r = (torch.randn(shape, device=device) for _ in range(3))
    for fn, args in (
        (rk.dmd_loss, (f, r)),
        (rk.ac_dmd_loss, (f, r, f, r, 0.5, torch.empty(0, device=device))),
    ):
        loss, dx, stats = _run(fn, x, *args)
        assert loss.item() == 0.0 and loss.dtype == torch.float32
        assert dx.shape == shape and dx.dtype == x.dtype
        assert stats["normalizer"].shape == (0,)
        assert stats["grad_norm"].item() == 0.0


def _noncontig(t):
    """Same values as ``t`` as a strided slice (every other element of the last dim)."""
    big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    big[..., ::2] = t
    return big[..., ::2]


@pytest.mark.parametrize("layout", ["transposed", "sliced", "batch-transposed"])
def test_noncontiguous_inputs(device_backend, layout):
    """Non-contiguous inputs give bitwise the same results as their contiguous copies."""
    device, _ = device_backend
    if layout == "transposed":
        make = lambda: torch.randn(3, 9, 7, 5, device=device).permute(0, 3, 2, 1)  # noqa: E731
    elif layout == "sliced":
        make = lambda: _noncontig(torch.randn(3, 5, 7, 9, device=device))  # noqa: E731
    else:
        make = lambda: torch.randn(5, 3, 7, device=device).transpose(0, 1)  # noqa: E731
    x, f, r, xt, v, nz = (make() for _ in range(6))
    assert not x.is_contiguous()
    c = lambda *ts: [t.contiguous() for t in ts]  # noqa: E731
    for fn, args in (
        (rk.dmd_loss, (f, r)),
        (rk.ac_dmd_loss, (xt, v, f, nz, torch.tensor([0.0, 0.5, 0.75], device=device), 0.9)),
    ):
        loss, dx, stats = _run(fn, x, *args)
        cargs = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
        e_l, e_dx, e_st = _run(fn, *c(x), *cargs)
        assert torch.equal(loss, e_l) and torch.equal(dx, e_dx)
        assert torch.equal(stats["normalizer"], e_st["normalizer"])
        assert torch.equal(stats["grad_norm"], e_st["grad_norm"])


def test_mixed_dtypes(device_backend):
    """x bf16, x_fake fp32, x_real fp16 (and a mix for AC-DMD): fp32 inside, gradient in x's dtype."""
    device, _ = device_backend
    shape = (3, 5, 7, 9)
    x = _randn(shape, torch.bfloat16, device)
    f = _randn(shape, torch.float32, device)
    r = _randn(shape, torch.float16, device)
    loss, dx, stats = _run(rk.dmd_loss, x, f, r)
    o_l, o_dx, o_st = _run(ref.dmd_loss, x.double(), f.double(), r.double())
    assert loss.dtype == torch.float32 and dx.dtype == torch.bfloat16
    assert _err(loss, o_l) <= FP32_RTOL * _amax(o_l)
    assert _err(dx, o_dx) <= GRAD_ATOL[torch.bfloat16] * _amax(o_dx)
    assert _err(stats["normalizer"], o_st["normalizer"]) <= FP32_RTOL * _amax(o_st["normalizer"])

    xt, v, vf, nz = (_randn(shape, d, device) for d in (torch.float16, torch.float32, torch.bfloat16, torch.float32))
    loss, dx, stats = _run(rk.ac_dmd_loss, x, xt, v, vf, nz, 0.5, 0.9)
    o_l, o_dx, o_st = _run(ref.ac_dmd_loss, x.double(), *(t.double() for t in (xt, v, vf, nz)), 0.5, 0.9)
    assert loss.dtype == torch.float32 and dx.dtype == torch.bfloat16
    assert _err(loss, o_l) <= FP32_RTOL * _amax(o_l)
    assert _err(dx, o_dx) <= GRAD_ATOL[torch.bfloat16] * _amax(o_dx)


@pytest.mark.parametrize("normalize", MODES)
def test_float64_inputs(normalize):
    """float64 inputs run in float64: float64 loss and gradient equal to the oracle's."""
    x, f, r = _dmd_inputs((3, 5, 7, 9), torch.float64, "cpu")
    assert rk.backend_for(x) == "torch"
    loss, dx, stats = _run(rk.dmd_loss, x, f, r, normalize=normalize, eps=1e-3)
    o_l, o_dx, o_st = _run(ref.dmd_loss, x, f, r, normalize=normalize, eps=1e-3)
    assert loss.dtype == torch.float64 and dx.dtype == torch.float64
    assert _err(loss, o_l) <= 1e-12 * _amax(o_l)
    assert _err(dx, o_dx) <= 1e-12 * _amax(o_dx)
    assert _err(stats["grad_norm"], o_st["grad_norm"]) <= 1e-12 * _amax(o_st["grad_norm"])
    assert _err(stats["normalizer"], o_st["normalizer"]) <= 1e-12 * _amax(o_st["normalizer"])


@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_gradcheck_float64(eps):
    """torch.autograd.gradcheck on tiny float64 inputs.

    The op's gradient is the stop-gradient surrogate g / N, not the derivative of its value
    0.5*mean(g^2), so gradcheck only holds where dg/dx = I. With normalize="none" that is the case
    for x_fake = (1 + eps) * x + c (dmd_loss) and v_fake = (1 + eps) * x_s / k + c (ac_dmd_loss, k the
    CPS coefficient of the velocity), so gradcheck checks the backward formula g * grad_out / N.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    c, r = (torch.randn(2, 3, 2, dtype=torch.float64, generator=gen) for _ in range(2))
    fn = lambda x: rk.dmd_loss(x, (1 + eps) * x + c, r, normalize="none", eps=eps)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8)

    s_s, s_t, eta = 0.5, 0.9, 0.9
    c_eta = math.cos(eta * math.pi / 2)
    k = s_s * c_eta * (1 - s_t) - (1 - s_s) * s_t
    xt, v, nz = (torch.randn(2, 3, 2, dtype=torch.float64, generator=gen) for _ in range(3))
    fn = lambda x: rk.ac_dmd_loss(  # noqa: E731
        x, xt, v, (1 + eps) * x / k + c, nz, s_s, s_t, eta=eta, normalize="none", eps=eps
    )
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# 4. errors


def _shape_msg(name, ref_name, good, bad):
    return rf"{name}.*{ref_name}.*{re.escape(str(good))}.*{re.escape(str(bad))}"


@pytest.mark.parametrize("which", ["x_fake", "x_real"])
def test_dmd_shape_mismatch(which):
    """A shape mismatch raises ValueError naming the argument and both shapes."""
    x, f, r = (torch.randn(3, 4) for _ in range(3))
    args = {"x_fake": f, "x_real": r}
    args[which] = torch.randn(3, 5)
    with pytest.raises(ValueError, match=_shape_msg(which, "x", (3, 4), (3, 5))):
        rk.dmd_loss(x, **args)


@pytest.mark.parametrize("which", ["x_t", "v_real", "v_fake", "noise", "v_real_uncond"])
def test_ac_shape_mismatch(which):
    """Every AC-DMD tensor argument is checked against x_s's shape."""
    names = ["x_t", "v_real", "v_fake", "noise", "v_real_uncond"]
    ts = {n: torch.randn(2, 3, 4) for n in names}
    ts[which] = torch.randn(2, 4, 3)
    x_s = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=_shape_msg(which, "x_s", (2, 3, 4), (2, 4, 3))):
        rk.ac_dmd_loss(x_s, ts["x_t"], ts["v_real"], ts["v_fake"], ts["noise"], 0.5, 0.9,
                       v_real_uncond=ts["v_real_uncond"], guidance_scale=4.5)


def test_bad_normalize_and_eps():
    """Unknown normalize and negative / non-finite eps raise ValueError, for both losses."""
    x = torch.randn(2, 3)
    ac = lambda **kw: rk.ac_dmd_loss(x, x, x, x, x, 0.5, 0.9, **kw)  # noqa: E731
    dmd = lambda **kw: rk.dmd_loss(x, x, x, **kw)  # noqa: E731
    for fn in (dmd, ac):
        with pytest.raises(ValueError, match="normalize"):
            fn(normalize="batch")
        with pytest.raises(ValueError, match="eps"):
            fn(eps=-1e-3)
        with pytest.raises(ValueError, match="eps"):
            fn(eps=math.inf)


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("int_dtype", [torch.int64, torch.int32])
def test_integer_tensor_raises_type_error(which, int_dtype):
    """Integer tensors raise TypeError naming the argument."""
    ts = [torch.randn(2, 3) for _ in range(3)]
    ts[which] = torch.randint(-3, 3, (2, 3), dtype=int_dtype)
    name = ["x", "x_fake", "x_real"][which]
    with pytest.raises(TypeError, match=rf"^{name} must be"):
        rk.dmd_loss(*ts)
    ts = [torch.randn(2, 3) for _ in range(5)]
    ts[which] = torch.randint(-3, 3, (2, 3), dtype=int_dtype)
    name = ["x_s", "x_t", "v_real"][which]
    with pytest.raises(TypeError, match=rf"^{name} must be"):
        rk.ac_dmd_loss(*ts, 0.5, 0.9)


@pytest.mark.parametrize("which", ["sigma_s", "sigma_t", "eta", "guidance_scale"])
@pytest.mark.parametrize("length", [2, 4])
def test_schedule_wrong_length(which, length):
    """A schedule tensor whose length is not B raises ValueError naming it."""
    x = torch.randn(3, 4)
    kw = {"sigma_s": 0.5, "sigma_t": 0.9, "eta": 0.9, "guidance_scale": 4.5}
    kw[which] = torch.full((length,), 0.5)
    with pytest.raises(ValueError, match=which):
        rk.ac_dmd_loss(x, x, x, x, x, kw.pop("sigma_s"), kw.pop("sigma_t"), v_real_uncond=x, **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a CUDA device")
def test_device_mismatch():
    """A tensor on another device raises ValueError naming it."""
    x = torch.randn(2, 3, device="cuda")
    with pytest.raises(ValueError, match="x_real"):
        rk.dmd_loss(x, torch.randn(2, 3, device="cuda"), torch.randn(2, 3))
    with pytest.raises(ValueError, match="sigma_s"):
        rk.ac_dmd_loss(x, x, x, x, x, torch.full((2,), 0.5), 0.9)


# ---------------------------------------------------------------------------------------------
# 5. only x / x_s is differentiable


def test_gradient_only_for_x(device_backend):
    """x_fake / x_real (and every AC-DMD input but x_s) get no gradient, even if they require it."""
    device, _ = device_backend
    shape = (2, 3, 17)
    x, f, r = (torch.randn(shape, device=device, requires_grad=True) for _ in range(3))
    loss = rk.dmd_loss(x, f, r)
    gx, gf, gr = torch.autograd.grad(loss, (x, f, r), allow_unused=True)
    assert gx is not None and gf is None and gr is None

    others = [torch.randn(shape, device=device, requires_grad=True) for _ in range(5)]
    sig = torch.tensor([0.0, 0.5], device=device, requires_grad=True)
    loss = rk.ac_dmd_loss(x, *others[:4], sig, 0.9, v_real_uncond=others[4], guidance_scale=4.5)
    grads = torch.autograd.grad(loss, [x, *others, sig], allow_unused=True)
    assert grads[0] is not None and all(g is None for g in grads[1:])


def test_no_grad_and_constant_x(device_backend):
    """Under no_grad, or with x.requires_grad=False, the loss is computed (same value) and needs no grad."""
    device, _ = device_backend
    x, f, r = _dmd_inputs((3, 5, 7, 9), torch.float32, device)
    ac_args = (x, f, r, x, torch.tensor([0.0, 0.5, 0.9], device=device), 0.98)
    for fn, args in ((rk.dmd_loss, (f, r)), (rk.ac_dmd_loss, ac_args)):
        with_grad, _, stats = _run(fn, x, *args)
        plain, plain_stats = fn(x, *args, return_stats=True)
        with torch.no_grad():
            ng = fn(x.clone().requires_grad_(True), *args)
        assert not plain.requires_grad and not ng.requires_grad
        assert torch.equal(plain, with_grad.detach()) and torch.equal(ng, with_grad.detach())
        assert torch.equal(plain_stats["normalizer"], stats["normalizer"])
        assert isinstance(plain_stats["grad_norm"], torch.Tensor)


# ---------------------------------------------------------------------------------------------
# 6. grad_out scaling and determinism


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_grad_out_scaling(device_backend, dtype):
    """(loss * 3.7) gives 3.7x the gradient (to 1-2 ulps of x.dtype); the gradient is g * grad_out / N."""
    device, backend = device_backend
    x, f, r = _dmd_inputs((4, 16, 8, 8), dtype, device)
    xs_args = (f, r, x, f, 0.5, 0.9)
    for fn, args in ((rk.dmd_loss, (f, r)), (rk.ac_dmd_loss, xs_args)):
        xx = x.clone().requires_grad_(True)
        (g1,) = torch.autograd.grad(fn(xx, *args), xx)
        (g37,) = torch.autograd.grad(fn(xx, *args) * 3.7, xx)
        want = g1.double() * 3.7
        err = (g37.double() - want).abs()
        ulp = ULPS[backend] * torch.finfo(dtype).eps
        tiny = torch.finfo(dtype).tiny  # subnormal gradients (fp16) have absolute spacing
        assert torch.all(err <= ulp * want.abs() + 2 * tiny * ulp + 1e-300), (err / want.abs()).max()


@needs_triton
@pytest.mark.parametrize("normalize", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_deterministic(dtype, normalize):
    """Two calls on the triton backend give bitwise identical loss, stats and gradient."""
    x, f, r = _dmd_inputs((3, 5000), dtype, DEVICE)  # several chunks per sample
    sigma_s = torch.tensor([0.0, 0.5, 0.9], device=DEVICE)
    with rk.use_backend("triton"):
        for fn, args in ((rk.dmd_loss, (f, r)), (rk.ac_dmd_loss, (f, r, x, r, sigma_s, 0.98))):
            a = _run(fn, x, *args, normalize=normalize)
            b = _run(fn, x, *args, normalize=normalize)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            assert all(torch.equal(a[2][k], b[2][k]) for k in a[2])


# ---------------------------------------------------------------------------------------------
# 7. torch.compile


def _compile_case(device):
    shape = (3, 4, 9, 7)
    ts = [torch.randn(shape, device=device) for _ in range(8)]
    ss = torch.tensor([0.0, 0.5, 0.75], device=device)
    st = torch.tensor([0.02, 0.98, 0.8], device=device)

    def fn(x, f, r, xt, vr, vf, nz, vu, ss, st):
        a, sa = rk.dmd_loss(x, f, r, return_stats=True)
        b = rk.ac_dmd_loss(x, xt, vr, vf, nz, 0.5, 0.9, v_real_uncond=vu, guidance_scale=4.5, normalize="global")
        c, sc = rk.ac_dmd_loss(x, xt, vr, vf, nz, ss, st, eta=torch.full_like(ss, 0.9), return_stats=True)
        return a + 2 * b + 3 * c, sa["grad_norm"], sc["normalizer"]

    return fn, ts, (ss, st)


def _check_compiled(backend_name, device):
    fn, (x, *rest), sched = _compile_case(device)
    xe = x.clone().requires_grad_(True)
    le, gne, ne = fn(xe, *rest, *sched)
    (ge,) = torch.autograd.grad(le, xe)
    cfn = torch.compile(fn, fullgraph=True, backend=backend_name)
    xc = x.clone().requires_grad_(True)
    lc, gnc, nc = cfn(xc, *rest, *sched)
    (gc,) = torch.autograd.grad(lc, xc)
    torch.testing.assert_close(lc, le, rtol=FP32_RTOL, atol=0)
    torch.testing.assert_close(gc, ge, rtol=FP32_RTOL, atol=FP32_RTOL * ge.abs().max().item())
    torch.testing.assert_close(gnc, gne, rtol=FP32_RTOL, atol=0)
    torch.testing.assert_close(nc, ne, rtol=FP32_RTOL, atol=0)
    assert not gnc.requires_grad and not nc.requires_grad  # statistics are constants, as in eager
    assert not gne.requires_grad and not ne.requires_grad


def test_compile_aot_eager(device_backend, dynamo_reset):
    """torch.compile(fullgraph=True, backend="aot_eager") traces both losses (scalar and [B]
    schedules) without graph breaks; value and gradient match eager."""
    device, _ = device_backend
    _check_compiled("aot_eager", device)


@pytest.mark.slow
def test_compile_inductor(device_backend, dynamo_reset):
    """The same with the default inductor backend (needs a C++ compiler on CPU)."""
    device, _ = device_backend
    _check_compiled("inductor", device)


# ---------------------------------------------------------------------------------------------
# 8. backend forcing


@needs_triton
@pytest.mark.parametrize("normalize", MODES)
def test_backends_agree_fp32(normalize):
    """rk.use_backend("torch") and rk.use_backend("triton") agree within fp32 rounding."""
    x, f, r = _dmd_inputs((3, 5, 7, 9), torch.float32, DEVICE)
    tensors = [_randn(x.shape, device=DEVICE) for _ in range(4)]
    ss = torch.tensor([0.0, 0.5, 0.9], device=DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        with rk.use_backend(backend):
            assert rk.backend_for(x) == ("torch" if backend == "torch" else
                                         "triton-interpreter" if _backend.interpreter_enabled() else "triton")
            results[backend] = [
                _run(rk.dmd_loss, x, f, r, normalize=normalize),
                _run(rk.ac_dmd_loss, x, *tensors, ss, 0.98, v_real_uncond=f, guidance_scale=4.5,
                     normalize=normalize),
            ]
    for (la, ga, sa), (lb, gb, sb) in zip(results["torch"], results["triton"], strict=True):
        torch.testing.assert_close(la, lb, rtol=FP32_RTOL, atol=0)
        assert _err(ga, gb) <= GRAD_ATOL[torch.float32] * _amax(ga)
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=FP32_RTOL, atol=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(("op", "kind"), [("dmd_loss", "inf"), ("dmd_loss", "zero_normalizer"), ("ac_dmd_loss", "inf")])
def test_float64_saturates_like_every_dtype(device_backend, op, kind):
    """float64 follows the same rule as the low dtypes: a g past float64's range (an inf input, or a zero
    normalizer with eps=0) saturates at ±finfo(float64).max, so the gradient is ±max·grad_out/N, finite; the
    loss and grad_norm, sums of squares of that, are +inf. (The CPU shortcut once compared sum(g²) with max²,
    which overflows to inf in float64, and let ±inf through.)"""
    device, _ = device_backend
    dt, big = torch.float64, torch.finfo(torch.float64).max
    shape = (3, 4, 5)
    x = torch.randn(shape, dtype=dt, device=device)
    other = torch.randn(shape, dtype=dt, device=device)
    if op == "dmd_loss":
        f, r = other.clone(), torch.randn(shape, dtype=dt, device=device)
        if kind == "inf":
            f[0, 1, 2] = math.inf
        else:
            r[1] = x[1]
        args, kwargs = (f, r), {}
    else:
        x_t, v_real, noise = (torch.randn(shape, dtype=dt, device=device) for _ in range(3))
        v_fake = v_real + 0.1 * other
        v_fake[0, 1, 2] = math.inf
        sig_s, sig_t = (torch.full((3,), s, dtype=dt, device=device) for s in (0.5, 0.8))
        args, kwargs = (x_t, v_real, v_fake, noise, sig_s, sig_t), {"eps": 0.0}
    x.requires_grad_(True)
    loss, stats = getattr(rk, op)(x, *args, return_stats=True, **kwargs)
    (0.5 * loss).backward()
    n = x.numel()
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().max().item() == pytest.approx(big * 0.5 / n, rel=1e-12)
    assert loss.item() == math.inf and stats["grad_norm"].item() == math.inf
