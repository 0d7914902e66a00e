"""A trained run as the stock diffusers pipeline (``rtdmd.pipeline.load``), every preset's two stages on a tiny
folder of its architecture, and the README's real-model commands and snippet run as printed on tiny random folders
— paths substituted, and the run shrunk (a 15000-step SD3.5-M run does not fit a test) by ``--set`` keys appended to
the printed command; the same run checks the periodic evaluation, TensorBoard and ``python -m rtdmd.evaluate``."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_diffusion_backbones import folders, tiny_config  # noqa: F401  (folders: the tiny pipelines fixture)
from tiny_clip import save_tiny_clip, tiny_hps_model, to_open_clip_state_dict

import rtdmd.pipeline
import rtdmd_kernels as rk
from rtdmd.cli import run_cli
from rtdmd.evaluate.__main__ import main as evaluate_main
from rtdmd.sample import main as sample_main
from rtdmd.train import main as train_main

README = Path(__file__).resolve().parents[1] / "README.md"
SHRINK = ["--device", "cpu", "--set", "model.dtype=float32", "--set", "model.resolution=64",
          "--set", "model.lora_rank=4", "--set", "model.lora_alpha=8", "--set", "stage1.steps=1",
          "--set", "stage1.batch_size=2", "--set", "stage1.fake_update_ratio=1", "--set", "stage2.steps=1",
          "--set", "stage2.group_size=2", "--set", "stage2.prompts_per_epoch=2", "--set", "stage2.sampling_batches=2",
          "--set", "stage2.num_batches=2",
          "--set", "stage2.sample_batch_size=2", "--set", "stage2.fake_batch_size=2", "--set", "stage2.bp_batch_size=1",
          "--set", "log.progress=false", "--set", "distributed.strategy=none"]


@pytest.fixture(autouse=True)
def _torch_backend():
    with rk.use_backend("torch"):
        yield


def readme_block(lang: str, needle: str) -> str:
    blocks = re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    return next(b for b in blocks if needle in b)


def readme_commands(needle: str) -> list[list[str]]:
    """The shell commands of the README block containing ``needle``, continuation lines joined, comments off."""
    text = readme_block("bash", needle).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.strip()]


def png_stack(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])


def test_readme_real_model_commands_and_snippet_run_as_printed(folders, tmp_path, monkeypatch, capsys):  # noqa: F811
    tb = importlib.util.find_spec("tensorboard") is not None  # the test extra installs it
    models = tmp_path / "models"
    clip = save_tiny_clip(models / "clip")
    hps = models / "hps.pt"
    torch.save({"state_dict": to_open_clip_state_dict(tiny_hps_model(seed=5), prefix="module.")}, hps)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "train.txt").write_text("a red cube\nthe blue sphere\na cat on a mat\ngreen grass\n")
    paths = {"/models/stable-diffusion-3.5-medium": str(folders["sd3"]), "/models/clip-vit-large-patch14": str(clip),
             "/models/PickScore_v1": str(clip), "/models/CLIP-ViT-H-14-laion2B-s32B-b79K": str(clip),
             "/models/HPS_v2.1_compressed.pt": str(hps)}
    monkeypatch.chdir(tmp_path)  # runs/sd35m and prompts/train.txt are relative, as printed
    (tmp_path / "prompts" / "eval.txt").write_text("a red fox in the snow\ngreen grass\n")
    train_cmd, sample_cmd, evaluate_cmd = readme_commands("--preset sd35m")
    assert train_cmd[:3] == ["python", "-m", "rtdmd.train"] and sample_cmd[:3] == ["python", "-m", "rtdmd.sample"]
    assert evaluate_cmd[:3] == ["python", "-m", "rtdmd.evaluate"]

    def substituted(cmd):
        return [re.sub("|".join(map(re.escape, paths)), lambda m: paths[m.group(0)], a) for a in cmd[3:]]

    # beyond the shrink: the periodic stage-2 evaluation and TensorBoard scalars, checked on the same run
    periodic = ["--set", "stage2.steps=2", "--set", "stage2.eval_every=1", "--set", "eval.num_images=3",
                "--set", "data.eval_prompts=prompts/eval.txt", "--set", f"log.tensorboard={tb}"]
    assert run_cli("python -m rtdmd.train", train_main, substituted(train_cmd) + SHRINK + periodic) == 0, \
        capsys.readouterr().err
    run = tmp_path / "runs" / "sd35m"
    for stage in ("stage1", "stage2"):
        assert (run / "lora" / stage / "pytorch_lora_weights.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["seconds"]) >= {"ac_dmd", "rtdmd"}
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in lines} >= {"ac_dmd", "rtdmd", "eval"}
    evals = [r for r in lines if r["stage"] == "eval"]
    assert [e["step"] for e in evals] == [0, 1] and {"clipscore", "clipscore_stderr", "hpsv2"} <= set(evals[0])
    assert Image.open(run / "eval" / "stage2-epoch-1.png").size[1] == 64  # one row: the EMA generator
    assert bool(list((run / "tensorboard").glob("events.out.tfevents.*"))) == tb

    assert run_cli("python -m rtdmd.sample", sample_main, substituted(sample_cmd)) == 0, capsys.readouterr().err
    sampled = png_stack(run / "samples")
    assert sampled.shape == (4, 64, 64, 3)
    capsys.readouterr()
    assert run_cli("python -m rtdmd.evaluate", evaluate_main, substituted(evaluate_cmd)) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert all(row in printed for row in ("base", "stage1", "stage2")) and "±" in printed
    rows = json.loads((run / "summary.json").read_text())["eval"]
    assert set(rows) >= {"images/base", "images/stage1", "images/stage2"}
    assert rows["images/stage2"]["clipscore_stderr"] >= 0 and rows["images/base"] != rows["images/stage2"]
    assert Image.open(run / "eval" / "grid.png").size[1] == 3 * 64  # one row per model

    snippet = readme_block("python", "rtdmd.pipeline.load")
    snippet = snippet.replace('"cuda"', '"cpu"').replace("torch.bfloat16", "torch.float32")  # this machine
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    pipe, image = scope["pipe"], scope["image"]
    assert image.size == (64, 64)
    again = pipe("a red fox in the snow", generator=torch.Generator("cpu").manual_seed(0)).images[0]
    other = pipe("a red fox in the snow", generator=torch.Generator("cpu").manual_seed(1)).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(again)), "generator= must make the CPS output reproducible"
    assert not np.array_equal(np.asarray(image), np.asarray(other))
    ours = pipe.sample(["a red fox in the snow"], seed=0, num=4)  # rtdmd.sample's defaults: the run's seed 0
    ours = (ours.float().permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    assert np.abs(ours.astype(int) - sampled.astype(int)).max() <= 1


def test_load_refuses_what_is_not_a_trained_real_run(tmp_path):
    from rtdmd.config import ConfigError

    with pytest.raises(ConfigError, match="not a run folder"):
        rtdmd.pipeline.load(tmp_path)


@pytest.mark.parametrize("preset", ["sd3m", "flux1_dev", "flux2_4b", "flux2_9b"])
def test_every_reference_backbone_trains_both_stages_and_round_trips(folders, tmp_path, capsys, preset):  # noqa: F811
    """The presets of the reference's other backbones, on a tiny random folder of their architecture: both stages
    through the CLI, then the stock pipeline with the exported LoRA reproduces rtdmd.sample's images."""
    config = tiny_config(folders, "", tmp_path, {"stage1": {"steps": 1}}, preset=preset)
    run = tmp_path / "run"
    assert run_cli("prog", train_main, ["--config", str(config), "--out", str(run)]) == 0, capsys.readouterr().err
    assert run_cli("prog", sample_main, ["--run", str(run), "--prompt", "a red cube", "--num", "2"]) == 0
    pipe = rtdmd.pipeline.load(run, device="cpu", dtype=torch.float32)
    assert pipe.lora.name == "stage2" and pipe.defaults["max_sequence_length"] == (128 if preset == "sd3m" else 512)
    ours = pipe.sample(["a red cube"], seed=0, num=2)
    ours = (ours.float().permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    assert np.abs(ours.astype(int) - png_stack(run / "samples").astype(int)).max() <= 1
