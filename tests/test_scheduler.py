"""``CPSScheduler``: the few-step CPS sampler as a diffusers scheduler (docs/method.md §1, §2.1, §2.4, §10).

The stock pipelines are not built here; the tests make exactly the calls they make (``retrieve_timesteps``
with ``sigmas``/``mu``, ``set_begin_index``, ``step(v, t, x, return_dict=False)``) on the scheduler.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from diffusers.pipelines.flux2.pipeline_flux2_klein import retrieve_timesteps as flux2_retrieve_timesteps
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    retrieve_timesteps as sd3_retrieve_timesteps,
)

import rtdmd_kernels as rk
from rtdmd.rollout import draw_noises, sample
from rtdmd.scheduler import CPSScheduler, CPSSchedulerOutput
from rtdmd.sigmas import dynamic_shift_sigmas, sd3_sigmas

STEPS = [1000, 750, 500, 250]
SD3_SIGMAS = [1.0, 0.9, 0.75, 0.5, 0.0]
FLUX2_SIGMAS = {1024: [1.0, 0.95809, 0.88398, 0.71750, 0.0], 4096: [1.0, 0.96738, 0.90814, 0.76720, 0.0]}
FLUX2_MU = {1024: 2.03069, 4096: 2.29118}


@pytest.fixture(autouse=True)
def _torch_backend():
    with rk.use_backend("torch"):  # the CPU path the trainer's sampler uses (kernels are tested elsewhere)
        yield


def sd3_config():
    """A stock SD3/SD3.5-style flow-matching scheduler config (static shift 3.0)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).config


def flux2_config():
    """A stock FLUX.2-style flow-matching scheduler config (dynamic exponential shift)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096, time_shift_type="exponential").config


def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """An elementwise, σ-dependent stand-in for a transformer (layout-agnostic, so packed tokens work too)."""
    s = sigma.float().reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x.float()) * (0.5 + s) - 0.3 * s


def run_pipeline_loop(sched: CPSScheduler, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The stock pipelines' denoising loop: velocity at ``t``, then ``step(v, t, x, return_dict=False)``."""
    for i, t in enumerate(timesteps):
        v = velocity(x, sched.sigmas[i].expand(x.shape[0])).to(x.dtype)
        x = sched.step(v, t, x, return_dict=False)[0]
    return x


# ---------------------------------------------------------------- schedules


def test_sd3_schedule_ignores_the_pipelines_step_count():
    sched = CPSScheduler.from_config(sd3_config(), eta=0.9, denoising_steps=STEPS)
    assert sched.config.shift == 3.0 and not sched.config.use_dynamic_shifting
    for call in ({"num_inference_steps": 28}, {"sigmas": list(np.linspace(1.0, 1 / 28, 28))}, {}):
        sched.set_timesteps(**call)
        assert torch.equal(sched.sigmas, torch.tensor(SD3_SIGMAS, dtype=torch.float32))
        assert sched.timesteps.tolist() == [1000.0, 900.0, 750.0, 500.0]
        assert sched.timesteps.dtype == sched.sigmas.dtype == torch.float32 and sched.num_inference_steps == 4
    # the SD3 pipeline's own call: retrieve_timesteps(scheduler, num_inference_steps, device). Without sigmas it
    # hands the caller's count back (only its progress bar uses it); the loop runs over the 4 timesteps
    timesteps, n = sd3_retrieve_timesteps(sched, 28, "cpu")
    assert n == 28 and timesteps.tolist() == [1000.0, 900.0, 750.0, 500.0]
    assert CPSScheduler().timesteps.tolist() == [1000.0, 900.0, 750.0, 500.0]  # default: SD3.5's shift 3


@pytest.mark.parametrize("seq", [1024, 4096])
@pytest.mark.parametrize("pipeline_steps", [1, 4, 28, 50])
def test_flux2_schedule_from_the_pipelines_mu(seq, pipeline_steps):
    """Klein computes mu for its own num_inference_steps; the scheduler recomputes it for K = 4 (docs/method.md §1)."""
    sched = CPSScheduler.from_config(flux2_config(), eta=0.9, denoising_steps=STEPS)
    sigmas = np.linspace(1.0, 1 / pipeline_steps, pipeline_steps)
    mu = compute_empirical_mu(image_seq_len=seq, num_steps=pipeline_steps)
    timesteps, n = flux2_retrieve_timesteps(sched, pipeline_steps, "cpu", sigmas=sigmas, mu=mu)
    assert n == 4 and round(sched.mu, 5) == FLUX2_MU[seq]
    assert [round(s, 5) for s in sched.sigmas.double().tolist()] == FLUX2_SIGMAS[seq]
    assert torch.allclose(timesteps, 1000 * sched.sigmas[:-1], rtol=1e-7, atol=0)
    assert sched.image_seq_len == (None if pipeline_steps == 4 else seq)


