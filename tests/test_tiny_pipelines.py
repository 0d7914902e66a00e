"""The tiny test pipelines: stock ``from_pretrained`` + stock ``__call__`` work, builds are deterministic.

Run with ``OMP_NUM_THREADS=1``; the whole file takes a few seconds (mostly imports).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_pipelines import (
    FLUX2_LATENT_CHANNELS,
    FLUX2_QWEN_LAYERS,
    FLUX2_QWEN_WIDTH,
    SD3_CLIP_G_WIDTH,
    SD3_CLIP_L_WIDTH,
    SD3_T5_WIDTH,
    build_tiny_flux2_klein,
    build_tiny_sd3,
)
from tiny_tokenizers import qwen_tokenizer, t5_tokenizer

PROMPT = "a photo of the cat, on blue"
TESTS_DIR = Path(__file__).resolve().parent


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _sha(files: dict[str, bytes], suffix: str = ".safetensors") -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in files.items() if k.endswith(suffix)}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_pipelines")
    return {
        "sd3": build_tiny_sd3(root / "sd3"),
        "klein": build_tiny_flux2_klein(root / "klein"),
        "base": build_tiny_flux2_klein(root / "base", variant="base"),
    }


def _load(cls, path: Path):
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# SD3 ----------------------------------------------------------------------------------------------------------
def test_sd3_stock_pipeline_runs(tiny_dirs):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    pipe = _load(StableDiffusion3Pipeline, tiny_dirs["sd3"])
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_3, T5EncoderModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)
    assert pipe.vae_scale_factor == 8

    kw = dict(num_inference_steps=2, height=64, width=64, generator=_gen())
    img = pipe(PROMPT, output_type="pt", **kw).images
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()
    assert 0 <= img.min() and img.max() <= 1 and img.std() > 0.01
    again = pipe(PROMPT, output_type="pt", **{**kw, "generator": _gen()}).images
    torch.testing.assert_close(img, again, rtol=0, atol=0)

    lat = pipe(PROMPT, output_type="latent", **{**kw, "generator": _gen()}).images
    assert lat.shape == (1, 16, 8, 8) and torch.isfinite(lat).all()
    other = pipe("a red dog", output_type="latent", **{**kw, "generator": _gen()}).images
    assert (lat - other).abs().max() > 1e-3, "the prompt must change the output"


def test_sd3_text_embedding_shapes(tiny_dirs):
    from diffusers import StableDiffusion3Pipeline

    pipe = _load(StableDiffusion3Pipeline, tiny_dirs["sd3"])
    cfg = pipe.transformer.config
    assert cfg.joint_attention_dim == SD3_T5_WIDTH
    assert cfg.pooled_projection_dim == SD3_CLIP_L_WIDTH + SD3_CLIP_G_WIDTH
    assert pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim == 48
    with torch.no_grad():
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(
            PROMPT, None, None, do_classifier_free_guidance=True, max_sequence_length=128
        )
    # docs/method.md §1: 77 CLIP tokens (L and G concatenated on features, zero-padded to the T5 width) + 128 T5 tokens.
    assert emb.shape == neg.shape == (1, 77 + 128, SD3_T5_WIDTH)
    assert pooled.shape == neg_pooled.shape == (1, SD3_CLIP_L_WIDTH + SD3_CLIP_G_WIDTH)
    clip_width = SD3_CLIP_L_WIDTH + SD3_CLIP_G_WIDTH
    assert torch.count_nonzero(emb[:, :77, clip_width:]) == 0
    assert emb[:, :77, :clip_width].abs().amin(-1).gt(0).any() and torch.isfinite(emb).all()
    assert not torch.equal(emb, neg)


# FLUX.2 -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["klein", "base"])
def test_flux2_stock_pipeline_runs(tiny_dirs, variant):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from diffusers import Flux2Transformer2DModel as Flux2Transformer
    from transformers import Qwen3ForCausalLM

    pipe = _load(Flux2KleinPipeline, tiny_dirs[variant])
    assert isinstance(pipe.transformer, Flux2Transformer) and isinstance(pipe.vae, AutoencoderKLFlux2)
    assert isinstance(pipe.text_encoder, Qwen3ForCausalLM)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.time_shift_type == "exponential"
    assert pipe.config.is_distilled is (variant == "klein")
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels == 4 * FLUX2_LATENT_CHANNELS
    assert not pipe.transformer.config.guidance_embeds
    # the batch-norm latent statistics are non-trivial, so de-normalisation is exercised
    assert pipe.vae.bn.running_mean.abs().min() > 0 and (pipe.vae.bn.running_var - 1).abs().max() > 0.5

    # klein: distilled, a single transformer call per step; base: classifier-free guidance (two calls per step)
    calls = []
    pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    kw = dict(num_inference_steps=2, height=64, width=64, guidance_scale=1.0 if variant == "klein" else 4.0)
    img = pipe(prompt=PROMPT, output_type="np", generator=_gen(), **kw).images
    assert len(calls) == (2 if variant == "klein" else 4)
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    assert 0 <= img.min() and img.max() <= 1 and img.std() > 0.01
    img_pt = pipe(prompt=PROMPT, output_type="pt", generator=_gen(), **kw).images
    assert img_pt.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(img_pt.permute(0, 2, 3, 1).numpy(), img, atol=1e-6)

    # "latent" output is already de-normalised and un-patchified: [B, C_vae, H/8, W/8]
    lat = pipe(prompt=PROMPT, output_type="latent", generator=_gen(), **kw).images
    assert lat.shape == (1, FLUX2_LATENT_CHANNELS, 8, 8) and torch.isfinite(lat).all()


def test_flux2_text_embedding_shapes(tiny_dirs):
    from diffusers import Flux2KleinPipeline

    pipe = _load(Flux2KleinPipeline, tiny_dirs["klein"])
    assert pipe.text_encoder.config.num_hidden_layers == FLUX2_QWEN_LAYERS >= 28
    assert pipe.transformer.config.joint_attention_dim == 3 * FLUX2_QWEN_WIDTH
    with torch.no_grad():
        emb, text_ids = pipe.encode_prompt(PROMPT)
    assert emb.shape == (1, 512, 3 * FLUX2_QWEN_WIDTH) and torch.isfinite(emb).all()
    assert text_ids.shape == (1, 512, 4)
    assert torch.equal(text_ids[0, :, 3], torch.arange(512)) and torch.count_nonzero(text_ids[0, :, :3]) == 0


def test_flux2_klein_and_base_differ_in_weights_only(tiny_dirs):
    klein, base = _files(tiny_dirs["klein"]), _files(tiny_dirs["base"])
    assert klein.keys() == base.keys()
    for name in klein:
        if name == "model_index.json":
            k, b = json.loads(klein[name]), json.loads(base[name])
            assert (k.pop("is_distilled"), b.pop("is_distilled")) == (True, False)
            assert k == b
        elif name.startswith("transformer/") and name.endswith(".safetensors"):
            k, b = load_file(tiny_dirs["klein"] / name), load_file(tiny_dirs["base"] / name)
            assert k.keys() == b.keys()
            assert all(k[n].shape == b[n].shape and k[n].dtype == b[n].dtype for n in k)
            assert all(not torch.equal(k[n], b[n]) for n in k), "every transformer tensor is re-seeded"
        else:  # configs, tokenizer, text encoder and VAE weights are shared, as for the real klein/base
            assert klein[name] == base[name], name


# determinism --------------------------------------------------------------------------------------------------
def test_builds_are_byte_identical(tiny_dirs, tmp_path):
    again = {
        "sd3": build_tiny_sd3(tmp_path / "sd3"),
        "klein": build_tiny_flux2_klein(tmp_path / "klein"),
        "base": build_tiny_flux2_klein(tmp_path / "base", variant="base"),
    }
    for key, path in again.items():
        first, second = _files(tiny_dirs[key]), _files(path)
        assert _sha(first) and _sha(first) == _sha(second), key
        assert first == second, key  # configs and tokenizer files too
    assert _sha(_files(build_tiny_sd3(tmp_path / "sd3_seed1", seed=1))) != _sha(_files(tiny_dirs["sd3"]))


def test_builds_are_identical_across_processes(tiny_dirs, tmp_path):
    """Weights and tokenizers must not depend on the process (hash seeds, trainers): rebuild in a fresh one."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from tiny_pipelines import build_tiny_sd3, build_tiny_flux2_klein;"
        "build_tiny_sd3(sys.argv[2] + '/sd3'); build_tiny_flux2_klein(sys.argv[2] + '/klein')"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "123"}
    subprocess.run(
        [sys.executable, "-c", code, str(TESTS_DIR), str(tmp_path)], check=True, capture_output=True, env=env
    )
    for key in ("sd3", "klein"):
        assert _files(tmp_path / key) == _files(tiny_dirs[key]), key


