"""One report of the benchmark suite: ``python -m bench.report`` from the repository root.

Runs ``pytest bench/ --benchmark-only --benchmark-json=<tmp>`` in a subprocess (or reads an existing
``--benchmark-json FILE``), measures this machine's device-to-device copy bandwidth (CUDA: a large
``copy_`` timed with events; CPU: a large tensor copy timed with ``perf_counter``; bytes = read + write)
and prints three tables:

1. every op benchmark: op, mode, shape, dtype, provider, median time, floor bytes, GB/s, % of the copy
   bandwidth, peak memory (joined from the ``kind="memory"`` entries of the same op, mode, shape, dtype
   and provider; ``-`` where the suite has none) and speedup vs ``reference``;
2. the rollout memory vs K (``test_rollout.py``'s ``checkpointed_rollout`` entries);
3. where a training step's time goes (``test_train_step.py``'s ``share_*`` entries): the share in our kernels.

``--markdown FILE`` writes the same tables as Markdown under a header naming the machine, torch version,
date and commit, for ``bench/RESULTS.md``. Examples::

    python -m bench.report                                 # whole suite, ~5-8 min on a 2-core CPU
    python -m bench.report -k "dmd or policy" --max-time 0.1
    python -m bench.report --benchmark-json run.json --markdown /tmp/report.md   # no benchmark run

The table code imports neither torch nor another bench module and leaves the environment alone; running the
suite or measuring the bandwidth first removes ``TRITON_INTERPRET`` (``bench/_env.py``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

OP_ORDER = ("dmd_loss", "ac_dmd_loss", "cps_step", "cps_step+cps_logprob", "cps_logprob", "ppo_clip_loss",
            "group_advantages", "renoise", "fake_score_loss", "consistency_loss", "checkpointed_rollout",
            "checkpointed_decode")
MODE_ORDER = ("fwd", "fwd+bwd")
PROVIDER_ORDER = ("ours", "reference", "compiled")
ROLLOUT_OP = "checkpointed_rollout"
OP_HEADERS = ["op", "mode", "shape", "dtype", "provider", "median", "bytes", "GB/s", "% copy BW", "peak mem",
              "x ref"]
ROLLOUT_HEADERS = ["K", "mode", "shape", "dtype", "peak mem", "x K=1", "x plain", "time", "method"]


# ---------------------------------------------------------------------------------------------
# formatting


def fmt_value(v) -> str:
    """A table cell: ``-`` for None / NaN, floats with 3 significant digits-ish, the rest as str."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        a = abs(v)
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.01 or a == 0:
            return f"{v:.2f}"
        return f"{v:.2e}"
    return str(v)


def fmt_time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{fmt_value(seconds / scale)} {unit}"
    return f"{fmt_value(seconds / 1e-9)} ns"


def fmt_bytes(n: float | None, binary: bool = False) -> str:
    """Decimal MB / GB for traffic, MiB / GiB (``binary``) for memory."""
    if n is None:
        return "-"
    base, units = (1024.0, ("B", "KiB", "MiB", "GiB", "TiB")) if binary else (1000.0, ("B", "kB", "MB", "GB", "TB"))
    v, i = float(n), 0
    while abs(v) >= base and i < len(units) - 1:
        v, i = v / base, i + 1
    return f"{v:.0f} {units[i]}" if i == 0 else f"{fmt_value(v)} {units[i]}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt_value(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[fmt_value(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# tables from a pytest-benchmark JSON


def _median(bench: dict) -> float | None:
    try:
        m = float(bench["stats"]["median"])
    except (KeyError, TypeError, ValueError):
        return None
    return m if math.isfinite(m) and m > 0 else None


def _rank(value, order) -> int:
    return order.index(value) if value in order else len(order)


def split_entries(data: dict) -> dict[str, list[tuple[dict, float | None]]]:
    """``{"timing", "memory", "rollout", "train"}``: (extra_info, median seconds) of each benchmark."""
    out: dict[str, list] = {"timing": [], "memory": [], "rollout": [], "train": []}
    for bench in data.get("benchmarks", []) or []:
        info = dict(bench.get("extra_info") or {})
        if "op" not in info:
            continue
        med = _median(bench)
        if any(k.startswith("share_") for k in info):
            out["train"].append((info, med))
        elif info["op"] == ROLLOUT_OP:
            out["rollout"].append((info, med))
        elif info.get("kind") == "memory":
            out["memory"].append((info, med))
        else:
            out["timing"].append((info, med))
    return out


