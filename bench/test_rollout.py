"""Smoke benchmark of ``rk.checkpointed_rollout`` memory: a tiny SD3 transformer, K in {1, 2}, four modes.

The real measurement is ``python bench/rollout_memory.py`` (K up to 8, a bigger model, every point in a
fresh subprocess); this runs the same functions on a tiny model so the script cannot rot. Modes:
``plain`` (checkpoint=False), ``step`` (checkpoint=True), ``block`` (diffusers'
``enable_gradient_checkpointing``), ``both``. ``extra_info``: op="checkpointed_rollout",
provider=mode, shape, dtype, bytes=0, peak_bytes (peak memory of one fwd+bwd above the baseline: CUDA
allocator peak, or the peak RSS on CPU, here measured in-process and so only indicative).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import _util as bu  # noqa: E402
import rollout_memory as rm  # noqa: E402

if not hasattr(bu.rk, "checkpointed_rollout"):
    pytest.skip("rtdmd_kernels.checkpointed_rollout is not available", allow_module_level=True)

DEVICE = bu.bench_device()
DTYPE = "bfloat16" if DEVICE == "cuda" else "float32"
KS = (1, 2)


@pytest.fixture(scope="module")
def tiny():
    spec = rm.model_spec("tiny")
    return spec, rm.build(spec, DEVICE, getattr(torch, DTYPE))


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("mode", rm.MODES)
def test_rollout_peak_memory(benchmark, tiny, mode, K):
    spec, built = tiny
    res = rm.measure_point(spec, K, mode, DEVICE, DTYPE, built=built)
    assert res["peak_bytes"] >= 0 and res["time_s"] > 0 and res["K"] == K
    model, x_T, enc, pooled = built
    rm.set_block_checkpointing(model, rm.MODE_FLAGS[mode][1])
    step, leaf = rm.make_step(model, x_T, enc, pooled, K, mode)
    benchmark.group = f"rollout memory tiny K={K} {DTYPE}"
    benchmark.extra_info.update({
        "op": "checkpointed_rollout", "mode": "fwd+bwd", "provider": mode, "case": f"tiny-K{K}",
        "shape": bu.shape_str(res["shape"]) + f" K={K}", "dtype": DTYPE, "bytes": 0, "device": DEVICE,
        "kind": "memory", "peak_bytes": res["peak_bytes"], "input_bytes": res["latent_bytes"],
        "param_bytes": res["param_bytes"], "method": res["method"], "K": K,
    })
    loss = benchmark.pedantic(step, rounds=1, iterations=1)
    assert torch.isfinite(loss)
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    rm._zero_grads(model)


def test_modes_agree(tiny):
    """The four modes compute the same loss and x_T gradient (K=2): the benchmark compares like with like."""
    spec, built = tiny
    model, x_T, enc, pooled = built
    noises, sigmas = rm.noises_for(2, x_T), rm.schedule(2, DEVICE)
    out = {}
    for mode in rm.MODES:
        rm.set_block_checkpointing(model, rm.MODE_FLAGS[mode][1])
        step, leaf = rm.make_step(model, x_T, enc, pooled, 2, mode, noises=noises, sigmas=sigmas)
        out[mode] = (step(), leaf.grad.clone())
        rm._zero_grads(model)
    rm.set_block_checkpointing(model, False)
    tol = 1e-5 if DTYPE == "float32" else 5e-2
    for mode in rm.MODES[1:]:
        assert torch.allclose(out[mode][0], out["plain"][0], rtol=tol, atol=tol), mode
        assert bu.rel_err(out[mode][1], out["plain"][1]) < tol * 10, mode


def test_cpu_subprocess_point():
    """One point through the fresh-subprocess path the script uses on CPU."""
    if DEVICE != "cpu":
        pytest.skip("the subprocess path is the CPU measurement")
    res = rm.cpu_point(rm.model_spec("tiny"), 1, "step")
    assert res["method"].startswith("VmHWM") and res["peak_bytes"] >= 0 and res["threads"] == rm.CPU_THREADS
