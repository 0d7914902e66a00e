"""Data-parallel training under ``torchrun`` (training.md §1; method.md §5.2, §9): process group, the two strategies,
the sample split, gathers and full-state checkpoints.

``torchrun --nproc_per_node N -m rtdmd.train ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; :func:`init`
joins the process group (NCCL on CUDA, gloo on CPU). Every random draw already comes from (seed, stream, step,
*global* sample index) (:mod:`rtdmd.rng`), so a rank simply runs its contiguous block of the global batch and
draws exactly what one process would for those samples; per-step choices (the random stop, SubGRPO's steps,
the prompt permutation) are pure functions of the seed and the step, identical on every rank without a
collective.

Strategies (``distributed.strategy``):

- ``ddp``: replicated parameters; gradients averaged with one bucketed ``all_reduce`` per optimizer step —
  what ``DistributedDataParallel`` computes. DDP's own hooks are not used because the stage updates run a
  network several times per backward (the consistency term's three calls, ``rk.checkpointed_rollout``
  re-running the generator inside backward), which DDP's one-forward-per-backward reducer rejects.
- ``fsdp``: FSDP2 (``fully_shard``) per transformer block and at the root of every trained network (generator,
  its EMA, fake score; a real backbone's shared frozen base with its adapters), bf16 compute on GPU
  (``MixedPrecisionPolicy``); gradients are reduce-scattered in backward by FSDP itself.

Checkpoints hold the full state (every DTensor gathered, rank 0 writes); loading redistributes it to the
current placement. Resuming needs the world size the run was saved with (the per-rank sample split depends on
it) and says so otherwise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

STRATEGIES = ("none", "ddp", "fsdp")


@dataclass
class DistEnv:
    """Where this process stands: ``rank`` of ``world`` processes, running ``strategy`` on ``device``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "none"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: Any = None  # the 1-D device mesh of FSDP2

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    # ------------------------------------------------------------------ the sample split
    def split(self, n: int, what: str = "batch") -> range:
        """This rank's contiguous block of ``n`` global indices; ``n`` must divide by the world size."""
        if n % self.world:
            raise ValueError(f"{what} of {n} does not split over {self.world} processes (make it a multiple)")
        per = n // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    # ------------------------------------------------------------------ collectives (no-ops on one process)
    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` (equal shapes) along dim 0, in rank order."""
        if not self.active:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def mean(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Average scalar statistics over ranks (logging: one collective for all of them)."""
        if not self.active or not values:
            return dict(values)
        keys = sorted(values)
        flat = torch.stack([_local(values[k]).float().reshape(()) for k in keys]).to(self.device)
        dist.all_reduce(flat)
        flat /= self.world
        return {k: flat[i] for i, k in enumerate(keys)}

    def any(self, flags: torch.Tensor) -> torch.Tensor:
        """Element-wise OR of a bool tensor over ranks: one ``all_reduce``, no host sync."""
        if not self.active:
            return flags
        t = flags.to(torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.bool()

    def sync_grads(self, module: nn.Module) -> None:
        """``ddp``: average the gradients of ``module``'s trainable parameters over ranks (bucketed: one
        ``all_reduce`` of the flattened gradients per dtype). No-op otherwise (FSDP reduces in backward)."""
        if not self.active or self.strategy != "ddp":
            return
        params = [p for p in module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # a parameter unused this step still takes part, with a zero gradient
                p.grad = torch.zeros_like(p)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for g in grads:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()

    # ------------------------------------------------------------------ wrapping
    def prepare(self, state, cfg) -> None:
        """Wrap a stage state's networks for the strategy and rebuild its optimizers over the (possibly new)
        parameters. ``ddp``: make rank 0's parameters everyone's. ``fsdp``: ``fully_shard`` generator, EMA and
        fake score. Call before training or loading a checkpoint."""
        if not self.active:
            return
        if self.strategy == "ddp":
            for module in _trained_modules(state):
                for t in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(t.data, src=0)
            return
        for module in _trained_modules(state):
            self.shard(module)
        state.gen_opt = _rebuild(state.gen_opt, state.generator.parameters())
        state.fake_opt = _rebuild(state.fake_opt, state.fake.parameters())
        state.ema.reset_shadow()

    def shard(self, module: nn.Module) -> None:
        """FSDP2 on ``module``: every transformer block, then the root (bf16 compute on GPU)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        target = getattr(module, "fsdp_root", None)
        target = target() if callable(target) else module
        if target is None or getattr(target, "_rtdmd_sharded", False):
            return
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.device.type == "cuda" else MixedPrecisionPolicy()
        for block in _blocks(target):
            fully_shard(block, mesh=self.mesh, mp_policy=mp)
        fully_shard(target, mesh=self.mesh, mp_policy=mp)
        target._rtdmd_sharded = True


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


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _trained_modules(state) -> list[nn.Module]:
    return [state.generator, state.ema.module, state.fake]


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a diffusers transformer inside ``module`` (SD3: ``transformer_blocks``; FLUX.2:
    also ``single_transformer_blocks``)."""
    out = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        for m in module.modules():
            blocks = getattr(m, name, None)
            if isinstance(blocks, nn.ModuleList):
                out.extend(blocks)
                break
    return out


def _rebuild(opt: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The same optimizer (class and hyperparameters) over new parameter objects; it must not have stepped."""
    import inspect

    if opt.state:
        raise RuntimeError("cannot re-wrap an optimizer that has state: prepare() before training or loading")
    accepted = inspect.signature(type(opt).__init__).parameters
    return type(opt)([p for p in params if p.requires_grad],
                     **{k: v for k, v in opt.defaults.items() if k in accepted})


# ---------------------------------------------------------------------------------------------- full states
def full_state(sd: Mapping[str, Any]) -> dict[str, Any]:
    """A module state dict with every DTensor gathered to a full tensor (a collective under FSDP)."""
    return {k: (v.full_tensor() if _is_dtensor(v) else v) for k, v in sd.items()}


def like_current(full: Mapping[str, torch.Tensor], current: Mapping[str, Any]) -> dict[str, Any]:
    """``full`` tensors redistributed to the placement of the matching ``current`` entries (DTensor or not)."""
    return {k: _like(v, current.get(k)) for k, v in full.items()}


def _like(full: Any, ref: Any) -> Any:
    """``full`` distributed as ``ref`` when ``ref`` is a DTensor of the same global shape, else unchanged."""
    if not (_is_dtensor(ref) and torch.is_tensor(full) and full.shape == ref.shape):
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


# ---------------------------------------------------------------------------------------------- setup
_CURRENT = DistEnv()


def current() -> DistEnv:
    """This process's place in the run (a single-process :class:`DistEnv` until :func:`init` joins a group)."""
    return _CURRENT


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(strategy: str, device: torch.device) -> DistEnv:
    """Join torchrun's process group (if launched by torchrun with more than one process) and check the strategy:
    one process runs ``none`` whatever is asked (``ddp``/``fsdp`` on one process are the same computation);
    several need ``ddp`` or ``fsdp``."""
    global _CURRENT
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed.strategy must be one of {STRATEGIES}, got {strategy!r}")
    world = env_world_size()
    if world <= 1:
        _CURRENT = DistEnv(device=device)
        return _CURRENT
    if strategy == "none":
        raise ValueError(f"distributed.strategy is 'none' but torchrun started {world} processes: "
                         "set it to ddp or fsdp")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    mesh = None
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,))
    log.info("rank %d of %d (%s, %s)", rank, world, strategy, device)
    _CURRENT = DistEnv(rank=rank, world=world, local_rank=local_rank, strategy=strategy, device=device, mesh=mesh)
    return _CURRENT


def shutdown() -> None:
    global _CURRENT
    if dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = DistEnv()


def broadcast_object(env: DistEnv, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the run folder's path, which has a timestamp in it)."""
    if not env.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_resume_world(saved: int | None, env: DistEnv, where: str) -> None:
    if saved is not None and int(saved) != env.world:
        raise ValueError(f"{where} was saved by {saved} process(es); resume it with the same number "
                         f"(torchrun --nproc_per_node {saved}), not {env.world}")

