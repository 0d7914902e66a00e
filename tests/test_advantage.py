"""Tests of the group-normalized GRPO advantages (docs/kernels.md §4, docs/method.md §5.3, docs/kernels.md §4.1).

Oracles, all in float64 on the rewards as the op sees them (already rounded to the test dtype, so
only the op's own arithmetic counts): the reference trainers transcribed in
``rtdmd_kernels.reference`` (flow_grpo / RTDMD tracker, RTDMD weighted mode, TRL, DanceGRPO), and
``_oracle`` below, a loop-per-group numpy statement of docs/kernels.md §4 for the edge cases the
references do not define (NaN groups, singleton groups with ddof=1, empty groups, weights, clip, ids out of
range, ±inf rewards, rewards near float32's range).
Both paths compute in float64 and round once to float32, so the tests of hostile inputs (section 3) hold
the op to F32_RTOL = 1e-6 relative to max|oracle| (a few float32 ulps); the others keep 2e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rtdmd_kernels as rk
from rtdmd_kernels import advantage as adv_mod
from rtdmd_kernels import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
RTOL = 2e-5
F32_RTOL = 1e-6  # float32 rounding of a float64 result


def _close(ours, expected, rtol=RTOL):
    """Equal to rounding: ``rtol`` relative to max(1, max|expected|); NaN exactly where ``expected`` is NaN."""
    ours = ours.detach().cpu().double().numpy()
    expected = np.asarray(expected, dtype=np.float64)
    assert ours.shape == expected.shape
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(ours), nan), f"NaN at {np.flatnonzero(np.isnan(ours))}, not {np.flatnonzero(nan)}"
    ours, expected = ours[~nan], expected[~nan]
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    err = float(np.abs(ours - expected).max()) if expected.size else 0.0
    assert err <= rtol * scale, f"max error {err:.3e} > {rtol * scale:.3e}"


def _oracle(rewards, ids, G, *, scale="group", ddof=0, eps=1e-4, weights=None, restandardize=False, clip=None):
    """docs/kernels.md §4.1 in float64 numpy, one group at a time: a reward counts when it is finite and its
    row's id lies in [0, G); a row with an id outside [0, G) ends NaN."""
    r = np.asarray(rewards, dtype=np.float64)
    r = r.reshape(r.shape[0], -1)
    ids = np.asarray(ids)
    N, R = r.shape
    w = np.ones(R) if weights is None else np.asarray(weights, dtype=np.float64)
    id_ok = (ids >= 0) & (ids < G)
    ok = np.isfinite(r) & id_ok[:, None]

    def std(v):
        return float(np.std(v, ddof=ddof)) if v.size > ddof else 0.0

    total = np.zeros(N)
    for j in range(R):
        col, valid = r[:, j], ok[:, j]
        a = np.zeros(N)
        for g in range(G):
            m = (ids == g) & valid
            if not m.any():
                continue
            d = col[m] - col[m].mean()
            den = {"group": std(col[m]) + eps, "global": std(col[valid]) + eps, "none": 1.0}[scale]
            a[m] = d / den
        total += w[j] * a
    if restandardize:
        rv = ok.any(axis=1)
        out = np.zeros(N)
        out[rv] = (total[rv] - total[rv].mean()) / (std(total[rv]) + eps)
        total = out
    total = np.clip(total, -clip, clip) if clip is not None else total
    return np.where(id_ok, total, np.nan)


def _groups(sizes, seed=0):
    """Shuffled ids for groups of the given sizes."""
    ids = torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)])
    return ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed))]


def _rewards(n, r=None, dtype=torch.float32, device="cpu"):
    shape = (n,) if r is None else (n, r)
    return (torch.randn(shape) * 2 + 0.5).to(dtype).to(device)


def _f64(t):
    return t.detach().cpu().double().numpy()


# ---------------------------------------------------------------------------------------------
# 1. parity with the reference trainers


