"""@triton.jit helpers shared by the kernel modules (defined only when triton imports)."""

from __future__ import annotations

from ._backend import triton_available

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def per_sample_value(table_ptr, b, i: tl.constexpr, NCOL: tl.constexpr, value, PER_SAMPLE: tl.constexpr):
        # Column i of sample b in a [B, NCOL] table of per-sample scalars, or the scalar argument.
        if PER_SAMPLE:
            return tl.load(table_ptr + b * NCOL + i).to(tl.float32)
        else:
            return value
