"""Peak memory and wall time of one fwd+bwd through ``rk.checkpointed_rollout`` (docs/kernels.md §6), by K and mode.

For K in {1, 2, 4, 8} CPS steps and four modes, one forward of the rollout through all K steps
(``grad_steps=None``), loss = ``x_K.square().mean()``, backward to the model parameters and ``x_T``:

- ``plain``: ``checkpoint=False`` and no block checkpointing (the unrolled loop keeps every step's graph);
- ``step``: ``checkpoint=True`` (only each step's input latent is kept, the network re-runs in backward);
- ``block``: diffusers' ``model.enable_gradient_checkpointing()`` with ``checkpoint=False``;
- ``both``: step and block checkpointing together.

The model is a diffusers ``SD3Transformer2DModel`` with random weights. On CPU (fp32) every point runs in
a fresh subprocess: model and inputs are built, one untimed K=1 fwd+bwd of the same mode warms the
allocator and thread pools (and allocates the parameters' ``.grad`` buffers, zeroed afterwards, so they
are part of the baseline), the kernel's peak-RSS mark is reset (``/proc/self/clear_refs`` + ``VmHWM``,
as bench/_util.py does), and the measured point's peak RSS above that baseline is reported. On CUDA
(bf16, the SD3.5-M transformer config, 512 px, B = 2) the number is ``torch.cuda.max_memory_allocated``
above the same baseline, all points in one process.

Run::

    python bench/rollout_memory.py --out /tmp/rollout --png bench/rollout_memory.png   # CPU: ~3-4 min
    python bench/rollout_memory.py --quick --out /tmp/rollout                         # CI smoke
    python bench/rollout_memory.py --device cuda --out /tmp/r   # SD3.5-M config from bench/configs/

Writes ``DIR/rollout_memory.json`` (``--out`` may also name the .json file), prints a markdown table
(K, mode, peak MB, ratio to the same mode at K=1, time s, time ratio vs plain at the same K) and, with
``--png``, a plot: peak memory vs K (one line per mode) and time vs K.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for _path in (REPO, BENCH_DIR):  # the package, and bench/_util.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import _env  # noqa: E402

if __name__ == "__main__":  # test_rollout.py and this script's child processes import it under a clean env
    _env.no_triton_interpreter()  # before _util imports rtdmd_kernels

import torch  # noqa: E402
from _util import proc_status_bytes, reset_peak_rss  # noqa: E402

MODES = ("plain", "step", "block", "both")
MODE_FLAGS = {"plain": (False, False), "step": (True, False), "block": (False, True), "both": (True, True)}
KS = (1, 2, 4, 8)
QUICK_KS = (1, 2)
ETA = 0.5
SEED = 0
# CPU intra-op threads of each measured subprocess. One: on a small shared box (2 cores, other jobs
# running) OpenMP's barrier spinning with 2 threads made one fwd+bwd 20-50x slower and erratic.
CPU_THREADS = 1

# Model configs (SD3Transformer2DModel kwargs) and the latent / text sizes they run at.
# "cpu": ~1k image tokens (64x64 latent, patch 2 -> 32x32), hidden 128, 6 layers: activations dominate.
MODELS: dict[str, dict] = {
    "cpu": {"config": dict(sample_size=64, patch_size=2, in_channels=16, num_layers=6, attention_head_dim=32,
                           num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=128,
                           pooled_projection_dim=32, out_channels=16, pos_embed_max_size=64),
            "latent": 64, "batch": 1, "text_tokens": 16},
    "quick": {"config": dict(sample_size=32, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=16,
                             num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64,
                             pooled_projection_dim=16, out_channels=16, pos_embed_max_size=32),
              "latent": 32, "batch": 1, "text_tokens": 8},
    "tiny": {"config": dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                            num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                            pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16),
             "latent": 16, "batch": 1, "text_tokens": 4},
}
SD35M_CONFIG = BENCH_DIR / "configs" / "sd35_medium_transformer.json"  # SD3.5-Medium's published transformer config
SD35M_LATENT, SD35M_BATCH, SD35M_TEXT_TOKENS = 64, 2, 77  # 512 px -> 64x64 latent; CLIP-length prompt


def have_diffusers() -> bool:
    try:
        import diffusers  # noqa: F401
    except Exception:
        return False
    return True


def load_config(path: str | os.PathLike) -> dict:
    cfg = json.loads(Path(path).read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def model_spec(model: str, config_path: str | None = None, batch: int | None = None,
               latent: int | None = None) -> dict:
    """A JSON-able spec: SD3 config, latent side, batch, text tokens."""
    if model == "sd35m":
        path = config_path or os.environ.get("RTDMD_SD35M_CONFIG") or str(SD35M_CONFIG)
        if not Path(path).is_file():
            raise FileNotFoundError(f"--config: SD3.5-M transformer config not found at {path}")
        spec = {"config": load_config(path), "latent": SD35M_LATENT, "batch": SD35M_BATCH,
                "text_tokens": SD35M_TEXT_TOKENS}
    elif model in MODELS:
        spec = json.loads(json.dumps(MODELS[model]))
        if config_path:
            spec["config"] = load_config(config_path)
    else:
        raise ValueError(f"model must be one of {sorted(MODELS) + ['sd35m']}, got {model!r}")
    if batch:
        spec["batch"] = int(batch)
    if latent:
        spec["latent"] = int(latent)
    spec["name"] = model
    return spec


# ---------------------------------------------------------------------------------------------
# one point


def build(spec: dict, device: str, dtype: torch.dtype):
    """Model (random weights, seeded) and the rollout's fixed inputs."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(SEED)
    with torch.device(device):
        model = SD3Transformer2DModel.from_config(spec["config"])
    model = model.to(device=device, dtype=dtype).train()
    cfg = model.config
    B, S, T = spec["batch"], spec["latent"], spec["text_tokens"]
    gen = torch.Generator(device="cpu").manual_seed(SEED + 1)
    x_T = torch.randn(B, cfg.in_channels, S, S, generator=gen).to(device=device, dtype=dtype)
    enc = torch.randn(B, T, cfg.joint_attention_dim, generator=gen).to(device=device, dtype=dtype)
    pooled = torch.randn(B, cfg.pooled_projection_dim, generator=gen).to(device=device, dtype=dtype)
    return model, x_T, enc, pooled


