"""Benchmarks of the fake-score side of AC-DMD (docs/kernels.md §5, docs/method.md §4.1–4.2): the fake-score loss and
the consistency regularizer fwd+bwd, and the renoise forward.

Run: ``pytest bench/ --benchmark-only -k fake_score`` (``--benchmark-disable`` runs every body once).
Shapes: the latent cases of ``_util.CASES`` (CPU: the two 512 px ones). Latents (x_s, noise, x_t, x1,
x2) are float32; the fake network's outputs v_hat, v1, v2 float32 (+ bfloat16 on CUDA, the network's
autocast output). Per-sample ``[B]`` float32 sigmas as docs/method.md §4.1–4.2 draws them: sigma_s cycles through
{0, 0.5, 0.75, 0.9} (the cold start's random stop), t_r ~ U{1000·sigma_s + 10, ..., max(1000,
1000·sigma_s + 11) - 1} clamped to [20, 980], sigma_t = t_r / 1000, sigma_p = max(t_r - U{1..200}, 0) / 1000;
x_t is the renoised x_s, x1 and x2 the two CPS transitions (eta = 0.9) from x_t to sigma_p.
Providers: ``ours`` (``rk.*``, auto backend: Triton on CUDA, torch on CPU), ``reference`` (reference.py
eager) and, on CUDA, ``compiled`` (``torch.compile(reference)``; skipped if it fails to compile).
  * ``fake_score_loss``: loss, then ``torch.autograd.grad`` wrt v_hat. ``bytes`` = v_hat, x_s, noise
    read once + dv_hat written once.
  * ``consistency_loss``: loss, then ``torch.autograd.grad`` wrt (v_hat, v1, v2). ``bytes`` = x_t,
    v_hat, x1, v1, x2, v2 read once + the 3 gradients written once.
  * ``renoise``: the forward alone (no grad; the fake update's renoise). x_s and noise in the case's
    dtype (bfloat16 on CUDA is the cold start's bf16 x_s). ``bytes`` = x_s, noise read + x_t written.
"""

from __future__ import annotations

import math

import _util as bu
import pytest
import torch

from rtdmd_kernels import reference

DEVICE = bu.bench_device()
SYNC = DEVICE == "cuda"  # pytest-benchmark reads a host clock: wait for the device inside the step
ETA = 0.9
OPS = ("fake_score_loss", "consistency_loss", "renoise")

PARAMS = bu.bench_params(OPS, DEVICE, prefix="fake_score-")


def draw_sigmas(B: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma_s, sigma_t, sigma_p) ``[B]`` float32, drawn as docs/method.md §4.1–4.2 (on a CPU generator, so the
    same on every device)."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    sigma_s = torch.tensor([0.0, 0.5, 0.75, 0.9], dtype=torch.float64)[torch.arange(B) % 4]
    lo = torch.round(1000 * sigma_s).long() + 10
    hi = torch.clamp(lo + 1, min=1000)
    t_r = (lo + (torch.rand(B, generator=gen, dtype=torch.float64) * (hi - lo)).long()).clamp(20, 980)
    delta = torch.randint(1, 201, (B,), generator=gen)
    t_p = (t_r - delta).clamp_min(0)
    f32 = dict(dtype=torch.float32, device=device)
    return sigma_s.to(**f32), (t_r.double() / 1000).to(**f32), (t_p.double() / 1000).to(**f32)


def _renoise_f32(x_s, noise, sigma_s, sigma_t):
    """docs/method.md §4.1 step 3 in float32 (inputs for the benchmark; the op itself is what is timed)."""
    s, t = (v.reshape(-1, *([1] * (x_s.dim() - 1))) for v in (sigma_s, sigma_t))
    a = (1 - t) / (1 - s)
    sts = torch.sqrt(torch.clamp(t * t - a * a * s * s, min=1e-12))
    return a * x_s + sts * noise, a, sts