def test_flux2_schedule_matches_diffusers_set_timesteps_with_raw_levels():
    """The reference passes ``u = step/1000`` as sigmas with mu to a flow-matching scheduler (docs/method.md §1)."""
    mu = compute_empirical_mu(1024, 4)
    stock = FlowMatchEulerDiscreteScheduler.from_config(flux2_config())
    stock.set_timesteps(sigmas=[s / 1000 for s in STEPS], mu=mu)
    sched = CPSScheduler.from_config(flux2_config())
    sched.set_timesteps(image_seq_len=1024)
    assert torch.allclose(sched.sigmas, stock.sigmas, atol=1e-7, rtol=0)
    assert torch.allclose(sched.timesteps, stock.timesteps, atol=1e-4, rtol=0)


def test_mu_rules():
    mu50 = compute_empirical_mu(1024, 50)
    given = CPSScheduler.from_config(flux2_config(), mu_rule="given")
    given.set_timesteps(sigmas=np.linspace(1.0, 0.02, 50), mu=mu50)
    assert given.mu == mu50
    assert torch.equal(given.sigmas, dynamic_shift_sigmas(STEPS, mu50).float())
    # a mu that does not follow FLUX.2's rule (SD3/FLUX.1's calculate_shift) is refused under flux2_empirical
    sched = CPSScheduler.from_config(flux2_config())
    with pytest.raises(ValueError, match="mu_rule='given'"):
        sched.set_timesteps(28, mu=calculate_shift(4096, 256, 4096, 0.5, 1.15))
    sched.set_timesteps(mu=2.0)  # no step count: the mu is used as given
    assert sched.mu == 2.0
    with pytest.raises(ValueError, match="mu must be passed"):
        sched.set_timesteps(4)
    fresh = CPSScheduler.from_config(flux2_config())
    assert fresh.timesteps is None
    with pytest.raises(ValueError, match="set_timesteps"):
        fresh.step(torch.zeros(1, 2), 1000.0, torch.zeros(1, 2))


def test_config_round_trips(tmp_path):
    for config in (sd3_config(), flux2_config()):
        sched = CPSScheduler.from_config(config, eta=0.7, denoising_steps=[1000, 500])
        assert sched.config.eta == 0.7 and sched.config.denoising_steps == [1000, 500]
        assert sched.config.base_shift == 0.5 and sched.config.max_image_seq_len == 4096  # the SD3 pipeline reads them
        path = tmp_path / ("dyn" if config.use_dynamic_shifting else "static")
        sched.save_pretrained(path)
        loaded = CPSScheduler.from_pretrained(path)
        assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == \
            {k: v for k, v in sched.config.items() if not k.startswith("_")}
        for s in (sched, loaded):
            s.set_timesteps(2, sigmas=[1.0, 0.5], mu=compute_empirical_mu(1024, 2))
        assert torch.equal(loaded.sigmas, sched.sigmas) and torch.equal(loaded.timesteps, sched.timesteps)


def test_for_pipeline_installs_and_picks_the_mu_rule():
    for name, config, rule in (("Flux2KleinPipeline", flux2_config(), "flux2_empirical"),
                               ("StableDiffusion3Pipeline", sd3_config(), "given")):
        pipe = types.new_class(name)()  # stands in for the pipeline: only its class name is read
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        sched = CPSScheduler.for_pipeline(pipe, eta=0.9, denoising_steps=STEPS)
        assert pipe.scheduler is sched and sched.config.mu_rule == rule and sched.config.eta == 0.9
        assert sched.config.use_dynamic_shifting == config.use_dynamic_shifting
    other = CPSScheduler.for_pipeline(pipe, install=False, shift=1.0)
    assert pipe.scheduler is sched and other.timesteps.tolist() == [1000.0, 750.0, 500.0, 250.0]
    with pytest.raises(ValueError, match="etta"):
        CPSScheduler.for_pipeline(pipe, etta=0.5)


