"""The package's import layers (docs/development.md §3): every import of a project module — at module level or
inside a function — points to the same layer or a lower one, and the import graph has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: lowest first; a module belongs to the first entry whose name is it or a package holding it
LAYERS = [
    ("kernels", ["rtdmd_kernels"]),
    ("basics", ["rtdmd", "rtdmd._io", "rtdmd._deps", "rtdmd.rng", "rtdmd.sigmas", "rtdmd.dtensor", "rtdmd.distributed",
                "rtdmd.checkpoint", "rtdmd.rollout", "rtdmd.data"]),
    ("models and rewards", ["rtdmd.models", "rtdmd.rewards"]),
    ("stages and run plumbing", ["rtdmd.stages", "rtdmd.config", "rtdmd.config_reference", "rtdmd.cli", "rtdmd.run",
                                 "rtdmd.scheduler"]),
    ("entry points", ["rtdmd.evaluate", "rtdmd.plot", "rtdmd.pipeline", "rtdmd.worlds", "rtdmd.train",
                      "rtdmd.sample"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in ("rtdmd", "rtdmd_kernels") for p in (ROOT / pkg).rglob("*.py")}


def layer(name: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{name} has no layer in tests/test_layers.py: add it"
    return best[0]


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] in ("rtdmd", "rtdmd_kernels")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] in ("rtdmd", "rtdmd_kernels"):
                target = node.module
            else:
                continue
            for alias in node.names:  # `from . import rng` imports the module rtdmd.rng
                out.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_import_points_down_or_across():
    upward = [f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
              for a, targets in graph().items() for b in sorted(targets) if layer(b) > layer(a)]
    assert upward == []


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The graph is not empty by accident: known edges of each import form are found."""
    g = graph()
    assert "rtdmd.rng" in g["rtdmd.stages.common"]  # from .. import rng
    assert "rtdmd.models.diffusion" in g["rtdmd.worlds"]  # inside a function
    assert "rtdmd_kernels" in g["rtdmd.stages.common"]  # import rtdmd_kernels as rk
    assert not any(m.startswith("rtdmd.") or m == "rtdmd" for m in g["rtdmd_kernels"])


def test_no_two_modules_differ_by_a_short_suffix():
    """``schedule``/``scheduler`` or ``sample``/``sampler`` side by side read as one thing twice."""
    names = sorted(modules())
    close = [(a, b) for a in names for b in names
             if a != b and a.rpartition(".")[0] == b.rpartition(".")[0]
             and b.rpartition(".")[2].startswith(a.rpartition(".")[2])
             and len(b.rpartition(".")[2]) - len(a.rpartition(".")[2]) <= 2]
    assert close == []


def test_entry_points_import_no_heavy_dependency_until_needed():
    """Top-level project imports are allowed everywhere, so the heavy libraries must load lazily: a config error
    from ``python -m rtdmd.train`` answers in about a second, not after importing diffusers and transformers."""
    import subprocess
    import sys

    code = ("import sys, rtdmd.train, rtdmd.sample, rtdmd.evaluate.__main__; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers', 'peft', 'scipy', "
            "'matplotlib', 'open_clip'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