def make_velocity_fn(model, enc, pooled):
    def velocity_fn(x, sigma):
        t = (sigma * 1000.0).to(x.dtype) if isinstance(sigma, torch.Tensor) else sigma * 1000.0
        return model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t,
                     return_dict=False)[0]

    return velocity_fn


def schedule(K: int, device: str) -> torch.Tensor:
    """K+1 sigmas from 1 to 0 (the last step is the Euler jump to the x0 prediction)."""
    return torch.linspace(1.0, 0.0, K + 1, device=device, dtype=torch.float32)


def noises_for(K: int, x_T: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(SEED + 2 + K)
    return torch.randn((K, *x_T.shape), generator=gen).to(device=x_T.device, dtype=x_T.dtype)


def set_block_checkpointing(model, on: bool) -> None:
    if on:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()


def make_step(model, x_T, enc, pooled, K: int, mode: str, noises=None, sigmas=None):
    """One fwd+bwd of a K-step rollout: loss = x_K.square().mean(), backward to params and x_T."""
    import rtdmd_kernels as rk

    step_ckpt, _ = MODE_FLAGS[mode]
    vfn = make_velocity_fn(model, enc, pooled)
    sigmas = schedule(K, x_T.device.type) if sigmas is None else sigmas
    noises = noises_for(K, x_T) if noises is None else noises
    leaf = x_T.detach().clone().requires_grad_(True)

    def step():
        x_K = rk.checkpointed_rollout(vfn, leaf, sigmas, eta=ETA, noises=noises, grad_steps=None,
                                      checkpoint=step_ckpt)
        loss = x_K.float().square().mean()
        loss.backward()
        return loss.detach()

    return step, leaf


def _zero_grads(model, leaf=None) -> None:
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()
    if leaf is not None:
        leaf.grad = None


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def measure_point(spec: dict, K: int, mode: str, device: str = "cpu", dtype: str = "float32",
                  built=None, threads: int | None = None) -> dict:
    """Peak memory above the baseline (model, its .grad buffers, inputs) and wall time of one fwd+bwd.

    CPU: meant to run in a fresh process (see :func:`cpu_point`); CUDA: ``built`` reuses one model.
    """
    if threads:
        torch.set_num_threads(int(threads))
    tdtype = getattr(torch, dtype)
    model, x_T, enc, pooled = built if built is not None else build(spec, device, tdtype)
    set_block_checkpointing(model, MODE_FLAGS[mode][1])
    cuda = device == "cuda"

    # warm-up: one untimed K=1 fwd+bwd of the same mode (lazy init, thread pools, .grad buffers)
    warm, wleaf = make_step(model, x_T, enc, pooled, 1, mode)
    warm()
    del warm, wleaf
    _zero_grads(model)
    step, leaf = make_step(model, x_T, enc, pooled, K, mode)  # noises and sigmas are built here
    gc.collect()

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - base
        method = "cuda max_memory_allocated"
    else:
        if not (reset_peak_rss() and proc_status_bytes("VmHWM") is not None):
            raise RuntimeError("peak RSS needs Linux /proc/self/clear_refs and VmHWM")
        base = proc_status_bytes("VmRSS")
        t0 = time.perf_counter()
        loss = step()
        wall = time.perf_counter() - t0
        peak = proc_status_bytes("VmHWM") - base
        method = "VmHWM (clear_refs)"
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), "no finite gradient reached x_T"
    params = list(model.parameters())
    res = {"K": K, "mode": mode, "peak_bytes": max(int(peak), 0), "time_s": wall, "loss": float(loss),
           "method": method, "device": device, "dtype": dtype, "shape": list(x_T.shape),
           "param_bytes": _nbytes(params), "param_count": sum(p.numel() for p in params),
           "latent_bytes": _nbytes([x_T]), "threads": torch.get_num_threads()}
    _zero_grads(model, leaf)
    return res


