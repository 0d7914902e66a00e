"""One-shot GPU check of the GRPO ops (group_advantages, cps_step, ppo_clip_loss) on a lent GPU.

Sections (each guarded: a failure is reported and the rest runs): correctness at real sizes vs
reference.py on float64 copies; no host sync under ``torch.cuda.set_sync_debug_mode("error")``;
device time (torch.profiler kernel sum) and synchronised host time of ours vs the eager reference;
for group_advantages the reference's numpy path timed from the CUDA reward tensor to the CUDA
advantage tensor (device -> host -> device). Writes ``$OUT/grpo_check.json`` and prints a compact
table last. Without CUDA it runs tiny shapes on the CPU (a dry run of every code path).

Usage: ``PYTHONPATH=. python bench/gpu_grpo_check.py [--out DIR] [--copy-gbps X]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _env  # noqa: E402

_env.no_triton_interpreter()  # before _util imports rtdmd_kernels

import _util as bu  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from gpu_kernel_time import device_us, host_us  # noqa: E402

import rtdmd_kernels as rk  # noqa: E402
from rtdmd_kernels import reference  # noqa: E402

ETA = 0.9


def ppo_inputs(shape, v_dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B = shape[0]
    x = torch.randn(shape, generator=gen).to(device)
    v = torch.randn(shape, generator=gen).to(device=device, dtype=v_dtype)
    choices = torch.tensor([1.0, 0.9, 0.75, 0.5])
    idx = torch.randint(0, 3, (B,), generator=gen)
    sigma, sigma_next = choices[idx].to(device), choices[idx + 1].to(device)
    x_next, _ = rk.cps_step(x, v, sigma, sigma_next, eta=ETA, generator=None)
    old_logp = rk.cps_logprob(x, v, x_next, sigma, sigma_next, eta=ETA)
    adv = (torch.randn(B, generator=gen) * 2).to(device)
    return x, v.detach().clone().requires_grad_(True), x_next, old_logp, adv, sigma, sigma_next


def ppo_step(fn, inp):
    x, v, x_next, old_logp, adv, sigma, sigma_next = inp

    def step():
        loss = fn(x, v, x_next, old_logp, adv, sigma, sigma_next, eta=ETA)
        (dv,) = torch.autograd.grad(loss, v)
        return dv

    return step


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    parser.add_argument("--copy-gbps", type=float, default=0.0)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    cases = bu.CASES if cuda else bu.DRY_CASES
    v_dtypes = [torch.float32, torch.bfloat16] if cuda else [torch.float32]
    iters = 10 if cuda else 2
    out = {"correctness": [], "sync": [], "ppo": [], "adv": [], "errors": []}
    rows = []

    # --- ppo_clip_loss: correctness, sync, device/host time
    for v_dtype in v_dtypes:
        for case, shape in cases.items():
            try:
                inp = ppo_inputs(shape, v_dtype, device)
                x, v, x_next, old_logp, adv, sigma, sigma_next = inp
                loss, stats = rk.ppo_clip_loss(x, v, x_next, old_logp, adv, sigma, sigma_next, eta=ETA,
                                               return_stats=True)
                (dv,) = torch.autograd.grad(loss, v)
                v64 = v.detach().double().requires_grad_(True)
                l64 = reference.ppo_clip_loss(x.double(), v64, x_next.double(), old_logp.double(), adv.double(),
                                              sigma.double(), sigma_next.double(), eta=ETA)
                (dv64,) = torch.autograd.grad(l64, v64)
                rec = {"case": case, "v_dtype": bu.dtype_name(v_dtype), "loss_err": bu.rel_err(loss, l64),
                       "grad_err": bu.rel_err(dv, dv64), "ratio_mean": float(stats["ratio_mean"]),
                       "clip_fraction": float(stats["clip_fraction"])}
                out["correctness"].append(rec)
                if cuda:
                    out["sync"].append({"op": "ppo_clip_loss", "case": case,
                                        **bu.sync_check(ppo_step(rk.ppo_clip_loss, inp))})
                nbytes = x.numel() * (4 + 4 + v.element_size() * 2)  # x, x_next read; v read; dv written
                t = {"case": case, "v_dtype": bu.dtype_name(v_dtype), "bytes": nbytes}
                for name, fn in (("ours", rk.ppo_clip_loss), ("eager", reference.ppo_clip_loss)):
                    step = ppo_step(fn, inp)
                    t[f"{name}_dev_us"] = device_us(step, iters, cuda)
                    t[f"{name}_host_us"] = host_us(step, iters, cuda)
                out["ppo"].append(t)
                gbps = nbytes / t["ours_dev_us"] / 1e3
                pct = f"{100 * gbps / args.copy_gbps:.1f}" if args.copy_gbps else "-"
                rows.append(["ppo_clip_loss", f"x fp32, v {bu.dtype_name(v_dtype)}", bu.shape_str(shape),
                             f"{nbytes / 1e6:.1f}", f"{rec['grad_err']:.1e}", f"{t['ours_dev_us']:.1f}",
                             f"{t['eager_dev_us']:.1f}", f"{t['eager_dev_us'] / t['ours_dev_us']:.1f}",
                             f"{t['ours_host_us']:.0f}", f"{t['eager_host_us']:.0f}", f"{gbps:.0f}", pct])
            except Exception as exc:
                out["errors"].append(f"ppo {case} {v_dtype}: {traceback.format_exc()[-800:]}")
                rows.append(["ppo_clip_loss", str(v_dtype), case, "ERROR", f"{type(exc).__name__}: {exc}"[:150]])

    # --- group_advantages: correctness vs the numpy tracker, sync, time incl. the host round trip
    for n in (1152, 1536, 65536):
        for n_rewards in (1, 4):
            try:
                gen = torch.Generator(device="cpu").manual_seed(n)
                groups = n // 24
                ids = torch.randperm(n, generator=gen) % groups
                rewards = torch.randn(n, n_rewards, generator=gen)
                weights = [1.0] * n_rewards
                kw = dict(num_groups=groups, scale="global", ddof=0, eps=1e-4)
                if n_rewards > 1:
                    kw.update(weights=weights, restandardize=True)
                r_dev, ids_dev = rewards.to(device), ids.to(device)
                ours = rk.group_advantages(r_dev if n_rewards > 1 else r_dev[:, 0], ids_dev, **kw)
                prompts = [f"p{i}" for i in ids.tolist()]

                def numpy_path(r=r_dev, prompts=prompts, n_rewards=n_rewards, weights=weights):
                    host = r.float().cpu().numpy()
                    if n_rewards == 1:
                        a = reference.PerPromptStatTracker(global_std=True).update(prompts, host[:, 0])
                    else:
                        a = reference.rtdmd_weighted_advantages(host, prompts, weights)
                    return torch.as_tensor(np.asarray(a, dtype=np.float32)).to(r.device)

                # The numpy tracker takes seconds at N = 65536 with 4 rewards: compare and time it once, or skip.
                run_numpy = n <= 1536 or n_rewards == 1
                rec = {"n": n, "rewards": n_rewards, "err": math.nan, "numpy_host_us": math.nan}
                if run_numpy:
                    expected = numpy_path()
                    rec["err"] = float((ours.cpu() - expected.cpu()).abs().max())
                def ours_call(r=r_dev, n_rewards=n_rewards, kw=kw, ids_dev=ids_dev):
                    return rk.group_advantages(r if n_rewards > 1 else r[:, 0], ids_dev, **kw)

                if cuda:
                    sync = bu.sync_check(ours_call)
                    rec["no_host_sync"] = sync["no_host_sync"]
                    if "error" in sync:
                        rec["sync_error"] = sync["error"]

                rec["ours_host_us"] = host_us(ours_call, 20, cuda)
                if run_numpy:
                    rec["numpy_host_us"] = host_us(numpy_path, 5 if n <= 1536 else 1, cuda)
                out["adv"].append(rec)
                rows.append(["group_advantages", f"{n_rewards} reward(s)", f"N={n}", "-", f"{rec['err']:.1e}", "-",
                             "-", "-", f"{rec['ours_host_us']:.0f}", f"{rec['numpy_host_us']:.0f}", "-",
                             f"x{rec['numpy_host_us'] / rec['ours_host_us']:.0f} (sync-free: "
                             f"{rec.get('no_host_sync', '-')})"])
            except Exception as exc:
                out["errors"].append(f"adv {n} {n_rewards}: {traceback.format_exc()[-800:]}")
                rows.append(["group_advantages", n_rewards, n, "ERROR", f"{type(exc).__name__}: {exc}"[:150]])

    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "grpo_check.json").write_text(json.dumps(out, indent=1, default=str))
    for e in out["errors"]:
        print("ERROR", e)
    name = torch.cuda.get_device_name() if cuda else "CPU dry run"
    sync_ok = sum(1 for s in out["sync"] if s["no_host_sync"])
    print(f"\n**{name}** torch {torch.__version__} | ppo sync-free {sync_ok}/{len(out['sync'])} | "
          f"errors {len(out['errors'])}")
    headers = ["op", "dtypes", "shape", "MB", "max err", "ours dev µs", "eager dev µs", "x eager (dev)",
               "ours host µs", "eager/numpy host µs", "ours GB/s (dev)", "% copy BW / note"]
    print(bu.markdown_table(headers, rows))
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
