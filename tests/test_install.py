"""The install split: ``pip install rtdmd`` is the kernels alone (torch; Triton optional), the trainer needs the
``train`` extra, and the entry points say so in one line when it is missing."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rtdmd_kernels as rk
from rtdmd._deps import INSTALL_HINT, TRAINER_MODULES

ROOT = Path(__file__).resolve().parents[1]

#: Makes importing each named module (and its submodules) raise ModuleNotFoundError, as when not installed.
BLOCK = "import sys\nfor _m in {names!r}:\n    sys.modules[_m] = None\n"

TRAINER_ONLY = sorted(TRAINER_MODULES)  # every package of the train extra, numpy included

# Every public op, run forward and backward on small float32 CPU inputs and compared with reference.py in float64.
# A new op in rk.__all__ without a case here fails test_every_public_op_has_a_case.
KERNEL_CASES = r"""
import math, sys, torch
import rtdmd_kernels as rk
from rtdmd_kernels import reference as ref

torch.manual_seed(0)
B, shape = 3, (3, 4, 6, 6)
f64 = lambda *ts: [t.detach().double().requires_grad_(t.requires_grad) for t in ts]
sig = torch.tensor([0.9, 0.75, 0.5])
sig_n = torch.tensor([0.75, 0.5, 0.0])
checked = set()

def close(name, ours, oracle, tol=2e-5):
    ours, oracle = ours.detach().double(), oracle.detach().double()
    err = (ours - oracle).abs().max().item()
    assert err <= tol * max(1.0, oracle.abs().max().item()), (name, err)
    checked.add(name)

def grad_of(loss, *ts):
    return torch.autograd.grad(loss, ts)

x, xf, xr = (torch.randn(shape) for _ in range(3))
x.requires_grad_(True)
ours = rk.dmd_loss(x, xf, xr)
x64, xf64, xr64 = f64(x, xf, xr)
oracle = ref.dmd_loss(x64, xf64, xr64)
close("dmd_loss", ours, oracle)
close("dmd_loss", grad_of(ours, x)[0], grad_of(oracle, x64)[0])

xs, xt, vr, vu, vf, nz = (torch.randn(shape) for _ in range(6))
xs.requires_grad_(True)
ours = rk.ac_dmd_loss(xs, xt, vr, vf, nz, sig_n, sig, v_real_uncond=vu, guidance_scale=4.5)
a = f64(xs, xt, vr, vf, nz)
oracle = ref.ac_dmd_loss(*a, sig_n.double(), sig.double(), v_real_uncond=vu.double(), guidance_scale=4.5)
close("ac_dmd_loss", ours, oracle)
close("ac_dmd_loss", grad_of(ours, xs)[0], grad_of(oracle, a[0])[0])

xx, v, nz = torch.randn(shape), torch.randn(shape, requires_grad=True), torch.randn(shape)
x_next, mean = rk.cps_step(xx, v, sig, sig_n, eta=0.9, noise=nz)
o_next, _, o_mean, _ = ref.cps_step_with_logprob(xx.double(), v.double(), sig.double(), sig_n.double(), 0.9,
                                                 noise=nz.double())
close("cps_step", x_next, o_next)
close("cps_step", mean, o_mean)

lp = rk.cps_logprob(xx, v, x_next.detach(), sig, sig_n, eta=0.9)
_, o_lp, _, _ = ref.cps_step_with_logprob(xx.double(), v.double(), sig.double(), sig_n.double(), 0.9,
                                          x_next=x_next.detach().double())
close("cps_logprob", lp, o_lp)

adv, old = torch.randn(B), lp.detach() - 1e-6
ours = rk.ppo_clip_loss(xx, v, x_next.detach(), old, adv, sig, sig_n, eta=0.9)
v64 = v.detach().double().requires_grad_(True)
oracle = ref.ppo_clip_loss(xx.double(), v64, x_next.detach().double(), old.double(), adv.double(), sig.double(),
                           sig_n.double(), eta=0.9)
close("ppo_clip_loss", ours, oracle)
close("ppo_clip_loss", grad_of(ours, v)[0], grad_of(oracle, v64)[0])

ids = rk.group_ids(["a", "b", "a", "c", "b", "a"])
assert ids.tolist() == [0, 1, 0, 2, 1, 0], ids
checked.add("group_ids")
r = torch.randn(6)
ours = rk.group_advantages(r, ids, num_groups=3, scale="global", ddof=0, eps=1e-4)
r64, mean_g = r.double(), torch.zeros(3, dtype=torch.float64)
for g in range(3):
    mean_g[g] = r64[ids == g].mean()
close("group_advantages", ours, (r64 - mean_g[ids]) / (r64.std(unbiased=False) + 1e-4))

xs, nz = torch.randn(shape, requires_grad=True), torch.randn(shape)
ours = rk.renoise(xs, nz, sig_n, sig)
close("renoise", ours, ref.renoise(xs.double(), nz.double(), sig_n.double(), sig.double()))

