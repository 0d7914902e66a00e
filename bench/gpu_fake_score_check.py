"""One-shot GPU check of the fake-score ops (renoise, fake_score_loss, consistency_loss) on a lent GPU.

Sections (each guarded: a failure is reported and the rest runs), at every ``_util.CASES`` shape with
v_hat (and v1, v2) in float32 and bfloat16, latents float32, per-sample ``[B]`` sigmas drawn as docs/method.md
§4.1–4.2 (bench/test_fake_score.py ``make_case``):
  * correctness vs reference.py on float64 copies of the same inputs: loss relative error and the
    gradients' max-abs relative error (consistency: the worst of dv_hat, dv1, dv2); renoise's x_t;
    plus, at the first case, the same with float sigmas;
  * no host sync of ours' fwd+bwd (and renoise) under ``torch.cuda.set_sync_debug_mode("error")``;
  * device time (torch.profiler kernel sum) and synchronised host time of ours vs the eager
    reference, fwd+bwd of the two losses and the renoise forward (float32 only), GB/s of the floor
    bytes on device time and % of ``--copy-gbps``.
Writes ``$OUT/fake_score_check.json`` and prints a compact table last (after a ``**`` header line).
Without CUDA it runs tiny shapes (``_util.DRY_CASES``) on the CPU: a dry run of every code path.

Usage: ``PYTHONPATH=. python bench/gpu_fake_score_check.py [--out DIR] [--copy-gbps X]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _env  # noqa: E402

_env.no_triton_interpreter()  # before _util imports rtdmd_kernels

import _util as bu  # noqa: E402
import torch  # noqa: E402
from gpu_kernel_time import device_us, host_us  # noqa: E402
from test_fake_score import floor_bytes, make_case, make_step  # noqa: E402

import rtdmd_kernels as rk  # noqa: E402
from rtdmd_kernels import reference  # noqa: E402

LOSSES = ("fake_score_loss", "consistency_loss")
GRAD_KEYS = {"fake_score_loss": ("v_hat",), "consistency_loss": ("v_hat", "v1", "v2")}
SIGMAS = ("sigma_s", "sigma_t", "sigma_p")


def call(op: str, fn, c: dict):
    if op == "fake_score_loss":
        return fn(c["v_hat"], c["x_s"], c["noise"], c["sigma_s"], c["sigma_t"])
    if op == "consistency_loss":
        return fn(c["x_t"], c["v_hat"], c["sigma_t"], c["x1"], c["v1"], c["x2"], c["v2"], c["sigma_p"])
    return fn(c["x_s"], c["noise"], c["sigma_s"], c["sigma_t"])


def as_float64(c: dict) -> dict:
    """Float64 copies of every tensor (the grad keys as fresh leaves); float sigmas stay floats."""
    return {k: v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
            for k, v in c.items()}


def with_float_sigmas(c: dict) -> dict:
    """Every sample at sample 0's sigmas, as Python floats (the other accepted form)."""
    return dict(c, **{k: float(c[k][0]) for k in SIGMAS})


def loss_grads(op: str, fn, c: dict):
    loss = call(op, fn, c)
    grads = torch.autograd.grad(loss, [c[k] for k in GRAD_KEYS[op]])
    return loss.detach(), grads


def check(op: str, c: dict, float_sigmas: bool = False) -> dict:
    """Ours on ``c`` vs the reference on float64 copies."""
    if float_sigmas:
        c = with_float_sigmas(c)
    c64 = as_float64(c)
    if op == "renoise":
        with torch.no_grad():
            return {"x_err": bu.rel_err(rk.renoise(c["x_s"], c["noise"], c["sigma_s"], c["sigma_t"]),
                                 reference.renoise(c64["x_s"], c64["noise"], c64["sigma_s"], c64["sigma_t"]))}
    loss, grads = loss_grads(op, getattr(rk, op), c)
    l64, g64 = loss_grads(op, getattr(reference, op), c64)
    rec = {"loss": float(loss), "loss_ref": float(l64), "loss_err": bu.rel_err(loss, l64),
           "loss_abs_err": float((loss.double() - l64).abs())}
    for k, g, r in zip(GRAD_KEYS[op], grads, g64, strict=True):
        rec[f"grad_err_{k}"] = bu.rel_err(g, r)
        rec[f"grad_dtype_{k}"] = bu.dtype_name(g.dtype)
    rec["grad_err"] = max(rec[f"grad_err_{k}"] for k in GRAD_KEYS[op])
    return rec


