"""Real backbones through diffusers: SD3 / SD3.5 and FLUX.2-klein (docs/method.md §1, §8, §10).

A :class:`DiffusionCore` loads a local diffusers pipeline folder with the stock ``from_pretrained`` (nothing is
downloaded: ``local_files_only``) and owns what every trainer model shares: the text encoders (frozen), the VAE
(frozen) and the frozen transformer(s) with their LoRA adapters (:mod:`rtdmd.models.lora`). The trainer's
models are :class:`DiffusionBackbone` views on it — teacher (no adapter), fake score, generator and its EMA —
so one base serves all of them. FLUX.2's generator starts from klein (``model.generator_path``) while the
teacher and fake score use the base model, as the reference: that is a second transformer.

Conditioning, timesteps and decoding are the stock pipelines' (their own encode helpers are called), with the
reference's deviations: T5 ``max_length`` 128 for SD3 (docs/method.md §13.13); FLUX.2's timestep quantised through the
model dtype (``bf16(1000σ)/1000``, §13.5); decoded images ``clamp(img/2 + 0.5, 0, 1)`` in float.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import rtdmd_kernels as rk

from ..sigmas import dynamic_shift_sigmas, flux2_empirical_mu, sd3_sigmas
from .base import Backbone, Cond
from .lora import SD3_TARGETS, LoraView, SharedTransformer, combine_loras, flux2_targets, load_adapter_state

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
#: the reference's text lengths (method.md §1, §13.13): T5 128 for SD3 (the stock pipeline's 256 is not used), Qwen 512
DEFAULT_TEXT_LENGTH = {"sd3": 128, "flux1": 512, "flux2": 512}
FLUX2_TEXT_LAYERS = (9, 18, 27)


def _require_folder(path: str | None, key: str) -> Path:
    if not path:
        raise ValueError(f"{key}: not set")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"{key}: no such folder: {p}")
    if not (p / "model_index.json").is_file() and not (p / "config.json").is_file():
        raise ValueError(f"{key}: {p} is not a diffusers folder (no model_index.json or config.json)")
    return p


class DiffusionCore:
    """The shared, frozen parts of a real backbone and the model-specific conditioning and latent layout."""

    kind: str = ""

    def __init__(self, pipe, *, resolution: int, dtype: torch.dtype, device: torch.device,
                 text_length: int, targets: Sequence[str]):
        self.pipe = pipe
        self.dtype = dtype
        self.device = device
        self.resolution = resolution
        self.text_length = text_length
        self.vae = pipe.vae.requires_grad_(False).eval()
        self.base = SharedTransformer(pipe.transformer, targets)
        self.generator_base = self.base  # FLUX.2 replaces it with klein
        self._empty: Cond | None = None

    # ------------------------------------------------------------------ what subclasses define
    latent_shape: tuple[int, int, int]

    def sigmas(self, denoising_steps: Sequence[int], shift: float) -> list[float]:
        raise NotImplementedError

    def _encode(self, prompts: list[str]) -> Cond:
        raise NotImplementedError

    def velocity(self, transformer: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, *,
                 guidance: float = 1.0) -> torch.Tensor:
        """``guidance``: a distilled-guidance input of the transformer (FLUX.1-dev's); the others ignore it."""
        raise NotImplementedError

    def latents_to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Cond:
        """Text conditioning (frozen encoders, no gradient); the empty prompt's is cached (the CFG branch)."""
        prompts = [str(p) for p in prompts]
        if prompts and all(p == "" for p in prompts):
            if self._empty is None:
                self._empty = self._encode([""])
            return {k: v.expand(len(prompts), *v.shape[1:]) for k, v in self._empty.items()}
        return self._encode(prompts)

    def decode(self, latents: torch.Tensor, *, chunk: int = 0, checkpoint: bool = False) -> torch.Tensor:
        """Images ``clamp(vae(x)/2 + 0.5, 0, 1)`` in float32, ``[B, 3, H, W]``; differentiable in ``latents``
        (reward back-propagation, docs/method.md §7). ``chunk`` decodes that many at a time (0: all); ``checkpoint``
        recomputes the decoder chunk by chunk in backward (``rk.checkpointed_decode``; ours — the reference keeps
        the decoder's activations)."""
        if latents.shape[0] == 0:
            raise ValueError("decode: empty batch")

        def run(z):
            img = self.vae.decode(self.latents_to_vae(z).to(self.vae.dtype), return_dict=False)[0]
            return (img.float() / 2 + 0.5).clamp(0, 1)

        size = chunk or latents.shape[0]
        if checkpoint and torch.is_grad_enabled():
            return rk.checkpointed_decode(run, latents, size)
        return torch.cat([run(z) for z in latents.split(size)])

    def view(self, adapters: Sequence[str] = (), own: str | None = None, *, generator: bool = False,
             block_checkpointing: bool = False, guidance: float = 1.0) -> DiffusionBackbone:
        """A trainer model on this core: ``adapters`` active, ``own`` the adapter its parameters are, ``guidance``
        its distilled-guidance input (FLUX.1-dev's teacher: the preset's guidance; every other view: 1)."""
        shared = self.generator_base if generator else self.base
        return DiffusionBackbone(self, shared, adapters, own, block_checkpointing=block_checkpointing,
                                 guidance=guidance)

    @property
    def distilled_guidance(self) -> bool:
        """Whether the teacher's guidance is a transformer input (FLUX.1-dev) rather than a CFG pass."""
        return False


def latent_shape(pipe, kind: str, resolution: int) -> tuple[int, int, int]:
    """``[C, H, W]`` of one latent at ``resolution`` px: the VAE's downsampling; FLUX.2's latents are 2×2
    patchified (their channels are the transformer's), FLUX.1's are the VAE's and packed 2×2 per call."""
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1) * (2 if kind in ("flux1", "flux2") else 1)
    if resolution % factor:
        raise ValueError(f"model.resolution must be a multiple of {factor} for {kind}, got {resolution}")
    side = resolution // factor
    if kind == "flux1":
        return (pipe.transformer.config.in_channels // 4, 2 * side, 2 * side)
    return (pipe.transformer.config.in_channels, side, side)


class SD3Core(DiffusionCore):
    """SD3 / SD3.5: ``SD3Transformer2DModel``; CLIP-L + CLIP-G + T5 (``max_length`` 128); latents
    ``[16, H/8, W/8]``; VAE input ``x / scaling + shift``; static shift (docs/method.md §1)."""

    kind = "sd3"

    def __init__(self, pipe, **kw):
        super().__init__(pipe, targets=SD3_TARGETS, **kw)
        self.latent_shape = latent_shape(pipe, self.kind, self.resolution)

    def sigmas(self, denoising_steps, shift):
        return sd3_sigmas(denoising_steps, shift)

    def _encode(self, prompts):
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=prompts, prompt_3=prompts, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.text_length)
        return {"prompt_embeds": embeds.to(self.dtype), "pooled": pooled.to(self.dtype)}

    def velocity(self, transformer, x, sigma, cond, *, guidance=1.0):
        out = transformer(hidden_states=x.to(self.dtype), timestep=sigma.float() * 1000,
                          encoder_hidden_states=cond["prompt_embeds"], pooled_projections=cond["pooled"],
                          return_dict=False)[0]
        return out.to(x.dtype)

    def latents_to_vae(self, latents):
        c = self.vae.config
        return latents / c.scaling_factor + (c.shift_factor or 0.0)


