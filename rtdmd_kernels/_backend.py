"""Backend selection: which implementation runs an op for a given tensor.

Rules (docs/kernels.md §1):
  * CUDA tensors run the Triton kernels (compiled; interpreted if ``TRITON_INTERPRET=1``).
  * CPU tensors run Triton's interpreter when ``TRITON_INTERPRET=1`` was set before this module was
    imported and triton is installed; otherwise the pure-PyTorch implementation.
  * ``RTDMD_KERNELS_BACKEND=auto|triton|torch`` (read at each call) or ``use_backend(...)`` (a context
    manager, innermost wins over the environment) force one. Forcing ``triton`` where it cannot run
    raises ``RuntimeError``.
  * float64 tensors always run the torch path in float64 (for gradcheck and references).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch

__all__ = ["backend_for", "use_backend", "triton_available", "interpreter_enabled", "BACKENDS"]

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "RTDMD_KERNELS_BACKEND"

# The interpreter flag is read once: Triton decides at @triton.jit time whether a kernel is
# interpreted, so flipping the variable later cannot change what our kernels are.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

try:  # triton is optional: every op has a torch path
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    _TRITON_IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - depends on the environment
    _TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("rtdmd_kernels_backend", default=None)


def triton_available() -> bool:
    """True when triton imported successfully."""
    return _TRITON_IMPORT_ERROR is None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` was set before ``rtdmd_kernels`` was imported."""
    return _INTERPRET


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def requested_backend() -> str:
    """The backend asked for: ``use_backend`` if active, else the environment, else ``auto``."""
    forced = _forced.get()
    if forced is not None:
        return forced
    env = os.environ.get(ENV_VAR, "").strip().lower()
    return _check_name(env, ENV_VAR) if env else "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend (``"auto"``, ``"triton"`` or ``"torch"``) for ops called inside the block."""
    token = _forced.set(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _forced.reset(token)


def _triton_can_run(device: torch.device) -> tuple[bool, str]:
    if not triton_available():
        return False, f"triton is not importable ({_TRITON_IMPORT_ERROR})"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu":
        if _INTERPRET:
            return True, ""
        return False, "CPU tensors need TRITON_INTERPRET=1 set before rtdmd_kernels is imported"
    return False, f"no Triton backend for device type {device.type!r}"


def backend_for(tensor: torch.Tensor) -> str:
    """The implementation a call on ``tensor`` would use: ``"triton"``, ``"triton-interpreter"`` or ``"torch"``."""
    requested = requested_backend()
    if requested == "torch" or tensor.dtype == torch.float64:
        return "torch"
    ok, why = _triton_can_run(tensor.device)
    if not ok:
        if requested == "triton":
            raise RuntimeError(f"backend 'triton' was forced but cannot run on {tensor.device}: {why}")
        return "torch"
    return "triton-interpreter" if _INTERPRET else "triton"
