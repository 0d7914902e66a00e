"""What both stages share: the AC-DMD sub-interval draws (docs/method.md §4.1), the fake-score objective (§4.2),
the generator's AC-DMD loss (§4.3), model EMA and optimizer steps. Every loss goes through
``rtdmd_kernels``; nothing here calls ``.item()``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

import rtdmd_kernels as rk

from .. import checkpoint as ck
from .. import rng
from ..distributed import DistEnv, check_resume_world
from ..dtensor import (
    full_optimizer_state,
    full_state,
    full_tensor,
    like_current,
    load_optimizer_state,
    local_tensor,
    resharded,
)
from ..models.base import Backbone, Cond
from ..sigmas import sd3_sigmas

NUM_TRAIN_TIMESTEPS = 1000


def stage_sigmas(cfg, model: Backbone) -> list[float]:
    """The σ schedule of the config's denoising steps by the backbone's rule (SD3's static shift, FLUX.2's
    dynamic shift; the toy is SD3-like)."""
    rule = getattr(model, "sigmas", None)
    if rule is not None:
        return rule(cfg.schedule.denoising_steps, cfg.schedule.shift)
    return sd3_sigmas(cfg.schedule.denoising_steps, cfg.schedule.shift)


def encode_for(model: Backbone, prompts, cond: Cond | None = None, like: Backbone | None = None) -> Cond:
    """``model``'s conditioning of ``prompts``, reusing ``cond`` (encoded by ``like``) when both models sit on the
    same text encoders — the real backbones' views share one core, and a T5-XXL forward is not free."""
    core = getattr(model, "core", None)
    if cond is not None and core is not None and getattr(like, "core", None) is core:
        return cond
    return model.encode(prompts)


#: statistics that are norms over a rank's own samples: combined over ranks as sqrt(sum of squares), not averaged
LOCAL_NORMS = ("dmd_grad_norm",)


def log_record(stats: dict[str, torch.Tensor], env: DistEnv) -> dict[str, float]:
    """Statistics for a log line, over all ranks (a collective: every rank calls it at the same steps) — means,
    and :data:`LOCAL_NORMS` as the norm over the whole batch — then the only host syncs of a step."""
    squared = {k: (v.float() ** 2 if k in LOCAL_NORMS else v) for k, v in stats.items()}
    out = env.mean(squared)
    return {k: float((v * env.world).sqrt() if k in LOCAL_NORMS else v) for k, v in out.items()}


def show_progress(progress: bool, env: DistEnv) -> bool | None:
    """tqdm's ``disable``: rank 0 only (None = auto: off when not a terminal)."""
    return None if progress and env.main else True


def teacher_guidance(cfg) -> float:
    """The teacher's CFG scale against ``""`` (``ac_dmd.teacher_guidance``); 1 (no CFG pass) for FLUX.1, whose
    guidance is a transformer input (:func:`rtdmd.models.diffusion.teacher_view`)."""
    return 1.0 if cfg.model.kind == "flux1" else cfg.ac_dmd.teacher_guidance