def pack_2x2(x: torch.Tensor) -> torch.Tensor:
    """FLUX.1's packing: ``[B, C, H, W] -> [B, (H/2)·(W/2), 4·C]``, 2×2 patches row-major (its pipeline's order)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_2x2(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_2x2` for a latent of ``h × w``."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


class Flux1Core(DiffusionCore):
    """FLUX.1-dev: ``FluxTransformer2DModel``; CLIP-L pooled + T5 over 512 tokens; VAE latents ``[16, H/8, W/8]``
    packed 2×2 into tokens per call; timestep ``bf16(1000σ)/1000``; the teacher's guidance is the transformer's
    distilled-guidance input (3.5 for FLUX.1-dev, one forward, no CFG pass) and every other model gets 1.0, as the
    reference; the dynamic shift with ``mu`` linear in the image tokens (FLUX.1's ``calculate_shift``)."""

    kind = "flux1"

    def __init__(self, pipe, **kw):
        super().__init__(pipe, targets=SD3_TARGETS, **kw)
        self.latent_shape = latent_shape(pipe, self.kind, self.resolution)

    @property
    def distilled_guidance(self) -> bool:
        return bool(getattr(self.pipe.transformer.config, "guidance_embeds", False))

    def sigmas(self, denoising_steps, shift):
        c = self.pipe.scheduler.config
        seq = (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)
        slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        mu = c.base_shift + slope * (seq - c.base_image_seq_len)
        return [float(s) for s in dynamic_shift_sigmas(denoising_steps, mu)]

    def _encode(self, prompts):
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=prompts, device=self.device,
                                                    num_images_per_prompt=1, max_sequence_length=self.text_length)
        return {"prompt_embeds": embeds.to(self.dtype), "pooled": pooled.to(self.dtype)}

    def velocity(self, transformer, x, sigma, cond, *, guidance=1.0):
        b, _, h, w = x.shape
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, transformer.dtype)
        txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=x.device, dtype=transformer.dtype)
        t = (sigma.float() * 1000).to(transformer.dtype) / 1000  # as the reference feeds it
        g = torch.full((b,), float(guidance), device=x.device) if transformer.config.guidance_embeds else None
        out = transformer(hidden_states=pack_2x2(x).to(transformer.dtype), timestep=t, guidance=g,
                          pooled_projections=cond["pooled"], encoder_hidden_states=cond["prompt_embeds"],
                          txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return unpack_2x2(out, h, w).to(x.dtype)

    def latents_to_vae(self, latents):
        c = self.vae.config
        return latents / c.scaling_factor + (c.shift_factor or 0.0)


class Flux2Core(DiffusionCore):
    """FLUX.2-klein: ``Flux2Transformer2DModel``; Qwen3 hidden states of layers (9, 18, 27) over 512 tokens;
    latents ``[4·C_vae, H/16, W/16]`` (2×2 patchified, batch-norm normalised), packed to tokens for the
    transformer; timestep ``bf16(1000σ)/1000``; the dynamic (empirical-mu) shift with ``seq = H·W`` of the
    patchified latent (docs/method.md §1). The generator's transformer is klein's (``model.generator_path``)."""

    kind = "flux2"

    def __init__(self, pipe, *, generator_transformer=None, **kw):
        n_single = pipe.transformer.config.num_single_layers
        super().__init__(pipe, targets=flux2_targets(n_single), **kw)
        if generator_transformer is not None:
            self.generator_base = SharedTransformer(generator_transformer, flux2_targets(n_single))
        self.latent_shape = latent_shape(pipe, self.kind, self.resolution)

    def sigmas(self, denoising_steps, shift):
        seq = self.latent_shape[1] * self.latent_shape[2]
        return [float(s) for s in dynamic_shift_sigmas(denoising_steps, flux2_empirical_mu(seq, len(denoising_steps)))]

    def _encode(self, prompts):
        embeds = self.pipe._get_qwen3_prompt_embeds(
            self.pipe.text_encoder, self.pipe.tokenizer, prompts, dtype=self.dtype, device=self.device,
            max_sequence_length=self.text_length, hidden_states_layers=FLUX2_TEXT_LAYERS)
        return {"prompt_embeds": embeds, "text_ids": self.pipe._prepare_text_ids(embeds).to(self.device)}

    def velocity(self, transformer, x, sigma, cond, *, guidance=1.0):
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h * w).transpose(1, 2)  # the pipeline's packing: (h, w) row-major
        img_ids = self.pipe._prepare_latent_ids(x).to(x.device)
        t = (sigma.float() * 1000).to(transformer.dtype) / 1000  # the pipeline's bf16 quantisation (method.md §13.5)
        out = transformer(hidden_states=tokens.to(transformer.dtype), timestep=t, guidance=None,
                          encoder_hidden_states=cond["prompt_embeds"], txt_ids=cond["text_ids"], img_ids=img_ids,
                          return_dict=False)[0]
        return out[:, : h * w].transpose(1, 2).reshape(b, c, h, w).to(x.dtype)

    def latents_to_vae(self, latents):
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(latents.device,
                                                                                                latents.dtype)
        return self.pipe._unpatchify_latents(latents * std + mean)