@pytest.mark.parametrize("dtype", DTYPES)
def test_flow_grpo_rtdmd_single(device_backend, dtype):
    """flow_grpo / RTDMD one reward: per-prompt mean, np.std over all samples (ddof 0) + 1e-4."""
    device, _ = device_backend
    prompts = [f"prompt {i % 7}" for i in torch.randperm(7 * 24).tolist()]
    ids = rk.group_ids(prompts)
    r = _rewards(len(prompts), dtype=dtype, device=device)
    out = rk.group_advantages(r, ids.to(device), num_groups=7, scale="global", ddof=0, eps=1e-4)
    assert out.shape == (len(prompts),)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _close(out, ref.PerPromptStatTracker(global_std=True).update(prompts, _f64(r)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rtdmd_weighted_multi_reward(device_backend, dtype):
    """RTDMD weight_advantages: per-reward global-std advantages, weighted sum, then restandardized."""
    device, _ = device_backend
    ids = _groups([24] * 6, seed=1)
    r = _rewards(ids.numel(), 4, dtype, device)
    r = r * torch.tensor([1.0, 0.1, 3.0, 0.02], device=device).to(dtype)  # rewards on different scales
    w = [1.0, 2.0, 0.5, 1.5]
    out = rk.group_advantages(r, ids.to(device), num_groups=6, scale="global", weights=w, restandardize=True)
    _close(out, ref.rtdmd_weighted_advantages(_f64(r), ids.numpy(), w))
    names = ["clip", "hps", "pick", "geneval"]
    as_dict = {n: _f64(r)[:, k] for k, n in enumerate(names)}
    _close(out, ref.rtdmd_weighted_advantages(as_dict, ids.numpy(), dict(zip(names, w, strict=True))))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["group", "batch", "none"])
def test_trl_with_nans(device_backend, dtype, mode):
    """TRL: nanmean per group, Bessel nanstd (group or batch) + 1e-4 or no scaling; NaN rewards -> 0."""
    device, _ = device_backend
    ids = _groups([5, 9, 3, 12, 7, 2, 8], seed=2)
    r = _rewards(ids.numel(), dtype=dtype)
    r[[1, 7, 20]] = float("nan")
    kept = torch.bincount(ids[~torch.isnan(r)], minlength=7)
    assert bool((kept >= 2).all())  # TRL gives NaN for a group with one valid reward; we give std 0
    scale = {"group": "group", "batch": "global", "none": "none"}[mode]
    out = rk.group_advantages(r.to(device), ids.to(device), num_groups=7, scale=scale, ddof=1, eps=1e-4)
    _close(out, ref.trl_advantages(_f64(r), ids, mode).numpy())
    assert torch.equal(out.cpu()[[1, 7, 20]], torch.zeros(3, dtype=out.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dancegrpo(device_backend, dtype):
    """DanceGRPO: contiguous groups of num_generations, torch.std (Bessel) + 1e-8."""
    device, _ = device_backend
    ids = torch.arange(12 * 10) // 12
    r = _rewards(ids.numel(), dtype=dtype, device=device)
    out = rk.group_advantages(r, ids.to(device), num_groups=10, scale="group", ddof=1, eps=1e-8)
    _close(out, ref.dancegrpo_advantages(_f64(r), 12).numpy())


def test_tracker_history_and_clear():
    """The transcribed tracker keeps per-prompt history until clear() (RTDMD clears every epoch)."""
    t = ref.PerPromptStatTracker()
    t.update(["a", "a"], [1.0, 3.0])
    expected = (np.array([5.0, 7.0]) - 4.0) / (np.std([1, 3, 5, 7]) + 1e-4)
    np.testing.assert_allclose(t.update(["a", "a"], [5.0, 7.0]), expected)
    t.clear()
    np.testing.assert_allclose(t.update(["a", "a"], [5.0, 7.0]), np.array([-1.0, 1.0]) / (1.0 + 1e-4))


# ---------------------------------------------------------------------------------------------
# 2. docs/kernels.md §4 semantics against the oracle, edge cases included


def _edge_case(R, device):
    """Groups of sizes 1..9 shuffled, an empty group (id 4 unused), NaNs: single ones, a whole group
    of column 0, and (R > 1) a row with every column NaN."""
    sizes = [3, 1, 9, 6, 0, 2, 8, 1, 5, 7]
    ids = _groups(sizes, seed=3)
    r = _rewards(ids.numel(), R)
    col0 = r if R is None else r[:, 0]
    col0[ids == 2] = float("nan")  # a whole group NaN (in column 0)
    r[5] = float("nan")  # a row all NaN
    r[11] = float("nan")
    if R is not None:
        r[17, 1] = float("nan")
        r[ids == 1, R - 1] = float("nan")  # the singleton group's only value in the last column
    return r.to(device), ids, len(sizes)


@pytest.mark.parametrize("scale", ["group", "global", "none"])
@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("R", [None, 3])
def test_semantics_edge_cases(device_backend, scale, ddof, R):
    device, _ = device_backend
    r, ids, G = _edge_case(R, device)
    w = None if R is None else [0.5, -1.0, 2.0]
    for restd, clip in ((False, None), (True, 1.5)):
        out = rk.group_advantages(r, ids.to(device), num_groups=G, scale=scale, ddof=ddof, weights=w,
                                  restandardize=restd, clip=clip)
        expected = _oracle(_f64(r), ids.numpy(), G, scale=scale, ddof=ddof, weights=w, restandardize=restd, clip=clip)
        _close(out, expected)
        assert out.cpu()[5].item() == 0.0  # a row with no valid reward ends at 0


@pytest.mark.parametrize("scale", ["group", "global"])
def test_skewed_groups_small_blocks(device_backend, monkeypatch, scale):
    """One big group among singletons, with tiny blocks: every kernel loop runs many iterations and the
    combine runs many programs (the block sizes are launch parameters, not part of the result)."""
    device, _ = device_backend
    monkeypatch.setattr(adv_mod, "MAX_TILE", 64)
    monkeypatch.setattr(adv_mod, "COMBINE_BLOCK", 16)
    monkeypatch.setattr(adv_mod, "REDUCE_BLOCK", 32)
    ids = _groups([150] + [1] * 30 + [2] * 20, seed=14)
    r = _rewards(ids.numel(), 3)
    r[[4, 40, 90], [0, 2, 1]] = float("nan")
    kw = {"scale": scale, "ddof": 1, "weights": [1.0, -0.5, 2.0], "restandardize": True, "clip": 2.5}
    out = rk.group_advantages(r.to(device), ids.to(device), num_groups=51, **kw)
    _close(out, _oracle(_f64(r), ids.numpy(), 51, **kw))


@pytest.mark.parametrize("ddof", [0, 1])
def test_singleton_groups(device_backend, ddof):
    """A group of one: advantage 0 (r - mean = 0); with ddof=1 its std is 0, not NaN."""
    device, _ = device_backend
    r = _rewards(6, device=device)
    out = rk.group_advantages(r, torch.arange(6, device=device), num_groups=6, ddof=ddof)
    assert torch.equal(out.cpu(), torch.zeros(6))
    out = rk.group_advantages(r, torch.arange(6, device=device), num_groups=6, ddof=ddof, restandardize=True)
    assert torch.equal(out.cpu(), torch.zeros(6))


@pytest.mark.parametrize("scale", ["group", "global", "none"])
def test_all_equal_rewards(device_backend, scale):
    device, _ = device_backend
    ids = _groups([4, 4, 4], seed=4).to(device)
    r = torch.full((12, 2), 0.75, device=device)
    for restd in (False, True):
        out = rk.group_advantages(r, ids, num_groups=3, scale=scale, ddof=1, restandardize=restd)
        assert torch.equal(out.cpu(), torch.zeros(12))


def test_empty_groups_and_inferred_num_groups(device_backend):
    """num_groups larger than the max id (empty groups) changes nothing; None infers max + 1."""
    device, _ = device_backend
    ids = _groups([5, 7, 4], seed=5).to(device)
    r = _rewards(16, 2, device=device)
    a = rk.group_advantages(r, ids, num_groups=40)
    b = rk.group_advantages(r, ids)
    c = rk.group_advantages(r, ids, num_groups=3, validate=True)
    assert torch.equal(a, b) and torch.equal(b, c)
    _close(a, _oracle(_f64(r), ids.cpu().numpy(), 3))


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.uint8, torch.int16])
def test_id_dtypes(device_backend, id_dtype):
    device, _ = device_backend
    ids = _groups([6, 3, 7], seed=6)
    r = _rewards(16, device=device)
    out = rk.group_advantages(r, ids.to(id_dtype).to(device), num_groups=3)
    assert torch.equal(out, rk.group_advantages(r, ids.to(device), num_groups=3))


def test_noncontiguous_inputs(device_backend):
    device, _ = device_backend
    ids = _groups([10, 14, 6, 10], seed=7)
    big_ids = torch.stack([ids, ids.flip(0)], dim=1).to(device)  # column 0 is a strided view
    big_r = _rewards(4 * ids.numel(), device=device).reshape(ids.numel(), 4)
    r = big_r[:, ::2]  # [N, 2], strides (4, 2)
    rt = _rewards(2 * ids.numel(), device=device).reshape(2, ids.numel()).t()  # [N, 2], column-major
    for rr in (r, rt, big_r[:, 1]):
        assert not rr.is_contiguous()
        out = rk.group_advantages(rr, big_ids[:, 0], num_groups=4, scale="global", restandardize=True)
        _close(out, _oracle(_f64(rr), ids.numpy(), 4, scale="global", restandardize=True))
        # Same values as the contiguous layout; not bitwise: a strided load compiles to different code
        # (seen on an H100: last-ulp differences), and bitwise equality is promised run to run only.
        dense = rk.group_advantages(rr.contiguous(), ids.to(device), num_groups=4, scale="global", restandardize=True)
        torch.testing.assert_close(out, dense, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", ["group", "global"])
def test_permutation_invariance(device_backend, scale):
    device, _ = device_backend
    ids = _groups([24] * 8, seed=8).to(device)
    r = _rewards(ids.numel(), 4, device=device)
    r[3, 2] = float("nan")
    kw = {"num_groups": 8, "scale": scale, "weights": [1.0, 0.5, 2.0, 1.0], "restandardize": True}
    out = rk.group_advantages(r, ids, **kw)
    perm = torch.randperm(ids.numel()).to(device)
    out_p = rk.group_advantages(r[perm], ids[perm], **kw)
    torch.testing.assert_close(out_p, out[perm], rtol=0, atol=1e-6)


def test_bitwise_deterministic(device_backend):
    device, _ = device_backend
    ids = _groups([24] * 10, seed=9).to(device)
    r = _rewards(ids.numel(), 4, device=device)
    kw = {"num_groups": 10, "scale": "global", "weights": [1.0, 1.0, 1.0, 1.0], "restandardize": True}
    a = rk.group_advantages(r, ids, **kw)
    b = rk.group_advantages(r, ids, **kw)
    assert torch.equal(a, b)
    r[0, 0] = float("nan")  # the masked torch path too
    assert torch.equal(rk.group_advantages(r, ids, **kw), rk.group_advantages(r, ids, **kw))


def test_backends_agree():
    """The torch and Triton paths agree to float32 rounding on the same inputs."""
    ids = _groups([24] * 8, seed=10)
    r = _rewards(ids.numel(), 4)
    r[[0, 50], [1, 3]] = float("nan")
    outs = []
    for backend in ("torch", "triton"):
        if backend == "triton" and rk.backend_for(r) == "torch":
            with pytest.raises(RuntimeError), rk.use_backend("triton"):
                rk.backend_for(r)
            continue
        with rk.use_backend(backend):
            outs.append(rk.group_advantages(r, ids, num_groups=8, scale="group", weights=[1, 2, 3, 4], clip=3.0))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=0, atol=1e-5)


def test_sorted_segment_torch_path():
    """The torch path off CPU sums sorted segments (segment_reduce) instead of index_add_: same numbers,
    with ids outside [0, G) left out of every group (and, in the op, NaN)."""
    ids = _groups([7, 1, 12, 5], seed=11)
    r = _rewards(ids.numel(), 3, torch.float64)
    r[2, 0] = float("nan")
    for scale in ("group", "global", "none"):
        args = (r, ids, torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), 4, scale, 1, 1e-4, True, None)
        a = adv_mod._torch_impl(*args, use_index_add=True)
        b = adv_mod._torch_impl(*args, use_index_add=False)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # ids out of range (-1 and 9) do not disturb the valid groups
    ids_bad = ids.clone()
    ids_bad[[0, 1]] = torch.tensor([-1, 9])
    seg = adv_mod._Segments(ids_bad, 4, use_index_add=False)
    sums = seg.sum(torch.ones(ids.numel(), 1, dtype=torch.float64))
    expected = torch.bincount(ids_bad[2:], minlength=4).double().unsqueeze(1)
    assert torch.equal(sums, expected)
    # and the whole op on hostile input (ids out of range, ±inf, huge float32 rewards): both ways agree
    r32 = (r * 1e30).float()
    r32[3, 1], r32[4, 2] = float("inf"), float("-inf")
    for scale in ("group", "global", "none"):
        args = (r32, ids_bad, torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), 4, scale, 1, 1e-4, True, 3.0)
        a = adv_mod._torch_impl(*args, use_index_add=True)
        b = adv_mod._torch_impl(*args, use_index_add=False)
        assert a.dtype == b.dtype == torch.float32 and bool(a[:2].isnan().all())
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)
        _close(b, _oracle(_f64(r32), ids_bad.numpy(), 4, scale=scale, ddof=1, weights=[1.0, 2.0, 0.5],
                          restandardize=True, clip=3.0), rtol=F32_RTOL)