def chain_round(sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """σ as the reference's chain stores it: rounded through ``dtype`` (bf16: 0.9 -> 0.8984375), kept in fp32."""
    return sigma.to(dtype).float()


@dataclass
class SubInterval:
    """Per-sample draws of one AC-DMD sub-interval (docs/method.md §4.1-§4.2): the renoise timestep ``t_r`` (a
    float, as the reference draws it), ``sigma_t = t_r/1000`` (fp32, what the model sees), the renoise noise
    ``xi_r``, the shared transition noise ``xi_tr`` of the generator loss, and the consistency target
    ``sigma_p = max(t_r - δ, 0)/1000`` with its two transition noises."""

    t_r: torch.Tensor
    sigma_t: torch.Tensor
    xi_r: torch.Tensor
    xi_tr: torch.Tensor
    sigma_p: torch.Tensor
    xi_1: torch.Tensor
    xi_2: torch.Tensor

    def select(self, index: slice | torch.Tensor) -> SubInterval:
        """The draws of a subset of the samples (empty fields stay empty)."""
        return SubInterval(**{k: (v[index] if v.numel() else v) for k, v in vars(self).items()})


def draw_subinterval(seed: int, stream: str, step: int, indices: Sequence[int], sigma_s: float,
                     latent_shape: Sequence[int], ac, *, device: torch.device | str = "cpu",
                     consistency: bool = True, timestep_indices: Sequence[int] | None = None) -> SubInterval:
    """``t_r ~ U[1000σ_s + offset, max(1000, 1000σ_s + offset + 1))`` (continuous) clamped to ``[renoise_min,
    renoise_max]``, ``δ ~ U{1..consistency_epsilon}`` (the ``ac_dmd`` section ``ac``); noises from the per-sample
    RNG contract.

    ``sigma_s`` is the schedule's exact level (a Python float: 0.9 gives the range from 910, as the reference;
    the chain's rounded σ_s is only for the renoise arithmetic). ``t_r`` and δ are drawn by
    ``timestep_indices`` (default: the global ``indices``); passing every rank the same local positions shares
    them over the ranks, as the reference's broadcast from rank 0 does in stage 1 (docs/method.md §13.23)."""
    n = len(indices)
    empty = torch.empty(0)
    if not n:
        return SubInterval(*(empty,) * 7)
    at = indices if timestep_indices is None else timestep_indices
    lo = float(sigma_s) * NUM_TRAIN_TIMESTEPS + ac.renoise_offset
    hi = max(float(NUM_TRAIN_TIMESTEPS), lo + 1.0)
    t_r = (lo + rng.uniform(seed, f"{stream}/t_r", step, at) * (hi - lo)).float()
    t_r = t_r.clamp(float(ac.renoise_min), float(ac.renoise_max))
    delta = 1 + torch.floor(rng.uniform(seed, f"{stream}/delta", step, at) * ac.consistency_epsilon)
    t_p = torch.clamp(t_r - delta.float(), min=0.0)

    def noise(name):
        return rng.normal(seed, f"{stream}/{name}", step, indices, latent_shape, device=device)

    return SubInterval(
        t_r=t_r.to(device), sigma_t=(t_r / NUM_TRAIN_TIMESTEPS).to(device), xi_r=noise("xi_r"),
        xi_tr=noise("xi_tr"), sigma_p=(t_p / NUM_TRAIN_TIMESTEPS).to(device),
        xi_1=noise("xi_1") if consistency else empty, xi_2=noise("xi_2") if consistency else empty,
    )


def fake_score_objective(fake: Backbone, x_s: torch.Tensor, sigma_s: torch.Tensor, cond: Cond, sub: SubInterval,
                         ac, *, consistency: bool, eta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_fake = L_ac + γ·L_cons`` (docs/method.md §4.2) for generator samples ``x_s`` at level ``sigma_s`` (detached).

    ``x_t' = renoise(x_s)`` at ``σ_t``; the fake score regresses the conditional velocity of the ambient
    distribution (``rk.fake_score_loss``, shipped ``move_scale_out`` form with the clamped weight); the
    consistency term makes two no-grad CPS transitions with ``sg(v̂)`` to ``σ'`` and compares the fake x0
    predictions there (``rk.consistency_loss``). The chain's σ are rounded through ``x_s``'s dtype as the
    reference does; the network sees the exact ``t_r/1000``."""
    x_s = x_s.detach()
    s_t = chain_round(sub.sigma_t, x_s.dtype)
    x_t = rk.renoise(x_s, sub.xi_r, sigma_s, s_t)
    v_hat = fake.velocity(x_t, sub.sigma_t, cond)
    l_ac = rk.fake_score_loss(v_hat, x_s, sub.xi_r, sigma_s, s_t, weight_max=ac.fake_weight_max)
    stats = {"fake_ac": l_ac.detach()}
    loss = l_ac
    if consistency and ac.consistency_weight > 0:
        s_p = chain_round(sub.sigma_p, x_s.dtype)
        with torch.no_grad():
            x1, _ = rk.cps_step(x_t, v_hat.detach(), s_t, s_p, eta=eta, noise=sub.xi_1)
            x2, _ = rk.cps_step(x_t, v_hat.detach(), s_t, s_p, eta=eta, noise=sub.xi_2)
        v1 = fake.velocity(x1, sub.sigma_p, cond)
        v2 = fake.velocity(x2, sub.sigma_p, cond)
        l_cons = rk.consistency_loss(x_t, v_hat, s_t, x1, v1, x2, v2, s_p)
        stats["fake_cons"] = l_cons.detach()
        loss = loss + ac.consistency_weight * l_cons
    stats["fake_loss"] = loss.detach()
    return loss, stats


def generator_ac_dmd_loss(x_s: torch.Tensor, sigma_s: torch.Tensor, cond: Cond, uncond: Cond | None,
                          teacher: Backbone, fake: Backbone, sub: SubInterval, *, guidance: float, eta: float
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The generator's AC-DMD loss (docs/method.md §4.3): renoise ``x_s`` to ``σ_t``, teacher (CFG against ``uncond``
    when ``guidance != 1``) and fake velocities there, CPS transitions back to ``σ_s`` with one shared noise,
    and ``dmd_loss(x_s, xs_fake, xs_real)`` — fused in ``rk.ac_dmd_loss``. Gradient reaches ``x_s`` only."""
    s_t = chain_round(sub.sigma_t, x_s.dtype)
    with torch.no_grad():
        x_t = rk.renoise(x_s.detach(), sub.xi_r, sigma_s, s_t)
        v_real = teacher.velocity(x_t, sub.sigma_t, cond)
        v_uncond = teacher.velocity(x_t, sub.sigma_t, uncond) if guidance != 1.0 else None
        v_fake = fake.velocity(x_t, sub.sigma_t, cond)
    loss, stats = rk.ac_dmd_loss(x_s, x_t, v_real, v_fake, sub.xi_tr, sigma_s, s_t, v_real_uncond=v_uncond,
                                 guidance_scale=guidance, eta=eta, return_stats=True)
    return loss, {"gen_loss": loss.detach(), "dmd_grad_norm": stats["grad_norm"]}


def newest_checkpoint(run_dir, stage: int) -> str | None:
    """The name of the run's newest checkpoint of ``stage`` (for messages), or None."""
    path = ck.latest_checkpoint(run_dir, stage=stage) if run_dir is not None else None
    return path.name if path is not None else None


class NonFiniteStep(RuntimeError):
    """A training step went non-finite under ``nonfinite: stop``; the message is one line for the CLI."""


class StepGuard:
    """Finite or nothing for one stage's optimizer steps (docs/training.md §3.4).

    Before each step the gradients are averaged over ranks and clipped; the step's loss terms and gradient norm
    are checked on the device (no host sync), and the verdict is agreed by all ranks. ``policy="skip"`` undoes a
    non-finite step on the device (parameters and optimizer state restored from a copy taken before it) and
    counts it; ``policy="stop"`` records the first non-finite step and which terms went non-finite, and
    :meth:`check` — called where the loop syncs anyway (a log line, a checkpoint) — stops the run, before
    anything non-finite can be saved."""

    def __init__(self, stage: str, counter: str, policy: str, env: DistEnv):
        self.stage, self.counter, self.policy, self.env = stage, counter, policy, env
        device = env.device
        self.names: list[str] = []  # bit i of the masks below is names[i]
        self._bit_cache: dict[tuple[str, ...], torch.Tensor] = {}
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_terms = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)

    def _bits(self, names: tuple[str, ...]) -> torch.Tensor:
        """The mask bit of each name, as a device tensor made once per set of names (a host-to-device copy every
        step would wait for the device)."""
        if names not in self._bit_cache:
            self.names += [n for n in names if n not in self.names]
            self._bit_cache[names] = torch.tensor([1 << self.names.index(n) for n in names], dtype=torch.int64,
                                                  device=self.first_bad.device)
        return self._bit_cache[names]

    def step(self, model: nn.Module, opt: torch.optim.Optimizer, clip: float, index: int,
             terms: dict[str, torch.Tensor], norm_name: str) -> torch.Tensor:
        """Average the gradients over ranks (``ddp``; FSDP did it in backward), clip, check, step (or skip) and
        clear the gradients; returns the gradient norm as a tensor."""
        env = self.env
        env.sync_grads(model)
        params = [p for p in model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        checked = {**{k: v for k, v in terms.items() if torch.is_tensor(v)}, norm_name: norm}
        flags = torch.stack([~torch.isfinite(full_tensor(v).detach().float()).all() for v in checked.values()])
        flags = env.any(flags)  # every rank takes the same decision
        bad = flags.any()
        mask = (flags.long() * self._bits(tuple(checked))).sum()
        first = (self.first_bad < 0) & bad
        self.first_bad = torch.where(first, index, self.first_bad)
        self.bad_terms = torch.where(first, mask, self.bad_terms)
        if self.policy == "skip":
            _prepare_skip(opt)
            before = [(p, local_tensor(p).clone(), {k: local_tensor(v).clone() for k, v in opt.state.get(p, {}).items()
                                            if torch.is_tensor(v)}) for p in params]
            opt.step()
            with torch.no_grad():
                for p, p_old, state_old in before:
                    _undo_if(bad, p, p_old)
                    for k, v in opt.state.get(p, {}).items():
                        if torch.is_tensor(v):  # state made by this step undone to zeros: as if never taken
                            _undo_if(bad, v, state_old.get(k))
            self.skipped = self.skipped + bad.long()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return norm

    def stats(self) -> dict[str, torch.Tensor]:
        return {"skipped_steps": self.skipped.float()} if self.policy == "skip" else {}

    def check(self, newest: str | None = None) -> None:
        """Under ``stop``: raise :class:`NonFiniteStep` if any step went non-finite (one host sync)."""
        if self.policy != "stop":
            return
        first = int(self.first_bad)
        if first < 0:
            return
        mask = int(self.bad_terms)
        bad = [n for i, n in enumerate(self.names) if mask >> i & 1]
        losses = [n for n in bad if "grad_norm" not in n]
        what = (f"{', '.join(losses)} not finite" if losses else
                f"the gradient is not finite ({', '.join(bad)}) while its loss terms are finite")
        raise NonFiniteStep(f"{self.stage} {self.counter} {first}: {what}; stopped, nothing of this step or later "
                            f"was saved (newest checkpoint: {newest or 'none'}); set nonfinite=skip to skip such "
                            "steps instead")


def _undo_if(bad: torch.Tensor, t: torch.Tensor, old: torch.Tensor | None) -> None:
    local = local_tensor(t)
    local.copy_(torch.where(bad.to(local.device), torch.zeros_like(local) if old is None else old, local))


def _prepare_skip(opt: torch.optim.Optimizer) -> None:
    """Adam keeps its step counter on the host unless ``capturable``; undoing a step on the device needs it on the
    parameters' device, so CUDA parameters get ``capturable`` Adam (counter on the GPU, no host sync)."""
    for group in opt.param_groups:
        if "capturable" in group and not group["capturable"] and any(p.is_cuda for p in group["params"]):
            group["capturable"] = True
            for p in group["params"]:
                st = opt.state.get(p, {})
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].to(p.device, torch.float32)


def _adamw(model: nn.Module, settings: dict) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **settings)


