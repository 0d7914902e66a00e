"""Stage 2, RTDMD on the toy world (docs/method.md §5-§8): SubGRPO pieces, one epoch, ratio/clip, advantages, resume,
and a short convergence test with the reward-hacking control."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stage_checks import assert_resume_equals_straight

import rtdmd_kernels as rk
from rtdmd import checkpoint as ck
from rtdmd import rng
from rtdmd.config import load_config
from rtdmd.distributed import DistEnv
from rtdmd.evaluate import ToyEvaluator, generate_samples
from rtdmd.models.toy import ExactTeacher, build_world, pretrain_base, stage_networks
from rtdmd.rewards import build_rewards
from rtdmd.stages import Stage1, Stage2, init_state
from rtdmd.stages.rtdmd import ppo_step_subset, prompt_shared_noise
from rtdmd_kernels import reference

CPU = torch.device("cpu")
ONE = DistEnv()  # one process on the CPU
SMALL = ["toy.num_layers=1", "toy.head_dim=16", "toy.base_steps=40", "toy.base_batch_size=32",
         "stage1.steps=4", "stage1.batch_size=8", "stage1.fake_update_ratio=2", "stage2.group_size=4",
         "stage2.num_batches=2", "stage2.fake_batch_size=8", "rewards.binary.weight=0.5"]


@pytest.fixture(autouse=True)
def _torch_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("RTDMD_CACHE", str(tmp_path / "cache"))
    with rk.use_backend("torch"):
        yield


def stage1_run(cfg, world, run_dir):
    base, _ = pretrain_base(world, cfg)
    s1 = init_state(1, *stage_networks(world, cfg.toy, base.state_dict(), base.state_dict()), cfg)
    Stage1(s1, ExactTeacher(world), world.prompts(), cfg, ONE).run(run_dir=run_dir)
    return base, ck.latest_checkpoint(run_dir, stage=1)


def make(tmp_path, overrides=()):
    cfg = load_config("toy", overrides=[*SMALL, *overrides])
    world = build_world(cfg)
    if not (tmp_path / "s1" / "checkpoints").exists():
        stage1_run(cfg, world, tmp_path / "s1")
    state = init_state(2, *stage2_networks(world, cfg, ck.latest_checkpoint(tmp_path / "s1", stage=1)), cfg)
    return cfg, world, state, Stage2(state, ExactTeacher(world), world.prompts(), build_rewards(cfg, world), cfg, ONE)


def stage2_networks(world, cfg, s1_path):
    """Stage 2 starts from stage 1's EMA generator and fake score."""
    c = ck.load_checkpoint(s1_path)
    return stage_networks(world, cfg.toy, c.modules["generator_ema"], c.modules["fake_score"])


def test_k_repeat_sampler_draws_each_sampling_batch_afresh():
    """The reference's K-repeat sampler: each sampling batch holds distinct prompts, K times each, drawn afresh,
    so a prompt can recur within an epoch (its group grows to 2K); prompts_per_epoch 0 runs every prompt once."""
    grown = 0
    for epoch in range(20):
        order = rng.k_repeat_epoch(0, epoch, 6, 3, prompts_per_epoch=4, sampling_batches=2)
        assert len(order) == 12 and order == rng.k_repeat_epoch(0, epoch, 6, 3, 4, 2)
        for half in (order[:6], order[6:]):
            assert len(set(half)) == 2 and all(half.count(p) == 3 for p in set(half))
        grown += max(order.count(p) for p in set(order)) == 6
    assert 0 < grown < 20
    every = rng.k_repeat_epoch(0, 1, 5, 4)
    assert sorted(every) == sorted(list(range(5)) * 4) and every != sorted(every)
    with pytest.raises(ValueError, match="only 6 prompts"):
        rng.k_repeat_epoch(0, 0, 6, 3, prompts_per_epoch=14, sampling_batches=2)
    with pytest.raises(ValueError, match="multiple"):
        rng.k_repeat_epoch(0, 0, 6, 3, prompts_per_epoch=5, sampling_batches=2)


def test_subgrpo_step_subsets_and_shared_noise():
    subsets = {tuple(ppo_step_subset(0, e, [0, 2], 2)) for e in range(60)}
    assert subsets == {(0, 1), (0, 2), (1, 2)}  # every pair occurs; the same on every rank (pure function)
    assert ppo_step_subset(3, 7, [0, 2], 2) == ppo_step_subset(3, 7, [0, 2], 2)
    a = prompt_shared_noise("toy prompt 1", 2, 5, (4, 8, 8))
    assert torch.equal(a, prompt_shared_noise("toy prompt 1", 2, 5, (4, 8, 8)))
    assert not torch.equal(a, prompt_shared_noise("toy prompt 2", 2, 5, (4, 8, 8)))
    assert not torch.equal(a, prompt_shared_noise("toy prompt 1", 1, 5, (4, 8, 8)))
    assert not torch.equal(a, prompt_shared_noise("toy prompt 1", 2, 6, (4, 8, 8)))


