"""Trainer configuration: nested dataclasses, YAML presets, dotted ``--set`` overrides, validation.

The schema is the dataclasses below; a generic validator walks their type hints, so adding a key is
just adding a field (with ``metadata={"min": ..., "max": ..., "min_exclusive": True, "check": fn}``
for range checks). Cross-field rules live in :func:`validate`. Every problem raises
:class:`ConfigError` with one line naming the dotted key (or the file), which the CLI turns into
exit status 2 (docs/training.md §1.3). Every key is listed in docs/training.md §2.2, generated from this
schema and the comment beside each field.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ._io import atomic_write_text

__all__ = [
    "ConfigError", "Config", "ModelConfig", "ToyConfig", "ScheduleConfig", "ACDMDConfig", "RewardConfig",
    "Stage1Config", "Stage2Config", "DataConfig", "EvalConfig", "LogConfig", "DistributedConfig", "load_config",
    "config_from_dict", "config_to_dict", "save_config", "available_presets", "validate", "changed_keys", "resumable",
    "RESUMABLE", "MOVED",
]

PRESET_DIR = Path(__file__).parent / "configs"
TOY_PATCH_SIZE = 2  # the toy SD3 network's patch size (docs/toy.md §5); latent H and W must divide by it


class ConfigError(ValueError):
    """A bad config value, key, file or preset; the message is one line naming the key or path."""


def _rng(lo: float | None = None, hi: float | None = None, *, lo_ex: bool = False, hi_ex: bool = False) -> dict:
    """Field metadata for a range check (inclusive unless ``*_ex``)."""
    return {"min": lo, "max": hi, "min_exclusive": lo_ex, "max_exclusive": hi_ex}


def _check_latent_shape(v: list[int]) -> str | None:
    """3 positive ints [C, H, W]"""
    return None if len(v) == 3 and all(x >= 1 for x in v) else "must be 3 positive ints"


def _check_std_range(v: list[float]) -> str | None:
    """[lo, hi] with 0 < lo <= hi"""
    return None if len(v) == 2 and 0 < v[0] <= v[1] else "must be 2 floats [lo, hi] with 0 < lo <= hi"


def _check_betas(v: list[float]) -> str | None:
    """2 floats in [0, 1)"""
    return None if len(v) == 2 and all(0 <= x < 1 for x in v) else "must be 2 floats in [0, 1)"


def _check_range(v: list[int]) -> str | None:
    """[first, last] with 0 <= first <= last"""
    return None if len(v) == 2 and 0 <= v[0] <= v[1] else "must be 2 ints [first, last] with 0 <= first <= last"


def _check_steps(v: list[int]) -> str | None:
    """strictly decreasing ints in (0, 1000]"""
    ok = len(v) >= 1 and all(0 < x <= 1000 for x in v) and all(a > b for a, b in zip(v[:-1], v[1:], strict=True))
    return None if ok else "must be a non-empty, strictly decreasing list of ints in (0, 1000]"


# The comment beside each field is its documentation: docs/training.md §2.2 is generated from it
# (python -m rtdmd.config_reference). Keep it one line, say what the key does and what the reference uses.


@dataclass
class ModelConfig:
    """The backbone: ``kind: toy`` trains the toy network of the ``toy`` section; the other kinds a real one (SD3 /
    SD3.5, FLUX.1, FLUX.2-klein) from local diffusers folders, which the other keys describe."""

    kind: Literal["toy", "sd3", "flux1", "flux2"] = "toy"  # toy, or a StableDiffusion3 / Flux / Flux2Klein folder
    path: str | None = None  # the local diffusers folder of the base (teacher and fake score)
    lora_rank: int = field(default=0, metadata=_rng(0))  # LoRA rank of generator and fake score; 0 = full parameters
    lora_alpha: float = field(default=0.0, metadata=_rng(0))  # LoRA alpha (scale alpha/rank); 0 = same as the rank
    generator_path: str | None = None  # FLUX.2: the generator starts from klein (method.md §8); null = model.path
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # weights (the reference: bf16 + bf16 autocast)
    resolution: int = field(default=512, metadata=_rng(16))  # training images are resolution x resolution px
    attention: Literal["sdpa", "xformers"] = "sdpa"  # xformers: optional, CUDA only
    max_sequence_length: int = field(default=0, metadata=_rng(0))  # text tokens; 0 = the reference's (128 / 512)
    gradient_checkpointing: bool = True  # the generator's transformer blocks (the reference: on)


@dataclass
class ToyConfig:
    """The analytic toy world (docs/toy.md): its data, network, exact teacher, evaluation and base pretraining."""

    num_prompts: int = field(default=4, metadata=_rng(1))  # prompts "toy prompt 0" ...
    num_components: int = field(default=3, metadata=_rng(1))  # Gaussian components per prompt
    latent_shape: list[int] = field(default_factory=lambda: [4, 8, 8],
                                    metadata={"check": _check_latent_shape})  # H and W even (patch 2)
    data_seed: int = field(default=20260526, metadata=_rng(0))  # fixes mixtures and reward directions
    min_weight: float = field(default=0.15, metadata=_rng(0, lo_ex=True))  # least mixture weight, <= 1/num_components
    std_range: list[float] = field(default_factory=lambda: [0.3, 0.6],
                                   metadata={"check": _check_std_range})  # component stds, uniform in the range
    num_layers: int = field(default=2, metadata=_rng(1))  # network: transformer layers
    num_heads: int = field(default=2, metadata=_rng(1))  # network: attention heads
    head_dim: int = field(default=32, metadata=_rng(1))  # network: width of each head
    prompt_tokens: int = field(default=4, metadata=_rng(1))  # network: learned tokens per prompt
    text_dim: int = field(default=64, metadata=_rng(1))  # network: joint_attention_dim
    pooled_dim: int = field(default=32, metadata=_rng(1))  # network: pooled prompt embedding width
    n_eval: int = field(default=2048, metadata=_rng(2))  # samples per prompt in every evaluation row
    beta: float = field(default=1.0, metadata=_rng(0))  # the beta of the fd_tilted_at_beta diagnostic
    beta_max: float = field(default=4.0, metadata=_rng(0, lo_ex=True))  # beta_hat is searched on [0, beta_max] ...
    beta_step: float = field(default=0.1, metadata=_rng(0, lo_ex=True))  # ... with this step (<= beta_max)
    base_steps: int = field(default=1000, metadata=_rng(0))  # base pretraining optimizer steps
    base_batch_size: int = field(default=128, metadata=_rng(1))  # base pretraining batch
    base_lr: float = field(default=1e-3, metadata=_rng(0, lo_ex=True))  # base pretraining learning rate (Adam)
    base_cfg_dropout: float = field(default=0.1, metadata=_rng(0, 1))  # share of prompts dropped for CFG's branch
    base_cache: bool = True  # reuse a pretrained base keyed by its config ($RTDMD_CACHE, default ~/.cache/rtdmd)


@dataclass
class ScheduleConfig:
    """The few-step sampler: its step list, the shift that turns it into sigmas, and CPS eta (method.md §1, §2.1)."""

    denoising_steps: list[int] = field(default_factory=lambda: [1000, 750, 500, 250],
                                       metadata={"check": _check_steps})  # the distilled step list
    shift: float = field(default=3.0, metadata=_rng(0, lo_ex=True))  # static shift (SD3); FLUX.2 uses its dynamic shift
    eta: float = field(default=0.9, metadata=_rng(0, 1))  # CPS stochasticity; 0 = Euler steps


@dataclass
class ACDMDConfig:
    """What both stages' AC-DMD parts share (method.md §4): the teacher's guidance, the renoise draws and the
    fake-score objective. Stage 1 uses them every step, stage 2 in its fake step and auxiliary term."""

    teacher_guidance: float = field(default=1.0, metadata=_rng(0))  # teacher CFG vs "" (FLUX.1: its guidance input)
    renoise_offset: int = field(default=10, metadata=_rng(0))  # t_r ~ U[1000·σ_s + offset, 1000)
    renoise_min: int = field(default=20, metadata=_rng(0, 1000))  # clamp of t_r (method.md §4.1.2)
    renoise_max: int = field(default=980, metadata=_rng(0, 1000))  # clamp of t_r
    fake_weight_max: float = field(default=10.0, metadata=_rng(0, lo_ex=True))  # clamp of 1/σ_ts² (method.md §4.2)
    consistency_weight: float = field(default=0.01, metadata=_rng(0))  # the consistency term's weight γ
    consistency_epsilon: int = field(default=200, metadata=_rng(1))  # δ ~ U{1..ε} timesteps


@dataclass
class RewardConfig:
    weight: float = 1.0  # weight in the group advantages (method.md §5.3)
    backprop: bool = False  # also back-propagated at the final step(s) (method.md §7)
    path: str | None = None  # local folder or file of the reward model (image rewards)
    kind: str | None = None  # clipscore|pickscore|hpsv2|aesthetic|geneval|imagereward; null = the entry's name
    processor_path: str | None = None  # PickScore: its image processor's folder; geneval: Mask2Former's (null = path)
    tokenizer_path: str | None = None  # HPSv2.1: a CLIP tokenizer folder; ImageReward: a bert-base-uncased one
    clip_path: str | None = None  # aesthetic: the CLIP ViT-L/14 under the predictor; geneval: its colour classifier
    function: str | None = None  # plug-in scorer "module:function" (GenEval detectors, VLM judges)
    differentiable: bool = False  # plug-ins only: whether the function's score may be back-propagated


@dataclass
class DataConfig:
    """Prompt files of the real presets (docs/training.md §4.3); the toy's prompts are built in."""

    train_prompts: str | None = None  # .txt (one prompt a line) or .jsonl ({"prompt": ..., other fields})
    stage2_prompts: str | None = None  # stage 2's own prompts (the reference: GenEval .jsonl); null = train_prompts
    eval_prompts: str | None = None  # same formats; prompts for evaluation