def _key(info: dict) -> tuple:
    return (info["op"], info.get("mode", "-"), info.get("shape", "-"), info.get("dtype", "-"))


def op_rows(data: dict, copy_gbps: float | None) -> list[dict]:
    """One dict per timed op benchmark: numbers (seconds, bytes, GB/s, %, peak bytes, speedup)."""
    parts = split_entries(data)
    peaks = {(*_key(i), i.get("provider")): i.get("peak_bytes") for i, _ in parts["memory"]}
    ref = {_key(i): med for i, med in parts["timing"] if i.get("provider") == "reference" and med}
    first_seen: dict[str, int] = {}
    for i, _ in parts["timing"]:
        first_seen.setdefault(i.get("case", i.get("shape", "-")), len(first_seen))
    rows = []
    for info, med in parts["timing"]:
        nbytes = info.get("bytes") or 0
        gbps = nbytes / med / 1e9 if (med and nbytes) else None
        r = ref.get(_key(info))
        rows.append({
            "op": info["op"], "mode": info.get("mode", "-"), "shape": info.get("shape", "-"),
            "dtype": info.get("dtype", "-"), "provider": info.get("provider", "-"), "median_s": med,
            "bytes": nbytes or None, "gbps": gbps,
            "pct_copy": 100 * gbps / copy_gbps if (gbps and copy_gbps) else None,
            "peak_bytes": peaks.get((*_key(info), info.get("provider"))),
            "speedup": r / med if (r and med) else None,
            "_sort": (_rank(info["op"], OP_ORDER), info["op"], _rank(info.get("mode"), MODE_ORDER),
                      first_seen[info.get("case", info.get("shape", "-"))], info.get("shape", "-"),
                      info.get("dtype", "-"), _rank(info.get("provider"), PROVIDER_ORDER)),
        })
    rows.sort(key=lambda r: r["_sort"])
    for r in rows:
        del r["_sort"]
    return rows


#: below this, an in-process peak-RSS delta is page-granularity noise (CUDA allocator peaks are exact and larger)
ROLLOUT_RESOLVABLE = 1 << 20


def rollout_rows(data: dict) -> list[dict]:
    """The rollout's peak memory by K and mode, with the ratio to the same mode at the smallest K and to
    ``plain`` at the same K."""
    entries = split_entries(data)["rollout"]
    modes: list[str] = []
    for i, _ in entries:
        if i.get("provider") not in modes:
            modes.append(i.get("provider"))
    peak = {(i.get("K"), i.get("provider")): i.get("peak_bytes") for i, _ in entries}
    k_min = min((i.get("K") for i, _ in entries if i.get("K") is not None), default=None)
    rows = []
    for info, med in entries:
        K, mode, p = info.get("K"), info.get("provider"), info.get("peak_bytes")
        base, plain = peak.get((k_min, mode)), peak.get((K, "plain"))
        rows.append({"K": K, "mode": mode, "shape": info.get("shape", "-"), "dtype": info.get("dtype", "-"),
                     "peak_bytes": p, "x_k1": p / base if (p is not None and base) else None,
                     "x_plain": p / plain if (p is not None and plain) else None, "time_s": med,
                     "method": info.get("method", "-")})
    rows.sort(key=lambda r: (r["K"] if r["K"] is not None else 1 << 30, modes.index(r["mode"])))
    return rows


def train_rows(data: dict) -> tuple[list[str], list[dict]]:
    """The training-step entries: the share categories (``kernels`` first) and one dict per step."""
    entries = split_entries(data)["train"]
    cats: list[str] = []
    for info, _ in entries:
        cats += [k[len("share_"):] for k in info if k.startswith("share_") and k[len("share_"):] not in cats]
    cats.sort(key=lambda c: c != "kernels")
    rows = [{"step": i["op"], "shape": i.get("shape", "-"), "dtype": i.get("dtype", "-"), "median_s": med,
             "threads": i.get("threads"), **{c: i.get(f"share_{c}") for c in cats}} for i, med in entries]
    return cats, rows