def test_clip(device_backend):
    device, _ = device_backend
    ids = _groups([8, 8], seed=12).to(device)
    r = _rewards(16, device=device)
    out = rk.group_advantages(r, ids, num_groups=2, scale="none", clip=0.5)
    assert float(out.abs().max()) <= 0.5
    _close(out, _oracle(_f64(r), ids.cpu().numpy(), 2, scale="none", clip=0.5))


def test_empty(device_backend):
    device, _ = device_backend
    out = rk.group_advantages(torch.empty(0, 3, device=device), torch.empty(0, dtype=torch.long, device=device))
    assert out.shape == (0,) and out.dtype == torch.float32


def test_group_ids_helper():
    ids = rk.group_ids(["b", "a", "b", "c", "a"])
    assert ids.dtype == torch.int64 and ids.tolist() == [0, 1, 0, 2, 1]
    assert rk.group_ids([]).tolist() == []
    assert rk.group_ids([(1, 2), (3,), (1, 2)]).tolist() == [0, 1, 0]


def test_compile_fullgraph(device_backend):
    """torch.compile(fullgraph=True) traces through the op without graph breaks."""
    device, _ = device_backend
    torch._dynamo.reset()
    ids = _groups([6, 6, 4], seed=13).to(device)
    r = _rewards(16, 2, device=device)

    def fn(r, ids):
        return rk.group_advantages(r, ids, num_groups=3, scale="global", weights=[1.0, 2.0], restandardize=True) * 2

    try:
        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(r, ids)
    finally:
        torch._dynamo.reset()
    assert torch.equal(out, fn(r, ids))


