"""Tests of the CPS sampler step, the policy log-prob and the fused PPO clip loss (docs/kernels.md §3,
docs/method.md §2.1, §5.1, §5.4).

The oracle is ``rtdmd_kernels.reference`` evaluated in float64; tolerances follow docs/kernels.md §8
as in test_dmd.py: ``err(ours) <= 2 * err(reference in the same low precision) + atol * max|oracle|``.
Log-probs, losses and statistics are float32-internal (inputs upcast exactly), so they must also be
within float32 accuracy of the oracle; per-element outputs and gradients get a dtype-scaled atol.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_dmd import _amax, _err, _f64, assert_rule  # the oracle-comparison rule of docs/kernels.md §8

import rtdmd_kernels as rk
from rtdmd_kernels import _backend
from rtdmd_kernels import reference as ref

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (x and x_next dtype, v dtype): the three dtypes, and the real stage-2 mix (fp32 latents, bf16 v).
DTYPE_PAIRS = [(F32, F32), (BF16, BF16), (F16, F16), (F32, BF16)]
SHAPES = [(3, 5, 7, 9), (2, 1000), (4, 16, 8, 8)]
FP32_RTOL = 2e-5
# per-element outputs / gradients: ~2-3 ulps of the stored dtype relative to max|oracle|
ATOL = {F32: 1e-5, BF16: 2e-2, F16: 2e-3}

TRITON_OK = _backend.triton_available() and (torch.cuda.is_available() or _backend.interpreter_enabled())
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="triton cannot run here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Schedules: (sigma, sigma_next, eta); "pool" entries become [B] tensors (first B values of POOLS).
CPS_CONFIGS = {
    "scalar": (0.9, 0.75, 0.9),
    "scalar-sn0": (0.5, 0.0, 0.9),
    "eta0": (0.75, 0.5, 0.0),
    "tensor": ("pool", "pool", "pool"),
}
POOLS = {  # sigma = 1 next to sigma_next = 0 and eta = 0 rows
    "sigma": [1.0, 0.5, 0.9, 0.75],
    "sigma_next": [0.95, 0.0, 0.75, 0.5],
    "eta": [0.9, 0.9, 0.0, 0.5],
}
# kind="sde": sigma_next > 0 (the density is undefined at sd = 0); sigma = 1 uses sigma_max.
SDE_CONFIGS = {
    "scalar": (0.9, 0.75, 0.7),
    "sigma1": (1.0, 0.96, 0.7),
    "tensor": ([1.0, 0.9, 0.5, 0.75], [0.96, 0.75, 0.3, 0.5], 0.7),
}
SIGMA_MAX = 0.96


def _sched(kind, config, batch, device):
    s, sn, eta = (CPS_CONFIGS if kind == "cps" else SDE_CONFIGS)[config]
    out = []
    for name, val in (("sigma", s), ("sigma_next", sn), ("eta", eta)):
        if val == "pool":
            val = POOLS[name][:batch]
        if isinstance(val, list):
            val = torch.tensor((val * batch)[:batch], device=device)
        out.append(val)
    return out


def _kind_kw(kind):
    return {"kind": kind, "sigma_max": SIGMA_MAX} if kind == "sde" else {"kind": kind}


def _inputs(shape, x_dtype, v_dtype, device, kind, sched, off_policy=0.1):
    """x, v, noise and an x_next near the step's output (off-policy by ``off_policy``)."""
    x = torch.randn(shape, device=device).to(x_dtype)
    v = torch.randn(shape, device=device).to(v_dtype)
    noise = torch.randn(shape, device=device)
    s, sn, eta = (_f64(t) for t in sched)
    xn, _, _, _ = ref.cps_step_with_logprob(x.double(), v.double(), s, sn, eta, noise=noise.double(),
                                            **_kind_kw(kind))
    x_next = (xn + off_policy * torch.randn(shape, device=device, dtype=torch.float64)).to(x_dtype)
    return x, v, noise, x_next


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# 1. cps_step


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", list(CPS_CONFIGS))
@pytest.mark.parametrize(("x_dtype", "v_dtype"), DTYPE_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
def test_cps_step_parity(device_backend, x_dtype, v_dtype, config, shape):
    """x_next, mean and the gradients in x and v match reference.cps_step_with_logprob in float64."""
    device, _ = device_backend
    sched = _sched("cps", config, shape[0], device)
    x, v, noise, _ = _inputs(shape, x_dtype, v_dtype, device, "cps", sched)
    w1, w2 = torch.randn(shape, device=device), torch.randn(shape, device=device)

    def run(fn_out, xx, vv):
        xn, mean = fn_out
        (gx, gv) = torch.autograd.grad((xn.double() * w1.double() + mean.double() * w2.double()).sum(), (xx, vv))
        return xn, mean, gx, gv

    xx, vv = _leaf(x), _leaf(v)
    ours = run(rk.cps_step(xx, vv, *sched[:2], eta=sched[2], noise=noise), xx, vv)
    xl, vl = _leaf(x), _leaf(v)
    lo = ref.cps_step_with_logprob(xl, vl, *sched, noise=noise)
    lowp = run((lo[0], lo[2]), xl, vl)
    xo, vo = _leaf(x.double()), _leaf(v.double())
    o = ref.cps_step_with_logprob(xo, vo, *(_f64(t) for t in sched), noise=noise.double())
    oracle = run((o[0], o[2]), xo, vo)
    assert ours[0].dtype == x_dtype and ours[1].dtype == x_dtype
    assert ours[2].dtype == x_dtype and ours[3].dtype == v_dtype
    for name, a, b, c, dt in zip(("x_next", "mean", "dx", "dv"), ours, oracle, lowp,
                                 (x_dtype, x_dtype, x_dtype, v_dtype), strict=True):
        assert_rule(name, a, b, c, ATOL[dt])


@pytest.mark.parametrize("sigmas", [[1.0, 0.95809, 0.88398, 0.7175, 0.0], [1.0, 0.9, 0.75, 0.5, 0.0]])
def test_cps_step_eta0_equals_diffusers(device_backend, sigmas):
    """eta = 0 is diffusers' FlowMatchEulerDiscreteScheduler.step on the same sigmas (fp32)."""
    diffusers = pytest.importorskip("diffusers")
    device, _ = device_backend
    sch = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sch.set_timesteps(sigmas=sigmas[:-1], device=device)
    assert torch.allclose(sch.sigmas.cpu().double(), torch.tensor(sigmas, dtype=torch.float64), atol=1e-6)
    x = torch.randn(2, 4, 8, 8, device=device)
    for i, t in enumerate(sch.timesteps):
        v = torch.randn_like(x)
        want = sch.step(model_output=v, timestep=t, sample=x).prev_sample
        s, sn = float(sch.sigmas[i]), float(sch.sigmas[i + 1])
        got, mean = rk.cps_step(x, v, s, sn, eta=0.0)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(got, mean)  # no noise at eta = 0
        x = want


def test_cps_step_noise_generator(device_backend):
    """noise=None draws float32 N(0, 1) from the generator for every sample (sigma_next = 0 rows
    too): reproducible, and equal to passing torch.randn drawn with the same generator."""
    device, _ = device_backend
    shape = (3, 4, 6, 5)
    x, v = torch.randn(shape, device=device), torch.randn(shape, device=device)
    s, sn = torch.tensor([0.9, 0.5, 1.0], device=device), torch.tensor([0.75, 0.0, 0.9], device=device)
    a = rk.cps_step(x, v, s, sn, eta=0.9, generator=torch.Generator(device).manual_seed(7))
    b = rk.cps_step(x, v, s, sn, eta=0.9, generator=torch.Generator(device).manual_seed(7))
    noise = torch.randn(shape, generator=torch.Generator(device).manual_seed(7), device=device, dtype=torch.float32)
    c = rk.cps_step(x, v, s, sn, eta=0.9, noise=noise)
    for i in range(2):
        assert torch.equal(a[i], b[i]) and torch.equal(a[i], c[i])
    d = rk.cps_step(x, v, s, sn, eta=0.9, generator=torch.Generator(device).manual_seed(8))
    assert not torch.equal(a[0], d[0]) and torch.equal(a[1], d[1])
    assert torch.equal(a[0][1], a[1][1])  # sigma_next = 0: x_next = mean


# ---------------------------------------------------------------------------------------------
# 2. cps_logprob


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("kind", "config"), [("cps", c) for c in CPS_CONFIGS] + [("sde", c) for c in SDE_CONFIGS])
@pytest.mark.parametrize(("x_dtype", "v_dtype"), DTYPE_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
def test_cps_logprob_parity(device_backend, x_dtype, v_dtype, kind, config, shape):
    """logp [B] and its gradient in v match the float64 oracle (cps surrogate and Flow-GRPO sde)."""
    device, _ = device_backend
    sched = _sched(kind, config, shape[0], device)
    x, v, _, x_next = _inputs(shape, x_dtype, v_dtype, device, kind, sched)
    w = torch.randn(shape[0], device=device, dtype=torch.float64)

    def run(fn, xx, vv, xn, sc):
        vv = _leaf(vv)
        lp = fn(xx, vv, xn, sc)
        (gv,) = torch.autograd.grad((lp.double() * w).sum(), vv)
        return lp, gv

    kw = _kind_kw(kind)
    ours = run(lambda a, b, c, sc: rk.cps_logprob(a, b, c, sc[0], sc[1], eta=sc[2], **kw), x, v, x_next, sched)
    ref_fn = lambda a, b, c, sc: ref.cps_step_with_logprob(a, b, *sc, x_next=c, **kw)[1]  # noqa: E731
    lowp = run(ref_fn, x, v, x_next, sched)
    oracle = run(ref_fn, x.double(), v.double(), x_next.double(), [_f64(t) for t in sched])
    assert ours[0].dtype == torch.float32 and ours[0].shape == (shape[0],)
    assert ours[1].dtype == v_dtype
    assert_rule("logp", ours[0], oracle[0], lowp[0], FP32_RTOL, strict_rel=FP32_RTOL)
    assert_rule("dv", ours[1], oracle[1], lowp[1], ATOL[v_dtype])


# ---------------------------------------------------------------------------------------------
# 3. ppo_clip_loss

# log-ratio offsets per sample: two inside the clip range (1e-5), two far outside in each direction
DELTAS = [0.0, 3e-6, 1e-3, -1e-3, -2e-6, 5e-3, -4e-3, 1e-6]
ADVS = [7.0, -1.5, 6.0, -9.0, 0.3, -2.0, 3.0, -0.7]  # beyond +-adv_clip = 5 of both signs


def _ppo_case(shape, x_dtype, v_dtype, device, kind, sched, with_ref):
    x, v, _, x_next = _inputs(shape, x_dtype, v_dtype, device, kind, sched)
    B = shape[0]
    lp = ref.cps_step_with_logprob(x.double(), v.double(), *(_f64(t) for t in sched), x_next=x_next.double(),
                                   **_kind_kw(kind))[1]
    old = (lp - torch.tensor(DELTAS[:B], dtype=torch.float64, device=device)).float()  # logp - old = delta
    adv = torch.tensor(ADVS[:B], device=device)
    v_ref = (v.float() + 0.2 * torch.randn(shape, device=device)).to(v_dtype) if with_ref else None
    return x, v, x_next, old, adv, v_ref


def _run_ppo(fn, x, v, x_next, old, adv, sched, kind, v_ref, kl_coef, double=False, **extra):
    cast = _f64 if double else (lambda t: t)
    vv = _leaf(cast(v))
    kw = dict(_kind_kw(kind), eta=cast(sched[2]), return_stats=True, **extra)
    if v_ref is not None:
        kw.update(v_ref=cast(v_ref), kl_coef=kl_coef)
    loss, stats = fn(cast(x), vv, cast(x_next), cast(old), cast(adv), cast(sched[0]), cast(sched[1]), **kw)
    (gv,) = torch.autograd.grad(loss, vv)
    return loss, gv, stats


@pytest.mark.parametrize("shape", [(4, 16, 8, 8), (3, 5, 7, 9), (2, 1000)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("kind", "config", "with_ref"), [
    ("cps", "scalar", False), ("cps", "tensor", True), ("cps", "scalar-sn0", True), ("cps", "eta0", False),
    ("sde", "scalar", True), ("sde", "tensor", False), ("sde", "sigma1", True),
])
@pytest.mark.parametrize(("x_dtype", "v_dtype"), DTYPE_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
def test_ppo_clip_loss_parity(device_backend, x_dtype, v_dtype, kind, config, with_ref, shape):
    """Loss, stats and dv match reference.ppo_clip_loss in float64: clipped advantages of both signs,
    ratios inside and outside the clip range in both directions, the KL term (s_b = 0 rows add 0)."""
    device, _ = device_backend
    sched = _sched(kind, config, shape[0], device)
    x, v, x_next, old, adv, v_ref = _ppo_case(shape, x_dtype, v_dtype, device, kind, sched, with_ref)
    args = (x, v, x_next, old, adv, sched, kind, v_ref, 0.7)
    loss, gv, stats = _run_ppo(rk.ppo_clip_loss, *args)
    lo_loss, lo_gv, lo_stats = _run_ppo(ref.ppo_clip_loss, *args)
    o_loss, o_gv, o_stats = _run_ppo(ref.ppo_clip_loss, *args, double=True)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and gv.dtype == v_dtype
    assert_rule("loss", loss, o_loss, lo_loss, FP32_RTOL, strict_rel=FP32_RTOL)
    assert_rule("dv", gv, o_gv, lo_gv, ATOL[v_dtype])
    for key in ("ratio_mean", "logp"):
        assert stats[key].dtype == torch.float32
        assert_rule(key, stats[key], o_stats[key], lo_stats[key], FP32_RTOL)
    # approx_kl = mean 0.5*(logp - old)^2 inherits the fp32 cancellation of logp - old (|delta| <= 5e-3)
    kl_atol = max(abs(d) for d in DELTAS) * FP32_RTOL * _amax(o_stats["logp"])
    assert _err(stats["approx_kl"], o_stats["approx_kl"]) <= 2 * _err(lo_stats["approx_kl"], o_stats["approx_kl"]) \
        + kl_atol + FP32_RTOL * _amax(o_stats["approx_kl"])
    assert stats["clip_fraction"].item() == pytest.approx(o_stats["clip_fraction"].item(), rel=1e-6)
    assert torch.isfinite(loss) and torch.isfinite(gv).all()


@pytest.mark.parametrize("kind", ["cps", "sde"])
def test_ratio_exactly_one_on_policy(device_backend, kind):
    """Rollout with cps_step, old_logp = cps_logprob of the same inputs (same backend), then training:
    ratio exactly 1, clip_fraction 0, approx_kl 0, and the full (unclipped) gradient."""
    device, _ = device_backend
    shape = (4, 8, 6, 7)
    x, v = torch.randn(shape, device=device), torch.randn(shape, device=device).to(BF16)
    if kind == "cps":
        s, sn, eta = torch.tensor([1.0, 0.9, 0.75, 0.5], device=device), torch.tensor(
            [0.9, 0.75, 0.5, 0.0], device=device), 0.9
        x_next, _ = rk.cps_step(x, v, s, sn, eta=eta, generator=torch.Generator(device).manual_seed(3))
    else:
        s, sn, eta = torch.tensor([1.0, 0.9, 0.75, 0.5], device=device), torch.tensor(
            [0.96, 0.75, 0.5, 0.2], device=device), 0.7
        x_next = ref.cps_step_with_logprob(x, v, s, sn, eta, kind="sde", sigma_max=SIGMA_MAX)[0]
    kw = _kind_kw(kind)
    old = rk.cps_logprob(x, v, x_next, s, sn, eta=eta, **kw)
    adv = torch.tensor([1.0, -2.0, 7.0, 0.5], device=device)
    vv = _leaf(v)
    loss, stats = rk.ppo_clip_loss(x, vv, x_next, old, adv, s, sn, eta=eta, return_stats=True, **kw)
    assert torch.equal(stats["logp"], old)
    assert stats["ratio_mean"].item() == 1.0 and stats["clip_fraction"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    assert loss.item() == pytest.approx(-adv.clamp(-5, 5).mean().item(), rel=1e-6)
    (gv,) = torch.autograd.grad(loss, vv)
    # full gradient: d/dv of mean_b(-A_b * logp_b) (ratio = 1)
    vl = _leaf(v)
    lp = rk.cps_logprob(x, vl, x_next, s, sn, eta=eta, **kw)
    (want,) = torch.autograd.grad((-adv.clamp(-5, 5) * lp).mean(), vl)
    assert _err(gv, want) <= ATOL[BF16] * _amax(want)


def test_clip_directions(device_backend):
    """Outside the clip range the clipped branch wins (zero gradient) for A > 0, r > 1 + eps and
    A < 0, r < 1 - eps; the unclipped one (full gradient) for A > 0, r < 1 - eps and A < 0, r > 1 + eps."""
    device, _ = device_backend
    shape = (4, 3, 50)
    s, sn = 0.9, 0.75
    x, v, _, x_next = _inputs(shape, F32, F32, device, "cps", (s, sn, 0.9))
    lp = rk.cps_logprob(x, v, x_next, s, sn, eta=0.9)
    delta = torch.tensor([1e-3, 1e-3, -1e-3, -1e-3], device=device)  # logp - old
    adv = torch.tensor([2.0, -2.0, 2.0, -2.0], device=device)
    vv = _leaf(v)
    loss = rk.ppo_clip_loss(x, vv, x_next, lp - delta, adv, s, sn, eta=0.9)
    (gv,) = torch.autograd.grad(loss, vv)
    zero = gv.flatten(1).abs().amax(dim=1) == 0
    assert zero.tolist() == [True, False, False, True]
    vl = _leaf(v)
    (want,) = torch.autograd.grad((-adv * torch.exp(delta) * rk.cps_logprob(x, vl, x_next, s, sn, eta=0.9)).mean(), vl)
    torch.testing.assert_close(gv[1:3], want[1:3], rtol=1e-5, atol=1e-5 * _amax(want))


def test_kl_term(device_backend):
    """kl_coef * mean_b[mean_d (mean - mean_ref)^2 / (2 s_b^2)]; rows with s_b = 0 (sigma_next = 0)
    contribute 0, so a batch of only such rows gives the loss without the term."""
    device, _ = device_backend
    shape = (3, 4, 25)
    sn0 = torch.zeros(3, device=device)
    s = torch.tensor([0.9, 0.5, 0.75], device=device)
    x, v, _, x_next = _inputs(shape, F32, F32, device, "cps", (s, sn0, 0.9))
    old = rk.cps_logprob(x, v, x_next, s, sn0, eta=0.9)
    adv = torch.tensor([1.0, -1.0, 0.5], device=device)
    v_ref = v + 0.3 * torch.randn(shape, device=device)
    plain = rk.ppo_clip_loss(x, v, x_next, old, adv, s, sn0, eta=0.9)
    vv = _leaf(v)
    with_kl = rk.ppo_clip_loss(x, vv, x_next, old, adv, s, sn0, eta=0.9, v_ref=v_ref, kl_coef=2.0)
    assert torch.equal(plain, with_kl.detach())
    # one stochastic row: its KL shows up, with the oracle's value
    sn = torch.tensor([0.0, 0.3, 0.0], device=device)
    args = (x, v, x_next, old, adv, (s, sn, 0.9), "cps", v_ref, 2.0)
    loss, gv, _ = _run_ppo(rk.ppo_clip_loss, *args)
    o_loss, o_gv, _ = _run_ppo(ref.ppo_clip_loss, *args, double=True)
    base = rk.ppo_clip_loss(x, v, x_next, old, adv, s, sn, eta=0.9)
    assert loss.item() > base.item()
    torch.testing.assert_close(loss.double(), o_loss, rtol=FP32_RTOL, atol=0)
    assert _err(gv, o_gv) <= ATOL[F32] * _amax(o_gv)


def test_stats_and_old_logp_dtypes(device_backend):
    """stats are float32 tensors; old_logp / advantages may be bf16/fp16/fp64; v_ref given with
    kl_coef = 0 changes nothing."""
    device, _ = device_backend
    shape = (3, 40)
    x, v, _, x_next = _inputs(shape, F32, F32, device, "cps", (0.9, 0.75, 0.9))
    old = rk.cps_logprob(x, v, x_next, 0.9, 0.75, eta=0.9)
    adv = torch.tensor([1.0, -3.0, 6.0], device=device)
    base, st = rk.ppo_clip_loss(x, v, x_next, old, adv, 0.9, 0.75, eta=0.9, return_stats=True, clip_range=0.2,
                                v_ref=torch.randn(shape, device=device))
    assert set(st) == {"ratio_mean", "clip_fraction", "approx_kl", "logp"}
    assert all(t.dtype == torch.float32 for t in st.values()) and st["logp"].shape == (3,)
    for dt in (BF16, F16, torch.float64):
        loss, st2 = rk.ppo_clip_loss(x, v, x_next, old.to(dt), adv.to(dt), 0.9, 0.75, eta=0.9,
                                     return_stats=True, clip_range=0.2)
        assert loss.dtype == torch.float32 and all(t.dtype == torch.float32 for t in st2.values())
        assert torch.isfinite(loss)
        assert _err(loss, base) <= 2e-2 * _amax(base)


def test_empty_batch(device_backend):
    """B = 0: empty outputs and log-probs; the PPO loss is 0 with an empty gradient."""
    device, _ = device_backend
    shape = (0, 3, 4)
    x, v = torch.randn(shape, device=device), _leaf(torch.randn(shape, device=device))
    xn, mean = rk.cps_step(x, v, 0.9, 0.75, eta=0.9)
    assert xn.shape == shape and mean.shape == shape
    lp = rk.cps_logprob(x, v, xn, 0.9, 0.75, eta=0.9)
    assert lp.shape == (0,) and lp.dtype == torch.float32
    e = torch.empty(0, device=device)
    loss = rk.ppo_clip_loss(x, v, xn, e, e, 0.9, 0.75, eta=0.9)
    assert loss.item() == 0.0
    (gv,) = torch.autograd.grad(loss, v)
    assert gv.shape == shape


def test_gradients_only_in_the_named_inputs(device_backend):
    """cps_step: x and v; cps_logprob / ppo_clip_loss: v only (x, x_next, old_logp, advantages,
    v_ref, noise are constants)."""
    device, _ = device_backend
    shape = (2, 3, 17)
    x, v, xn, nz, vr = (torch.randn(shape, device=device, requires_grad=True) for _ in range(5))
    old, adv = torch.zeros(2, device=device, requires_grad=True), torch.ones(2, device=device, requires_grad=True)
    a, m = rk.cps_step(x, v, 0.9, 0.75, eta=0.9, noise=nz)
    g = torch.autograd.grad((a + m).sum(), (x, v, nz), allow_unused=True)
    assert g[0] is not None and g[1] is not None and g[2] is None
    lp = rk.cps_logprob(x, v, xn, 0.9, 0.75, eta=0.9)
    g = torch.autograd.grad(lp.sum(), (x, v, xn), allow_unused=True)
    assert g[0] is None and g[1] is not None and g[2] is None
    loss = rk.ppo_clip_loss(x, v, xn, old, adv, 0.9, 0.75, eta=0.9, v_ref=vr, kl_coef=0.5)
    g = torch.autograd.grad(loss, (x, v, xn, old, adv, vr), allow_unused=True)
    assert g[1] is not None and all(t is None for i, t in enumerate(g) if i != 1)
    # v without grad: the values are computed, nothing to differentiate
    with torch.no_grad():
        l2 = rk.ppo_clip_loss(x, v, xn, old, adv, 0.9, 0.75, eta=0.9, v_ref=vr, kl_coef=0.5)
    assert torch.equal(l2, loss.detach())


def test_noncontiguous_and_float64():
    """Non-contiguous inputs equal their contiguous copies; float64 inputs run in float64 and match
    the oracle to float64 rounding (and pass gradcheck inside the clip range)."""
    x, v, xn = (torch.randn(3, 9, 7, device=DEVICE).transpose(1, 2) for _ in range(3))
    old, adv = torch.randn(3, device=DEVICE) * 0.01 - 0.5, torch.tensor([1.0, -1.0, 2.0], device=DEVICE)
    a = rk.ppo_clip_loss(x, v, xn, old, adv, 0.9, 0.75, eta=0.9, clip_range=0.2)
    b = rk.ppo_clip_loss(x.contiguous(), v.contiguous(), xn.contiguous(), old, adv, 0.9, 0.75, eta=0.9,
                         clip_range=0.2)
    assert torch.equal(a, b)
    gen = torch.Generator().manual_seed(0)
    x, v, xn, vr = (torch.randn(2, 3, 4, dtype=torch.float64, generator=gen) for _ in range(4))
    s, sn = torch.tensor([0.9, 0.6], dtype=torch.float64), torch.tensor([0.75, 0.3], dtype=torch.float64)
    lp = ref.cps_step_with_logprob(x, v, s, sn, 0.9, x_next=xn)[1]
    old = lp + torch.tensor([0.01, -0.02], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    kw = {"eta": 0.9, "clip_range": 0.5, "v_ref": vr, "kl_coef": 0.3}
    vv = _leaf(v)
    ours = rk.ppo_clip_loss(x, vv, xn, old, adv, s, sn, **kw)
    assert ours.dtype == torch.float64
    vo = _leaf(v)
    want = ref.ppo_clip_loss(x, vo, xn, old, adv, s, sn, **kw)
    assert _err(ours, want) <= 1e-12 * _amax(want)
    assert _err(torch.autograd.grad(ours, vv)[0], torch.autograd.grad(want, vo)[0]) <= 1e-12
    assert torch.autograd.gradcheck(lambda vv: rk.ppo_clip_loss(x, vv, xn, old, adv, s, sn, **kw), (_leaf(v),))
    assert torch.autograd.gradcheck(lambda vv: rk.cps_logprob(x, vv, xn, s, sn, eta=0.7, kind="sde",
                                                              sigma_max=0.95), (_leaf(v),))
    assert torch.autograd.gradcheck(lambda xx, vv: rk.cps_step(xx, vv, s, sn, eta=0.9, noise=xn),
                                    (_leaf(x), _leaf(v)))


# ---------------------------------------------------------------------------------------------
# 4. errors


def test_errors():
    x = torch.randn(3, 4)
    b = torch.zeros(3)
    with pytest.raises(ValueError, match=r"v must have the shape of x \(3, 4\), got \(3, 5\)"):
        rk.cps_step(x, torch.randn(3, 5), 0.9, 0.75, eta=0.9)
    with pytest.raises(ValueError, match="noise"):
        rk.cps_step(x, x, 0.9, 0.75, eta=0.9, noise=torch.randn(2, 4))
    with pytest.raises(ValueError, match="x_next"):
        rk.cps_logprob(x, x, torch.randn(3, 5), 0.9, 0.75, eta=0.9)
    with pytest.raises(ValueError, match="kind"):
        rk.cps_logprob(x, x, x, 0.9, 0.75, eta=0.9, kind="ode")
    with pytest.raises(ValueError, match="sigma_max"):
        rk.cps_logprob(x, x, x, 0.9, 0.75, eta=0.9, kind="sde")
    with pytest.raises(ValueError, match="sigma"):
        rk.cps_logprob(x, x, x, 0.0, 0.75, eta=0.9, kind="sde", sigma_max=0.9)
    with pytest.raises(ValueError, match="sigma_next"):
        rk.cps_step(x, x, 0.9, torch.zeros(2), eta=0.9)
    with pytest.raises(TypeError, match="eta"):
        rk.cps_step(x, x, 0.9, 0.75, eta="0.9")
    with pytest.raises(TypeError, match="^v must be"):
        rk.cps_logprob(x, x.long(), x, 0.9, 0.75, eta=0.9)
    bad = {"old_logp": torch.zeros(4), "advantages": torch.zeros(3, 1)}
    for name, t in bad.items():
        kw = {"old_logp": b, "advantages": b, name: t}
        with pytest.raises(ValueError, match=rf"{name} must have shape \[B\]"):
            rk.ppo_clip_loss(x, x, x, kw["old_logp"], kw["advantages"], 0.9, 0.75, eta=0.9)
    for kw, name in (({"clip_range": -0.1}, "clip_range"), ({"adv_clip": 0.0}, "adv_clip"),
                     ({"kl_coef": -1.0}, "kl_coef"), ({"clip_range": math.nan}, "clip_range")):
        with pytest.raises(ValueError, match=name):
            rk.ppo_clip_loss(x, x, x, b, b, 0.9, 0.75, eta=0.9, **kw)
    with pytest.raises(ValueError, match=r"v_ref must have the shape of v"):
        rk.ppo_clip_loss(x, x, x, b, b, 0.9, 0.75, eta=0.9, v_ref=torch.randn(3, 5), kl_coef=1.0)


# ---------------------------------------------------------------------------------------------
# 5. determinism and torch.compile


@needs_triton
@pytest.mark.parametrize("with_ref", [False, True])
def test_triton_deterministic(with_ref):
    """Two calls on the triton backend give bitwise identical outputs (several chunks per sample)."""
    shape = (3, 5000)
    sched = (torch.tensor([1.0, 0.9, 0.5], device=DEVICE), torch.tensor([0.9, 0.75, 0.0], device=DEVICE), 0.9)
    with rk.use_backend("triton"):
        x, v, nz, xn = _inputs(shape, F32, BF16, DEVICE, "cps", sched)
        old = rk.cps_logprob(x, v, xn, sched[0], sched[1], eta=0.9) + 1e-6
        adv = torch.tensor([1.0, -6.0, 0.5], device=DEVICE)
        v_ref = v + 1 if with_ref else None
        runs = [_run_ppo(rk.ppo_clip_loss, x, v, xn, old, adv, sched, "cps", v_ref, 0.5) for _ in range(2)]
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
        assert all(torch.equal(runs[0][2][k], runs[1][2][k]) for k in runs[0][2])
        a = rk.cps_step(x, v, sched[0], sched[1], eta=0.9, noise=nz)
        b = rk.cps_step(x, v, sched[0], sched[1], eta=0.9, noise=nz)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_compile_aot_eager(device_backend, dynamo_reset):
    """torch.compile(fullgraph=True, backend="aot_eager") over the three ops (scalar and [B]
    schedules): values and gradients equal eager."""
    device, _ = device_backend
    shape = (3, 4, 9, 7)
    x, v, nz, vr = (torch.randn(shape, device=device) for _ in range(4))
    s, sn = torch.tensor([1.0, 0.9, 0.5], device=device), torch.tensor([0.9, 0.75, 0.0], device=device)
    adv = torch.tensor([1.0, -6.0, 0.5], device=device)

    def fn(x, v, nz, vr, s, sn, adv):
        xn, mean = rk.cps_step(x, v, s, sn, eta=0.9, noise=nz)
        lp = rk.cps_logprob(x, v, xn.detach(), 0.9, 0.75, eta=0.9)
        lp2 = rk.cps_logprob(x, v, xn.detach(), 0.9, 0.75, eta=0.7, kind="sde", sigma_max=0.95)
        loss, st = rk.ppo_clip_loss(x, v, xn.detach(), lp.detach() + 1e-6, adv, s, sn, eta=0.9, v_ref=vr,
                                    kl_coef=0.5, clip_range=1e-4, return_stats=True)
        return loss + lp.sum() + 0.1 * lp2.sum() + (xn * mean).mean(), st["ratio_mean"], st["logp"]

    outs = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        xx, vv = _leaf(x), _leaf(v)
        out = f(xx, vv, nz, vr, s, sn, adv)
        outs.append((*out, *torch.autograd.grad(out[0], (xx, vv))))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=FP32_RTOL, atol=FP32_RTOL * max(_amax(b), 1e-6))
