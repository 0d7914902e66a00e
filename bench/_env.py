"""The benchmark processes' environment; torch-free, so bench/report.py can import it too.

Benchmarks never run under Triton's interpreter: it would time the interpreter, and on a GPU machine it would take
over every CUDA launch. Each entry point (bench/conftest.py, the bench scripts, ``python -m bench.report``) calls
:func:`no_triton_interpreter` before anything imports ``rtdmd_kernels``; importing a bench module leaves the
environment alone.
"""

from __future__ import annotations

import os


def no_triton_interpreter() -> str | None:
    """Remove ``TRITON_INTERPRET`` from ``os.environ``; returns the value removed (None when it was unset).

    Call it before ``rtdmd_kernels`` is imported: the kernels read the variable at import."""
    return os.environ.pop("TRITON_INTERPRET", None)


def bench_device() -> str:
    """``cuda`` when available, unless ``RTDMD_BENCH_DEVICE=cpu``."""
    want = os.environ.get("RTDMD_BENCH_DEVICE", "").strip().lower()
    if want in ("cpu", "cuda"):
        return want
    import torch  # deferred: report.py's tables must not need torch

    return "cuda" if torch.cuda.is_available() else "cpu"
