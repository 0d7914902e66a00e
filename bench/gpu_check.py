"""One-shot GPU check of the DMD / AC-DMD kernels (run by bench/gpu_check.sh on a lent H100).

Sections, each guarded so that a failure is reported and the rest still runs:
  (a) device-to-device copy bandwidth (1 GiB ``dst.copy_(src)``, bytes = read + write, median of
      CUDA-event timings) -- the ceiling the kernels' GB/s are compared with;
  (b) correctness at real sizes: ours in fp32/bf16 vs reference.py on float64 copies (loss rel err,
      gradient max-abs rel err), next to reference.py run in the same low precision; determinism;
  (c) no host sync: ours fwd+bwd under ``torch.cuda.set_sync_debug_mode("error")``;
  (d) timing with ``triton.testing.do_bench`` (median) of fwd+bwd for ours, reference eager and
      ``torch.compile(reference)``, and ours' forward alone; GB/s of the floor bytes, % of copy BW;
  (e) all numbers to ``$OUT/gpu_check.json`` (rewritten after every section), the compact table to
      ``$OUT/gpu_check_table.md`` and printed LAST.

Without CUDA (or with ``--dry-run``) it runs tiny shapes on the CPU, times with a perf_counter loop,
skips the sync-debug check and torch.compile (``--compile`` forces it), so every code path that does
not need a GPU is exercised in well under a minute.

Usage: ``PYTHONPATH=. python bench/gpu_check.py [--dry-run] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _env  # noqa: E402

# Never time or check the interpreter: it would also take over every CUDA launch.
_INTERPRET_WAS = _env.no_triton_interpreter()

import _util as bu  # noqa: E402
import torch  # noqa: E402

rk, reference = bu.rk, bu.reference

T0 = time.perf_counter()

# Pass criteria of the correctness section: ours' error vs float64 must be within 2x the error of
# reference.py run in the same precision, or under this floor (bf16 gradients are stored in bf16).
TOL = {"float32": 1e-5, "bfloat16": 8e-3}


def log(msg: str = "") -> None:
    print(msg, flush=True)


def _err_str(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"


class GpuCheck:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.cuda = torch.cuda.is_available() and not args.dry_run
        self.device = "cuda" if self.cuda else "cpu"
        self.compile = self.cuda if args.compile is None else args.compile
        all_cases = bu.CASES if self.cuda else bu.DRY_CASES
        if args.cases:
            all_cases = {k: v for k, v in all_cases.items() if k in args.cases.split(",")}
        self.cases = all_cases
        self.dtypes = ["float32", "bfloat16"]
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.compile_spent = 0.0
        self.r: dict = {
            "meta": {},
            "copy": None,
            "correctness": [],
            "sync_debug": [],
            "timing": [],
            "errors": [],
            "section_seconds": {},
        }

    # ------------------------------------------------------------------------------------------
    def save(self) -> None:
        try:
            tmp = self.out / "gpu_check.json.tmp"
            tmp.write_text(json.dumps(self.r, indent=1, default=str))
            tmp.replace(self.out / "gpu_check.json")
        except Exception as exc:  # never let reporting kill the check
            log(f"[save] could not write JSON: {_err_str(exc)}")

    def error(self, where: str, exc: BaseException) -> None:
        tb = traceback.format_exc()
        log(f"[{where}] ERROR {_err_str(exc)}")
        self.r["errors"].append({"where": where, "error": _err_str(exc), "traceback": tb[-3000:]})

    def section(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        log(f"\n== {name} (t={t0 - T0:.1f}s)")
        try:
            fn()
        except Exception as exc:
            self.error(name, exc)
        self.r["section_seconds"][name] = round(time.perf_counter() - t0, 2)
        self.save()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn) -> float:
        """Median ms of ``fn()``: do_bench on CUDA (events, L2 flushed per rep), perf_counter on CPU."""
        if not self.cuda:
            return bu.perf_counter_ms(fn, min_reps=3, max_reps=20, budget_s=0.05)
        import triton.testing

        a = self.args
        try:
            return float(triton.testing.do_bench(fn, warmup=a.warmup_ms, rep=a.rep_ms, return_mode="median"))
        except TypeError:  # very old triton: no return_mode
            return float(triton.testing.do_bench(fn, warmup=a.warmup_ms, rep=a.rep_ms, quantiles=[0.5])[0])

    def over_deadline(self) -> bool:
        return time.perf_counter() - T0 > self.args.deadline_s

    # ------------------------------------------------------------------------------------------
    def meta(self) -> None:
        m = self.r["meta"]
        m.update({
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "rtdmd_kernels": rk.__version__,
            "device": self.device,
            "dry_run": not self.cuda,
            "compile": self.compile,
            "TRITON_INTERPRET_removed": _INTERPRET_WAS,
            "RTDMD_KERNELS_BACKEND": os.environ.get("RTDMD_KERNELS_BACKEND"),
            "ours_backend": rk.backend_for(torch.empty(1, device=self.device)),
            "args": vars(self.args),
        })
        try:
            import triton

            m["triton"] = triton.__version__
        except Exception as exc:
            m["triton"] = f"unavailable ({_err_str(exc)})"
        try:
            git = ["git", "rev-parse", "--verify", "-q", "HEAD"]
            m["git_commit"] = subprocess.run(git, capture_output=True, text=True, timeout=10).stdout.strip() or None
        except Exception:
            m["git_commit"] = None
        if self.cuda:
            p = torch.cuda.get_device_properties(0)
            m.update({"gpu": p.name, "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count,
                      "gpu_mem_GiB": round(p.total_memory / 2**30, 1),
                      "l2_MB": round(getattr(p, "L2_cache_size", 0) / 1e6, 1)})
        else:
            m["cpu_threads"] = torch.get_num_threads()
        for k in ("gpu", "capability", "sm_count", "l2_MB", "torch", "triton", "ours_backend", "dry_run"):
            if k in m:
                log(f"  {k}: {m[k]}")

    # ------------------------------------------------------------------------------------------
    def copy_bandwidth(self) -> None:
        nbytes = (self.args.copy_mib if self.cuda else 64) * 2**20
        src = torch.empty(nbytes, dtype=torch.uint8, device=self.device).fill_(7)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        self.sync()
        times = []
        reps = 20 if self.cuda else 5
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dst.copy_(src)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                dst.copy_(src)
                times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        ms = times[len(times) // 2]
        gbps = 2 * nbytes / (ms * 1e-3) / 1e9
        self.r["copy"] = {"bytes_each_way": nbytes, "median_ms": ms, "GBps_read_plus_write": gbps,
                          "min_ms": times[0], "max_ms": times[-1], "reps": reps}
        log(f"  copy {nbytes / 2**20:.0f} MiB: median {ms:.3f} ms -> {gbps:.0f} GB/s (read + write)")
        del src, dst
        if self.cuda:
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------
    def correctness(self) -> None:
        for case, shape in self.cases.items():
            for op in bu.OPS:
                for dtype in self.dtypes:
                    where = f"correctness {op} {case} {dtype}"
                    try:
                        self.r["correctness"].append(self._correct_one(op, case, shape, dtype))
                        c = self.r["correctness"][-1]
                        log(f"  {op:12s} {case:15s} {dtype:9s} [{c['backend']}] loss {c['loss_rel_err']:.1e} "
                            f"(ref-lp {c['ref_lowp_loss_rel_err']:.1e})  grad {c['grad_rel_err']:.1e} "
                            f"(ref-lp {c['ref_lowp_grad_rel_err']:.1e})  det={c['deterministic']}  "
                            f"{'PASS' if c['pass'] else 'FAIL'}")
                    except Exception as exc:
                        self.error(where, exc)
                        self.r["correctness"].append({"op": op, "case": case, "dtype": dtype, "pass": False,
                                                      "error": _err_str(exc)})
                    if self.cuda:
                        torch.cuda.empty_cache()
                    self.save()

    def _correct_one(self, op: str, case: str, shape, dtype: str) -> dict:
        inp = bu.make_inputs(op, shape, bu.DTYPES[dtype], self.device, seed=1)
        fn = getattr(rk, op)
        loss, dx = bu.loss_and_grad(fn, inp)
        loss2, dx2 = bu.loss_and_grad(fn, inp)
        det = bool(torch.equal(loss, loss2) and torch.equal(dx, dx2))
        del loss2, dx2
        inp64 = inp.cast(torch.float64)
        loss64, dx64 = bu.loss_and_grad(getattr(reference, op), inp64)
        del inp64
        loss_lp, dx_lp = bu.loss_and_grad(getattr(reference, op), inp)
        row = {
            "op": op, "case": case, "shape": bu.shape_str(shape), "dtype": dtype,
            "backend": rk.backend_for(inp.x),
            "loss": float(loss), "loss_ref64": float(loss64),
            "loss_rel_err": abs(float(loss) - float(loss64)) / max(abs(float(loss64)), 1e-30),
            "grad_rel_err": bu.rel_err(dx, dx64),
            "ref_lowp_loss_rel_err": abs(float(loss_lp) - float(loss64)) / max(abs(float(loss64)), 1e-30),
            "ref_lowp_grad_rel_err": bu.rel_err(dx_lp, dx64),
            "grad_dtype_ok": dx.dtype == inp.x.dtype and dx.shape == inp.x.shape,
            "grad_finite": bool(torch.isfinite(dx).all()),
            "deterministic": det,
        }
        tol = TOL[dtype]
        row["pass"] = bool(
            row["grad_dtype_ok"] and row["grad_finite"] and det
            and row["loss_rel_err"] <= max(2 * row["ref_lowp_loss_rel_err"], tol)
            and row["grad_rel_err"] <= max(2 * row["ref_lowp_grad_rel_err"], tol)
        )
        return row

    # ------------------------------------------------------------------------------------------
    def sync_debug(self) -> None:
        if not self.cuda:
            log("  skipped (no CUDA)")
            self.r["sync_debug"].append({"skipped": "no CUDA"})
            return
        case = "flux2-512" if "flux2-512" in self.cases else next(iter(self.cases))
        shape = self.cases[case]
        variants = [
            ("ours", "per-sample sigmas", {}),
            ("ours", "stats+global (AC: float sigmas)", {"return_stats": True, "normalize": "global"}),
            ("reference", "per-sample sigmas", {}),
        ]
        for op in bu.OPS:
            for dtype in self.dtypes:
                for provider, label, extra in variants:
                    where = f"sync_debug {op} {dtype} {provider} {label}"
                    row = {"op": op, "dtype": dtype, "case": case, "provider": provider, "variant": label}
                    try:
                        inp = bu.make_inputs(op, shape, bu.DTYPES[dtype], "cuda", seed=2)
                        if extra and op == "ac_dmd_loss":  # Python-float schedule values
                            rest = list(inp.rest)
                            rest[4], rest[5] = 0.35, 0.7
                            inp.rest = tuple(rest)
                        base = getattr(rk, op) if provider == "ours" else getattr(reference, op)
                        fn = (lambda *a, _f=base, _e=extra, **k: _f(*a, **k, **_e)[0]) if extra else base
                        step = bu.make_step(fn, inp, sync=False)
                        step()  # warm: first-call compilation may legitimately sync
                        row.update(bu.sync_check(step))
                    except Exception as exc:
                        torch.cuda.set_sync_debug_mode(0)
                        self.error(where, exc)
                        row["no_host_sync"] = None
                        row["error"] = _err_str(exc)
                    self.r["sync_debug"].append(row)
                    verdict = {True: "PASS (no sync)", False: "SYNCS", None: "ERROR"}[row["no_host_sync"]]
                    log(f"  {op:12s} {dtype:9s} {provider:9s} {label:32s} {verdict} {row.get('error', '')}")

    # ------------------------------------------------------------------------------------------
    def timing(self) -> None:
        if self.compile:
            bu.raise_recompile_limit()
        copy_gbps = (self.r.get("copy") or {}).get("GBps_read_plus_write")
        # Largest case first: if a budget runs out, the small, launch-bound cases are what is lost.
        for case in sorted(self.cases, key=lambda c: -math.prod(self.cases[c])):
            for op in bu.OPS:
                for dtype in self.dtypes:
                    shape = self.cases[case]
                    row = {"op": op, "case": case, "shape": bu.shape_str(shape), "dtype": dtype,
                           "bytes": bu.floor_bytes(op, shape, bu.DTYPES[dtype])}
                    if self.over_deadline():
                        row["skipped"] = f"deadline {self.args.deadline_s}s reached"
                        self.r["timing"].append(row)
                        log(f"  {op} {case} {dtype}: skipped (deadline)")
                        continue
                    try:
                        self._time_one(op, shape, dtype, row)
                    except Exception as exc:
                        self.error(f"timing {op} {case} {dtype}", exc)
                        row["error"] = _err_str(exc)
                    us, b = row.get("ours_us"), row["bytes"]
                    if us:
                        row["ours_GBps"] = b / (us * 1e-6) / 1e9
                        row["pct_copy_bw"] = 100 * row["ours_GBps"] / copy_gbps if copy_gbps else None
                        row["x_eager"] = row["eager_us"] / us if row.get("eager_us") else None
                        row["x_compiled"] = row["compiled_us"] / us if row.get("compiled_us") else None
                    self.r["timing"].append(row)
                    log("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in row.items() if k not in ("shape",)))
                    if self.cuda:
                        torch.cuda.empty_cache()
                    self.save()

    def _time_one(self, op: str, shape, dtype: str, row: dict) -> None:
        inp = bu.make_inputs(op, shape, bu.DTYPES[dtype], self.device, seed=3)
        ours = getattr(rk, op)
        row["backend"] = rk.backend_for(inp.x)
        row["ours_us"] = 1e3 * self.time_ms(bu.make_step(ours, inp))
        row["ours_fwd_us"] = 1e3 * self.time_ms(bu.make_forward(ours, inp))
        eager_step = bu.make_step(getattr(reference, op), inp)
        row["eager_us"] = 1e3 * self.time_ms(eager_step)
        if self.cuda:
            row["ours_peak_MiB"] = bu.cuda_peak_bytes(bu.make_step(ours, inp)) / 2**20
            row["eager_peak_MiB"] = bu.cuda_peak_bytes(eager_step) / 2**20
        if not self.compile:
            row["compiled_skipped"] = "compile off"
            return
        if self.compile_spent > self.args.compile_budget_s:
            row["compiled_skipped"] = f"compile budget {self.args.compile_budget_s}s spent"
            return
        t0 = time.perf_counter()
        try:
            cstep = bu.make_step(bu.compiled_reference(op), inp)
            cstep()
            self.sync()
        except Exception as exc:
            self.error(f"compile {op} {row['case']} {dtype}", exc)
            row["compiled_error"] = _err_str(exc)
            return
        finally:
            dt = time.perf_counter() - t0
            self.compile_spent += dt
            row["compile_s"] = round(dt, 2)
        row["compiled_us"] = 1e3 * self.time_ms(cstep)

    # ------------------------------------------------------------------------------------------
    def report(self) -> str:
        copy = self.r.get("copy") or {}
        corr = [c for c in self.r["correctness"] if "op" in c]
        sd = [s for s in self.r["sync_debug"] if s.get("provider") == "ours"]
        lines = []
        if corr:
            lines.append("Correctness vs reference.py in float64 (max-abs rel err; "
                         "ref-lp = reference.py in the same dtype):")
            lines.append(bu.markdown_table(
                ["op", "dtype", "shape", "backend", "loss err", "grad err", "ref-lp grad err", "det", "ok"],
                [[c["op"], c["dtype"], c.get("shape", c.get("case")), c.get("backend"), c.get("loss_rel_err"),
                  c.get("grad_rel_err"), c.get("ref_lowp_grad_rel_err"), c.get("deterministic"),
                  "PASS" if c.get("pass") else "FAIL"] for c in corr]))
            lines.append("")
        n_pass = sum(bool(c.get("pass")) for c in corr)
        n_det = sum(bool(c.get("deterministic")) for c in corr)
        sync_txt = (f"{sum(s.get('no_host_sync') is True for s in sd)}/{len(sd)} ours variants sync-free"
                    if sd else "skipped")
        ref_sd = [s for s in self.r["sync_debug"] if s.get("provider") == "reference"]
        if ref_sd:
            sync_txt += f" (reference: {sum(s.get('no_host_sync') is True for s in ref_sd)}/{len(ref_sd)})"
        m = self.r["meta"]
        lines.append(
            f"**{m.get('gpu', 'CPU dry run')}** torch {m.get('torch')} triton {m.get('triton')} | "
            f"copy BW {copy.get('GBps_read_plus_write', float('nan')):.0f} GB/s | "
            f"correctness {n_pass}/{len(corr)} pass, deterministic {n_det}/{len(corr)} | "
            f"no-host-sync: {sync_txt} | compile {self.compile_spent:.0f}s | "
            f"errors {len(self.r['errors'])} | total {time.perf_counter() - T0:.0f}s"
        )
        cases = list(self.cases)
        rows = sorted(self.r["timing"], key=lambda t: (bu.OPS.index(t["op"]), self.dtypes.index(t["dtype"]),
                                                        cases.index(t["case"])))
        table = bu.markdown_table(
            ["op", "dtype", "shape", "MB moved", "ours µs", "ours fwd µs", "eager µs", "compiled µs",
             "ours GB/s", "% copy BW", "x eager", "x compiled"],
            [[t["op"], t["dtype"], t["shape"], t["bytes"] / 1e6, t.get("ours_us"), t.get("ours_fwd_us"),
              t.get("eager_us"), t.get("compiled_us"), t.get("ours_GBps"), t.get("pct_copy_bw"),
              t.get("x_eager"), t.get("x_compiled")] for t in rows],
        )
        lines += ["", "fwd+bwd, median (do_bench on CUDA, L2 flushed; perf_counter on CPU); bytes = floor traffic "
                      "(inputs read once + dx written once):", table]
        return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (automatic without CUDA)")
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/out", help="folder for the JSON and the table")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="time torch.compile(reference) (default: on with CUDA, off in a dry run)")
    p.add_argument("--compile-budget-s", type=float, default=float(os.environ.get("GPU_CHECK_COMPILE_BUDGET", 120)),
                   help="stop compiling new reference variants once this many seconds went into compiles")
    p.add_argument("--deadline-s", type=float, default=float(os.environ.get("GPU_CHECK_DEADLINE", 240)),
                   help="start no new timing case after this many seconds from the script's start")
    p.add_argument("--warmup-ms", type=float, default=25)
    p.add_argument("--rep-ms", type=float, default=100)
    p.add_argument("--copy-mib", type=int, default=1024)
    p.add_argument("--cases", default="", help="comma list of case names to keep (default: all)")
    p.add_argument("--sections", default="copy,correctness,sync_debug,timing",
                   help="comma list of sections to run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    chk = GpuCheck(args)
    if _INTERPRET_WAS:
        log(f"note: TRITON_INTERPRET={_INTERPRET_WAS} was removed from the environment before importing rtdmd_kernels")
    if not chk.cuda:
        log("no CUDA (or --dry-run): DRY RUN on CPU with tiny shapes; numbers are not GPU numbers")
    chk.section("meta", chk.meta)
    wanted = args.sections.split(",")
    for name, fn in (("copy", chk.copy_bandwidth), ("correctness", chk.correctness),
                     ("sync_debug", chk.sync_debug), ("timing", chk.timing)):
        if name in wanted:
            chk.section(name, fn)
    try:
        text = chk.report()
    except Exception as exc:
        chk.error("report", exc)
        text = f"(report failed: {_err_str(exc)})"
    chk.r["total_seconds"] = round(time.perf_counter() - T0, 1)
    chk.save()
    try:
        (chk.out / "gpu_check_table.md").write_text(text + "\n")
    except Exception as exc:
        log(f"could not write the table: {_err_str(exc)}")
    log("\n" + text)
    corr_ok = all(c.get("pass") for c in chk.r["correctness"]) if chk.r["correctness"] else True
    return 0 if (corr_ok and not chk.r["errors"]) else 1


if __name__ == "__main__":
    sys.exit(main())