_CHILD = (
    "import json, sys; sys.path.insert(0, sys.argv[1]); import rollout_memory as m; "
    "a = json.loads(sys.argv[2]); print('ROLLOUT_JSON ' + json.dumps(m.measure_point(**a)))"
)


def cpu_point(spec: dict, K: int, mode: str, dtype: str = "float32", threads: int | None = CPU_THREADS,
              timeout: float = 600) -> dict:
    """:func:`measure_point` in a fresh subprocess (glibc's mmap threshold pinned so freed large blocks
    go back to the OS and the peak is not hidden by a warm heap, as bench/_util.py does)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    args = json.dumps({"spec": spec, "K": K, "mode": mode, "device": "cpu", "dtype": dtype,
                       "threads": threads})
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(BENCH_DIR), args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("ROLLOUT_JSON "):
            return json.loads(line[len("ROLLOUT_JSON "):])
    raise RuntimeError(f"rollout subprocess (K={K}, mode={mode}) failed (rc={proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")


def run_all(spec: dict, ks=KS, modes=MODES, device: str = "cpu", dtype: str = "float32", log=print,
            threads: int | None = CPU_THREADS) -> list[dict]:
    rows = []
    built = build(spec, device, getattr(torch, dtype)) if device == "cuda" else None
    for K in ks:
        for mode in modes:
            try:
                if device == "cuda":
                    r = measure_point(spec, K, mode, device, dtype, built=built)
                else:
                    r = cpu_point(spec, K, mode, dtype, threads=threads)
            except torch.cuda.OutOfMemoryError as exc:  # only raised in-process (CUDA)
                r = {"K": K, "mode": mode, "peak_bytes": None, "time_s": None, "error": f"OOM: {exc}"[:300]}
                gc.collect()
                torch.cuda.empty_cache()
            rows.append(r)
            if log:
                pk = "OOM" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f} MB"
                ts = "-" if r["time_s"] is None else f"{r['time_s']:.2f} s"
                log(f"  K={K} {mode:5s} peak {pk:>10s}  time {ts}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# reporting


def add_ratios(rows: list[dict]) -> list[dict]:
    """mem_ratio = peak / the same mode's peak at K=1 (smallest K); time_ratio = time / plain's at the same K."""
    kmin = min(r["K"] for r in rows)
    base_mem = {r["mode"]: r["peak_bytes"] for r in rows if r["K"] == kmin}
    plain_t = {r["K"]: r["time_s"] for r in rows if r["mode"] == "plain"}
    for r in rows:
        b, t = base_mem.get(r["mode"]), plain_t.get(r["K"])
        r["mem_ratio"] = r["peak_bytes"] / b if (b and r["peak_bytes"] is not None) else None
        r["time_ratio"] = r["time_s"] / t if (t and r["time_s"] is not None) else None
    return rows


def _fmt(v, nd=2):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown(rows: list[dict]) -> str:
    lines = ["| K | mode | peak MB | x same mode K=1 | time s | x plain time |", "|---|---|---|---|---|---|"]
    for r in rows:
        mb = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20
        lines.append(f"| {r['K']} | {r['mode']} | {_fmt(mb, 1) if mb is not None else 'OOM'} | "
                     f"{_fmt(r.get('mem_ratio'))} | {_fmt(r['time_s'])} | {_fmt(r.get('time_ratio'))} |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> dict:
    """checkpoint=True: activation peak at K=8 <= 1.3x K=1; time <= 1.5x plain at every K.

    The pass/fail flags are only set when the run reaches K >= 8 (a --quick smoke gives ratios only)."""
    kmax, kmin = max(r["K"] for r in rows), min(r["K"] for r in rows)
    judge = kmax >= 8
    by = {(r["K"], r["mode"]): r for r in rows}
    out = {}
    for mode in ("step", "both"):
        hi, lo = by.get((kmax, mode)), by.get((kmin, mode))
        if hi and lo and hi["peak_bytes"] is not None and lo["peak_bytes"]:
            mr = hi["peak_bytes"] / lo["peak_bytes"]
            out[f"{mode}_mem_ratio_K{kmax}_vs_K{kmin}"] = mr
            if judge:
                out[f"{mode}_mem_target_met"] = mr <= 1.3
        trs = [r["time_ratio"] for r in rows if r["mode"] == mode and r.get("time_ratio") is not None]
        if trs:
            out[f"{mode}_max_time_ratio_vs_plain"] = max(trs)
            if judge:
                out[f"{mode}_time_target_met"] = max(trs) <= 1.5
    hi, lo = by.get((kmax, "plain")), by.get((kmin, "plain"))
    if hi and lo and hi["peak_bytes"] is not None and lo["peak_bytes"]:
        out[f"plain_mem_ratio_K{kmax}_vs_K{kmin}"] = hi["peak_bytes"] / lo["peak_bytes"]
    return out


def plot(rows: list[dict], path: str | os.PathLike, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in MODES:
        rs = [r for r in rows if r["mode"] == mode and r["peak_bytes"] is not None]
        if not rs:
            continue
        ks = [r["K"] for r in rs]
        a1.plot(ks, [r["peak_bytes"] / 2**20 for r in rs], marker="o", label=mode)
        a2.plot(ks, [r["time_s"] for r in rs], marker="o", label=mode)
    for ax, yl in ((a1, "peak memory above baseline (MB)"), (a2, "fwd+bwd wall time (s)")):
        ks = sorted({r["K"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("K (CPS steps, all with gradient)")
        ax.set_ylabel(yl)
        ax.grid(True, alpha=0.3)
        ax.legend()
    a1.set_title("peak memory vs K")
    a2.set_title("time vs K")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except Exception:
        pass
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="rollout_out", help="output folder (or a .json path)")
    ap.add_argument("--png", default=None, help="write the plot here")
    ap.add_argument("--quick", action="store_true", help="K in {1, 2} and a smaller model (CI smoke)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--model", default=None, help="cpu | quick | tiny | sd35m (default: cpu, quick, or sd35m "
                                                  "on CUDA)")
    ap.add_argument("--config", default=None, help="SD3 transformer config JSON (CUDA default: "
                                                   f"{SD35M_CONFIG})")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--latent", type=int, default=None, help="latent side (512 px -> 64)")
    ap.add_argument("--ks", default=None, help="comma-separated K values (default 1,2,4,8)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--threads", type=int, default=CPU_THREADS, help="CPU intra-op threads per point "
                                                                     "(0: torch's default)")
    args = ap.parse_args(argv)

    if not have_diffusers():
        print("diffusers is not installed: pip install diffusers", file=sys.stderr)
        return 2
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device == "cuda" else "float32"
    model = args.model or ("quick" if args.quick else "sd35m" if device == "cuda" else "cpu")
    try:
        spec = model_spec(model, args.config, args.batch, args.latent)
    except (FileNotFoundError, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    ks = tuple(int(k) for k in args.ks.split(",")) if args.ks else (QUICK_KS if args.quick else KS)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad:
        print(f"--modes: unknown {bad}, expected a subset of {MODES}", file=sys.stderr)
        return 2

    mach = machine()
    print(f"rollout memory: device={device} dtype={dtype} model={model} B={spec['batch']} "
          f"latent={spec['latent']} text={spec['text_tokens']} K={list(ks)} eta={ETA} | "
          f"{mach.get('gpu') or mach.get('cpu', '?')}, {args.threads or mach['threads']} threads per point", flush=True)
    t0 = time.perf_counter()
    rows = add_ratios(run_all(spec, ks, modes, device, dtype, threads=args.threads or None))
    total = time.perf_counter() - t0
    ok = [r for r in rows if r.get("param_bytes")]
    pmb = ok[0]["param_bytes"] / 2**20 if ok else float("nan")
    plain_k1 = next((r for r in rows if r["mode"] == "plain" and r["K"] == min(ks) and r["peak_bytes"]), None)
    amb = plain_k1["peak_bytes"] / 2**20 if plain_k1 else float("nan")
    tg = targets(rows)
    print()
    print(f"parameters: {ok[0]['param_count'] / 1e6 if ok else float('nan'):.2f} M = {pmb:.1f} MB ({dtype}); "
          f"plain K={min(ks)} activation peak {amb:.1f} MB (x{amb / pmb:.1f} the parameters); total {total:.0f} s")
    print(markdown(rows))
    print("targets:", json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in tg.items()}))

    out = Path(args.out)
    jpath = out if out.suffix == ".json" else out / "rollout_memory.json"
    jpath.parent.mkdir(parents=True, exist_ok=True)
    payload = {"device": device, "dtype": dtype, "model": model, "spec": spec, "eta": ETA, "ks": list(ks),
               "modes": list(modes), "machine": mach, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "total_s": total, "param_bytes": ok[0]["param_bytes"] if ok else None, "rows": rows, "targets": tg}
    jpath.write_text(json.dumps(payload, indent=2))
    print(f"wrote {jpath}")
    if args.png:
        plot(rows, args.png, title=f"checkpointed_rollout fwd+bwd, {device} {dtype}, {model} "
                                   f"B={spec['batch']} latent {spec['latent']}, "
                                   f"{mach.get('gpu') or mach.get('cpu', '')}")
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
