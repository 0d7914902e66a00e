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

import dataclasses
import importlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .dtensor import full_tensor

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
        flat = torch.stack([full_tensor(values[k]).float().reshape(()) for k in keys]).to(self.device)
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
    def wrap(self, state):
        """A stage state ready for the strategy: ``ddp`` gives every rank rank 0's parameters; ``fsdp`` shards
        generator, EMA and fake score (``fully_shard`` converts the modules in place) and returns the state with
        optimizers over the sharded parameters and a re-taken EMA shadow. Call before training or loading a
        checkpoint; on one process the state comes back as it is."""
        if not self.active:
            return state
        if self.strategy == "ddp":
            for module in _trained_modules(state):
                for t in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(t.data, src=0)
            return state
        for module in _trained_modules(state):
            self.shard(module)
        state = dataclasses.replace(state, gen_opt=_rebuild(state.gen_opt, state.generator.parameters()),
                                    fake_opt=_rebuild(state.fake_opt, state.fake.parameters()))
        state.ema.reset_shadow()
        return state

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
        raise RuntimeError("cannot re-wrap an optimizer that has state: wrap() before training or loading")
    accepted = inspect.signature(type(opt).__init__).parameters
    return type(opt)([p for p in params if p.requires_grad],
                     **{k: v for k, v in opt.defaults.items() if k in accepted})


# ---------------------------------------------------------------------------------------------- setup
def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(strategy: str, device: torch.device) -> DistEnv:
    """This process's :class:`DistEnv`, made once by the entry point and passed to what needs it: joins torchrun's
    process group (if launched by torchrun with more than one process) and checks the strategy. One process runs
    ``none`` whatever is asked (``ddp``/``fsdp`` on one process are the same computation); several need ``ddp``
    or ``fsdp``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed.strategy must be one of {STRATEGIES}, got {strategy!r}")
    world = env_world_size()
    if world <= 1:
        return DistEnv(device=device)
    if strategy == "none":
        raise ValueError(f"distributed.strategy is 'none' but torchrun started {world} processes: "
                         "set it to ddp or fsdp")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    # The diffusers model stack (torch._dynamo among it), imported lazily when the first network is built, made
    # about one 2-process gloo run in ten abort at exit ("terminate called without an active exception") when
    # that first import came after the process group had started. Every run needs it: import it first.
    importlib.import_module("torch._dynamo")  # not `import torch._dynamo`: that would make `torch` a local name here
    from diffusers import SD3Transformer2DModel  # noqa: F401

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    mesh = None
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,))
    log.info("rank %d of %d (%s, %s)", rank, world, strategy, device)
    return DistEnv(rank=rank, world=world, local_rank=local_rank, strategy=strategy, device=device, mesh=mesh)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


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

