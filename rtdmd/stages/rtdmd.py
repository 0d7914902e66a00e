"""Stage 2: RTDMD — SubGRPO, reward back-propagation and the AC-DMD aux (docs/method.md §5-§8).

One epoch: pick the PPO steps (SubGRPO, §6); roll out K samples per prompt with fresh noise at the PPO
steps and prompt-shared noise at the others (§2.3); score the rewards; one fake-score step on all
final samples (σ_s = 0, §8); group advantages in the reference's weighted mode (``rk.group_advantages``)
and zero-advantage filtering (§5.3); then ``num_batches`` sub-batches, each running the generator once
per trained step ``j ∈ ppo_steps ∪ {K-1}``: ``rk.ppo_clip_loss`` at the PPO steps, and at the last step
the AC-DMD aux (``rk.ac_dmd_loss``, weight ``aux_weight``) and reward back-propagation
(``bp_scale · mean relu(margin - R)``) sharing that one forward; one AdamW step per epoch.
With ``bp_steps = k > 1`` the reward is back-propagated through the last k steps by re-running them from
the stored latent with the stored noises through ``rk.checkpointed_rollout`` (docs/method.md §7, our extension).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from tqdm.auto import tqdm

import rtdmd_kernels as rk

from .. import rng
from ..distributed import DistEnv
from ..models.base import Backbone
from ..rewards import RewardMixture
from ..rollout import Rollout, rollout
from ..sigmas import sigma_tensor
from .common import (
    StageState,
    StepGuard,
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

STAGE = 2
STREAM = "stage2"


def ppo_step_subset(seed: int, epoch: int, step_range: Sequence[int], num: int) -> list[int]:
    """SubGRPO's step subset of an epoch (docs/method.md §6): the reference's Python ``Random`` seeded per epoch, so
    every rank draws the same subset without a collective."""
    lo, hi = step_range
    return sorted(random.Random(seed + 100000 * epoch + 104729).sample(range(lo, hi + 1), num))


def prompt_shared_noise(prompt: str, step: int, epoch: int, shape: Sequence[int]) -> torch.Tensor:
    """The reference's prompt-deterministic noise (docs/method.md §2.3): a CPU generator seeded with
    ``(sha256(prompt)[:4] big-endian + step·10007 + epoch·100000) mod 2^31``; every member of the
    prompt's group (on any rank) gets the same draw."""
    head = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")
    g = torch.Generator().manual_seed((head + step * 10007 + epoch * 100000) % 2**31)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


@dataclass
class Stage2State(StageState):
    """Stage 2's models and progress; ``epoch`` counts epochs (one generator step each)."""

    STAGE: ClassVar[int] = STAGE
    COUNTER: ClassVar[str] = "epoch"

    @property
    def epoch(self) -> int:
        return self.index

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.index = value

    @classmethod
    def ema_config(cls, cfg) -> tuple[float, str]:
        return cfg.stage2.ema_decay, cfg.stage2.ema_dtype

    @classmethod
    def optimizer_config(cls, cfg) -> dict[str, dict]:
        s2 = cfg.stage2
        common = dict(betas=tuple(s2.adam_betas), eps=s2.adam_eps)
        return {"gen": {"lr": s2.lr, "weight_decay": s2.weight_decay, **common},
                "fake": {"lr": s2.fake_lr, "weight_decay": 0.0, **common}}


@dataclass
class EpochData:
    """One epoch's rollout with its rewards and advantages (CPU or device tensors)."""

    prompts: list[str]
    group: torch.Tensor
    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    noises: torch.Tensor
    rewards: torch.Tensor
    index: list[int] = field(default_factory=list)  # each row's global sample index (the RNG contract's)
    advantages: torch.Tensor = field(default_factory=lambda: torch.empty(0))


