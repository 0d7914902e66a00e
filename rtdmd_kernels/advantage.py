"""Group-normalized GRPO advantages (method.md §5.3, kernels.md §4): Triton kernels, a torch path, a custom op.

What moves (N samples, R reward columns, G groups; fp32 rewards, bf16/fp16 halve the reward bytes):
  sort          torch.sort(group_ids, stable=True) + searchsorted -> perm [N], segment offsets [G+1]
  group stats   one program per group reads its segment of rewards (through perm) twice:
                count + sum, then the centred sum of squares        -> float64 mean, std [G, R]  ~8*N*R B
  column std    ("global" only) the same kernel, one program over the segment of every id in [0, G)
                                                                    -> float64 std [R]           ~8*N*R B
  combine       one program per BLOCK rows reads rewards + id, gathers mean/std, writes A   ~(4R+12)*N B
                (restandardize: writes A in float64 and a state byte instead              ~(4R+17)*N B)
  restandardize (optional) one program, three fixed-order passes over A and the states    ~31*N B
Why this way: a group's statistics need the whole group before any advantage can be formed, and groups
are arbitrary (any order, any size), so the samples are grouped by a stable sort of the ids (deterministic)
and each group is reduced by one program in a fixed order: no atomics, bitwise identical run to run and
independent of the grid. The variance is two-pass (centred), as numpy's. The real case is tiny
(N = 1152..1536, 4 columns), so launches are kept few and nothing syncs the device when ``num_groups``
is given. The torch path (CPU, fallback, float64) is a handful of vectorised ops: ``index_add_`` on CPU
(sequential, deterministic), sorted segments (``segment_reduce``) elsewhere.
Hostile input (kernels.md §4.1): every path computes in float64 from the loaded rewards to the rounding of
A, so squares of rewards up to float32's largest value neither overflow nor underflow, at no extra pass;
a reward counts only when finite and its row's id is in [0, G) (ids outside sort before off[0] or after
off[G], so the statistics never see them); such a row's A is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence

import torch

from . import _common as C
from ._backend import backend_for, triton_available

__all__ = ["group_advantages", "group_ids"]

SCALES = ("group", "global", "none")
_SCALE_CODE = {"group": 0, "global": 1, "none": 2}

COMBINE_BLOCK = 256  # rows per program of the combine kernel
REDUCE_BLOCK = 1024  # rows per iteration of the single-program reductions
MAX_TILE = 2048  # rows x columns held by one program at a time (float64 accumulators)

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _load_rows(r_ptr, rows, rmask, cols, cmask, stride_n, stride_r):
        # A [BLOCK, RB] tile of rewards in float64 and its validity (in range and finite: NaN and ±inf are out).
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(r_ptr + rows[:, None] * stride_n + cols[None, :] * stride_r, mask=mask, other=0.0)
        x = x.to(tl.float64)
        return x, mask & (tl.abs(x) < float("inf"))

    @triton.jit
    def _segment_rows(r_ptr, perm_ptr, i, end, cols, cmask, stride_n, stride_r, BLOCK: tl.constexpr):
        # Rows perm[i .. i+BLOCK] of a segment of the sorted order ending at ``end``: the tile, validity.
        idx = i + tl.arange(0, BLOCK).to(tl.int64)
        m = idx < end
        rows = tl.load(perm_ptr + idx, mask=m, other=0)
        return _load_rows(r_ptr, rows, m, cols, cmask, stride_n, stride_r)

    @triton.jit
    def _clip(a, clip):
        # clamp to ±clip keeping NaN NaN, as torch.clamp does (tl.minimum/maximum would return the bound)
        return tl.where(a != a, a, tl.minimum(tl.maximum(a, -clip), clip))

    @triton.jit
    def _std(m2, cnt, ddof):
        # sqrt(m2 / (cnt - ddof)); 0 where fewer than ddof + 1 valid values.
        return tl.where(cnt > ddof, tl.sqrt(m2 / tl.maximum(cnt - ddof, 1.0)), 0.0)

    @triton.jit
    def _segment_stats_kernel(
        r_ptr, perm_ptr, off_ptr, mean_ptr, std_ptr, G, stride_n, stride_r, R, ddof,
        GLOBAL: tl.constexpr, WITH_STD: tl.constexpr, BLOCK: tl.constexpr, RB: tl.constexpr,
    ):
        # Mean and std (float64) of every column over one segment of the sorted order (rows through perm),
        # two passes in a fixed order. Per group: program g takes [off[g], off[g+1]). GLOBAL: one program
        # takes [off[0], off[G]), every row whose id is in [0, G) (ids < 0 sort before, ids >= G after).
        # Pass 1: count and sum of the finite rewards -> mean. Pass 2: centred sum of squares -> std.
        # float64: squares of float32 values up to 3.4e38 and their sums neither overflow nor underflow.
        g = tl.program_id(0)
        if GLOBAL:
            start = tl.load(off_ptr)
            end = tl.load(off_ptr + G)
        else:
            start = tl.load(off_ptr + g)
            end = tl.load(off_ptr + g + 1)
        cols = tl.arange(0, RB)
        cmask = cols < R
        acc_s = tl.zeros([BLOCK, RB], dtype=tl.float64)
        acc_c = tl.zeros([BLOCK, RB], dtype=tl.int32)
        acc_lo = tl.full([BLOCK, RB], float("inf"), dtype=tl.float64)
        acc_hi = tl.full([BLOCK, RB], float("-inf"), dtype=tl.float64)
        for i in range(start, end, BLOCK):
            x, v = _segment_rows(r_ptr, perm_ptr, i, end, cols, cmask, stride_n, stride_r, BLOCK)
            acc_s += tl.where(v, x, 0.0)
            acc_c += v.to(tl.int32)
            acc_lo = tl.minimum(acc_lo, tl.where(v, x, float("inf")))
            acc_hi = tl.maximum(acc_hi, tl.where(v, x, float("-inf")))
        cnt = tl.sum(acc_c, axis=0).to(tl.float64)
        hi = tl.max(acc_hi, axis=0)
        # equal values: their mean is that value exactly (a rounded sum / n may miss it by an ulp), so every
        # residual of an all-equal group is exactly 0 and so is its advantage
        mean = tl.where(tl.min(acc_lo, axis=0) == hi, hi, tl.sum(acc_s, axis=0) / tl.maximum(cnt, 1.0))
        out = g.to(tl.int64) * R + cols
        tl.store(mean_ptr + out, mean, mask=cmask)
        if WITH_STD:
            acc_q = tl.zeros([BLOCK, RB], dtype=tl.float64)
            for i in range(start, end, BLOCK):
                x, v = _segment_rows(r_ptr, perm_ptr, i, end, cols, cmask, stride_n, stride_r, BLOCK)
                d = tl.where(v, x - mean[None, :], 0.0)
                acc_q += d * d
            tl.store(std_ptr + out, _std(tl.sum(acc_q, axis=0), cnt, ddof), mask=cmask)

    @triton.jit
    def _combine_kernel(
        r_ptr, ids_ptr, mean_ptr, std_ptr, w_ptr, out_ptr, a_ptr, state_ptr,
        N, G, stride_n, stride_r, stride_id, R, eps, clip,
        SCALE: tl.constexpr, HAS_W: tl.constexpr, CLIP: tl.constexpr, RESTD: tl.constexpr,
        BLOCK: tl.constexpr, RB: tl.constexpr,
    ):
        # A[i] = sum_j w_j * (r[i, j] - mean[g, j]) / (std + eps) in float64, 0 for non-finite rewards; then
        # clip and store float32, NaN for a row whose id is outside [0, G). RESTD: store A in float64 and the
        # row's state for the restandardize kernel instead (1 counted, 0 no finite reward, 2 id out of range).
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        rmask = rows < N
        cols = tl.arange(0, RB)
        cmask = cols < R
        g = tl.load(ids_ptr + rows * stride_id, mask=rmask, other=0).to(tl.int64)
        gok = (g >= 0) & (g < G)
        x, v = _load_rows(r_ptr, rows, rmask & gok, cols, cmask, stride_n, stride_r)
        stat = tl.where(gok, g, 0)[:, None] * R + cols[None, :]
        d = x - tl.load(mean_ptr + stat, mask=v, other=0.0)
        if SCALE == 0:
            d = d / tl.where(v, tl.load(std_ptr + stat, mask=v, other=0.0) + eps, 1.0)
        elif SCALE == 1:
            d = d / tl.where(v, tl.load(std_ptr + cols, mask=cmask, other=0.0)[None, :] + eps, 1.0)
        a = tl.where(v, d, 0.0)  # left-out rewards: A_j = 0
        if HAS_W:
            a = a * tl.load(w_ptr + cols, mask=cmask, other=0.0)[None, :]
        adv = tl.sum(a, axis=1)
        if RESTD:
            state = tl.where(gok, (tl.sum(v.to(tl.int32), axis=1) > 0).to(tl.int32), 2)
            tl.store(a_ptr + rows, adv, mask=rmask)
            tl.store(state_ptr + rows, state.to(tl.int8), mask=rmask)
        else:
            if CLIP:
                adv = _clip(adv, clip)
            tl.store(out_ptr + rows, tl.where(gok, adv, float("nan")).to(tl.float32), mask=rmask)

    @triton.jit
    def _restandardize_kernel(a_ptr, state_ptr, out_ptr, N, ddof, eps, clip, CLIP: tl.constexpr,
                              BLOCK: tl.constexpr):
        # out <- A / (std A + eps) over the rows in state 1 (float64, two fixed-order passes); rows in state 0 (no
        # finite reward) get 0, rows in state 2 (id out of range) NaN. mean A is 0 by construction (each group's
        # residuals sum to 0), so it is not subtracted: rounding cannot move a 0 advantage off 0.
        acc_q = tl.zeros([BLOCK], dtype=tl.float64)
        acc_c = tl.zeros([BLOCK], dtype=tl.int32)
        for i in range(0, N, BLOCK):
            rows = i + tl.arange(0, BLOCK).to(tl.int64)
            m = rows < N
            ok = tl.load(state_ptr + rows, mask=m, other=0) == 1
            d = tl.where(ok, tl.load(a_ptr + rows, mask=m, other=0.0), 0.0)
            acc_q += d * d
            acc_c += ok.to(tl.int32)
        cnt = tl.sum(acc_c, axis=0).to(tl.float64)
        den = _std(tl.sum(acc_q, axis=0), cnt, ddof) + eps
        for i in range(0, N, BLOCK):
            rows = i + tl.arange(0, BLOCK).to(tl.int64)
            m = rows < N
            s = tl.load(state_ptr + rows, mask=m, other=0)
            adv = tl.where(s == 1, tl.load(a_ptr + rows, mask=m, other=0.0) / den, 0.0)
            if CLIP:
                adv = _clip(adv, clip)
            tl.store(out_ptr + rows, tl.where(s == 2, float("nan"), adv).to(tl.float32), mask=m)


def _triton_impl(x, ids, weights, G, scale, ddof, eps, restandardize, clip):
    """x: [N, R] rewards (any strides, fp32/bf16/fp16); ids: [N] integers; weights: float64 [R] or None.
    Returns float32 [N]."""
    N, R = x.shape
    dev = x.device
    RB = triton.next_power_of_2(R)
    sorted_ids, perm = torch.sort(ids, stable=True)
    offsets = torch.searchsorted(sorted_ids, torch.arange(G + 1, device=dev, dtype=sorted_ids.dtype))
    mean = torch.empty((G, R), device=dev, dtype=torch.float64)
    std = torch.empty((G, R) if scale == "group" else (R,), device=dev, dtype=torch.float64)
    seg_block = max(16, min(triton.next_power_of_2(triton.cdiv(N, max(G, 1))), MAX_TILE // RB))
    sn, sr = x.stride()
    if G > 0:
        _segment_stats_kernel[(G,)](
            x, perm, offsets, mean, std, G, sn, sr, R, float(ddof),
            GLOBAL=False, WITH_STD=scale == "group", BLOCK=seg_block, RB=RB,
            num_warps=1 if seg_block * RB <= 256 else 4,
        )
    if scale == "global":
        col_mean = torch.empty(R, device=dev, dtype=torch.float64)  # not needed: the means are per group
        _segment_stats_kernel[(1,)](
            x, perm, offsets, col_mean, std, G, sn, sr, R, float(ddof),
            GLOBAL=True, WITH_STD=True, BLOCK=max(16, MAX_TILE // RB), RB=RB, num_warps=8,
        )
    out = torch.empty(N, device=dev, dtype=torch.float32)
    a64 = torch.empty(N, device=dev, dtype=torch.float64) if restandardize else mean
    state = torch.empty(N, device=dev, dtype=torch.int8) if restandardize else out
    clip_v = float(clip) if clip is not None else 0.0
    block = max(16, min(COMBINE_BLOCK, MAX_TILE // RB))
    _combine_kernel[(triton.cdiv(N, block),)](
        x, ids, mean, std, weights if weights is not None else mean, out, a64, state,
        N, G, sn, sr, ids.stride(0), R, eps, clip_v,
        SCALE=_SCALE_CODE[scale], HAS_W=weights is not None, CLIP=clip is not None and not restandardize,
        RESTD=restandardize, BLOCK=block, RB=RB, num_warps=4,
    )
    if restandardize:
        _restandardize_kernel[(1,)](
            a64, state, out, N, float(ddof), eps, clip_v, CLIP=clip is not None, BLOCK=REDUCE_BLOCK, num_warps=8,
        )
    return out


# ---------------------------------------------------------------------------------------------
# torch path


def _std_from(m2: torch.Tensor, cnt: torch.Tensor, ddof: int) -> torch.Tensor:
    """sqrt(m2 / (cnt - ddof)), 0 where fewer than ddof + 1 valid values."""
    return (m2 / (cnt - ddof).clamp_min(1)).sqrt_().mul_(cnt > ddof)


class _Segments:
    """Per-group sums over rows: ``index_add_`` on CPU (sequential: deterministic); elsewhere a stable
    sort once, then ``segment_reduce`` over the contiguous segments (no atomics, no host sync)."""

    def __init__(self, ids: torch.Tensor, G: int, use_index_add: bool):
        self.ids, self.G = ids, G
        self.index_add = use_index_add
        if not use_index_add:
            sorted_ids, self.perm = torch.sort(ids, stable=True)
            bounds = torch.searchsorted(sorted_ids, torch.arange(G + 1, device=ids.device, dtype=ids.dtype))
            n = torch.full((1,), ids.shape[0], device=ids.device, dtype=bounds.dtype)
            # ids < 0 sort first and ids >= G last: they fall in a leading and a trailing segment, dropped
            self.lengths = torch.cat([bounds[:1], bounds.diff(), n - bounds[-1:]])

    def sum(self, v: torch.Tensor) -> torch.Tensor:
        """[N, k] -> [G, k]; rows whose id is outside [0, G) are left out (sorted path) or raise (CPU)."""
        if self.index_add:
            # along dim 1 of the transposed view: faster than adding rows of R values at large N
            return v.new_zeros((v.shape[1], self.G)).index_add_(1, self.ids, v.t()).t().contiguous()
        out = torch.segment_reduce(v[self.perm], "sum", lengths=self.lengths, axis=0, unsafe=True, initial=0)
        return out[1:-1]


def _torch_impl(x, ids, weights, G, scale, ddof, eps, restandardize, clip, use_index_add=None):
    """x: [N, R] rewards; ids: [N] int64; weights: float64 [R] or None. Computes in float64, as the
    kernels do; returns [N] in float32 (float64 for float64 rewards)."""
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(torch.float64)
    if use_index_add is None:
        use_index_add = x.device.type == "cpu"
    # On CPU, reading back whether every id is in range and every reward finite costs nothing (no device
    # to wait for); then every mask is all-true and the unmasked ops give the same numbers, with fewer ops.
    plain = False
    if use_index_add and x.device.type == "cpu":
        lo, hi = torch.aminmax(ids)
        plain = 0 <= int(lo) and int(hi) < G and math.isfinite(float(x.sum()))  # float64: the sum cannot overflow
    if not plain:
        return _torch_masked(x, ids, G, use_index_add, weights, scale, ddof, eps, restandardize, clip).to(out_dtype)
    N, R = x.shape
    seg = _Segments(ids, G, use_index_add)
    cnt = torch.bincount(ids, minlength=G).to(x.dtype).unsqueeze(1)
    d = x - _exact_mean(seg.sum(x) / cnt.clamp_min(1), x, ids, G).index_select(0, ids)
    if scale == "group":
        d = d / _std_from(seg.sum(d * d), cnt, ddof).add_(eps).index_select(0, ids)
    elif scale == "global":
        d = d / _norm_std(x - x.mean(0), N, ddof, dim=0).add_(eps)
    adv = _combine(d, weights)
    if restandardize:  # mean A is 0 by construction (each group's residuals sum to 0): not subtracted
        adv = adv / _norm_std(adv, N, ddof, dim=0).add_(eps)
    if clip is not None:
        adv = adv.clamp_(-clip, clip)
    return adv.to(out_dtype)


def _exact_mean(mean: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, G: int,
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """The group means ``[G, R]`` with each all-equal group's replaced by that value exactly (a rounded
    sum / n can miss it by an ulp): every residual of such a group is then exactly 0, and so is its advantage."""
    idx = ids.unsqueeze(1).expand_as(x)
    lo_in, hi_in = (x, x) if valid is None else (torch.where(valid, x, math.inf), torch.where(valid, x, -math.inf))
    lo = torch.full_like(mean, math.inf).scatter_reduce_(0, idx, lo_in, "amin")
    hi = torch.full_like(mean, -math.inf).scatter_reduce_(0, idx, hi_in, "amax")
    return torch.where(lo == hi, hi, mean)


def _norm_std(d: torch.Tensor, n: int, ddof: int, dim: int) -> torch.Tensor:
    """The std from centred values ``d`` with no NaN (``n`` values along ``dim``)."""
    return torch.linalg.vector_norm(d, dim=dim).mul_(1.0 / math.sqrt(n - ddof) if n > ddof else 0.0)


def _combine(d: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """A = sum_j w_j * A_j over the columns of d [N, R]."""
    if d.shape[1] == 1:
        return d.reshape(-1) if weights is None else d.reshape(-1) * weights.to(d.dtype)
    return d.sum(1) if weights is None else d @ weights.to(d.dtype)


def _torch_masked(x, ids, G, use_index_add, weights, scale, ddof, eps, restandardize, clip):
    """The torch path with non-finite rewards or ids outside [0, G): every statistic over the finite
    rewards of rows with an id in range only; those rows' advantage NaN."""
    N, R = x.shape
    cd = x.dtype
    id_ok = (ids >= 0) & (ids < G)
    ids = torch.where(id_ok, ids, 0)  # in range for index_add_ / index_select; the row is masked out anyway
    seg = _Segments(ids, G, use_index_add)
    valid = torch.isfinite(x) & id_ok.unsqueeze(1)
    vf = valid.to(cd)
    xz = torch.where(valid, x, 0.0)
    sums = seg.sum(torch.cat([xz, vf], dim=1))  # [G, 2R]: sums, counts
    cnt = sums[:, R:]
    mean = _exact_mean(sums[:, :R] / cnt.clamp_min(1), x, ids, G, valid)
    d = torch.where(valid, x - mean.index_select(0, ids), 0.0)  # centred; left-out rewards -> 0
    if scale == "group":
        d = torch.where(valid, d / _std_from(seg.sum(d * d), cnt, ddof).add_(eps).index_select(0, ids), 0.0)
    elif scale == "global":
        ccnt = vf.sum(0)
        dc = torch.where(valid, x - xz.sum(0) / ccnt.clamp_min(1), 0.0)
        d = torch.where(valid, d / _std_from((dc * dc).sum(0), ccnt, ddof).add_(eps), 0.0)
    adv = _combine(d, weights)
    if restandardize:
        rv = valid.any(1) if R > 1 else valid.reshape(N)
        n = rv.sum().to(cd)
        da = torch.where(rv, adv, 0.0)  # mean A is 0 by construction: not subtracted
        adv = torch.where(rv, da / (_std_from((da * da).sum(), n, ddof) + eps), 0.0)
    if clip is not None:
        adv = adv.clamp_(-clip, clip)
    return torch.where(id_ok, adv, float("nan"))