def test_compile_checks(dynamo_reset):
    """Under torch.compile the read-back checks (negative ids with num_groups=None; validate=True) are runtime
    assertions of the one graph: they raise RuntimeError, and valid inputs pass."""
    r, ids = _rewards(8, 2), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    inferred = torch.compile(lambda r, i: rk.group_advantages(r, i) * 1, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(inferred(r, ids), rk.group_advantages(r, ids))
    with pytest.raises(RuntimeError):
        inferred(r, ids - 1)
    checked = torch.compile(lambda r, i, w: rk.group_advantages(r, i, num_groups=4, weights=w, validate=True) * 1,
                            fullgraph=True, backend="aot_eager")
    w = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(checked(r, ids, w), rk.group_advantages(r, ids, num_groups=4, weights=w))
    for bad_ids, bad_w in ((ids + 1, w), (ids, torch.tensor([1.0, float("nan")]))):
        with pytest.raises(RuntimeError):
            checked(r, bad_ids, bad_w)


# ---------------------------------------------------------------------------------------------
# 3. hostile inputs: ids out of range, non-finite rewards and weights, rewards near float32's range


def _bad_ids(ids, G, seed):
    """``ids`` with a few rows moved out of [0, G) (negative, G, far above); returns (ids, bad mask)."""
    g = torch.Generator().manual_seed(seed)
    bad = torch.zeros(ids.numel(), dtype=torch.bool)
    bad[torch.randperm(ids.numel(), generator=g)[:5]] = True
    out = ids.clone()
    out[bad] = torch.tensor([-1, G, G + 7, -(2**40), 2**40])
    return out, bad


@pytest.mark.parametrize("scale", ["group", "global", "none"])
@pytest.mark.parametrize("R", [None, 3])
def test_ids_out_of_range(device_backend, scale, R):
    """num_groups given, no validate: a row whose id is outside [0, G) is in no statistic (its group's, the
    column's, the restandardisation) and gets NaN; every other row gets what it gets without the bad rows."""
    device, _ = device_backend
    r, ids, G = _edge_case(R, device)  # NaN rewards and an empty group too
    bad_ids, bad = _bad_ids(ids, G, seed=20)
    r[bad] = 1e6  # large: they would move any statistic they took part in
    w = None if R is None else [0.5, -1.0, 2.0]
    for restd, clip in ((False, None), (True, 1.5)):
        kw = {"scale": scale, "weights": w, "restandardize": restd, "clip": clip}
        out = rk.group_advantages(r, bad_ids.to(device), num_groups=G, **kw)
        assert bool(out.cpu()[bad].isnan().all()) and not bool(out.cpu()[~bad].isnan().any())
        _close(out, _oracle(_f64(r), bad_ids.numpy(), G, **kw), rtol=F32_RTOL)
        clean = rk.group_advantages(r[~bad.to(device)], ids[~bad].to(device), num_groups=G, **kw)
        torch.testing.assert_close(out[~bad.to(device)], clean, rtol=1e-6, atol=1e-6)


def test_ids_out_of_range_backends_agree():
    """The documented result for ids outside [0, G) is the same on both backends (NaN rows, the rest equal)."""
    ids = _groups([9, 4, 11, 6], seed=21)
    bad_ids, bad = _bad_ids(ids, 4, seed=22)
    r = _rewards(ids.numel(), 2)
    try:
        with rk.use_backend("triton"):
            rk.backend_for(r)
    except RuntimeError:
        pytest.skip("no Triton backend on this machine")
    r[3, 1] = float("inf")
    for scale in ("group", "global", "none"):
        kw = {"num_groups": 4, "scale": scale, "weights": [1.0, -2.0], "restandardize": True, "clip": 2.0}
        with rk.use_backend("torch"):
            a = rk.group_advantages(r, bad_ids, **kw)
        with rk.use_backend("triton"):
            b = rk.group_advantages(r, bad_ids, **kw)
        assert torch.equal(a.isnan(), bad) and torch.equal(b.isnan(), bad)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, equal_nan=True)


