"""The pieces of the real-model evaluation: the reward table's mean and standard error, the printed table and the
image grid. The CLI, the periodic stage-2 evaluation and TensorBoard run end to end in tests/test_pipeline.py."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import rtdmd_kernels as rk
from rtdmd.evaluate.images import format_reward_table, image_grid, reward_table


@pytest.fixture(autouse=True)
def _torch_backend():
    with rk.use_backend("torch"):
        yield


def test_reward_table_mean_and_standard_error():
    scores = torch.tensor([[1.0, 10.0], [3.0, 10.0], [5.0, 10.0]])
    t = reward_table(scores, ["a", "b"])
    assert t == pytest.approx({"a": 3.0, "a_stderr": 2.0 / 3 ** 0.5, "b": 10.0, "b_stderr": 0.0})
    assert reward_table(torch.tensor([[2.0]]), ["a"])["a_stderr"] == 0.0
    assert "3.0000 ± 1.1547" in format_reward_table({"base": t}, ["a", "b"])


def test_image_grid_rows_columns_and_labels(tmp_path):
    rows = {"base": torch.zeros(10, 3, 16, 16), "stage2": torch.ones(10, 3, 16, 16)}
    grid = Image.open(image_grid(rows, tmp_path / "g.png", max_columns=4))
    label = grid.size[0] - 4 * 16
    assert grid.size == (label + 4 * 16, 2 * 16) and label > 0
    assert grid.getpixel((label + 1, 1)) == (0, 0, 0) and grid.getpixel((label + 1, 17)) == (255, 255, 255)
