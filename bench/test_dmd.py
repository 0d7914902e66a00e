"""Benchmarks of the DMD / AC-DMD generator losses: fwd+bwd time and peak memory per provider.

Run: ``pytest bench/ --benchmark-only`` (``--benchmark-disable`` runs every body once, untimed).
Providers: ``ours`` (auto backend: Triton on CUDA, torch on CPU), ``reference`` (reference.py eager,
what the reference trainer runs today) and, on CUDA, ``compiled`` (``torch.compile(reference)``).
``extra_info`` holds ``op``, ``provider``, ``shape``, ``dtype`` and ``bytes``: the floor traffic of one
fwd+bwd (every input read once + dx written once), the same for every provider, so GB/s compare.
"""

from __future__ import annotations

import _util as bu
import pytest
import torch

DEVICE = bu.bench_device()
SYNC = DEVICE == "cuda"  # pytest-benchmark reads a host clock: wait for the device inside the step

PARAMS = bu.bench_params(bu.OPS, DEVICE)


def _info(op, provider, case, dtype, inp, **more):
    shape = bu.CASES[case]
    info = {
        "op": op,
        "mode": "fwd+bwd",
        "provider": provider,
        "case": case,
        "shape": bu.shape_str(shape),
        "dtype": dtype,
        "bytes": bu.floor_bytes(op, shape, bu.DTYPES[dtype]),
        "device": DEVICE,
        "backend": bu.rk.backend_for(inp.x) if provider == "ours" else "eager" if provider == "reference" else
        "inductor",
    }
    if DEVICE == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    info.update(more)
    return info


def _setup(op, provider, case, dtype, warm: bool):
    """Inputs and the fwd+bwd step; one untimed call first when warm (and always for compiled,
    so a compile failure skips instead of failing the suite)."""
    inp = bu.make_inputs(op, bu.CASES[case], bu.DTYPES[dtype], DEVICE)
    step = bu.make_step(bu.provider_fn(op, provider), inp, sync=SYNC)
    bu.warm_up(step, provider, f"reference.{op}", warm=warm)
    return inp, step


@pytest.mark.parametrize("op,provider,case,dtype", PARAMS)
def test_fwd_bwd(benchmark, op, provider, case, dtype):
    inp, step = _setup(op, provider, case, dtype, warm=not benchmark.disabled)
    benchmark.group = f"{op} {case} {dtype}"
    benchmark.extra_info.update(_info(op, provider, case, dtype, inp))
    dx = benchmark(step)
    assert dx.shape == inp.x.shape and dx.dtype == inp.x.dtype


@pytest.mark.parametrize("op,provider,case,dtype", PARAMS)
def test_peak_memory(benchmark, op, provider, case, dtype):
    """Peak memory of one fwd+bwd above the inputs: CUDA allocator peak, or on CPU the peak RSS of a
    fresh subprocess. The single timed round is incidental; the number is ``extra_info['peak_bytes']``."""
    inp, step = _setup(op, provider, case, dtype, warm=False)
    if DEVICE == "cuda":
        peak = {"peak_bytes": bu.cuda_peak_bytes(step), "method": "cuda max_memory_allocated",
                "input_bytes": inp.nbytes(), "grad_bytes": inp.x.numel() * inp.x.element_size()}
    else:
        peak = bu.cpu_peak_rss(op, provider, bu.CASES[case], dtype)
    benchmark.group = f"memory {op} {case} {dtype}"
    benchmark.extra_info.update(_info(op, provider, case, dtype, inp, kind="memory", **peak))
    dx = benchmark.pedantic(step, rounds=1, iterations=1)
    assert dx.shape == inp.x.shape
    assert peak["peak_bytes"] >= 0