def _default_rewards() -> dict[str, RewardConfig]:
    return {"linear": RewardConfig(weight=1.0, backprop=True), "binary": RewardConfig(weight=1.0, backprop=False)}


@dataclass
class Stage1Config:
    """AC-DMD cold start (method.md §4.4, §12.1). Faithful defaults; the toy preset tunes rates and sizes."""

    steps: int = field(default=2000, metadata=_rng(0))  # fake-score updates (the reference's steps)
    batch_size: int = field(default=64, metadata=_rng(1))  # global batch of each update
    fake_update_ratio: int = field(default=10, metadata=_rng(1))  # generator update every N-th step (TTUR)
    generator_lr: float = field(default=3e-5, metadata=_rng(0, lo_ex=True))  # AdamW learning rate of the generator
    fake_lr: float = field(default=3e-5, metadata=_rng(0, lo_ex=True))  # AdamW learning rate of the fake score
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999],
                                    metadata={"check": _check_betas})  # AdamW betas, both optimizers
    adam_eps: float = field(default=1e-8, metadata=_rng(0, lo_ex=True))  # AdamW eps, both optimizers
    weight_decay: float = field(default=0.0, metadata=_rng(0))  # AdamW weight decay, both optimizers
    grad_clip: float = field(default=1.0, metadata=_rng(0, lo_ex=True))  # gradient-norm clip of each update
    ema_decay: float = field(default=0.99, metadata=_rng(0, 1))  # model EMA, every step
    ema_dtype: Literal["param", "float32"] = "param"  # method.md §13.18: the reference keeps the EMA in param dtype
    random_stop: bool = True  # stop index ~ U{1..K}; false = always unroll all K steps
    chain_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # method.md §13.4: the reference's chain is bf16
    consistency: bool = True  # the fake score's consistency regulariser (method.md §4.2; weight and ε: ac_dmd)
    rollout_checkpoint: bool = True  # rk.checkpointed_rollout: keep only the grad step's input
    rank_shared_timesteps: bool = False  # t_r, δ shared by the ranks as the reference's broadcast (method.md §13.23)
    fake_gradient_checkpointing: bool = True  # the fake score's blocks (the reference: on in stage 1)
    checkpoint_every: int = field(default=500, metadata=_rng(1))  # steps between checkpoints
    keep_checkpoints: int = field(default=2, metadata=_rng(1))  # newest stage-1 checkpoints kept


