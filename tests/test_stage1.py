"""Stage 1, AC-DMD on the toy world (docs/method.md §4.4): each update, the fake score learning, resume, convergence."""

from __future__ import annotations

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
from rtdmd.stages import Stage1, init_state
from rtdmd.stages.common import chain_round, draw_subinterval, fake_score_objective

CPU = torch.device("cpu")
ONE = DistEnv()  # one process on the CPU
SMALL = ["toy.num_layers=1", "toy.head_dim=16", "toy.base_steps=40", "toy.base_batch_size=32",
         "stage1.batch_size=16", "stage1.fake_update_ratio=2"]


@pytest.fixture(autouse=True)
def _torch_backend():
    with rk.use_backend("torch"):
        yield


def make(overrides=(), tmp_cache=None):
    cfg = load_config("toy", overrides=[*SMALL, *overrides])
    world = build_world(cfg)
    base, _ = pretrain_base(world, cfg)
    state = init_state(1, *stage_networks(world, cfg.toy, base.state_dict(), base.state_dict()), cfg)
    return cfg, world, base, state, Stage1(state, ExactTeacher(world), world.prompts(), cfg, ONE)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RTDMD_CACHE", str(tmp_path / "cache"))


def params(m):
    return [p.detach().clone() for p in m.parameters()]


def changed(before, m):
    return any(not torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True))


@pytest.mark.parametrize("chain", ["bfloat16", "float32"])
def test_one_fake_update_and_one_generator_update(cache, chain):
    cfg, world, base, s, loop = make([f"stage1.chain_dtype={chain}"])
    g0, f0 = params(s.generator), params(s.fake)
    stats = loop.fake_update(0)
    assert changed(f0, s.fake) and not changed(g0, s.generator)  # the fake step leaves the generator alone
    assert {"fake_ac", "fake_cons", "fake_loss", "fake_grad_norm"} <= set(stats)
    assert all(torch.isfinite(v) for v in stats.values())
    f1 = params(s.fake)
    stats = loop.generator_update(1)
    assert changed(g0, s.generator) and not changed(f1, s.fake)  # the generator step leaves the fake alone
    assert all(p.grad is None for p in s.fake.parameters())
    assert torch.isfinite(stats["gen_loss"]) and stats["gen_grad_norm"] > 0
    # EMA follows: after one step with decay d the EMA is d*old + (1-d)*new
    ema_before = params(s.ema.module)
    s.ema.update(s.generator)
    d = cfg.stage1.ema_decay
    for e0, e1, p in zip(ema_before, s.ema.module.parameters(), s.generator.parameters(), strict=True):
        assert torch.allclose(e1, d * e0 + (1 - d) * p.detach(), atol=1e-6)


def test_step_schedule_uses_the_ratio(cache):
    _, _, _, _, loop = make()
    assert "gen_loss" not in loop.step(0) and "gen_loss" in loop.step(1)  # ratio 2: every 2nd step


def test_subinterval_draws_follow_spec():
    """t_r is continuous on [1000 σ_s + 10, 1000) from the schedule's exact σ_s (0.9 -> 910, not the bf16 σ's 908),
    clamped to [20, 980]; σ' = max(t_r - δ, 0)/1000 with integer δ in 1..200."""
    cfg = load_config("toy").ac_dmd
    n = 4000
    for sigma_s in (0.0, 0.5, 0.9):
        s = draw_subinterval(0, "t", 0, range(n), sigma_s, (4, 8, 8), cfg)
        lo = 1000 * sigma_s + 10
        assert s.t_r.dtype == torch.float32 and s.t_r.min() >= max(lo, 20) and s.t_r.max() <= 980
        assert (s.t_r != s.t_r.round()).float().mean() > 0.5  # a float draw, not a whole timestep
        assert s.t_r.min() < max(lo, 20) + 1  # the range starts at the exact σ_s (910 for 0.9)
        if sigma_s == 0.9:
            assert 0.15 < (s.t_r == 980).float().mean() < 0.30  # the clamp's point mass (docs/method.md §13.7: 22%)
        assert torch.equal(s.sigma_t, s.t_r / 1000)
        t_p = s.sigma_p.double() * 1000
        delta = (s.t_r.double() - t_p)[t_p > 0]
        assert torch.allclose(delta, delta.round(), atol=1e-3) and delta.min() >= 1 - 1e-3 and delta.max() <= 200.001
    assert chain_round(torch.tensor([0.9]), torch.bfloat16).item() == 0.8984375


def test_rank_shared_timesteps_draw_by_local_position():
    """timestep_indices (stage1.rank_shared_timesteps) gives every rank the same t_r and δ, as the reference's
    broadcast from rank 0; the noises stay per global sample."""
    cfg = load_config("toy").ac_dmd
    rank0 = draw_subinterval(0, "t", 3, range(0, 4), 0.5, (4, 8, 8), cfg, timestep_indices=range(4))
    rank1 = draw_subinterval(0, "t", 3, range(4, 8), 0.5, (4, 8, 8), cfg, timestep_indices=range(4))
    own = draw_subinterval(0, "t", 3, range(4, 8), 0.5, (4, 8, 8), cfg)
    assert torch.equal(rank0.t_r, rank1.t_r) and torch.equal(rank0.sigma_p, rank1.sigma_p)
    assert not torch.equal(rank1.t_r, own.t_r) and torch.equal(rank1.xi_r, own.xi_r)
    assert not torch.equal(rank0.xi_r, rank1.xi_r)