class DiffusionBackbone(LoraView, Backbone):
    """A trainer model on a :class:`DiffusionCore`: the shared base with ``adapters`` active. Its parameters
    (optimizer, EMA, checkpoint) are adapter ``own``'s LoRA weights; none for the teacher."""

    def __init__(self, core: DiffusionCore, shared: SharedTransformer, adapters: Sequence[str], own: str | None,
                 *, block_checkpointing: bool = False, guidance: float = 1.0):
        super().__init__()
        object.__setattr__(self, "core", core)
        self._init_lora_view(shared, adapters, own)
        self.block_checkpointing = block_checkpointing
        self.guidance = guidance
        self.latent_shape = core.latent_shape

    def encode(self, prompts: Sequence[str]) -> Cond:
        return self.core.encode(prompts)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        with self.shared.active(self.adapters):
            self.shared.set_block_checkpointing(self.block_checkpointing)
            try:
                return self.core.velocity(self.shared.module, x, sigma, cond, guidance=self.guidance)
            finally:
                self.shared.set_block_checkpointing(False)

    def decode(self, latents: torch.Tensor, **kw) -> torch.Tensor:
        return self.core.decode(latents, **kw)

    def fsdp_root(self) -> nn.Module:
        """What FSDP shards for this view: the shared base with all its adapters (once for all views)."""
        return self.shared.module

    def sigmas(self, denoising_steps: Sequence[int], shift: float) -> list[float]:
        return self.core.sigmas(denoising_steps, shift)

    def ema_copy(self) -> DiffusionBackbone:
        """An EMA shadow: a new frozen adapter ``<own>_ema`` initialised to ``own``, used in place of it."""
        if self.trainable_adapter is None:
            raise ValueError("the teacher view has no weights to average")
        name = f"{self.trainable_adapter}_ema"
        rank, alpha = self.shared.ranks[self.trainable_adapter]
        self.shared.add(name, rank, alpha, trainable=False)
        ema = DiffusionBackbone(self.core, self.shared, [a if a != self.trainable_adapter else name
                                                         for a in self.adapters], name, guidance=self.guidance)
        ema.load_state_dict(self.state_dict())
        return ema