def test_one_epoch_ratio_one_and_advantages(tmp_path):
    cfg, world, s, loop = make(tmp_path)
    g0 = [p.detach().clone() for p in s.generator.parameters()]
    f0 = [p.detach().clone() for p in s.fake.parameters()]
    ppo = ppo_step_subset(cfg.seed, 0, cfg.stage2.ppo_step_range, cfg.stage2.ppo_steps)
    data = loop.collect(0, ppo)
    n = len(world.prompts()) * cfg.stage2.group_size
    assert data.latents.shape == (n, 4, 4, 8, 8) and data.rewards.shape == (n, 2)
    # the unselected stochastic step and the last step use the prompt-shared noise; the PPO steps do not
    a = 0
    b = next(i for i in range(1, n) if data.prompts[i] == data.prompts[a])  # the K-repeat order shuffles groups
    for j in range(4):
        same = torch.equal(data.noises[a, j], data.noises[b, j])
        assert same == (j not in ppo)
    assert sorted(data.prompts) == sorted(p for p in world.prompts() for _ in range(cfg.stage2.group_size))
    # advantages: the reference's numpy tracker in its weighted multi-reward mode
    adv = loop.advantages(data)
    expect = reference.rtdmd_weighted_advantages(data.rewards.numpy(), np.array(data.prompts), loop.rewards.weights
                                                 .numpy())
    assert np.allclose(adv.numpy(), expect, atol=1e-5)
    data.advantages = adv
    rows = loop.select_rows(adv, 0)
    assert sorted(rows.tolist()) == list(range(n))
    stats = loop.fake_update(data, 0)
    assert any(not torch.equal(a, b) for a, b in zip(f0, s.fake.parameters(), strict=True))
    stats = loop.policy_update(data, rows, ppo, 0)
    # an unchanged policy on its own rollout: the importance ratio is exactly 1 and nothing is clipped
    assert stats["ratio_mean"].item() == 1.0 and stats["clip_fraction"].item() == 0.0
    assert all(torch.isfinite(v) for v in stats.values())
    assert any(not torch.equal(a, b) for a, b in zip(g0, s.generator.parameters(), strict=True))


def test_zero_advantage_filtering(tmp_path):
    cfg, world, s, loop = make(tmp_path)
    adv = torch.tensor([0.0, 1.0, 0.0, -1.0, 0.5, 0.0, 0.0, 0.0])
    rows = loop.select_rows(adv, 3)  # num_batches 2: the 3 non-zero rows + 1 random dropped row
    assert len(rows) == 4 and {1, 3, 4} <= set(rows.tolist())
    rows = loop.select_rows(torch.zeros(8), 3)  # all zero: keep num_batches random rows
    assert len(rows) == 2


def test_bp_through_the_last_k_steps_and_no_ppo(tmp_path):
    for extra in (["stage2.bp_steps=2"], ["stage2.ppo_weight=0", "stage2.aux_weight=0"]):
        cfg, world, s, loop = make(tmp_path, extra)
        g0 = [p.detach().clone() for p in s.generator.parameters()]
        stats = loop.epoch(0)
        assert "bp_loss" in stats and all(torch.isfinite(v) for v in stats.values())
        assert any(not torch.equal(a, b) for a, b in zip(g0, s.generator.parameters(), strict=True))


def test_resume_equals_uninterrupted(tmp_path):
    over = ["stage2.steps=4", "stage2.checkpoint_every=2", "stage2.ema_interval=2", "log.interval=10"]
    _, _, straight, loop = make(tmp_path, over)
    logs_a = []
    loop.run(log_fn=logs_a.append, run_dir=tmp_path / "a")
    _, _, first, loop_b = make(tmp_path, over)
    logs_b = []
    loop_b.run(log_fn=logs_b.append, run_dir=tmp_path / "b", stop_at=2)
    _, _, resumed, loop_c = make(tmp_path, over)
    resumed.load(ck.latest_checkpoint(tmp_path / "b", stage=2), ONE)
    assert resumed.epoch == 2
    loop_c.run(log_fn=logs_b.append, run_dir=tmp_path / "b")
    assert_resume_equals_straight(straight, resumed, logs_a, logs_b)


@pytest.mark.slow
def test_reward_tilt_and_the_reward_hacking_control(tmp_path):
    """Short runs with the preset's stage-2 settings after a 600-step stage 1 (~2.5 min): the full method raises
    the reward and tilts inside the modes while staying near the family; the control (aux_weight = 0)
    drifts off it."""
    cfg = load_config("toy", overrides=["stage1.steps=600", "stage2.steps=120"])
    world = build_world(cfg)
    base, s1_ckpt = stage1_run(cfg, world, tmp_path / "run")
    ev = ToyEvaluator(world, n_eval=1024, seed=0)
    s1_gen, _ = stage2_networks(world, cfg, s1_ckpt)
    row1 = ev.row(generate_samples(s1_gen, ev, cfg))
    rows = {}
    for name, over in (("full", []), ("control", ["stage2.aux_weight=0"])):
        c = load_config("toy", overrides=["stage1.steps=600", "stage2.steps=120", *over])
        s = init_state(2, *stage2_networks(world, c, s1_ckpt), c)
        Stage2(s, ExactTeacher(world), world.prompts(), build_rewards(c, world), c, ONE).run()
        rows[name] = ev.row(generate_samples(s.ema.module, ev, c))
    full, control = rows["full"], rows["control"]
    assert full["reward_mean"] > row1["reward_mean"] + 0.05
    assert full["beta_shift"] > 0.2
    assert full["fd_tilted"] < row1["fd_tilted"] + 1.0  # stays on (or nearer) the family
    assert control["reward_mean"] > full["reward_mean"]
    # Measured (stage 1 / full / control): fd_tilted 15.5 / 13.9 / 34.3 here and 13.7 / 26.0 (full / control) in
    # a CI run — CPU reductions differ across environments, so the margins leave room for that spread.
    assert control["fd_tilted"] > 1.5 * full["fd_tilted"]
    assert control["fd_tilted"] > row1["fd_tilted"] + 5.0  # drifted off where stage 1 left it
