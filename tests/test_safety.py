"""Runs that nothing can silently corrupt (docs/training.md §1.3, §3.2–§3.4): finite-only steps, verified
checkpoints with fallback, one writer per run, config changes on resume, and every user error up front in one
line. Each test reproduces a way a hostile input or accident used to corrupt or crash a run."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli import FAST, _env, train  # noqa: F401  (_env: the CLI tests' autouse fixture)
from test_stage2 import make

from rtdmd import checkpoint as ck
from rtdmd import sample as sample_cli
from rtdmd.cli import run_cli
from rtdmd.config import ConfigError, load_config
from rtdmd.data import load_prompts
from rtdmd.distributed import DistEnv
from rtdmd.rewards.toy import LinearReward
from rtdmd.run import RunFolder
from rtdmd.stages.common import NonFiniteStep, StepGuard

CPU = torch.device("cpu")
STAGE1 = ["--stage", "ac_dmd", *FAST]


def sample(*argv):
    return run_cli("python -m rtdmd.sample", sample_cli.main, list(argv))


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.fixture
def stage1_run(tmp_path):
    """A finished stage-1 toy run with checkpoints stage1-step-2 and stage1-step-4."""
    out = tmp_path / "r"
    assert train("--out", str(out), *STAGE1) == 0
    assert [p.name for p in ck.list_checkpoints(out)] == ["stage1-step-2", "stage1-step-4"]
    return out


# ---------------------------------------------------------------- 1. finite or nothing


class NaNGradient(torch.autograd.Function):
    """The identity whose gradient is NaN: a reward plug-in with finite scores and a broken backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _nan_gradient_reward(monkeypatch):
    score = LinearReward.score
    monkeypatch.setattr(LinearReward, "score", lambda self, x, p: score(self, NaNGradient.apply(x), p))


def _step(model, opt, guard, index, scale=1.0):
    loss = model(torch.ones(4, 3)).square().mean() * scale
    loss.backward()
    return guard.step(model, opt, 1.0, index, {"loss": loss.detach()}, "grad_norm")


@pytest.mark.parametrize("first", [True, False], ids=["first-step", "later-step"])
def test_skip_undoes_a_nonfinite_step_exactly(first):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    guard = StepGuard("stage 1 (ac_dmd)", "step", "skip", DistEnv())
    if not first:
        _step(model, opt, guard, 0)
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    _step(model, opt, guard, 1, scale=float("nan"))
    assert int(guard.skipped) == 1 and guard.stats()["skipped_steps"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[0][k])
    if first:  # the undone first step leaves zero state: the next step is the first real one
        twin = torch.nn.Linear(3, 2)
        twin.load_state_dict(before[0])
        twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
        _step(twin, twin_opt, StepGuard("s", "step", "skip", DistEnv()), 0)
        _step(model, opt, guard, 2)
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            assert torch.equal(a, b)
    else:
        for p, st in opt.state_dict()["state"].items():
            for k, v in st.items():
                assert torch.equal(v, before[1]["state"][p][k]), k
    guard.check()  # skip never stops


def test_stop_names_the_stage_step_and_term():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    guard = StepGuard("stage 1 (ac_dmd)", "step", "stop", DistEnv())
    _step(model, opt, guard, 0)
    guard.check()
    _step(model, opt, guard, 7, scale=float("inf"))
    _step(model, opt, guard, 8, scale=float("nan"))  # the first bad step is the one reported
    with pytest.raises(NonFiniteStep, match=r"^stage 1 \(ac_dmd\) step 7: loss not finite; stopped.*stage1-step-0"):
        guard.check("stage1-step-0")


def test_nan_gradient_of_a_reward_stops_stage2_before_any_save(tmp_path, monkeypatch):
    cfg, world, state, stage = make(tmp_path)
    _nan_gradient_reward(monkeypatch)
    with pytest.raises(NonFiniteStep, match=r"stage 2 \(rtdmd\) epoch 0: the gradient is not finite \(gen_grad_norm"):
        stage.run(run_dir=tmp_path / "r2", stop_at=2)
    assert ck.list_checkpoints(tmp_path / "r2") == []


def test_nan_gradient_of_a_reward_is_skipped_and_counted(tmp_path, monkeypatch):
    cfg, world, state, stage = make(tmp_path, ["nonfinite=skip", "stage2.checkpoint_every=1"])
    start = copy.deepcopy(state.generator.state_dict())
    _nan_gradient_reward(monkeypatch)
    logs = []
    stage.run(run_dir=tmp_path / "r2", stop_at=2, log_fn=logs.append)
    assert int(stage.guard.skipped) == 2 and logs[-1]["skipped_steps"] == 2
    for k, v in state.generator.state_dict().items():  # every generator step was undone
        assert torch.equal(v, start[k]), k
    loaded = ck.load_checkpoint(tmp_path / "r2" / "checkpoints" / "stage2-epoch-2")  # finite, verified
    assert set(loaded.modules) == {"generator", "generator_ema", "fake_score"}