def render(data: dict, copy_gbps: float | None, markdown: bool = False) -> str:
    """The three tables (Markdown or aligned text), each with a title; an empty one says so."""
    table = markdown_table if markdown else text_table
    h = "### " if markdown else "== "
    out = []
    rows = op_rows(data, copy_gbps)
    bw = f"{copy_gbps:.1f} GB/s" if copy_gbps else "not measured"
    out.append(f"{h}Ops: median time, floor bytes, GB/s and % of the measured copy bandwidth ({bw}), "
               "peak memory of one call above its inputs, speedup vs reference")
    if rows:
        out.append(table(OP_HEADERS, [[r["op"], r["mode"], r["shape"], r["dtype"], r["provider"],
                                       fmt_time(r["median_s"]), fmt_bytes(r["bytes"]), r["gbps"], r["pct_copy"],
                                       fmt_bytes(r["peak_bytes"], binary=True), r["speedup"]] for r in rows]))
    else:
        out.append("(no rows: no op benchmarks in the JSON)")
    rows = rollout_rows(data)
    out.append(f"\n{h}checkpointed_rollout: peak memory of one fwd+bwd vs K (x K=1: same mode at the "
               "smallest K; x plain: plain at the same K)")
    if rows and not any((r["peak_bytes"] or 0) >= ROLLOUT_RESOLVABLE for r in rows):
        out.append(f"(not resolvable: every in-suite point is below {fmt_bytes(ROLLOUT_RESOLVABLE, binary=True)}, "
                   "under what peak RSS resolves; `python bench/rollout_memory.py` measures the curves with a "
                   "larger model, one fresh process per point — its numbers are in bench/RESULTS.md)")
    elif rows:
        out.append(table(ROLLOUT_HEADERS, [[r["K"], r["mode"], r["shape"], r["dtype"],
                                            fmt_bytes(r["peak_bytes"], binary=True), r["x_k1"], r["x_plain"],
                                            fmt_time(r["time_s"]), r["method"]] for r in rows]))
    else:
        out.append("(no rows: no checkpointed_rollout memory entries in the JSON)")
    cats, rows = train_rows(data)
    out.append(f"\n{h}Training step: share of the profiled time in our kernels and elsewhere")
    if rows:
        out.append(table(["step", "shape", "dtype", "median", "threads"] + [f"{c} %" for c in cats],
                         [[r["step"], r["shape"], r["dtype"], fmt_time(r["median_s"]), r["threads"]]
                          + [100 * r[c] if r[c] is not None else None for c in cats] for r in rows]))
    else:
        out.append("(no rows: no training-step entries in the JSON)")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# machine, header


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(data: dict, copy: dict | None = None, now: datetime.datetime | None = None) -> str:
    """``Machine: <GPU name | CPU model, N cores>, torch X, <date>, commit <sha>[+dirty]``."""
    gpus = {b.get("extra_info", {}).get("gpu") for b in data.get("benchmarks", []) or []} - {None}
    mi = data.get("machine_info") or {}
    cpu = (mi.get("cpu") or {}).get("brand_raw") or cpu_model()
    cores = (mi.get("cpu") or {}).get("count") or os.cpu_count()
    where = ", ".join(sorted(gpus)) if gpus else f"{cpu}, {cores} cores"
    torch_v = mi.get("torch_version")
    if not torch_v:
        try:
            torch_v = metadata.version("torch")
        except metadata.PackageNotFoundError:
            torch_v = "?"
    date = data.get("datetime") or (now or datetime.datetime.now(datetime.timezone.utc)).isoformat()
    ci = data.get("commit_info") or {}
    sha = ci.get("id") or _git_commit()
    commit = (sha[:10] if sha else "?") + ("+dirty" if ci.get("dirty") else "")
    line = f"Machine: {where}; torch {torch_v}; {date[:19]}; commit {commit}"
    if copy:
        line += f"; copy bandwidth {copy['gbps']:.1f} GB/s ({copy['how']})"
    return line


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------------
# measuring: the copy bandwidth and the suite (the only places that import torch / bench/_env.py)


