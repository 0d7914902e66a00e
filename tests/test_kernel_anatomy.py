"""Every op of rtdmd_kernels is built the same way (docs/kernels.md §7), checked on the source:

* launchers are registered as custom ops only through ``_common.KernelOp`` (one registration each, the only
  place that asks ``torch.compiler.is_compiling()`` to pick the op or the launcher);
* each differentiable public op has exactly one ``autograd.Function``, and nothing registers a second
  backward (``register_autograd``);
* no module reads another module's private names (``dmd._x``, ``from .policy import _x``): what several ops
  share lives in ``_shared.py`` under public names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import rtdmd_kernels as rk

PKG = Path(rk.__file__).resolve().parent
MODULES = {p.stem: ast.parse(p.read_text(encoding="utf-8")) for p in PKG.glob("*.py")}
# public op -> the file that defines it and whether it has a gradient
DIFFERENTIABLE = {"dmd": ["dmd_loss", "ac_dmd_loss"], "policy": ["cps_step", "cps_logprob", "ppo_clip_loss"],
                  "fake_score": ["renoise", "fake_score_loss", "consistency_loss"]}


def _calls(tree: ast.AST, dotted: str) -> list[ast.Call]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            try:
                name = ast.unparse(node.func)
            except Exception:  # pragma: no cover
                continue
            if name == dotted or name.endswith("." + dotted):
                out.append(node)
    return out


def _function_classes(tree: ast.AST) -> list[ast.ClassDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
            and any(ast.unparse(b).endswith("autograd.Function") for b in n.bases)]


def test_custom_ops_are_registered_only_through_kernel_op():
    for name, tree in MODULES.items():
        registered = _calls(tree, "library.custom_op")
        assert len(registered) == (1 if name == "_common" else 0), f"{name}.py registers custom ops directly"
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "register_autograd"], (
            f"{name}.py registers a second backward (register_autograd)")


def test_one_autograd_function_per_differentiable_op():
    for name, ops in DIFFERENTIABLE.items():
        classes = _function_classes(MODULES[name])
        assert len(classes) == len(ops), f"{name}.py: {[c.name for c in classes]} for {ops}"
        # each public op applies exactly one of them, and each Function is applied by exactly one op
        public = {n.name: n for n in MODULES[name].body if isinstance(n, ast.FunctionDef) and n.name in ops}
        applied = {op: {ast.unparse(c.func).split(".")[0] for c in _calls(fn, "apply")} for op, fn in public.items()}
        assert all(len(v) == 1 for v in applied.values()), applied
        assert sorted(v.pop() for v in applied.values()) == sorted(c.name for c in classes), applied
    for name in set(MODULES) - set(DIFFERENTIABLE):
        assert not _function_classes(MODULES[name]), f"{name}.py defines an autograd.Function"


def test_dispatch_between_op_and_launcher_lives_in_one_place():
    """Op files never branch on is_compiling to pick an implementation: KernelOp does (and _common's schedule
    helpers, which build traced tables; advantage's argument checks, which trace their read-backs)."""
    allowed = {"_common", "advantage"}
    for name, tree in MODULES.items():
        if name not in allowed:
            assert not _calls(tree, "is_compiling"), f"{name}.py asks is_compiling()"


def test_no_module_reads_another_modules_private_names():
    for name, tree in MODULES.items():
        imported_modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                for alias in node.names:
                    if node.module is None:
                        imported_modules.add(alias.asname or alias.name)
                    else:
                        assert not alias.name.startswith("_"), f"{name}.py imports {node.module}.{alias.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imported_modules | {"C"} and node.attr.startswith("_")):
                pytest.fail(f"{name}.py reads {node.value.id}.{node.attr}")


def test_every_custom_op_is_registered_once():
    ops = {op for op in dir(torch.ops.rtdmd_kernels) if not op.startswith("_")}
    expected = {"dmd_fwd", "ac_dmd_fwd", "scale_grad", "cps_step_fwd", "affine_grad", "policy_fwd", "policy_bwd",
                "group_advantages", "renoise_fwd", "fake_score_fwd", "consistency_fwd", "consistency_bwd"}
    assert expected <= ops, expected - ops
