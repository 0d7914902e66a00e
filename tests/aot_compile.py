"""Ahead-of-time compile every Triton kernel for a Hopper GPU (sm_90) without a GPU.

Run as a script in a process where TRITON_INTERPRET is NOT set (interpreted kernels cannot be
compiled). Exit status 0 when every spec compiled; prints one line per spec. Used by
tests/test_aot_compile.py; each kernel issue adds its kernels' specs to SPECS.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget

from rtdmd_kernels import dmd

TARGET = GPUTarget("cuda", 90, 32)


def _sig(args: dict[str, str], constexprs: dict[str, object]) -> tuple[dict, dict]:
    signature = dict(args)
    signature.update({k: "constexpr" for k in constexprs})
    return signature, constexprs


def _dmd_specs():
    common_sched = {"s_s": "fp32", "s_t": "fp32", "gs": "fp32", "c_eta": "fp32", "s_eta": "fp32"}
    for dtype in ("fp32", "bf16", "fp16"):
        p = f"*{dtype}"
        for ac, uncond, per_sample in ((False, False, False), (True, False, False), (True, True, True)):
            args = {"x_ptr": p, "r_ptr": p, "v_ptr": p, "vu_ptr": p, "noise_ptr": p, "part_ptr": "*fp32",
                    "sched_ptr": "*fp32", **common_sched, "D": "i64", "CHUNK": "i32", "S": "i32"}
            yield (f"normalizer_partials {dtype} ac={ac} uncond={uncond} per_sample={per_sample}",
                   dmd._normalizer_partials_kernel,
                   *_sig(args, {"AC": ac, "HAS_UNCOND": uncond, "PER_SAMPLE": per_sample, "BLOCK": dmd.BLOCK}))
        for ac, norm, store in ((False, 0, True), (False, 1, False), (True, 2, True), (True, 0, True)):
            args = {"f_ptr": p, "r_ptr": p, "vu_ptr": p, "g_ptr": p, "part_ptr": "*fp32", "norm_ptr": "*fp32",
                    "sq_ptr": "*fp32", "sched_ptr": "*fp32", **common_sched, "D": "i64", "CHUNK": "i32",
                    "S": "i32", "count": "fp32", "eps": "fp32", "gmax": "fp32"}
            yield (f"grad {dtype} ac={ac} norm={norm} store={store}", dmd._grad_kernel,
                   *_sig(args, {"AC": ac, "HAS_UNCOND": ac, "PER_SAMPLE": ac, "NORM": norm, "S_BLOCK": 64,
                                "STORE_G": store, "BLOCK": dmd.BLOCK}))
        yield (f"scale_grad {dtype}", dmd._scale_grad_kernel,
               *_sig({"g_ptr": p, "go_ptr": "*fp32", "dx_ptr": p, "numel": "i64"}, {"BLOCK": dmd.SCALE_BLOCK}))
    yield ("finalize", dmd._finalize_kernel,
           *_sig({"sq_ptr": "*fp32", "n_part": "i32", "loss_ptr": "*fp32", "gnorm_ptr": "*fp32", "numel": "i64"},
                 {"BLOCK": dmd.FINAL_BLOCK}))


SPECS = list(_dmd_specs())
KERNEL_MODULES = [dmd]


def covered_kernels() -> set[str]:
    return {fn.__name__ for _, fn, _, _ in SPECS}


def all_kernels() -> set[str]:
    """Every launchable kernel (names ending in _kernel; @triton.jit helpers compile inside them)."""
    return {name for m in KERNEL_MODULES for name in vars(m) if name.endswith("_kernel")}


def main() -> int:
    missing = all_kernels() - covered_kernels()
    if missing:
        print(f"MISSING SPECS for kernels: {sorted(missing)}")
        return 1
    failed = 0
    for name, fn, signature, constexprs in SPECS:
        try:
            compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=TARGET)
            print(f"ok   {name}: {compiled.metadata.num_warps} warps, shared {compiled.metadata.shared} B")
        except Exception as exc:  # report every failure, not just the first
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:2000]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