def test_a_nonfinite_checkpoint_is_never_written(tmp_path):
    sd = {"w": torch.tensor([1.0, float("nan")])}
    with pytest.raises(ck.CheckpointError, match=r"refusing to save c: non-finite values in generator.w \(1 of 2\)"):
        ck.save_checkpoint(tmp_path / "c", modules={"generator": sd})
    assert not (tmp_path / "c").exists() and not list(tmp_path.iterdir())


# ---------------------------------------------------------------- 2. verified checkpoints


def _ckpt(root: Path, name: str, value: float = 1.0) -> Path:
    model = torch.nn.Linear(64, 64)
    torch.nn.init.constant_(model.weight, value)
    return ck.save_checkpoint(root / "checkpoints" / name, modules={"generator": model.state_dict()},
                              state={"step": 1})


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("damage, why", [
    (lambda c: _overwrite(c / "generator.safetensors", 200, b"\x7f" * 4096), "changed since it was written"),
    (lambda c: os.truncate(c / "generator.safetensors", 300), "has 300 bytes"),
    (lambda c: (c / "generator.safetensors").unlink(), "generator.safetensors is missing"),
    (lambda c: (c / "state.json").write_text("{not json"), "state.json"),
    (lambda c: (c / "manifest.json").write_text("[]"), "unreadable manifest.json"),
])
def test_damaged_checkpoints_do_not_verify_and_the_previous_one_is_used(tmp_path, damage, why):
    _ckpt(tmp_path, "stage1-step-1", 1.0)
    damage(_ckpt(tmp_path, "stage1-step-2", 2.0))
    with pytest.raises(ck.CheckpointError, match=why):
        ck.load_checkpoint(tmp_path / "checkpoints" / "stage1-step-2")
    skipped = []
    c = ck.load_latest(tmp_path, stage=1, on_skip=lambda p, reason: skipped.append((p.name, reason)))
    assert c.path.name == "stage1-step-1" and float(c.modules["generator"]["weight"][0, 0]) == 1.0
    assert skipped[0][0] == "stage1-step-2" and why in skipped[0][1]


def test_legacy_and_missing_keys_and_nothing_that_verifies(tmp_path):
    c = _ckpt(tmp_path, "stage1-step-1")
    (c / "manifest.json").unlink()  # written before manifests: still loads, and is still checked for finiteness
    assert ck.load_checkpoint(c).state == {"step": 1}
    with pytest.raises(ck.CheckpointError, match="state.json lacks epoch"):
        ck.load_checkpoint(c, require=("epoch",))
    sd = ck.load_safetensors(c / "generator.safetensors")
    sd["weight"][0, 0] = float("inf")
    ck.save_safetensors(sd, c / "generator.safetensors")
    with pytest.raises(ck.CheckpointError, match=r"no stage-1 checkpoint .* verifies: stage1-step-1: non-finite"):
        ck.load_latest(tmp_path, stage=1, on_skip=lambda *a: None)
    assert ck.load_latest(tmp_path / "empty") is None


def test_resume_and_sample_fall_back_from_a_corrupt_checkpoint(stage1_run, caplog, capsys):
    caplog.set_level(logging.INFO)
    _overwrite(stage1_run / "checkpoints" / "stage1-step-4" / "generator.safetensors", 1000, b"\x00" * 4096)
    assert sample("--run", str(stage1_run), "--num", "4") == 0
    assert "stage1-step-4: generator.safetensors changed since it was written" in caplog.text
    assert "with stage1-step-2/generator_ema" in caplog.text
    caplog.clear()
    assert train("--resume", str(stage1_run)) == 0
    assert "not resuming from stage1-step-4" in caplog.text and "resuming from stage1-step-2" in caplog.text
    assert ck.load_checkpoint(stage1_run / "checkpoints" / "stage1-step-4").state["step"] == 4  # rewritten, whole


def test_temporaries_and_a_torn_metrics_line_are_cleaned_on_resume(stage1_run):
    (stage1_run / "checkpoints" / "stage1-step-6.tmp-424242").mkdir()
    with open(stage1_run / "metrics.jsonl", "a") as f:
        f.write('{"stage": "ac_dmd", "st')
    assert train("--resume", str(stage1_run), "--set", "stage1.steps=6") == 0
    assert not list((stage1_run / "checkpoints").glob("*.tmp-*"))
    lines = (stage1_run / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(x) for x in lines) and any(json.loads(x).get("step") == 5 for x in lines)


# ---------------------------------------------------------------- 3. one writer per run


def test_a_second_writer_is_refused(stage1_run, capsys):
    holder = RunFolder(stage1_run)
    holder.lock()
    try:
        assert train("--resume", str(stage1_run)) == 2
        assert f"the run is being written by process {os.getpid()}" in error_line(capsys)
    finally:
        holder.unlock()
    assert train("--resume", str(stage1_run)) == 0  # free again once the holder is gone


