"""``python -m rtdmd.sample``: sample a trained run's generator (API.md §2.1).

Uses the EMA generator of the run's newest checkpoint (the base network when the run has no stage
checkpoint yet). ``--steps`` other than the preset's count builds the schedule with the preset's rule
(``K`` evenly spaced denoising steps, then the shift). For the toy it writes ``samples.npz``
(``samples [N, C, H, W]``, ``prompts``) and ``samples.png``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import torch

from .checkpoint import latest_checkpoint, load_checkpoint
from .cli import ArgumentParser, resolve_device, run_cli
from .config import ConfigError
from .run import RunFolder
from .sampler import generate
from .schedule import sd3_sigmas, uniform_denoising_steps

log = logging.getLogger("rtdmd.sample")


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m rtdmd.sample", description="Sample a trained RTDMD run.")
    p.add_argument("--run", required=True, metavar="DIR", help="a run folder of python -m rtdmd.train")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT", help="prompt (repeatable; default: all)")
    p.add_argument("--num", type=int, default=256, help="samples per prompt (default 256)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the preset's, 4)")
    p.add_argument("--seed", type=int, default=None, help="default: the run's seed")
    p.add_argument("--out", default=None, metavar="DIR", help="default: <run>/samples/")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    return p.parse_args(argv)


def load_generator(run: RunFolder, cfg, world, device):
    """The EMA generator of the newest checkpoint, or the base network; returns ``(network, source)``."""
    from .models.toy import build_network, pretrain_base

    ckpt = latest_checkpoint(run.path)
    if ckpt is None:
        net, _ = pretrain_base(world, cfg, device=device)
        return net.eval(), "base network (the run has no stage checkpoint)"
    modules = load_checkpoint(ckpt).modules
    name = "generator_ema" if "generator_ema" in modules else "generator"
    if name not in modules:
        raise FileNotFoundError(f"{ckpt}: no generator weights in this checkpoint")
    net = build_network(world, cfg.model)
    net.load_state_dict(modules[name])
    return net.to(device).eval(), f"{ckpt.name}/{name}"


def main(argv=None) -> int:
    args = parse_args(argv)
    run = RunFolder.open(args.run, "--run")
    cfg = run.load_config()
    if cfg.model.kind != "toy":
        raise ConfigError(f"config key 'model.kind': sampling {cfg.model.kind!r} runs is not built yet")
    if args.num < 1:
        raise ConfigError(f"--num must be >= 1, got {args.num}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    seed = cfg.seed if args.seed is None else args.seed
    if seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {seed}")
    device = resolve_device(args.device or cfg.device)

    from .models.toy import build_world
    from .plot import plot_toy_rows

    world = build_world(cfg)
    prompts = args.prompt or world.prompts()
    try:
        prompt_idx = torch.tensor([world.prompt_index(p) for p in prompts])
    except ValueError as e:
        raise ConfigError(f"--prompt: {e}") from None
    steps = cfg.schedule.denoising_steps if args.steps is None else uniform_denoising_steps(args.steps)
    sigmas = sd3_sigmas(steps, cfg.schedule.shift)
    net, source = load_generator(run, cfg, world, device)
    log.info("sampling %d x %d prompts with %s, sigmas %s", args.num, len(prompts), source, sigmas)
    all_prompts = [p for p in prompts for _ in range(args.num)]
    with torch.no_grad():
        x = generate(net, all_prompts, sigmas=sigmas, eta=cfg.schedule.eta, seed=seed, stream="sample",
                     batch_size=cfg.eval.batch_size, device=device)
    out = Path(args.out) if args.out else run.path / "samples"
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "samples.npz", samples=x.numpy(), prompts=np.array(all_prompts))
    plot_toy_rows(world, prompt_idx.repeat_interleave(args.num), {source.split("/")[-1]: x}, out / "samples.png")
    print(f"wrote {out / 'samples.npz'} and {out / 'samples.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("python -m rtdmd.sample", main))
