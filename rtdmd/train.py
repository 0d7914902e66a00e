"""``python -m rtdmd.train``: the RTDMD trainer's entry point (docs/training.md §1).

With no arguments it runs the toy world (docs/toy.md): builds the analytic teacher, pretrains (or loads
the cached) base network, evaluates the ``teacher`` floor and ``base_4step`` rows, then the stages.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import shutil
import sys
import time

import torch

if __name__ == "__main__":  # before the first import of a trainer dependency: one line and exit 2 if one is missing
    from ._deps import require_trainer_packages

    require_trainer_packages("python -m rtdmd.train")

from . import distributed
from .checkpoint import Checkpoint, latest_checkpoint, list_checkpoints, load_latest
from .cli import ArgumentParser, CLIExit, resolve_device, run_cli
from .config import Config, ConfigError, changed_keys, load_config, resumable
from .run import RunFolder
from .stages.common import NonFiniteStep

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


def resolve(args) -> tuple[Config, RunFolder]:
    """The config and run folder from the arguments; every user error is a ConfigError (exit 2)."""
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
        return cfg, run
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
    return cfg, run if run is not None else RunFolder(path, writer=False)


def newest_world_size(run: RunFolder) -> int | None:
    """The world size the run's newest readable checkpoint was saved with (None: no checkpoint says)."""
    for path in reversed(list_checkpoints(run.path)):
        try:
            return json.loads((path / "state.json").read_text(encoding="utf-8")).get("world_size")
        except (OSError, ValueError, AttributeError):
            continue  # a broken one is reported when it is loaded
    return None


def join(cfg: Config) -> distributed.DistEnv:
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
        from .rewards import check_reward_specs

        with user_errors():
            check_reward_specs(cfg)
    if cfg.model.kind != "toy":
        from .data import load_prompts
        from .models.diffusion import check_model_paths

        with user_errors():
            check_model_paths(cfg.model, device)
            load_prompts(cfg.data.train_prompts, key="data.train_prompts")
            for key in ("stage2_prompts", "eval_prompts"):
                if getattr(cfg.data, key):
                    load_prompts(getattr(cfg.data, key), key=f"data.{key}")