def test_out_into_checkpoints_without_a_config_is_refused(stage1_run, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    shutil.copytree(stage1_run / "checkpoints", foreign / "checkpoints")
    assert train("--out", str(foreign), *STAGE1) == 2
    assert "holds checkpoints but no config.yaml" in error_line(capsys)
    assert not (foreign / "config.yaml").exists()


# ---------------------------------------------------------------- 4. resume and config


def test_resume_applies_and_records_a_changed_learning_rate(stage1_run):
    assert train("--resume", str(stage1_run), "--set", "stage1.steps=6", "--set", "stage1.generator_lr=5e-3") == 0
    text = (stage1_run / "config.yaml").read_text()
    assert "generator_lr: 0.005" in text
    assert "# --resume at stage1-step-4" in text and "stage1.generator_lr: 0.0001 -> 0.005" in text
    groups = ck.load_checkpoint(stage1_run / "checkpoints" / "stage1-step-6").optimizers["generator"]["param_groups"]
    assert {g["lr"] for g in groups} == {5e-3}


@pytest.mark.parametrize("key", ["toy.num_layers=3", "stage1.batch_size=16", "seed=3", "rewards.binary=null"])
def test_resume_refuses_keys_that_cannot_change(stage1_run, capsys, key):
    before = (stage1_run / "config.yaml").read_text()
    assert train("--resume", str(stage1_run), "--set", key) == 2
    assert f"{key.split('=')[0]} cannot change in the middle of a run" in error_line(capsys)
    assert (stage1_run / "config.yaml").read_text() == before


# ---------------------------------------------------------------- 5. user errors up front


@pytest.mark.parametrize("overrides, message", [
    (["rewards.lineer.weight=1"], "config key 'rewards.lineer': unknown toy reward"),
    (["rewards.binary.weight=1", "rewards.binary.backprop=true"], "the binary reward is not differentiable"),
    (["schedule.denoising_steps=[1000]"], "config key 'stage2.ppo_steps' must be 0 with one sampler step"),
    (["preset=../../escaped"], "config key 'preset' must be a plain name"),
    (["rewards.linear=null", "rewards.binary.weight=0"], "no reward with a weight or backprop=true"),
])
def test_user_errors_come_before_any_work(tmp_path, capsys, overrides, message):
    t0 = time.perf_counter()
    assert train("--out", str(tmp_path / "x"), *[a for o in overrides for a in ("--set", o)]) == 2
    assert message in error_line(capsys)
    assert time.perf_counter() - t0 < 20 and not (tmp_path / "x").exists() and not (tmp_path / "escaped").exists()


def test_set_null_removes_an_entry():
    assert list(load_config(overrides=["rewards.binary=null"]).rewards) == ["linear"]
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(overrides=["stage1=null"])


def test_a_prompt_file_that_is_not_utf8_is_named(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_bytes(b"a cat\n\xff\xfe a dog\n")
    with pytest.raises(ValueError, match=r"data.train_prompts: .*prompts.txt is not UTF-8 text \(byte 6"):
        load_prompts(p)


def test_a_model_folder_that_does_not_load_leaves_no_run_folder(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    (tmp_path / "p.txt").write_text("a cat\n")
    out = tmp_path / "run"
    args = ["--preset", "sd35m", "--stage", "ac_dmd", "--device", "cpu", "--out", str(out),
            "--set", f"model.path={tmp_path / 'model'}", "--set", f"data.train_prompts={tmp_path / 'p.txt'}",
            "--set", "rewards.clipscore=null", "--set", "rewards.hpsv2=null", "--set", "rewards.pickscore=null",
            "--set", "rewards.judge.function=math:fsum"]
    assert train(*args) == 2
    assert "model.path: cannot load" in error_line(capsys)
    assert not out.exists()


def test_sample_steps_out_of_range(stage1_run, capsys):
    assert sample("--run", str(stage1_run), "--steps", "5000") == 2
    assert error_line(capsys) == "python -m rtdmd.sample: error: --steps must be in [1, 1000] (one step per " \
                                 "distinct timestep at most), got 5000"


def test_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    def full(tensors, filename, metadata=None):
        raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr(ck, "save_file", full)
    assert train("--out", str(tmp_path / "r"), *STAGE1) == 1
    line = error_line(capsys)
    assert line.startswith("python -m rtdmd.train: error: No space left on device (") and ".safetensors" in line


def test_ctrl_c_exits_130_saying_how_to_resume(tmp_path):
    out = tmp_path / "r"
    env = {**os.environ, "RTDMD_KERNELS_BACKEND": "torch", "RTDMD_CACHE": str(tmp_path / "cache")}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen([sys.executable, "-m", "rtdmd.train", "--out", str(out), *STAGE1, "--set",
                             "stage1.steps=100000"], env=env, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "stage1-step-2").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("python -m rtdmd.train: interrupted: the newest checkpoint is stage1-step-")
    assert last.endswith(f"continue with: python -m rtdmd.train --resume {out}")
