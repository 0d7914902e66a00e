"""Checkpoints: safetensors round trips, optimizer resume bit-exactness, RNG, listing and crash safety."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rtdmd import checkpoint as ck


class Tied(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4, dtype=dtype)
        self.lin = nn.Linear(4, 3, dtype=dtype)
        self.out = nn.Linear(4, 7, bias=False, dtype=dtype)
        self.out.weight = self.emb.weight  # tied: shares storage with emb.weight
        self.register_buffer("count", torch.tensor(5, dtype=torch.int64))


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_safetensors_round_trip_tied_and_views(tmp_path: Path, dtype: torch.dtype) -> None:
    sd = Tied(dtype).state_dict()
    base = torch.arange(24, dtype=torch.float32).to(dtype).reshape(4, 6)
    sd["transposed"] = base.t()  # non-contiguous
    sd["slice"] = base[1:3]  # contiguous view of a bigger storage
    sd["scalar"] = torch.tensor(1.5, dtype=dtype)
    path = tmp_path / "m.safetensors"
    ck.save_safetensors(sd, path, {"k": "v"})
    out = ck.load_safetensors(path)
    assert set(out) == set(sd)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape and torch.equal(out[k], v), k
    assert not list(tmp_path.glob("*.tmp-*"))
    model = Tied(dtype)
    model.load_state_dict({k: out[k] for k in model.state_dict()})
    assert model.out.weight is model.emb.weight  # loading keeps the tie


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
    ],
    ids=["adamw", "sgd"],
)
def test_optimizer_resume_is_bitwise(tmp_path: Path, make_opt) -> None:
    model = _net(0)
    opt = make_opt(model.parameters())
    _train(model, opt, 3, seed=1)
    path = ck.save_checkpoint(
        tmp_path / "c", modules={"generator": model.state_dict()}, optimizers={"generator": opt.state_dict()}
    )
    loaded = ck.load_checkpoint(path)
    model2 = _net(123)
    opt2 = make_opt(model2.parameters())
    model2.load_state_dict(loaded.modules["generator"])
    opt2.load_state_dict(loaded.optimizers["generator"])
    assert opt2.param_groups[0].keys() == opt.param_groups[0].keys()
    for key in ("betas", "momentum", "nesterov", "lr"):
        if key in opt.param_groups[0]:
            assert opt2.param_groups[0][key] == opt.param_groups[0][key]
            assert type(opt2.param_groups[0][key]) is type(opt.param_groups[0][key])
    _train(model, opt, 3, seed=2)
    _train(model2, opt2, 3, seed=2)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_optimizer_scalars_survive(tmp_path: Path) -> None:
    sd = {
        "state": {0: {"step": 3.0, "exp_avg": torch.ones(2)}, 1: {"step": torch.tensor(4.0), "n": 7, "f": None}},
        "param_groups": [{"params": [0, 1], "lr": torch.tensor(0.5), "betas": (0.9, 0.99), "foreach": None}],
    }
    out = ck.load_checkpoint(ck.save_checkpoint(tmp_path / "c", optimizers={"opt": sd})).optimizers["opt"]
    s0, s1 = out["state"][0], out["state"][1]
    assert type(s0["step"]) is float and s0["step"] == 3.0 and torch.equal(s0["exp_avg"], torch.ones(2))
    assert s1["step"].dim() == 0 and s1["step"].item() == 4.0 and s1["n"] == 7 and s1["f"] is None
    group = out["param_groups"][0]
    assert group["params"] == [0, 1] and group["betas"] == (0.9, 0.99) and group["foreach"] is None
    assert torch.equal(group["lr"], torch.tensor(0.5))


def test_state_json_and_rng_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = {"step": 12, "config_hash": "abc", "nested": {"x": [1.5, None]}, "rng": ck.rng_state()}
    path = ck.save_checkpoint(tmp_path / "c", state=state)
    before = (torch.rand(5), np.random.rand(5), np.random.standard_normal(), [random.random() for _ in range(3)])
    loaded = ck.load_checkpoint(path)
    assert loaded.state == json.loads(json.dumps(state)) and loaded.path == path
    assert loaded.modules == {} and loaded.optimizers == {}
    ck.set_rng_state(loaded.state["rng"])
    after = (torch.rand(5), np.random.rand(5), np.random.standard_normal(), [random.random() for _ in range(3)])
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    assert before[2] == after[2] and before[3] == after[3]


def test_listing_ordering_latest_and_incomplete(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    assert ck.list_checkpoints(tmp_path) == [] and ck.latest_checkpoint(tmp_path) is None
    for stage, idx in [(2, 1), (1, 10), (1, 9), (2, 0)]:
        ck.save_checkpoint(root / ck.checkpoint_name(stage, idx), state={"i": idx})
    (root / "stage1-step-11.tmp-999").mkdir()  # stale partial write
    (root / "stage1-step-11.tmp-999" / "state.json").write_text("{}")
    (root / "stage1-step-12").mkdir()  # no state.json
    (root / "notes").mkdir()
    names = [p.name for p in ck.list_checkpoints(tmp_path)]
    assert names == ["stage1-step-9", "stage1-step-10", "stage2-epoch-0", "stage2-epoch-1"]
    assert ck.latest_checkpoint(tmp_path) == root / "stage2-epoch-1"
    assert ck.latest_checkpoint(tmp_path, stage=1) == root / "stage1-step-10"
    with pytest.raises(FileNotFoundError, match="stage1-step-12"):
        ck.load_checkpoint(root / "stage1-step-12")
    with pytest.raises(FileNotFoundError, match="nope"):
        ck.load_checkpoint(tmp_path / "nope")
    with pytest.raises(ValueError, match="stage"):
        ck.checkpoint_name(3, 1)


def test_overwrite_replaces(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "stage1-step-5"
    ck.save_checkpoint(path, modules={"a": {"w": torch.zeros(2)}, "b": {"w": torch.zeros(1)}}, state={"v": 1})
    ck.save_checkpoint(path, modules={"a": {"w": torch.ones(2)}}, state={"v": 2})
    loaded = ck.load_checkpoint(path)
    assert loaded.state == {"v": 2} and set(loaded.modules) == {"a"}
    assert torch.equal(loaded.modules["a"]["w"], torch.ones(2))
    assert sorted(p.name for p in path.parent.iterdir()) == ["stage1-step-5"]


def test_crash_on_final_rename_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoints" / "stage1-step-5"
    ck.save_checkpoint(path, modules={"a": {"w": torch.zeros(2)}}, state={"v": 1})
    real_replace = os.replace
    tmp_name = f"{path.name}.tmp-{os.getpid()}"

    def crashing_replace(src, dst):
        if Path(src).name == tmp_name and Path(dst) == path:
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        ck.save_checkpoint(path, modules={"a": {"w": torch.ones(2)}}, state={"v": 2})
    monkeypatch.undo()
    assert ck.list_checkpoints(tmp_path) == [path]
    loaded = ck.load_checkpoint(path)
    assert loaded.state == {"v": 1} and torch.equal(loaded.modules["a"]["w"], torch.zeros(2))
    assert [p.name for p in path.parent.iterdir()] == ["stage1-step-5"]


def test_crash_on_first_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoints" / "stage2-epoch-1"

    def crashing_replace(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(OSError):
        ck.save_checkpoint(path, modules={"a": {"w": torch.ones(2)}}, state={"v": 1})
    monkeypatch.undo()
    assert ck.list_checkpoints(tmp_path) == [] and list(path.parent.iterdir()) == []


def test_prune_keeps_newest_per_stage(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for stage, idx in [(1, 1), (1, 2), (1, 10), (2, 1), (2, 2)]:
        ck.save_checkpoint(root / ck.checkpoint_name(stage, idx), state={})
    deleted = ck.prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in deleted) == ["stage1-step-1", "stage1-step-2", "stage2-epoch-1"]
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["stage1-step-10", "stage2-epoch-2"]
    assert sorted(p.name for p in root.iterdir()) == ["stage1-step-10", "stage2-epoch-2"]
    with pytest.raises(ValueError, match="keep"):
        ck.prune_checkpoints(tmp_path, keep=0)