@dataclass
class Stage2Config:
    """RTDMD (method.md §5–§8, §12.2). The AC-DMD draws and fake-score objective are the ``ac_dmd`` section's."""

    steps: int = field(default=100, metadata=_rng(0))  # epochs: one rollout, one fake and one generator step
    group_size: int = field(default=24, metadata=_rng(2))  # K samples per prompt per epoch
    prompts_per_epoch: int = field(default=0, metadata=_rng(0))  # 0 = every prompt each epoch
    sampling_batches: int = field(default=1, metadata=_rng(1))  # draws of distinct prompts per epoch (reference: 16)
    num_batches: int = field(default=16, metadata=_rng(1))  # policy sub-batches per epoch (grad accumulation)
    lr: float = field(default=3e-6, metadata=_rng(0, lo_ex=True))  # AdamW learning rate of the generator
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999],
                                    metadata={"check": _check_betas})  # AdamW betas, both optimizers
    adam_eps: float = field(default=1e-8, metadata=_rng(0, lo_ex=True))  # AdamW eps, both optimizers
    weight_decay: float = field(default=1e-4, metadata=_rng(0))  # AdamW weight decay of the generator (fake: 0)
    grad_clip: float = field(default=1.0, metadata=_rng(0, lo_ex=True))  # gradient-norm clip of both steps
    fake_lr: float = field(default=3e-5, metadata=_rng(0, lo_ex=True))  # AdamW learning rate of the fake score
    fake_batch_size: int = field(default=8, metadata=_rng(1))  # chunks of the one fake step per epoch
    consistency: bool = True  # the fake score's consistency term in stage 2 (weight and ε: ac_dmd)
    ppo_steps: int = field(default=2, metadata=_rng(0))  # SubGRPO: PPO steps drawn per epoch ...
    ppo_step_range: list[int] = field(default_factory=lambda: [0, 2], metadata={"check": _check_range})  # ... here
    ppo_weight: float = field(default=1.0, metadata=_rng(0))  # weight of the PPO loss
    clip_range: float = field(default=1e-5, metadata=_rng(0))  # PPO ratio clip (method.md §5.4)
    adv_clip: float = field(default=5.0, metadata=_rng(0, lo_ex=True))  # advantages clamped to ±adv_clip
    aux_weight: float = field(default=0.001, metadata=_rng(0))  # AC-DMD at the final step (distribution matching)
    bp_scale: float = field(default=1e-4, metadata=_rng(0))  # reward back-propagation: scale·mean relu(margin - R)
    bp_margin: float = 3.0  # the hinge's margin
    bp_steps: int = field(default=1, metadata=_rng(1))  # back-propagate through the last k steps (k > 1: ours)
    ema_decay: float = field(default=0.9, metadata=_rng(0, 1))  # generator EMA decay, after a warm-up
    ema_interval: int = field(default=8, metadata=_rng(1))  # EMA update every N-th optimizer step
    ema_dtype: Literal["param", "float32"] = "param"  # as stage1.ema_dtype (method.md §13.18)
    ema_per_sub_batch: bool = True  # method.md §13.2: the reference calls the EMA after every sub-batch
    lora_init: Literal["reference", "peft"] = "reference"  # fresh adapter: A ~ N(0,1) (method.md §13.3) or N(0,1/r)
    fake_gradient_checkpointing: bool = True  # ours; the reference runs the stage-2 fake without it
    vae_checkpointing: bool = True  # ours: checkpoint the VAE decode of reward BP (the reference: off)
    bp_batch_size: int = field(default=0, metadata=_rng(0))  # BP decode+score chunk (0 = the whole sub-batch)
    decode_batch_size: int = field(default=4, metadata=_rng(1))  # rollout VAE decode chunk (the reference: 4)
    sample_batch_size: int = field(default=0, metadata=_rng(0))  # rollout chunk (the reference: 9); 0 = all at once
    checkpoint_every: int = field(default=50, metadata=_rng(1))  # epochs between checkpoints
    keep_checkpoints: int = field(default=2, metadata=_rng(1))  # newest stage-2 checkpoints kept
    eval_every: int = field(default=0, metadata=_rng(0))  # real models: evaluate every N epochs (0 = off)