class ModelEMA:
    """Model-level EMA ``θ_ema ← d·θ_ema + (1-d)·θ`` (docs/method.md §4.4). ``dtype="param"`` keeps the shadow in the
    parameters' dtype as the reference does (small increments can round away in bf16, docs/method.md §13.18);
    ``"float32"`` keeps a float32 shadow and copies it into the module."""

    def __init__(self, model: nn.Module, decay: float, dtype: str = "param"):
        self.decay = decay
        # a LoRA view shadows its adapter with a second adapter on the shared base, not a copy of the model
        shadow = model.ema_copy() if hasattr(model, "ema_copy") else copy.deepcopy(model)
        self.module = shadow.eval().requires_grad_(False)
        self.fp32 = dtype == "float32"
        self._shadow = [p.detach().float().clone() for p in self.module.parameters()] if self.fp32 else None

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        resharded(self.module, model)  # under fsdp: shard against shard
        w = 1 - (self.decay if decay is None else decay)
        pairs = zip(self.module.parameters(), model.parameters(), strict=True)
        if self.fp32:
            for (p_ema, p), s in zip(pairs, self._shadow, strict=True):
                s.lerp_(p.detach().float(), w)
                p_ema.copy_(s)
        else:
            for p_ema, p in pairs:
                p_ema.lerp_(p.detach(), w)
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def step(self, model: nn.Module, global_step: int, interval: int) -> bool:
        """The stage-2 schedule (docs/method.md §8): update when ``(global_step + 1) % interval == 0`` with the warm-up
        decay ``min((1 + s) / (10 + s), decay)``; returns whether it updated."""
        if (global_step + 1) % interval:
            return False
        self.update(model, min((1 + global_step) / (10 + global_step), self.decay))
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.fp32:  # the float32 shadow is the state; the module holds its rounding
            names = [n for n, _ in self.module.named_parameters()]
            return {**self.module.state_dict(), **dict(zip(names, self._shadow, strict=True))}
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(like_current(state, self.module.state_dict()))
        if self.fp32:
            current = dict(self.module.named_parameters())
            self._shadow = [t.float().clone() for t in like_current({n: state[n] for n in current}, current).values()]

    def reset_shadow(self) -> None:
        """Re-take the float32 shadow from the module (after its parameters were replaced, e.g. sharded)."""
        if self.fp32:
            self._shadow = [p.detach().float().clone() for p in self.module.parameters()]


