"""Worker for tests/test_distributed.py: run under ``torchrun --nproc_per_node 2`` (gloo, CPU) or as one plain
process, do one piece of training on the toy world and let rank 0 write what the test compares.

    python tests/dist_worker.py MODE STRATEGY OUT_DIR      (MODE: stage1_step | stage2_advantages)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from rtdmd import checkpoint as ck
from rtdmd import distributed
from rtdmd.config import load_config
from rtdmd.dtensor import full_state
from rtdmd.models.toy import ExactTeacher, build_world, pretrain_base, stage_networks
from rtdmd.rewards import build_rewards
from rtdmd.stages import Stage1, Stage2, init_state
from rtdmd.stages.common import log_record

SMALL = ["toy.num_layers=1", "toy.head_dim=16", "toy.base_steps=40", "toy.base_batch_size=32",
         "stage1.batch_size=8", "stage1.fake_update_ratio=1", "stage1.steps=2", "stage2.group_size=4",
         "stage2.num_batches=2", "stage2.fake_batch_size=4", "rewards.binary.weight=0.5", "log.progress=false"]


def _stage1(cfg, env, device):
    world = build_world(cfg)
    if not env.main:
        env.barrier()
    base, _ = pretrain_base(world, cfg, device=device)
    if env.main:
        env.barrier()
    state = init_state(1, *stage_networks(world, cfg.toy, base.state_dict(), base.state_dict(), device), cfg)
    return world, env.wrap(state)


def stage1_step(cfg, env, device, out: Path) -> None:
    """One stage-1 step with a generator update: the reduced losses and the updated weights."""
    world, state = _stage1(cfg, env, device)
    loop = Stage1(state, ExactTeacher(world), world.prompts(), cfg, env)
    stats = log_record(loop.step(0), env)
    weights = {f"generator.{k}": v for k, v in full_state(state.generator.state_dict()).items()}
    weights.update({f"fake.{k}": v for k, v in full_state(state.fake.state_dict()).items()})
    weights.update({f"ema.{k}": v for k, v in full_state(state.ema.state_dict()).items()})
    if env.main:
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(out / "weights.safetensors"))
        (out / "stats.json").write_text(json.dumps(stats))


def stage2_advantages(cfg, env, device, out: Path) -> None:
    """One stage-2 rollout: the advantages computed over every rank's rewards, gathered in global order."""
    world, state1 = _stage1(cfg, env, device)
    state1.save(out / "s1", keep=1, env=env)
    c = ck.load_checkpoint(ck.latest_checkpoint(out / "s1", stage=1))
    networks = stage_networks(world, cfg.toy, c.modules["generator_ema"], c.modules["fake_score"], device)
    state = env.wrap(init_state(2, *networks, cfg))
    loop = Stage2(state, ExactTeacher(world), world.prompts(), build_rewards(cfg, world), cfg, env)
    data = loop.collect(0, [0, 1])
    adv = loop.advantages(data)
    gathered = {"advantages": env.all_gather(adv), "rewards": env.all_gather(data.rewards),
                "index": env.all_gather(torch.tensor(data.index))}
    if env.main:
        save_file({k: v.contiguous() for k, v in gathered.items()}, str(out / "advantages.safetensors"))
        (out / "prompts.json").write_text(json.dumps([str(p) for p in loop.epoch_prompts(0)]))


def main() -> None:
    mode, strategy, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config("toy", overrides=[*SMALL, f"distributed.strategy={strategy}", "device=cpu"])
    env = distributed.init(strategy, torch.device("cpu"))
    try:
        {"stage1_step": stage1_step, "stage2_advantages": stage2_advantages}[mode](cfg, env, torch.device("cpu"), out)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
