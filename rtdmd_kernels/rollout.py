"""Memory-efficient back-propagation through the unrolled CPS sampler (kernels.md §6, method.md §2.2, §2.3, §7).

``checkpointed_rollout`` runs K CPS steps (``rk.cps_step``) of a velocity model and lets gradient flow
from the final latent to ``x_T`` and to the model's parameters:

* ``grad_steps`` picks the steps whose network call carries gradient (the last k: DRaFT-K / the
  reference's k = 1 truncation). At the other steps the network runs under ``no_grad`` (its output is a
  constant) while the CPS update stays differentiable in its input latent: the chain to ``x_T`` and to
  earlier grad steps is kept, with the skipped network's Jacobian taken as zero.
* ``checkpoint=True`` wraps each grad step (network call + CPS update) in a non-reentrant
  ``torch.utils.checkpoint``: only the step's inputs (latent, its sigmas, its noise) are kept, and the
  network is re-run once in backward, one step at a time, so activation memory does not grow with K.
  It nests with the model's own block-level checkpointing (diffusers ``enable_gradient_checkpointing``).
* ``offload=True`` keeps those saved step inputs in pinned host memory (CUDA only; a no-op on CPU).

``checkpointed_decode`` is the matching helper for the differentiable VAE decode of the reward path:
it decodes in chunks along the batch, each under non-reentrant checkpoint.

All noise is drawn up front, so a recomputed step sees bit-identical noise, and the random stream
does not depend on ``grad_steps``. Imports torch only.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from . import _common as C
from .policy import cps_step

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_velocity(v: object, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"velocity_fn must return a torch.Tensor, got {type(v).__name__}")
    if v.shape != x.shape:
        raise ValueError(f"velocity_fn output must have the shape of x {tuple(x.shape)}, got {tuple(v.shape)}")
    return v


def _sigma_table(sigmas: object, x_T: torch.Tensor) -> torch.Tensor:
    """``sigmas`` as a ``[B, K+1]`` float tensor on x_T's device (float64 stays float64, else float32)."""
    B = x_T.shape[0]
    if isinstance(sigmas, torch.Tensor):
        if not (sigmas.is_floating_point() or sigmas.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"sigmas must be a float tensor, got dtype {sigmas.dtype}")
        if sigmas.device != x_T.device:
            raise ValueError(f"sigmas is on {sigmas.device} but x_T is on {x_T.device}")
        table = sigmas.detach()
    elif isinstance(sigmas, Sequence) and not isinstance(sigmas, str):
        if any(isinstance(s, bool) or not isinstance(s, (int, float)) for s in sigmas):
            raise TypeError("sigmas must be a tensor or a sequence of Python floats")
        table = C.to_device(torch.tensor([float(s) for s in sigmas], dtype=torch.float32), x_T.device)
    else:
        raise TypeError(f"sigmas must be a tensor [K+1] or [B, K+1] or a sequence of floats, got "
                        f"{type(sigmas).__name__}")
    dtype = torch.float64 if table.dtype == torch.float64 else torch.float32
    table = table.to(dtype)
    if table.dim() == 1:
        if table.shape[0] < 2:
            raise ValueError(f"sigmas must have K+1 >= 2 entries, got shape {tuple(table.shape)}")
        return table.unsqueeze(0).expand(B, -1)
    if table.dim() == 2:
        if table.shape[0] != B or table.shape[1] < 2:
            raise ValueError(f"sigmas must have shape [K+1] or [B, K+1] with B={B} and K+1 >= 2, "
                             f"got {tuple(table.shape)}")
        return table
    raise ValueError(f"sigmas must have shape [K+1] or [B, K+1], got {tuple(table.shape)}")


def _grad_step_set(grad_steps: object, K: int) -> frozenset[int]:
    """The step indices (in ``[0, K)``) whose network call carries gradient."""
    if grad_steps is None:
        return frozenset(range(K))
    if isinstance(grad_steps, bool):
        raise TypeError("grad_steps must be None, an int or a sequence of ints, got a bool")
    if isinstance(grad_steps, int):
        if not 0 <= grad_steps <= K:
            raise ValueError(f"grad_steps as an int is the number of last steps, 0 <= k <= K={K}, got {grad_steps}")
        return frozenset(range(K - grad_steps, K))
    if not isinstance(grad_steps, (Sequence, set, frozenset)) or isinstance(grad_steps, (str, bytes)):
        raise TypeError(f"grad_steps must be None, an int or a sequence of ints, got {type(grad_steps).__name__}")
    out: set[int] = set()
    for i in grad_steps:
        if isinstance(i, bool):
            raise TypeError(f"grad_steps entries must be ints, got {i!r}")
        try:
            j = operator.index(i)
        except TypeError:
            raise TypeError(f"grad_steps entries must be ints, got {i!r}") from None
        if not -K <= j < K:
            raise ValueError(f"grad_steps index {j} is out of range for K={K} steps (allowed: -K <= i < K)")
        j %= K
        if j in out:
            raise ValueError(f"grad_steps has step {j} more than once: {list(grad_steps)!r}")
        out.add(j)
    return frozenset(out)


def _offload_context(offload: bool, device: torch.device):
    """Saved tensors made inside go to (pinned) host memory. On CPU this is a no-op: the tensors are in
    host memory already (save_on_cpu would only copy them, and torch.compile cannot trace it)."""
    if not offload or device.type == "cpu":
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


