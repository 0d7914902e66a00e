"""Tiny, deterministic, offline diffusers pipelines for tests (SD3.5-, FLUX.1-dev- and FLUX.2-klein-style).

Each builder constructs every component from a config with seeded weights, wraps them in the stock pipeline
class and writes the folder with the stock ``save_pretrained``; tests load it back with the stock
``from_pretrained``. The sizes are as small as the stock pipeline code allows while keeping the dimension
relations the pipelines rely on (docs/training.md §5.5, docs/method.md §1):

* SD3: CLIP-L and CLIP-G penultimate hidden states are concatenated (16 + 32 = 48) and zero-padded to the
  T5 width (64 = ``joint_attention_dim``, so the padding is exercised); the pooled embedding is the sum of the
  two CLIP projection widths (16 + 32 = 48 = ``pooled_projection_dim``). The VAE downsamples 8x with 16 latent
  channels and SD3's scaling/shift factors, so 64 px -> latents ``[B, 16, 8, 8]``.
* FLUX.2-klein: the text embedding stacks Qwen3 hidden states of layers (9, 18, 27), so the Qwen3 has 28
  (narrow) layers and ``joint_attention_dim = 3 x 16 = 48``; the VAE downsamples 8x to 8 latent channels which
  the pipeline patchifies 2x2, so ``in_channels = 4 x 8 = 32`` and 64 px -> packed latents ``[B, 16, 32]``
  (unpacked ``[B, 32, 4, 4]``).

Nothing is cached globally: every call builds and writes afresh. Each component is initialised under its own
seed (derived from ``seed`` and the component name) inside ``torch.random.fork_rng`` so the caller's global RNG
is left untouched and two builds give byte-identical safetensors.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tiny_tokenizers import clip_tokenizer, qwen_tokenizer, t5_tokenizer

# SD3 ----------------------------------------------------------------------------------------------------------
SD3_SCALING_FACTOR = 1.5305  # SD3/SD3.5 VAE config values: decode uses x / 1.5305 + 0.0609
SD3_SHIFT_FACTOR = 0.0609
SD3_CLIP_L_WIDTH = 16  # CLIP-L (768 in the real model); hidden == projection width as in the real CLIP-L
SD3_CLIP_G_WIDTH = 32  # CLIP-G (1280); different from CLIP-L so a swapped encoder shows up as a shape error
SD3_T5_WIDTH = 64  # T5-XXL (4096); > 16 + 32 so the CLIP features are zero-padded, as 2048 -> 4096 really is
SD3_LATENT_CHANNELS = 16  # as the real SD3 VAE

# FLUX.2 -------------------------------------------------------------------------------------------------------
FLUX2_QWEN_WIDTH = 16  # Qwen3-4B hidden size is 2560; joint_attention_dim = 3 x this
FLUX2_QWEN_LAYERS = 28  # the pipeline reads hidden_states[9], [18], [27]: needs >= 27 decoder layers
FLUX2_LATENT_CHANNELS = 8  # real FLUX.2 VAE has 32; 8 keeps the packed width (32) distinct from SD3's 16
FLUX2_VARIANTS = ("klein", "base")

# FLUX.1 -------------------------------------------------------------------------------------------------------
FLUX1_CLIP_WIDTH = 16  # CLIP-L's pooled width (768 in the real model) = pooled_projection_dim
FLUX1_T5_WIDTH = 64  # T5-XXL (4096) = joint_attention_dim
FLUX1_LATENT_CHANNELS = 4  # real FLUX.1 VAE has 16; packed 2x2 -> 4 x 4 = 16 = in_channels
FLUX1_SCALING_FACTOR = 0.3611  # FLUX.1 VAE config values: decode uses x / 0.3611 + 0.1159
FLUX1_SHIFT_FACTOR = 0.1159

# VAE blocks: 4 of them so the spatial factor is 8 like the real VAEs (vae_scale_factor = 2 ** (len - 1));
# channels divisible by the 4 GroupNorm groups.
_VAE_BLOCKS = (8, 8, 16, 16)
_VAE_GROUPS = 4


def _component_seed(seed: int, name: str) -> int:
    """A per-component seed so that one component's init never shifts another's (crc32 is stable across runs)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@contextmanager
def _seeded(seed: int, name: str) -> Iterator[None]:
    """Seed the global CPU RNG for one component's construction, restoring the caller's RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_component_seed(seed, name))
        yield


def _perturb_constant_parameters(model: torch.nn.Module) -> torch.nn.Module:
    """Add small seeded noise to every parameter that init left constant (norm scales of 1, zero biases).

    Otherwise those tensors are identical across seeds/variants, and a loader that dropped them (leaving the
    default init) would go unnoticed. Uses the RNG of the enclosing :func:`_seeded` block.
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() > 1 and bool((param == param.flatten()[0]).all()):
                param.add_(0.05 * torch.randn_like(param))
    return model