@dataclass
class EvalConfig:
    """Evaluation sampling (docs/training.md §7)."""

    batch_size: int = field(default=4096, metadata=_rng(1))  # samples generated per forward
    num_images: int = field(default=64, metadata=_rng(1))  # real models: images per evaluation (the reference: 64)


@dataclass
class LogConfig:
    """What the CLI prints and records."""

    interval: int = field(default=50, metadata=_rng(1))  # steps between metrics.jsonl lines
    progress: bool = True  # tqdm progress bars
    tensorboard: bool = False  # also write every metrics line as TensorBoard scalars to <run>/tensorboard
    wandb: bool = False  # also log to Weights & Biases (needs wandb installed and logged in)


@dataclass
class DistributedConfig:
    """Data-parallel training under torchrun (docs/training.md §6)."""

    strategy: Literal["none", "ddp", "fsdp"] = "none"  # one process, replicated (DDP) or sharded (FSDP2)


def _check_name(v: str) -> str | None:
    """a plain name: letters, digits, ``_ . -``"""
    return None if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", v) else "must be a plain name (letters, digits, _ . -)"


@dataclass
class Config:
    preset: str = field(default="toy", metadata={"check": _check_name})  # the preset it came from (names run folders)
    seed: int = field(default=0, metadata=_rng(0))  # every random draw of the run derives from it
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = CUDA when there is one
    nonfinite: Literal["stop", "skip"] = "stop"  # a step whose loss or gradient is not finite: stop, or undo it
    model: ModelConfig = field(default_factory=ModelConfig)
    toy: ToyConfig = field(default_factory=ToyConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ac_dmd: ACDMDConfig = field(default_factory=ACDMDConfig)
    rewards: dict[str, RewardConfig] = field(default_factory=_default_rewards)
    data: DataConfig = field(default_factory=DataConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# ---------------------------------------------------------------- generic validator


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _got(v: Any) -> str:
    r = repr(v)
    return f"{r if len(r) <= 60 else r[:57] + '...'} ({type(v).__name__})"


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _is_dc_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _optional_inner(tp: Any) -> Any | None:
    """``X`` for ``X | None`` (or ``Optional[X]``), else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


#: keys that moved (the config schema of December 2026): naming the old one fails with the new one's name
MOVED = {
    **{f"model.{k}": f"toy.{k}" for k in ("num_layers", "num_heads", "head_dim", "prompt_tokens", "text_dim",
                                            "pooled_dim")},
    "model.teacher_guidance": "ac_dmd.teacher_guidance", "toy.teacher_guidance": "ac_dmd.teacher_guidance",
    **{f"stage1.{k}": f"ac_dmd.{k}" for k in ("renoise_offset", "renoise_min", "renoise_max", "fake_weight_max",
                                              "consistency_weight", "consistency_epsilon")},
}


def _unknown(key: str, known: Sequence[str], prefix: str) -> ConfigError:
    if key in MOVED:
        return ConfigError(f"config key '{key}' is now '{MOVED[key]}'")
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(v: Any, tp: Any, key: str) -> Any:
    """Check ``v`` against type hint ``tp`` and return it converted (int -> float, mappings -> dataclasses)."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if v is None else _coerce(v, inner, key)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_dc_type(tp):
        return _build(tp, v, key)
    if origin is Literal:
        # `type(v) is type(a)` so that True does not match a 1 choice
        if not any(v == a and type(v) is type(a) for a in args):
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(repr, args))}, got {_got(v)}")
        return v
    if origin is dict:
        if not isinstance(v, Mapping):
            raise ConfigError(f"config key '{key}' must be a mapping, got {_got(v)}")
        out = {}
        for name, sub in v.items():
            # names become dotted keys, so they must be addressable by `--set key.name.sub=...`
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name):
                raise ConfigError(f"config key '{key}' has an invalid entry name {name!r} (use letters, digits, _ -)")
            out[name] = _coerce(sub, args[1], f"{key}.{name}")
        return out
    if origin is list:
        if not isinstance(v, list):
            raise ConfigError(f"config key '{key}' must be a list of {args[0].__name__}s, got {_got(v)}")
        return [_coerce(x, args[0], f"{key}[{i}]") for i, x in enumerate(v)]
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"config key '{key}' must be a bool (true/false), got {_got(v)}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"config key '{key}' must be an int, got {_got(v)}")
        return v
    if tp is float:
        # YAML 1.1 reads `1e-3` (no dot) as a str: accept any str float() accepts
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                raise ConfigError(f"config key '{key}' must be a float, got {_got(v)}") from None
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"config key '{key}' must be a float, got {_got(v)}")
        if not math.isfinite(v):
            raise ConfigError(f"config key '{key}' must be a finite float, got {v}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"config key '{key}' must be a str, got {_got(v)}")
        return v
    raise TypeError(f"config key '{key}': unsupported field type {tp!r} in the schema")


def range_text(meta: Mapping[str, Any]) -> str | None:
    """A field's range check in words (``in [0, 1]``, ``>= 1``, ``> 0``), or None when it has none."""
    lo, hi = meta.get("min"), meta.get("max")
    lo_ex, hi_ex = meta.get("min_exclusive", False), meta.get("max_exclusive", False)
    if lo is not None and hi is not None:
        return f"in {'(' if lo_ex else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_ex else ']'}"
    if lo is not None:
        return f"{'>' if lo_ex else '>='} {_fmt(lo)}"
    if hi is not None:
        return f"{'<' if hi_ex else '<='} {_fmt(hi)}"
    return None


def _check_meta(v: Any, meta: Mapping[str, Any], key: str) -> None:
    if v is None:
        return
    lo, hi = meta.get("min"), meta.get("max")
    lo_ex, hi_ex = meta.get("min_exclusive", False), meta.get("max_exclusive", False)
    # written as `not (ok)` so that nan/inf compare as out of range
    bad = lo is not None and not (v > lo if lo_ex else v >= lo)
    bad = bad or (hi is not None and not (v < hi if hi_ex else v <= hi))
    if bad:
        raise ConfigError(f"config key '{key}' must be {range_text(meta)}, got {_fmt(v)}")
    check: Callable[[Any], str | None] | None = meta.get("check")
    if check is not None and (msg := check(v)) is not None:
        raise ConfigError(f"config key '{key}' {msg}, got {v!r}")


def _build(cls: type, data: Any, key: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; keys not given take the dataclass defaults."""
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = dataclasses.asdict(data)
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key '{key}' must be a mapping, got {_got(data)}")
    prefix = f"{key}." if key else ""
    hints, fields = _hints(cls), {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in fields:
            raise _unknown(f"{prefix}{k}", list(fields), prefix)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], prefix + name)
            _check_meta(kwargs[name], f.metadata, prefix + name)
    return cls(**kwargs)


def validate(cfg: Config) -> None:
    """Check every field of ``cfg`` (types, ranges) and the cross-field rules; raise ConfigError."""
    cfg = _build(Config, config_to_dict(cfg))  # re-checks fields, also after code mutated cfg
    t, m = cfg.toy, cfg.model
    if t.min_weight * t.num_components > 1 + 1e-12:
        raise ConfigError(f"config key 'toy.min_weight' must be <= 1/toy.num_components = "
                          f"{_fmt(1 / t.num_components)}, got {_fmt(t.min_weight)}")
    if t.beta_step > t.beta_max:
        raise ConfigError(f"config key 'toy.beta_step' must be <= toy.beta_max = {_fmt(t.beta_max)}, "
                          f"got {_fmt(t.beta_step)}")
    if cfg.ac_dmd.renoise_min > cfg.ac_dmd.renoise_max:
        raise ConfigError(f"config key 'ac_dmd.renoise_min' must be <= ac_dmd.renoise_max = "
                          f"{cfg.ac_dmd.renoise_max}, got {cfg.ac_dmd.renoise_min}")
    s2, n_steps = cfg.stage2, len(cfg.schedule.denoising_steps)
    if s2.ppo_steps > 0 and n_steps == 1:
        raise ConfigError("config key 'stage2.ppo_steps' must be 0 with one sampler step (schedule.denoising_steps "
                          "has a single, deterministic step: there is no stochastic step to train by PPO)")
    if s2.ppo_steps > 0 and s2.ppo_step_range[1] >= n_steps - 1:
        raise ConfigError(f"config key 'stage2.ppo_step_range' must end before the deterministic last step "
                          f"{n_steps - 1}, got {s2.ppo_step_range}")
    if s2.ppo_steps > s2.ppo_step_range[1] - s2.ppo_step_range[0] + 1:
        raise ConfigError(f"config key 'stage2.ppo_steps' must be <= the size of stage2.ppo_step_range "
                          f"{s2.ppo_step_range}, got {s2.ppo_steps}")
    if s2.prompts_per_epoch == 0 and s2.sampling_batches != 1:
        raise ConfigError("config key 'stage2.sampling_batches' must be 1 when stage2.prompts_per_epoch is 0 "
                          f"(every prompt once per epoch), got {s2.sampling_batches}")
    if s2.prompts_per_epoch % s2.sampling_batches:
        raise ConfigError(f"config key 'stage2.prompts_per_epoch' must be a multiple of stage2.sampling_batches = "
                          f"{s2.sampling_batches}, got {s2.prompts_per_epoch}")
    if s2.bp_steps > n_steps:
        raise ConfigError(f"config key 'stage2.bp_steps' must be <= the number of sampler steps {n_steps}, "
                          f"got {s2.bp_steps}")
    if m.kind != "toy":
        for key, value in (("model.path", m.path), ("data.train_prompts", cfg.data.train_prompts)):
            if not value:
                raise ConfigError(f"config key '{key}' must be set for model.kind={m.kind}")
        if m.lora_rank == 0:
            raise ConfigError(f"config key 'model.lora_rank' must be > 0 for model.kind={m.kind} (LoRA training)")
        if m.resolution % 16:
            raise ConfigError(f"config key 'model.resolution' must be a multiple of 16, got {m.resolution}")
    if m.kind == "toy" and any(s % TOY_PATCH_SIZE for s in t.latent_shape[1:]):
        raise ConfigError(f"config key 'toy.latent_shape' must have height and width divisible by the toy "
                          f"network's patch size {TOY_PATCH_SIZE}, got {t.latent_shape}")
    if m.kind == "toy" and t.num_heads * t.head_dim % 2:
        # SD3's sin-cos positional embedding needs an even inner dim (num_heads * head_dim)
        raise ConfigError(f"config key 'toy.head_dim' times toy.num_heads must be even for the toy network, "
                          f"got {t.head_dim} * {t.num_heads}")


# ---------------------------------------------------------------- dicts, files, presets


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict (dicts, lists, str, int, float, bool, None) of a config or section, in field order."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config`; keys not given take the dataclass defaults."""
    cfg = _build(Config, d)
    validate(cfg)
    return cfg


class _Dumper(yaml.SafeDumper):
    """Block-style mappings, one-line lists: reads like the presets."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def save_config(cfg: Config, path: str | Path, notes: Sequence[str] = ()) -> None:
    """Write ``cfg`` as YAML atomically (temp file in the same folder, then ``os.replace``), with ``notes`` (comment
    lines) at the end."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
    atomic_write_text(path, text + "".join(f"{n}\n" for n in notes))


#: Keys a ``--resume --set`` may change: they neither shape the models, the data nor the random draws. Learning
#: rates and the other optimizer settings are applied to the loaded optimizer state too.
RESUMABLE = {
    "device", "nonfinite", "log", "eval", "distributed",
    "stage1.steps", "stage1.generator_lr", "stage1.fake_lr", "stage1.adam_betas", "stage1.adam_eps",
    "stage1.weight_decay", "stage1.grad_clip", "stage1.checkpoint_every", "stage1.keep_checkpoints",
    "stage1.rollout_checkpoint", "stage1.fake_gradient_checkpointing",
    "stage2.steps", "stage2.lr", "stage2.fake_lr", "stage2.adam_betas", "stage2.adam_eps", "stage2.weight_decay",
    "stage2.grad_clip", "stage2.checkpoint_every", "stage2.keep_checkpoints", "stage2.fake_gradient_checkpointing",
    "stage2.vae_checkpointing", "stage2.bp_batch_size", "stage2.decode_batch_size", "stage2.sample_batch_size",
    "stage2.eval_every",
    "model.attention", "model.gradient_checkpointing",
}


def resumable(key: str) -> bool:
    """Whether dotted ``key`` (or a section holding it) is in :data:`RESUMABLE`."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in RESUMABLE for i in range(1, len(parts) + 1))


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ between two configs (a reward entry added or removed counts as its name)."""

    def walk(a: Any, b: Any, prefix: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            out = []
            for k in list(a) + [k for k in b if k not in a]:
                key = f"{prefix}{k}"
                out += [key] if k not in a or k not in b else walk(a[k], b[k], f"{key}.")
            return out
        return [] if a == b else [prefix[:-1]]

    return walk(config_to_dict(old), config_to_dict(new), "")


def available_presets() -> list[str]:
    """Names of the presets shipped in ``rtdmd/configs/*.yaml``, sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what} '{path}': {type(e).__name__}: {e.args[-1] if e.args else e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"invalid YAML in {what} '{path}'{where}: {getattr(e, 'problem', None) or e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}' must contain a mapping of config keys, got {type(data).__name__}")
    return data


def _field_type(parts: list[str]) -> Any:
    """Type hint at a dotted path of the schema, or ConfigError for an unknown key."""
    tp: Any = Config
    for i, part in enumerate(parts):
        key, prefix = ".".join(parts[: i + 1]), ".".join(parts[:i]) + ("." if i else "")
        tp = _optional_inner(tp) or tp
        if _is_dc_type(tp):
            hints = _hints(tp)
            if part not in hints:
                raise _unknown(key, list(hints), prefix)
            tp = hints[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]  # any entry name: a new entry is created with defaults
        else:
            raise ConfigError(f"unknown config key '{key}' ('{prefix[:-1]}' has no sub-keys)")
    return tp


def _apply_override(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"config override '{item}' must look like key.sub=value")
    key, text = (s.strip() for s in item.split("=", 1))
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"config override '{item}' has an empty key part")
    tp = _field_type(parts)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config key '{key}': cannot parse override value {text!r} as YAML") from e
    if value is None and len(parts) > 1 and typing.get_origin(_field_type(parts[:-1])) is dict:
        data.get(parts[0], {}).pop(parts[-1], None)  # `--set rewards.NAME=null` removes the entry
        return
    str_like = tp is str or _optional_inner(tp) is str or (
        typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp)))
    if str_like and value is not None and not isinstance(value, str):
        value = text  # `model.path=123` or `device=yes` mean the text, not YAML's int/bool
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})  # a new rewards.<name> starts empty and takes defaults
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{key}' cannot be set: '{part}' is not a mapping")
    node[parts[-1]] = value


def load_config(preset: str | None = "toy", config_file: str | Path | None = None,
                overrides: Sequence[str] = ()) -> Config:
    """Resolve a config: ``config_file`` if given (then ``preset`` is ignored), else preset ``preset``
    (``rtdmd/configs/<preset>.yaml``), else the dataclass defaults; then the ``key.sub=value`` overrides
    (values parsed as YAML), in order; then validation. Raises ConfigError."""
    if config_file is not None:
        data = _read_yaml(Path(config_file), "config file")
    elif preset is not None:
        names = available_presets()
        if preset not in names:
            raise ConfigError(f"unknown preset '{preset}' (available: {', '.join(names) or 'none'})")
        data = _read_yaml(PRESET_DIR / f"{preset}.yaml", "preset")
        data.setdefault("preset", preset)
    else:
        data = {}
    # fill every key first, so an override into `rewards.<name>` adds to the file's rewards, not replaces them
    full = config_to_dict(_build(Config, data))
    for item in overrides:
        _apply_override(full, item)
    return config_from_dict(full)