def sync_free(op: str, c: dict) -> dict:
    """Ours' call (fwd+bwd for the losses) raises under sync debug mode "error" if it syncs the host."""
    return {"op": op, **bu.sync_check(make_step(op, getattr(rk, op), c, sync=False))}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    parser.add_argument("--copy-gbps", type=float, default=0.0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    cases = bu.CASES if cuda else bu.DRY_CASES
    v_dtypes = [torch.float32, torch.bfloat16] if cuda else [torch.float32]
    iters = 10 if cuda else 2
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "copy_gbps": args.copy_gbps, "correctness": [], "sync": [], "timing": [], "errors": []}
    rows = []
    first_case = next(iter(cases))

    for v_dtype in v_dtypes:
        vdt = bu.dtype_name(v_dtype)
        for case, shape in cases.items():
            try:
                c = make_case(shape, v_dtype, device)
            except Exception as exc:
                out["errors"].append(f"inputs {case} {vdt}: {traceback.format_exc()[-800:]}")
                rows.append(["inputs", vdt, case, "ERROR", f"{type(exc).__name__}: {exc}"[:150]])
                continue
            # renoise: x_s is float32 in every case here (its bf16 form is timed in test_fake_score.py)
            ops = LOSSES + (("renoise",) if v_dtype == torch.float32 else ())
            for op in ops:
                try:
                    rec = {"op": op, "case": case, "shape": bu.shape_str(shape), "v_dtype": vdt}
                    rec.update(check(op, c))
                    if case == first_case:
                        rec["float_sigmas"] = check(op, c, float_sigmas=True)
                    out["correctness"].append(rec)
                    sync = "-"
                    if cuda:
                        s = dict(sync_free(op, c), case=case, v_dtype=vdt)
                        out["sync"].append(s)
                        sync = "yes" if s["no_host_sync"] else "NO"
                    nbytes = floor_bytes(op, shape, v_dtype if op != "renoise" else torch.float32)
                    t = {"op": op, "case": case, "shape": bu.shape_str(shape), "v_dtype": vdt, "bytes": nbytes}
                    for name, fn in (("ours", getattr(rk, op)), ("eager", getattr(reference, op))):
                        step = make_step(op, fn, c, sync=False)
                        t[f"{name}_dev_us"] = device_us(step, iters, cuda)
                        t[f"{name}_host_us"] = host_us(step, iters, cuda)
                    out["timing"].append(t)
                    gbps = nbytes / t["ours_dev_us"] / 1e3
                    pct = f"{100 * gbps / args.copy_gbps:.1f}" if args.copy_gbps else "-"
                    err = rec.get("grad_err", rec.get("x_err"))
                    if "float_sigmas" in rec:
                        fs = rec["float_sigmas"]
                        err = max(err, fs.get("grad_err", fs.get("x_err", 0.0)))
                    rows.append([op, "x fp32" if op == "renoise" else f"x fp32, v {vdt}", bu.shape_str(shape),
                                 f"{nbytes / 1e6:.1f}", f"{rec.get('loss_err', float('nan')):.1e}", f"{err:.1e}",
                                 sync, f"{t['ours_dev_us']:.1f}", f"{t['eager_dev_us']:.1f}",
                                 f"{t['eager_dev_us'] / t['ours_dev_us']:.1f}", f"{t['ours_host_us']:.0f}",
                                 f"{t['eager_host_us']:.0f}", f"{gbps:.0f}", pct])
                except Exception as exc:
                    out["errors"].append(f"{op} {case} {vdt}: {traceback.format_exc()[-800:]}")
                    rows.append([op, vdt, case, "ERROR", f"{type(exc).__name__}: {exc}"[:150]])
            del c
            if cuda:
                torch.cuda.empty_cache()

    out["wall_s"] = time.perf_counter() - t0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fake_score_check.json").write_text(json.dumps(out, indent=1, default=str))
    for e in out["errors"]:
        print("ERROR", e)
    name = out["device"] if cuda else "CPU dry run"
    sync_ok = sum(1 for s in out["sync"] if s["no_host_sync"])
    print(f"\n**{name}** torch {torch.__version__} | fake-score ops | sync-free {sync_ok}/{len(out['sync'])} | "
          f"errors {len(out['errors'])} | {out['wall_s']:.0f} s")
    headers = ["op", "dtypes", "shape", "MB", "loss rel err", "grad/x max err", "sync-free", "ours dev µs",
               "eager dev µs", "x eager (dev)", "ours host µs", "eager host µs", "ours GB/s (dev)", "% copy BW"]
    print(bu.markdown_table(headers, rows))
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
