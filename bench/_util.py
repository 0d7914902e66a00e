"""Shared helpers of the benchmark suite (bench/test_dmd.py) and the one-shot GPU check (bench/gpu_check.py).

Cases, input builders, the fwd+bwd step of each provider, byte floors, peak-memory probes and table
formatting. Importing it imports ``rtdmd_kernels`` and changes no environment: benchmarks never run under
Triton's interpreter, so every entry point calls ``_env.no_triton_interpreter()`` before importing this
module (bench/_env.py; bench/conftest.py and the scripts do).
"""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _env import bench_device  # noqa: F401  (bench/_env.py: torch-free, shared with report.py)
from report import markdown_table  # noqa: F401  (bench/report.py: the one table formatter, torch-free)

import rtdmd_kernels as rk
from rtdmd_kernels import reference

BENCH_DIR = Path(__file__).resolve().parent

OPS = ("dmd_loss", "ac_dmd_loss")

# Latent tensors the loss sees (docs/kernels.md §9): [B, C, H/8, W/8] for SD3.5-M, [B, 128, H/16, W/16] for
# FLUX.2 (patchified). The B = 24 FLUX.2 1024 px case is the >= 128 MB one where bandwidth targets apply.
CASES: dict[str, tuple[int, ...]] = {
    "sd35m-512": (8, 16, 64, 64),
    "sd35m-1024": (8, 16, 128, 128),
    "flux2-512": (8, 128, 32, 32),
    "flux2-1024": (8, 128, 64, 64),
    "flux2-1024-b24": (24, 128, 64, 64),
}
CPU_CASES = ("sd35m-512", "flux2-512")
DRY_CASES: dict[str, tuple[int, ...]] = {"tiny-a": (2, 4, 8, 8), "tiny-b": (3, 8, 4, 4)}

# Tensors the floor traffic of one fwd+bwd counts: every input read once + the gradient written once.
N_TENSORS = {"dmd_loss": 4, "ac_dmd_loss": 7}  # x, x_fake, x_real, dx | x_s, x_t, v_real, v_uncond, v_fake, noise, dx

GUIDANCE = 4.5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def shape_str(shape) -> str:
    return "x".join(str(s) for s in shape)


def cases_for(device: str) -> list[str]:
    return list(CASES) if device == "cuda" else list(CPU_CASES)


def dtypes_for(device: str) -> list[str]:
    return ["float32", "bfloat16"] if device == "cuda" else ["float32"]


def providers_for(device: str) -> list[str]:
    return ["ours", "reference", "compiled"] if device == "cuda" else ["ours", "reference"]


def bench_params(ops, device: str, prefix: str = "") -> list:
    """pytest params (op, provider, case, dtype) over every op, latent case, dtype and provider of
    ``device``; ids ``{prefix}{op}-{provider}-{case}-{dtype}``."""
    import pytest

    return [pytest.param(op, provider, case, dtype, id=f"{prefix}{op}-{provider}-{case}-{dtype}")
            for op in ops for case in cases_for(device) for dtype in dtypes_for(device)
            for provider in providers_for(device)]


def floor_bytes(op: str, shape, dtype: torch.dtype) -> int:
    """Floor traffic of one fwd+bwd: each input read once and dx written once (docs/kernels.md §9)."""
    return N_TENSORS[op] * math.prod(shape) * torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------
# inputs


