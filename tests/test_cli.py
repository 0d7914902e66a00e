"""The command line (docs/training.md §1): run folder, summary, resume, sampling, and one-line exit-2 errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import rtdmd_kernels as rk
from rtdmd import sample as sample_cli
from rtdmd import train as train_cli
from rtdmd.cli import run_cli
from rtdmd.evaluate import ROW_KEYS

# Small but real: every part runs, in seconds.
FAST = ["--set", "toy.n_eval=64", "--set", "toy.base_steps=30", "--set", "toy.base_batch_size=32",
        "--set", "log.interval=10", "--set", "log.progress=false", "--set", "stage1.steps=4",
        "--set", "stage1.batch_size=8", "--set", "stage1.fake_update_ratio=2", "--set", "stage1.checkpoint_every=2",
        "--set", "stage2.steps=2", "--set", "stage2.group_size=2", "--set", "stage2.num_batches=2"]


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("RTDMD_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with rk.use_backend("torch"):
        yield


def train(*argv):
    return run_cli("python -m rtdmd.train", train_cli.main, list(argv))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    os.environ["RTDMD_CACHE"] = str(out.parent / "cache")
    try:
        with rk.use_backend("torch"):
            assert train("--out", str(out), *FAST) == 0
    finally:
        os.environ.pop("RTDMD_CACHE")
    return out


def test_train_writes_the_run_folder(finished_run):
    run = finished_run
    assert (run / "config.yaml").is_file() and (run / "samples.png").stat().st_size > 10_000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["preset"] == "toy"
    assert set(summary["eval"]) == {"teacher", "base_4step", "ac_dmd", "rtdmd"}
    assert summary["seconds"]["ac_dmd"] > 0 and summary["seconds"]["rtdmd"] > 0 and summary["stage"] == "all"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["stage1-step-2", "stage1-step-4",
                                                                        "stage2-epoch-2"]
    for row in summary["eval"].values():
        assert set(ROW_KEYS) <= set(row) and all(np.isfinite(list(row.values())))
    # the base at 30 steps is far from the teacher: its distance is above the floor
    assert summary["eval"]["base_4step"]["fd_teacher"] > summary["eval"]["teacher"]["fd_teacher"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("stage" in x and "step" in x for x in lines)
    assert {x["stage"] for x in lines} == {"base", "eval", "ac_dmd", "rtdmd"}
    assert [x["step"] for x in lines if x["stage"] == "ac_dmd"] == [0, 3]


def test_resume_keeps_rows_and_base_is_cached(finished_run, capsys):
    before = json.loads((finished_run / "summary.json").read_text())["eval"]
    os.environ["RTDMD_CACHE"] = str(finished_run.parent / "cache")
    try:
        assert train("--resume", str(finished_run)) == 0
    finally:
        os.environ.pop("RTDMD_CACHE")
    assert json.loads((finished_run / "summary.json").read_text())["eval"] == before
    base_lines = [x for x in (finished_run / "metrics.jsonl").read_text().splitlines() if '"base"' in x]
    assert len(base_lines) == 4  # steps 0, 10, 20, 29 of the first run only: the resume loaded the cache
    assert "base_4step" in capsys.readouterr().out


def test_stage2_from_init(finished_run, tmp_path):
    os.environ["RTDMD_CACHE"] = str(finished_run.parent / "cache")
    try:
        out = tmp_path / "control"
        assert train("--stage", "rtdmd", "--init", str(finished_run), "--out", str(out), *FAST,
                     "--set", "stage2.aux_weight=0") == 0
    finally:
        os.environ.pop("RTDMD_CACHE")
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["eval"]) == {"teacher", "base_4step", "rtdmd"} and summary["stage"] == "rtdmd"
    # the run holds its own copy of the stage-1 result it started from
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["stage1-step-4", "stage2-epoch-2"]


def test_sample_cli(finished_run, tmp_path):
    os.environ["RTDMD_CACHE"] = str(finished_run.parent / "cache")
    try:
        rc = run_cli("python -m rtdmd.sample", sample_cli.main,
                     ["--run", str(finished_run), "--num", "8", "--prompt", "toy prompt 2",
                      "--out", str(tmp_path / "s")])
    finally:
        os.environ.pop("RTDMD_CACHE")
    assert rc == 0
    data = np.load(tmp_path / "s" / "samples.npz")
    assert data["samples"].shape == (8, 4, 8, 8) and list(data["prompts"]) == ["toy prompt 2"] * 8
    assert np.isfinite(data["samples"]).all()
    assert (tmp_path / "s" / "samples.png").is_file()


@pytest.mark.parametrize("argv, needle", [
    (["--set", "toy.bogus=1"], "toy.bogus"),
    (["--set", "toy.n_eval=abc"], "toy.n_eval"),
    (["--set", "schedule.eta=1.5"], "schedule.eta"),
    (["--set", "noequals"], "noequals"),
    (["--preset", "nope"], "nope"),
    (["--config", "missing.yaml"], "missing.yaml"),
    (["--stage", "rtdmd"], "--init"),
    (["--stage", "rtdmd", "--init", "no_such_dir"], "no_such_dir"),
    (["--stage", "ac_dmd", "--init", "."], "--init"),
    (["--resume", "no_such_dir"], "no_such_dir"),
    (["--seed", "-1"], "--seed"),
    (["--stage", "bogus"], "--stage"),
    (["--set", "model.kind=sd3"], "model.path"),
    (["--set", "model.lora_rank=4"], "model.lora_rank"),
    (["--set", "distributed.strategy=mpi"], "distributed.strategy"),
])
def test_bad_input_exits_2_with_one_line(argv, needle, capsys, tmp_path):
    assert train(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing half-made is left behind


def test_out_must_not_hold_a_run(finished_run, capsys):
    assert train("--out", str(finished_run), *FAST) == 2
    assert "--resume" in capsys.readouterr().err


def test_sample_errors(finished_run, capsys):
    for argv, needle in [(["--run", "nowhere"], "nowhere"), (["--run", str(finished_run), "--num", "0"], "--num"),
                         (["--run", str(finished_run), "--prompt", "a cat"], "a cat")]:
        assert run_cli("python -m rtdmd.sample", sample_cli.main, argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and needle in err


@pytest.mark.slow
def test_python_m_rtdmd_train_subprocess(tmp_path):
    """The real entry point in a fresh process (no interpreter: the CLI's own backend choice)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["RTDMD_CACHE"] = str(tmp_path / "cache")
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "rtdmd.train", "--out", str(out), *FAST], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "teacher" in res.stdout and "base_4step" in res.stdout
    assert Path(out / "summary.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "rtdmd.train", "--set", "toy.nope=1"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