def checkpointed_rollout(
    velocity_fn: VelocityFn,
    x_T: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    eta: C.Scalar,
    noises: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    grad_steps: int | Sequence[int] | None = None,
    checkpoint: bool = True,
    offload: bool = False,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run ``K = len(sigmas) - 1`` CPS steps from ``x_T`` with gradient through the chosen steps.

    Step ``j`` calls ``v = velocity_fn(x_j, sigmas[:, j])`` (sigma as a ``[B]`` tensor; the wrapper adds
    the model's conditioning and timestep scaling) and ``x_{j+1} = rk.cps_step(x_j, v, sigmas[:, j],
    sigmas[:, j+1], eta=eta, noise=noises[j])[0]``.

    Args:
        sigmas: ``[K+1]`` (one schedule) or ``[B, K+1]`` (per sample), a tensor on x_T's device or a
            sequence of floats. float64 stays float64, anything else becomes float32.
        eta: the CPS noise level, a float or a ``[B]`` tensor.
        noises: ``[K, *x_T.shape]``. ``None`` draws all K at once, float32 standard normal, from
            ``generator`` before the first step (ignored when ``noises`` is given).
        grad_steps: ``None`` = every step; an int ``k`` (``0 <= k <= K``) = the last k steps (0 = no
            network call carries gradient; the result is still differentiable in ``x_T``); a sequence
            of distinct step indices, Python-style negatives allowed (``-1`` is the last step).
        checkpoint: wrap each grad step in non-reentrant checkpoint (keep only its inputs, re-run the
            network once in backward). ``False``: plain autograd, every grad step keeps its activations.
        offload: with ``checkpoint=True`` on CUDA, the saved step inputs live in pinned host memory
            (copied back on demand in backward). A no-op on CPU and with ``checkpoint=False``.
        return_trajectory: also return the K step inputs ``[K, *x_T.shape]``, detached.

    Returns:
        ``x_K`` in x_T's dtype (the x0 prediction of the last step when the sigmas end at 0), or
        ``(x_K, trajectory)``. Gradients equal those of the plain unrolled loop with ``no_grad``
        network calls at the non-grad steps.
    """
    if not callable(velocity_fn):
        raise TypeError(f"velocity_fn must be callable, got {type(velocity_fn).__name__}")
    C.check_tensor("x_T", x_T)
    table = _sigma_table(sigmas, x_T)
    K = table.shape[1] - 1
    steps = _grad_step_set(grad_steps, K)
    if noises is None:
        noises = torch.randn((K, *x_T.shape), generator=generator, dtype=torch.float32, device=x_T.device)
    else:
        C.check_tensor("noises", noises)
        if noises.shape != (K, *x_T.shape):
            raise ValueError(f"noises must have shape [K, *x_T.shape]={[K, *x_T.shape]}, got {tuple(noises.shape)}")
        if noises.device != x_T.device:
            raise ValueError(f"noises is on {noises.device} but x_T is on {x_T.device}")
    noises = noises.detach()

    def step(x: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        v = _check_velocity(velocity_fn(x, s), x)
        return cps_step(x, v, s, s_next, eta=eta, noise=noise)[0]

    use_ckpt = checkpoint and torch.is_grad_enabled()
    trajectory = []
    x = x_T
    for j in range(K):
        s, s_next, noise = table[:, j], table[:, j + 1], noises[j]
        if return_trajectory:
            trajectory.append(x.detach())
        if j not in steps:
            with torch.no_grad():
                v = _check_velocity(velocity_fn(x, s), x)
            x = cps_step(x, v.detach(), s, s_next, eta=eta, noise=noise)[0]
        elif use_ckpt:
            with _offload_context(offload, x.device):
                x = _torch_checkpoint(step, x, s, s_next, noise, use_reentrant=False)
        else:
            x = step(x, s, s_next, noise)
    if return_trajectory:
        return x, torch.stack(trajectory)
    return x


def checkpointed_decode(
    decode_fn: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """``decode_fn`` over ``latents`` in chunks of ``chunk_size`` samples, each under non-reentrant
    checkpoint, concatenated along dim 0.

    The differentiable VAE decode of the reward path (docs/method.md §7; the reference decodes with grad and no
    checkpointing): only each chunk's input latent is kept, and the decoder is re-run chunk by chunk in
    backward, so the decoder's activations exist for one chunk at a time. ``decode_fn`` maps a
    ``[b, ...]`` latent chunk to a ``[b, ...]`` tensor (e.g. ``lambda z: vae.decode(z).sample``). The
    last chunk may be smaller. Under ``no_grad`` it only chunks. Values and gradients equal
    ``decode_fn(latents)``'s for a decoder with no cross-sample ops (no batch-norm in training mode).
    """
    if not callable(decode_fn):
        raise TypeError(f"decode_fn must be callable, got {type(decode_fn).__name__}")
    C.check_tensor("latents", latents)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    use_ckpt = torch.is_grad_enabled()
    outs = []
    for chunk in latents.split(chunk_size):
        out = _torch_checkpoint(decode_fn, chunk, use_reentrant=False) if use_ckpt else decode_fn(chunk)
        if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != chunk.shape[0]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"decode_fn must return a tensor [b, ...] for a chunk of b={chunk.shape[0]} "
                             f"samples, got {got}")
        outs.append(out)
    return torch.cat(outs)
