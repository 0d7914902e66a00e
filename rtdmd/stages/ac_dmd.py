"""Stage 1: AC-DMD cold-start distillation (docs/method.md §4.4).

Per step: the fake score is updated on a fresh no-grad generator unroll (random stop index, §2.2);
every ``fake_update_ratio``-th step the generator is updated on an independent unroll whose last
executed step carries gradient (``rk.checkpointed_rollout``, ``grad_steps=1``) through the AC-DMD loss
(``rk.ac_dmd_loss``); the model EMA follows every step. The step's randomness comes from the RNG
contract (stream ``stage1``), so a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from tqdm.auto import tqdm

import rtdmd_kernels as rk

from .. import rng
from ..distributed import DistEnv
from ..models.base import Backbone
from ..rollout import sample
from ..sigmas import sigma_tensor
from .common import (
    StageState,
    StepGuard,
    chain_round,
    draw_subinterval,
    encode_for,
    fake_score_objective,
    generator_ac_dmd_loss,
    log_record,
    newest_checkpoint,
    show_progress,
    stage_sigmas,
    teacher_guidance,
)

log = logging.getLogger(__name__)

STAGE = 1
STREAM = "stage1"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Stage1State(StageState):
    """Stage 1's models and progress; ``step`` counts fake-score updates."""

    STAGE: ClassVar[int] = STAGE
    COUNTER: ClassVar[str] = "step"

    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # of the latest generator update

    @property
    def step(self) -> int:
        return self.index

    @step.setter
    def step(self, value: int) -> None:
        self.index = value

    def extra_state(self) -> dict:
        return {"last_generator_stats": {k: float(v) for k, v in self.stats.items()}}

    @classmethod
    def ema_config(cls, cfg) -> tuple[float, str]:
        return cfg.stage1.ema_decay, cfg.stage1.ema_dtype

    @classmethod
    def optimizer_config(cls, cfg) -> dict[str, dict]:
        s1 = cfg.stage1
        common = dict(betas=tuple(s1.adam_betas), eps=s1.adam_eps, weight_decay=s1.weight_decay)
        return {"gen": {"lr": s1.generator_lr, **common}, "fake": {"lr": s1.fake_lr, **common}}

    def load_extra_state(self, state: dict) -> None:
        self.stats = {k: torch.tensor(v) for k, v in state.get("last_generator_stats", {}).items()}


