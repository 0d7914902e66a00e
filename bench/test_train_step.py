"""One toy-world stage-1 step (fake-score update; and with the generator update) and one stage-2 epoch, and
where their time goes.

``extra_info``: op, provider="ours", shape (batch x latent), bytes=0, and the shares of the step's
profiled time in our kernels, the networks, the analytic teacher, the optimizer and the rest
(``bench/train_step.py``; run it directly for the printed split).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import train_step as ts  # noqa: E402


@pytest.fixture(scope="module")
def loop():
    loop = ts.build_stage1()
    for s in range(loop.s1.fake_update_ratio):  # warm-up, one full ratio cycle
        loop.step(s)
    return loop


@pytest.mark.parametrize("which", ["fake_update", "fake_and_generator_update"])
def test_stage1_step(benchmark, loop, which):
    ratio = loop.s1.fake_update_ratio
    step = ratio if which == "fake_update" else 2 * ratio - 1  # (step + 1) % ratio == 0 -> generator update
    _, shares = ts.profile_steps(loop, [step])
    benchmark.extra_info.update(op=f"stage1.{which}", provider="ours", bytes=0,
                                shape=f"{loop.s1.batch_size}x" + "x".join(map(str, loop.s.generator.latent_shape)),
                                dtype=loop.s1.chain_dtype, device="cpu", threads=torch.get_num_threads(),
                                **{f"share_{k}": round(v, 4) for k, v in shares.items()})
    benchmark.pedantic(loop.step, args=(step,), rounds=5, iterations=1, warmup_rounds=1)
    assert abs(sum(shares.values()) - 1) < 1e-6
    assert shares["kernels"] > 0, "no time attributed to the kernels' autograd Functions (train_step.KERNEL_FUNCTIONS)"


@pytest.fixture(scope="module")
def loop2(tmp_path_factory):
    loop = ts.build_stage2(tmp_path_factory.mktemp("stage1"))
    loop.epoch(0)  # warm-up
    return loop


def test_stage2_epoch(benchmark, loop2):
    _, shares = ts.profile_steps(loop2, [1])
    benchmark.extra_info.update(op="stage2.epoch", provider="ours", bytes=0,
                                shape=f"{len(loop2.epoch_prompts(0))}x" + "x".join(map(str, loop2.shape)),
                                dtype="float32", device="cpu", threads=torch.get_num_threads(),
                                **{f"share_{k}": round(v, 4) for k, v in shares.items()})
    epochs = iter(range(2, 100))
    benchmark.pedantic(lambda: loop2.epoch(next(epochs)), rounds=3, iterations=1, warmup_rounds=0)
    assert abs(sum(shares.values()) - 1) < 1e-6
    assert shares["kernels"] > 0, "no time attributed to the kernels' autograd Functions (train_step.KERNEL_FUNCTIONS)"