# ---------------------------------------------------------------- the step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_is_rk_cps_step(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, 5).to(dtype)
    noises = torch.randn(4, 3, 4, 6, 5)
    sched = CPSScheduler(eta=0.9)
    sched.set_noise(noises=noises)
    sched.set_timesteps(4)
    for j, t in enumerate(sched.timesteps):
        v = torch.randn(x.shape).to(dtype)
        out = sched.step(v, t, x)
        assert isinstance(out, CPSSchedulerOutput) and sched.step_index == j + 1
        expect, _ = rk.cps_step(x, v, SD3_SIGMAS[j], SD3_SIGMAS[j + 1], eta=0.9, noise=noises[j])
        assert out.prev_sample.dtype == dtype and torch.equal(out.prev_sample, expect)
        x0 = (x.float() - SD3_SIGMAS[j] * v.float()).to(dtype)
        assert torch.equal(out.pred_original_sample, x0)
        x = out.prev_sample
    # the last step lands on σ = 0: the output is the x0 prediction (docs/method.md §2.4)
    assert torch.allclose(out.prev_sample.float(), out.pred_original_sample.float(), atol=1e-2 if dtype ==
                          torch.bfloat16 else 1e-6)
    with pytest.raises(ValueError, match="all have run"):
        sched.step(v, sched.timesteps[-1], x)


@pytest.mark.parametrize("config", [sd3_config, flux2_config])
def test_eta_zero_is_diffusers_euler(config):
    sched = CPSScheduler.from_config(config(), eta=0.0)
    sched.set_timesteps(4, sigmas=[1.0, 0.75, 0.5, 0.25], mu=compute_empirical_mu(1024, 4))
    # the stock Euler scheduler on the same sigmas (shift 1 leaves the given sigmas alone)
    stock = FlowMatchEulerDiscreteScheduler.from_config(config(), shift=1.0, use_dynamic_shifting=False)
    stock.set_timesteps(sigmas=sched.sigmas[:-1].tolist())
    assert torch.allclose(stock.sigmas, sched.sigmas, atol=1e-6, rtol=0)
    torch.manual_seed(1)
    x_ours = x_stock = torch.randn(2, 16, 8, 8)
    for i in range(4):
        v = torch.randn(x_ours.shape)
        x_ours = sched.step(v, sched.timesteps[i], x_ours, return_dict=False)[0]
        x_stock = stock.step(v, stock.timesteps[i], x_stock, return_dict=False)[0]
        assert torch.allclose(x_ours, x_stock, atol=2e-6, rtol=1e-6)


def test_seeded_noise_is_the_trainers_draw():
    shape, batch, first = (4, 6, 6), 3, 5
    sched = CPSScheduler(eta=0.9)
    sched.set_noise(seed=11, stream="eval", step=2, first_index=first)
    x_t, noises = draw_noises(11, "eval", 2, range(first, first + batch), shape, 4)
    assert torch.equal(sched.initial_latents(batch, latent_shape=shape), x_t)
    x = x_t
    torch.manual_seed(0)
    sched.set_timesteps(4)
    for j, t in enumerate(sched.timesteps):
        v = torch.randn(x.shape)
        out = sched.step(v, t, x, return_dict=False)[0]
        expect, _ = rk.cps_step(x, v, SD3_SIGMAS[j], SD3_SIGMAS[j + 1], eta=0.9, noise=noises[j])
        assert torch.equal(out, expect)
        x = out
    # a finished run moves the index on by the batch: the next run draws the next samples
    assert sched.noise_index == first + batch
    x_t2, _ = draw_noises(11, "eval", 2, range(first + batch, first + 2 * batch), shape, 4)
    assert torch.equal(sched.initial_latents(batch, latent_shape=shape), x_t2)


