"""Benchmark configuration. Runs before anything in bench/ imports rtdmd_kernels.

Benchmarks never run under Triton's interpreter (it would time the interpreter, and on a GPU machine it
would take over every CUDA launch): ``TRITON_INTERPRET`` is removed from the environment here, so the
CPU numbers are the torch path and the CUDA numbers the compiled Triton kernels. If rtdmd_kernels was
already imported with the interpreter on (``pytest tests/ bench/`` in one process), the benchmarks skip.

After a benchmark run, a compact table is printed: op, provider, shape, dtype, median ms, GB/s of the
floor traffic, speedup vs reference (per mode: fwd, fwd+bwd); then the peak-memory table.
"""

from __future__ import annotations

import _env

_env.no_triton_interpreter()  # before _util imports rtdmd_kernels

import _util as bu  # noqa: E402
import pytest  # noqa: E402

from rtdmd_kernels import _backend  # noqa: E402


def pytest_report_header(config):
    import torch

    dev = bu.bench_device()
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    return [
        f"rtdmd bench: device={dev} ({name}), torch {torch.__version__}, "
        f"ours backend={bu.rk.backend_for(torch.empty(1, device=dev))}, threads={torch.get_num_threads()}"
    ]


@pytest.fixture(autouse=True)
def _no_interpreter():
    if _backend.interpreter_enabled():
        pytest.skip("rtdmd_kernels was imported with TRITON_INTERPRET=1: run `pytest bench/` on its own")
    yield


def _median_ms(meta) -> float | None:
    try:
        return float(meta.stats.median) * 1e3
    except Exception:
        return None


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or getattr(bs, "disabled", True) or not getattr(bs, "benchmarks", None):
        return
    timing, memory = [], []
    for meta in bs.benchmarks:
        info = dict(getattr(meta, "extra_info", {}) or {})
        if "op" not in info:
            continue
        (memory if info.get("kind") == "memory" else timing).append((info, _median_ms(meta)))

    cases = list(bu.CASES)

    def key(info):
        case = info.get("case")
        return (info["op"], info.get("mode", ""), cases.index(case) if case in cases else 99, info["shape"],
                info["dtype"], info.get("variant", ""))

    ref = {key(i): ms for i, ms in timing if i["provider"] == "reference" and ms}
    order = {"ours": 0, "reference": 1, "compiled": 2}
    rows = []
    for info, ms in sorted(timing, key=lambda t: (key(t[0]), order.get(t[0]["provider"], 9))):
        gbps = info["bytes"] / (ms * 1e-3) / 1e9 if ms else None
        r = ref.get(key(info))
        rows.append([info["op"], info.get("mode", ""), info["provider"], info["shape"], info["dtype"], ms, gbps,
                     (r / ms) if (r and ms) else None])
    tw = terminalreporter
    if rows:
        tw.write_sep("-", "rtdmd ops (median; GB/s of floor bytes; x ref = reference / this; python -m bench.report "
                          "adds the copy bandwidth and memory)")
        tw.write_line(bu.markdown_table(["op", "mode", "provider", "shape", "dtype", "median ms", "GB/s", "x ref"],
                                        rows))
    if memory:
        mrows = []
        for info, _ in sorted(memory, key=lambda t: (key(t[0]), order.get(t[0]["provider"], 9))):
            mrows.append([info["op"], info["provider"], info["shape"], info["dtype"],
                          info["peak_bytes"] / 2**20, info.get("input_bytes", 0) / 2**20, info.get("method", "")])
        tw.write_sep("-", "rtdmd peak memory of one fwd+bwd above the inputs (includes the returned gradient)")
        tw.write_line(bu.markdown_table(["op", "provider", "shape", "dtype", "peak MiB", "inputs MiB", "method"],
                                        mrows))
