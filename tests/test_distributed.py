"""Data-parallel training on CPU with two processes (gloo), launched with PyTorch's own ``torchrun``:
one step with 2 ranks x B/2 equals one process with B (losses and updated weights), advantages over ranks equal
the single-process ones, both strategies run the CLI end to end, and resume works (and refuses another world
size with one line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")
TINY = ["toy.num_layers=1", "toy.head_dim=16", "toy.base_steps=40", "toy.base_batch_size=32", "toy.n_eval=64",
        "stage1.batch_size=8", "stage1.fake_update_ratio=2", "stage1.steps=4", "stage1.checkpoint_every=2",
        "stage2.steps=2", "stage2.group_size=4", "stage2.num_batches=2", "stage2.fake_batch_size=4",
        "stage2.checkpoint_every=1", "eval.batch_size=64", "log.progress=false"]

pytestmark = pytest.mark.slow


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", RTDMD_CACHE=str(tmp_path / "cache"), RTDMD_KERNELS_BACKEND="torch",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]


def _run(cmd: list[str], tmp_path: Path, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    if check and out.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr[-3000:]}")
    return out


def _worker(tmp_path: Path, mode: str, strategy: str, out: Path, nproc: int) -> None:
    args = [str(WORKER), mode, strategy, str(out)]
    _run((_torchrun(nproc) if nproc > 1 else [sys.executable]) + args, tmp_path)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_step_on_two_ranks_equals_one_process(tmp_path, strategy):
    _worker(tmp_path, "stage1_step", "none", tmp_path / "one", 1)
    _worker(tmp_path, "stage1_step", strategy, tmp_path / "two", 2)
    one, two = (json.loads((tmp_path / d / "stats.json").read_text()) for d in ("one", "two"))
    assert one.keys() == two.keys() and {"fake_loss", "gen_loss", "gen_grad_norm"} <= one.keys()
    for k in one:
        assert two[k] == pytest.approx(one[k], rel=2e-5, abs=1e-7), k
    w1, w2 = (load_file(str(tmp_path / d / "weights.safetensors")) for d in ("one", "two"))
    assert w1.keys() == w2.keys()
    # Adam's first step moves a weight by about lr * sign(g): where |g| is at rounding level (the two runs sum the
    # batch in different orders) an element may move differently, by at most the learning rate (1e-4 / 3e-4 here).
    # Everything else must agree to float32 rounding, and such elements must stay rare.
    changed, off, total = 0, 0, 0
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=3e-4, msg=k)
        off += int((~torch.isclose(w2[k], w1[k], rtol=1e-5, atol=1e-6)).sum())
        total += w1[k].numel()
        changed += k.startswith("generator.") and not torch.equal(w1[k], w1[k.replace("generator.", "ema.", 1)])
    assert off <= 1e-3 * total, f"{off} of {total} weights differ beyond rounding"
    assert changed > 0


def test_advantages_over_ranks_equal_one_process(tmp_path):
    _worker(tmp_path, "stage2_advantages", "none", tmp_path / "one", 1)
    _worker(tmp_path, "stage2_advantages", "ddp", tmp_path / "two", 2)
    a1, a2 = (load_file(str(tmp_path / d / "advantages.safetensors")) for d in ("one", "two"))
    assert torch.equal(a2["index"], torch.arange(a1["rewards"].shape[0]))  # rank blocks in global order
    torch.testing.assert_close(a2["rewards"], a1["rewards"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a2["advantages"], a1["advantages"], rtol=1e-4, atol=1e-5)
    prompts = json.loads((tmp_path / "two" / "prompts.json").read_text())
    half = len(prompts) // 2
    # the K-repeat order spreads a prompt's group over both ranks, each prompt exactly K times
    assert all(prompts.count(p) == 4 for p in set(prompts))
    assert set(prompts[:half]) & set(prompts[half:])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_cli_both_stages_and_resume(tmp_path, strategy):
    run = tmp_path / "run"
    sets = [a for kv in [*TINY, f"distributed.strategy={strategy}"] for a in ("--set", kv)]
    _run(_torchrun(2) + ["-m", "rtdmd.train", "--out", str(run), *sets], tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert {"teacher", "base_4step", "ac_dmd", "rtdmd"} <= set(summary["eval"])
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in lines} >= {"ac_dmd", "rtdmd"}  # one writer: rank 0
    assert len([r for r in lines if r["stage"] == "eval" and r.get("row") == "ac_dmd"]) == 1
    state = json.loads(next((run / "checkpoints").glob("stage2-epoch-2")).joinpath("state.json").read_text())
    assert state["world_size"] == 2
    # resuming on another world size is refused in one line; on the same one it continues
    bad = _run([sys.executable, "-m", "rtdmd.train", "--resume", str(run), "--set", "stage2.steps=3"], tmp_path,
               check=False)
    assert bad.returncode == 2 and "resume it with the same number" in bad.stderr.strip().splitlines()[-1]
    _run(_torchrun(2) + ["-m", "rtdmd.train", "--resume", str(run), "--set", "stage2.steps=3"], tmp_path)
    assert (run / "checkpoints" / "stage2-epoch-3").is_dir()


def test_several_processes_need_a_strategy(tmp_path):
    out = _run(_torchrun(2) + ["-m", "rtdmd.train", "--out", str(tmp_path / "run"),
                               *[a for kv in TINY for a in ("--set", kv)]], tmp_path, check=False)
    assert out.returncode != 0 and "set it to ddp or fsdp" in out.stderr


@pytest.mark.parametrize("kind", ["sd3", "flux2"])
def test_real_backbone_under_fsdp(tmp_path, kind):
    """A tiny SD3 / FLUX.2-klein pipeline through both stages on 2 ranks with FSDP2 sharding the shared base (and
    its LoRA adapters): the run finishes, exports the diffusers LoRAs and logs from rank 0 only."""
    from test_diffusion_backbones import PROMPTS, tiny_config
    from tiny_pipelines import build_tiny_flux2_klein, build_tiny_sd3

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    folders = {"prompts": prompts}
    if kind == "sd3":
        folders["sd3"] = build_tiny_sd3(tmp_path / "sd3")
    else:
        folders["flux2"] = build_tiny_flux2_klein(tmp_path / "base", variant="base")
        folders["klein"] = build_tiny_flux2_klein(tmp_path / "klein", variant="klein")
    config = tiny_config(folders, kind, tmp_path, {"stage1": {"batch_size": 4}})
    run = tmp_path / "run"
    env_path = str(Path(__file__).parent)  # the plug-in rewards live in the test module
    cmd = _torchrun(2) + ["-m", "rtdmd.train", "--config", str(config), "--out", str(run),
                          "--set", "distributed.strategy=fsdp"]
    out = subprocess.run(cmd, env={**_env(tmp_path), "PYTHONPATH": os.pathsep.join([env_path, str(ROOT)])},
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in ("stage1", "stage2"):
        assert (run / "lora" / stage / "pytorch_lora_weights.safetensors").is_file()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["stage"] == "ac_dmd"] == [0, 1]  # one writer
