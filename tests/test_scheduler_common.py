"""diffusers' common scheduler checks, run on the stock ``FlowMatchEulerDiscreteScheduler`` and on ``CPSScheduler``.

diffusers tests every scheduler with one set of checks (tests/schedulers/test_schedulers.py,
``SchedulerCommonTest``): config save/load round trips with identical steps, ``compatibles`` round trips,
tuple and dict outputs agreeing, step shapes, the attribute and deprecation conventions of ``ConfigMixin``. They
are written here in our own code, each run on both schedulers: whatever the stock flow-matching scheduler passes,
ours must pass too. Flow-matching schedulers take their timesteps from the schedule (integer indices are
refused by both), so the checks step at ``scheduler.timesteps`` as the pipelines do.
"""

from __future__ import annotations

import inspect
import logging
import warnings

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import rtdmd_kernels as rk
from rtdmd.scheduler import CPSScheduler

CLASSES = [FlowMatchEulerDiscreteScheduler, CPSScheduler]


@pytest.fixture(autouse=True)
def _torch_backend():
    with rk.use_backend("torch"):
        yield


def make(cls):
    return cls(num_train_timesteps=1000, shift=3.0)


def sample() -> torch.Tensor:
    return torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def step(scheduler, index: int = 0, return_dict: bool = True):
    scheduler.set_timesteps(4)
    x = sample()
    kwargs = {"generator": torch.manual_seed(0)} if "generator" in inspect.signature(scheduler.step).parameters \
        else {}
    return scheduler.step(0.1 * x, scheduler.timesteps[index], x, return_dict=return_dict, **kwargs)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_save_config_round_trip_steps_identically(cls, tmp_path):
    scheduler = make(cls)
    scheduler.save_config(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    for index in (0, 1):
        assert torch.sum(torch.abs(step(scheduler, index).prev_sample - step(loaded, index).prev_sample)) < 1e-5


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_from_pretrained_keeps_the_config(cls, tmp_path):
    scheduler = make(cls)
    scheduler.save_pretrained(tmp_path)
    config = dict(scheduler.config)
    del config["_use_default_values"]
    assert config == cls.from_pretrained(tmp_path).config


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_compatibles_round_trip(cls):
    scheduler = make(cls)
    assert all(c is not None for c in scheduler.compatibles)
    for other_cls in scheduler.compatibles:
        other = other_cls.from_config(scheduler.config)
        back = cls.from_config(other.config)
        assert {k: v for k, v in back.config.items() if k in scheduler.config} == dict(scheduler.config)
        extra = {k for k in back.config if k not in scheduler.config}
        assert not extra & set(inspect.signature(cls.__init__).parameters)


def test_cps_is_compatible_with_the_stock_flow_match_scheduler():
    assert FlowMatchEulerDiscreteScheduler in CPSScheduler().compatibles


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_step_shapes_and_tuple_equals_dict(cls):
    scheduler = make(cls)
    out0, out1 = step(scheduler, 0).prev_sample, step(scheduler, 1).prev_sample
    assert out0.shape == out1.shape == sample().shape
    as_dict, as_tuple = step(scheduler, 0), step(scheduler, 0, return_dict=False)
    for t, d in zip(as_tuple, as_dict.values(), strict=False):
        assert torch.allclose(torch.nan_to_num(t), torch.nan_to_num(d), atol=1e-5)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_public_api_and_forward_process_shape(cls):
    scheduler = make(cls)
    assert callable(scheduler.step) and callable(scheduler.set_timesteps)
    scheduler.set_timesteps(4)
    x = sample()
    assert scheduler.scale_noise(x, scheduler.timesteps[1:2], torch.randn_like(x)).shape == x.shape


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_deprecated_kwargs_convention(cls):
    has_kwargs = "kwargs" in inspect.signature(cls.__init__).parameters
    assert has_kwargs == (len(cls._deprecated_kwargs) > 0)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_getattr_conventions(cls, caplog):
    scheduler = make(cls)
    scheduler.dummy_attribute = 5
    scheduler.register_to_config(test_attribute=5)
    with caplog.at_level(logging.WARNING):
        assert scheduler.dummy_attribute == 5 and scheduler.dummy_attribute == 5
        assert scheduler.save_pretrained == scheduler.save_pretrained
    assert caplog.text == ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert scheduler.test_attribute == 5
    assert any(issubclass(w.category, FutureWarning) for w in caught)
    with pytest.raises(AttributeError, match="does_not_exist"):
        _ = scheduler.does_not_exist