def _vae_blocks(encoder: bool) -> tuple[str, ...]:
    name = "DownEncoderBlock2D" if encoder else "UpDecoderBlock2D"
    return (name,) * len(_VAE_BLOCKS)


def _vae_kwargs(latent_channels: int) -> dict:
    """What the SD3 and FLUX.2 tiny VAEs share: 4 blocks (factor 8), 1 layer each, 64 px samples."""
    return dict(in_channels=3, out_channels=3, down_block_types=_vae_blocks(encoder=True),
                up_block_types=_vae_blocks(encoder=False), block_out_channels=_VAE_BLOCKS, layers_per_block=1,
                norm_num_groups=_VAE_GROUPS, latent_channels=latent_channels, sample_size=64)


def _clip_text_encoder(width: int, vocab_size: int, bos: int, eos: int, act: str):
    """A 2-layer CLIP text tower: 2 layers so ``hidden_states[-2]`` (SD3's penultimate layer) is a real layer.

    ``eos_token_id`` must be the tokenizer's: CLIP pools the first EOS position (ids here are not CLIP's 49407).
    """
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,  # the CLIP tokenizers pad to 77 like the real ones
        hidden_act=act,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return _perturb_constant_parameters(CLIPTextModelWithProjection(config)).eval()


def build_tiny_sd3(path: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny ``StableDiffusion3Pipeline`` folder (SD3.5-M layout) at ``path`` and return it.

    Transformer: 2 MMDiT layers (the first one MMDiT-X dual attention with RMS qk-norm, as SD3.5-M), 4 heads of 8
    (inner/caption width 32), patch 2, 16 latent channels; ``sample_size=8`` so the default resolution is 64 px;
    ``pos_embed_max_size=64`` allows up to 1024 px. VAE: SD3-style ``AutoencoderKL`` without quant convs.
    Scheduler: ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` (static shift, as SD3).
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import T5Config, T5EncoderModel

    path = Path(path)
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    clip_vocab_size = len(tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    with _seeded(seed, "sd3/text_encoder"):
        text_encoder = _clip_text_encoder(SD3_CLIP_L_WIDTH, clip_vocab_size, bos, eos, "quick_gelu")
    with _seeded(seed, "sd3/text_encoder_2"):
        text_encoder_2 = _clip_text_encoder(SD3_CLIP_G_WIDTH, clip_vocab_size, bos, eos, "gelu")
    with _seeded(seed, "sd3/text_encoder_3"):
        # T5 v1.1 layout (gated-gelu, untied head); 2 layers so the relative-bias-free layer runs too.
        t5_config = T5Config(
            vocab_size=len(tokenizer_3),
            d_model=SD3_T5_WIDTH,
            d_kv=16,
            d_ff=2 * SD3_T5_WIDTH,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            pad_token_id=tokenizer_3.pad_token_id,
            eos_token_id=tokenizer_3.eos_token_id,
            decoder_start_token_id=tokenizer_3.pad_token_id,
        )
        text_encoder_3 = _perturb_constant_parameters(T5EncoderModel(t5_config)).eval()
    with _seeded(seed, "sd3/transformer"):
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=SD3_LATENT_CHANNELS,
            out_channels=SD3_LATENT_CHANNELS,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=SD3_T5_WIDTH,
            caption_projection_dim=32,
            pooled_projection_dim=SD3_CLIP_L_WIDTH + SD3_CLIP_G_WIDTH,
            pos_embed_max_size=64,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        )
        _perturb_constant_parameters(transformer)
    with _seeded(seed, "sd3/vae"):
        vae = AutoencoderKL(
            **_vae_kwargs(SD3_LATENT_CHANNELS),
            scaling_factor=SD3_SCALING_FACTOR,
            shift_factor=SD3_SHIFT_FACTOR,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        _perturb_constant_parameters(vae)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)

    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_flux2_klein(path: str | Path, *, variant: str = "klein", seed: int = 0) -> Path:
    """Write a tiny ``Flux2KleinPipeline`` folder at ``path`` and return it.

    ``variant="klein"`` is the step-distilled model (``is_distilled=True``: guidance ignored, one transformer
    call per step); ``"base"`` is the undistilled one (``is_distilled=False``: CFG with guidance_scale > 1). As
    for the real FLUX.2-klein-4B / -base-4B, the two share every config, the text encoder, tokenizer and VAE;
    only the transformer weights differ (seeded per variant) and ``is_distilled`` in model_index.json.

    Transformer: 1 double + 2 single stream blocks, 2 heads of 16 (RoPE axes 4 x 4 = 16), no guidance embedding
    (klein has none). Text encoder: ``Qwen3ForCausalLM`` with 28 layers of width 16 (2 query heads, 1 KV head
    so GQA is exercised, tied embeddings as Qwen3-4B). VAE: ``AutoencoderKLFlux2`` whose batch-norm running
    statistics are set to seeded non-trivial values so the pipeline's de-normalisation is exercised.
    Scheduler: FLUX.2's ``FlowMatchEulerDiscreteScheduler`` (dynamic exponential shifting, mu from the pipeline).
    """
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if variant not in FLUX2_VARIANTS:
        raise ValueError(f"variant must be one of {FLUX2_VARIANTS}, got {variant!r}")
    path = Path(path)
    tokenizer = qwen_tokenizer()

    with _seeded(seed, "flux2/text_encoder"):
        qwen_config = Qwen3Config(
            vocab_size=-(-len(tokenizer) // 16) * 16,  # padded past the tokenizer, as the real Qwen3 vocab is
            hidden_size=FLUX2_QWEN_WIDTH,
            intermediate_size=2 * FLUX2_QWEN_WIDTH,
            num_hidden_layers=FLUX2_QWEN_LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=1024,  # the pipeline pads prompts to 512 tokens
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        text_encoder = _perturb_constant_parameters(Qwen3ForCausalLM(qwen_config)).eval()
    with _seeded(seed, f"flux2/transformer/{variant}"):
        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=4 * FLUX2_LATENT_CHANNELS,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=3 * FLUX2_QWEN_WIDTH,
            timestep_guidance_channels=256,
            mlp_ratio=3.0,
            axes_dims_rope=(4, 4, 4, 4),
            rope_theta=2000,
            guidance_embeds=False,
        )
        _perturb_constant_parameters(transformer)
    with _seeded(seed, "flux2/vae"):
        vae = AutoencoderKLFlux2(
            **_vae_kwargs(FLUX2_LATENT_CHANNELS),
            patch_size=(2, 2),
        )
        _perturb_constant_parameters(vae)
        n = vae.bn.num_features
        with torch.no_grad():
            vae.bn.running_mean.copy_(0.5 * torch.randn(n))
            vae.bn.running_var.copy_(torch.empty(n).uniform_(0.25, 4.0))
        vae.eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )

    pipe = Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=variant == "klein",
    )
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_flux1(path: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny ``FluxPipeline`` folder (FLUX.1-dev layout) at ``path`` and return it.

    Transformer: 1 double + 1 single stream block, 2 heads of 16 (RoPE axes 4 + 6 + 6), the guidance embedding of
    FLUX.1-dev (its distilled CFG is a scalar input), ``in_channels = 4 x 4`` for the 2x2-packed 4-channel
    latents. Text: CLIP-L's pooled output (width 16) and T5 (width 64, the ``joint_attention_dim``). VAE: 8x down,
    4 latent channels, FLUX.1's scaling/shift factors. Scheduler: FLUX.1's dynamic shift (``mu`` linear in the
    image tokens, from the pipeline).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    path = Path(path)
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    with _seeded(seed, "flux1/text_encoder"):
        text_encoder = _perturb_constant_parameters(CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=FLUX1_CLIP_WIDTH, intermediate_size=2 * FLUX1_CLIP_WIDTH,
            projection_dim=FLUX1_CLIP_WIDTH, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
            hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id))).eval()
    with _seeded(seed, "flux1/text_encoder_2"):
        text_encoder_2 = _perturb_constant_parameters(T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=FLUX1_T5_WIDTH, d_kv=16, d_ff=2 * FLUX1_T5_WIDTH, num_layers=2,
            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=tokenizer_2.pad_token_id))).eval()
    with _seeded(seed, "flux1/transformer"):
        transformer = _perturb_constant_parameters(FluxTransformer2DModel(
            patch_size=1, in_channels=4 * FLUX1_LATENT_CHANNELS, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=FLUX1_T5_WIDTH,
            pooled_projection_dim=FLUX1_CLIP_WIDTH, guidance_embeds=True, axes_dims_rope=(4, 6, 6)))
    with _seeded(seed, "flux1/vae"):
        vae = _perturb_constant_parameters(AutoencoderKL(
            **_vae_kwargs(FLUX1_LATENT_CHANNELS), scaling_factor=FLUX1_SCALING_FACTOR,
            shift_factor=FLUX1_SHIFT_FACTOR, use_quant_conv=False, use_post_quant_conv=False)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