def _set_attention(transformer: nn.Module, attention: str) -> None:
    """``model.attention``: sdpa is diffusers' default; xformers (optional, CUDA) replaces it."""
    if attention != "xformers":
        return
    try:
        transformer.enable_xformers_memory_efficient_attention()
    except (ImportError, ModuleNotFoundError, ValueError) as e:
        raise ValueError(f"model.attention: xformers is not usable here ({e})") from e


def check_model_paths(model_cfg, device: torch.device) -> Path:
    """The checks of :func:`load_core` that need no loading, run before a run folder is made; returns the
    model folder."""
    path = _require_folder(model_cfg.path, "model.path")
    if model_cfg.generator_path:
        if model_cfg.kind != "flux2":
            raise ValueError(f"model.generator_path: the {model_cfg.kind} generator starts from model.path "
                             "(leave it null)")
        _require_folder(model_cfg.generator_path, "model.generator_path")
    if model_cfg.attention == "xformers" and device.type != "cuda":
        raise ValueError("model.attention: xformers needs CUDA; use sdpa")
    return path


def load_core(model_cfg, device: torch.device) -> DiffusionCore:
    """Load ``model.path`` (and FLUX.2's ``model.generator_path``) with the stock diffusers classes, weights in
    ``model.dtype`` on ``device``; one clear ``ValueError`` naming the key for a missing or wrong folder."""
    import diffusers

    path = check_model_paths(model_cfg, device)
    kind = model_cfg.kind
    dtype = DTYPES[model_cfg.dtype]
    cls = {"sd3": diffusers.StableDiffusion3Pipeline, "flux1": diffusers.FluxPipeline,
           "flux2": diffusers.Flux2KleinPipeline}[kind]
    try:
        pipe = cls.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"model.path: cannot load {path} as a {cls.__name__} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else e})") from e
    pipe.to(device)
    _set_attention(pipe.transformer, model_cfg.attention)
    length = model_cfg.max_sequence_length or DEFAULT_TEXT_LENGTH[kind]
    common = dict(resolution=model_cfg.resolution, dtype=dtype, device=device, text_length=length)
    if kind == "sd3":
        return SD3Core(pipe, **common)
    if kind == "flux1":
        return Flux1Core(pipe, **common)
    gen = None
    if model_cfg.generator_path:
        gpath = _require_folder(model_cfg.generator_path, "model.generator_path")
        sub = "transformer" if (gpath / "transformer").is_dir() else None
        try:
            gen = diffusers.Flux2Transformer2DModel.from_pretrained(gpath, subfolder=sub, dtype=dtype,
                                                                    local_files_only=True).to(device)
        except (OSError, ValueError) as e:
            raise ValueError(f"model.generator_path: cannot load a Flux2Transformer2DModel from {gpath} ({e})") from e
        _set_attention(gen, model_cfg.attention)
    return Flux2Core(pipe, generator_transformer=gen, **common)


# ---------------------------------------------------------------------------------------------- stage models
#: adapter names on the shared base(s); stage 2 keeps stage 1's as frozen, unmerged layers under its own
S1_GENERATOR, S1_FAKE, S2_GENERATOR, S2_FAKE = "s1_generator", "s1_fake", "s2_generator", "s2_fake"