def test_prompt_batches_are_drawn_without_replacement():
    """rng.epoch_batch: every epoch a fresh permutation, n // B full batches, the rest dropped; fewer items than
    a batch run on across epochs."""
    n, b = 10, 3
    epoch0 = [rng.epoch_batch(0, "p", step, n, b) for step in range(3)]
    flat = [i for batch in epoch0 for i in batch]
    assert len(set(flat)) == 9 and all(len(x) == b for x in epoch0)
    assert rng.epoch_batch(0, "p", 3, n, b) == rng.permutation(0, "p", 1, n)[:3]  # the next epoch
    small = [rng.epoch_batch(0, "p", step, 2, 3) for step in range(2)]
    assert [i for x in small for i in x] == rng.permutation(0, "p", 0, 2) + rng.permutation(0, "p", 1, 2) + \
        rng.permutation(0, "p", 2, 2)
    with pytest.raises(ValueError):
        rng.epoch_batch(0, "p", 0, 0, 3)


def test_fake_score_loss_falls_on_a_fixed_generator(cache):
    """Fake updates alone, generator frozen: the fake's loss on a held-out batch of generator samples falls."""
    cfg, world, base, s, loop = make(["stage1.fake_lr=1e-3"])
    sigma_s = torch.full((16,), 0.0)
    held_sub = draw_subinterval(99, "held", 0, range(16), 0.0, world.latent_shape, cfg.ac_dmd)
    x_s = loop_sample(loop, 12345)

    def held_loss():
        with torch.no_grad():
            return float(fake_score_objective(s.fake, x_s, sigma_s, loop.gen_cond, held_sub, cfg.ac_dmd,
                                              consistency=True, eta=0.9)[1]["fake_ac"])

    before = held_loss()
    for step in range(100):
        loop.fake_update(step)
    assert held_loss() < 0.9 * before  # the target is noisy: the loss has a floor well above 0


def loop_sample(loop, step):
    """Final 4-step samples of the loop's generator (a fixed, held-out batch)."""
    x_t, noises, sigmas, _ = loop._unroll_inputs("held", step, loop.num_steps)
    from rtdmd.rollout import sample
    return sample(loop.s.generator.velocity_fn(loop.gen_cond), x_t, sigmas, eta=0.9, noises=noises).float()


def test_resume_mid_run_equals_uninterrupted(cache, tmp_path):
    cfg, world, base, straight, loop = make(["stage1.steps=8", "stage1.checkpoint_every=4", "log.interval=1"])
    logs_a = []
    loop.run(log_fn=logs_a.append, run_dir=tmp_path / "a")
    # interrupted after 4 steps, then a fresh process state resumes from the checkpoint
    _, _, _, first, loop_b = make(["stage1.steps=8", "stage1.checkpoint_every=4", "log.interval=1"])
    logs_b = []
    loop_b.run(log_fn=logs_b.append, run_dir=tmp_path / "b", stop_at=4)
    _, _, _, resumed, loop_c = make(["stage1.steps=8", "stage1.checkpoint_every=4", "log.interval=1"])
    resumed.load(ck.latest_checkpoint(tmp_path / "b", stage=1), ONE)
    assert resumed.step == 4
    loop_c.run(log_fn=logs_b.append, run_dir=tmp_path / "b")
    assert_resume_equals_straight(straight, resumed, logs_a, logs_b)
    assert [p.name for p in ck.list_checkpoints(tmp_path / "b")] == ["stage1-step-4", "stage1-step-8"]


@pytest.mark.slow
def test_short_run_moves_toward_the_teacher(cache):
    """600 steps from the preset's base with the preset's rates (~100 s): the 4-step generator ends much closer
    to the teacher than the base run for 4 steps, keeps the modes and un-shrinks the samples (docs/toy.md §8; the
    full 1200-step run is measured in bench/RESULTS.md). Deterministic across processes: coverage 0.927 here."""
    cfg = load_config("toy", overrides=["stage1.steps=600"])
    world = build_world(cfg)
    base, _ = pretrain_base(world, cfg)
    state = init_state(1, *stage_networks(world, cfg.toy, base.state_dict(), base.state_dict()), cfg)
    Stage1(state, ExactTeacher(world), world.prompts(), cfg, ONE).run()
    ev = ToyEvaluator(world, n_eval=1024, seed=0)
    base_row = ev.row(generate_samples(base, ev, cfg))
    row = ev.row(generate_samples(state.ema.module, ev, cfg))
    assert row["fd_teacher"] < 0.7 * base_row["fd_teacher"]
    assert row["std_ratio"] > base_row["std_ratio"] + 0.2
    assert row["mode_coverage"] > 0.85