@contextlib.contextmanager
def user_errors():
    """A ``ValueError`` from loading the user's files (a wrong path, a folder that is not a model) is a user
    error: one line and exit 2 through :func:`run_cli`."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from e


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
        cfg, run = resolve(args)
        env = distributed.current()
        device = env.device if env.active else resolve_device(cfg.device)
        if not env.main:
            logging.getLogger("rtdmd").setLevel(logging.WARNING)  # rank 0 speaks for the run
        log.info("run folder: %s (device %s%s)", run.path, device,
                 f", {env.world} processes, {env.strategy}" if env.active else "")
        run.open_sinks(cfg)
        if cfg.model.kind == "toy":
            toy_main(cfg, run, device, args.stage)
        else:
            diffusion_main(cfg, run, device, args.stage)
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


def toy_main(cfg: Config, run: RunFolder, device: torch.device, stage: str) -> None:
    """The toy world: base, teacher and base_4step rows, then the stages that exist."""
    from .evaluate import ToyEvaluator, format_table, generate_samples
    from .models.toy import build_world, pretrain_base
    from .plot import plot_toy_rows

    env = distributed.current()
    start = time.perf_counter()
    world = build_world(cfg)
    if not env.main:
        env.barrier()  # rank 0 pretrains (or loads) the base first; the others then find it in the cache
    base, info = pretrain_base(world, cfg, device=device, log_fn=run.log, progress=cfg.log.progress and env.main)
    if env.main:
        env.barrier()
    seconds = {"base_pretraining": round(info["seconds"], 2)}
    log.info("base network: %s (%s)", "loaded from cache" if info["cached"] else "pretrained", info["path"])

    t = cfg.toy
    evaluator = ToyEvaluator(world, n_eval=t.n_eval, beta=t.beta, beta_max=t.beta_max, beta_step=t.beta_step,
                             seed=cfg.seed)
    # sampling is collective (each rank its block); the metrics are rank 0's
    done = run.summary().get("eval", {}) if env.main else {"teacher": 0, "base_4step": 0, "ac_dmd": 0, "rtdmd": 0}
    rows, pictures = {}, {"teacher": evaluator.tilted_samples(0.0, "eval/teacher_b")}
    if "teacher" not in done:
        rows["teacher"] = evaluator.teacher_row()
    base_samples = generate_samples(base, evaluator, cfg, device)
    pictures["base_4step"] = base_samples
    if "base_4step" not in done:
        rows["base_4step"] = evaluator.row(base_samples)
    seconds["eval"] = round(time.perf_counter() - start - info["seconds"], 2)
    log_rows(run, rows)
    summary = run.update_summary(preset=cfg.preset, rows=rows, seconds=seconds)

    for name in ["ac_dmd", "rtdmd"] if stage == "all" else [stage]:
        state = run_stage(name, cfg, run, device, world, base)
        pictures[name] = generate_samples(state.ema.module, evaluator, cfg, device)
        trained = env.main and (name not in done or state.trained_now)
        rows = {name: evaluator.row(pictures[name])} if trained else {}
        log_rows(run, rows)
        summary = run.update_summary(preset=cfg.preset, rows=rows, seconds={name: round(state.seconds, 2)})
    if env.main:
        plot_toy_rows(world, evaluator.prompt_idx, pictures, run.path / "samples.png")
        print(format_table(summary["eval"]))
        print(f"run folder: {run.path}")


def diffusion_main(cfg: Config, run: RunFolder, device: torch.device, stage: str) -> None:
    """A real backbone (SD3/SD3.5, FLUX.2-klein): the stages, then the generator exported as a diffusers LoRA
    after each (``<run>/lora/stage1``, ``<run>/lora/stage2``: stage 1 + stage 2 combined)."""
    from .models.diffusion import export_lora, load_core
    from .rewards import build_rewards
    from .stages import ac_dmd, rtdmd

    env = distributed.current()
    lines, core = [], None
    for name in ["ac_dmd", "rtdmd"] if stage == "all" else [stage]:
        if core is None or env.strategy == "fsdp":  # FSDP2 shards what exists: stage 2's adapters need a fresh base
            core = None
            with user_errors():
                core = load_core(cfg.model, device)
        if name == "ac_dmd":
            state, teacher = ac_dmd.init_lora_state(core, cfg)
            total = cfg.stage1.steps
            make_loop = functools.partial(ac_dmd.Stage1, state, teacher, stage_prompts(cfg, 1), cfg, device)
        else:
            s1_modules = stage1_checkpoint(run).modules
            state, teacher = rtdmd.init_lora_state(core, cfg, s1_modules)
            total = cfg.stage2.steps
            with user_errors():
                rewards = build_rewards(cfg, device=device)
            make_loop = functools.partial(rtdmd.Stage2, state, teacher, stage_prompts(cfg, 2), rewards, cfg, device)
        run_or_resume(name, state, total, make_loop, cfg, run,
                      evaluate=stage2_evaluator(cfg, run, rewards) if name == "rtdmd" else None)
        ema = distributed.full_state(state.ema.state_dict())  # a collective under fsdp
        loras = [ema] if name == "ac_dmd" else [s1_modules["generator_ema"], ema]
        out = run.path / "lora" / ("stage1" if name == "ac_dmd" else "stage2")
        if run.writer:
            export_lora(core, loras, cfg.model, out)
        run.update_summary(preset=cfg.preset, seconds={name: round(state.seconds, 2)})
        lines.append(f"{name}: {total} {'steps' if name == 'ac_dmd' else 'epochs'} in {state.seconds:.0f} s; "
                     f"generator LoRA (diffusers format): {out}")
    if run.writer:
        print("\n".join(lines))
        print(f"run folder: {run.path}")


def stage_prompts(cfg: Config, stage: int) -> list:
    """The prompts a real stage trains on: ``data.train_prompts``; stage 2's ``data.stage2_prompts`` when set (the
    reference: PickScore prompts in stage 1, GenEval's metadata prompts in stage 2)."""
    from .data import load_prompts

    key = "data.stage2_prompts" if stage == 2 and cfg.data.stage2_prompts else "data.train_prompts"
    with user_errors():
        return load_prompts(cfg.data.stage2_prompts if key == "data.stage2_prompts" else cfg.data.train_prompts,
                            key=key)