def test_builders_leave_global_rng_alone(tmp_path):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_tiny_flux2_klein(tmp_path / "klein")
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_bad_variant_raises(tmp_path):
    with pytest.raises(ValueError, match="variant"):
        build_tiny_flux2_klein(tmp_path / "x", variant="dev")


# tokenizers ---------------------------------------------------------------------------------------------------
def test_t5_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = t5_tokenizer()
    assert t5_tokenizer().backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    ids = tok([PROMPT], padding="max_length", max_length=24, truncation=True).input_ids[0]
    assert tok.convert_ids_to_tokens(ids[:3]) == ["▁a", "▁photo", "▁of"]
    assert ids[len(tok.tokenize(PROMPT))] == tok.eos_token_id == 1 and ids[-1] == tok.pad_token_id == 0
    assert tok("ü").input_ids == [3, tok.unk_token_id, tok.eos_token_id]  # "▁", unknown character, "</s>"
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is type(tok) and len(loaded) == len(tok)
    assert loaded([PROMPT], padding="max_length", max_length=24, truncation=True).input_ids[0] == ids


def test_qwen_tokenizer_round_trip_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    tok = qwen_tokenizer()
    assert qwen_tokenizer().backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    messages = [{"role": "user", "content": PROMPT}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert text == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    thinking = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert thinking.endswith("<|im_start|>assistant\n")
    ids = tok(text, padding="max_length", max_length=64, truncation=True).input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[0] == "<|im_start|>" and "Ġthe" in tokens and "<think>" in tokens and "</think>" in tokens
    assert ids[-1] == tok.pad_token_id and tok.eos_token == "<|im_end|>" and tok.padding_side == "right"
    assert tok.decode(ids, skip_special_tokens=True).startswith("user\n" + PROMPT)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is type(tok) and len(loaded) == len(tok)
    assert (
        loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False) == text
    )
    assert loaded(text, padding="max_length", max_length=64, truncation=True).input_ids == ids
