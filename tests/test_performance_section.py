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


def test_blocks_and_the_missing_gpu_block():
    ps = _module()
    results = "x\n<!-- performance:cpu:start -->\n| a | b |\n<!-- performance:cpu:end -->\n"
    readme = f"# r\n{ps.README_START}\nold\n{ps.README_END}\nrest\n"
    out = ps.render(readme, results)
    assert "### CPU\n\n| a | b |" in out and ps.NO_GPU in out and "old" not in out and out.endswith("rest\n")
    results += "<!-- performance:gpu:start -->\nH100 table\n<!-- performance:gpu:end -->\n"
    assert "### GPU\n\nH100 table" in ps.render(readme, results)
    assert ps.render(ps.render(readme, results), results) == ps.render(readme, results)  # idempotent
    with pytest.raises(ValueError, match="markers"):
        ps.render("# no markers\n", results)
