"""The stock diffusers pipeline a run trained, ready to call: ``rtdmd.pipeline.load(run_dir)``.

It loads the run's base model with the stock pipeline class, the run's exported LoRA (``lora/stage2`` when stage 2
finished, else ``lora/stage1``; docs/training.md §5.4), installs :class:`~rtdmd.scheduler.CPSScheduler` with the
run's step list and η, and binds the call arguments the trainer used (step count, no CFG, resolution, text
length). Called with the same prompts and ``seed`` as ``python -m rtdmd.sample``, :meth:`TrainedPipeline.sample`
gives the same images (the trainer's noise and initial latents); a plain call takes ``generator=`` as usual, and
the scheduler seeds its noise from the latents that generator draws, so a call is reproducible::

    import torch, rtdmd.pipeline
    pipe = rtdmd.pipeline.load("runs/sd35m", device="cuda", dtype=torch.bfloat16)
    image = pipe("a red fox in the snow", generator=torch.Generator("cuda").manual_seed(0)).images[0]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .models.diffusion import DEFAULT_TEXT_LENGTH, DTYPES, latent_shape, pack_2x2
from .run import RunFolder
from .scheduler import CPSScheduler

__all__ = ["TrainedPipeline", "load"]

PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux1": "FluxPipeline", "flux2": "Flux2KleinPipeline"}


class TrainedPipeline:
    """A stock pipeline (``.pipe``) with a run's LoRA and CPS scheduler, and the trainer's call arguments
    (``.defaults``) applied to every call; a keyword argument of the call overrides them."""

    def __init__(self, pipe: Any, defaults: dict[str, Any], latent_shape: tuple[int, ...], lora: Path):
        self.pipe = pipe
        self.defaults = dict(defaults)
        self.latent_shape = tuple(latent_shape)
        self.lora = lora

    @property
    def scheduler(self) -> CPSScheduler:
        return self.pipe.scheduler

    def __call__(self, prompt: str | Sequence[str], **kwargs: Any) -> Any:
        return self.pipe(prompt=prompt, **{**self.defaults, **kwargs})

    def sample(self, prompts: Sequence[str], *, seed: int = 0, num: int = 1, output_type: str = "pt") -> Any:
        """``num`` images per prompt drawn as ``python -m rtdmd.sample --seed seed --num num`` draws them: the
        trainer's initial latents and CPS noise (stream ``sample``) for sample i of the prompt list repeated."""
        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}")
        prompts = [p for p in prompts for _ in range(num)]
        self.scheduler.set_noise(seed=seed, stream="sample", latent_shape=self.latent_shape)
        x_t = self.scheduler.initial_latents(len(prompts), dtype=self.pipe.transformer.dtype,
                                             device=self.pipe.device)
        if type(self.pipe).__name__ == "FluxPipeline":  # FLUX.1's pipeline takes its latents packed
            x_t = pack_2x2(x_t)
        try:
            return self(prompts, latents=x_t, output_type=output_type).images
        finally:
            self.scheduler.set_noise()


def load(run_dir: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         stage: int | None = None) -> TrainedPipeline:
    """The stock pipeline of ``run_dir``'s model with its LoRA of ``stage`` (default: the last exported), the CPS
    scheduler and the trainer's call arguments; weights in ``dtype`` (default: the run's ``model.dtype``) on
    ``device`` (default: CUDA when there is one). Nothing is downloaded."""
    import diffusers

    run = RunFolder.open(run_dir, "run_dir")
    cfg = run.load_config()
    kind = cfg.model.kind
    if kind not in PIPELINES:
        raise ValueError(f"run_dir {run.path}: model.kind {kind!r} has no diffusers pipeline (the toy world has none)")
    stages = [stage] if stage is not None else [2, 1]
    lora = next((run.path / "lora" / f"stage{s}" for s in stages if (run.path / "lora" / f"stage{s}").is_dir()), None)
    if lora is None:
        raise FileNotFoundError(f"{run.path}: no exported LoRA (lora/stage{stages[0]}); finish a stage first")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or DTYPES[cfg.model.dtype]
    base = cfg.model.generator_path or cfg.model.path  # FLUX.2's generator is klein, with its own pipeline folder
    pipe = getattr(diffusers, PIPELINES[kind]).from_pretrained(base, dtype=dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora)
    CPSScheduler.for_pipeline(pipe, eta=cfg.schedule.eta, denoising_steps=cfg.schedule.denoising_steps)
    defaults = {"num_inference_steps": len(cfg.schedule.denoising_steps), "guidance_scale": 1.0,
                "height": cfg.model.resolution, "width": cfg.model.resolution,
                "max_sequence_length": cfg.model.max_sequence_length or DEFAULT_TEXT_LENGTH[kind]}
    return TrainedPipeline(pipe, defaults, latent_shape(pipe, kind, cfg.model.resolution), lora)
