"""Time one toy-world training step and split it between our kernels, the networks and the rest.

``python bench/train_step.py [--steps N]`` profiles stage-1 steps (a fake-score update, and one with the
generator update as well) and stage-2 epochs with ``torch.profiler`` and attributes every op's self time to the nearest
labelled ancestor: ``kernels`` (the ``rtdmd_kernels`` autograd Functions, forward and backward),
``network`` (the tiny SD3 generator / fake score, forward, backward and checkpoint recompute),
``teacher`` (the exact analytic velocity), ``optimizer`` (AdamW) and ``other`` (RNG draws, EMA, glue).
The benchmark suite (``bench/test_train_step.py``) times the same steps with pytest-benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections import defaultdict

os.environ.pop("TRITON_INTERPRET", None)  # benchmarks never run under the interpreter

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from rtdmd.config import load_config  # noqa: E402
from rtdmd.distributed import DistEnv  # noqa: E402
from rtdmd.models import toy  # noqa: E402
from rtdmd.stages import Stage1, Stage2, init_state  # noqa: E402
from rtdmd_kernels import dmd as rk_dmd  # noqa: E402
from rtdmd_kernels import fake_score as rk_fake_score  # noqa: E402
from rtdmd_kernels import policy as rk_policy  # noqa: E402

# the ops' autograd Functions (one per differentiable op), read from the package so a rename cannot go stale
KERNEL_FUNCTIONS = tuple(sorted(
    c.__name__ for m in (rk_dmd, rk_fake_score, rk_policy) for c in vars(m).values()
    if isinstance(c, type) and issubclass(c, torch.autograd.Function) and c is not torch.autograd.Function))
BACKWARD = "autograd::engine::evaluate_function: "
CATEGORIES = ("kernels", "network", "teacher", "optimizer", "other")


def build_stage2(tmp_dir, overrides=(), device: str = "cpu"):
    """A stage-2 loop on the toy preset, initialised from a (random-weight) stage-1 checkpoint in ``tmp_dir``."""
    from pathlib import Path

    from rtdmd import checkpoint as ck
    from rtdmd.rewards import build_rewards

    s1 = build_stage1(overrides, device)
    s1.s.save(Path(tmp_dir), keep=1, env=s1.env)
    cfg, world = s1.cfg, s1.teacher.world
    c = ck.load_checkpoint(ck.latest_checkpoint(Path(tmp_dir), stage=1))
    state = init_state(2, *toy.stage_networks(world, cfg.toy, c.modules["generator_ema"], c.modules["fake_score"],
                                              device), cfg)
    return Stage2(state, s1.teacher, world.prompts(), build_rewards(cfg, world), cfg, s1.env)


def build_stage1(overrides=(), device: str = "cpu") -> Stage1:
    """A stage-1 loop on the toy preset with a randomly initialised base (step time does not depend on it)."""
    cfg = load_config("toy", overrides=list(overrides))
    world = toy.build_world(cfg)
    torch.manual_seed(0)
    base = toy.build_network(world, cfg.toy).to(device)
    state = init_state(1, *toy.stage_networks(world, cfg.toy, base.state_dict(), base.state_dict(), device), cfg)
    return Stage1(state, toy.ExactTeacher(world).to(device), world.prompts(), cfg, DistEnv(device=torch.device(device)))


@contextlib.contextmanager
def labelled_models():
    """Label every network and teacher call for the profiler (patched on the classes, undone on exit)."""
    originals = {cls: cls.velocity for cls in (toy.ToyNetwork, toy.ExactTeacher)}

    def wrap(cls, label):
        def velocity(self, *args, **kwargs):
            with record_function(label):
                return originals[cls](self, *args, **kwargs)
        return velocity

    toy.ToyNetwork.velocity = wrap(toy.ToyNetwork, "network")
    toy.ExactTeacher.velocity = wrap(toy.ExactTeacher, "teacher")
    try:
        yield
    finally:
        for cls, fn in originals.items():
            cls.velocity = fn


def _category(event) -> str:
    e = event
    while e is not None:
        name = e.name
        if name in KERNEL_FUNCTIONS or name.removeprefix(BACKWARD).removesuffix("Backward") in KERNEL_FUNCTIONS:
            return "kernels"
        if name in ("network", "teacher"):
            return name
        if name.startswith("Optimizer."):
            return "optimizer"
        if name.startswith(BACKWARD):  # backward of a non-kernel op: the networks' (the glue's is negligible)
            return "network"
        e = e.cpu_parent
    return "other"


def profile_steps(loop, steps: list[int]) -> tuple[float, dict[str, float]]:
    """Wall seconds of ``steps`` (stage-1 steps, or stage-2 epochs) and the share of each category
    (fractions of the profiled self time)."""
    run_one = loop.step if isinstance(loop, Stage1) else loop.epoch
    with labelled_models(), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for s in steps:
            run_one(s)
        wall = time.perf_counter() - t0
    totals: dict[str, float] = defaultdict(float)
    for e in prof.events():
        totals[_category(e)] += e.self_cpu_time_total
    total = sum(totals.values()) or 1.0
    return wall, {c: totals[c] / total for c in CATEGORIES}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="steps to profile (one ratio cycle by default)")
    args = p.parse_args()
    loop = build_stage1()
    ratio = loop.s1.fake_update_ratio
    for s in range(ratio):  # warm-up
        loop.step(s)
    t0 = time.perf_counter()
    for s in range(ratio, ratio + args.steps):
        loop.step(s)
    per_step = (time.perf_counter() - t0) / args.steps
    _, shares = profile_steps(loop, list(range(ratio + args.steps, ratio + 2 * args.steps)))
    print(f"stage-1 step (batch {loop.s1.batch_size}, generator every {ratio}): {per_step * 1e3:.1f} ms/step "
          f"on {torch.get_num_threads()} threads")
    print("share of profiled time: " + ", ".join(f"{c} {v:.1%}" for c, v in shares.items()))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        loop2 = build_stage2(tmp)
        loop2.epoch(0)  # warm-up
        wall, shares = profile_steps(loop2, [1, 2])
    print(f"stage-2 epoch ({len(loop2.epoch_prompts(0))} samples, {loop2.s2.num_batches} sub-batches): "
          f"{wall / 2 * 1e3:.0f} ms/epoch under the profiler")
    print("share of profiled time: " + ", ".join(f"{c} {v:.1%}" for c, v in shares.items()))


if __name__ == "__main__":
    main()
