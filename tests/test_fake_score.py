"""Tests of the fake-score side of AC-DMD: renoise, fake_score_loss and consistency_loss (docs/kernels.md §5,
docs/method.md §4.1-4.2).

The oracle is ``rtdmd_kernels.reference`` evaluated in float64; tolerances follow docs/kernels.md §8
as in test_dmd.py: ``err(ours) <= 2 * err(reference in the same low precision) + atol * max|oracle|``.
Losses are float32-internal (inputs upcast exactly), so they must also be within float32 accuracy of
the oracle; per-element outputs and gradients get a dtype-scaled atol.
"""

from __future__ import annotations

import pytest
import torch
from test_dmd import _amax, _f64, assert_rule  # the oracle-comparison rule of docs/kernels.md §8
from test_policy import ATOL, DEVICE, DTYPE_PAIRS, FP32_RTOL, SHAPES, TRITON_OK, _leaf, needs_triton

import rtdmd_kernels as rk
from rtdmd_kernels import reference as ref

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# DTYPE_PAIRS: (latent dtype, v_hat / noise dtype): the three dtypes and the real mix (fp32 latents, bf16 v_hat).
DT_IDS = ["fp32", "bf16", "fp16", "fp32-bf16"]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]

# (sigma_s, sigma_t): "pool" entries become [B] tensors (first B values of POOLS).
SUB_CONFIGS = {
    "scalar": (0.5, 0.9),
    "stage2-t0.02": (0.0, 0.02),  # sigma_s = 0 (stage 2) and the lower clamp bound
    "s0.9-t0.98": (0.9, 0.98),  # the upper clamp bound
    "floor": (0.75, 0.75),  # sigma_t^2 - a^2 sigma_s^2 = 0: the 1e-12 floor
    "tensor": ("pool", "pool"),
}
POOLS = {
    "sigma_s": [0.0, 0.9, 0.5, 0.0],
    "sigma_t": [0.02, 0.98, 0.5, 0.98],  # row 3 hits the floor
    "sigma_p": [0.0, 0.8, 0.45, 0.75],  # sigma_p = 0 allowed
}
# consistency: (sigma_t, sigma_p)
CONS_CONFIGS = {"scalar": (0.9, 0.7), "sigma_p0": (0.5, 0.0), "tensor": ("pool", "pool")}


def _sched(names, vals, batch, device):
    out = []
    for name, val in zip(names, vals, strict=True):
        if val == "pool":
            val = torch.tensor((POOLS[name] * batch)[:batch], device=device)
        out.append(val)
    return out


def _randn(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, device=device) * scale).to(dtype)


def _grads(out, inputs, grad_out=None):
    return torch.autograd.grad(out, inputs, grad_outputs=grad_out)


# ---------------------------------------------------------------------------------------------
# 1. renoise


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("config", list(SUB_CONFIGS))
@pytest.mark.parametrize(("x_dtype", "n_dtype"), DTYPE_PAIRS, ids=DT_IDS)
def test_renoise_parity(device_backend, x_dtype, n_dtype, config, shape):
    """x_t and the gradients in x_s and noise match reference.renoise (autograd) in float64."""
    device, _ = device_backend
    sched = _sched(("sigma_s", "sigma_t"), SUB_CONFIGS[config], shape[0], device)
    x, n = _randn(shape, x_dtype, device), _randn(shape, n_dtype, device)
    g = torch.randn(shape, device=device)

    def run(fn, xx, nn, sch, gg):
        xl, nl = _leaf(xx), _leaf(nn)
        out = fn(xl, nl, *sch)
        return (out, *_grads(out, (xl, nl), gg.to(out.dtype)))

    ours = run(rk.renoise, x, n, sched, g)
    lowp = run(ref.renoise, x, n, sched, g)
    oracle = run(ref.renoise, x.double(), n.double(), [_f64(s) for s in sched], g.double())
    assert ours[0].dtype == x_dtype and ours[1].dtype == x_dtype and ours[2].dtype == n_dtype
    for name, a, b, c, dt in zip(("x_t", "dx_s", "dnoise"), ours, oracle, lowp, (x_dtype, x_dtype, n_dtype),
                                 strict=True):
        assert_rule(name, a, b, c, ATOL[dt])