def test_negative_ids_inferred_num_groups(device_backend):
    """num_groups=None reads the ids' min and max back (one sync): a negative id is a ValueError."""
    device, _ = device_backend
    ids = torch.tensor([0, 0, 1, 1, -3, 2], device=device)
    with pytest.raises(ValueError, match=r"group_ids must be >= 0.*got -3"):
        rk.group_advantages(_rewards(6, device=device), ids)
    with pytest.raises(ValueError, match=r"group_ids must be >= 0.*got -1"):
        rk.group_advantages(_rewards(6, 2, device=device), ids.clamp_min(-1).to(torch.int32))


def test_validate(device_backend):
    """validate=True: an id outside [0, num_groups) or a non-finite tensor weight is a ValueError naming it;
    without validate a tensor weight is not read back (no sync), and non-finite weights propagate."""
    device, _ = device_backend
    r = _rewards(6, 2, device=device)
    ids = torch.tensor([0, 0, 1, 1, 2, 2], device=device)
    for bad, got in ((5, 5), (3, 3), (-1, -1), (-(2**40), -(2**40))):
        with pytest.raises(ValueError, match=rf"group_ids must lie in \[0, num_groups=3\), got {got}$"):
            rk.group_advantages(r, torch.cat([ids[:5], ids.new_tensor([bad])]), num_groups=3, validate=True)
    w = torch.tensor([1.0, float("nan")], device=device)
    with pytest.raises(ValueError, match="weights must be finite"):
        rk.group_advantages(r, ids, num_groups=3, weights=w, validate=True)
    with pytest.raises(ValueError, match="weights must be finite"):
        rk.group_advantages(r, ids, weights=w.flip(0) * float("inf"), validate=True)
    assert bool(rk.group_advantages(r, ids, num_groups=3, weights=w).isnan().any())  # not checked: propagates
    ok = rk.group_advantages(r, ids, num_groups=3, weights=torch.tensor([1.0, 2.0], device=device), validate=True)
    _close(ok, _oracle(_f64(r), ids.cpu().numpy(), 3, weights=[1.0, 2.0]), rtol=F32_RTOL)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_weight_list(device_backend, bad):
    device, _ = device_backend
    r = _rewards(6, 2, device=device)
    ids = torch.tensor([0, 0, 1, 1, 2, 2], device=device)
    for w in ([1.0, bad], (bad, 2.0)):
        with pytest.raises(ValueError, match="weights must be finite"):
            rk.group_advantages(r, ids, num_groups=3, weights=w)


