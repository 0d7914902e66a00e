"""Sigma schedules (SPEC §1)."""

import pytest

from rtdmd.schedule import sd3_sigmas, static_shift, uniform_denoising_steps


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