@dataclass
class Inputs:
    """One call's arguments: ``fn(x, *rest, **kwargs)``; ``x`` is the differentiable leaf."""

    op: str
    x: torch.Tensor
    rest: tuple
    kwargs: dict = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        ts = [self.x] + [t for t in self.rest if isinstance(t, torch.Tensor)]
        return ts + [v for v in self.kwargs.values() if isinstance(v, torch.Tensor)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def cast(self, dtype: torch.dtype) -> Inputs:
        """A copy with every full-size tensor in ``dtype`` (schedule tensors ``[B]`` stay float32)."""
        full = self.x.shape

        def conv(t):
            if isinstance(t, torch.Tensor) and t.shape == full:
                return t.detach().to(dtype).clone()
            return t

        x = self.x.detach().to(dtype).clone().requires_grad_(True)
        return Inputs(self.op, x, tuple(conv(t) for t in self.rest), {k: conv(v) for k, v in self.kwargs.items()})


def make_inputs(op: str, shape, dtype: torch.dtype, device: str, seed: int = 0) -> Inputs:
    """Random, never-zero inputs of a realistic kind: x near x_real, x_fake near x_real; for AC-DMD
    per-sample ``sigma_s < sigma_t`` ``[B]`` tensors, a CFG teacher (``v_real_uncond``, guidance 4.5)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = tuple(shape)

    def randn():
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)

    if op == "dmd_loss":
        x = randn()
        x_real = x + 0.5 * randn()
        x_fake = x_real + 0.1 * randn()
        return Inputs(op, x.to(dtype).requires_grad_(True), (x_fake.to(dtype), x_real.to(dtype)))
    if op == "ac_dmd_loss":
        B = shape[0]
        x_s, x_t, v_real, v_unc, noise = (randn().to(dtype) for _ in range(5))
        v_fake = (v_real.float() + 0.2 * randn()).to(dtype)
        sigma_t = 0.4 + 0.55 * torch.rand(B, generator=gen, device=device)
        sigma_s = sigma_t * (0.3 + 0.5 * torch.rand(B, generator=gen, device=device))
        kwargs = {"v_real_uncond": v_unc, "guidance_scale": GUIDANCE}
        return Inputs(op, x_s.requires_grad_(True), (x_t, v_real, v_fake, noise, sigma_s, sigma_t), kwargs)
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


# ---------------------------------------------------------------------------------------------
# providers and steps

_COMPILED: dict[tuple[str, bool], object] = {}


def raise_recompile_limit(n: int = 64) -> None:
    """dynamic=False recompiles per shape/dtype; keep dynamo from falling back to eager after 8."""
    cfg = torch._dynamo.config
    for new, old in (("recompile_limit", "cache_size_limit"),
                     ("accumulated_recompile_limit", "accumulated_cache_size_limit")):
        name = new if hasattr(cfg, new) else old
        if hasattr(cfg, name):
            setattr(cfg, name, max(int(getattr(cfg, name)), n))


def compiled_reference(op: str, dynamic: bool = False):
    """``torch.compile(reference.<op>, dynamic=...)``, one wrapper per op (dynamo caches per shape)."""
    key = (op, dynamic)
    if key not in _COMPILED:
        raise_recompile_limit()
        _COMPILED[key] = torch.compile(getattr(reference, op), dynamic=dynamic)
    return _COMPILED[key]


def provider_fn(op: str, provider: str):
    if provider == "ours":
        return getattr(rk, op)
    if provider == "reference":
        return getattr(reference, op)
    if provider == "compiled":
        return compiled_reference(op)
    raise ValueError(f"provider must be ours, reference or compiled, got {provider!r}")


def make_step(fn, inp: Inputs, sync: bool = False):
    """One fwd+bwd: loss, then ``torch.autograd.grad`` on x (nothing accumulates); returns dx."""
    x, rest, kwargs = inp.x, inp.rest, inp.kwargs

    def step():
        loss = fn(x, *rest, **kwargs)
        (dx,) = torch.autograd.grad(loss, x)
        if sync:
            torch.cuda.synchronize()
        return dx

    return step


def make_forward(fn, inp: Inputs, sync: bool = False):
    """The forward alone, as training runs it (x requires grad, so ours also forms the gradient)."""
    x, rest, kwargs = inp.x, inp.rest, inp.kwargs

    def fwd():
        loss = fn(x, *rest, **kwargs)
        if sync:
            torch.cuda.synchronize()
        return loss

    return fwd


def warm_up(step, provider: str, what: str, warm: bool = True) -> None:
    """One untimed call when warm, and always for ``compiled``: a compile failure then skips the
    benchmark instead of failing the suite."""
    if not (warm or provider == "compiled"):
        return
    try:
        step()
    except Exception as exc:
        if provider == "compiled":
            import pytest

            pytest.skip(f"torch.compile({what}) failed: {type(exc).__name__}: {exc}")
        raise


def record(benchmark, *, op: str, provider: str, case: str, dtype: str, nbytes: int, device: str, main,
           mode: str) -> None:
    """The extra_info every benchmark carries (bench/conftest.py and bench/report.py print their tables
    from it); ``mode`` is ``fwd`` or ``fwd+bwd``: what is timed."""
    info = {"op": op, "mode": mode, "provider": provider, "case": case, "shape": shape_str(CASES[case]),
            "dtype": dtype, "bytes": nbytes, "device": device,
            "backend": rk.backend_for(main) if provider == "ours" else
            "eager" if provider == "reference" else "inductor"}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    benchmark.extra_info.update(info)


def loss_and_grad(fn, inp: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    loss = fn(inp.x, *inp.rest, **inp.kwargs)
    (dx,) = torch.autograd.grad(loss, inp.x)
    return loss.detach(), dx


def sync_check(fn) -> dict:
    """Run ``fn`` once under ``torch.cuda.set_sync_debug_mode("error")``: ``{"no_host_sync": True}``, or
    ``False`` with the error when it synchronised the host with the device."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return {"no_host_sync": True}
    except RuntimeError as exc:
        return {"no_host_sync": False, "error": str(exc)[:200]}
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| in float64 (max-abs relative error)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.abs().max().item() if b.numel() else 0.0
    num = (a - b).abs().max().item() if b.numel() else 0.0
    return num / denom if denom > 0 else num


# ---------------------------------------------------------------------------------------------
# timing (CPU, or wherever do_bench is not used)


def perf_counter_ms(fn, min_reps: int = 5, max_reps: int = 50, budget_s: float = 0.25) -> float:
    """Median wall time of ``fn()`` in ms: 2 warm-up calls, then reps until the budget or max_reps."""
    for _ in range(2):
        fn()
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


# ---------------------------------------------------------------------------------------------
# peak memory


def cuda_peak_bytes(step) -> int:
    """Peak allocator bytes of one ``step()`` above what was allocated before it (the inputs).

    One warm-up call first (compilation, lazy init); the peak includes the returned gradient.
    """
    out = step()
    del out
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


def proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child_peak_rss(op: str, provider: str, shape, dtype: str, factory: str | None = None) -> dict:
    """Runs in a fresh process: peak RSS increase of one fwd+bwd over the RSS with the inputs built.

    ``factory`` (``"module:function"``, a module in bench/) builds ``(step, input_bytes)`` from
    ``(op, provider, shape, dtype)`` for ops outside ``OPS``."""
    import importlib
    import resource

    torch.manual_seed(0)
    if factory:
        mod, name = factory.split(":")
        step, input_bytes = getattr(importlib.import_module(mod), name)(op, provider, tuple(shape), dtype)
    else:
        inp = make_inputs(op, shape, DTYPES[dtype], "cpu")
        step, input_bytes = make_step(provider_fn(op, provider), inp), inp.nbytes()
    gc.collect()
    if reset_peak_rss() and proc_status_bytes("VmHWM") is not None:
        out = step()  # warm-up: one-time lazy initialisation stays out of the number
        del out
        gc.collect()
        reset_peak_rss()
        base = proc_status_bytes("VmRSS")
        out = step()
        peak = proc_status_bytes("VmHWM") - base
        method = "VmHWM (clear_refs)"
    else:  # first call, measured against the lifetime peak so far
        base = proc_status_bytes("VmRSS")
        if base is None:
            import psutil

            base = psutil.Process().memory_info().rss
        out = step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        method = "ru_maxrss delta"
    return {"peak_bytes": max(int(peak), 0), "method": method, "input_bytes": input_bytes,
            "grad_bytes": sum(t.numel() * t.element_size() for t in (out if isinstance(out, tuple) else (out,)))}


_CHILD = (
    "import json, sys; sys.path.insert(0, sys.argv[1]); import _util as u; "
    "a = json.loads(sys.argv[2]); print('PEAK_RSS_JSON ' + json.dumps(u._child_peak_rss(**a)))"
)


def cpu_peak_rss(op: str, provider: str, shape, dtype: str, timeout: float = 300, factory: str | None = None) -> dict:
    """Peak RSS increase of one fwd+bwd in a fresh subprocess (glibc's mmap threshold is pinned so
    freed large blocks go back to the OS and the peak is not hidden by a warm heap); ``factory`` as in
    ``_child_peak_rss``."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    args = json.dumps({"op": op, "provider": provider, "shape": list(shape), "dtype": dtype, "factory": factory})
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(BENCH_DIR), args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("PEAK_RSS_JSON "):
            return json.loads(line[len("PEAK_RSS_JSON "):])
    raise RuntimeError(f"peak-RSS subprocess failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}")