@pytest.mark.parametrize("dynamic", [False, True])
def test_pipeline_loop_reproduces_the_trainers_sampler(dynamic):
    """Two pipeline calls (batches of 2 and 3) equal ``rtdmd.rollout.sample`` over indices 0..4, with FLUX.2's
    packed token layout for the dynamic case (the trainer's latents are [B, C, H, W])."""
    shape, seed = (8, 4, 6), 3
    if dynamic:
        sched = CPSScheduler.from_config(flux2_config(), eta=0.9)
        sigmas = sched_sigmas = dynamic_shift_sigmas(STEPS, compute_empirical_mu(1024, 4)).tolist()
    else:
        sched = CPSScheduler.from_config(sd3_config(), eta=0.9)
        sigmas = sched_sigmas = sd3_sigmas(STEPS, 3.0)
    x_t, noises = draw_noises(seed, "sample", 0, range(5), shape, 4)
    expect = sample(velocity, x_t, sigmas, eta=0.9, noises=noises)

    sched.set_noise(seed=seed, stream="sample", step=0, latent_shape=shape)
    outs = []
    for batch in (2, 3):
        latents = sched.initial_latents(batch)  # the pipeline's `latents=` argument, [B, C, H, W]
        if dynamic:  # what Flux2KleinPipeline does: pack, mu for its default 50 steps, set_begin_index(0)
            latents = latents.flatten(2).transpose(1, 2)
            timesteps, _ = flux2_retrieve_timesteps(sched, 50, "cpu", sigmas=np.linspace(1.0, 0.02, 50),
                                                    mu=compute_empirical_mu(1024, 50))
            sched.set_begin_index(0)
        else:
            timesteps, _ = sd3_retrieve_timesteps(sched, 28, "cpu")
        assert sched.sigmas.tolist() == torch.tensor(sched_sigmas, dtype=torch.float32).tolist()
        out = run_pipeline_loop(sched, latents, timesteps)
        outs.append(out.transpose(1, 2).reshape(batch, *shape) if dynamic else out)
    assert torch.equal(torch.cat(outs), expect)


def test_generator_and_global_noise():
    x, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    results = []
    for _ in range(2):
        sched = CPSScheduler()
        sched.set_noise(generator=torch.Generator().manual_seed(7))
        sched.set_timesteps(4)
        results.append(sched.step(v, 1000.0, x, return_dict=False)[0])
    assert torch.equal(*results)
    expect, _ = rk.cps_step(x, v, 1.0, 0.9, eta=0.9, noise=torch.randn(x.shape, generator=torch.Generator()
                                                                       .manual_seed(7)))
    assert torch.equal(results[0], expect)
    # a per-call generator wins; global_rng=True follows torch.manual_seed
    sched.set_timesteps(4)
    per_call = sched.step(v, 1000.0, x, generator=torch.Generator().manual_seed(7), return_dict=False)[0]
    assert torch.equal(per_call, expect)
    glob = []
    for _ in range(2):
        sched.set_noise(global_rng=True)
        sched.set_timesteps(4)
        torch.manual_seed(5)
        glob.append(sched.step(v, 1000.0, x, return_dict=False)[0])
    assert torch.equal(*glob) and not torch.equal(glob[0], expect)


def test_default_noise_follows_the_initial_latents():
    """The stock pipelines pass their ``generator=`` to the initial latents only: by default the CPS noise of a run
    is seeded by those latents, so the same generator gives the same images, whatever the global RNG does."""
    v = torch.randn(2, 3, 4)

    def run(x, global_seed):
        sched = CPSScheduler()
        sched.set_timesteps(4)
        torch.manual_seed(global_seed)
        return run_pipeline_loop(sched, x, sched.timesteps)

    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(run(x, 1), run(x.clone(), 2))
    assert not torch.equal(run(x, 1), run(x + 1e-3, 1))
    sched = CPSScheduler()
    sched.set_timesteps(4)
    first = sched.step(v, 1000.0, x, return_dict=False)[0]
    sched.set_timesteps(4)  # a new run re-seeds from its own first latents
    assert torch.equal(sched.step(v, 1000.0, x, return_dict=False)[0], first)


