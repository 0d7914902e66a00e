"""``python -m rtdmd.train``: the RTDMD trainer's entry point (docs/training.md §1).

With no arguments it runs the toy world (docs/toy.md): builds the analytic teacher, pretrains (or loads
the cached) base network, evaluates the ``teacher`` floor and ``base_4step`` rows, then the stages.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import sys

if __name__ == "__main__":  # before the first import of a trainer dependency: one line and exit 2 if one is missing
    from ._deps import require_trainer_packages

    require_trainer_packages("python -m rtdmd.train")

from . import distributed
from .checkpoint import Checkpoint, latest_checkpoint, list_checkpoints, load_latest
from .cli import ArgumentParser, CLIExit, resolve_device, run_cli, user_errors
from .config import Config, ConfigError, changed_keys, load_config, resumable
from .data import load_prompts
from .distributed import DistEnv
from .models.diffusion import check_model_paths
from .rewards import check_reward_specs
from .run import RunFolder
from .stages import Stage1, Stage2, init_state
from .stages.common import NonFiniteStep, StageState
from .worlds import make_world

log = logging.getLogger("rtdmd.train")

STAGES = ("ac_dmd", "rtdmd", "all")


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m rtdmd.train", description="RTDMD: AC-DMD distillation, then reward tilting.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="a packaged preset (default: toy)")
    src.add_argument("--config", default=None, metavar="FILE.yaml", help="a full config file, like a preset")
    p.add_argument("--stage", choices=STAGES, default=None,
                   help="which stage(s) to run (default: all; with --resume, what the run was started with)")
    p.add_argument("--out", default=None, metavar="DIR", help="run folder (default: runs/<preset>-<time>/)")
    p.add_argument("--init", default=None, metavar="DIR",
                   help="a run folder whose stage 1 finished (for --stage rtdmd)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set stage1.steps=500 (repeatable)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR from its newest checkpoint")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    p.add_argument("--seed", type=int, default=None)
    return p.parse_args(argv)


def resolve(args) -> tuple[Config, RunFolder, DistEnv]:
    """The config, run folder and this process's place in the run from the arguments; every user error is a
    ConfigError (exit 2)."""
    overrides = list(args.overrides)
    if args.device is not None:
        overrides.append(f"device={args.device}")
    if args.seed is not None:
        if args.seed < 0:
            raise ConfigError("--seed must be >= 0")
        overrides.append(f"seed={args.seed}")
    if args.stage == "rtdmd" and args.init is None and args.resume is None:
        raise ConfigError("--stage rtdmd needs --init DIR (a run folder whose stage 1 finished)")
    init_ckpt = None
    if args.init is not None:
        if args.stage != "rtdmd":
            raise ConfigError("--init DIR is for --stage rtdmd (stage 2 from DIR's finished stage 1)")
        init_ckpt = stage1_checkpoint(RunFolder.open(args.init, "--init"), f"--init {args.init}")
    if args.resume is not None:
        if args.preset or args.config or args.out or args.init:
            raise ConfigError("--resume DIR continues the run in DIR with its own config: "
                              "drop --preset/--config/--out/--init")
        run = RunFolder.open(args.resume)
        saved_cfg, cfg = run.load_config(), run.load_config(overrides)
        changed = changed_keys(saved_cfg, cfg)
        fixed = [k for k in changed if not resumable(k)]
        if fixed:
            raise ConfigError(f"--resume {run.path}: {', '.join(fixed)} cannot change in the middle of a run (they "
                              "shape the models, the data or the random draws); start a new run for that")
        args.stage = args.stage or run.summary().get("stage", "all")
        check_supported(cfg, args.stage)
        env = join(cfg)
        run = RunFolder(run.path, writer=env.main)
        run.lock()
        saved = newest_world_size(run)
        if saved is not None:  # the per-rank sample split depends on the world size: resume on the same one
            with user_errors():
                distributed.check_resume_world(saved, env, f"--resume {run.path}")
        if changed and run.writer:
            run.record_changes(saved_cfg, cfg, changed)
        return cfg, run, env
    args.stage = args.stage or "all"
    cfg = load_config(preset=args.preset or "toy", config_file=args.config, overrides=overrides)
    check_supported(cfg, args.stage)
    env = join(cfg)
    # rank 0 makes the folder (its default name has a timestamp) and tells the others, or its error
    made: tuple[str, str | None] = ("", None)
    run = None
    if env.main:
        try:
            run = RunFolder.create(args.out, cfg)
            if init_ckpt is not None:  # the run gets its own copy of the stage-1 result: self-contained
                shutil.copytree(init_ckpt.path, run.checkpoints / init_ckpt.path.name)
            run.update_summary(preset=cfg.preset, stage=args.stage)
            run.made_with = list_checkpoints(run.path)  # nothing trained yet: what a failure before work leaves
            made = (str(run.path), None)
        except ConfigError as e:
            made = ("", str(e))
    path, error = distributed.broadcast_object(env, made)
    if error is not None:
        raise ConfigError(error)
    return cfg, run if run is not None else RunFolder(path, writer=False), env


def newest_world_size(run: RunFolder) -> int | None:
    """The world size the run's newest readable checkpoint was saved with (None: no checkpoint says)."""
    for path in reversed(list_checkpoints(run.path)):
        try:
            return json.loads((path / "state.json").read_text(encoding="utf-8")).get("world_size")
        except (OSError, ValueError, AttributeError):
            continue  # a broken one is reported when it is loaded
    return None


def join(cfg: Config) -> DistEnv:
    """Join torchrun's process group when there is one (docs/training.md §1); one process needs nothing."""
    with user_errors():
        return distributed.init(cfg.distributed.strategy, resolve_device(cfg.device))


