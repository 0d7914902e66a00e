"""The trainer's randomness contract.

Every random draw that belongs to one sample derives from ``(seed, stream, step, global index)`` and
nothing else: not from the batch size, the chunking of a batch, or how samples are split across
processes. A sample therefore gets the same noise whether it is drawn alone, in a batch of 8 or on
rank 3 of 8 — which is what makes data-parallel runs reproduce single-process ones. Draws shared by a
whole step (a random stop index, SubGRPO's step subset) derive from ``(seed, stream, step)``.

Streams are short strings naming the purpose ("eval/x_T", "stage1/xi2", ...). Draws are made on the
CPU (bit-identical on every machine) in float32/float64 and moved to the target device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
import torch


def derive_seed(seed: int, stream: str, step: int = 0, index: int = -1) -> int:
    """A 63-bit seed from ``(seed, stream, step, index)`` (blake2b: stable across runs, machines, versions)."""
    key = f"{int(seed)}|{stream}|{int(step)}|{int(index)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1


def generator(seed: int, stream: str, step: int = 0, index: int = -1) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``(seed, stream, step, index)``."""
    return torch.Generator().manual_seed(derive_seed(seed, stream, step, index))


def _indices(indices: Iterable[int] | torch.Tensor) -> list[int]:
    if isinstance(indices, torch.Tensor):
        return [int(i) for i in indices.reshape(-1).tolist()]
    return [int(i) for i in indices]


def normal(seed: int, stream: str, step: int, indices: Iterable[int] | torch.Tensor, shape: Sequence[int], *,
           dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal ``[len(indices), *shape]``; row ``i`` depends only on ``(seed, stream, step, indices[i])``."""
    idx = _indices(indices)
    out = torch.empty((len(idx), *shape), dtype=torch.float32)
    for row, i in enumerate(idx):
        torch.randn(tuple(shape), generator=generator(seed, stream, step, i), out=out[row])
    return out.to(device=device, dtype=dtype)


def uniform(seed: int, stream: str, step: int, indices: Iterable[int] | torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float64 ``[len(indices)]``, one value per index."""
    idx = _indices(indices)
    out = torch.empty(len(idx), dtype=torch.float64)
    for row, i in enumerate(idx):
        torch.rand((), generator=generator(seed, stream, step, i), dtype=torch.float64, out=out[row])
    return out


def integers(seed: int, stream: str, step: int, low: int, high: int, size: int | None = None) -> np.ndarray | int:
    """Step-level integer draw(s) in ``[low, high)``, shared by every sample and rank of the step."""
    rng = np.random.default_rng(derive_seed(seed, stream, step))
    out = rng.integers(low, high, size=size)
    return int(out) if size is None else out


def permutation(seed: int, stream: str, step: int, n: int, index: int = -1) -> list[int]:
    """A permutation of ``range(n)`` shared by every rank: a pure function of ``(seed, stream, step, index)``."""
    return torch.randperm(n, generator=generator(seed, stream, step, index)).tolist()


def epoch_batch(seed: int, stream: str, step: int, n: int, batch: int) -> list[int]:
    """Indices (into ``n`` items) of global batch ``step`` of a shuffling sampler without replacement: every
    epoch is a fresh permutation cut into ``n // batch`` batches, the incomplete rest dropped (what
    ``DistributedSampler(shuffle=True, drop_last=True)`` under a ``drop_last`` loader yields). With fewer items
    than a batch, batches run on across epochs, so an item repeats within a batch only then."""
    if n < 1 or batch < 1:
        raise ValueError(f"epoch_batch needs n >= 1 and batch >= 1, got n={n}, batch={batch}")
    if n >= batch:
        per_epoch = n // batch
        epoch, pos = divmod(step, per_epoch)
        return permutation(seed, stream, epoch, n)[pos * batch:(pos + 1) * batch]
    first = step * batch
    return [permutation(seed, stream, p // n, n)[p % n] for p in range(first, first + batch)]


def k_repeat_epoch(seed: int, epoch: int, n_prompts: int, group_size: int, prompts_per_epoch: int = 0,
                   sampling_batches: int = 1) -> list[int]:
    """Prompt indices of an epoch's samples, the K-repeat sampler (docs/method.md §5.2): ``sampling_batches``
    batches, each drawing ``prompts_per_epoch / sampling_batches`` distinct prompts afresh (so a prompt can recur
    in a later batch of the epoch and its group grow past K, as in the reference) and repeating each
    ``group_size`` times in a seeded order that spreads a group over the ranks; ``prompts_per_epoch = 0``: every
    prompt once, in one batch. A pure function of its arguments: the same list on every rank."""
    if prompts_per_epoch == 0:
        batches, per = 1, n_prompts
    else:
        batches, per = sampling_batches, prompts_per_epoch // sampling_batches
        if per * batches != prompts_per_epoch:
            raise ValueError(f"prompts_per_epoch ({prompts_per_epoch}) must be a multiple of sampling_batches "
                             f"({sampling_batches})")
    if per > n_prompts:
        raise ValueError(f"{per} distinct prompts per sampling batch, but there are only {n_prompts} prompts")
    out: list[int] = []
    for b in range(batches):
        chosen = range(n_prompts) if per == n_prompts else \
            permutation(seed, "stage2/prompts", epoch, n_prompts, b)[:per]
        repeated = [p for p in chosen for _ in range(group_size)]
        out += [repeated[i] for i in permutation(seed, "stage2/k_repeat", epoch, len(repeated), b)]
    return out
