"""The op timings the per-op files lack: every loss's forward alone, and the fwd+bwd of the elementwise ops.

Run: ``pytest bench/ --benchmark-only -k ops_forward`` (``--benchmark-disable`` runs every body once).
Shapes, dtypes and providers as the other files (``_util.CASES``; CPU: the two 512 px cases; ``ours``,
``reference`` and, on CUDA, ``compiled``), inputs from the same builders (``_util.make_inputs``,
``test_fake_score.make_case``, ``test_grpo_policy.make_case``). ``extra_info['mode']`` says what is timed:

* ``fwd``: ``dmd_loss``, ``ac_dmd_loss``, ``fake_score_loss``, ``consistency_loss``, ``ppo_clip_loss``
  called as training calls them (their differentiable inputs require grad, so ours may already form the
  gradient), no backward; ``cps_step`` and ``cps_logprob`` under ``no_grad`` (the rollout), reference
  ``cps_step_with_logprob`` (what the trainer calls for both); ``checkpointed_decode`` with grad enabled.
* ``fwd+bwd``: ``cps_step`` (``autograd.grad`` of x_next wrt x and v against a fixed upstream gradient),
  ``cps_logprob`` (wrt v, upstream ones ``[B]``), ``renoise`` (wrt x_s and noise), ``checkpointed_decode``
  (loss ``mean(image**2)``, wrt the latents and the decoder's weights).

``bytes``: every full-size input (and upstream gradient) read once, every full-size output and gradient
written once; ``[B]`` and scalar tensors are not counted, as in the other files.

``checkpointed_decode`` decodes the case's latents with a small conv decoder (conv 3x3 to 32 channels,
SiLU, 2x nearest upsample, conv 3x3 to 3) in chunks of B/4 samples; ``reference`` is the decoder over the
whole batch with grad (what the reference trainer does; no ``compiled``). Its peak memory of one fwd+bwd
is ``test_decode_peak_memory`` (CUDA allocator peak; on CPU the peak RSS of a fresh subprocess).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import _util as bu
import pytest
import test_fake_score as fs
import test_grpo_policy as gp
import torch

from rtdmd_kernels import reference

DEVICE = bu.bench_device()
SYNC = DEVICE == "cuda"  # pytest-benchmark reads a host clock: wait for the device inside the step
ETA = 0.9
FWD_OPS = ("dmd_loss", "ac_dmd_loss", "fake_score_loss", "consistency_loss", "ppo_clip_loss", "cps_step",
           "cps_logprob", "checkpointed_decode")
FWD_BWD_OPS = ("cps_step", "cps_logprob", "renoise", "checkpointed_decode")
DECODE = "checkpointed_decode"


def _params(ops, mode: str) -> list:
    """bench_params without ``compiled`` for the decode (torch.compile of a module is not the op)."""
    return [p for p in bu.bench_params(ops, DEVICE, prefix=f"ops_{mode}-")
            if not (p.values[0] == DECODE and p.values[1] == "compiled")]


FWD_PARAMS = _params(FWD_OPS, "fwd")
FWD_BWD_PARAMS = _params(FWD_BWD_OPS, "fwdbwd")
DECODE_MEM_PARAMS = [p for p in FWD_BWD_PARAMS if p.values[0] == DECODE]


def _nb(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


@dataclass
class Call:
    """One op call: ``run()`` returns the outputs, ``diff`` picks the differentiable one(s) of them;
    ``leaves`` get gradients against ``grad_out``; ``read`` / ``written`` are the forward's floor bytes."""

    run: Callable[[], object]
    leaves: tuple
    read: int
    written: int
    diff: Callable[[object], object] = lambda out: out
    grad_out: torch.Tensor | None = None
    no_grad_fwd: bool = False

    def floor_bytes(self, mode: str) -> int:
        if mode == "fwd":
            return self.read + self.written
        up = _nb(self.grad_out) if self.grad_out is not None and self.grad_out.dim() > 1 else 0
        return self.read + self.written + up + _nb(*self.leaves)

    def step(self, mode: str):
        def fwd():
            if self.no_grad_fwd:
                with torch.no_grad():
                    out = self.run()
            else:
                out = self.run()
            if SYNC:
                torch.cuda.synchronize()
            return out

        def fwd_bwd():
            grads = torch.autograd.grad(self.diff(self.run()), self.leaves, grad_outputs=self.grad_out)
            if SYNC:
                torch.cuda.synchronize()
            return grads

        return fwd if mode == "fwd" else fwd_bwd


