"""bench/report.py's tables on a small synthetic pytest-benchmark JSON (no benchmark runs; CPU, < 1 s).

The module is imported by path; importing it must neither import ``bench/_util.py`` (torch, rtdmd_kernels) nor
touch ``TRITON_INTERPRET``, which this test process relies on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

REPORT_PY = Path(__file__).resolve().parents[1] / "bench" / "report.py"
MiB = 2**20


@pytest.fixture(scope="module")
def report():
    before, had_util = os.environ.get("TRITON_INTERPRET"), "_util" in sys.modules
    spec = importlib.util.spec_from_file_location("rtdmd_bench_report", REPORT_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert ("_util" in sys.modules) == had_util and os.environ.get("TRITON_INTERPRET") == before
    return mod


def _bench(median: float | None, **info) -> dict:
    b = {"name": "x", "group": None, "extra_info": info}
    if median is not None:
        b["stats"] = {"median": median, "mean": median, "min": median, "max": median, "rounds": 3}
    return b


def _op(op, mode, provider, median, nbytes, shape="8x16x64x64", **more) -> dict:
    return _bench(median, op=op, mode=mode, provider=provider, case="sd35m-512", shape=shape, dtype="float32",
                  bytes=nbytes, device="cpu", **more)


def synthetic() -> dict:
    benches = [
        _op("dmd_loss", "fwd+bwd", "reference", 0.004, 4_000_000),
        _op("dmd_loss", "fwd+bwd", "ours", 0.001, 4_000_000),
        _op("dmd_loss", "fwd", "ours", 0.0005, 3_000_000),
        _op("dmd_loss", "fwd+bwd", "ours", 0.01, 4_000_000, kind="memory", peak_bytes=2 * MiB),
        _op("dmd_loss", "fwd+bwd", "reference", 0.01, 4_000_000, kind="memory", peak_bytes=5 * MiB),
        _op("group_advantages", "fwd", "ours", 2e-5, 0, shape="1152"),
        _bench(0.1, unrelated=True),  # no op: ignored
    ]
    for K, mode, peak in ((2, "plain", 200), (1, "plain", 100), (1, "step", 50), (2, "step", 50)):
        benches.append(_bench(0.2 * K, op="checkpointed_rollout", mode="fwd+bwd", provider=mode, case=f"tiny-K{K}",
                              shape=f"2x16x8x8 K={K}", dtype="float32", bytes=0, device="cpu", kind="memory",
                              peak_bytes=peak * MiB, K=K, method="VmHWM"))
    benches.append(_bench(0.5, op="stage1.fake_update", provider="ours", bytes=0, shape="32x2", dtype="float32",
                          device="cpu", threads=2, share_network=0.6, share_kernels=0.25, share_other=0.15))
    return {"machine_info": {"machine": "x86_64", "cpu": {"brand_raw": "Test CPU", "count": 4}},
            "commit_info": {"id": "abcdef1234567890", "dirty": False}, "datetime": "2026-01-02T03:04:05+00:00",
            "version": "5.2.3", "benchmarks": benches}


def test_op_rows_arithmetic_and_join(report):
    rows = report.op_rows(synthetic(), copy_gbps=8.0)
    assert [(r["op"], r["mode"], r["provider"]) for r in rows] == [
        ("dmd_loss", "fwd", "ours"), ("dmd_loss", "fwd+bwd", "ours"), ("dmd_loss", "fwd+bwd", "reference"),
        ("group_advantages", "fwd", "ours")]
    fwd, ours, ref, adv = rows
    assert ours["gbps"] == pytest.approx(4.0) and ours["pct_copy"] == pytest.approx(50.0)
    assert ours["speedup"] == pytest.approx(4.0) and ref["speedup"] == pytest.approx(1.0)
    assert ours["peak_bytes"] == 2 * MiB and ref["peak_bytes"] == 5 * MiB
    assert fwd["gbps"] == pytest.approx(6.0) and fwd["pct_copy"] == pytest.approx(75.0)
    assert fwd["speedup"] is None and fwd["peak_bytes"] is None  # no fwd reference, no fwd memory entry
    assert adv["gbps"] is None and adv["pct_copy"] is None  # bytes 0: latency only
    assert report.op_rows(synthetic(), copy_gbps=None)[1]["pct_copy"] is None


def test_rollout_and_train_rows(report):
    rows = report.rollout_rows(synthetic())
    assert [(r["K"], r["mode"]) for r in rows] == [(1, "plain"), (1, "step"), (2, "plain"), (2, "step")]
    by = {(r["K"], r["mode"]): r for r in rows}
    assert by[(2, "plain")]["x_k1"] == pytest.approx(2.0) and by[(2, "step")]["x_k1"] == pytest.approx(1.0)
    assert by[(2, "step")]["x_plain"] == pytest.approx(0.25) and by[(1, "step")]["x_plain"] == pytest.approx(0.5)
    cats, trows = report.train_rows(synthetic())
    assert cats[0] == "kernels" and set(cats) == {"kernels", "network", "other"}
    assert trows[0]["kernels"] == 0.25 and trows[0]["median_s"] == 0.5


def test_markdown_and_text(report):
    md = report.render(synthetic(), 8.0, markdown=True)
    row = "| dmd_loss | fwd+bwd | 8x16x64x64 | float32 | ours | 1.00 ms | 4.00 MB | 4.00 | 50.0 | 2.00 MiB | 4.00 |"
    assert row in md
    assert "| dmd_loss | fwd | 8x16x64x64 | float32 | ours | 500 us | 3.00 MB | 6.00 | 75.0 | - | - |" in md
    assert "| group_advantages | fwd | 1152 | float32 | ours | 20.0 us | - | - | - | - | - |" in md
    assert "| 2 | step | 2x16x8x8 K=2 | float32 | 50.0 MiB | 1.00 | 0.25 | 400 ms | VmHWM |" in md
    assert "| step | shape | dtype | median | threads | kernels % | network % | other % |" in md
    assert "| stage1.fake_update | 32x2 | float32 | 500 ms | 2 | 25.0 | 60.0 | 15.0 |" in md
    assert "(8.0 GB/s)" in md and "(no rows" not in md
    text = report.render(synthetic(), 8.0)
    assert "dmd_loss" in text and "| " not in text and "2.00 MiB" in text


def test_empty_sections(report):
    out = report.render({"benchmarks": []}, None, markdown=True)
    assert out.count("(no rows") == 3 and "not measured" in out
    only_ops = {"benchmarks": [_op("renoise", "fwd", "ours", 1e-3, 1000)]}
    out = report.render(only_ops, 1.0)
    assert "renoise" in out and out.count("(no rows") == 2


def test_main_reads_json_and_writes_markdown(report, tmp_path, capsys):
    src, md = tmp_path / "run.json", tmp_path / "report.md"
    src.write_text(json.dumps(synthetic()))
    assert report.main(["--benchmark-json", str(src), "--copy-gbps", "8", "--markdown", str(md)]) == 0
    text = md.read_text()
    first = text.splitlines()[0]
    assert first.startswith("Machine: Test CPU, 4 cores; torch ") and "2026-01-02T03:04:05" in first
    assert "commit abcdef1234" in first and "+dirty" not in first and "8.0 GB/s (given)" in first
    assert "| dmd_loss | fwd+bwd |" in text and "### checkpointed_rollout" in text
    assert "dmd_loss" in capsys.readouterr().out


def test_copy_bandwidth_cpu(report):
    bw = report.copy_bandwidth("cpu", mib=4, reps=3)
    assert bw["gbps"] > 0 and bw["seconds"] > 0 and "perf_counter" in bw["how"]


def test_unresolvable_rollout_points_say_so(report):
    """CPU peak-RSS deltas of a tiny model are page noise: the report points to bench/rollout_memory.py instead of
    printing a table of zeros."""
    data = {"benchmarks": [_bench(0.01, op="checkpointed_rollout", mode="fwd+bwd", provider=m, shape="1x4x16x16",
                                  dtype="float32", bytes=0, kind="memory", peak_bytes=p, K=k, method="VmHWM")
                           for k, m, p in ((1, "plain", 0), (2, "plain", 4096), (2, "step", 0))]}
    text = report.render(data, None, markdown=True)
    assert "not resolvable" in text and "rollout_memory.py" in text and "| 2 | plain |" not in text
