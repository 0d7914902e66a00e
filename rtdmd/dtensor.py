"""DTensor helpers: what code that may hold FSDP2-sharded tensors needs without knowing whether it does — full
states to save, loaded states redistributed like the current placement, and resharding after a no-grad forward.
On one process every function is the identity."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a DTensor gathered (a collective), anything else unchanged."""
    return t.full_tensor() if is_dtensor(t) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's storage of ``t`` (the local shard of a DTensor): what an in-place update writes to."""
    return t.to_local() if hasattr(t, "to_local") else t


def resharded(*modules: nn.Module) -> None:
    """Put FSDP2 modules back into their sharded state. FSDP2 keeps the root's parameters unsharded after a
    forward (they are needed again in backward); after a no-grad forward (a rollout, an evaluation) they would
    stay so, and an elementwise update against a sharded twin (the EMA) would mix tensors and DTensors."""
    from torch.distributed.fsdp import FSDPModule

    for module in modules:
        target = getattr(module, "fsdp_root", None)
        target = target() if callable(target) else module
        if isinstance(target, FSDPModule):
            target.reshard()


def full_state(sd: Mapping[str, Any]) -> dict[str, Any]:
    """A module state dict with every DTensor gathered to a full tensor (a collective under FSDP)."""
    return {k: full_tensor(v) for k, v in sd.items()}


def like_current(full: Mapping[str, torch.Tensor], current: Mapping[str, Any]) -> dict[str, Any]:
    """``full`` tensors redistributed to the placement of the matching ``current`` entries (DTensor or not)."""
    return {k: _like(v, current.get(k)) for k, v in full.items()}


def _like(full: Any, ref: Any) -> Any:
    """``full`` distributed as ``ref`` when ``ref`` is a DTensor of the same global shape, else unchanged."""
    if not (is_dtensor(ref) and torch.is_tensor(full) and full.shape == ref.shape):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    sd = opt.state_dict()
    sd["state"] = {i: full_state(s) for i, s in sd["state"].items()}
    return sd


def load_optimizer_state(opt: torch.optim.Optimizer, sd: Mapping[str, Any]) -> None:
    """Load a full optimizer state into ``opt``, redistributing per-parameter tensors like the parameters."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {i: {k: _like(v, params[int(i)]) for k, v in s.items()} for i, s in sd["state"].items()}
    opt.load_state_dict({**sd, "state": state})