@pytest.mark.parametrize("scale", ["group", "global", "none"])
@pytest.mark.parametrize("R", [None, 3])
def test_infinite_rewards(device_backend, scale, R):
    """±inf rewards are left out of every statistic of their column, as NaN ones, and get A_j = 0."""
    device, _ = device_backend
    ids = _groups([7, 5, 9, 6], seed=23)
    r = _rewards(ids.numel(), R)
    r[[2, 11]] = float("inf")
    r[[5, 20]] = float("-inf")
    if R is not None:
        r[8, 1] = float("inf")
        r[13, 0] = float("nan")
    w = None if R is None else [1.0, 0.5, -2.0]
    for restd, clip in ((False, None), (True, 2.0)):
        kw = {"scale": scale, "weights": w, "restandardize": restd, "clip": clip}
        out = rk.group_advantages(r.to(device), ids.to(device), num_groups=4, **kw)
        _close(out, _oracle(_f64(r), ids.numpy(), 4, **kw), rtol=F32_RTOL)
        assert torch.equal(out.cpu()[[2, 5, 11, 20]], torch.zeros(4))  # rows whose every reward is ±inf


@pytest.mark.parametrize("scale,factor", [(s, f) for s in ("group", "global", "none") for f in (1e19, 1e30)]
                         + [("group", 1e-30), ("global", 1e-30)])  # "none" has no variance to underflow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_and_tiny_rewards(device_backend, scale, factor, dtype):
    """Rewards with |r| around 1e19 (their squares pass float32's range), scaled by 1e30, or by 1e-30 (their
    squares underflow float32): the advantages still match the float64 oracle to float32 rounding. eps is
    absolute, so eps=0 is tried too (tiny rewards: A is (r - mean)/std, of order 1)."""
    device, _ = device_backend
    ids = _groups([12, 7, 16, 9], seed=24)
    r = (_rewards(ids.numel(), 2) * factor).to(dtype)
    assert bool(torch.isfinite(r).all())
    for eps, restd in ((1e-4, False), (1e-4, True), (0.0, False)):
        kw = {"scale": scale, "eps": eps, "weights": [1.0, 3.0], "restandardize": restd}
        out = rk.group_advantages(r.to(device), ids.to(device), num_groups=4, **kw)
        expected = _oracle(_f64(r), ids.numpy(), 4, **kw)
        _close(out, expected, rtol=F32_RTOL)
        if scale != "none" and (factor > 1 or eps == 0):
            assert float(np.abs(expected).max()) > 0.5  # O(1): not the all-zero answer of a float32 variance


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the interpreter's float64 -> float32 of inf
@pytest.mark.parametrize("scale", ["group", "global", "none"])
def test_rewards_near_float32_max(device_backend, scale):
    """Rewards up to float32's largest value (3.4e38): group/global against the oracle; "none" gives
    A = r - mean, which is finite when the rewards share a sign and may pass float32's range otherwise
    (then ±inf, float32's rounding of the true value), yet restandardised it is an O(1) number again."""
    device, _ = device_backend
    fmax = torch.finfo(torch.float32).max
    ids = _groups([10, 6, 13, 8], seed=25)
    u = torch.rand(ids.numel(), 2, generator=torch.Generator().manual_seed(26))
    r = (u * 2 - 1) * 3e38
    r[[0, 1], [0, 1]] = torch.tensor([fmax, -fmax])
    positive = 1e38 + u * 2.4e38
    positive[2, 0] = fmax
    for rr, restd in ((r, False), (r, True), (positive, False)):
        kw = {"scale": scale, "weights": [1.0, -0.5], "restandardize": restd}
        out = rk.group_advantages(rr.to(device), ids.to(device), num_groups=4, **kw)
        expected = _oracle(_f64(rr), ids.numpy(), 4, **kw)
        if scale == "none" and not restd and rr is r:  # |A| past float32's range: ±inf, as float32 rounds it
            big = np.abs(expected) > fmax
            assert big.any() and np.array_equal(np.isinf(out.cpu().numpy()), big)
            assert np.array_equal(np.sign(out.cpu().numpy()[big]), np.sign(expected[big]))
            out, expected = out[torch.from_numpy(~big).to(device)], expected[~big]
        assert bool(torch.isfinite(out).all())
        _close(out, expected, rtol=F32_RTOL)