@dataclass
class SubBatch:
    """One policy sub-batch: its rows of the epoch (on the device, and as a host list), prompts, generator
    conditioning and advantages."""

    rows: torch.Tensor
    row_list: list[int]
    prompts: list[str]
    cond: object
    adv: torch.Tensor

    @classmethod
    def of(cls, data: EpochData, rows: torch.Tensor, generator: Backbone, device: torch.device) -> SubBatch:
        row_list = rows.tolist()  # rows live on the host: read them there, before the move (no syncs)
        rows = rows.to(device)
        prompts = [data.prompts[i] for i in row_list]
        return cls(rows, row_list, prompts, generator.encode(prompts), data.advantages[rows])


class Stage2:
    """RTDMD epochs on ``prompts`` against ``teacher`` with ``rewards``."""

    def __init__(self, state: Stage2State, teacher: Backbone, prompts: list[str], rewards: RewardMixture, cfg,
                 env: DistEnv):
        self.s = state
        self.env = env
        self.teacher = teacher
        self.all_prompts = list(prompts)
        self.rewards = rewards
        self.cfg = cfg
        self.s1, self.s2 = cfg.stage1, cfg.stage2
        self.device = env.device
        self.sigmas = stage_sigmas(cfg, state.generator)
        self.num_steps = len(self.sigmas) - 1
        self.eta = cfg.schedule.eta
        self.guidance = teacher_guidance(cfg)
        self.shape = tuple(state.generator.latent_shape)
        self.prompt_ids = {p: i for i, p in reversed(list(enumerate(self.all_prompts)))}  # first occurrence
        if self.s2.num_batches % self.env.world:
            raise ValueError(f"stage2.num_batches ({self.s2.num_batches}, over all processes) must be a multiple "
                             f"of the {self.env.world} processes")
        self.local_batches = self.s2.num_batches // self.env.world
        self.guard = StepGuard("stage 2 (rtdmd)", "epoch", cfg.nonfinite, env)

    # ------------------------------------------------------------------ rollout
    def epoch_prompts(self, epoch: int) -> list[str]:
        """The epoch's prompts by the K-repeat sampler (:func:`rtdmd.rng.k_repeat_epoch`); sample ``i`` of the
        epoch is ``list[i]``."""
        s2 = self.s2
        order = rng.k_repeat_epoch(self.cfg.seed, epoch, len(self.all_prompts), s2.group_size,
                                   s2.prompts_per_epoch, s2.sampling_batches)
        return [self.all_prompts[i] for i in order]

    def collect(self, epoch: int, ppo_steps: list[int]) -> EpochData:
        everyone = self.epoch_prompts(epoch)
        idx = self.env.split(len(everyone), "stage2 samples per epoch (prompts x group_size)")
        prompts = [everyone[i] for i in idx]  # this rank's block; draws follow the global index
        n = len(prompts)
        x_t = rng.normal(self.cfg.seed, f"{STREAM}/x_T", epoch, idx, self.shape, device=self.device)
        noises = []
        for j in range(self.num_steps):
            if j in ppo_steps:  # fresh per-sample noise: the steps the policy gradient credits
                noises.append(rng.normal(self.cfg.seed, f"{STREAM}/xi{j}", epoch, idx, self.shape, device=self.device))
            else:  # prompt-shared noise: removes this step's variance from the group's reward differences
                noises.append(torch.stack([prompt_shared_noise(p, j, epoch, self.shape) for p in prompts])
                              .to(self.device))
        noises = torch.stack(noises)
        gen = self.s.generator
        was_training = gen.training
        gen.eval()
        chunk = self.s2.sample_batch_size or n  # the reference rolls out sample_batch_size at a time
        parts = []
        try:
            for start in range(0, n, chunk):
                sl = slice(start, start + chunk)
                parts.append(rollout(gen.velocity_fn(gen.encode(prompts[sl])), x_t[sl], self.sigmas, eta=self.eta,
                                     noises=noises[:, sl]))
        finally:
            gen.train(was_training)
        ro = parts[0] if len(parts) == 1 else Rollout(
            trajectory=torch.cat([r.trajectory for r in parts]), log_probs=torch.cat([r.log_probs for r in parts]),
            noises=torch.cat([r.noises for r in parts]), sigmas=parts[0].sigmas)
        with torch.no_grad():
            images = gen.decode(ro.final, chunk=self.s2.decode_batch_size)
        scores = self.rewards.score_all(images, prompts)
        group = torch.tensor([self.prompt_ids[p] for p in prompts], device=self.device)
        return EpochData(prompts, group, ro.latents, ro.next_latents, ro.log_probs, ro.noises, scores, list(idx))

    # ------------------------------------------------------------------ the three updates
    def fake_update(self, data: EpochData, epoch: int) -> dict[str, torch.Tensor]:
        """One fake-score step on every rollout sample's final x0 (σ_s = 0), in chunks (docs/method.md §8, §13.10)."""
        x_s = data.next_latents[:, -1]
        n = x_s.shape[0]
        sigma_s = torch.zeros(n, device=self.device)
        ac, consistency = self.cfg.ac_dmd, self.s2.consistency
        sub = draw_subinterval(self.cfg.seed, f"{STREAM}/fake", epoch, data.index, 0.0, self.shape, ac,
                               device=self.device, consistency=consistency)
        total = {}
        for start in range(0, n, self.s2.fake_batch_size):
            sl = slice(start, start + self.s2.fake_batch_size)
            chunk = sub.select(sl)
            cond = self.s.fake.encode(data.prompts[sl])  # per chunk: a real text encoder never sees the epoch
            loss, stats = fake_score_objective(self.s.fake, x_s[sl], sigma_s[sl], cond, chunk, ac,
                                               consistency=consistency, eta=self.eta)
            frac = x_s[sl].shape[0] / n
            (loss * frac).backward()
            for k, v in stats.items():
                total[k] = total.get(k, 0) + v * frac
        total["fake_grad_norm"] = self.guard.step(self.s.fake, self.s.fake_opt, self.s2.grad_clip, epoch, total,
                                                  "fake_grad_norm")
        return total

    def advantages(self, data: EpochData) -> torch.Tensor:
        """The reference's weighted multi-reward mode (docs/method.md §5.3): per reward, prompt mean and global std
        (ddof 0, +1e-4); weighted sum; re-standardised — over the rewards of every rank (gathered), of which
        this rank keeps its block."""
        rewards, group = self.env.all_gather(data.rewards), self.env.all_gather(data.group)
        adv = rk.group_advantages(rewards, group, num_groups=len(self.all_prompts), scale="global",
                                  ddof=0, eps=1e-4, weights=self.rewards.weights, restandardize=True)
        n = data.rewards.shape[0]
        return adv[self.env.rank * n: (self.env.rank + 1) * n]

    def select_rows(self, adv: torch.Tensor, epoch: int) -> torch.Tensor:
        """Zero-advantage filtering (docs/method.md §5.3): drop rows with advantage exactly 0; if all are dropped keep
        ``num_batches`` random rows; pad with random dropped rows to a multiple of ``num_batches``."""
        nb = self.local_batches
        n = adv.shape[0]
        order = torch.from_numpy(rng.integers(self.cfg.seed, f"{STREAM}/filter", epoch, 0, 2**62, size=n)).argsort()
        keep_mask = (adv != 0).cpu()
        kept = [int(i) for i in order if keep_mask[i]]
        dropped = [int(i) for i in order if not keep_mask[i]]
        if not kept:
            kept, dropped = dropped[:nb], dropped[nb:]
        while len(kept) % nb and dropped:
            kept.append(dropped.pop(0))
        perm = torch.from_numpy(rng.integers(self.cfg.seed, f"{STREAM}/perm", epoch, 0, 2**62, size=len(kept)))
        return torch.tensor(kept)[perm.argsort()]

    # ------------------------------------------------------------------ the policy update, term by term
    def terms_at(self, j: int, ppo_steps: list[int]) -> tuple[str, ...]:
        """The loss terms trained at sampler step ``j`` (docs/method.md §8): ``ppo`` at SubGRPO's steps, and at the
        last step ``aux`` (AC-DMD) and ``bp`` (reward back-propagation), all sharing one generator forward; a term
        whose weight is 0 is left out."""
        s2, last = self.s2, self.num_steps - 1
        applies = {"ppo": j in ppo_steps and s2.ppo_weight > 0,
                   "aux": j == last and s2.aux_weight > 0,
                   "bp": j == last and s2.bp_scale > 0 and bool(self.rewards.backprop_names)}
        return tuple(term for term, on in applies.items() if on)

    def step_loss(self, terms: tuple[str, ...], j: int, data: EpochData, batch: SubBatch, epoch: int
                  ) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
        """One generator forward at step ``j`` on a sub-batch and the weighted sum of ``terms`` there, with each
        term's statistics (detached)."""
        s2, gen, rows = self.s2, self.s.generator, batch.rows
        s, sn = self.sigmas[j], self.sigmas[j + 1]
        x_j = data.latents[rows, j]
        v = gen.velocity(x_j, torch.full((len(rows),), s, device=self.device), batch.cond)
        loss, stats = torch.zeros((), device=self.device), {}
        if "ppo" in terms:
            l_ppo, st = rk.ppo_clip_loss(x_j, v, data.next_latents[rows, j], data.log_probs[rows, j], batch.adv, s, sn,
                                         eta=self.eta, clip_range=s2.clip_range, adv_clip=s2.adv_clip,
                                         return_stats=True)
            loss = loss + s2.ppo_weight * l_ppo
            stats["ppo"] = {"ppo_loss": l_ppo, "clip_fraction": st["clip_fraction"], "ratio_mean": st["ratio_mean"]}
        if "aux" in terms or "bp" in terms:  # the last step's x0 with gradient, shared by both terms
            x_s, _ = rk.cps_step(x_j, v, s, sn, eta=self.eta, noise=data.noises[rows, j])
        if "aux" in terms:
            sub = draw_subinterval(self.cfg.seed, f"{STREAM}/aux", epoch, [data.index[i] for i in batch.row_list], sn,
                                   self.shape, self.cfg.ac_dmd, device=self.device, consistency=False)
            uncond = self.teacher.encode([""] * len(rows)) if self.guidance != 1.0 else None
            l_aux, _ = generator_ac_dmd_loss(x_s, torch.full((len(rows),), sn, device=self.device),
                                             encode_for(self.teacher, batch.prompts, batch.cond, like=gen), uncond,
                                             self.teacher, self.s.fake, sub, guidance=self.guidance, eta=self.eta)
            loss = loss + s2.aux_weight * l_aux
            stats["aux"] = {"aux_loss": l_aux}
        if "bp" in terms:
            x_bp = x_s if s2.bp_steps == 1 else self._rerun_last_steps(data, rows, batch.cond)
            images = gen.decode(x_bp, chunk=s2.bp_batch_size, checkpoint=s2.vae_checkpointing)
            r = self.rewards.backprop_score(images, batch.prompts)
            l_bp = s2.bp_scale * torch.relu(s2.bp_margin - r).mean()
            loss = loss + l_bp
            stats["bp"] = {"bp_loss": l_bp}
        return loss, stats

    def policy_update(self, data: EpochData, rows: torch.Tensor, ppo_steps: list[int], epoch: int
                      ) -> dict[str, torch.Tensor]:
        """The epoch's generator step: every sub-batch runs each trained step's terms (:meth:`terms_at`), one
        backward per step, gradients accumulated; then one clipped, checked AdamW step and the EMA calls."""
        s2, gen = self.s2, self.s.generator
        plan = [(j, self.terms_at(j, ppo_steps)) for j in sorted(set(ppo_steps) | {self.num_steps - 1})]
        n_sub = min(self.local_batches, len(rows))
        calls = n_sub * len(plan)  # backward calls per optimizer step (the reference's 48)
        per_term = {"ppo": n_sub * len(ppo_steps), "aux": n_sub, "bp": n_sub}  # a statistic: mean over its calls
        sums: dict[str, torch.Tensor] = {}
        for b, sub_rows in enumerate(torch.tensor_split(rows, n_sub)):
            batch = SubBatch.of(data, sub_rows, gen, self.device)
            for j, terms in plan:
                if not terms:
                    continue  # no term at this step (e.g. the no-PPO ablation): skip its forward
                loss, stats = self.step_loss(terms, j, data, batch, epoch)
                (loss / calls).backward()
                for term, values in stats.items():
                    for k, v in values.items():
                        sums[k] = sums.get(k, 0) + v.detach() / per_term[term]
            if s2.ema_per_sub_batch and b < n_sub - 1:  # method.md §13.2: after every sub-batch, params not yet stepped
                self.s.ema.step(gen, epoch, s2.ema_interval)
        sums["gen_grad_norm"] = self.guard.step(gen, self.s.gen_opt, s2.grad_clip, epoch, sums, "gen_grad_norm")
        # the reference's last call comes after the optimizer step, with the incremented global step
        self.s.ema.step(gen, epoch + 1 if s2.ema_per_sub_batch else epoch, s2.ema_interval)
        return sums

    def _rerun_last_steps(self, data: EpochData, rows: torch.Tensor, cond) -> torch.Tensor:
        """Re-run the last ``bp_steps`` sampler steps from the stored latent with the stored noises, with
        gradient through every one of them (activation memory flat in k: ``rk.checkpointed_rollout``)."""
        k = self.s2.bp_steps
        start = self.num_steps - k
        noises = data.noises[rows, start:].transpose(0, 1)
        return rk.checkpointed_rollout(self.s.generator.velocity_fn(cond), data.latents[rows, start],
                                       sigma_tensor(self.sigmas[start:], self.device), eta=self.eta, noises=noises,
                                       grad_steps=None, checkpoint=True)

    # ------------------------------------------------------------------ the loop
    def epoch(self, epoch: int) -> dict[str, torch.Tensor]:
        ppo_steps = ppo_step_subset(self.cfg.seed, epoch, self.s2.ppo_step_range, self.s2.ppo_steps)
        data = self.collect(epoch, ppo_steps)
        stats = self.fake_update(data, epoch) if self.s2.aux_weight > 0 else {}
        data.advantages = self.advantages(data)
        rows = self.select_rows(data.advantages, epoch)
        stats.update(self.policy_update(data, rows, ppo_steps, epoch))
        w = self.rewards.weighted_sum(data.rewards)
        stats.update({f"reward_{n}": data.rewards[:, i].mean() for i, n in enumerate(self.rewards.names)})
        stats["reward_weighted"] = w.mean()
        stats["rows_kept"] = torch.tensor(float(len(rows)))
        return stats

    def run(self, *, log_fn: Callable[[dict], None] | None = None, run_dir=None, progress: bool = False,
            stop_at: int | None = None, evaluate: Callable[[int, Backbone], None] | None = None) -> Stage2State:
        """Train from ``state.epoch`` to ``stage2.steps`` (or ``stop_at``); ``evaluate(epoch, ema_generator)`` runs
        before every ``stage2.eval_every``-th epoch, as the reference evaluates with the EMA swapped in."""
        end = self.s2.steps if stop_at is None else min(stop_at, self.s2.steps)
        bar = tqdm(range(self.s.epoch, end), desc="stage 2 (RTDMD)", disable=show_progress(progress, self.env),
                   leave=False, initial=self.s.epoch, total=end)
        t0 = time.perf_counter() - self.s.seconds
        for epoch in bar:
            if evaluate is not None and self.s2.eval_every and epoch % self.s2.eval_every == 0:
                evaluate(epoch, self.s.ema.module)
            stats = self.epoch(epoch)
            self.s.epoch = epoch + 1
            self.s.seconds = time.perf_counter() - t0
            log_now = log_fn is not None and (epoch % max(1, self.cfg.log.interval // 10) == 0 or epoch + 1 == end)
            save_now = run_dir is not None and (self.s.epoch % self.s2.checkpoint_every == 0 or self.s.epoch == end)
            self.guard.check(newest_checkpoint(run_dir, 2))  # every epoch syncs (the zero-advantage filter)
            if log_now:
                log_fn({"stage": "rtdmd", "step": epoch, **log_record({**stats, **self.guard.stats()}, self.env),
                        "seconds": round(self.s.seconds, 2)})
            if save_now:
                self.s.save(run_dir, self.s2.keep_checkpoints, self.env)
        return self.s

