"""Benchmarks of the GRPO policy ops (docs/kernels.md §3, docs/method.md §2.1, §5.4): the PPO clip loss fwd+bwd and
the rollout step.

Run: ``pytest bench/ --benchmark-only -k policy`` (``--benchmark-disable`` runs every body once).
Shapes: the latent cases of ``_util.CASES`` (CPU: the two 512 px ones). x and x_next are float32
(the rollout cache), v float32 (+ bfloat16 on CUDA, the network's autocast output); per-sample
``[B]`` sigma tensors (the SubGRPO step of each sample), eta = 0.9, clip 1e-5, advantages clamp 5.
Providers: ``ours`` (auto backend: Triton on CUDA, torch on CPU), ``reference`` (reference.py eager:
the trainer's math today, without its per-sample sigma lookup by timestep) and, on CUDA,
``compiled`` (``torch.compile(reference)``).
  * ``ppo_clip_loss``: loss, then ``torch.autograd.grad`` wrt v. ``bytes`` = x, v, x_next read once
    + dv written once.
  * ``cps_step``: the rollout step with its log-prob (docs/method.md §2.3: x_next, mean and old_logp per
    step), ours ``cps_step`` + ``cps_logprob``, reference ``cps_step_with_logprob``, noise given.
    ``bytes`` = x, v, noise read once + x_next, mean written once.
"""

from __future__ import annotations

import math

import _util as bu
import pytest
import torch

from rtdmd_kernels import reference

DEVICE = bu.bench_device()
SYNC = DEVICE == "cuda"
ETA = 0.9
OPS = ("ppo_clip_loss", "cps_step")

PARAMS = bu.bench_params(OPS, DEVICE, prefix="policy-")


def make_case(shape, v_dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """A stage-2 training step: per-sample sigmas (SubGRPO steps), an on-policy x_next with old_logp
    perturbed by ~1e-6 (bf16 nondeterminism between rollout and training), advantages of both signs."""
    gen = torch.Generator(device=device).manual_seed(seed)
    B = shape[0]

    def randn():
        return torch.randn(shape, generator=gen, device=device)

    steps = torch.tensor([1.0, 0.95809, 0.88398, 0.7175, 0.0], device=device)  # FLUX.2 512 px schedule
    idx = torch.arange(B, device=device) % 3
    sigma, sigma_next = steps[idx].contiguous(), steps[idx + 1].contiguous()
    x, v, noise = randn(), randn().to(v_dtype), randn()
    with torch.no_grad():
        x_next, _, _, _ = reference.cps_step_with_logprob(x, v, sigma, sigma_next, ETA, noise=noise)
        old = reference.cps_step_with_logprob(x, v, sigma, sigma_next, ETA, x_next=x_next)[1]
    old = old + 1e-6 * torch.randn(B, generator=gen, device=device)
    adv = 3 * torch.randn(B, generator=gen, device=device)
    return {"x": x, "v": v.requires_grad_(True), "x_next": x_next, "noise": noise, "old": old, "adv": adv,
            "sigma": sigma, "sigma_next": sigma_next}


_COMPILED: dict[str, object] = {}


def _compiled(name: str):
    if name not in _COMPILED:
        bu.raise_recompile_limit()
        _COMPILED[name] = torch.compile(getattr(reference, name))
    return _COMPILED[name]


def make_step(op: str, provider: str, c: dict):
    x, v, xn, nz, old, adv, s, sn = (c[k] for k in ("x", "v", "x_next", "noise", "old", "adv", "sigma",
                                                     "sigma_next"))
    if op == "ppo_clip_loss":
        fn = {"ours": bu.rk.ppo_clip_loss, "reference": reference.ppo_clip_loss}.get(provider) or _compiled(op)

        def step():
            loss = fn(x, v, xn, old, adv, s, sn, eta=ETA)
            (dv,) = torch.autograd.grad(loss, v)
            if SYNC:
                torch.cuda.synchronize()
            return dv

        return step
    vd = v.detach()
    if provider == "ours":
        def step():
            with torch.no_grad():
                x_next, mean = bu.rk.cps_step(x, vd, s, sn, eta=ETA, noise=nz)
                lp = bu.rk.cps_logprob(x, vd, x_next, s, sn, eta=ETA)
            if SYNC:
                torch.cuda.synchronize()
            return x_next, lp
    else:
        fn = reference.cps_step_with_logprob if provider == "reference" else _compiled("cps_step_with_logprob")

        def step():
            with torch.no_grad():
                x_next, lp, mean, std = fn(x, vd, s, sn, ETA, noise=nz)
            if SYNC:
                torch.cuda.synchronize()
            return x_next, lp
    return step


def floor_bytes(op: str, shape, v_dtype: torch.dtype) -> int:
    n, vb = math.prod(shape), torch.empty((), dtype=v_dtype).element_size()
    if op == "ppo_clip_loss":
        return n * (4 + vb + 4 + vb)  # x, v, x_next read; dv written
    return n * (4 + vb + 4 + 4 + 4)  # x, v, noise read; x_next, mean written


@pytest.mark.parametrize("op,provider,case,vdt", PARAMS)
def test_policy(benchmark, op, provider, case, vdt):
    shape = bu.CASES[case]
    v_dtype = bu.DTYPES[vdt]
    c = make_case(shape, v_dtype, DEVICE)
    step = make_step(op, provider, c)
    bu.warm_up(step, provider, "reference", warm=not benchmark.disabled)
    benchmark.group = f"{op} {case} v={vdt}"
    # cps_step here is the rollout step (cps_step + cps_logprob); bench/test_ops_forward.py times cps_step alone
    bu.record(benchmark, op="cps_step+cps_logprob" if op == "cps_step" else op, provider=provider, case=case,
              dtype=vdt, nbytes=floor_bytes(op, shape, v_dtype), device=DEVICE, main=c["x"],
              mode="fwd" if op == "cps_step" else "fwd+bwd")
    out = benchmark(step)
    if op == "ppo_clip_loss":
        assert out.shape == shape and out.dtype == v_dtype and torch.isfinite(out).all()
    else:
        assert out[0].shape == shape and out[1].shape == (shape[0],)
