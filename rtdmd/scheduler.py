"""``CPSScheduler``: the distilled few-step CPS sampler as a diffusers scheduler (docs/method.md §1, §2.1, §2.4, §10).

Drop it into a stock diffusers flow-matching pipeline and the pipeline samples the 4-step generator the way the
reference's inference does (docs/method.md §10): the configured step list (``[1000, 750, 500, 250]``) replaces the
pipeline's own step count and sigmas, each step is one CPS step (``rk.cps_step``, η = 0.9 by default), and the
last step lands on σ = 0, so the pipeline's final latents are the last step's ``x0̂`` (docs/method.md §2.4)::

    from rtdmd.scheduler import CPSScheduler
    CPSScheduler.for_pipeline(pipe, eta=0.9, denoising_steps=[1000, 750, 500, 250])   # sets pipe.scheduler
    image = pipe(prompt, num_inference_steps=4, guidance_scale=1.0).images[0]          # no CFG (docs/method.md §10)

Schedules (docs/method.md §1): without ``use_dynamic_shifting`` (SD3/SD3.5) the static shift ``shift`` of the config,
rounded to 6 decimals (``[1, .9, .75, .5] -> 0`` at 3.0); with it (FLUX.2), the exponential shift with the ``mu``
the pipeline passes. FLUX.2's pipelines compute ``mu`` for *their* ``num_inference_steps`` (default 50), while
the reference uses ``mu`` for ``K`` steps; under ``mu_rule="flux2_empirical"`` (the default) the scheduler
recovers the image's ``image_seq_len`` from ``mu`` and the pipeline's step count and recomputes ``mu`` for ``K``
steps, so the schedule is right whatever ``num_inference_steps`` the caller passed (at 512 px
``[1, .95809, .88398, .71750] -> 0``, at 1024 px ``[1, .96738, .90814, .76720] -> 0``). For pipelines whose ``mu``
follows another rule (FLUX.1, SD3 configs with dynamic shifting) use ``mu_rule="given"``;
:meth:`CPSScheduler.for_pipeline` picks the rule from the pipeline class.

Noise (the pipelines pass no generator to ``step``): by default the CPS noise ξ of a run is drawn from a generator
seeded by the run's initial latents, so the pipeline's own ``generator=`` (which draws those latents) makes the
whole sampling reproducible. :meth:`CPSScheduler.set_noise` selects another source — the trainer's per-sample RNG
contract (``seed``: step ``j`` draws exactly what :func:`rtdmd.rollout.draw_noises` draws for the same samples), a
``torch.Generator``, explicit ``noises [K, ...]``, or the global torch RNG (``global_rng=True``). Arithmetic is
float32 inside ``rk.cps_step``; the new latents keep the latents' dtype (bf16 in the reference's inference,
method.md §2.4, §13.4; the reference casts to the velocity's dtype, which is the same dtype in both stock
pipelines).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

import rtdmd_kernels as rk

from . import rng
from .models.diffusion import pack_2x2
from .sigmas import (
    NUM_TRAIN_TIMESTEPS,
    check_denoising_steps,
    flux2_empirical_mu,
    flux2_seq_len_from_mu,
    sigmas_for,
)

logger = logging.getLogger(__name__)

MU_RULES = ("flux2_empirical", "given")


@dataclass
class CPSSchedulerOutput(BaseOutput):
    """What :meth:`CPSScheduler.step` returns with ``return_dict=True``: the CPS output ``prev_sample`` and the
    step's x0 prediction ``pred_original_sample = x - σ·v`` (both in the latents' dtype)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def _pack_like(noise: torch.Tensor, sample: torch.Tensor, name: str) -> torch.Tensor:
    """``noise`` in ``sample``'s layout: as is, or packed ``[B, C, H, W] -> [B, H·W, C]`` (FLUX.2's tokens) or
    ``-> [B, (H/2)·(W/2), 4·C]`` (FLUX.1's 2×2 patches)."""
    if noise.shape == sample.shape:
        return noise
    if noise.ndim == 4 and sample.ndim == 3:
        b, c, h, w = noise.shape
        if sample.shape == (b, h * w, c):
            return noise.flatten(2).transpose(1, 2)
        if h % 2 == 0 and w % 2 == 0 and sample.shape == (b, (h // 2) * (w // 2), 4 * c):
            return pack_2x2(noise)
    raise ValueError(f"{name} has shape {tuple(noise.shape)}, which is neither the latents' shape "
                     f"{tuple(sample.shape)} nor their [B, C, H, W] layout before FLUX's token packing")


class CPSScheduler(SchedulerMixin, ConfigMixin):
    """The few-step CPS sampler of docs/method.md §2.1/§2.4 as a diffusers scheduler for flow-matching pipelines.

    Takes every key of a stock ``FlowMatchEulerDiscreteScheduler`` config (so ``from_config`` of an SD3/SD3.5
    or FLUX.2 scheduler works, and the SD3 pipeline still finds ``base_shift`` & co.), plus:

    * ``eta``: the CPS stochasticity η in [0, 1] (0.9 in the reference; 0 is the Euler sampler);
    * ``denoising_steps``: the distilled step list (docs/method.md §1), strictly decreasing integers in (0, 1000];
    * ``mu_rule``: ``"flux2_empirical"`` or ``"given"`` — how a pipeline's ``mu`` is read under
      ``use_dynamic_shifting`` (see the module docstring).

    ``shift_terminal`` applies :func:`rtdmd.sigmas.stretch_to_terminal`; Karras/exponential/beta sigmas,
    ``invert_sigmas`` and a linear time shift are not the reference's schedule and raise ``ValueError``.
    ``stochastic_sampling`` is accepted and ignored (every step is a CPS step). The default ``shift`` is SD3.5's
    3.0, not diffusers' 1.0: a config that does not state its shift gets 3.0 (SD3/SD3.5 configs state 3.0).
    Stock SD3 pipelines hand the caller's ``num_inference_steps`` back from ``retrieve_timesteps`` (only their
    progress bar uses it): pass ``num_inference_steps=K`` for a tidy bar; the loop runs the ``K`` steps anyway.
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler"]  # takes its config (and gives it back)
    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
        shift: float = 3.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
        eta: float = 0.9,
        denoising_steps: Sequence[int] = (1000, 750, 500, 250),
        mu_rule: str = "flux2_empirical",
    ) -> None:
        if num_train_timesteps != NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"num_train_timesteps must be {NUM_TRAIN_TIMESTEPS} (docs/method.md §1), "
                             f"got {num_train_timesteps}")
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        if mu_rule not in MU_RULES:
            raise ValueError(f"mu_rule must be one of {MU_RULES}, got {mu_rule!r}")
        if time_shift_type != "exponential":
            raise ValueError(f"time_shift_type must be 'exponential' (docs/method.md §1), got {time_shift_type!r}")
        if shift_terminal is not None and not 0.0 < shift_terminal < 1.0:
            raise ValueError(f"shift_terminal must be None or lie in (0, 1), got {shift_terminal}")
        for name, value in (("invert_sigmas", invert_sigmas), ("use_karras_sigmas", use_karras_sigmas),
                            ("use_exponential_sigmas", use_exponential_sigmas), ("use_beta_sigmas", use_beta_sigmas)):
            if value:
                raise ValueError(f"{name}=True is not the distilled schedule of docs/method.md §1; set it to False")
        steps = check_denoising_steps(denoising_steps)
        self.register_to_config(denoising_steps=steps)

        self.num_inference_steps = len(steps)
        self.mu: float | None = None
        self.image_seq_len: int | None = None
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None
        self._sigma_values: list[float] = []
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._noise: dict[str, Any] = {"mode": "latents"}
        self._shift = float(shift)
        self.sigma_min: float | None = None
        self.sigma_max: float | None = None
        if not use_dynamic_shifting:  # the static schedule is known now; the dynamic one waits for mu
            self._set_schedule(sigmas_for(steps, shift=self._shift, shift_terminal=shift_terminal), None)

    # ------------------------------------------------------------------ construction

    @classmethod
    def for_pipeline(cls, pipe: Any, *, eta: float = 0.9, denoising_steps: Sequence[int] = (1000, 750, 500, 250),
                     install: bool = True, **config: Any) -> CPSScheduler:
        """A scheduler built from ``pipe.scheduler.config`` with ``eta`` and ``denoising_steps`` (method.md §10), set as
        ``pipe.scheduler`` unless ``install=False``. ``mu_rule`` defaults to ``"flux2_empirical"`` for the FLUX.2
        pipelines (class name ``Flux2…``) and to ``"given"`` otherwise; further ``config`` keys override the
        pipeline's config (e.g. ``shift=3.0``). Unknown keys raise ``ValueError``."""
        unknown = sorted(set(config) - set(cls._get_init_keys(cls)) - {"self"})
        if unknown:
            raise ValueError(f"config has keys {unknown} that CPSScheduler does not take")
        config.setdefault("mu_rule", "flux2_empirical" if type(pipe).__name__.startswith("Flux2") else "given")
        scheduler = cls.from_config(pipe.scheduler.config, eta=eta, denoising_steps=list(denoising_steps), **config)
        if install:
            pipe.scheduler = scheduler
        return scheduler

    # ------------------------------------------------------------------ schedule

    @property
    def step_index(self) -> int | None:
        """The index of the next step (``None`` before the first ``step`` of a run)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The first step's index, set by pipelines through :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next run at step ``begin_index`` (what diffusers pipelines call before their loop)."""
        if not 0 <= begin_index < len(self.config.denoising_steps):
            raise ValueError(f"begin_index must lie in [0, {len(self.config.denoising_steps)}), got {begin_index}")
        self._begin_index = int(begin_index)

    @property
    def shift(self) -> float:
        """The static shift of the schedule (FlowMatchEulerDiscreteScheduler's ``shift``)."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        """Change the static shift (as FlowMatchEulerDiscreteScheduler's ``set_shift``); the next
        :meth:`set_timesteps` uses it (it is ignored under ``use_dynamic_shifting``, as there)."""
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self._shift = float(shift)

    def time_shift(self, mu: float, sigma: float, t: torch.Tensor) -> torch.Tensor:
        """The exponential time shift ``e^mu / (e^mu + (1/t - 1)^sigma)`` (FlowMatchEulerDiscreteScheduler's; the
        distilled schedule uses it with ``sigma = 1``)."""
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)

    def _set_schedule(self, values: list[float], device: torch.device | str | None) -> None:
        self._sigma_values = values
        self.sigmas = torch.tensor(values, dtype=torch.float32)  # on the CPU, as diffusers keeps them
        self.timesteps = (torch.tensor(values[:-1], dtype=torch.float64) * NUM_TRAIN_TIMESTEPS).to(
            dtype=torch.float32, device=device)
        self.sigma_min, self.sigma_max = float(self.sigmas[-1]), float(self.sigmas[0])
        self._step_index = None
        self._begin_index = None

    def _resolve_mu(self, mu: float, pipeline_steps: int | None) -> float:
        k = len(self.config.denoising_steps)
        self.image_seq_len = None
        if self.config.mu_rule == "given" or pipeline_steps is None or pipeline_steps == k:
            return float(mu)
        try:
            self.image_seq_len = flux2_seq_len_from_mu(mu, pipeline_steps)
        except ValueError as err:
            raise ValueError(
                f"mu={mu} (passed with {pipeline_steps} steps) does not follow FLUX.2's empirical rule: use "
                f"mu_rule='given' for pipelines whose mu follows another rule, or run the pipeline with "
                f"num_inference_steps={k}") from err
        return flux2_empirical_mu(self.image_seq_len, k)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: torch.device | str | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        timesteps: Sequence[float] | None = None,
        *,
        image_seq_len: int | None = None,
    ) -> None:
        """Set the distilled schedule (docs/method.md §1): ``timesteps = 1000·σ[:-1]`` (float32, on ``device``) and
        ``sigmas = [σ_0, ..., σ_{K-1}, 0]`` (float32, CPU) for the configured ``denoising_steps``.

        The pipeline's ``num_inference_steps``, ``sigmas`` and ``timesteps`` do not change the schedule; their
        length is only the step count a FLUX.2 pipeline computed ``mu`` for. Under ``use_dynamic_shifting`` the
        shift is ``mu`` (required) read per ``mu_rule``, or — when ``image_seq_len`` is given — FLUX.2's empirical
        ``mu`` of that many tokens at ``K`` steps. Without it, the static ``shift`` of the config is used and ``mu``
        is ignored (as diffusers does)."""
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError(f"sigmas and timesteps must have the same length, got {len(sigmas)} and {len(timesteps)}")
        pipeline_steps = len(sigmas) if sigmas is not None else len(timesteps) if timesteps is not None \
            else num_inference_steps
        if pipeline_steps is not None and pipeline_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {pipeline_steps}")
        steps = list(self.config.denoising_steps)
        if pipeline_steps is not None and pipeline_steps != len(steps):
            logger.warning("CPSScheduler runs its %d distilled steps (denoising_steps=%s); the pipeline asked for %d: "
                           "pass num_inference_steps=%d", len(steps), steps, pipeline_steps, len(steps))
        if self.config.use_dynamic_shifting:
            if image_seq_len is not None:
                self.image_seq_len = int(image_seq_len)
                used_mu = flux2_empirical_mu(self.image_seq_len, len(steps))
            elif mu is None:
                raise ValueError("mu must be passed when use_dynamic_shifting is set (or pass image_seq_len)")
            else:
                used_mu = self._resolve_mu(float(mu), pipeline_steps)
            values = sigmas_for(steps, mu=used_mu, shift_terminal=self.config.shift_terminal)
            self.mu = used_mu
        else:
            values = sigmas_for(steps, shift=self._shift, shift_terminal=self.config.shift_terminal)
            self.mu = None
        self.num_inference_steps = len(steps)
        self._set_schedule(values, device)

    def index_for_timestep(self, timestep: float | torch.Tensor,
                           schedule_timesteps: torch.Tensor | None = None) -> int:
        """The step whose timestep equals ``timestep`` exactly (the schedule's timesteps are distinct)."""
        schedule = self._require_schedule().timesteps if schedule_timesteps is None else schedule_timesteps
        value = torch.as_tensor(timestep, dtype=schedule.dtype).to(schedule.device).reshape(())
        hits = (schedule == value).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {float(value)} is not one of the schedule's timesteps {schedule.tolist()}")
        return int(hits[0].item())

    def _require_schedule(self) -> CPSScheduler:
        if self.timesteps is None:
            raise ValueError("call set_timesteps (with mu, under use_dynamic_shifting) before sampling")
        return self

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------------ noise

    def set_noise(self, *, seed: int | None = None, stream: str = "eval", step: int = 0, first_index: int = 0,
                  latent_shape: Sequence[int] | None = None, generator: torch.Generator | None = None,
                  noises: torch.Tensor | None = None, global_rng: bool = False) -> None:
        """Choose where the CPS noise ξ of each step comes from (at most one of ``seed``, ``generator``, ``noises``,
        ``global_rng``; none restores the default: a generator seeded by each run's initial latents, so that the
        pipeline's ``generator=`` makes the run reproducible).

        * ``seed``: the trainer's RNG contract (:mod:`rtdmd.rng`, :func:`rtdmd.rollout.draw_noises`): step ``j``
          gives sample ``b`` of the batch the draw of stream ``{stream}/xi{j}``, ``step``, global index
          ``first_index + b``, made in ``latent_shape`` (default: the latents' per-sample shape) and packed to
          FLUX.2's ``[H·W, C]`` tokens when the latents are packed. After a run's last step the index moves on by
          the batch size, so consecutive pipeline calls over a prompt list draw what
          ``rtdmd.rollout.generate(..., indices=range(N))`` draws. :meth:`initial_latents` gives the matching
          ``x_T`` for the pipeline's ``latents=``.
        * ``generator``: ``torch.randn`` of the latents' shape from it (float32, on its device), one draw per step.
        * ``noises``: ``[K, B, ...]``, step ``j`` uses ``noises[j]`` (in the latents' shape or their
          ``[B, C, H, W]`` layout before FLUX.2's packing).
        * ``global_rng``: ``torch.randn`` from the global torch RNG.
        """
        chosen = [name for name, value in (("seed", seed), ("generator", generator), ("noises", noises),
                                           ("global_rng", global_rng or None)) if value is not None]
        if len(chosen) > 1:
            raise ValueError(f"pass at most one of seed, generator and noises, got {chosen}")
        if latent_shape is not None and seed is None:
            raise ValueError("latent_shape only applies with seed")
        if seed is not None:
            if isinstance(seed, bool) or int(seed) != seed:
                raise ValueError(f"seed must be an integer, got {seed!r}")
            if not isinstance(stream, str) or not stream:
                raise ValueError(f"stream must be a non-empty string, got {stream!r}")
            if isinstance(step, bool) or int(step) != step:
                raise ValueError(f"step must be an integer, got {step!r}")
            if isinstance(first_index, bool) or int(first_index) != first_index or first_index < 0:
                raise ValueError(f"first_index must be an integer >= 0, got {first_index!r}")
            shape = None if latent_shape is None else tuple(int(s) for s in latent_shape)
            if shape is not None and (not shape or any(s < 1 for s in shape)):
                raise ValueError(f"latent_shape must be a non-empty shape of positive sizes, got {latent_shape}")
            self._noise = {"mode": "seed", "seed": int(seed), "stream": stream, "step": int(step),
                           "index": int(first_index), "latent_shape": shape}
        elif generator is not None:
            if not isinstance(generator, torch.Generator):
                raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            self._noise = {"mode": "generator", "generator": generator}
        elif noises is not None:
            k = len(self.config.denoising_steps)
            if not isinstance(noises, torch.Tensor) or noises.ndim < 2 or noises.shape[0] != k:
                shape = tuple(noises.shape) if isinstance(noises, torch.Tensor) else type(noises).__name__
                raise ValueError(f"noises must be a tensor [K={k}, B, ...], got {shape}")
            self._noise = {"mode": "noises", "noises": noises}
        elif global_rng:
            self._noise = {"mode": "global"}
        else:
            self._noise = {"mode": "latents"}

    @property
    def noise_index(self) -> int | None:
        """The global index of the next run's first sample under ``set_noise(seed=...)`` (else ``None``)."""
        return self._noise["index"] if self._noise["mode"] == "seed" else None

    def initial_latents(self, batch_size: int, *, latent_shape: Sequence[int] | None = None,
                        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """``x_T [batch_size, *latent_shape]`` of the next run under ``set_noise(seed=...)``: stream ``{stream}/x_T``
        of the RNG contract, as :func:`rtdmd.rollout.draw_noises` draws it. Pass it as the pipeline's ``latents=``
        (``[B, C, H, W]``; FLUX.2's pipelines pack it themselves). Call it before the run it belongs to."""
        if self._noise["mode"] != "seed":
            raise ValueError("initial_latents needs set_noise(seed=...)")
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        shape = latent_shape if latent_shape is not None else self._noise["latent_shape"]
        if shape is None:
            raise ValueError("latent_shape is needed (here or in set_noise)")
        n = self._noise
        return rng.normal(n["seed"], f"{n['stream']}/x_T", n["step"], range(n["index"], n["index"] + int(batch_size)),
                          tuple(int(s) for s in shape), dtype=dtype, device=device)

    def _step_noise(self, j: int, sample: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        mode = self._noise["mode"]
        if generator is None and mode == "generator":
            generator = self._noise["generator"]
        if generator is not None:
            return torch.randn(sample.shape, generator=generator, dtype=torch.float32,
                               device=generator.device).to(sample.device)
        if mode == "seed":
            n = self._noise
            shape = n["latent_shape"] or tuple(sample.shape[1:])
            idx = range(n["index"], n["index"] + sample.shape[0])
            noise = rng.normal(n["seed"], f"{n['stream']}/xi{j}", n["step"], idx, shape, device=sample.device)
            return _pack_like(noise, sample, "the seeded noise (latent_shape)")
        if mode == "noises":
            return _pack_like(self._noise["noises"][j], sample, f"noises[{j}]").to(sample.device)
        if mode == "latents":
            if j == (self._begin_index or 0) or "generator" not in self._noise:  # a run's first step: its x_T
                digest = hashlib.sha256(sample.detach().float().cpu().numpy().tobytes()).digest()
                self._noise["generator"] = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            return torch.randn(sample.shape, generator=self._noise["generator"], dtype=torch.float32).to(sample.device)
        return torch.randn(sample.shape, dtype=torch.float32, device=sample.device)

    # ------------------------------------------------------------------ sampling

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor, *,
             generator: torch.Generator | None = None, return_dict: bool = True) -> CPSSchedulerOutput | tuple:
        """One CPS step (docs/method.md §2.1) from the current σ to the next: ``rk.cps_step(sample, model_output, σ, σn,
        eta=eta, noise=ξ)``, ξ from the source chosen by :meth:`set_noise` (``generator`` overrides it for this
        call). ``model_output`` is the velocity ``v = ε - x0``. At the last step σn = 0 and the output is the
        x0 prediction ``sample - σ·v`` (docs/method.md §2.4). Float32 inside; returns the latents' dtype."""
        self._require_schedule()
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError("timestep must be one of scheduler.timesteps (a float), not an integer step index")
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
            raise ValueError("model_output and sample must be tensors")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)}, sample {tuple(sample.shape)}")
        if self._step_index is None:
            self._init_step_index(timestep)
        j = self._step_index
        k = len(self._sigma_values) - 1
        if j >= k:
            raise ValueError(f"the schedule has {k} steps and all have run; call set_timesteps for a new run")
        sigma, sigma_next = self._sigma_values[j], self._sigma_values[j + 1]
        noise = self._step_noise(j, sample, generator)
        prev, _ = rk.cps_step(sample, model_output, sigma, sigma_next, eta=float(self.config.eta), noise=noise)
        self._step_index = j + 1
        if self._step_index == k and self._noise["mode"] == "seed":
            self._noise["index"] += sample.shape[0]
        if not return_dict:
            return (prev,)
        x0 = (sample.float() - sigma * model_output.float()).to(sample.dtype)
        return CPSSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def scale_noise(self, sample: torch.Tensor, timestep: float | torch.Tensor,
                    noise: torch.Tensor | None = None) -> torch.Tensor:
        """The flow-matching forward process ``σ·noise + (1-σ)·sample`` at ``timestep`` (method.md §1), for img2img and
        inpainting pipelines; σ is looked up as diffusers does (by timestep, or the current/begin index)."""
        self._require_schedule()
        if noise is None or noise.shape != sample.shape:
            raise ValueError(f"noise must be a tensor of the sample's shape {tuple(sample.shape)}")
        t = torch.as_tensor(timestep).reshape(-1)
        if self._begin_index is None:
            idx = [self.index_for_timestep(ti) for ti in t]
        else:
            idx = [self._step_index if self._step_index is not None else self._begin_index] * len(t)
        sigma = self.sigmas[idx].to(device=sample.device, dtype=sample.dtype)
        if sigma.numel() not in (1, sample.shape[0]):
            raise ValueError(f"timestep has {sigma.numel()} values for a batch of {sample.shape[0]}")
        sigma = sigma.reshape(-1, *([1] * (sample.ndim - 1)))
        return sigma * noise + (1.0 - sigma) * sample
