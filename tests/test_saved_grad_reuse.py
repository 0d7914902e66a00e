"""The backward of the losses whose gradient is made in the forward (dmd_loss, ac_dmd_loss, fake_score_loss,
consistency_loss, and ppo_clip_loss's residual) writes the gradient over the saved tensor when that backward is its last use, and never
otherwise: ``retain_graph=True`` and ``create_graph=True`` keep the saved tensor intact, so every later
backward gives the same gradient. Every backend of ``device_backend``, float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch

import rtdmd_kernels as rk

SHAPE = (3, 4, 5, 6)


def _cases(device, dtype):
    g = torch.Generator().manual_seed(0)

    def t():
        return torch.randn(SHAPE, generator=g).to(device, dtype)

    sig = torch.tensor([0.1, 0.5, 0.7], device=device), torch.tensor([0.4, 0.8, 0.9], device=device)
    old = torch.tensor([-1.0, -0.9, -1.2], device=device)
    adv = torch.tensor([0.5, -1.0, 2.0], device=device)
    xs = [t() for _ in range(7)]
    return {
        "dmd_loss": (lambda a: rk.dmd_loss(a[0], xs[1], xs[2]), [xs[0]]),
        "ac_dmd_loss": (lambda a: rk.ac_dmd_loss(a[0], xs[1], xs[2], xs[3], xs[4], *sig, v_real_uncond=xs[5],
                                                 guidance_scale=3.0), [xs[0]]),
        "fake_score_loss": (lambda a: rk.fake_score_loss(a[0], xs[1], xs[2], *sig), [xs[0]]),
        "consistency_loss": (lambda a: rk.consistency_loss(xs[0], a[0], sig[1], xs[1], a[1], xs[2], a[2], sig[0]),
                             [xs[3], xs[4], xs[5]]),
        "ppo_clip_loss": (lambda a: rk.ppo_clip_loss(xs[1], a[0], xs[2], old, adv, sig[1], sig[0], eta=0.7,
                                                     clip_range=0.2, v_ref=xs[3], kl_coef=0.1), [xs[0]]),
    }


def _leaves(ts):
    return [t.clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("op", ["dmd_loss", "ac_dmd_loss", "fake_score_loss", "consistency_loss", "ppo_clip_loss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_over_saved_tensor_only_on_last_use(op, dtype, device_backend):
    device, _ = device_backend
    fn, inputs = _cases(device, dtype)[op]
    leaves = _leaves(inputs)
    expected = torch.autograd.grad(fn(leaves), leaves, retain_graph=True)  # kept: no reuse
    again = torch.autograd.grad(fn(leaves), leaves, create_graph=True)
    loss = fn(leaves)
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)  # the last use: may reuse
    for grads in (again, first, second):
        for a, b in zip(grads, expected, strict=True):
            assert torch.equal(a, b), (op, dtype)


@pytest.mark.parametrize("op", ["dmd_loss", "fake_score_loss", "consistency_loss", "ppo_clip_loss"])
def test_last_backward_writes_over_the_saved_tensor(op, device_backend):
    """float32: the gradient's memory is a tensor the forward saved (no new allocation)."""
    device, _ = device_backend
    fn, inputs = _cases(device, torch.float32)[op]
    leaves = _leaves(inputs)
    saved: list[int] = []

    def pack(t):
        saved.append(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(leaves)
    grads = torch.autograd.grad(loss, leaves)
    reused = [g.data_ptr() in saved for g in grads]
    # consistency: dv1 and dv2 reuse d2 and d1; dv_hat needs both residuals and is a new tensor
    assert reused == ([False, True, True] if op == "consistency_loss" else [True]), reused
