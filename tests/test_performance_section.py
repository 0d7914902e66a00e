"""README.md's Performance section is generated from bench/RESULTS.md and must not drift from it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("performance_section", ROOT / "bench" / "performance_section.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_matches_results():
    ps = _module()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert ps.render(readme, (ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8")) == readme, \
        "run: python -m bench.performance_section"


CPU = """**Some CPU**, 2026-01-01
| op | mode | shape (fp32) | ours | reference | × ref |
|---|---|---|---|---|---|
| dmd_loss | fwd | 8x128x32x32 | 1 ms | 3 ms | 3.00 |
| dmd_loss | fwd+bwd | 8x16x64x64 | 1 ms | 2 ms | 2.00 |
| dmd_loss | fwd+bwd | 8x128x32x32 | 1 ms | 4 ms | 4.00 |
| cps_step+cps_logprob | fwd | 8x128x32x32 | 1 ms | 1 ms | 1.00 |
| group_advantages | fwd | 1152x4 | 1 ms | 70 ms | 70.0 |
"""
GPU = """on an **Some GPU**
| op | dtype | MB moved | ours µs | eager µs | × eager | ours GB/s | % of copy BW |
|---|---|---|---|---|---|---|---|
| dmd_loss | bf16 | 1 | 1 | 9 | 9.0 | 1 | 10.0 |
| dmd_loss | fp32 | 2 | 1 | 7 | 7.0 | 1 | 50.0 |
"""


def _results(cpu: str = CPU, gpu: str | None = GPU, headline: str = "| what | measured |") -> str:
    out = f"x\n<!-- performance:headline:start -->\n{headline}\n<!-- performance:headline:end -->\n"
    out += f"<!-- performance:cpu:start -->\n{cpu}<!-- performance:cpu:end -->\n"
    if gpu is not None:
        out += f"<!-- performance:gpu:start -->\n{gpu}<!-- performance:gpu:end -->\n"
    return out


def test_headline_and_one_row_per_op():
    ps = _module()
    readme = f"# r\n{ps.README_START}\nold\n{ps.README_END}\nrest\n"
    out = ps.render(readme, _results())
    assert "| what | measured |" in out and "old" not in out and out.endswith("rest\n")
    assert "CPU: **Some CPU**" in out and "GPU: **Some GPU**" in out
    assert "| `dmd_loss` | 4.00 | 7.0 | 50.0 |" in out  # fwd+bwd at the FLUX.2 shape; fp32 on the GPU
    assert f"| `group_advantages` | 70.0 (fwd, 1152x4) | {ps.NO_ROW} | {ps.NO_ROW} |" in out
    assert "cps_step+cps_logprob" not in out  # combined rows are not ops
    assert ps.render(out, _results()) == out  # idempotent
    with pytest.raises(ValueError, match="markers"):
        ps.render("# no markers\n", _results())


def test_a_missing_gpu_block_is_said():
    ps = _module()
    out = ps.section(_results(gpu=None))
    assert "no GPU measurement" in out and f"| `dmd_loss` | 4.00 | {ps.NO_ROW} | {ps.NO_ROW} |" in out
