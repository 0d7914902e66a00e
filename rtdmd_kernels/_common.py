"""Argument checking, small helpers and the custom-op registration shared by every op (no kernels here)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
Scalar = float | torch.Tensor


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension [B, ...], got a 0-d tensor")
    return t


def check_like(ref_name: str, ref: torch.Tensor, name: str, t: object) -> torch.Tensor:
    """``t`` must be a float tensor with exactly ``ref``'s shape and device."""
    t = check_tensor(name, t)
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    return t


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    return float(eps)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64 (the gradcheck/reference path), else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def schedule_value(name: str, value: Scalar, batch: int, device: torch.device, exact: bool = False) -> Scalar:
    """A schedule scalar as a Python float, or as a ``[B]`` tensor on ``device``: float32, or float64 when the
    tensor is float64 or ``exact`` (float64 data: every coefficient made from it stays float64, whatever dtype
    the schedule tensor came in).

    Accepted: a Python number, or a tensor of shape ``[]``, ``[B]`` or ``[B, 1, ..., 1]``. A 0-d tensor is
    expanded on the device (never read back to the host: that would sync).
    """
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a float or a floating tensor, got dtype {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the inputs are on {device}")
        dtype = torch.float64 if exact or value.dtype == torch.float64 else torch.float32  # float64 stays exact
        if value.dim() == 0:
            return value.to(dtype).expand(batch).contiguous()
        if value.shape[0] != batch or value.numel() != batch:
            raise ValueError(f"{name} must be a float or a tensor of shape [B]={[batch]}, got {tuple(value.shape)}")
        return value.reshape(batch).to(dtype).contiguous()
    if torch.compiler.is_compiling():
        # Traced: a float argument of the compiled function turns symbolic once its value changes; host
        # checks on it (isinstance, isfinite) would break the graph or specialize it (a recompile per
        # value). As a [B] tensor it follows the tensor path and stays one graph.
        return torch.ones(batch, dtype=torch.float64 if exact else torch.float32, device=device) * value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a [B] tensor, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def pack_schedule(
    values: Sequence[Scalar], batch: int, device: torch.device
) -> tuple[torch.Tensor | None, list[float]]:
    """Per-sample scalars for a kernel: ``(None, floats)`` when all are Python floats, else a
    contiguous ``[B, k]`` tensor (floats broadcast; float64 if any column is) and zeros.
    Under ``torch.compile`` a table is always made, so the traced graph holds no baked-in floats."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        if torch.compiler.is_compiling():
            table = torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)
            return table.expand(batch, len(values)).contiguous(), [0.0] * len(values)
        return None, [float(v) for v in values]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    cols = [v.to(dtype) if isinstance(v, torch.Tensor) else torch.full((batch,), v, dtype=dtype, device=device)
            for v in values]
    return torch.stack(cols, dim=1).contiguous(), [0.0] * len(values)


def schedule_math(values: Sequence[Scalar | None]) -> tuple[list, torch.dtype | None]:
    """Schedule values ready for per-sample coefficient math in double precision.

    No tensor among them: the Python floats unchanged and dtype None. Otherwise every value as a
    float64 ``[B]`` tensor on the tensors' device (``None`` stays ``None``), and the dtype the
    coefficients are returned in: float64 if any input tensor is float64, else float32.
    """
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return list(values), None
    B, dev = tensors[0].shape[0], tensors[0].device
    out = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return [v.double() if isinstance(v, torch.Tensor) else
            None if v is None else torch.full((B,), float(v), dtype=torch.float64, device=dev)
            for v in values], out


def eta_cos_sin(eta: Scalar) -> tuple[Scalar, Scalar]:
    """``(cos(eta*pi/2), sin(eta*pi/2))`` of a float or a ``[B]`` tensor (computed in float64, returned
    in the tensor's dtype)."""
    if isinstance(eta, torch.Tensor):
        half_pi = eta.double() * (math.pi / 2)
        return half_pi.cos().to(eta.dtype), half_pi.sin().to(eta.dtype)
    return math.cos(eta * math.pi / 2), math.sin(eta * math.pi / 2)


def add_scaled_(out: torch.Tensor, t: torch.Tensor, coef: Scalar) -> torch.Tensor:
    """out += coef * t, for a float or a [B, 1] coefficient."""
    return out.addcmul_(t, coef) if isinstance(coef, torch.Tensor) else out.add_(t, alpha=coef)


def add_scaled(t: torch.Tensor, other: torch.Tensor, coef: Scalar) -> torch.Tensor:
    """t + coef * other as a new tensor, for a float or a [B, 1] coefficient."""
    return torch.addcmul(t, other, coef) if isinstance(coef, torch.Tensor) else torch.add(t, other, alpha=coef)


def sub_upcast(a: torch.Tensor, b: torch.Tensor, cd: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """a - b in the compute dtype (upcast first, so low-precision inputs are not rounded)."""
    return torch.sub(cast(a, cd), cast(b, cd), out=out)


def chunking(D: int, block: int, max_chunks: int) -> tuple[int, int]:
    """(CHUNK, S) of a per-sample reduction: each sample is split into S <= max_chunks chunks of CHUNK
    elements (a multiple of ``block``)."""
    s = max(1, min(cdiv(D, block), max_chunks))
    chunk = cdiv(cdiv(D, s), block) * block
    return chunk, cdiv(D, chunk)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for it: a pageable host->CUDA copy blocks until the
    stream drains, so small host tables go through pinned memory, non-blocking."""
    if t.device == device:
        return t.contiguous()
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def flat(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous ``[B, D]`` view (copies only if ``t`` is not contiguous)."""
    shape = t.shape
    return t.view(shape[0], math.prod(shape[1:])) if t.is_contiguous() else t.contiguous().view(shape[0], -1)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; ``t`` itself when it already is (skips a call that costs ~1 us even as a no-op)."""
    return t if t.dtype == dtype else t.to(dtype)


def table_columns(sched: torch.Tensor | None, vals: Sequence[float], dtype: torch.dtype) -> list[Scalar]:
    """The per-sample scalars of a kernel call for the torch path: the ``[B, k]`` table's columns as
    ``[B, 1]`` tensors in ``dtype`` (broadcast against ``[B, D]``), or the Python floats when no table."""
    if sched is None:
        return list(vals)
    return list(cast(sched, dtype).t().unsqueeze(2).unbind(0))  # k strided [B, 1] views, one op each way


class KernelOp:
    """A launcher registered once as the custom op ``rtdmd_kernels::<name>`` (with its fake implementation).

    Calling it runs the registered op while ``torch.compile`` traces (opaque to the tracer, so
    ``fullgraph=True`` holds) and the launcher itself in eager mode, where custom-op dispatch would cost more
    than the op at small sizes. The launcher's annotations are the op's schema.
    """

    def __init__(self, name: str, launcher, fake) -> None:
        self.launcher = launcher
        self.op = torch.library.custom_op(f"rtdmd_kernels::{name}", launcher, mutates_args=())
        self.op.register_fake(fake)

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        return self.launcher(*args)


def saved_tensors_used_once() -> bool:
    """True in an eager backward whose graph is freed once it has run (``retain_graph`` and ``create_graph``
    False): the tensors a Function saved are read for the last time, so a gradient may be written into their
    memory instead of a fresh allocation (torch's AOT autograd asks the same question to donate its saved
    buffers). False while torch.compile traces, outside a backward, and where torch cannot tell."""
    if torch.compiler.is_compiling():
        return False
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if keep_graph is None:
        return False
    try:
        return not keep_graph()
    except RuntimeError:  # no graph task (the backward called by hand)
        return False
