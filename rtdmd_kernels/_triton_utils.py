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

    @triton.jit
    def sample_block(D, BLOCK: tl.constexpr):
        # Elementwise grid (blocks of a sample, sample): (b, 64-bit offsets, mask) of this program's block.
        b = tl.program_id(1)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        return b, b.to(tl.int64) * D + offs, offs < D

    @triton.jit
    def chunk_coords(pid, S, D, CHUNK):
        # Program pid of a reduction grid (B * S,) handles chunk pid % S of sample b = pid // S:
        # (b, 64-bit sample base, 64-bit chunk start).
        b = pid // S
        return b, b.to(tl.int64) * D, (pid % S).to(tl.int64) * CHUNK

    @triton.jit
    def chunk_program(S, D, CHUNK):
        # This program's (pid, b, sample base, chunk start), in launch order.
        pid = tl.program_id(0)
        b, base, start = chunk_coords(pid, S, D, CHUNK)
        return pid, b, base, start

    @triton.jit
    def chunk_offsets(base, start, i, D, BLOCK: tl.constexpr):
        # 64-bit offsets and mask of the block at i within a chunk.
        offs = start + i + tl.arange(0, BLOCK)
        return base + offs, offs < D

    @triton.jit
    def stream_f32(ptr, offs, mask):
        # A streamed (read-once) load, upcast to fp32 right away.
        return tl.load(ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)

    @triton.jit
    def to_element(x, ptr):
        # fp32 x in ptr's element type, rounded to nearest even as the GPU's conversion and torch do. The CPU
        # interpreter's float32 -> bfloat16 conversion truncates instead, so bfloat16 is rounded here by hand
        # (the conversion after it is exact); NaN passes unchanged (its bits must not carry into the sign).
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
            x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
        return x.to(ptr.dtype.element_ty)