def _bench_env():
    """bench/_env.py, imported on demand (``python -m bench.report`` does not put bench/ on sys.path)."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    import _env

    return _env


def copy_bandwidth(device: str, mib: int = 256, reps: int = 10) -> dict:
    """Device-to-device copy bandwidth: median of ``reps`` ``dst.copy_(src)`` of ``mib`` MiB, bytes = read +
    write. CUDA times with events; CPU with ``perf_counter`` (torch's own intra-op threads)."""
    import torch

    n = mib * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.zeros(n, device=device)
    for _ in range(2):
        dst.copy_(src)
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e-3)
        how = f"{mib} MiB copy_, CUDA events, {torch.cuda.get_device_name()}"
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        how = f"{mib} MiB copy_, perf_counter, {torch.get_num_threads()} threads"
    times.sort()
    med = times[len(times) // 2]
    return {"gbps": 2 * n * 4 / med / 1e9, "seconds": med, "how": how}


def bench_device(data: dict) -> str:
    """The device the JSON's benchmarks ran on, else this machine's (``_env.bench_device``)."""
    devs = {b.get("extra_info", {}).get("device") for b in data.get("benchmarks", []) or []} - {None}
    if devs:
        return "cuda" if "cuda" in devs else "cpu"
    return _bench_env().bench_device()


def run_suite(json_path: Path, keyword: str | None, max_time: float, min_rounds: int, extra: list[str]) -> int:
    """``pytest bench/ --benchmark-only --benchmark-json=json_path`` in a subprocess; its return code."""
    cmd = [sys.executable, "-m", "pytest", str(BENCH_DIR), "--benchmark-only", f"--benchmark-json={json_path}",
           f"--benchmark-max-time={max_time}", f"--benchmark-min-rounds={min_rounds}", "-q", "-p",
           "no:cacheprovider"]
    if keyword:
        cmd += ["-k", keyword]
    cmd += extra
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=REPO)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--benchmark-json", type=Path, help="read this pytest-benchmark JSON instead of running")
    ap.add_argument("-k", dest="keyword", help="pytest -k expression for the run")
    ap.add_argument("--max-time", type=float, default=0.2, help="--benchmark-max-time per benchmark (s)")
    ap.add_argument("--min-rounds", type=int, default=3, help="--benchmark-min-rounds")
    ap.add_argument("--save-json", type=Path, help="keep the run's JSON here")
    ap.add_argument("--markdown", type=Path, help="also write the tables as Markdown to this file")
    ap.add_argument("--copy-mib", type=int, default=256, help="size of the bandwidth copy (MiB)")
    ap.add_argument("--copy-gbps", type=float, help="use this copy bandwidth instead of measuring it")
    ap.add_argument("pytest_args", nargs="*", help="more pytest arguments for the run (after --)")
    a = ap.parse_args(argv)

    t0 = time.perf_counter()
    if not (a.benchmark_json and a.copy_gbps):  # runs the suite or times the copy: never under the interpreter
        _bench_env().no_triton_interpreter()
    rc = 0
    if a.benchmark_json:
        data = json.loads(a.benchmark_json.read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(a.save_json or Path(tmp) / "bench.json")
            rc = run_suite(path, a.keyword, a.max_time, a.min_rounds, a.pytest_args)
            if not path.exists():
                print(f"pytest exited {rc} without writing {path}", file=sys.stderr)
                return rc or 1
            data = json.loads(path.read_text())
    if a.copy_gbps:
        copy = {"gbps": a.copy_gbps, "how": "given"}
    else:
        dev = bench_device(data)
        copy = copy_bandwidth(dev, a.copy_mib)
    header = machine_line(data, copy)
    print("\n" + header + "\n")
    print(render(data, copy["gbps"]))
    if a.markdown:
        a.markdown.write_text(f"{header}\n\n{render(data, copy['gbps'], markdown=True)}")
        print(f"wrote {a.markdown}")
    print(f"report took {time.perf_counter() - t0:.0f} s" + (f" (pytest exited {rc})" if rc else ""))
    return rc


if __name__ == "__main__":
    sys.exit(main())
