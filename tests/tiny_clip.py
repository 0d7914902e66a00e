"""Tiny CLIP models for the image-reward tests, built offline and deterministically.

* :func:`save_tiny_clip` writes a transformers CLIP folder (model, the tiny CLIP tokenizer of
  ``tiny_tokenizers.clip_tokenizer``, a CLIP image processor at 32 px) with ``save_pretrained``, so the rewards
  load it with the stock ``from_pretrained``.
* :func:`tiny_open_clip_state_dict` is a tiny checkpoint in open_clip's key layout (what HPS v2.1 ships), made
  from :func:`tiny_hps_model` by :func:`to_open_clip_state_dict`, the inverse of ``rtdmd.rewards.hps``.
* :func:`tiny_aesthetic_state_dict` has the LAION aesthetic predictor's key layout at small widths.

Weights are drawn from seeded generators and every parameter (layer norms included) is perturbed, so a swapped
or dropped weight changes the outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_tokenizers import clip_tokenizer

IMAGE_SIZE = 32
CONTEXT = 77


def vocab_size() -> int:
    return len(clip_tokenizer())


def tiny_clip_config(*, width: int = 32, heads: int = 2, layers: int = 2, image_size: int = IMAGE_SIZE,
                     patch: int = 8, projection_dim: int = 16, hidden_act: str = "quick_gelu"):
    """A small ``CLIPConfig`` whose text side fits the tiny tokenizer (its bos/eos/pad ids)."""
    from transformers import CLIPConfig

    tok = clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=CONTEXT, projection_dim=projection_dim,
                hidden_act=hidden_act, layer_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
                  image_size=image_size, patch_size=patch, projection_dim=projection_dim, hidden_act=hidden_act,
                  layer_norm_eps=1e-5)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Add seeded noise to every parameter (so identical-looking layer norms become distinguishable)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def tiny_clip_model(seed: int = 0, **config_kwargs):
    """A random, frozen float32 ``CLIPModel`` from :func:`tiny_clip_config`, the same for the same seed."""
    from transformers import CLIPModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(tiny_clip_config(**config_kwargs))
    perturb_(model, seed + 1)
    return model.float().eval().requires_grad_(False)


def tiny_hps_model(seed: int = 0):
    """The HPS stand-in: gelu, 64-wide heads (what the open_clip converter infers for small widths)."""
    return tiny_clip_model(seed, width=128, heads=2, layers=2, hidden_act="gelu")


def _image_processor_class():
    try:
        from transformers import CLIPImageProcessorPil as cls  # transformers 5
    except ImportError:
        from transformers import CLIPImageProcessor as cls  # transformers 4 (the slow one is PIL)
    return cls


def tiny_image_processor(size: int = IMAGE_SIZE, crop: int = IMAGE_SIZE):
    """A CLIP image processor at ``size`` (shorter side, bicubic) with a ``crop`` centre crop."""
    return _image_processor_class()(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop})


def save_tiny_clip(folder: str | Path, *, seed: int = 0, model: bool = True, tokenizer: bool = True,
                   processor: bool = True, **config_kwargs) -> Path:
    """Write a tiny CLIP folder (any of model / tokenizer / preprocessor config) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if model:
        tiny_clip_model(seed, **config_kwargs).save_pretrained(folder)
    if tokenizer:
        clip_tokenizer().save_pretrained(folder)
    if processor:
        tiny_image_processor().save_pretrained(folder)
    return folder


def to_open_clip_state_dict(model, prefix: str = "") -> dict[str, torch.Tensor]:
    """A transformers ``CLIPModel``'s weights in open_clip's ``CLIP`` key layout (``prefix`` e.g. ``"module."``)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    def blocks(src: str, dst: str, n: int) -> None:
        for i in range(n):
            s, d = f"{src}{i}.", f"{dst}{i}."
            out[d + "attn.in_proj_weight"] = torch.cat([sd[f"{s}self_attn.{q}_proj.weight"] for q in "qkv"])
            out[d + "attn.in_proj_bias"] = torch.cat([sd[f"{s}self_attn.{q}_proj.bias"] for q in "qkv"])
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{d}{a}.weight"] = sd[f"{s}{b}.weight"]
                out[f"{d}{a}.bias"] = sd[f"{s}{b}.bias"]

    v, t = model.config.vision_config, model.config.text_config
    out["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
    out["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
    for a, b in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        out[f"visual.{a}.weight"] = sd[f"vision_model.{b}.weight"]
        out[f"visual.{a}.bias"] = sd[f"vision_model.{b}.bias"]
    out["visual.proj"] = sd["visual_projection.weight"].t().contiguous()
    blocks("vision_model.encoder.layers.", "visual.transformer.resblocks.", v.num_hidden_layers)
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"] = sd["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = sd["text_model.final_layer_norm.bias"]
    out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    blocks("text_model.encoder.layers.", "transformer.resblocks.", t.num_hidden_layers)
    out["logit_scale"] = sd["logit_scale"]
    return {prefix + k: val for k, val in out.items()}


def tiny_open_clip_state_dict(seed: int = 0, prefix: str = "") -> dict[str, torch.Tensor]:
    """A tiny open_clip-layout checkpoint (the weights of ``tiny_hps_model(seed)``)."""
    return to_open_clip_state_dict(tiny_hps_model(seed), prefix)


def tiny_aesthetic_state_dict(in_dim: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """The aesthetic predictor's layout (``layers.0/2/4/6/7``) at widths ``in_dim → 32 → 16 → 8 → 4 → 1``."""
    g = torch.Generator().manual_seed(seed)
    dims = [in_dim, 32, 16, 8, 4, 1]
    sd = {}
    for i, a, b in zip((0, 2, 4, 6, 7), dims[:-1], dims[1:], strict=True):
        sd[f"layers.{i}.weight"] = torch.randn(b, a, generator=g) / a ** 0.5
        sd[f"layers.{i}.bias"] = torch.randn(b, generator=g) * 0.1
    return sd
