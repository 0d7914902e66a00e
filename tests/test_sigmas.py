"""Sigma schedules (docs/method.md §1)."""

import pytest

from rtdmd.sigmas import sd3_sigmas, static_shift, uniform_denoising_steps


def test_sd3_schedule_matches_spec():
    assert sd3_sigmas([1000, 750, 500, 250], 3.0) == [1.0, 0.9, 0.75, 0.5, 0.0]
    assert sd3_sigmas([1000, 750, 500, 250], 1.0) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert static_shift(0.0, 3.0) == 0.0 and static_shift(1.0, 3.0) == 1.0


def test_uniform_step_list():
    assert uniform_denoising_steps(4) == [1000, 750, 500, 250]
    assert uniform_denoising_steps(1) == [1000]
    assert sd3_sigmas(uniform_denoising_steps(2)) == [1.0, 0.75, 0.0]
    with pytest.raises(ValueError):
        uniform_denoising_steps(0)


@pytest.mark.parametrize("steps", [[], [1000, 1000], [250, 500], [0], [1001]])
def test_bad_step_lists(steps):
    with pytest.raises(ValueError):
        sd3_sigmas(steps)


def test_bad_shift():
    with pytest.raises(ValueError, match="shift"):
        sd3_sigmas([1000], 0.0)


# ---- FLUX.2's dynamic shift and the dispatcher (docs/method.md §1)

import math  # noqa: E402

import torch  # noqa: E402

from rtdmd.sigmas import (  # noqa: E402
    dynamic_shift,
    dynamic_shift_sigmas,
    flux2_empirical_mu,
    flux2_image_seq_len,
    flux2_seq_len_from_mu,
    sigmas_for,
    stretch_to_terminal,
)

FLUX2_CASES = [  # (px, image_seq_len, mu, sigmas) of docs/method.md §1, 5 decimals
    (512, 1024, 2.03069, [1.0, 0.95809, 0.88398, 0.71750, 0.0]),
    (1024, 4096, 2.29118, [1.0, 0.96738, 0.90814, 0.76720, 0.0]),
]


@pytest.mark.parametrize("px, seq, mu, sigmas", FLUX2_CASES)
def test_flux2_dynamic_shift_matches_spec(px, seq, mu, sigmas):
    assert flux2_image_seq_len(px, px) == seq
    got_mu = flux2_empirical_mu(seq, 4)
    assert round(got_mu, 5) == mu
    sig = dynamic_shift_sigmas([1000, 750, 500, 250], got_mu)
    assert sig.dtype == torch.float64 and sig.shape == (5,)
    assert [round(s, 5) for s in sig.tolist()] == sigmas
    assert sig[0] == 1.0 and sig[-1] == 0.0
    assert sigmas_for([1000, 750, 500, 250], mu=got_mu) == sig.tolist()
    assert dynamic_shift(0.5, got_mu) == pytest.approx(sig[2].item(), abs=1e-15)


def test_flux2_empirical_mu_branches_and_diffusers_agree():
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
    for seq in (1, 256, 1024, 4096, 4300, 4301, 8192, 16384):
        for n in (1, 4, 28, 50, 200):
            assert flux2_empirical_mu(seq, n) == pytest.approx(compute_empirical_mu(seq, n), abs=1e-12)
    # past 4300 tokens the step count no longer matters; at 200 steps the two lines coincide
    assert flux2_empirical_mu(8192, 4) == flux2_empirical_mu(8192, 50)
    assert flux2_empirical_mu(1024, 200) == pytest.approx(1.6927e-4 * 1024 + 0.45666666, abs=1e-12)
    assert flux2_image_seq_len(1024, 768) == 64 * 48 and flux2_image_seq_len(520, 520) == 1024


def test_flux2_seq_len_from_mu_inverts_the_rule():
    for seq in (1, 256, 1024, 3000, 4096, 4300, 4301, 9000, 16384):
        for n in (1, 4, 28, 50, 200):
            assert flux2_seq_len_from_mu(flux2_empirical_mu(seq, n), n) == seq
    with pytest.raises(ValueError, match="mu"):
        flux2_seq_len_from_mu(1.15, 28)  # FLUX.1's max_shift: no image size gives it under FLUX.2's rule
    with pytest.raises(ValueError, match="mu"):
        flux2_seq_len_from_mu(float("nan"), 4)


def test_sd3_static_shift_rounds_to_6_decimals():
    raw = static_shift(0.333, 3.0)
    assert raw != round(raw, 6)
    assert sd3_sigmas([1000, 333], 3.0) == [1.0, round(raw, 6), 0.0] == [1.0, 0.59964, 0.0]
    assert sigmas_for([1000, 750, 500, 250], shift=3.0) == [1.0, 0.9, 0.75, 0.5, 0.0]


def test_terminal_stretch():
    sig = sigmas_for([1000, 750, 500, 250], shift=3.0, shift_terminal=0.2)
    assert sig[0] == 1.0 and sig[-1] == 0.0 and sig[-2] == pytest.approx(0.2)
    assert stretch_to_terminal([1.0, 0.5, 0.0], 0.5) == [1.0, 0.5, 0.0]
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="shift_terminal"):
            stretch_to_terminal([1.0, 0.5, 0.0], bad)


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one"), ({"shift": 3.0, "mu": 2.0}, "exactly one"), ({"mu": math.inf}, "mu"),
    ({"shift": -1.0}, "shift"),
])
def test_sigmas_for_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sigmas_for([1000, 500], **kwargs)


@pytest.mark.parametrize("call, match", [
    (lambda: flux2_empirical_mu(0, 4), "image_seq_len"), (lambda: flux2_empirical_mu(1024, 0), "num_steps"),
    (lambda: flux2_empirical_mu(1024.5, 4), "image_seq_len"), (lambda: flux2_image_seq_len(8, 512), "height"),
    (lambda: dynamic_shift(0.0, 2.0), "u"), (lambda: dynamic_shift_sigmas([250, 500], 2.0), "denoising_steps"),
])
def test_flux2_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
