"""What a training run takes from the world it trains in — the analytic toy world or a real diffusers backbone —
so that :mod:`rtdmd.train` runs one loop over the stages for both (docs/training.md §1).

A :class:`World` provides, in the order the trainer asks:

- ``prepare()``: what comes before the stages (the toy: its pretrained base, the teacher and base_4step rows);
- ``networks(stage, stage1)``: a stage's trained generator and fake score (loaded: the base for stage 1, stage
  1's EMA generator and fake score for stage 2) and its frozen teacher;
- ``prompts(stage)``, ``rewards()`` and ``evaluator(stage, rewards)`` (periodic evaluation inside stage 2);
- ``finish_stage(name, state)``: the stage's result (the toy: its evaluation row; real models: the exported LoRA);
- ``finish()``: the end of the run (the toy: samples.png and the table; real models: where the LoRAs are).
"""

from __future__ import annotations

import logging
import time

from .checkpoint import Checkpoint
from .cli import user_errors
from .config import Config
from .data import load_prompts
from .distributed import DistEnv
from .dtensor import full_state
from .evaluate import ToyEvaluator, format_table, generate_samples
from .evaluate.images import evaluate_rows, image_grid
from .models.base import Backbone
from .models.diffusion import export_lora, load_core, stage1_models, stage2_models
from .models.toy import ExactTeacher, build_world, pretrain_base, stage_networks
from .plot import plot_toy_rows
from .rewards import RewardMixture, build_rewards
from .run import RunFolder
from .stages.common import StageState

log = logging.getLogger("rtdmd.train")


class World:
    """The interface :func:`rtdmd.train.train` runs against; see the module docstring."""

    def __init__(self, cfg: Config, env: DistEnv, run: RunFolder):
        self.cfg, self.env, self.run = cfg, env, run

    def prepare(self) -> None:
        pass

    def networks(self, stage: int, stage1: Checkpoint | None) -> tuple[Backbone, Backbone, Backbone]:
        raise NotImplementedError

    def prompts(self, stage: int) -> list:
        raise NotImplementedError

    def rewards(self) -> RewardMixture:
        raise NotImplementedError

    def evaluator(self, stage: int, rewards: RewardMixture | None):
        """``evaluate(epoch, ema_generator)`` for the stage's loop, or None."""
        return None

    def finish_stage(self, name: str, state: StageState) -> None:
        pass

    def finish(self) -> None:
        pass


class Toy(World):
    """The analytic toy world (docs/toy.md): its base network, exact teacher and exact evaluation rows."""

    def prepare(self) -> None:
        cfg, env, run = self.cfg, self.env, self.run
        start = time.perf_counter()
        self.world = build_world(cfg)
        if not env.main:
            env.barrier()  # rank 0 pretrains (or loads) the base first; the others then find it in the cache
        self.base, info = pretrain_base(self.world, cfg, device=env.device, log_fn=run.log,
                                        progress=cfg.log.progress and env.main)
        if env.main:
            env.barrier()
        log.info("base network: %s (%s)", "loaded from cache" if info["cached"] else "pretrained", info["path"])
        t = cfg.toy
        self.toy_eval = ToyEvaluator(self.world, n_eval=t.n_eval, beta=t.beta, beta_max=t.beta_max,
                                     beta_step=t.beta_step, seed=cfg.seed)
        # sampling is collective (each rank its block); the metrics are rank 0's
        self.done = run.summary().get("eval", {}) if env.main else dict.fromkeys(("teacher", "base_4step", "ac_dmd",
                                                                                 "rtdmd"), 0)
        rows = {}
        self.pictures = {"teacher": self.toy_eval.tilted_samples(0.0, "eval/teacher_b")}
        if "teacher" not in self.done:
            rows["teacher"] = self.toy_eval.teacher_row()
        self.pictures["base_4step"] = generate_samples(self.base, self.toy_eval, cfg, env)
        if "base_4step" not in self.done:
            rows["base_4step"] = self.toy_eval.row(self.pictures["base_4step"])
        seconds = {"base_pretraining": round(info["seconds"], 2),
                   "eval": round(time.perf_counter() - start - info["seconds"], 2)}
        _log_rows(run, rows)
        self.summary = run.update_summary(preset=cfg.preset, rows=rows, seconds=seconds)

    def networks(self, stage, stage1):
        weights = (self.base.state_dict(),) * 2 if stage == 1 else \
            (stage1.modules["generator_ema"], stage1.modules["fake_score"])
        generator, fake = stage_networks(self.world, self.cfg.toy, *weights, device=self.env.device)
        return generator, fake, ExactTeacher(self.world).to(self.env.device)

    def prompts(self, stage):
        return self.world.prompts()

    def rewards(self):
        return build_rewards(self.cfg, self.world)

    def finish_stage(self, name, state):
        self.pictures[name] = generate_samples(state.ema.module, self.toy_eval, self.cfg, self.env)
        trained = self.env.main and (name not in self.done or state.trained_now)
        rows = {name: self.toy_eval.row(self.pictures[name])} if trained else {}
        _log_rows(self.run, rows)
        self.summary = self.run.update_summary(preset=self.cfg.preset, rows=rows,
                                               seconds={name: round(state.seconds, 2)})

    def finish(self):
        if self.env.main:
            plot_toy_rows(self.world, self.toy_eval.prompt_idx, self.pictures, self.run.path / "samples.png")
            print(format_table(self.summary["eval"]))
            print(f"run folder: {self.run.path}")