def test_renoise_stage2_exact(device_backend):
    """sigma_s = 0: x_t = (1 - sigma_t)*x0 + sigma_t*noise exactly as in fp32 arithmetic (docs/method.md §4.1.3)."""
    device, _ = device_backend
    x, n = torch.randn(3, 700, device=device), torch.randn(3, 700, device=device)
    for st in (0.02, 0.98, 0.5):
        st32 = torch.tensor(st, dtype=torch.float32).item()
        want = (1 - torch.tensor(st32)).item() * x + st32 * n
        torch.testing.assert_close(rk.renoise(x, n, 0.0, st32), want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 2. fake_score_loss


def _fake_inputs(shape, x_dtype, v_dtype, device):
    x = _randn(shape, x_dtype, device)
    n = _randn(shape, x_dtype, device)
    v = _randn(shape, v_dtype, device)
    return v, x, n


def _run_fake(fn, v, x, n, sched, grad_out=None, **kw):
    vl = _leaf(v)
    loss = fn(vl, x, n, *sched, **kw)
    go = None if grad_out is None else torch.as_tensor(grad_out, dtype=loss.dtype, device=loss.device)
    (dv,) = _grads(loss, (vl,), go)
    return loss, dv


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("config", list(SUB_CONFIGS))
@pytest.mark.parametrize(("x_dtype", "v_dtype"), DTYPE_PAIRS, ids=DT_IDS)
def test_fake_score_loss_parity(device_backend, x_dtype, v_dtype, config, shape):
    """Loss and dL/dv_hat match reference.fake_score_loss (move_scale_out=True) in float64."""
    device, _ = device_backend
    sched = _sched(("sigma_s", "sigma_t"), SUB_CONFIGS[config], shape[0], device)
    v, x, n = _fake_inputs(shape, x_dtype, v_dtype, device)
    ours = _run_fake(rk.fake_score_loss, v, x, n, sched)
    lowp = _run_fake(ref.fake_score_loss, v, x, n, sched)
    oracle = _run_fake(ref.fake_score_loss, v.double(), x.double(), n.double(), [_f64(s) for s in sched])
    assert ours[0].dtype == F32 and ours[0].dim() == 0 and ours[1].dtype == v_dtype
    assert_rule("loss", ours[0], oracle[0], lowp[0], FP32_RTOL, strict_rel=FP32_RTOL)
    assert_rule("dv_hat", ours[1], oracle[1], lowp[1], ATOL[v_dtype])


@pytest.mark.parametrize("weight_max", [10.0, 1.0, 1e6, 0.5])
@pytest.mark.parametrize("config", ["stage2-t0.02", "floor", "tensor", "s0.9-t0.98"])
def test_fake_score_loss_weight_max(device_backend, weight_max, config):
    """The clamp of the inverse-square weight (the floor row gets 1/1e-12 -> weight_max)."""
    device, _ = device_backend
    shape = (4, 300)
    sched = _sched(("sigma_s", "sigma_t"), SUB_CONFIGS[config], shape[0], device)
    v, x, n = _fake_inputs(shape, F32, F32, device)
    ours = _run_fake(rk.fake_score_loss, v, x, n, sched, weight_max=weight_max)
    oracle = _run_fake(ref.fake_score_loss, v.double(), x.double(), n.double(), [_f64(s) for s in sched],
                       weight_max=weight_max)
    assert_rule("loss", ours[0], oracle[0], oracle[0], FP32_RTOL, strict_rel=FP32_RTOL)
    assert_rule("dv_hat", ours[1], oracle[1], oracle[1], ATOL[F32])


@pytest.mark.parametrize("config", ["scalar", "stage2-t0.02", "s0.9-t0.98", "tensor"])
def test_move_scale_out_equivalence(device_backend, config):
    """docs/method.md §4.2: the shipped loss equals mean(min(1, 10*sigma_ts^2) * (v_hat - target_F)^2)."""
    device, _ = device_backend
    shape = (4, 8, 9)
    sched = _sched(("sigma_s", "sigma_t"), SUB_CONFIGS[config], shape[0], device)
    v, x, n = _fake_inputs(shape, F32, F32, device)
    s64 = [_f64(s) for s in sched]
    target_f, _ = ref.fake_score_target(x.double(), n.double(), *s64, move_scale_out=False)
    _, sigma_ts = ref.fake_score_target(x.double(), n.double(), *s64, move_scale_out=True)
    want = (torch.clamp(10 * sigma_ts**2, max=1.0) * (v.double() - target_f) ** 2).mean()
    got = rk.fake_score_loss(v, x, n, *sched)
    torch.testing.assert_close(got.double(), want, rtol=FP32_RTOL, atol=0)
    ref_false = ref.fake_score_loss(v.double(), x.double(), n.double(), *s64, move_scale_out=False)
    if config == "s0.9-t0.98":  # sigma_ts >= 0.316: the two forms are the same loss
        torch.testing.assert_close(got.double(), ref_false, rtol=FP32_RTOL, atol=0)


# ---------------------------------------------------------------------------------------------
# 3. consistency_loss


def _cons_inputs(shape, x_dtype, v_dtype, device):
    """x_t, v_hat, x1, v1, x2, v2 with correlated residuals (the loss is well away from 0)."""
    x_t = _randn(shape, F32, device)
    common = torch.randn(shape, device=device)
    x1 = (x_t + common + 0.3 * torch.randn(shape, device=device)).to(x_dtype)
    x2 = (x_t + common + 0.3 * torch.randn(shape, device=device)).to(x_dtype)
    vs = [_randn(shape, v_dtype, device, 0.5) for _ in range(3)]
    return x_t.to(x_dtype), vs[0], x1, vs[1], x2, vs[2]


def _run_cons(fn, tensors, sched, grad_out=None):
    x_t, v_hat, x1, v1, x2, v2 = tensors
    leaves = [_leaf(t) for t in (v_hat, v1, v2)]
    loss = fn(x_t, leaves[0], sched[0], x1, leaves[1], x2, leaves[2], sched[1])
    go = None if grad_out is None else torch.as_tensor(grad_out, dtype=loss.dtype, device=loss.device)
    return (loss, *_grads(loss, leaves, go))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("config", list(CONS_CONFIGS))
@pytest.mark.parametrize(("x_dtype", "v_dtype"), DTYPE_PAIRS, ids=DT_IDS)
def test_consistency_loss_parity(device_backend, x_dtype, v_dtype, config, shape):
    """Loss and the gradients in v_hat, v1, v2 match reference.consistency_loss in float64."""
    device, _ = device_backend
    sched = _sched(("sigma_t", "sigma_p"), CONS_CONFIGS[config], shape[0], device)
    tensors = _cons_inputs(shape, x_dtype, v_dtype, device)
    ours = _run_cons(rk.consistency_loss, tensors, sched)
    lowp = _run_cons(ref.consistency_loss, tensors, sched)
    oracle = _run_cons(ref.consistency_loss, [t.double() for t in tensors], [_f64(s) for s in sched])
    assert ours[0].dtype == F32 and ours[0].dim() == 0
    assert all(g.dtype == v_dtype for g in ours[1:])
    assert_rule("loss", ours[0], oracle[0], lowp[0], FP32_RTOL, strict_rel=FP32_RTOL)
    for name, a, b, c in zip(("dv_hat", "dv1", "dv2"), ours[1:], oracle[1:], lowp[1:], strict=True):
        assert_rule(name, a, b, c, ATOL[v_dtype])


def test_consistency_negative_and_sigma_p0(device_backend):
    """Anti-correlated residuals give a negative loss; sigma_p = 0 gives dv1 = dv2 = 0 exactly."""
    device, _ = device_backend
    shape = (2, 3, 50)
    x_t, v_hat, v1, v2 = (torch.randn(shape, device=device) for _ in range(4))
    common = torch.randn(shape, device=device)
    x1, x2 = x_t + common, x_t - common
    loss = rk.consistency_loss(x_t, v_hat, 0.9, x1, v1, x2, v2, 0.7)
    assert loss.item() < 0
    leaves = [_leaf(t) for t in (v_hat, v1, v2)]
    loss = rk.consistency_loss(x_t, leaves[0], 0.9, x1, leaves[1], x2, leaves[2], 0.0)
    g = _grads(loss, leaves)
    assert not torch.equal(g[0], torch.zeros_like(g[0]))
    assert torch.equal(g[1], torch.zeros_like(g[1])) and torch.equal(g[2], torch.zeros_like(g[2]))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("kind", ["nan", "posinf", "neginf"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_consistency_nonfinite(device_backend, kind, dtype):
    """NaN -> 0, +-inf -> +-float32 max (torch.nan_to_num of the scalar); every gradient 0, as the
    reference's autograd gives (nan_to_num's backward is grad * isfinite) except at NaN residuals."""
    device, _ = device_backend
    shape = (3, 40)
    tensors = list(_cons_inputs(shape, F32, dtype, device))
    if kind == "nan":
        tensors[2][1, 7] = float("nan")
    else:  # finite inputs whose product overflows float32
        tensors[2][0, 3] = 1e30
        tensors[4][0, 3] = 1e30 if kind == "posinf" else -1e30
    sched = (torch.tensor([0.9, 0.5, 0.3], device=device), 0.4)
    ours = _run_cons(rk.consistency_loss, tensors, sched)
    lowp = _run_cons(ref.consistency_loss, tensors, sched)
    want = {"nan": 0.0, "posinf": torch.finfo(F32).max, "neginf": -torch.finfo(F32).max}[kind]
    assert ours[0].dtype == F32 and ours[0].item() == want == lowp[0].item()
    for g, r in zip(ours[1:], lowp[1:], strict=True):
        # The reference's autograd multiplies that zero by the residual: NaN where a residual is NaN.
        # docs/kernels.md §5 asks for zero gradients, so ours are 0 everywhere.
        assert torch.equal(g, torch.zeros_like(g))
        assert torch.equal(torch.nan_to_num(r, nan=0.0).to(g.dtype), g)


# ---------------------------------------------------------------------------------------------
# 4. shared behaviour: grad_out, empty batch, named gradients only, float64, errors


@pytest.mark.parametrize("go", [3.0, -0.25, 1e-30])
def test_grad_out_scaling(device_backend, go):
    """Gradients scale linearly with grad_out (the backward reads grad_out on the device)."""
    device, _ = device_backend
    shape = (3, 5, 11)
    v, x, n = _fake_inputs(shape, F32, F32, device)
    _, d1 = _run_fake(rk.fake_score_loss, v, x, n, (0.5, 0.9))
    _, dg = _run_fake(rk.fake_score_loss, v, x, n, (0.5, 0.9), grad_out=go)
    torch.testing.assert_close(dg, d1 * go, rtol=1e-6, atol=0)
    tensors = _cons_inputs(shape, F32, F32, device)
    base = _run_cons(rk.consistency_loss, tensors, (0.9, 0.7))
    scaled = _run_cons(rk.consistency_loss, tensors, (0.9, 0.7), grad_out=go)
    for a, b in zip(base[1:], scaled[1:], strict=True):
        torch.testing.assert_close(b, a * go, rtol=1e-6, atol=0)


def test_empty_batch(device_backend):
    """B = 0: renoise gives an empty tensor, both losses 0, gradients empty."""
    device, _ = device_backend
    shape = (0, 4, 5)
    x, n, v = (torch.randn(shape, device=device) for _ in range(3))
    xl, nl = _leaf(x), _leaf(n)
    out = rk.renoise(xl, nl, 0.0, 0.5)
    assert out.shape == shape
    dx, dn = _grads(out, (xl, nl), torch.ones_like(out))
    assert dx.shape == shape and dn.shape == shape
    loss, dv = _run_fake(rk.fake_score_loss, v, x, n, (torch.zeros(0, device=device), 0.5))
    assert loss.item() == 0.0 and dv.shape == shape
    res = _run_cons(rk.consistency_loss, (x, v, x, v, x, v), (0.5, 0.4))
    assert res[0].item() == 0.0 and all(g.shape == shape for g in res[1:])


def test_gradients_only_in_the_named_inputs(device_backend):
    """x_s/noise of the fake loss and x_t/x1/x2 of the consistency loss get no gradient; a subset of
    v_hat/v1/v2 may require grad."""
    device, _ = device_backend
    shape = (2, 3, 30)
    v, x, n = (_leaf(t) for t in _fake_inputs(shape, F32, F32, device))
    loss = rk.fake_score_loss(v, x, n, 0.5, 0.9)
    loss.backward()
    assert v.grad is not None and x.grad is None and n.grad is None
    t = [_leaf(u) for u in _cons_inputs(shape, F32, F32, device)]
    loss = rk.consistency_loss(t[0], t[1], 0.9, t[2], t[3].detach(), t[4], t[5], 0.4)
    loss.backward()
    assert t[1].grad is not None and t[5].grad is not None
    assert all(t[i].grad is None for i in (0, 2, 3, 4))
    oracle = _run_cons(ref.consistency_loss, [u.detach().double() for u in t], (0.9, 0.4))
    torch.testing.assert_close(t[1].grad.double(), oracle[1], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(t[5].grad.double(), oracle[3], rtol=1e-5, atol=1e-9)
    with torch.no_grad():  # no residuals stored, same value
        assert rk.consistency_loss(*[u.detach() for u in t[:2]], 0.9, *[u.detach() for u in t[2:]], 0.4) == loss


def test_noncontiguous_and_float64():
    """Non-contiguous inputs work; float64 inputs run in float64 and match the oracle tightly."""
    shape = (3, 6, 10)
    sched = (torch.tensor([0.0, 0.9, 0.75], dtype=torch.float64), torch.tensor([0.02, 0.98, 0.75],
                                                                                dtype=torch.float64))
    v, x, n = (torch.randn(shape, dtype=torch.float64).transpose(1, 2) for _ in range(3))
    out = rk.renoise(x, n, *sched)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref.renoise(x, n, *sched), rtol=1e-12, atol=1e-12)
    ours = _run_fake(rk.fake_score_loss, v, x, n, sched)
    oracle = _run_fake(ref.fake_score_loss, v, x, n, sched)
    assert ours[0].dtype == torch.float64
    for a, b in zip(ours, oracle, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    tensors = [t.double().transpose(1, 2) for t in _cons_inputs((3, 10, 6), F32, F32, "cpu")]
    ours = _run_cons(rk.consistency_loss, tensors, (sched[1], sched[0]))
    oracle = _run_cons(ref.consistency_loss, tensors, (sched[1], sched[0]))
    for a, b in zip(ours, oracle, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    with rk.use_backend("triton" if TRITON_OK else "torch"):  # fp32 strided on the Triton backend
        vs, xs, ns = (t.float().to(DEVICE) for t in (v, x, n))  # CUDA where present: no interpreter there
        assert not vs.is_contiguous()
        torch.testing.assert_close(rk.fake_score_loss(vs, xs, ns, 0.5, 0.9).double().cpu(),
                                   ref.fake_score_loss(v, x, n, 0.5, 0.9), rtol=FP32_RTOL, atol=0)


def test_gradcheck_float64():
    shape = (2, 3, 4)
    x, n, v = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    s_s, s_t = torch.tensor([0.0, 0.5], dtype=torch.float64), torch.tensor([0.3, 0.9], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: rk.renoise(a, b, s_s, s_t), (x, n))
    assert torch.autograd.gradcheck(lambda a: rk.fake_score_loss(a, x.detach(), n.detach(), s_s, s_t), (v,))
    v1, v2 = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(2))
    x1, x2 = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b, c: rk.consistency_loss(x.detach(), a, s_t, x1, b, x2, c, s_s), (v, v1, v2))


def test_errors():
    x = torch.randn(2, 3, 4)
    bad = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"noise must have the shape of x_s \(2, 3, 4\), got \(2, 3, 5\)"):
        rk.renoise(x, bad, 0.0, 0.5)
    with pytest.raises(ValueError, match=r"x_s must have the shape of v_hat"):
        rk.fake_score_loss(x, bad, x, 0.0, 0.5)
    with pytest.raises(ValueError, match=r"noise must have the shape of v_hat"):
        rk.fake_score_loss(x, x, bad, 0.0, 0.5)
    for i, name in enumerate(("v_hat", "x1", "v1", "x2", "v2")):
        args = [x] * 5
        args[i] = bad
        with pytest.raises(ValueError, match=rf"{name} must have the shape of x_t"):
            rk.consistency_loss(x, args[0], 0.5, args[1], args[2], args[3], args[4], 0.4)
    for wm in (0.0, -1.0, float("nan"), True, "10"):
        with pytest.raises(ValueError, match="weight_max"):
            rk.fake_score_loss(x, x, x, 0.0, 0.5, weight_max=wm)
    with pytest.raises(ValueError, match=r"sigma_t must be a float or a tensor of shape \[B\]"):
        rk.fake_score_loss(x, x, x, 0.0, torch.ones(3))
    with pytest.raises(ValueError, match=r"sigma_p must be a float or a tensor of shape \[B\]"):
        rk.consistency_loss(x, x, 0.5, x, x, x, x, torch.ones(2, 2))
    with pytest.raises(ValueError, match="sigma_s must be < 1"):
        rk.renoise(x, x, 1.0, 0.5)
    with pytest.raises(TypeError, match="x_s must be float32"):
        rk.renoise(x.long(), x, 0.0, 0.5)
    with pytest.raises(TypeError, match="sigma_s must be a float"):
        rk.renoise(x, x, "0.5", 0.5)


# ---------------------------------------------------------------------------------------------
# 5. determinism and torch.compile


@needs_triton
def test_triton_deterministic():
    """Two calls on the triton backend give bitwise identical losses and gradients (several chunks)."""
    shape = (2, 5000)
    sched = (torch.tensor([0.0, 0.9], device=DEVICE), torch.tensor([0.02, 0.98], device=DEVICE))
    with rk.use_backend("triton"):
        v, x, n = _fake_inputs(shape, F32, BF16, DEVICE)
        a, b = (_run_fake(rk.fake_score_loss, v, x, n, sched) for _ in range(2))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        tensors = _cons_inputs(shape, F32, BF16, DEVICE)
        a, b = (_run_cons(rk.consistency_loss, tensors, sched[::-1]) for _ in range(2))
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_compile_aot_eager(device_backend, dynamo_reset):
    """torch.compile(fullgraph=True, backend="aot_eager") over the three ops (scalar and [B]
    schedules, a stage-1 fake-score update): values and gradients equal eager."""
    device, _ = device_backend
    shape = (3, 4, 9, 7)
    x_s, nz, v_hat, x1, v1, x2, v2 = (torch.randn(shape, device=device) for _ in range(7))
    s_s = torch.tensor([0.0, 0.9, 0.5], device=device)
    s_t = torch.tensor([0.02, 0.98, 0.7], device=device)

    def fn(x_s, nz, v_hat, x1, v1, x2, v2, s_s, s_t):
        x_t = rk.renoise(x_s, nz, s_s, s_t)
        x_t2 = rk.renoise(x_s, nz, 0.0, 0.5)
        fake = rk.fake_score_loss(v_hat, x_s, nz, s_s, s_t) + rk.fake_score_loss(v_hat, x_s, nz, 0.5, 0.9)
        cons = rk.consistency_loss(x_t, v_hat, s_t, x1, v1, x2, v2, s_t - 0.1)
        return fake + 0.01 * cons + 0.1 * (x_t * x_t2).mean(), cons

    outs = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        xs, vh, a1, a2 = _leaf(x_s), _leaf(v_hat), _leaf(v1), _leaf(v2)
        out = f(xs, nz, vh, x1, a1, x2, a2, s_s, s_t)
        outs.append((*out, *torch.autograd.grad(out[0], (xs, vh, a1, a2))))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=FP32_RTOL, atol=FP32_RTOL * max(_amax(b), 1e-6))