# ---------------------------------------------------------------------------------------------
# 4. errors


def test_errors():
    r = torch.randn(6, 2)
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    cases = [
        (TypeError, "rewards", lambda: rk.group_advantages(r.numpy(), ids)),
        (TypeError, "rewards", lambda: rk.group_advantages(r.long(), ids)),
        (ValueError, "rewards", lambda: rk.group_advantages(torch.randn(6, 2, 1), ids)),
        (ValueError, "rewards", lambda: rk.group_advantages(torch.randn(6, 0), ids)),
        (TypeError, "group_ids", lambda: rk.group_advantages(r, ids.float())),
        (TypeError, "group_ids", lambda: rk.group_advantages(r, ids.bool())),
        (TypeError, "group_ids", lambda: rk.group_advantages(r, [0, 0, 1, 1, 2, 2])),
        (ValueError, "group_ids", lambda: rk.group_advantages(r, ids[:5])),
        (ValueError, "group_ids", lambda: rk.group_advantages(r, ids.reshape(3, 2))),
        (ValueError, "scale", lambda: rk.group_advantages(r, ids, scale="batch")),
        (ValueError, "ddof", lambda: rk.group_advantages(r, ids, ddof=2)),
        (ValueError, "ddof", lambda: rk.group_advantages(r, ids, ddof=True)),
        (ValueError, "eps", lambda: rk.group_advantages(r, ids, eps=-1e-4)),
        (ValueError, "eps", lambda: rk.group_advantages(r, ids, eps=float("nan"))),
        (ValueError, "weights", lambda: rk.group_advantages(r, ids, weights=[1.0])),
        (ValueError, "weights", lambda: rk.group_advantages(r, ids, weights=torch.ones(3))),
        (ValueError, "weights", lambda: rk.group_advantages(r, ids, weights=torch.ones(2, 1))),
        (TypeError, "weights", lambda: rk.group_advantages(r, ids, weights="12")),
        (TypeError, "weights", lambda: rk.group_advantages(r, ids, weights=[1.0, "a"])),
        (ValueError, "clip", lambda: rk.group_advantages(r, ids, clip=-1.0)),
        (ValueError, "num_groups", lambda: rk.group_advantages(r, ids, num_groups=-1)),
        (ValueError, "num_groups", lambda: rk.group_advantages(r, ids, num_groups=0)),
        (ValueError, "num_groups", lambda: rk.group_advantages(r, ids, num_groups=2.5)),
        (ValueError, "group_ids", lambda: rk.group_advantages(r, ids, num_groups=2, validate=True)),
        (ValueError, "group_ids", lambda: rk.group_advantages(r, ids - 1, num_groups=3, validate=True)),
    ]
    for exc, name, call in cases:
        with pytest.raises(exc, match=name):
            call()