def _ref(name: str, provider: str):
    """``reference.<name>`` eager, or compiled on ``compiled``."""
    return bu.compiled_reference(name) if provider == "compiled" else getattr(reference, name)


# ---------------------------------------------------------------------------------------------
# checkpointed_decode


_DECODERS: dict[tuple, torch.nn.Module] = {}


def decoder(channels: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The small conv decoder of ``channels`` latent channels (seeded weights, one per channels/dtype)."""
    key = (channels, dtype, device)
    if key not in _DECODERS:
        torch.manual_seed(0)
        _DECODERS[key] = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.Upsample(scale_factor=2),
            torch.nn.Conv2d(32, 3, 3, padding=1)).to(device=device, dtype=dtype)
    return _DECODERS[key]


def decode_call(provider: str, shape, dtype: torch.dtype, device: str = DEVICE) -> Call:
    """``checkpointed_decode`` (ours, chunks of B/4) or the whole-batch decode with grad (reference)."""
    dec = decoder(shape[1], dtype, device)
    gen = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(shape, generator=gen, device=device).to(dtype).requires_grad_(True)
    params = tuple(dec.parameters())
    chunk = max(shape[0] // 4, 1)
    if provider == "ours":
        def run():
            return bu.rk.checkpointed_decode(dec, z, chunk)
    else:
        def run():
            return dec(z)
    B, _, H, W = shape
    image = B * 3 * 4 * H * W * z.element_size()
    return Call(run, (z, *params), read=_nb(z, *params), written=image,
                diff=lambda img: img.float().square().mean())


def decode_memory_step(op: str, provider: str, shape, dtype: str):
    """``_util.cpu_peak_rss`` factory: the decode's fwd+bwd step and its input bytes (CPU)."""
    call = decode_call(provider, shape, bu.DTYPES[dtype], "cpu")
    return call.step("fwd+bwd"), call.read


# ---------------------------------------------------------------------------------------------
# the other ops


def make_call(op: str, provider: str, case: str, dtype: str) -> Call:
    """The op's call on the case's inputs; ``dtype`` is every tensor's for the DMD losses and the
    renoise, the velocity's for the policy and fake-score ops (latents float32, as those files)."""
    shape, dt = bu.CASES[case], bu.DTYPES[dtype]
    n, es = math.prod(shape), dt.itemsize
    if op == DECODE:
        return decode_call(provider, shape, dt)
    if op in bu.OPS:
        inp = bu.make_inputs(op, shape, dt, DEVICE)
        fn = bu.provider_fn(op, provider)
        return Call(lambda: fn(inp.x, *inp.rest, **inp.kwargs), (inp.x,), read=(bu.N_TENSORS[op] - 1) * n * es,
                    written=0)
    if op in ("fake_score_loss", "consistency_loss"):
        c = fs.make_case(shape, dt, DEVICE)
        fn = fs.op_fn(op, provider)
        if op == "fake_score_loss":
            args, leaves = ("v_hat", "x_s", "noise", "sigma_s", "sigma_t"), (c["v_hat"],)
        else:
            args = ("x_t", "v_hat", "sigma_t", "x1", "v1", "x2", "v2", "sigma_p")
            leaves = (c["v_hat"], c["v1"], c["v2"])
        tensors = [c[k] for k in args]
        return Call(lambda: fn(*tensors), leaves, read=_nb(*(t for t in tensors if t.dim() > 1)), written=0)
    if op == "renoise":
        c = fs.renoise_case(fs.make_case(shape, torch.float32, DEVICE), dt)
        x_s, nz = c["x_s"].detach().requires_grad_(True), c["noise"].detach().requires_grad_(True)
        fn = fs.op_fn(op, provider)
        return Call(lambda: fn(x_s, nz, c["sigma_s"], c["sigma_t"]), (x_s, nz), read=_nb(x_s, nz),
                    written=_nb(x_s), grad_out=torch.randn_like(x_s))
    c = gp.make_case(shape, dt, DEVICE)
    x, v, xn, nz, s, sn = (c[k] for k in ("x", "v", "x_next", "noise", "sigma", "sigma_next"))
    if op == "ppo_clip_loss":
        fn = bu.provider_fn(op, provider)
        return Call(lambda: fn(x, v, xn, c["old"], c["adv"], s, sn, eta=ETA), (v,), read=_nb(x, v, xn), written=0)
    if op == "cps_step":
        x = x.detach().requires_grad_(True)
        if provider == "ours":
            def run():
                return bu.rk.cps_step(x, v, s, sn, eta=ETA, noise=nz)
        else:
            fn = _ref("cps_step_with_logprob", provider)

            def run():
                x_next, _, mean, _ = fn(x, v, s, sn, ETA, noise=nz)
                return x_next, mean
        return Call(run, (x, v), read=_nb(x, v, nz), written=2 * _nb(x), diff=lambda out: out[0],
                    grad_out=torch.randn_like(x), no_grad_fwd=True)
    if op == "cps_logprob":
        if provider == "ours":
            def run():
                return bu.rk.cps_logprob(x, v, xn, s, sn, eta=ETA)
        else:
            fn = _ref("cps_step_with_logprob", provider)

            def run():
                return fn(x, v, s, sn, ETA, x_next=xn)[1]
        return Call(run, (v,), read=_nb(x, v, xn), written=0, grad_out=torch.ones(shape[0], device=DEVICE),
                    no_grad_fwd=True)
    raise ValueError(f"unknown op {op!r}")


def _bench(benchmark, op: str, provider: str, case: str, dtype: str, mode: str):
    call = make_call(op, provider, case, dtype)
    step = call.step(mode)
    bu.warm_up(step, provider, f"reference.{op}", warm=not benchmark.disabled)
    benchmark.group = f"{op} {mode} {case} {dtype}"
    bu.record(benchmark, op=op, provider=provider, case=case, dtype=dtype, nbytes=call.floor_bytes(mode),
              device=DEVICE, main=call.leaves[0], mode=mode)
    return call, benchmark(step)


@pytest.mark.parametrize("op,provider,case,dtype", FWD_PARAMS)
def test_op_fwd(benchmark, op, provider, case, dtype):
    _, out = _bench(benchmark, op, provider, case, dtype, "fwd")
    outs = out if isinstance(out, tuple) else (out,)
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("op,provider,case,dtype", FWD_BWD_PARAMS)
def test_op_fwd_bwd(benchmark, op, provider, case, dtype):
    call, grads = _bench(benchmark, op, provider, case, dtype, "fwd+bwd")
    for g, leaf in zip(grads, call.leaves, strict=True):
        assert g.shape == leaf.shape and g.dtype == leaf.dtype and torch.isfinite(g).all()


@pytest.mark.parametrize("op,provider,case,dtype", DECODE_MEM_PARAMS)
def test_decode_peak_memory(benchmark, op, provider, case, dtype):
    """Peak memory of one decode fwd+bwd above the inputs (``extra_info['peak_bytes']``; the single timed
    round is incidental)."""
    shape = bu.CASES[case]
    call = make_call(op, provider, case, dtype)
    step = call.step("fwd+bwd")
    if DEVICE == "cuda":
        peak = {"peak_bytes": bu.cuda_peak_bytes(step), "method": "cuda max_memory_allocated"}
    else:
        peak = bu.cpu_peak_rss(op, provider, shape, dtype, factory="test_ops_forward:decode_memory_step")
    benchmark.group = f"memory {op} {case} {dtype}"
    bu.record(benchmark, op=op, provider=provider, case=case, dtype=dtype, nbytes=call.floor_bytes("fwd+bwd"),
              device=DEVICE, main=call.leaves[0], mode="fwd+bwd")
    benchmark.extra_info.update({"kind": "memory", "input_bytes": call.read, **peak})
    benchmark.pedantic(step, rounds=1, iterations=1)
    assert peak["peak_bytes"] >= 0