@dataclass
class StageState:
    """The trained models of a stage, their optimizers and where the loop stands (``index``: steps in stage 1,
    epochs in stage 2). ``save``/``load`` write and read ``checkpoints/stage{S}-{step|epoch}-N/``."""

    STAGE: ClassVar[int] = 0
    COUNTER: ClassVar[str] = "step"
    MODULES: ClassVar[tuple[str, ...]] = ("generator", "generator_ema", "fake_score")

    generator: Backbone
    fake: Backbone
    ema: ModelEMA
    gen_opt: torch.optim.Optimizer
    fake_opt: torch.optim.Optimizer
    index: int = 0
    seconds: float = 0.0
    trained_now: bool = False  # whether this invocation trained (else a finished run was loaded)

    @classmethod
    def create(cls, generator: Backbone, fake: Backbone, cfg) -> StageState:
        """The state of a new stage around its two trained networks (which the world built and loaded): the
        generator's EMA and an AdamW over each network's trainable parameters, with the stage's settings."""
        generator.train()
        fake.train()
        decay, dtype = cls.ema_config(cfg)
        settings = cls.optimizer_config(cfg)
        return cls(generator=generator, fake=fake, ema=ModelEMA(generator, decay, dtype),
                   gen_opt=_adamw(generator, settings["gen"]), fake_opt=_adamw(fake, settings["fake"]))

    @classmethod
    def ema_config(cls, cfg) -> tuple[float, str]:
        """The generator EMA's (decay, dtype)."""
        raise NotImplementedError

    @classmethod
    def optimizer_config(cls, cfg) -> dict[str, dict]:
        """``{"gen": settings, "fake": settings}``: the optimizers' learning rate, betas, eps and weight decay
        as the config gives them (per stage)."""
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def apply_optimizer_config(self, cfg) -> None:
        """Set the config's optimizer settings on both optimizers (a resumed state carries the old ones)."""
        for opt, settings in ((self.gen_opt, self.optimizer_config(cfg)["gen"]),
                              (self.fake_opt, self.optimizer_config(cfg)["fake"])):
            for group in opt.param_groups:
                group.update(settings)

    def load_extra_state(self, state: dict) -> None:
        pass

    def save(self, run_dir, keep: int, env: DistEnv) -> None:
        """Every rank calls this (gathering sharded state is a collective); rank 0 writes the full state."""
        modules = {"generator": full_state(self.generator.state_dict()),
                   "generator_ema": full_state(self.ema.state_dict()),
                   "fake_score": full_state(self.fake.state_dict())}
        optimizers = {"generator": full_optimizer_state(self.gen_opt),
                      "fake_score": full_optimizer_state(self.fake_opt)}
        if env.main:
            ck.save_checkpoint(
                run_dir / "checkpoints" / ck.checkpoint_name(self.STAGE, self.index), modules=modules,
                optimizers=optimizers,
                state={"stage": self.STAGE, self.COUNTER: self.index, "seconds": self.seconds,
                       "world_size": env.world, **self.extra_state()},
            )
            ck.prune_checkpoints(run_dir, keep)
        env.barrier()

    def load(self, path, env: DistEnv) -> None:
        """Load a checkpoint (a path, or a :class:`~rtdmd.checkpoint.Checkpoint` already loaded) into this state's
        current placement; the same world size as it was saved with."""
        c = path if isinstance(path, ck.Checkpoint) else ck.load_checkpoint(path)
        check_resume_world(c.state.get("world_size"), env, str(path))
        self.generator.load_state_dict(like_current(c.modules["generator"], self.generator.state_dict()))
        self.fake.load_state_dict(like_current(c.modules["fake_score"], self.fake.state_dict()))
        self.ema.load_state_dict(c.modules["generator_ema"])
        load_optimizer_state(self.gen_opt, c.optimizers["generator"])
        load_optimizer_state(self.fake_opt, c.optimizers["fake_score"])
        self.index, self.seconds = int(c.state[self.COUNTER]), float(c.state.get("seconds", 0.0))
        self.load_extra_state(c.state)