def stage2_evaluator(cfg: Config, run: RunFolder, rewards):
    """The periodic evaluation of a real stage 2 (``stage2.eval_every``): ``eval.num_images`` images of
    ``data.eval_prompts`` from the EMA generator, their reward table in metrics.jsonl (stage ``eval``) and a grid
    ``eval/stage2-epoch-N.png``; None when there is nothing to evaluate on."""
    if not cfg.stage2.eval_every or not cfg.data.eval_prompts:
        return None
    from .data import load_prompts
    from .evaluate.images import evaluate_rows, image_grid

    with user_errors():
        prompts = load_prompts(cfg.data.eval_prompts, key="data.eval_prompts")
    prompts = [prompts[i % len(prompts)] for i in range(cfg.eval.num_images)]

    def evaluate(epoch: int, generator) -> None:
        rows, images = evaluate_rows({"rtdmd": generator}, rewards, prompts, steps=cfg.schedule.denoising_steps,
                                     shift=cfg.schedule.shift, eta=cfg.schedule.eta, seed=cfg.seed,
                                     batch_size=cfg.eval.batch_size, decode_chunk=cfg.stage2.decode_batch_size)
        run.log({"stage": "eval", "step": epoch, "row": "rtdmd", **rows["rtdmd"]})
        if run.writer:
            image_grid(images, run.path / "eval" / f"stage2-epoch-{epoch}.png")

    return evaluate


def run_or_resume(name: str, state, total: int, make_loop, cfg: Config, run: RunFolder, evaluate=None) -> None:
    """Continue ``state`` from the run's newest checkpoint of its stage, train what is left, and keep a checkpoint
    of an untrained (0-step) stage so that the next stage can start from it."""
    from . import checkpoint as ck

    distributed.current().prepare(state, cfg)  # wrap for ddp / fsdp before anything is loaded or trained
    with user_errors():
        latest = ck.load_latest(run.path, stage=state.STAGE, modules=state.MODULES, require=(state.COUNTER,),
                                on_skip=lambda path, why: log.warning("not resuming from %s", why))
    if latest is not None:
        state.load(latest)
        log.info("%s: resuming from %s", name, latest.path.name)
    state.apply_optimizer_config(cfg)  # what the config says now, also over a loaded optimizer state
    state.trained_now = state.index < total or latest is None
    if state.trained_now:
        extra = {"evaluate": evaluate} if evaluate is not None else {}
        make_loop().run(log_fn=run.log, run_dir=run.path, progress=cfg.log.progress, **extra)
        if total == 0:
            state.save(run.path, cfg.stage1.keep_checkpoints if state.STAGE == 1 else cfg.stage2.keep_checkpoints)


def log_rows(run: RunFolder, rows: dict[str, dict]) -> None:
    for name, row in rows.items():
        run.log({"stage": "eval", "step": 0, "row": name, **row})


def run_stage(name: str, cfg: Config, run: RunFolder, device: torch.device, world, base):
    """Stage ``name`` (``ac_dmd`` from the base network, ``rtdmd`` from the run's stage-1 result), or continued
    from the run's newest checkpoint of that stage; a finished stage is only loaded."""
    from .models.toy import ExactTeacher, build_network
    from .rewards import build_rewards
    from .stages import ac_dmd, rtdmd

    def build():
        return build_network(world, cfg.model).to(device)

    teacher = ExactTeacher(world).to(device)
    if name == "ac_dmd":
        state, total = ac_dmd.init_state(base, cfg, build), cfg.stage1.steps
        make_loop = lambda: ac_dmd.Stage1(state, teacher, world.prompts(), cfg, device)  # noqa: E731
    else:
        state, total = rtdmd.init_state(stage1_checkpoint(run), cfg, build), cfg.stage2.steps
        make_loop = lambda: rtdmd.Stage2(state, teacher, world.prompts(), build_rewards(cfg, world), cfg, device)  # noqa: E731
    run_or_resume(name, state, total, make_loop, cfg, run)
    return state


if __name__ == "__main__":
    sys.exit(run_cli("python -m rtdmd.train", main))

