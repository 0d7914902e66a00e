"""Device time of one fwd+bwd, separated from host launch overhead (run on a lent GPU).

gpu_check.py's do_bench numbers are wall latency per call; on the lent machines the host side
(Python, autograd, launches) dominates below a few hundred MB. This measures, with torch.profiler,
the summed CUDA kernel time of one fwd+bwd (ours, reference eager), the host wall time of a
synchronised call, and for ours a few (BLOCK, num_warps) launch configurations. GB/s and % of the
copy bandwidth are computed on the device time with the same floor bytes as gpu_check.py.

Usage: ``PYTHONPATH=. python bench/gpu_kernel_time.py [--out DIR] [--copy-gbps X]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _env  # noqa: E402

if __name__ == "__main__":  # gpu_*_check.py import this module too; their own entry point already did it
    _env.no_triton_interpreter()  # before _util imports rtdmd_kernels

import _util as bu  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from rtdmd_kernels import dmd  # noqa: E402

CONFIGS = [(1024, 4), (2048, 8), (4096, 8)]


def device_us(step, iters: int, cuda: bool) -> float:
    """Summed kernel time per call (CUDA), or CPU self time per call without CUDA."""
    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for _ in range(iters):
            step()
        if cuda:
            torch.cuda.synchronize()
    total = 0.0
    for evt in prof.key_averages():
        if cuda:
            total += getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0.0))
        else:
            total += evt.self_cpu_time_total
    return total / iters


def host_us(step, iters: int, cuda: bool) -> float:
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e6


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    parser.add_argument("--copy-gbps", type=float, default=0.0, help="measured copy bandwidth, for the % column")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    cases = bu.CASES if cuda else bu.DRY_CASES
    dtypes = ["float32", "bfloat16"] if cuda else ["float32"]
    iters = 10 if cuda else 2
    rows, results = [], []
    for op in bu.OPS:
        for dtype_name in dtypes:
            dtype = bu.DTYPES[dtype_name]
            for case, shape in cases.items():
                try:
                    inp = bu.make_inputs(op, shape, dtype, device)
                    nbytes = bu.floor_bytes(op, shape, dtype)
                    rec = {"op": op, "dtype": dtype_name, "case": case, "shape": bu.shape_str(shape), "bytes": nbytes}
                    for provider in ("ours", "reference"):
                        step = bu.make_step(bu.provider_fn(op, provider), inp)
                        rec[f"{provider}_dev_us"] = device_us(step, iters, cuda)
                        rec[f"{provider}_host_us"] = host_us(step, iters, cuda)
                    default = (dmd.BLOCK, dmd.NUM_WARPS)
                    for block, warps in CONFIGS:
                        dmd.BLOCK, dmd.NUM_WARPS = block, warps
                        try:
                            step = bu.make_step(bu.provider_fn(op, "ours"), inp)
                            rec[f"ours_dev_us_b{block}w{warps}"] = device_us(step, iters, cuda)
                        finally:
                            dmd.BLOCK, dmd.NUM_WARPS = default
                    results.append(rec)
                    dev = rec["ours_dev_us"]
                    gbps = nbytes / dev / 1e3
                    best = min((rec[f"ours_dev_us_b{b}w{w}"], f"{b}/{w}") for b, w in CONFIGS)
                    pct = f"{100 * gbps / args.copy_gbps:.1f}" if args.copy_gbps else "-"
                    rows.append([op, dtype_name, rec["shape"], f"{nbytes / 1e6:.1f}", f"{dev:.1f}",
                                 f"{rec['ours_host_us']:.0f}", f"{rec['reference_dev_us']:.1f}",
                                 f"{rec['reference_host_us']:.0f}", f"{gbps:.0f}", pct,
                                 f"{rec['reference_dev_us'] / dev:.2f}", f"{best[0]:.1f} ({best[1]})"])
                    del inp
                except Exception as exc:  # report and go on
                    rows.append([op, dtype_name, case, "ERROR", f"{type(exc).__name__}: {exc}"[:200]])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "kernel_time.json").write_text(json.dumps(results, indent=1))
    headers = ["op", "dtype", "shape", "MB", "ours dev µs", "ours host µs", "eager dev µs", "eager host µs",
               "ours GB/s (dev)", "% copy BW", "x eager (dev)", "best cfg dev µs (BLOCK/warps)"]
    title = f"device time per fwd+bwd (torch.profiler kernel sum), {torch.cuda.get_device_name() if cuda else 'CPU'}"
    table = f"{title}\n{bu.markdown_table(headers, rows)}\n"
    (Path(args.out) / "kernel_time.md").write_text(table)
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