vh = torch.randn(shape, requires_grad=True)
ours = rk.fake_score_loss(vh, xs.detach(), nz, sig_n, sig)
vh64 = vh.detach().double().requires_grad_(True)
oracle = ref.fake_score_loss(vh64, xs.detach().double(), nz.double(), sig_n.double(), sig.double())
close("fake_score_loss", ours, oracle)
close("fake_score_loss", grad_of(ours, vh)[0], grad_of(oracle, vh64)[0])

xt, x1, x2 = (torch.randn(shape) for _ in range(3))
v0, v1, v2 = (torch.randn(shape, requires_grad=True) for _ in range(3))
sig_p = torch.tensor([0.7, 0.3, 0.0])
ours = rk.consistency_loss(xt, v0, sig, x1, v1, x2, v2, sig_p)
w = f64(v0, v1, v2)
oracle = ref.consistency_loss(xt.double(), w[0], sig.double(), x1.double(), w[1], x2.double(), w[2], sig_p.double())
close("consistency_loss", ours, oracle)
for g_ours, g_ref in zip(grad_of(ours, v0, v1, v2), grad_of(oracle, *w)):
    close("consistency_loss", g_ours, g_ref)

lin = torch.nn.Linear(shape[-1], shape[-1]).double()
sigmas, noises = [1.0, 0.75, 0.5, 0.0], torch.randn(3, *shape, dtype=torch.float64)
x_T = torch.randn(shape, dtype=torch.float64)
out = rk.checkpointed_rollout(lambda z, s: lin(z), x_T, sigmas, eta=0.9, noises=noises, grad_steps=2)
(g_ours,) = torch.autograd.grad(out.square().sum(), lin.weight)
z = x_T
for k in range(3):
    vk = lin(z) if k >= 1 else lin(z).detach()
    z, _ = rk.cps_step(z, vk, sigmas[k], sigmas[k + 1], eta=0.9, noise=noises[k])
close("checkpointed_rollout", out, z)
close("checkpointed_rollout", g_ours, torch.autograd.grad(z.square().sum(), lin.weight)[0])

lat = torch.randn(shape, dtype=torch.float64, requires_grad=True)
dec = rk.checkpointed_decode(lambda t: lin(t).tanh(), lat, chunk_size=2)
close("checkpointed_decode", dec, lin(lat).tanh())
close("checkpointed_decode", grad_of(dec.sum(), lat)[0], grad_of(lin(lat).tanh().sum(), lat)[0])

assert rk.backend_for(x) in ("torch", "triton-interpreter")
with rk.use_backend("torch"):
    assert rk.backend_for(x) == "torch"
checked |= {"backend_for", "use_backend"}
loaded = sorted(m for m in {names!r} if sys.modules.get(m) is not None)
print(",".join(sorted(checked)))
print("loaded:" + ",".join(loaded))
"""


def _run(code: str, *args: str, interpret: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RTDMD_KERNELS_BACKEND")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def _public_ops() -> set[str]:
    return {n for n in rk.__all__ if callable(getattr(rk, n))}


def test_every_public_op_has_a_case():
    missing = {n for n in _public_ops() if f'"{n}"' not in KERNEL_CASES and f"rk.{n}(" not in KERNEL_CASES}
    assert not missing, f"add these ops to KERNEL_CASES: {sorted(missing)}"


@pytest.mark.parametrize("interpret", [False, True], ids=["torch", "triton-interpreter"])
def test_every_op_runs_without_the_trainer_packages(interpret):
    """Each op, forward and backward, against reference.py in float64, in a process where importing any package
    of the train extra raises: the kernels need torch (and optionally triton) alone."""
    if interpret and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    blocked = [*TRAINER_ONLY, "rtdmd"]
    code = BLOCK.format(names=blocked) + KERNEL_CASES.replace("{names!r}", repr(blocked))
    res = _run(code, interpret=interpret)
    assert res.returncode == 0, res.stderr[-3000:]
    checked, loaded = res.stdout.strip().splitlines()[-2:]
    assert set(checked.split(",")) == _public_ops()
    assert loaded == "loaded:"


def test_base_install_requires_torch_alone():
    """setup.py: install_requires is torch; every trainer package is in the train extra, and _deps knows them."""
    reqs = importlib.metadata.requires("rtdmd") or []
    name = lambda r: re.match(r"[A-Za-z0-9_.\-]+", r).group(0).lower()
    assert {name(r) for r in reqs if "extra ==" not in r} == {"torch"}
    assert {name(r) for r in reqs if 'extra == "train"' in r} == set(TRAINER_MODULES.values())


@pytest.mark.parametrize("entry", ["rtdmd.train", "rtdmd.sample"])
@pytest.mark.parametrize("missing", [["diffusers"], ["yaml", "peft"]], ids=["one", "two"])
def test_entry_points_without_the_train_extra_exit_2_in_one_line(entry, missing):
    code = BLOCK.format(names=missing) + (
        "import runpy\n"
        f"sys.argv = ['{entry}', '--help']\n"
        f"runpy.run_module('{entry}', run_name='__main__', alter_sys=True)\n"
    )
    res = _run(code)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    dists = ", ".join(d for m, d in TRAINER_MODULES.items() if m in missing)  # in the table's order
    assert lines[0] == f"python -m {entry}: error: the trainer needs {dists} (not installed): {INSTALL_HINT}"
    assert "Traceback" not in res.stderr and res.stdout == ""
