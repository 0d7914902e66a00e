"""``python -m rtdmd.evaluate``: score a real-model run's base, stage-1 and stage-2 generators (docs/training.md §7).

Every configured reward (weight 0 included: evaluation-only rewards such as the aesthetic score count here) on the
same prompts and seeds for every row; a table of mean ± standard error printed and written to ``summary.json``
(``eval``), and an image grid ``eval/grid.png`` (rows = models, one column per prompt). A toy run evaluates itself
after each stage: its table is printed from ``summary.json``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # before the first import of a trainer dependency: one line and exit 2 if one is missing
    from .._deps import require_trainer_packages

    require_trainer_packages("python -m rtdmd.evaluate")

from pathlib import Path

from ..checkpoint import load_latest
from ..cli import ArgumentParser, resolve_device, run_cli, user_errors
from ..config import ConfigError
from ..data import load_prompts
from ..evaluate.toy import format_table
from ..models.diffusion import load_core, stage1_models, stage2_models
from ..rewards import build_rewards
from ..run import RunFolder
from .images import ROWS, evaluate_rows, format_reward_table, image_grid

PROG = "python -m rtdmd.evaluate"


def parse_args(argv=None):
    p = ArgumentParser(prog=PROG, description="Score a run's generators with its rewards; write a table and a grid.")
    p.add_argument("--run", required=True, metavar="DIR", help="a run folder of python -m rtdmd.train")
    p.add_argument("--prompts", default=None, metavar="FILE", help=".txt or .jsonl (default: data.eval_prompts)")
    p.add_argument("--num", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--seed", type=int, default=None, help="default: the run's seed")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write table.json and grid.png here instead of into the run folder")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    return p.parse_args(argv)


def models_of(run: RunFolder, cfg, device):
    """``{"base", "stage1", "stage2"}``: the generator's base with no adapter, then the run's EMA generators of the
    stages it has checkpoints of (each loaded from the newest checkpoint that verifies)."""
    with user_errors():
        core = load_core(cfg.model, device)
    models = {"base": core.view([], generator=True)}
    s1 = load_latest(run.path, stage=1, modules=("generator_ema", "fake_score"))
    if s1 is not None:
        generator, _, _ = stage1_models(core, cfg)
        generator.load_state_dict(s1.modules["generator_ema"])
        models["stage1"] = generator.eval()
        s2 = load_latest(run.path, stage=2, modules=("generator_ema",))
        if s2 is not None:
            generator2, _, _ = stage2_models(core, cfg, s1.modules)
            generator2.load_state_dict(s2.modules["generator_ema"])
            models["stage2"] = generator2.eval()
    return models


def main(argv=None) -> int:
    import json

    args = parse_args(argv)
    run = RunFolder.open(args.run, "--run")
    cfg = run.load_config()
    if cfg.model.kind == "toy":
        rows = run.summary().get("eval", {})
        if not rows:
            raise ConfigError(f"--run {run.path}: no evaluation rows yet (the toy evaluates after each stage)")
        print(format_table(rows))
        return 0
    if args.num < 1:
        raise ConfigError(f"--num must be >= 1, got {args.num}")
    source = args.prompts or cfg.data.eval_prompts
    if not source:
        raise ConfigError("give --prompts FILE (or set data.eval_prompts in the run's config)")
    try:
        prompts = load_prompts(source, key="--prompts" if args.prompts else "data.eval_prompts")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    prompts = [p for p in prompts for _ in range(args.num)]
    device = resolve_device(args.device or cfg.device)
    out = Path(args.out) if args.out else None
    if out is None:
        run.lock("--run")  # the table goes into summary.json: not while a training process writes it
    try:
        try:
            rewards = build_rewards(cfg, device=device, include_unused=True)
        except ValueError as e:
            raise ConfigError(str(e).splitlines()[0]) from None
        models = models_of(run, cfg, device)
        rows, images = evaluate_rows(models, rewards, prompts, steps=cfg.schedule.denoising_steps,
                                     shift=cfg.schedule.shift, eta=cfg.schedule.eta,
                                     seed=cfg.seed if args.seed is None else args.seed,
                                     batch_size=min(cfg.eval.batch_size, 16), decode_chunk=cfg.stage2.decode_batch_size)
        print(format_reward_table(rows, rewards.names))
        where = out or run.path / "eval"
        grid = image_grid(images, where / "grid.png")
        if out is None:
            run.update_summary(preset=cfg.preset, rows={f"images/{k}": v for k, v in rows.items()})
        else:
            out.mkdir(parents=True, exist_ok=True)
            (out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
        print(f"grid: {grid}  (rows: {', '.join(r for r in ROWS if r in rows)}; columns: the first prompts)")
    finally:
        run.unlock()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(PROG, main))