class Diffusion(World):
    """A real backbone (SD3/SD3.5, FLUX.1, FLUX.2-klein) from local diffusers folders: LoRA training on one shared
    frozen base, and after each stage the generator exported as a diffusers LoRA (``<run>/lora/stage1``;
    ``<run>/lora/stage2``: stage 1 + stage 2 combined)."""

    def __init__(self, cfg, env, run):
        super().__init__(cfg, env, run)
        self.core, self.stage1, self.lines = None, None, []

    def networks(self, stage, stage1):
        if self.core is None or self.env.strategy == "fsdp":  # FSDP2 shards what exists: a fresh base per stage
            self.core = None
            with user_errors():
                self.core = load_core(self.cfg.model, self.env.device)
        if stage == 1:
            return stage1_models(self.core, self.cfg)
        self.stage1 = stage1
        return stage2_models(self.core, self.cfg, stage1.modules)

    def prompts(self, stage):
        """``data.train_prompts``; stage 2's ``data.stage2_prompts`` when set (the reference: PickScore prompts in
        stage 1, GenEval's metadata prompts in stage 2)."""
        data = self.cfg.data
        key = "stage2_prompts" if stage == 2 and data.stage2_prompts else "train_prompts"
        with user_errors():
            return load_prompts(getattr(data, key), key=f"data.{key}")

    def rewards(self):
        with user_errors():
            return build_rewards(self.cfg, device=self.env.device)

    def evaluator(self, stage, rewards):
        """Stage 2's periodic evaluation (``stage2.eval_every``): ``eval.num_images`` images of
        ``data.eval_prompts`` from the EMA generator, their reward table in metrics.jsonl (stage ``eval``) and a
        grid ``eval/stage2-epoch-N.png``; None when there is nothing to evaluate on."""
        cfg, run = self.cfg, self.run
        if stage != 2 or not cfg.stage2.eval_every or not cfg.data.eval_prompts:
            return None

        with user_errors():
            prompts = load_prompts(cfg.data.eval_prompts, key="data.eval_prompts")
        prompts = [prompts[i % len(prompts)] for i in range(cfg.eval.num_images)]

        def evaluate(epoch: int, generator) -> None:
            rows, images = evaluate_rows({"rtdmd": generator}, rewards, prompts, steps=cfg.schedule.denoising_steps,
                                         shift=cfg.schedule.shift, eta=cfg.schedule.eta, seed=cfg.seed,
                                         batch_size=cfg.eval.batch_size, decode_chunk=cfg.stage2.decode_batch_size,
                                         env=self.env)
            run.log({"stage": "eval", "step": epoch, "row": "rtdmd", **rows["rtdmd"]})
            if run.writer:
                image_grid(images, run.path / "eval" / f"stage2-epoch-{epoch}.png")

        return evaluate

    def finish_stage(self, name, state):
        ema = full_state(state.ema.state_dict())  # a collective under fsdp
        loras = [ema] if state.STAGE == 1 else [self.stage1.modules["generator_ema"], ema]
        out = self.run.path / "lora" / f"stage{state.STAGE}"
        if self.run.writer:
            export_lora(self.core, loras, self.cfg.model, out)
        self.run.update_summary(preset=self.cfg.preset, seconds={name: round(state.seconds, 2)})
        total = self.cfg.stage1.steps if state.STAGE == 1 else self.cfg.stage2.steps
        self.lines.append(f"{name}: {total} {'steps' if state.STAGE == 1 else 'epochs'} in {state.seconds:.0f} s; "
                          f"generator LoRA (diffusers format): {out}")

    def finish(self):
        if self.run.writer:
            print("\n".join(self.lines))
            print(f"run folder: {self.run.path}")


def make_world(cfg: Config, env: DistEnv, run: RunFolder) -> World:
    return Toy(cfg, env, run) if cfg.model.kind == "toy" else Diffusion(cfg, env, run)


def _log_rows(run: RunFolder, rows: dict[str, dict]) -> None:
    for name, row in rows.items():
        run.log({"stage": "eval", "step": 0, "row": name, **row})