def _group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, weights: torch.Tensor | None, num_groups: int,
    scale: str, ddof: int, eps: float, restandardize: bool, clip: float | None,
) -> torch.Tensor:
    """The launcher (the torch path inside): ``[N]`` advantages, float32 (float64 for float64 rewards)."""
    x = rewards if rewards.dim() == 2 else rewards.unsqueeze(1)
    if x.shape[0] == 0:
        return x.new_empty(0, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    ids = group_ids if group_ids.dtype in (torch.int64, torch.int32) else group_ids.long()
    if backend_for(x) == "torch":
        return _torch_impl(x, ids.long(), weights, num_groups, scale, ddof, eps, restandardize, clip)
    return _triton_impl(x, ids, weights, num_groups, scale, ddof, eps, restandardize, clip)


def _group_advantages_fake(rewards, group_ids, weights, num_groups, scale, ddof, eps, restandardize, clip):
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    return rewards.new_empty((rewards.shape[0],), dtype=dtype)


_group_advantages_op = C.KernelOp("group_advantages", _group_advantages, _group_advantages_fake)


# ---------------------------------------------------------------------------------------------
# public API

_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
_WEIGHTS_CACHE: dict[tuple, torch.Tensor] = {}  # (weights tuple, device) -> float64 tensor on the device


def _check_weights(weights, R: int, device: torch.device) -> torch.Tensor | None:
    """The weights as a float64 ``[R]`` tensor on ``device`` (both paths weight in float64), or None."""
    if weights is None:
        return None
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1 or weights.shape[0] != R:
            raise ValueError(f"weights must have length R={R} (one per reward column), got {tuple(weights.shape)}")
        if not (weights.is_floating_point() or weights.dtype in _INT_DTYPES):
            raise TypeError(f"weights must be a real tensor, got dtype {weights.dtype}")
        # values are not checked here (a read-back); validate=True checks them
        return C.to_device(weights.detach().to(torch.float64), device)
    if isinstance(weights, (list, tuple)):
        if len(weights) != R:
            raise ValueError(f"weights must have length R={R} (one per reward column), got {len(weights)}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in weights):
            raise TypeError(f"weights must be numbers, got {weights!r}")
        if not all(math.isfinite(v) for v in weights):
            raise ValueError(f"weights must be finite, got {weights!r}")
        if torch.compiler.is_compiling():
            return torch.tensor([float(v) for v in weights], dtype=torch.float64, device=device)
        key = (tuple(float(v) for v in weights), device)
        cached = _WEIGHTS_CACHE.get(key)
        if cached is not None:
            return cached
        w = C.to_device(torch.tensor(key[0], dtype=torch.float64), device)
        if len(_WEIGHTS_CACHE) >= 64:
            _WEIGHTS_CACHE.clear()
        _WEIGHTS_CACHE[key] = w  # the same list every step: no host -> device copy after the first
        return w
    raise TypeError(f"weights must be None, a list/tuple or a 1-D tensor, got {type(weights).__name__}")


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    num_groups: int | None = None,
    scale: str = "group",
    ddof: int = 0,
    eps: float = 1e-4,
    weights: Sequence[float] | torch.Tensor | None = None,
    restandardize: bool = False,
    clip: float | None = None,
    validate: bool = False,
) -> torch.Tensor:
    """Group-normalized GRPO advantages (docs/method.md §5.3, docs/kernels.md §4). Returns ``[N]`` float32.

    ``rewards``: ``[N]`` or ``[N, R]`` (R reward models; float32/bf16/fp16, float64 runs in float64 on
    the torch path and returns float64); ``group_ids``: ``[N]`` integers in ``[0, num_groups)`` (e.g.
    prompt ids from :func:`group_ids`), in any order, groups of any size. Per reward column j:
    ``A_j = (r - mean_group(r)) / (std + eps)`` with ``std`` the group's std (``scale="group"``), the
    column's std over all valid rows (``"global"``) or no division at all (``"none"``); ``ddof`` 0
    (numpy) or 1 (Bessel, torch.std). Non-finite rewards (NaN, ±inf) are left out of every statistic of
    their column and get ``A_j = 0``; a group (the whole column under ``"global"``) with fewer than
    ``ddof + 1`` valid rewards has std 0. Then ``A = Σ_j weights[j] * A_j`` (weights default 1), then if
    ``restandardize`` ``A = (A - mean A) / (std A + eps)`` over the rows with at least one valid reward
    (others 0, same ``ddof``/``eps``; also for R = 1), then ``clip`` clamps to ±clip. Computed in float64
    on both paths and rounded once: rewards anywhere in float32's range give the float64 answer.

    ``num_groups=None`` infers ``max(group_ids) + 1`` and checks ``min(group_ids) >= 0`` (``ValueError``):
    one device sync. With ``num_groups`` given no call waits for the device and the ids are not checked:
    a row whose id is outside ``[0, num_groups)`` takes part in no statistic and gets NaN, on every
    backend. ``validate=True`` checks the ids and the values of a tensor ``weights`` (one sync) and raises
    ``ValueError``; a list of weights is always checked (finite). Deterministic: bitwise identical run to
    run (no atomics; independent of the launch grid), and invariant to a permutation of the samples up to
    float32 rounding.

    Presets (the reference each one matches):
      * flow_grpo / RTDMD, one reward: ``scale="global", ddof=0, eps=1e-4``
        (per-prompt mean, std over all samples: ``PerPromptStatTracker(global_std=True)``).
      * RTDMD multi-reward ``weight_advantages``: ``scale="global", ddof=0, eps=1e-4, weights=w,
        restandardize=True`` on ``[N, R]`` rewards.
      * TRL GRPOTrainer ``scale_rewards="group"``: ``scale="group", ddof=1, eps=1e-4``
        (``"batch"``: ``scale="global", ddof=1``).
      * DanceGRPO (contiguous groups of ``num_generations``): ``scale="group", ddof=1, eps=1e-8``.
      * Dr. GRPO / TRL ``scale_rewards="none"``: ``scale="none"``.
    Usually followed by ``clip=5.0`` (``adv_clip_max``).
    """
    C.check_tensor("rewards", rewards)
    if rewards.dim() not in (1, 2) or (rewards.dim() == 2 and rewards.shape[1] == 0):
        raise ValueError(f"rewards must have shape [N] or [N, R] with R >= 1, got {tuple(rewards.shape)}")
    if not isinstance(group_ids, torch.Tensor):
        raise TypeError(f"group_ids must be a torch.Tensor of integers, got {type(group_ids).__name__}")
    if group_ids.dtype not in _INT_DTYPES:
        raise TypeError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    N = rewards.shape[0]
    if group_ids.dim() != 1 or group_ids.shape[0] != N:
        raise ValueError(f"group_ids must have shape [N]={[N]} (N from rewards), got {tuple(group_ids.shape)}")
    if group_ids.device != rewards.device:
        raise ValueError(f"group_ids is on {group_ids.device} but rewards is on {rewards.device}")
    C.check_choice("scale", scale, SCALES)
    if isinstance(ddof, bool) or ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
    eps = C.check_eps(eps)
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip >= 0):
        raise ValueError(f"clip must be None or a float >= 0, got {clip!r}")
    R = rewards.shape[1] if rewards.dim() == 2 else 1
    w = _check_weights(weights, R, rewards.device)
    if num_groups is not None and (isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0):
        raise ValueError(f"num_groups must be None or an int >= 0, got {num_groups!r}")
    check_w = validate and isinstance(weights, torch.Tensor)
    if torch.compiler.is_compiling():
        # traced: the read-backs are data-dependent ints, the checks runtime asserts (RuntimeError)
        if N and (num_groups is None or validate):
            lo, hi = int(group_ids.min()), int(group_ids.max())
            torch._check(lo >= 0, lambda: "group_ids must be >= 0")
            if num_groups is None:
                num_groups = hi + 1
                torch._check(num_groups >= 1, lambda: "group_ids must be >= 0")  # tell the tracer
            else:
                torch._check(hi < num_groups, lambda: "group_ids must be < num_groups")
        if check_w:
            torch._check(int((~torch.isfinite(w)).sum()) == 0, lambda: "weights must be finite")
    elif (N and num_groups is None) or (validate and (N or check_w)):
        # the documented read-back, one for everything: the ids' range, and under validate the count of
        # non-finite tensor weights
        checks = [group_ids.min(), group_ids.max()] if N else []
        if check_w:
            checks.append((~torch.isfinite(w)).sum())
        got = torch.stack([c.to(torch.int64) for c in checks]).tolist()
        if N:
            lo, hi = got[0], got[1]
            if num_groups is None:
                if lo < 0:
                    raise ValueError(f"group_ids must be >= 0 (num_groups inferred as max + 1), got {lo}")
                num_groups = hi + 1
            elif lo < 0 or hi >= num_groups:
                raise ValueError(f"group_ids must lie in [0, num_groups={num_groups}), got {lo if lo < 0 else hi}")
        if check_w and got[-1]:
            raise ValueError(f"weights must be finite, got {weights.tolist()}")
    if num_groups is None:
        num_groups = 0  # N == 0 under torch.compile
    if N and num_groups == 0:
        raise ValueError(f"num_groups must be >= 1 for N={N} samples, got 0")
    args = (rewards.detach(), group_ids, w, num_groups, scale, int(ddof), float(eps), bool(restandardize),
            None if clip is None else float(clip))
    return _group_advantages_op(*args)


def group_ids(keys: Iterable[Hashable]) -> torch.Tensor:
    """Dense ids for hashable keys (e.g. prompt strings), in first-seen order: ``["b", "a", "b"] -> [0, 1, 0]``.

    A host helper (a dict lookup per key); the result is a CPU int64 tensor: move it with the rewards.
    """
    table: dict[Hashable, int] = {}
    return torch.tensor([table.setdefault(k, len(table)) for k in keys], dtype=torch.int64)