def check_supported(cfg: Config, stage: str) -> None:
    """What this release cannot run (and a device, model folder, prompt file or reward that is not there) fails
    before a run folder is made. Stage 1 uses no reward: ``--stage ac_dmd`` does not check them."""
    device = resolve_device(cfg.device)
    if cfg.model.kind == "toy" and cfg.model.lora_rank > 0:
        raise ConfigError("config key 'model.lora_rank': the toy trains full parameters (set it to 0); "
                          "LoRA is for model.kind sd3 / flux2")
    for key, package in (("log.tensorboard", "tensorboard"), ("log.wandb", "wandb")):
        if getattr(cfg.log, key.split(".")[1]) and importlib.util.find_spec(package) is None:
            raise ConfigError(f"config key '{key}' needs the {package} package (pip install {package})")
    if stage != "ac_dmd":
        with user_errors():
            check_reward_specs(cfg)
    if cfg.model.kind != "toy":
        with user_errors():
            check_model_paths(cfg.model, device)
            load_prompts(cfg.data.train_prompts, key="data.train_prompts")
            for key in ("stage2_prompts", "eval_prompts"):
                if getattr(cfg.data, key):
                    load_prompts(getattr(cfg.data, key), key=f"data.{key}")


def stage1_checkpoint(run: RunFolder, what: str = "stage 2") -> Checkpoint:
    """The run's newest stage-1 checkpoint that verifies, loaded; a ConfigError when there is none."""
    with user_errors():
        c = load_latest(run.path, stage=1, modules=("generator_ema", "fake_score"), require=("step",))
    if c is None:
        raise ConfigError(f"{what} needs a finished stage 1: no stage-1 checkpoint in {run.checkpoints}")
    return c


def main(argv=None) -> int:
    args = parse_args(argv)
    run = None
    try:
        cfg, run, env = resolve(args)
        if not env.main:
            logging.getLogger("rtdmd").setLevel(logging.WARNING)  # rank 0 speaks for the run
        log.info("run folder: %s (device %s%s)", run.path, env.device,
                 f", {env.world} processes, {env.strategy}" if env.active else "")
        run.open_sinks(cfg)
        train(cfg, run, env, args.stage)
    except ConfigError:
        if run is not None and run.writer and run.created and list_checkpoints(run.path) == run.made_with:
            run.unlock()  # a user error before any work was saved: leave no half-made run folder behind
            shutil.rmtree(run.path, ignore_errors=True)
        raise
    except KeyboardInterrupt:
        if run is None:
            raise CLIExit(130, "before the run started; nothing was saved") from None
        newest = latest_checkpoint(run.path)
        saved = f"the newest checkpoint is {newest.name}" if newest else "no checkpoint was saved yet"
        raise CLIExit(130, f"{saved}; continue with: python -m rtdmd.train --resume {run.path}") from None
    except NonFiniteStep as e:
        raise CLIExit(1, str(e)) from None
    finally:
        if run is not None:
            run.unlock()
        distributed.shutdown()
    return 0


def train(cfg: Config, run: RunFolder, env: DistEnv, stage: str) -> None:
    """The stages of ``stage`` (``ac_dmd``, ``rtdmd`` or ``all``) in ``run``, for the toy and real models alike:
    the world (:mod:`rtdmd.worlds`) provides the networks, prompts, rewards and evaluation."""
    world = make_world(cfg, env, run)
    world.prepare()
    for name in ["ac_dmd", "rtdmd"] if stage == "all" else [stage]:
        number = 1 if name == "ac_dmd" else 2
        stage1 = stage1_checkpoint(run) if number == 2 else None
        generator, fake, teacher = world.networks(number, stage1)
        state = init_state(number, generator, fake, cfg)
        rewards = world.rewards() if number == 2 else None

        def make_loop(state, number=number, teacher=teacher, rewards=rewards):
            if number == 1:
                return Stage1(state, teacher, world.prompts(1), cfg, env)
            return Stage2(state, teacher, world.prompts(2), rewards, cfg, env)

        state = run_or_resume(name, state, make_loop, cfg, run, env, evaluate=world.evaluator(number, rewards))
        world.finish_stage(name, state)
    world.finish()


def run_or_resume(name: str, state: StageState, make_loop, cfg: Config, run: RunFolder, env: DistEnv,
                  evaluate=None) -> StageState:
    """Continue ``state`` from the run's newest checkpoint of its stage, train what is left, and keep a checkpoint
    of an untrained (0-step) stage so that the next stage can start from it; returns the (wrapped) state."""
    state = env.wrap(state)  # for ddp / fsdp, before anything is loaded or trained
    with user_errors():
        latest = load_latest(run.path, stage=state.STAGE, modules=state.MODULES, require=(state.COUNTER,),
                             on_skip=lambda path, why: log.warning("not resuming from %s", why))
    if latest is not None:
        state.load(latest, env)
        log.info("%s: resuming from %s", name, latest.path.name)
    state.apply_optimizer_config(cfg)  # what the config says now, also over a loaded optimizer state
    total = cfg.stage1.steps if state.STAGE == 1 else cfg.stage2.steps
    state.trained_now = state.index < total or latest is None
    if state.trained_now:
        extra = {"evaluate": evaluate} if evaluate is not None else {}
        make_loop(state).run(log_fn=run.log, run_dir=run.path, progress=cfg.log.progress, **extra)
        if total == 0:
            keep = cfg.stage1.keep_checkpoints if state.STAGE == 1 else cfg.stage2.keep_checkpoints
            state.save(run.path, keep, env)
    return state


if __name__ == "__main__":
    sys.exit(run_cli("python -m rtdmd.train", main))