def make_case(shape, v_dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """One fake-score update: x_s, fresh noise, the renoised x_t, a fake prediction v_hat near the
    conditional-velocity target, the two stop-grad CPS transitions x1, x2 to sigma_p and the fake's
    predictions there (v1, v2 near v_hat). v_hat, v1 and v2 require grad."""
    shape = tuple(shape)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn():
        return torch.randn(shape, generator=gen, device=device)

    sigma_s, sigma_t, sigma_p = draw_sigmas(shape[0], device, seed)
    x_s, noise = randn(), randn()
    with torch.no_grad():
        x_t, _, sts = _renoise_f32(x_s, noise, sigma_s, sigma_t)
        s, t = (v.reshape(-1, *([1] * (x_s.dim() - 1))) for v in (sigma_s, sigma_t))
        beta = t + (1 - t) * s * s / (1 - s) ** 2
        target_f = -x_s / (1 - s) + (beta / sts) * noise  # the move_scale_out=False target (docs/method.md §4.1)
        v_hat = (target_f + 0.5 * randn()).to(v_dtype)
        x1 = reference.cps_transition(x_t, v_hat, sigma_t, sigma_p, ETA, randn()).float()
        x2 = reference.cps_transition(x_t, v_hat, sigma_t, sigma_p, ETA, randn()).float()
        v1 = (v_hat.float() + 0.2 * randn()).to(v_dtype)
        v2 = (v_hat.float() + 0.2 * randn()).to(v_dtype)
    return {"x_s": x_s, "noise": noise, "x_t": x_t.contiguous(), "x1": x1, "x2": x2,
            "v_hat": v_hat.requires_grad_(True), "v1": v1.requires_grad_(True), "v2": v2.requires_grad_(True),
            "sigma_s": sigma_s, "sigma_t": sigma_t, "sigma_p": sigma_p}


def op_fn(op: str, provider: str):
    if provider == "compiled":
        return bu.compiled_reference(op)
    return getattr(bu.rk if provider == "ours" else reference, op)


def make_step(op: str, fn, c: dict, sync: bool = SYNC):
    """One call as training runs it: fwd+bwd of the two losses (grads via ``torch.autograd.grad``,
    nothing accumulates), the renoise forward under no_grad. Returns the gradient(s) / x_t."""
    if op == "fake_score_loss":
        v, x_s, nz, s_s, s_t = c["v_hat"], c["x_s"], c["noise"], c["sigma_s"], c["sigma_t"]

        def step():
            loss = fn(v, x_s, nz, s_s, s_t)
            (dv,) = torch.autograd.grad(loss, v)
            if sync:
                torch.cuda.synchronize()
            return dv

        return step
    if op == "consistency_loss":
        x_t, v, s_t, x1, v1, x2, v2, s_p = (c[k] for k in ("x_t", "v_hat", "sigma_t", "x1", "v1", "x2", "v2",
                                                            "sigma_p"))

        def step():
            loss = fn(x_t, v, s_t, x1, v1, x2, v2, s_p)
            grads = torch.autograd.grad(loss, (v, v1, v2))
            if sync:
                torch.cuda.synchronize()
            return grads

        return step
    if op == "renoise":
        x_s, nz, s_s, s_t = c["x_s"], c["noise"], c["sigma_s"], c["sigma_t"]

        def step():
            with torch.no_grad():
                x_t = fn(x_s, nz, s_s, s_t)
            if sync:
                torch.cuda.synchronize()
            return x_t

        return step
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def renoise_case(c: dict, dtype: torch.dtype) -> dict:
    """The renoise benchmark's inputs: x_s and noise in ``dtype`` (float32 or the cold start's bf16)."""
    if dtype == torch.float32:
        return c
    return dict(c, x_s=c["x_s"].to(dtype), noise=c["noise"].to(dtype))


def floor_bytes(op: str, shape, v_dtype: torch.dtype) -> int:
    """Floor traffic of one call: every input read once + every output / gradient written once."""
    n, vb = math.prod(shape), torch.empty((), dtype=v_dtype).element_size()
    if op == "fake_score_loss":
        return n * (vb + 4 + 4 + vb)  # v_hat, x_s, noise read; dv_hat written
    if op == "consistency_loss":
        return n * (3 * 4 + 3 * vb + 3 * vb)  # x_t, x1, x2, v_hat, v1, v2 read; dv_hat, dv1, dv2 written
    if op == "renoise":
        return n * 3 * vb  # x_s, noise read; x_t written (all in the case's dtype)
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


@pytest.mark.parametrize("op,provider,case,vdt", PARAMS)
def test_fake_score(benchmark, op, provider, case, vdt):
    shape = bu.CASES[case]
    v_dtype = bu.DTYPES[vdt]
    c = make_case(shape, v_dtype, DEVICE)
    if op == "renoise":
        c = renoise_case(c, v_dtype)
    step = make_step(op, op_fn(op, provider), c)
    bu.warm_up(step, provider, f"reference.{op}", warm=not benchmark.disabled)
    benchmark.group = f"{op} {case} {'x' if op == 'renoise' else 'v'}={vdt}"
    bu.record(benchmark, op=op, provider=provider, case=case, dtype=vdt, nbytes=floor_bytes(op, shape, v_dtype),
              device=DEVICE, main=c["x_s"], mode="fwd" if op == "renoise" else "fwd+bwd")
    out = benchmark(step)
    if op == "renoise":
        assert out.shape == shape and torch.isfinite(out).all()
    else:
        outs = (out,) if op == "fake_score_loss" else out
        for g in outs:
            assert g.shape == shape and g.dtype == v_dtype and torch.isfinite(g).all()


def memory_step(op: str, provider: str, shape, dtype: str):
    """``_util.cpu_peak_rss`` factory: one fwd+bwd of a loss on the CPU case, and its input bytes."""
    c = make_case(tuple(shape), bu.DTYPES[dtype], "cpu")
    inputs = ("v_hat", "x_s", "noise") if op == "fake_score_loss" else ("x_t", "v_hat", "x1", "v1", "x2", "v2")
    return make_step(op, op_fn(op, provider), c, sync=False), sum(c[k].numel() * c[k].element_size() for k in inputs)


MEM_PARAMS = [p for p in PARAMS if p.values[0] != "renoise"]


@pytest.mark.parametrize("op,provider,case,vdt", MEM_PARAMS)
def test_fake_score_peak_memory(benchmark, op, provider, case, vdt):
    """Peak memory of one fwd+bwd above the inputs (``extra_info['peak_bytes']``; the single timed round is
    incidental): CUDA allocator peak, or on CPU the peak RSS of a fresh subprocess."""
    shape = bu.CASES[case]
    v_dtype = bu.DTYPES[vdt]
    c = make_case(shape, v_dtype, DEVICE)
    step = make_step(op, op_fn(op, provider), c)
    if DEVICE == "cuda":
        peak = {"peak_bytes": bu.cuda_peak_bytes(step), "method": "cuda max_memory_allocated"}
    else:
        peak = bu.cpu_peak_rss(op, provider, shape, vdt, factory="test_fake_score:memory_step")
    benchmark.group = f"memory {op} {case} v={vdt}"
    bu.record(benchmark, op=op, provider=provider, case=case, dtype=vdt, nbytes=floor_bytes(op, shape, v_dtype),
              device=DEVICE, main=c["x_s"], mode="fwd+bwd")
    benchmark.extra_info.update({"kind": "memory", **peak})
    benchmark.pedantic(step, rounds=1, iterations=1)
    assert peak["peak_bytes"] >= 0
