"""Every public op under torch.compile(fullgraph=True), forward and backward, and bitwise determinism run to run

One table of builders, one case per op and schedule kind: fresh random inputs (never zeros), odd shapes, float32.
Each case runs on every backend of ``device_backend`` (torch; Triton through the interpreter on CPU).

What the op files already test, and is not repeated here:
  * test_dmd.py ``test_compile_aot_eager`` / ``test_compile_inductor`` (slow): dmd_loss + ac_dmd_loss in one
    compiled graph, stats, scalar and [B] schedules, value and gradient vs eager, every backend.
    ``test_triton_deterministic``: Triton bitwise determinism at several chunks per sample.
  * test_policy.py / test_fake_score.py ``test_compile_aot_eager``: the three ops of each file in one graph
    (closure floats and [B] tensors), values and gradients; ``test_triton_deterministic`` likewise.
  * test_advantage.py ``test_compile_fullgraph`` (num_groups given), ``test_bitwise_deterministic``
    (both backends), permutation invariance.
  * test_rollout.py ``test_seeded_generator``: the same generator seed gives bit-identical rollouts and grads.
What this file adds, for every op: one graph only (a compile counter, not just "no exception"), no
graph-break counter, backward through the compiled graph on every backend, Python-float schedule values
passed as *arguments* of the compiled function (they turn symbolic once they change: one recompile, then no
more), the torch path's determinism, ``renoise``, ``group_advantages`` with ``num_groups=None`` and with
shuffled duplicate rewards, ``checkpointed_rollout`` / ``checkpointed_decode`` under fullgraph compile with
their ``torch.utils.checkpoint`` kept in the graph, and bitwise determinism of the compiled function.

``rk.group_ids`` is a host helper (a dict over Python keys, returning a CPU tensor): it is not an op and is
not meant to be compiled; it is deterministic by construction (first-seen order, tested in test_advantage.py).

Known limits under torch.compile (dynamo, torch 2.13); the first is asserted in ``test_compile_limits``:
  * ``generator=`` (``cps_step(noise=None, generator=g)``, ``checkpointed_rollout(noises=None, generator=g)``):
    dynamo cannot put a ``torch.Generator`` object into a graph ("Failed to convert args/kwargs to proxy"),
    so ``torch.randn(generator=g)`` is a graph break. Pass ``noise`` / ``noises`` (drawn outside the compiled
    region) instead; the global RNG (``generator=None``) traces.
  * ``checkpointed_rollout(offload=True)`` on CUDA: ``torch.autograd.graph.save_on_cpu`` is on dynamo's skip
    list (its ``__init__`` "should not be traced"), a graph break (seen on CPU before offload became a no-op
    there; not testable without a GPU). On CPU offload is a no-op and traces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import rtdmd_kernels as rk

SHAPE = (3, 5, 7, 9)  # 945 elements: a few interpreter programs per kernel
B = SHAPE[0]
RTOL = 2e-5  # compiled vs eager: float32 rounding (schedule coefficients are made from float32 tensors)
CKPT_HOP = torch.ops.higher_order.tag_activation_checkpoint


@dataclasses.dataclass
class Case:
    """``fn(*tensors, *floats) -> tuple[Tensor, ...]``; ``diff``: indices of the tensors that get gradient;
    ``params``: module parameters that get gradient too; ``float_sets``: the Python floats of three calls
    (empty: the schedule is in ``tensors``); ``checkpoint``: the graph must hold activation checkpoints."""

    fn: Callable[..., tuple[torch.Tensor, ...]]
    tensors: list[torch.Tensor]
    diff: tuple[int, ...]
    params: list[torch.Tensor] = dataclasses.field(default_factory=list)
    float_sets: list[tuple[float, ...]] = dataclasses.field(default_factory=list)
    checkpoint: bool = False


def _randn(g: torch.Generator, shape, device, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(shape, generator=g)).to(device)


def _sched(device, *rows):
    return [torch.tensor(r, device=device) for r in rows]


# ---------------------------------------------------------------------------------------------
# builders: (device, seed) -> Case; "float" cases pass Python floats as arguments, "tensor" cases [B] tensors


def _dmd(device, seed):
    g = torch.Generator().manual_seed(seed)
    x, f, r = (_randn(g, SHAPE, device) for _ in range(3))

    def fn(x, f, r):
        a, sa = rk.dmd_loss(x, f, r, return_stats=True)
        b, sb = rk.dmd_loss(x, f, r, normalize="global", eps=1e-3, return_stats=True)
        return a + 2 * b, sa["grad_norm"], sa["normalizer"], sb["normalizer"]

    return Case(fn, [x, f, r], (0,))


def _ac_dmd(per_sample: bool):
    def build(device, seed):
        g = torch.Generator().manual_seed(seed)
        ts = [_randn(g, SHAPE, device) for _ in range(6)]

        def fn(x, xt, vr, vf, nz, vu, ss, st, gs, eta):
            loss, st_ = rk.ac_dmd_loss(x, xt, vr, vf, nz, ss, st, v_real_uncond=vu, guidance_scale=gs, eta=eta,
                                       return_stats=True)
            return loss, st_["grad_norm"], st_["normalizer"]

        if per_sample:
            sched = _sched(device, [0.0, 0.5, 0.75], [0.02, 0.98, 0.8], [1.0, 4.5, 3.0], [0.9, 0.5, 0.0])
            return Case(fn, ts + sched, (0,))
        return Case(fn, ts, (0,), float_sets=[(0.3, 0.6, 4.5, 0.9), (0.25, 0.7, 3.0, 0.8), (0.0, 0.98, 1.0, 0.5)])

    return build


def _cps_step(per_sample: bool):
    def build(device, seed):
        g = torch.Generator().manual_seed(seed)
        ts = [_randn(g, SHAPE, device) for _ in range(3)]

        def fn(x, v, nz, s, sn, eta):
            return rk.cps_step(x, v, s, sn, eta=eta, noise=nz)

        if per_sample:
            return Case(fn, ts + _sched(device, [1.0, 0.9, 0.5], [0.9, 0.75, 0.0], [0.9, 0.0, 0.7]), (0, 1))
        return Case(fn, ts, (0, 1), float_sets=[(0.9, 0.75, 0.9), (0.75, 0.5, 0.7), (0.5, 0.0, 0.3)])

    return build


def _cps_logprob(per_sample: bool):
    """Float case: kind="cps"; per-sample case: kind="sde" with [B] sigma_max (and one sigma = 1 row)."""

    def build(device, seed):
        g = torch.Generator().manual_seed(seed)
        x, v, xn = (_randn(g, SHAPE, device) for _ in range(3))
        if per_sample:
            def fn(x, v, xn, s, sn, eta, sm):
                return (rk.cps_logprob(x, v, xn, s, sn, eta=eta, kind="sde", sigma_max=sm),)

            sched = _sched(device, [1.0, 0.9, 0.5], [0.9, 0.75, 0.25], [0.7, 0.9, 1.0], [0.95, 0.95, 0.9])
            return Case(fn, [x, v, xn] + sched, (1,))

        def fn(x, v, xn, s, sn, eta):
            return (rk.cps_logprob(x, v, xn, s, sn, eta=eta),)

        return Case(fn, [x, v, xn], (1,), float_sets=[(0.9, 0.75, 0.9), (0.75, 0.5, 0.7), (0.5, 0.0, 0.3)])

    return build


def _ppo(per_sample: bool):
    def build(device, seed):
        g = torch.Generator().manual_seed(seed)
        x, v, xn, vr = (_randn(g, SHAPE, device) for _ in range(4))
        adv = torch.tensor([1.0, -6.0, 0.5], device=device)
        with torch.no_grad():  # old log-probs near the new ones: some ratios inside the clip range, some out
            old = rk.cps_logprob(x, v, xn, 0.9, 0.75, eta=0.9) + torch.tensor([1e-6, -1e-3, 2e-3], device=device)

        def fn(x, v, xn, vr, old, adv, s, sn, eta):
            loss, st = rk.ppo_clip_loss(x, v, xn, old, adv, s, sn, eta=eta, clip_range=1e-4, v_ref=vr,
                                        kl_coef=0.5, return_stats=True)
            return loss, st["ratio_mean"], st["clip_fraction"], st["approx_kl"], st["logp"]

        if per_sample:
            return Case(fn, [x, v, xn, vr, old, adv] + _sched(device, [0.9, 0.9, 0.5], [0.75, 0.75, 0.0],
                                                              [0.9, 0.9, 0.7]), (1,))
        return Case(fn, [x, v, xn, vr, old, adv], (1,), float_sets=[(0.9, 0.75, 0.9), (0.85, 0.7, 0.8),
                                                                      (0.8, 0.75, 0.85)])

    return build


def _advantages(num_groups: int | None):
    """[N, R] rewards with duplicate values inside groups, ids shuffled, one NaN (the masked path)."""

    def build(device, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.arange(5).repeat_interleave(torch.tensor([6, 1, 7, 4, 6]))
        base = torch.randn(ids.numel(), 2, generator=g)
        base[1::3] = base[0::3][: base[1::3].shape[0]]  # duplicated rewards (ties)
        perm = torch.randperm(ids.numel(), generator=g)
        r, ids = base[perm].to(device), ids[perm].to(device)
        r[4, 1] = float("nan")

        def fn(r, ids):
            kw = {"scale": "group", "ddof": 1, "weights": [1.0, 0.5], "restandardize": True, "clip": 3.0}
            return (rk.group_advantages(r, ids, num_groups=num_groups, **kw),
                    rk.group_advantages(r[:, 0], ids, num_groups=num_groups, scale="global"))

        return Case(fn, [r, ids], ())

    return build


def _renoise(per_sample: bool):
    def build(device, seed):
        g = torch.Generator().manual_seed(seed)
        x, nz = (_randn(g, SHAPE, device) for _ in range(2))

        def fn(x, nz, ss, st):
            return (rk.renoise(x, nz, ss, st),)

        if per_sample:
            return Case(fn, [x, nz] + _sched(device, [0.0, 0.9, 0.5], [0.02, 0.98, 0.7]), (0, 1))
        return Case(fn, [x, nz], (0, 1), float_sets=[(0.2, 0.6), (0.0, 0.5), (0.5, 0.98)])

    return build


def _fake_score(per_sample: bool):
    def build(device, seed):
        g = torch.Generator().manual_seed(seed)
        v, x, nz = (_randn(g, SHAPE, device) for _ in range(3))

        def fn(v, x, nz, ss, st):
            return (rk.fake_score_loss(v, x, nz, ss, st, weight_max=5.0),)

        if per_sample:
            return Case(fn, [v, x, nz] + _sched(device, [0.0, 0.9, 0.5], [0.02, 0.98, 0.7]), (0,))
        return Case(fn, [v, x, nz], (0,), float_sets=[(0.2, 0.6), (0.0, 0.5), (0.5, 0.98)])

    return build


def _consistency(per_sample: bool):
    def build(device, seed):
        g = torch.Generator().manual_seed(seed)
        ts = [_randn(g, SHAPE, device) for _ in range(6)]

        def fn(xt, vh, x1, v1, x2, v2, st, sp):
            return (rk.consistency_loss(xt, vh, st, x1, v1, x2, v2, sp),)

        if per_sample:
            return Case(fn, ts + _sched(device, [0.3, 0.9, 0.5], [0.2, 0.7, 0.1]), (1, 3, 5))
        return Case(fn, ts, (1, 3, 5), float_sets=[(0.6, 0.4), (0.9, 0.2), (0.5, 0.45)])

    return build


class _Velocity(nn.Module):
    """A tiny velocity model over the last dim with a sigma embedding."""

    def __init__(self, g: torch.Generator, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.t = nn.Linear(1, d)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))

    def forward(self, x, sigma):
        emb = self.t(sigma.reshape(-1, 1).to(x.dtype)).reshape(x.shape[0], *[1] * (x.dim() - 2), x.shape[-1])
        return torch.tanh(self.lin(x) + emb)


SIGMAS = [1.0, 0.75, 0.5, 0.0]


def _rollout(per_sample: bool):
    """3 CPS steps, gradient through the last 2 (checkpointed, offload on: a no-op on CPU), given noises,
    the trajectory returned. Float case: eta as a float argument; per-sample: [B, K+1] sigmas, [B] eta."""

    def build(device, seed):
        g = torch.Generator().manual_seed(seed)
        model = _Velocity(g, SHAPE[-1]).to(device)
        x_T = _randn(g, SHAPE, device)
        noises = _randn(g, (len(SIGMAS) - 1, *SHAPE), device)

        def fn(x_T, noises, sigmas, eta):
            out, traj = rk.checkpointed_rollout(model, x_T, sigmas, eta=eta, noises=noises, grad_steps=2,
                                                offload=device == "cpu", return_trajectory=True)
            return out, traj

        params = list(model.parameters())
        if per_sample:
            table = torch.tensor([SIGMAS, [1.0, 0.8, 0.4, 0.0], [0.9, 0.7, 0.3, 0.1]], device=device)
            return Case(fn, [x_T, noises, table, torch.tensor([0.9, 0.5, 0.0], device=device)], (0,), params,
                        checkpoint=True)
        return Case(lambda x_T, noises, eta: fn(x_T, noises, SIGMAS, eta), [x_T, noises], (0,), params,
                    float_sets=[(0.9,), (0.7,), (0.5,)], checkpoint=True)

    return build


def _decode(device, seed):
    """checkpointed_decode over a tiny conv decoder in chunks of 2 (the last chunk 1)."""
    g = torch.Generator().manual_seed(seed)
    dec = nn.Sequential(nn.Conv2d(5, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 3, 1)).to(device)
    with torch.no_grad():
        for p in dec.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g).to(device))
    z = _randn(g, SHAPE, device)
    return Case(lambda z: (rk.checkpointed_decode(dec, z, 2),), [z], (0,), list(dec.parameters()), checkpoint=True)


CASES: dict[str, Callable[[str, int], Case]] = {
    "dmd_loss": _dmd,
    "ac_dmd_loss-float": _ac_dmd(False),
    "ac_dmd_loss-per_sample": _ac_dmd(True),
    "cps_step-float": _cps_step(False),
    "cps_step-per_sample": _cps_step(True),
    "cps_logprob-cps-float": _cps_logprob(False),
    "cps_logprob-sde-per_sample": _cps_logprob(True),
    "ppo_clip_loss-float": _ppo(False),
    "ppo_clip_loss-per_sample": _ppo(True),
    "group_advantages": _advantages(5),
    "group_advantages-inferred_groups": _advantages(None),
    "renoise-float": _renoise(False),
    "renoise-per_sample": _renoise(True),
    "fake_score_loss-float": _fake_score(False),
    "fake_score_loss-per_sample": _fake_score(True),
    "consistency_loss-float": _consistency(False),
    "consistency_loss-per_sample": _consistency(True),
    "checkpointed_rollout-float": _rollout(False),
    "checkpointed_rollout-per_sample": _rollout(True),
    "checkpointed_decode": _decode,
}


# ---------------------------------------------------------------------------------------------
# running a case: outputs and gradients


def _run(fn, case: Case, floats: tuple[float, ...]):
    """Outputs, then the gradients of a fixed weighted sum of the differentiable outputs wrt the
    differentiable inputs and parameters (all detached); the outputs end with their requires_grad flags."""
    tensors = [t.clone().requires_grad_(True) if i in case.diff else t for i, t in enumerate(case.tensors)]
    outs = fn(*tensors, *floats)
    leaves = [tensors[i] for i in case.diff] + case.params
    grads: tuple[torch.Tensor, ...] = ()
    if leaves:
        g = torch.Generator().manual_seed(7)
        weights = [torch.rand(o.shape, generator=g).to(o.device) for o in outs]
        total = sum((o * w).sum() for o, w in zip(outs, weights, strict=True) if o.requires_grad)
        grads = torch.autograd.grad(total, leaves)
    # which outputs carry gradient is part of the result (statistics are constants, compiled or not)
    flags = torch.tensor([o.requires_grad for o in outs])
    return [o.detach() for o in outs] + [flags], list(grads)


def _assert_close(got, want, what):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        scale = b.abs().nan_to_num().max().item() if b.numel() and b.is_floating_point() else 0.0
        torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * max(scale, 1e-6), equal_nan=True,
                                   msg=lambda m, i=i: f"{what}[{i}]: {m}")


def _assert_equal(got, want, what):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}[{i}]"
        same = torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        assert same, f"{what}[{i}] differs run to run: max |diff| {(a - b).abs().nan_to_num().max().item()}"


def _graph_ops(cc: CompileCounterWithBackend) -> set:
    return {n.target for gm in cc.graphs for n in gm.graph.nodes if n.op == "call_function"}


# ---------------------------------------------------------------------------------------------
# 1. torch.compile(fullgraph=True): one graph, forward and backward equal eager


@pytest.mark.parametrize("name", list(CASES))
def test_compile_fullgraph(name, device_backend, dynamo_reset):
    """torch.compile(fn, fullgraph=True, backend="aot_eager") (fullgraph fails on any graph break): values,
    stats and gradients equal eager within float32 rounding on three calls with fresh inputs; the compiled
    function is bitwise deterministic; one graph (tensor schedules), or two when Python floats are passed as
    arguments (the first call specializes them, the second changed value recompiles once with symbolic
    floats, the third changed value reuses it)."""
    device, _ = device_backend
    counters.clear()
    build = CASES[name]
    cases = [build(device, seed) for seed in (11, 12, 11)]  # the third call repeats the first's tensors
    floats = cases[0].float_sets or [(), (), ()]
    cc = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(cases[0].fn, fullgraph=True, backend=cc)
    results = []
    for case, fl in zip(cases, floats, strict=True):
        case.fn = cases[0].fn  # one Python function: recompiles come from its inputs only
        case.params = cases[0].params if case.params else []
        want = _run(case.fn, case, fl)
        got = _run(compiled, case, fl)
        _assert_close(got[0], want[0], f"{name} outputs")
        _assert_close(got[1], want[1], f"{name} gradients")
        results.append(got)
    again = _run(compiled, cases[2], floats[2])
    _assert_equal(again[0] + again[1], results[2][0] + results[2][1], f"{name} compiled")
    assert cc.frame_count == (2 if cases[0].float_sets else 1), f"{cc.frame_count} graphs"
    assert not counters["graph_break"], dict(counters["graph_break"])
    if cases[0].checkpoint:  # torch.utils.checkpoint is traced as a region, not dropped or inlined
        assert CKPT_HOP in _graph_ops(cc)


@pytest.mark.slow
def test_compile_inductor_all_ops(device_backend, dynamo_reset):
    """Every case (first float set / per-sample tensors) in ONE function compiled with the default inductor
    backend (C++ codegen for the glue around the opaque custom ops on CPU): one graph, and values and
    gradients equal eager within float32 rounding."""
    device, _ = device_backend
    counters.clear()
    cases = {name: build(device, 21) for name, build in CASES.items()}
    flat, spans, diff, params = [], {}, [], []
    for name, case in cases.items():
        spans[name] = (len(flat), len(flat) + len(case.tensors))
        diff += [len(flat) + i for i in case.diff]
        flat += case.tensors
        params += case.params

    def fn(*ts):
        outs = []
        for name, case in cases.items():
            a, b = spans[name]
            outs += case.fn(*ts[a:b], *(case.float_sets[0] if case.float_sets else ()))
        return tuple(outs)

    whole = Case(fn, flat, tuple(diff), params)
    cc = CompileCounterWithBackend("inductor")
    want = _run(fn, whole, ())
    got = _run(torch.compile(fn, fullgraph=True, backend=cc), whole, ())
    _assert_close(got[0], want[0], "outputs")
    _assert_close(got[1], want[1], "gradients")
    assert cc.frame_count == 1 and not counters["graph_break"]


# ---------------------------------------------------------------------------------------------
# 2. determinism: the same inputs twice -> bitwise identical outputs, stats and gradients


@pytest.mark.parametrize("name", list(CASES))
def test_bitwise_deterministic(name, device_backend):
    """Eager, every backend: two calls on the same inputs give bitwise identical outputs, statistics and
    gradients (inputs and parameters). For group_advantages the rewards hold shuffled duplicates and a NaN;
    checkpointed_rollout runs with given noises (the seeded-generator path: test_rollout.py)."""
    device, _ = device_backend
    case = CASES[name](device, 31)
    fl = case.float_sets[0] if case.float_sets else ()
    a = _run(case.fn, case, fl)
    b = _run(case.fn, case, fl)
    _assert_equal(a[0] + a[1], b[0] + b[1], name)


# ---------------------------------------------------------------------------------------------
# 3. what does not trace (documented above), so a change in torch or in the ops shows up here


def test_compile_limits(dynamo_reset):
    """A torch.Generator argument is a graph break (dynamo cannot proxy it); the global RNG traces."""
    x = torch.randn(SHAPE)
    gen = torch.Generator().manual_seed(0)
    with rk.use_backend("torch"):
        for fn in (lambda x: rk.cps_step(x, x, 0.5, 0.3, eta=0.7, generator=gen)[0],
                   lambda x: rk.checkpointed_rollout(lambda z, s: z * s[:, None, None, None], x, SIGMAS, eta=0.7,
                                                     generator=gen)):
            torch._dynamo.reset()
            with pytest.raises(torch._dynamo.exc.Unsupported, match="proxy"):
                torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
        torch._dynamo.reset()
        cc = CompileCounterWithBackend("aot_eager")
        out = torch.compile(lambda x: rk.cps_step(x, x, 0.5, 0.3, eta=0.7)[0], fullgraph=True, backend=cc)(x)
        assert cc.frame_count == 1 and out.shape == x.shape
