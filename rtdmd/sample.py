"""``python -m rtdmd.sample``: sample a trained run's generator (docs/training.md §1).

Uses the EMA generator of the run's newest checkpoint (the base network when the run has no stage
checkpoint yet). ``--steps`` other than the preset's count builds the schedule with the preset's rule
(``K`` evenly spaced denoising steps, then the shift). For the toy it writes ``samples.npz``
(``samples [N, C, H, W]``, ``prompts``) and ``samples.png``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

if __name__ == "__main__":  # before the first import of a trainer dependency: one line and exit 2 if one is missing
    from ._deps import require_trainer_packages

    require_trainer_packages("python -m rtdmd.sample")

import numpy as np

from .checkpoint import load_latest
from .cli import ArgumentParser, resolve_device, run_cli, user_errors
from .config import ConfigError
from .data import load_prompts
from .models.diffusion import load_core, stage1_models, stage2_models
from .models.toy import build_network, build_world, pretrain_base
from .plot import plot_toy_rows
from .rollout import generate
from .run import RunFolder
from .sigmas import sd3_sigmas, uniform_denoising_steps

log = logging.getLogger("rtdmd.sample")


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m rtdmd.sample", description="Sample a trained RTDMD run.")
    p.add_argument("--run", required=True, metavar="DIR", help="a run folder of python -m rtdmd.train")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT", help="prompt (repeatable; default: all)")
    p.add_argument("--num", type=int, default=None, help="samples per prompt (default: 256 toy, 1 image models)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the preset's, 4)")
    p.add_argument("--seed", type=int, default=None, help="default: the run's seed")
    p.add_argument("--out", default=None, metavar="DIR", help="default: <run>/samples/")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    return p.parse_args(argv)


def load_generator(run: RunFolder, cfg, world, device):
    """The EMA generator of the newest checkpoint, or the base network; returns ``(network, source)``."""
    ckpt = load_latest(run.path, modules=("generator_ema",))  # the newest that verifies; skipped ones are said
    if ckpt is None:
        net, _ = pretrain_base(world, cfg, device=device)
        return net.eval(), "base network (the run has no stage checkpoint)"
    net = build_network(world, cfg.toy)
    net.load_state_dict(ckpt.modules["generator_ema"])
    return net.to(device).eval(), f"{ckpt.path.name}/generator_ema"


def main(argv=None) -> int:
    args = parse_args(argv)
    run = RunFolder.open(args.run, "--run")
    cfg = run.load_config()
    if args.num is None:
        args.num = 256 if cfg.model.kind == "toy" else 1
    if args.num < 1:
        raise ConfigError(f"--num must be >= 1, got {args.num}")
    if args.steps is not None and not 1 <= args.steps <= 1000:
        raise ConfigError(f"--steps must be in [1, 1000] (one step per distinct timestep at most), got {args.steps}")
    seed = cfg.seed if args.seed is None else args.seed
    if seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {seed}")
    device = resolve_device(args.device or cfg.device)
    if cfg.model.kind != "toy":
        return sample_images(args, run, cfg, seed, device)

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


def load_image_generator(run: RunFolder, cfg, device):
    """The run's EMA generator on its real backbone: stage 1's LoRA, under stage 2's when the run has one."""
    s1 = load_latest(run.path, stage=1, modules=("generator_ema", "fake_score"))
    s2 = load_latest(run.path, stage=2, modules=("generator_ema",))
    if s1 is None:
        raise FileNotFoundError(f"{run.path}: no stage-1 checkpoint to sample from")
    with user_errors():
        core = load_core(cfg.model, device)
    if s2 is None:
        generator, _, _ = stage1_models(core, cfg)
        generator.load_state_dict(s1.modules["generator_ema"])
        return generator.eval(), f"{s1.path.name}/generator_ema"
    generator, _, _ = stage2_models(core, cfg, s1.modules)
    generator.load_state_dict(s2.modules["generator_ema"])
    return generator.eval(), f"{s1.path.name}/generator_ema + {s2.path.name}/generator_ema"


def sample_images(args, run: RunFolder, cfg, seed: int, device) -> int:
    if args.prompt:
        prompts = list(args.prompt)
    elif cfg.data.eval_prompts:
        with user_errors():
            prompts = load_prompts(cfg.data.eval_prompts, key="data.eval_prompts")
    else:
        raise ConfigError("give --prompt TEXT (or set data.eval_prompts in the run's config)")
    generator, source = load_image_generator(run, cfg, device)
    steps = cfg.schedule.denoising_steps if args.steps is None else uniform_denoising_steps(args.steps)
    sigmas = generator.sigmas(steps, cfg.schedule.shift)
    log.info("sampling %d x %d prompts with %s, sigmas %s", args.num, len(prompts), source, sigmas)
    all_prompts = [p for p in prompts for _ in range(args.num)]
    out = Path(args.out) if args.out else run.path / "samples"
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    written = 0
    with torch.no_grad():
        for start in range(0, len(all_prompts), cfg.eval.batch_size):
            chunk = all_prompts[start:start + cfg.eval.batch_size]
            x = generate(generator, chunk, sigmas=sigmas, eta=cfg.schedule.eta, seed=seed, stream="sample",
                         indices=range(start, start + len(chunk)), batch_size=len(chunk), device=device)
            images = generator.decode(x.to(device), chunk=cfg.stage2.decode_batch_size)
            for img in (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy():
                Image.fromarray(img).save(out / f"{written:05d}.png")
                written += 1
    (out / "prompts.txt").write_text("".join(f"{i:05d}.png\t{p}\n" for i, p in enumerate(all_prompts)))
    print(f"wrote {written} PNGs and prompts.txt to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("python -m rtdmd.sample", main))
