"""Benchmarks of the group-normalized GRPO advantages (docs/kernels.md §4, docs/method.md §5.3).

Run: ``pytest bench/ --benchmark-only -k advantage`` (``--benchmark-disable`` runs every body once).
Shapes: the real epochs, N = 1152 (SD3.5-M, 48 prompts x 24) and N = 1536 (FLUX.2, 64 x 24), and a
large N = 65536 (groups of 24). Modes: ``single`` (one reward, the flow_grpo / RTDMD preset
``scale="global", ddof=0, eps=1e-4``) and ``weighted`` (4 rewards, RTDMD ``weight_advantages``:
``weights=w, restandardize=True``). Providers: ``ours`` (auto backend: Triton on CUDA, torch on CPU)
and ``reference`` (what the reference trainer runs today: the numpy per-prompt tracker, one fresh
tracker per reward, timed from the reward tensor to the advantage tensor, so on CUDA it includes the
device -> host -> device trip). The reference groups by integer prompt ids (the trainer keys on prompt
strings, which makes its np.unique slower: the reference numbers are a lower bound). ``bytes`` is the
floor traffic: the rewards read once and the advantages written once.
"""

from __future__ import annotations

import _util as bu
import numpy as np
import pytest
import torch

from rtdmd_kernels import reference

DEVICE = bu.bench_device()
SYNC = DEVICE == "cuda"
OP = "group_advantages"
GROUP = 24
SIZES = (1152, 1536, 65536)
MODES = {"single": 1, "weighted": 4}
WEIGHTS = [1.0, 1.0, 1.0, 1.0]  # {clipscore, hpsv2, pickscore, geneval} (docs/method.md §5.3)
PRESET = {"scale": "global", "ddof": 0, "eps": 1e-4}

PARAMS = [
    pytest.param(n, mode, provider, id=f"{OP}-{provider}-N{n}-{mode}")
    for n in SIZES
    for mode in MODES
    for provider in ("ours", "reference")
]


def make_case(n: int, mode: str, device: str, seed: int = 0):
    """Rewards ``[N]`` or ``[N, 4]`` (float32, distinct scales per reward), shuffled prompt ids in groups of 24."""
    gen = torch.Generator().manual_seed(seed)
    G = n // GROUP
    ids = (torch.arange(n) % G)[torch.randperm(n, generator=gen)]
    R = MODES[mode]
    r = torch.rand((n, R), generator=gen) * torch.tensor([0.3, 1.0, 0.05, 1.0][:R])
    r = r.reshape(n) if R == 1 else r
    return r.to(device), ids.to(device), G


def provider_fn(provider: str, mode: str, rewards: torch.Tensor, ids: torch.Tensor, G: int):
    if provider == "ours":
        kwargs = dict(PRESET, num_groups=G)
        if mode == "weighted":
            kwargs.update(weights=WEIGHTS, restandardize=True)
        return lambda: bu.rk.group_advantages(rewards, ids, **kwargs)
    prompts = ids.cpu().numpy()  # host-side prompt keys, as the trainer has them after the gather

    def ref_fn():
        r = rewards.cpu().numpy()
        if mode == "single":
            a = reference.PerPromptStatTracker(global_std=True).update(prompts, r)
        else:
            a = reference.rtdmd_weighted_advantages(r, prompts, WEIGHTS)
        return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(rewards.device)

    return ref_fn


def floor_bytes(n: int, mode: str) -> int:
    return n * MODES[mode] * 4 + n * 4  # float32 rewards read + float32 advantages written


@pytest.mark.parametrize("n,mode,provider", PARAMS)
def test_group_advantages(benchmark, n, mode, provider):
    if provider == "reference" and n > 10_000 and benchmark.disabled:
        pytest.skip("the reference takes 0.5-4 s a call at N = 65536: timed runs only")
    rewards, ids, G = make_case(n, mode, DEVICE)
    fn = provider_fn(provider, mode, rewards, ids, G)

    def step():
        out = fn()
        if SYNC:
            torch.cuda.synchronize()
        return out

    benchmark.group = f"{OP} N={n} {mode}"
    info = {"op": OP, "provider": provider, "case": f"N{n}-{mode}", "shape": bu.shape_str(rewards.shape),
            "dtype": "float32", "bytes": floor_bytes(n, mode), "device": DEVICE, "mode": "fwd",
            "variant": mode,
            "backend": bu.rk.backend_for(rewards) if provider == "ours" else "numpy"}
    if DEVICE == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    benchmark.extra_info.update(info)
    if provider == "reference" and n > 10_000:
        out = benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)
    else:
        out = benchmark(step)
    assert out.shape == (n,) and out.dtype == torch.float32
