"""Backend selection rules (docs/kernels.md §1) and the import contract of rtdmd_kernels."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rtdmd_kernels as rk
from rtdmd_kernels import _backend


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RTDMD_KERNELS_BACKEND")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=300)


def test_auto_on_cpu_follows_the_interpreter_flag():
    x = torch.randn(2, 3)
    expected = "triton-interpreter" if _backend.triton_available() and _backend.interpreter_enabled() else "torch"
    assert rk.backend_for(x) == expected


def test_float64_always_runs_torch():
    assert rk.backend_for(torch.randn(2, 3, dtype=torch.float64)) == "torch"


def test_use_backend_forces_and_restores():
    x = torch.randn(2, 3)
    before = rk.backend_for(x)
    with rk.use_backend("torch"):
        assert rk.backend_for(x) == "torch"
        with rk.use_backend("auto"):
            assert rk.backend_for(x) == before
        assert rk.backend_for(x) == "torch"
    assert rk.backend_for(x) == before


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="use_backend"):
        with rk.use_backend("cuda"):
            pass


def test_environment_variable_forces_torch(monkeypatch):
    monkeypatch.setenv("RTDMD_KERNELS_BACKEND", "torch")
    assert rk.backend_for(torch.randn(2)) == "torch"
    monkeypatch.setenv("RTDMD_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="RTDMD_KERNELS_BACKEND"):
        rk.backend_for(torch.randn(2))


def test_context_manager_wins_over_environment(monkeypatch):
    monkeypatch.setenv("RTDMD_KERNELS_BACKEND", "torch")
    auto = "triton-interpreter" if _backend.triton_available() and _backend.interpreter_enabled() else "torch"
    with rk.use_backend("auto"):
        assert rk.backend_for(torch.randn(2)) == auto


def test_forcing_triton_where_it_cannot_run_raises():
    result = _run(
        "import torch, rtdmd_kernels as rk\n"
        "with rk.use_backend('triton'):\n"
        "    try:\n"
        "        rk.backend_for(torch.randn(2))\n"
        "    except RuntimeError as e:\n"
        "        print('raised', e)\n"
        "    else:\n"
        "        print('no error')\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("raised"), result.stdout


def test_forced_triton_raises_through_the_op_too():
    result = _run(
        "import torch, rtdmd_kernels as rk\n"
        "x = torch.randn(2, 8, requires_grad=True)\n"
        "with rk.use_backend('triton'):\n"
        "    try:\n"
        "        rk.dmd_loss(x, torch.randn(2, 8), torch.randn(2, 8))\n"
        "    except RuntimeError as e:\n"
        "        print('raised')\n"
    )
    assert result.returncode == 0, result.stderr
    assert "raised" in result.stdout


def test_without_interpreter_cpu_runs_torch_path():
    result = _run("import torch, rtdmd_kernels as rk; print(rk.backend_for(torch.randn(2)))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch"


def test_import_pulls_in_torch_only():
    """Other codebases import rtdmd_kernels cheaply: never diffusers, transformers, peft or rtdmd."""
    result = _run(
        "import sys, rtdmd_kernels\n"
        "heavy = [m for m in ('diffusers', 'transformers', 'peft', 'rtdmd', 'numpy.distutils') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_works_without_triton_installed():
    """Triton is optional: with it unimportable, the torch path serves every call."""
    result = _run(
        "import sys\n"
        "sys.modules['triton'] = None\n"
        "import torch, rtdmd_kernels as rk\n"
        "x = torch.randn(2, 8, requires_grad=True)\n"
        "loss = rk.dmd_loss(x, torch.randn(2, 8), torch.randn(2, 8))\n"
        "loss.backward()\n"
        "print(rk.backend_for(x), bool(torch.isfinite(x.grad).all()))\n",
        TRITON_INTERPRET="1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch True"


def test_public_api_is_exactly_the_contract():
    for name in ("dmd_loss", "ac_dmd_loss", "backend_for", "use_backend"):
        assert callable(getattr(rk, name))
