"""Ahead-of-time compile every Triton kernel for a Hopper GPU (sm_90) without a GPU.

Run as a script in a process where TRITON_INTERPRET is NOT set (interpreted kernels cannot be
compiled). Exit status 0 when every spec compiled; prints one line per spec. Used by
tests/test_aot_compile.py; a new kernel adds its compile cases to COMPILE_CASES.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget

from rtdmd_kernels import _shared, advantage, dmd, fake_score, policy

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
    yield ("finalize", dmd._finalize_kernel,
           *_sig({"sq_ptr": "*fp32", "n_part": "i32", "loss_ptr": "*fp32", "gnorm_ptr": "*fp32", "numel": "i64"},
                 {"BLOCK": dmd.FINAL_BLOCK}))


def _policy_specs():
    P = policy
    for x_dt, v_dt in (("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "bf16"), ("fp16", "fp16")):
        px, pv = f"*{x_dt}", f"*{v_dt}"
        for per_sample in (False, True):
            args = {"x_ptr": px, "v_ptr": pv, "noise_ptr": "*fp32", "xn_ptr": px, "mean_ptr": px,
                    "sched_ptr": "*fp32", "a": "fp32", "k": "fp32", "c": "fp32", "D": "i64"}
            yield (f"cps_step x={x_dt} v={v_dt} per_sample={per_sample}", P._cps_step_kernel,
                   *_sig(args, {"PER_SAMPLE": per_sample, "BLOCK": P.EW_BLOCK}))
            for has_ref, store in ((False, False), (False, True), (True, True)):
                args = {"x_ptr": px, "v_ptr": pv, "xn_ptr": px, "vref_ptr": pv, "res_ptr": "*fp32",
                        "res2_ptr": "*fp32", "part_ptr": "*fp32", "part2_ptr": "*fp32", "sched_ptr": "*fp32",
                        "a": "fp32", "k": "fp32", "D": "i64", "CHUNK": "i32", "S": "i32"}
                yield (f"logprob_partials x={x_dt} v={v_dt} per_sample={per_sample} ref={has_ref} store={store}",
                       P._logprob_partials_kernel,
                       *_sig(args, {"HAS_REF": has_ref, "STORE_RES": store, "PER_SAMPLE": per_sample,
                                    "BLOCK": P.BLOCK}))
            for recompute, has_ref in ((True, False), (False, False), (False, True)):
                args = {"res_ptr": "*fp32", "res2_ptr": "*fp32", "x_ptr": px, "v_ptr": pv, "xn_ptr": px,
                        "dv_ptr": pv, "c1_ptr": "*fp32", "c2_ptr": "*fp32", "go_ptr": "*fp32",
                        "sched_ptr": "*fp32", "a": "fp32", "k": "fp32", "D": "i64", "GO_STRIDE": "i32"}
                yield (f"policy_grad x={x_dt} v={v_dt} per_sample={per_sample} recompute={recompute} "
                       f"ref={has_ref}", P._policy_grad_kernel,
                       *_sig(args, {"RECOMPUTE": recompute, "HAS_REF": has_ref, "PER_SAMPLE": per_sample,
                                    "BLOCK": P.EW_BLOCK}))
    for kind in (0, 1):
        for ppo, has_ref, per_sample in ((False, False, False), (True, False, True), (True, True, False),
                                         (True, True, True)):
            args = {"part_ptr": "*fp32", "part2_ptr": "*fp32", "old_ptr": "*bf16", "adv_ptr": "*fp32",
                    "sched_ptr": "*fp32", "params_ptr": "*fp32", "logp_ptr": "*fp32", "c1_ptr": "*fp32",
                    "c2_ptr": "*fp32", "loss_ptr": "*fp32", "stats_ptr": "*fp32", "B": "i32", "S": "i32", "D": "i64"}
            yield (f"policy_finalize kind={kind} ppo={ppo} ref={has_ref} per_sample={per_sample}",
                   P._policy_finalize_kernel,
                   *_sig(args, {"KIND": kind, "PPO": ppo, "HAS_REF": has_ref, "PER_SAMPLE": per_sample,
                                "BLOCK_B": P.FINAL_BLOCK_B, "S_BLOCK": 128}))


def _advantage_specs():
    stats_args = {"perm_ptr": "*i64", "off_ptr": "*i64", "mean_ptr": "*fp64", "std_ptr": "*fp64", "G": "i32",
                  "stride_n": "i64", "stride_r": "i64", "R": "i32", "ddof": "fp32"}
    combine_args = {"ids_ptr": "*i64", "mean_ptr": "*fp64", "std_ptr": "*fp64", "w_ptr": "*fp64",
                    "out_ptr": "*fp32", "a_ptr": "*fp64", "state_ptr": "*i8", "N": "i64", "G": "i64",
                    "stride_n": "i64", "stride_r": "i64", "stride_id": "i64", "R": "i32", "eps": "fp32",
                    "clip": "fp32"}
    for dtype in ("fp32", "bf16", "fp16"):
        p = f"*{dtype}"
        for glob, with_std, block, rb in ((False, True, 32, 4), (False, False, 32, 4), (True, True, 512, 4),
                                          (False, True, 32, 1)):
            yield (f"segment_stats {dtype} global={glob} with_std={with_std} RB={rb}",
                   advantage._segment_stats_kernel,
                   *_sig({"r_ptr": p, **stats_args}, {"GLOBAL": glob, "WITH_STD": with_std, "BLOCK": block,
                                                      "RB": rb}))
        for ids in ("*i64", "*i32"):
            for scale, has_w, clip, restd, rb in ((0, False, True, False, 4), (1, True, False, True, 4),
                                                  (2, True, True, False, 4), (1, False, True, True, 1)):
                yield (f"combine {dtype} ids={ids} scale={scale} w={has_w} clip={clip} restd={restd} RB={rb}",
                       advantage._combine_kernel,
                       *_sig({"r_ptr": p, **combine_args, "ids_ptr": ids},
                             {"SCALE": scale, "HAS_W": has_w, "CLIP": clip, "RESTD": restd,
                              "BLOCK": advantage.COMBINE_BLOCK, "RB": rb}))
    for clip in (False, True):
        args = {"a_ptr": "*fp64", "state_ptr": "*i8", "out_ptr": "*fp32", "N": "i64", "ddof": "fp32", "eps": "fp32",
                "clip": "fp32"}
        yield (f"restandardize clip={clip}", advantage._restandardize_kernel,
               *_sig(args, {"CLIP": clip, "BLOCK": advantage.REDUCE_BLOCK}))


def _fake_score_specs():
    F = fake_score
    # (latent dtype, v_hat / noise dtype): the three dtypes and the real mix (fp32 latents, bf16 v_hat).
    for x_dt, v_dt in (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "bf16")):
        px, pv = f"*{x_dt}", f"*{v_dt}"
        for per_sample in (False, True):
            args = {"x_ptr": px, "n_ptr": pv, "out_ptr": px, "sched_ptr": "*fp32", "a": "fp32", "k": "fp32",
                    "D": "i64"}
            yield (f"renoise x={x_dt} noise={v_dt} per_sample={per_sample}", F._renoise_kernel,
                   *_sig(args, {"PER_SAMPLE": per_sample, "BLOCK": F.EW_BLOCK}))
            for store in (False, True):
                args = {"v_ptr": pv, "x_ptr": px, "n_ptr": px, "h_ptr": pv, "part_ptr": "*fp32",
                        "sched_ptr": "*fp32", "scale": "fp32", "cx": "fp32", "beta": "fp32", "w": "fp32",
                        "D": "i64", "CHUNK": "i32", "S": "i32"}
                yield (f"fake_score_partials x={x_dt} v={v_dt} per_sample={per_sample} store={store}",
                       F._fake_score_partials_kernel,
                       *_sig(args, {"STORE": store, "PER_SAMPLE": per_sample, "BLOCK": F.BLOCK}))
                args = {"xt_ptr": px, "vh_ptr": pv, "x1_ptr": px, "v1_ptr": pv, "x2_ptr": px, "v2_ptr": pv,
                        "d1_ptr": "*fp32", "d2_ptr": "*fp32", "part_ptr": "*fp32", "sched_ptr": "*fp32",
                        "st": "fp32", "sp": "fp32", "D": "i64", "CHUNK": "i32", "S": "i32"}
                yield (f"consistency_partials x={x_dt} v={v_dt} per_sample={per_sample} store={store}",
                       F._consistency_partials_kernel,
                       *_sig(args, {"STORE": store, "PER_SAMPLE": per_sample, "BLOCK": F.BLOCK}))
            for needs in ((True, True, True), (True, False, False), (False, True, True)):
                args = {"d1_ptr": "*fp32", "d2_ptr": "*fp32", "ok_ptr": "*fp32", "go_ptr": "*fp32",
                        "dvh_ptr": pv, "dv1_ptr": pv, "dv2_ptr": pv, "sched_ptr": "*fp32", "st": "fp32",
                        "sp": "fp32", "D": "i64", "numel": "i64"}
                yield (f"consistency_grad v={v_dt} per_sample={per_sample} needs={needs}",
                       F._consistency_grad_kernel,
                       *_sig(args, {"NEED_VH": needs[0], "NEED_V1": needs[1], "NEED_V2": needs[2],
                                    "PER_SAMPLE": per_sample, "BLOCK": F.EW_BLOCK}))
    for nan_to_num in (False, True):
        args = {"part_ptr": "*fp32", "n_part": "i32", "loss_ptr": "*fp32", "ok_ptr": "*fp32", "numel": "i64",
                "fmax": "fp32"}
        yield (f"mean_finalize nan_to_num={nan_to_num}", F._mean_finalize_kernel,
               *_sig(args, {"NAN_TO_NUM": nan_to_num, "BLOCK": F.FINAL_BLOCK}))

def _shared_specs():
    S = _shared
    for x_dt, v_dt in (("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "bf16"), ("fp16", "fp16")):
        px, pv = f"*{x_dt}", f"*{v_dt}"
        yield (f"scale_grad {x_dt}", S._scale_grad_kernel,
               *_sig({"g_ptr": px, "go_ptr": "*fp32", "dx_ptr": px, "numel": "i64"}, {"BLOCK": S.SCALE_BLOCK}))
        args = {"g1_ptr": px, "g2_ptr": px, "dx_ptr": px, "dv_ptr": pv, "sched_ptr": "*fp32",
                "a": "fp32", "k": "fp32", "D": "i64"}
        for per_sample in (False, True):
            for has_g1, has_g2 in ((True, False), (True, True), (False, True)):
                yield (f"affine_grad x={x_dt} v={v_dt} per_sample={per_sample} g1={has_g1} g2={has_g2}",
                       S._affine_grad_kernel,
                       *_sig(args, {"HAS_G1": has_g1, "HAS_G2": has_g2, "NEED_DX": True, "NEED_DV": True,
                                    "PER_SAMPLE": per_sample, "BLOCK": S.EW_BLOCK}))


COMPILE_CASES = (list(_dmd_specs()) + list(_policy_specs()) + list(_advantage_specs()) + list(_fake_score_specs())
                 + list(_shared_specs()))
KERNEL_MODULES = [dmd, policy, advantage, fake_score, _shared]


def covered_kernels() -> set[str]:
    return {fn.__name__ for _, fn, _, _ in COMPILE_CASES}


def all_kernels() -> set[str]:
    """Every launchable kernel (names ending in _kernel; @triton.jit helpers compile inside them)."""
    return {name for m in KERNEL_MODULES for name in vars(m) if name.endswith("_kernel")}


def main() -> int:
    missing = all_kernels() - covered_kernels()
    if missing:
        print(f"MISSING COMPILE_CASES for kernels: {sorted(missing)}")
        return 1
    failed = 0
    for name, fn, signature, constexprs in COMPILE_CASES:
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
