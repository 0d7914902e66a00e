"""Tests of the checkpointed sampler rollout and the chunked checkpointed decode (kernels.md §6, method.md §2.2,
§2.3, §7).

The oracle is the plain unrolled loop written here with ``rk.cps_step`` and explicit ``torch.no_grad``
at the non-grad steps. Models are tiny random-initialised diffusers transformers (SD3, FLUX.2) and a
small custom module, in float32; gradients wrt ``x_T`` and every parameter must match to 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rtdmd_kernels as rk

diffusers = pytest.importorskip("diffusers")

K = 3
B = 3
SIGMAS = [1.0, 0.75, 0.5, 0.0]
RTOL = 1e-5


# ---------------------------------------------------------------------------------------------
# tiny models, wrapped as velocity_fn(x, sigma[B]) -> v


class TinyMixer(nn.Module):
    """conv -> softmax attention over pixels -> conv, with a sigma embedding; optional inner checkpoint."""

    def __init__(self, c: int = 4, h: int = 8):
        super().__init__()
        self.inp = nn.Conv2d(c, h, 3, padding=1)
        self.t = nn.Linear(1, h)
        self.qkv = nn.Linear(h, 3 * h)
        self.out = nn.Conv2d(h, c, 3, padding=1)
        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self):
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self):
        self.gradient_checkpointing = False

    def _mix(self, h):
        b, c, hh, ww = h.shape
        tok = h.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tok).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / c ** 0.5, dim=-1)
        return h + (att @ v).transpose(1, 2).reshape(b, c, hh, ww)

    def forward(self, x, sigma):
        h = torch.nn.functional.silu(self.inp(x) + self.t(sigma[:, None])[:, :, None, None])
        if self.gradient_checkpointing and torch.is_grad_enabled():
            h = torch.utils.checkpoint.checkpoint(self._mix, h, use_reentrant=False)
        else:
            h = self._mix(h)
        return self.out(h)


def _make(kind: str):
    """(model, velocity_fn, x shape) with fixed random conditioning."""
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    if kind == "sd3":
        model = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4)
        enc, pooled = torch.randn(B, 5, 16, generator=g), torch.randn(B, 8, generator=g)

        def vf(x, sigma):
            return model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                         timestep=1000 * sigma, return_dict=False)[0]
        return model, vf, (B, 4, 8, 8)
    if kind == "flux2":
        model = diffusers.Flux2Transformer2DModel(
            patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=16, mlp_ratio=2.0,
            axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False)
        enc = torch.randn(B, 5, 16, generator=g)
        img_ids = torch.zeros(16, 4)
        img_ids[:, 1], img_ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
        txt_ids = torch.zeros(5, 4)
        txt_ids[:, 3] = torch.arange(5)

        def vf(x, sigma):  # latents [B, 8, 4, 4] <-> tokens [B, 16, 8]; FLUX.2 scales the timestep by 1000 itself
            b, c, h, w = x.shape
            out = model(hidden_states=x.flatten(2).transpose(1, 2), encoder_hidden_states=enc, timestep=sigma,
                        img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
            return out.transpose(1, 2).reshape(b, c, h, w)
        return model, vf, (B, 8, 4, 4)
    model = TinyMixer()
    return model, model, (B, 4, 8, 8)


MODELS = ["sd3", "flux2", "mixer"]


@pytest.fixture(autouse=True)
def _torch_backend():
    """The rollout logic is backend-agnostic (cps_step's backends are tested in test_policy.py); the
    pure-PyTorch step keeps this file fast under TRITON_INTERPRET=1. test_default_backend covers "auto"."""
    with rk.use_backend("torch"):
        yield


@pytest.fixture(scope="module", params=MODELS)
def setup(request):
    model, vf, shape = _make(request.param)
    # perturb the zero-initialised output layers so every parameter gets a non-trivial gradient
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model, vf, shape


def _table(per_sample: bool) -> torch.Tensor:
    s = torch.tensor(SIGMAS)
    if per_sample:  # a different schedule per sample, all ending at 0
        return torch.stack([s, torch.tensor([1.0, 0.8, 0.4, 0.0]), torch.tensor([0.9, 0.7, 0.3, 0.0])])
    return s


def _expanded(sigmas: torch.Tensor) -> torch.Tensor:
    return sigmas if sigmas.dim() == 2 else sigmas.unsqueeze(0).expand(B, -1)


def reference_loop(vf, x_T, sigmas, eta, noises, grad_set):
    """The plain unrolled loop: every step in autograd, no_grad network calls outside grad_set."""
    table = _expanded(sigmas)
    x = x_T
    for j in range(table.shape[1] - 1):
        s, sn = table[:, j], table[:, j + 1]
        if j in grad_set:
            v = vf(x, s)
        else:
            with torch.no_grad():
                v = vf(x, s)
        x, _ = rk.cps_step(x, v, s, sn, eta=eta, noise=noises[j])
    return x


def _inputs(shape, seed=3):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(shape, generator=g).requires_grad_()
    noises = torch.randn((K, *shape), generator=g)
    w = torch.randn(shape, generator=g)
    return x_T, noises, w


def _grads(out, w, x_T, model):
    params = list(model.parameters())
    return torch.autograd.grad((out * w).sum(), [x_T, *params], allow_unused=True)


def _assert_grads_close(got, want, rtol=RTOL):
    assert len(got) == len(want)
    n_nonzero = 0
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert (a is None) == (b is None), f"grad {i}: one is None"
        if a is None:
            continue
        err = (a - b).norm().item()
        scale = b.norm().item()
        assert err <= rtol * max(scale, 1e-30), f"grad {i}: rel err {err / max(scale, 1e-30):.3e}"
        n_nonzero += scale > 0
    return n_nonzero


def _set_block_ckpt(model, on: bool):
    (model.enable_gradient_checkpointing if on else model.disable_gradient_checkpointing)()


GRAD_STEPS = [None, 1, 2, [0, 2]]


def _grad_set(grad_steps):
    if grad_steps is None:
        return set(range(K))
    if isinstance(grad_steps, int):
        return set(range(K - grad_steps, K))
    return {j % K for j in grad_steps}


# ---------------------------------------------------------------------------------------------
# gradient equivalence with the plain unrolled loop


@pytest.mark.parametrize("grad_steps", GRAD_STEPS, ids=str)
@pytest.mark.parametrize("checkpoint", [True, False])
@pytest.mark.parametrize("block_ckpt", [False, True])
def test_matches_plain_loop(setup, grad_steps, checkpoint, block_ckpt):
    model, vf, shape = setup
    sigmas = _table(per_sample=True)
    x_T, noises, w = _inputs(shape)
    _set_block_ckpt(model, False)
    want_x = reference_loop(vf, x_T, sigmas, 0.9, noises, _grad_set(grad_steps))
    want = _grads(want_x, w, x_T, model)
    _set_block_ckpt(model, block_ckpt)
    try:
        got_x = rk.checkpointed_rollout(vf, x_T, sigmas, eta=0.9, noises=noises, grad_steps=grad_steps,
                                        checkpoint=checkpoint)
        got = _grads(got_x, w, x_T, model)
    finally:
        _set_block_ckpt(model, False)
    torch.testing.assert_close(got_x, want_x, rtol=1e-6, atol=1e-6)
    assert _assert_grads_close(got, want) > 1


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.9])
def test_schedules_and_eta(setup, per_sample, eta):
    model, vf, shape = setup
    grad_steps = 1 if per_sample == (eta == 0.0) else None
    sigmas = _table(per_sample)
    x_T, noises, w = _inputs(shape, seed=4)
    want_x = reference_loop(vf, x_T, sigmas, eta, noises, _grad_set(grad_steps))
    want = _grads(want_x, w, x_T, model)
    got_x = rk.checkpointed_rollout(vf, x_T, sigmas, eta=eta, noises=noises, grad_steps=grad_steps)
    got = _grads(got_x, w, x_T, model)
    torch.testing.assert_close(got_x, want_x, rtol=1e-6, atol=1e-6)
    _assert_grads_close(got, want)


def test_seeded_generator(setup):
    model, vf, shape = setup
    x_T, _, w = _inputs(shape, seed=5)
    runs = []
    for grad_steps in (None, None, 1):
        g = torch.Generator().manual_seed(123)
        out = rk.checkpointed_rollout(vf, x_T, SIGMAS, eta=0.9, generator=g, grad_steps=grad_steps)
        runs.append((out, _grads(out, w, x_T, model)))
    (o1, g1), (o2, g2), (o3, _) = runs
    assert torch.equal(o1, o2)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g1, g2, strict=True))
    assert torch.equal(o1, o3)  # the noise stream does not depend on grad_steps
    # the noises are drawn up front as one [K, *x_T.shape] float32 tensor
    noises = torch.randn((K, *shape), generator=torch.Generator().manual_seed(123))
    want_x = reference_loop(vf, x_T, torch.tensor(SIGMAS), 0.9, noises, set(range(K)))
    torch.testing.assert_close(o1, want_x, rtol=0, atol=0)
    _assert_grads_close(g1, _grads(want_x, w, x_T, model))


def test_truncated_last_step_gradient(setup):
    """grad_steps=1: the parameters' gradient is exactly the reference's truncated one (docs/method.md §2.2, §7)."""
    model, vf, shape = setup
    sigmas = torch.tensor(SIGMAS)
    x_T, noises, w = _inputs(shape, seed=6)
    table = _expanded(sigmas)
    with torch.no_grad():  # the reference: all but the last step fully under no_grad
        x = x_T
        for j in range(K - 1):
            x, _ = rk.cps_step(x, vf(x, table[:, j]), table[:, j], table[:, j + 1], eta=0.9, noise=noises[j])
    v = vf(x, table[:, K - 1])
    want_x, mean = rk.cps_step(x, v, table[:, K - 1], table[:, K], eta=0.9, noise=noises[K - 1])
    want = torch.autograd.grad((want_x * w).sum(), list(model.parameters()), allow_unused=True)
    got_x = rk.checkpointed_rollout(vf, x_T, sigmas, eta=0.9, noises=noises, grad_steps=1)
    got = torch.autograd.grad((got_x * w).sum(), list(model.parameters()), allow_unused=True)
    assert torch.equal(got_x, want_x)
    assert torch.equal(want_x, mean)  # last sigma 0: the x0 prediction
    _assert_grads_close(got, want)
    # negative index -1 is the last step
    got_neg = rk.checkpointed_rollout(vf, x_T, sigmas, eta=0.9, noises=noises, grad_steps=[-1])
    _assert_grads_close(torch.autograd.grad((got_neg * w).sum(), list(model.parameters()), allow_unused=True),
                        want)


def test_grad_steps_zero_keeps_latent_chain(setup):
    model, vf, shape = setup
    x_T, noises, w = _inputs(shape, seed=7)
    want_x = reference_loop(vf, x_T, torch.tensor(SIGMAS), 0.9, noises, set())
    want = _grads(want_x, w, x_T, model)
    got_x = rk.checkpointed_rollout(vf, x_T, SIGMAS, eta=0.9, noises=noises, grad_steps=0)
    got = _grads(got_x, w, x_T, model)
    assert got[0] is not None and all(g is None for g in got[1:])
    _assert_grads_close(got, want)


# ---------------------------------------------------------------------------------------------
# trajectory, x0 prediction, recomputation count, offload


def test_trajectory_and_x0():
    model, vf, shape = _make("mixer")
    x_T, noises, _ = _inputs(shape, seed=8)
    out, traj = rk.checkpointed_rollout(vf, x_T, SIGMAS, eta=0.9, noises=noises, return_trajectory=True)
    assert traj.shape == (K, *shape) and traj.dtype == x_T.dtype
    assert not traj.requires_grad and traj.grad_fn is None
    assert out.requires_grad and out.shape == shape
    assert torch.equal(traj[0], x_T.detach())
    table = _expanded(torch.tensor(SIGMAS))
    with torch.no_grad():
        x = x_T
        for j in range(K):
            assert torch.equal(traj[j], x)
            s, sn = table[:, j], table[:, j + 1]
            x, mean = rk.cps_step(x, vf(x, s), s, sn, eta=0.9, noise=noises[j])
        assert torch.equal(out, mean)  # sigmas end at 0: x_K is the last step's mean, the x0 prediction
        v = vf(traj[-1], table[:, K - 1])
        torch.testing.assert_close(out, traj[-1] - table[:, K - 1, None, None, None] * v, rtol=1e-5, atol=1e-6)


class _Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.fn(x, sigma)


@pytest.mark.parametrize("checkpoint", [True, False])
def test_recompute_count(checkpoint):
    model, vf, shape = _make("mixer")
    x_T, noises, w = _inputs(shape, seed=9)
    counter = _Counter(vf)
    out = rk.checkpointed_rollout(counter, x_T, SIGMAS, eta=0.9, noises=noises, grad_steps=[0, 2],
                                  checkpoint=checkpoint)
    assert counter.calls == K
    (out * w).sum().backward()
    assert counter.calls == K + (2 if checkpoint else 0)  # each grad step re-run once, the no-grad step never


def test_only_step_inputs_saved_and_offload():
    """With checkpoint=True nothing bigger than a latent is saved for backward outside the recompute;
    offload=True (a no-op on CPU) gives the same gradients."""
    model, vf, shape = _make("mixer")
    x_T, noises, w = _inputs(shape, seed=10)
    sizes = {True: [], False: []}
    for ckpt in (True, False):
        with torch.autograd.graph.saved_tensors_hooks(lambda t, c=ckpt: sizes[c].append(t.numel()) or t,
                                                      lambda t: t):
            out = rk.checkpointed_rollout(vf, x_T, SIGMAS, eta=0.9, noises=noises, checkpoint=ckpt)
    assert max(sizes[True]) <= x_T.numel()
    assert sum(sizes[True]) < sum(sizes[False])
    want = _grads(out, w, x_T, model)
    got_x = rk.checkpointed_rollout(vf, x_T, SIGMAS, eta=0.9, noises=noises, offload=True)
    _assert_grads_close(_grads(got_x, w, x_T, model), want)


def test_default_backend():
    """Same gradients with the auto backend (the Triton interpreter on CPU under the test config)."""
    model, vf, shape = _make("mixer")
    x_T, noises, w = _inputs(shape, seed=12)
    with rk.use_backend("auto"):
        want_x = reference_loop(vf, x_T, _table(True), 0.9, noises, {1, 2})
        want = _grads(want_x, w, x_T, model)
        got_x = rk.checkpointed_rollout(vf, x_T, _table(True), eta=0.9, noises=noises, grad_steps=2)
        got = _grads(got_x, w, x_T, model)
    torch.testing.assert_close(got_x, want_x, rtol=1e-6, atol=1e-6)
    _assert_grads_close(got, want)


def test_no_grad_mode_runs_plain():
    model, vf, shape = _make("mixer")
    x_T, noises, _ = _inputs(shape, seed=11)
    with torch.no_grad():
        out = rk.checkpointed_rollout(vf, x_T, SIGMAS, eta=0.9, noises=noises)
        want = reference_loop(vf, x_T, torch.tensor(SIGMAS), 0.9, noises, set())
    assert not out.requires_grad
    assert torch.equal(out, want)


# ---------------------------------------------------------------------------------------------
# checkpointed_decode


def test_checkpointed_decode_matches_plain():
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Upsample(scale_factor=2),
                        nn.Conv2d(8, 3, 3, padding=1))
    lat = torch.randn(5, 4, 6, 6, requires_grad=True)
    w = torch.randn(5, 3, 12, 12)
    params = [lat, *dec.parameters()]
    want_img = dec(lat)
    want = torch.autograd.grad((want_img * w).sum(), params)
    for chunk_size in (2, 5, 7):
        img = rk.checkpointed_decode(dec, lat, chunk_size)
        torch.testing.assert_close(img, want_img, rtol=1e-5, atol=1e-6)
        _assert_grads_close(torch.autograd.grad((img * w).sum(), params), want)
    with torch.no_grad():
        torch.testing.assert_close(rk.checkpointed_decode(dec, lat, 2), want_img, rtol=1e-5, atol=1e-6)


def test_checkpointed_decode_errors():
    lat = torch.randn(3, 4)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            rk.checkpointed_decode(lambda z: z, lat, bad)
    with pytest.raises(ValueError, match="decode_fn"):
        rk.checkpointed_decode(lambda z: z[:1], lat, 2)


# ---------------------------------------------------------------------------------------------
# argument errors


def _vf(x, sigma):
    return -x * sigma.view(-1, *([1] * (x.dim() - 1)))


@pytest.mark.parametrize("grad_steps,exc", [
    (K + 1, ValueError), (-1, ValueError), ([K], ValueError), ([-K - 1], ValueError),
    ([0, 0], ValueError), ([1, 1 - K], ValueError), ([0.5], TypeError), ("ab", TypeError),
    (1.0, TypeError), (True, TypeError), ([True], TypeError),
])
def test_bad_grad_steps(grad_steps, exc):
    with pytest.raises(exc, match="grad_steps"):
        rk.checkpointed_rollout(_vf, torch.randn(2, 3), SIGMAS, eta=0.5, grad_steps=grad_steps)


def test_bad_shapes():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"noises.*\[3, 2, 3\].*\(2, 2, 3\)"):
        rk.checkpointed_rollout(_vf, x, SIGMAS, eta=0.5, noises=torch.randn(2, 2, 3))
    with pytest.raises(ValueError, match="sigmas"):
        rk.checkpointed_rollout(_vf, x, torch.rand(3, 4), eta=0.5)
    with pytest.raises(ValueError, match="sigmas"):
        rk.checkpointed_rollout(_vf, x, torch.rand(2, 4, 1), eta=0.5)
    with pytest.raises(ValueError, match="sigmas"):
        rk.checkpointed_rollout(_vf, x, [1.0], eta=0.5)
    with pytest.raises(ValueError, match="velocity_fn"):
        rk.checkpointed_rollout(lambda x, s: x[:, :2], x, SIGMAS, eta=0.5)
    with pytest.raises(ValueError, match="velocity_fn"):
        rk.checkpointed_rollout(lambda x, s: x[:, :2], x.requires_grad_(), SIGMAS, eta=0.5, grad_steps=1)
    with pytest.raises(TypeError, match="x_T"):
        rk.checkpointed_rollout(_vf, torch.zeros(2, 3, dtype=torch.int64), SIGMAS, eta=0.5)