class Stage1:
    """One AC-DMD training run over prompts ``prompts`` against ``teacher``."""

    def __init__(self, state: Stage1State, teacher: Backbone, prompts: list[str], cfg, env: DistEnv):
        self.s = state
        self.env = env
        self.teacher = teacher
        self.cfg = cfg
        self.s1 = cfg.stage1
        self.device = env.device
        self.sigmas = stage_sigmas(cfg, state.generator)
        self.num_steps = len(self.sigmas) - 1
        self.eta = cfg.schedule.eta
        self.chain = DTYPES[self.s1.chain_dtype]
        self.guidance = teacher_guidance(cfg)
        b = self.s1.batch_size
        # this rank's block of the global batch (all of it on one process): the RNG contract draws by global index
        self.indices = list(env.split(b, "stage1.batch_size"))
        # t_r and δ by local position share them over the ranks (the reference broadcasts them from rank 0)
        self.timestep_indices = list(range(len(self.indices))) if self.s1.rank_shared_timesteps else None
        self.prompt_pool = list(prompts)
        if not self.prompt_pool:
            raise ValueError("stage 1 needs at least one prompt")
        # The toy's few prompts are balanced (sample i conditions on prompt i mod P) and encoded once; a prompt
        # file is read in shuffled batches, one per step (the fake and generator updates share it).
        self.fixed = cfg.model.kind == "toy"
        self._conds_step, self._conds_cache = -1, None
        if self.fixed:
            self.prompts = [prompts[i % len(prompts)] for i in self.indices]
            self.fixed_conds = self._encode(self.prompts)
            self.cond, self.gen_cond = self.fixed_conds
        self.uncond = teacher.encode([""] * len(self.indices)) if self.guidance != 1.0 else None
        self.guard = StepGuard("stage 1 (ac_dmd)", "step", cfg.nonfinite, env)

    def _encode(self, prompts):
        """(teacher/fake conditioning, generator conditioning): the same text encoders, so usually one call."""
        cond = self.teacher.encode(prompts)
        return cond, encode_for(self.s.generator, prompts, cond, like=self.teacher)

    def _conds(self, step: int):
        """The step's conditioning, shared by its fake-score and generator updates: the toy's fixed prompts, or
        global batch ``step`` of a shuffled pass over the prompt file without replacement, as the reference's
        ``DistributedSampler`` (``rng.epoch_batch``); this rank keeps its block."""
        if self.fixed:
            return self.fixed_conds
        if step != self._conds_step:
            pick = rng.epoch_batch(self.cfg.seed, f"{STREAM}/prompts", step, len(self.prompt_pool),
                                   self.s1.batch_size)
            self._conds_step, self._conds_cache = step, self._encode([self.prompt_pool[pick[i]] for i in self.indices])
        return self._conds_cache

    # ------------------------------------------------------------------ pieces of one step
    def _stop(self, name: str, step: int) -> int:
        return rng.integers(self.cfg.seed, f"{STREAM}/{name}_stop", step, 1, self.num_steps + 1) \
            if self.s1.random_stop else self.num_steps

    def _unroll_inputs(self, name: str, step: int, stop: int):
        x_t = rng.normal(self.cfg.seed, f"{STREAM}/{name}/x_T", step, self.indices, self.s.generator.latent_shape,
                         device=self.device).to(self.chain)
        noises = torch.stack([rng.normal(self.cfg.seed, f"{STREAM}/{name}/xi{j}", step, self.indices,
                                         self.s.generator.latent_shape, device=self.device) for j in range(stop)])
        sigmas = sigma_tensor(self.sigmas[: stop + 1], self.device)
        sigma_s = chain_round(torch.full((len(self.indices),), self.sigmas[stop], device=self.device), self.chain)
        return x_t, noises, sigmas, sigma_s

    def fake_update(self, step: int) -> dict[str, torch.Tensor]:
        stop = self._stop("fake", step)
        x_t, noises, sigmas, sigma_s = self._unroll_inputs("fake", step, stop)
        cond, gen_cond = self._conds(step)
        x_s = sample(self.s.generator.velocity_fn(gen_cond), x_t, sigmas, eta=self.eta, noises=noises)
        sub = draw_subinterval(self.cfg.seed, f"{STREAM}/fake", step, self.indices, self.sigmas[stop],
                               self.s.generator.latent_shape, self.cfg.ac_dmd, device=self.device,
                               consistency=self.s1.consistency, timestep_indices=self.timestep_indices)
        loss, stats = fake_score_objective(self.s.fake, x_s, sigma_s, gen_cond, sub, self.cfg.ac_dmd,
                                           consistency=self.s1.consistency, eta=self.eta)
        loss.backward()
        stats["fake_grad_norm"] = self.guard.step(self.s.fake, self.s.fake_opt, self.s1.grad_clip, step, stats,
                                                  "fake_grad_norm")
        return stats

    def generator_update(self, step: int) -> dict[str, torch.Tensor]:
        stop = self._stop("gen", step)
        x_t, noises, sigmas, sigma_s = self._unroll_inputs("gen", step, stop)
        cond, gen_cond = self._conds(step)
        x_s = rk.checkpointed_rollout(self.s.generator.velocity_fn(gen_cond), x_t, sigmas, eta=self.eta,
                                      noises=noises, grad_steps=1, checkpoint=self.s1.rollout_checkpoint)
        sub = draw_subinterval(self.cfg.seed, f"{STREAM}/gen", step, self.indices, self.sigmas[stop],
                               self.s.generator.latent_shape, self.cfg.ac_dmd, device=self.device, consistency=False,
                               timestep_indices=self.timestep_indices)
        loss, stats = generator_ac_dmd_loss(x_s, sigma_s, cond, self.uncond, self.teacher, self.s.fake, sub,
                                            guidance=self.guidance, eta=self.eta)
        loss.backward()  # teacher and fake ran under no_grad: only the generator gets gradient
        stats["gen_grad_norm"] = self.guard.step(self.s.generator, self.s.gen_opt, self.s1.grad_clip, step, stats,
                                                 "gen_grad_norm")
        return stats

    def step(self, step: int) -> dict[str, torch.Tensor]:
        stats = self.fake_update(step)
        if (step + 1) % self.s1.fake_update_ratio == 0:
            stats.update(self.generator_update(step))
        self.s.ema.update(self.s.generator)
        return stats

    # ------------------------------------------------------------------ the loop
    def run(self, *, log_fn: Callable[[dict], None] | None = None, run_dir=None, progress: bool = False,
            stop_at: int | None = None) -> Stage1State:
        """Train from ``state.step`` to ``stage1.steps`` (or ``stop_at``), logging every ``log.interval`` steps
        and checkpointing every ``checkpoint_every`` steps and at the end when ``run_dir`` is given."""
        end = self.s1.steps if stop_at is None else min(stop_at, self.s1.steps)
        interval = self.cfg.log.interval
        bar = tqdm(range(self.s.step, end), desc="stage 1 (AC-DMD)", disable=show_progress(progress, self.env),
                   leave=False, initial=self.s.step, total=end)
        t0 = time.perf_counter() - self.s.seconds
        for step in bar:
            stats = self.step(step)
            if "gen_loss" in stats:  # the latest generator update's numbers ride along in every log line
                self.s.stats = {k: v for k, v in stats.items() if k.startswith(("gen", "dmd"))}
            self.s.step = step + 1
            self.s.seconds = time.perf_counter() - t0
            log_now = log_fn is not None and (step % interval == 0 or step + 1 == end)
            save_now = run_dir is not None and (self.s.step % self.s1.checkpoint_every == 0 or self.s.step == end)
            if log_now or save_now or step + 1 == end:  # where the loop syncs anyway
                self.guard.check(newest_checkpoint(run_dir, 1))
            if log_now:
                record = log_record({**self.s.stats, **stats, **self.guard.stats()}, self.env)
                log_fn({"stage": "ac_dmd", "step": step, **record, "seconds": round(self.s.seconds, 2)})
            if save_now:
                self.s.save(run_dir, self.s1.keep_checkpoints, self.env)
        return self.s