def _rank_alpha(model_cfg) -> tuple[int, float]:
    return model_cfg.lora_rank, model_cfg.lora_alpha or float(model_cfg.lora_rank)


def teacher_view(core: DiffusionCore, cfg) -> DiffusionBackbone:
    """The base with every adapter off; a distilled-guidance model (FLUX.1-dev) gets the preset's teacher guidance
    as its input, where the others run CFG against ``""`` (:func:`rtdmd.stages.common.teacher_guidance`)."""
    return core.view([], guidance=cfg.ac_dmd.teacher_guidance if core.distilled_guidance else 1.0)


def stage1_models(core: DiffusionCore, cfg) -> tuple[DiffusionBackbone, DiffusionBackbone, DiffusionBackbone]:
    """``(generator, fake score, teacher)`` of stage 1 (docs/method.md §12.1): fresh LoRAs (peft's gaussian init) on the
    base — the generator's on klein for FLUX.2 — and the teacher as the base with every adapter off."""
    rank, alpha = _rank_alpha(cfg.model)
    core.generator_base.add(S1_GENERATOR, rank, alpha, trainable=True)
    core.base.add(S1_FAKE, rank, alpha, trainable=True)
    generator = core.view([S1_GENERATOR], S1_GENERATOR, generator=True,
                          block_checkpointing=cfg.model.gradient_checkpointing)
    fake = core.view([S1_FAKE], S1_FAKE, block_checkpointing=cfg.stage1.fake_gradient_checkpointing)
    return generator, fake, teacher_view(core, cfg)


def _frozen_adapter(shared: SharedTransformer, name: str, rank: int, alpha: float, state) -> None:
    if name not in shared.ranks:
        shared.add(name, rank, alpha, trainable=False)
    shared.trainable.discard(name)
    shared.refresh_requires_grad()
    load_adapter_state(shared, name, state)


def stage2_models(core: DiffusionCore, cfg, stage1_modules: dict) -> tuple[DiffusionBackbone, DiffusionBackbone,
                                                                             DiffusionBackbone]:
    """``(generator, fake score, teacher)`` of stage 2 (method.md §8): stage 1's EMA generator LoRA and its fake-score
    LoRA, frozen and *unmerged* (the reference merges them into the bf16 base: equal up to that rounding, and the
    base stays shared), each with a fresh trainable adapter on top, initialised by ``stage2.lora_init``."""
    rank, alpha = _rank_alpha(cfg.model)
    _frozen_adapter(core.generator_base, S1_GENERATOR, rank, alpha, stage1_modules["generator_ema"])
    _frozen_adapter(core.base, S1_FAKE, rank, alpha, stage1_modules["fake_score"])
    core.generator_base.add(S2_GENERATOR, rank, alpha, trainable=True, init=cfg.stage2.lora_init)
    core.base.add(S2_FAKE, rank, alpha, trainable=True, init=cfg.stage2.lora_init)
    generator = core.view([S1_GENERATOR, S2_GENERATOR], S2_GENERATOR, generator=True,
                          block_checkpointing=cfg.model.gradient_checkpointing)
    fake = core.view([S1_FAKE, S2_FAKE], S2_FAKE, block_checkpointing=cfg.stage2.fake_gradient_checkpointing)
    return generator, fake, teacher_view(core, cfg)


def export_lora(core: DiffusionCore, loras: Sequence[dict[str, torch.Tensor]], model_cfg, out_dir) -> Path:
    """Write the generator as ONE diffusers LoRA (``pytorch_lora_weights.safetensors`` with its adapter metadata,
    so the stock loader applies ``alpha/rank``, not 1): stage 1's EMA LoRA, or stage 1's and stage 2's combined
    exactly (:func:`combine_loras`). ``pipe.load_lora_weights(out_dir)`` on the stock pipeline of the generator's
    base (SD3.5: ``model.path``; FLUX.2: klein, ``model.generator_path``) reproduces our generator."""
    import os
    import shutil

    rank, alpha = _rank_alpha(model_cfg)
    state, total_rank, total_alpha = combine_loras([(sd, alpha / rank) for sd in loras])
    meta = core.generator_base.adapter_config(S1_GENERATOR)
    meta.update(r=total_rank, lora_alpha=total_alpha, rank_pattern={}, alpha_pattern={})
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    type(core.pipe).save_lora_weights(tmp, transformer_lora_layers={k: v.contiguous() for k, v in state.items()},
                                      transformer_lora_adapter_metadata=meta)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