def test_flow_match_euler_attributes_and_a_step_count_it_cannot_honour(caplog):
    sched = CPSScheduler()
    stock = FlowMatchEulerDiscreteScheduler(shift=3.0)
    stock.set_timesteps(4)
    assert sched.shift == stock.shift == 3.0 and sched.sigma_max == 1.0 and sched.sigma_min == 0.0
    sched.set_shift(1.0)
    sched.set_timesteps(4)
    assert sched.shift == 1.0 and sched.sigmas.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    t = torch.tensor([0.25, 0.5, 0.9])
    torch.testing.assert_close(sched.time_shift(2.0, 1.0, t), stock.time_shift(2.0, 1.0, t))
    with pytest.raises(ValueError, match="shift must be > 0"):
        sched.set_shift(0.0)
    with caplog.at_level("WARNING", logger="rtdmd.scheduler"):
        sched.set_timesteps(2)
    assert "runs its 4 distilled steps" in caplog.text and "pass num_inference_steps=4" in caplog.text


def test_scale_noise_and_timestep_lookup():
    sched = CPSScheduler()
    sched.set_timesteps(4)
    x, n = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.allclose(sched.scale_noise(x, torch.tensor([900.0, 500.0]), n),
                          torch.tensor([[0.9], [0.5]]) * n + torch.tensor([[0.1], [0.5]]) * x)
    sched.set_begin_index(1)
    assert torch.allclose(sched.scale_noise(x, torch.tensor([900.0]), n), 0.9 * n + 0.1 * x)
    assert sched.index_for_timestep(torch.tensor(750.0)) == 2 and len(sched) == 1000
    with pytest.raises(ValueError, match="timestep"):
        sched.index_for_timestep(800.0)


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("kwargs, match", [
    ({"eta": 1.5}, "eta"), ({"eta": -0.1}, "eta"), ({"denoising_steps": [250, 500]}, "denoising_steps"),
    ({"denoising_steps": []}, "denoising_steps"), ({"mu_rule": "auto"}, "mu_rule"), ({"shift": 0.0}, "shift"),
    ({"use_karras_sigmas": True}, "use_karras_sigmas"), ({"invert_sigmas": True}, "invert_sigmas"),
    ({"time_shift_type": "linear"}, "time_shift_type"), ({"num_train_timesteps": 500}, "num_train_timesteps"),
    ({"shift_terminal": 1.0}, "shift_terminal"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CPSScheduler(**kwargs)
    with pytest.raises(ValueError, match=match):
        CPSScheduler.from_config(sd3_config(), **kwargs)


def test_bad_noise_and_step_arguments():
    sched = CPSScheduler()
    sched.set_timesteps(4)
    x = torch.randn(2, 4, 3, 3)
    for kwargs, match in (({"seed": 1, "generator": torch.Generator()}, "at most one"),
                          ({"noises": torch.randn(3, 2, 4, 3, 3)}, "noises"), ({"latent_shape": (4, 3, 3)}, "seed"),
                          ({"seed": 1, "first_index": -1}, "first_index"), ({"seed": 1.5}, "seed"),
                          ({"seed": 1, "stream": ""}, "stream"), ({"generator": 3}, "generator"),
                          ({"seed": 1, "latent_shape": (0, 3)}, "latent_shape")):
        with pytest.raises(ValueError, match=match):
            sched.set_noise(**kwargs)
    with pytest.raises(ValueError, match="seed"):
        sched.initial_latents(2, latent_shape=(4, 3, 3))
    sched.set_noise(seed=0)
    with pytest.raises(ValueError, match="latent_shape"):
        sched.initial_latents(2)
    with pytest.raises(ValueError, match="batch_size"):
        sched.initial_latents(0, latent_shape=(4, 3, 3))
    with pytest.raises(ValueError, match="integer"):
        sched.step(x, 1000, x)
    with pytest.raises(ValueError, match="model_output"):
        sched.step(x[:1], 1000.0, x)
    with pytest.raises(ValueError, match="timestep"):
        sched.step(x, 999.0, x)
    sched.set_noise(seed=0, latent_shape=(5, 3, 3))
    with pytest.raises(ValueError, match="latent_shape"):
        sched.step(x, 1000.0, x)
    sched.set_noise(noises=torch.randn(4, 2, 4, 3, 2))
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match=r"noises\[0\]"):
        sched.step(x, 1000.0, x)
    with pytest.raises(ValueError, match="begin_index"):
        sched.set_begin_index(4)
    with pytest.raises(ValueError, match="noise"):
        sched.scale_noise(x, 900.0)
    assert math.isclose(sched.sigmas[1].item(), 0.9, rel_tol=1e-7)
