"""Test configuration. Runs before anything imports rtdmd_kernels.

Without CUDA, TRITON_INTERPRET=1 is set here so the CPU test run executes the real Triton kernels
through Triton's interpreter (it must be set before any @triton.jit decorator runs). With CUDA it is
left alone: the interpreter would also take over every CUDA launch.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import rtdmd_kernels as rk  # noqa: E402
from rtdmd_kernels import _backend  # noqa: E402


def available_backends(device: str) -> list[str]:
    """Backends that can run on ``device`` here: torch always, triton when it can run."""
    backends = ["torch"]
    if _backend.triton_available() and (device == "cuda" or _backend.interpreter_enabled()):
        backends.append("triton")
    return backends


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DEVICE_BACKENDS = [(d, b) for d in DEVICES for b in available_backends(d)]


@pytest.fixture(params=DEVICE_BACKENDS, ids=[f"{d}-{b}" for d, b in DEVICE_BACKENDS])
def device_backend(request):
    """(device, backend) for every backend available on every device; the backend is forced."""
    device, backend = request.param
    with rk.use_backend(backend):
        yield device, backend


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture
def dynamo_reset():
    """A clean torch.compile cache before and after a compile test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
