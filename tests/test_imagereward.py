"""ImageReward-v1.0 as a native reward (rtdmd/rewards/imagereward.py): the checkpoint converter, both scoring paths,
gradients, errors, and the original ``image-reward`` package where it is installed.

The tiny checkpoint (tests/tiny_imagereward.py) has ``ImageReward.pt``'s key layout. Scores are checked against
:func:`reference_scores`, a plain-torch forward written from the package's source (BLIP ViT, BLIP's BERT with
cross-attention, the MLP head, the fixed normalisation) that reads the checkpoint tensors directly.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_image_rewards import assert_gradient_reaches_images_not_weights
from tiny_imagereward import (
    HEAD_DIMS,
    HEADS,
    IMAGE_SIZE,
    PATCH,
    TEXT_LAYERS,
    TEXT_WIDTH,
    VISION_LAYERS,
    VISION_WIDTH,
    model_vocab_size,
    save_tiny_bert_tokenizer,
    tiny_imagereward_state_dict,
    tiny_med_config,
)

from rtdmd.rewards.base import Reward, quantize_uint8
from rtdmd.rewards.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from rtdmd.rewards.imagereward import (
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    ImageRewardConfig,
    ImageRewardScore,
    build_imagereward,
    convert_imagereward_state_dict,
    infer_imagereward_config,
    load_blip_tokenizer,
    load_imagereward_checkpoint,
    pil_resize_center_crop,
)

PROMPTS = ["a photo of the cat", "An orange tree at night!"]
SEED = 5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny checkpoint as ``.pt`` (as released: a bare state dict), as ``.safetensors`` and wrapped in
    ``{"state_dict": ...}``; the tokenizer folder."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("imagereward")
    sd = tiny_imagereward_state_dict(SEED)
    out = {"pt": root / "ImageReward.pt", "st": root / "ImageReward.safetensors", "wrapped": root / "wrapped.pt",
           "tok": save_tiny_bert_tokenizer(root / "tok")}
    torch.save(sd, out["pt"])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out["st"]))
    torch.save({"state_dict": sd}, out["wrapped"])
    return out


@pytest.fixture(scope="module")
def reward(files):
    return build_imagereward("imagereward", {"path": str(files["pt"]), "tokenizer_path": str(files["tok"])})


def _images(n=2, h=40, w=48, seed=0, grad=False):
    x = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(grad)


def _norm(x):
    return (x - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------------------------------
# The reference: ImageReward's forward in plain torch, on the checkpoint's own tensors
# ------------------------------------------------------------------------------------------------------------------

def _attention(q_in, kv_in, wq, bq, wk, bk, wv, bv, heads, additive_mask=None):
    n, tq, d = q_in.shape
    hd = d // heads

    def split(x):
        return x.view(n, x.shape[1], heads, hd).transpose(1, 2)

    q, k, v = split(F.linear(q_in, wq, bq)), split(F.linear(kv_in, wk, bk)), split(F.linear(kv_in, wv, bv))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if additive_mask is not None:
        scores = scores + additive_mask
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, tq, d)


def _vit(sd, px):
    """BLIP's VisionTransformer: patches + class token + positions, pre-norm blocks, final LayerNorm (eps 1e-6)."""
    p = "blip.visual_encoder."

    def ln(x, key):
        return F.layer_norm(x, (x.shape[-1],), sd[key + ".weight"], sd[key + ".bias"], 1e-6)

    x = F.conv2d(px, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd[p + "pos_embed"]
    for i in range(VISION_LAYERS):
        b = f"{p}blocks.{i}."
        h = ln(x, b + "norm1")
        wq, wk, wv = sd[b + "attn.qkv.weight"].chunk(3)
        bq, bk, bv = sd[b + "attn.qkv.bias"].chunk(3)
        a = _attention(h, h, wq, bq, wk, bk, wv, bv, HEADS)
        x = x + F.linear(a, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(x, b + "norm2"), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    return ln(x, p + "norm")


def _bert_cls(sd, ids, mask, image_tokens):
    """BLIP's BERT encoder (post-norm, eps 1e-12) with cross-attention to every image token; the [CLS] state."""
    p = "blip.text_encoder."

    def ln(x, key):
        return F.layer_norm(x, (x.shape[-1],), sd[key + ".weight"], sd[key + ".bias"], 1e-12)

    def lin(x, key):
        return F.linear(x, sd[key + ".weight"], sd[key + ".bias"])

    def block(x, kv, key, additive_mask):
        s = key + ".self."
        a = _attention(x, kv, sd[s + "query.weight"], sd[s + "query.bias"], sd[s + "key.weight"],
                       sd[s + "key.bias"], sd[s + "value.weight"], sd[s + "value.bias"], HEADS, additive_mask)
        return ln(lin(a, key + ".output.dense") + x, key + ".output.LayerNorm")

    x = sd[p + "embeddings.word_embeddings.weight"][ids] + sd[p + "embeddings.position_embeddings.weight"][
        : ids.shape[1]]
    x = ln(x, p + "embeddings.LayerNorm")
    pad = (1.0 - mask.float())[:, None, None, :] * -10000.0  # BLIP's padding mask
    for i in range(TEXT_LAYERS):
        b = f"{p}encoder.layer.{i}."
        x = block(x, x, b + "attention", pad)
        x = block(x, image_tokens, b + "crossattention", None)
        h = F.gelu(lin(x, b + "intermediate.dense"))
        x = ln(lin(h, b + "output.dense") + x, b + "output.LayerNorm")
    return x[:, 0]


def reference_scores(sd, pixel_values, ids, mask):
    with torch.no_grad():
        h = _bert_cls(sd, ids, mask, _vit(sd, pixel_values))
        for i in (0, 2, 4, 6, 7):  # dropout is the identity in eval; no activations
            h = F.linear(h, sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"])
        return (h.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def _tokens(files, prompts):
    tok = load_blip_tokenizer(files["tok"])(list(prompts), padding="max_length", truncation=True, max_length=35,
                                            return_tensors="pt")
    return tok["input_ids"], tok["attention_mask"]


# ------------------------------------------------------------------------------------------------------------------
# Converter
# ------------------------------------------------------------------------------------------------------------------

def test_converter_consumes_and_maps_every_key():
    sd = tiny_imagereward_state_dict(SEED)
    config, out = convert_imagereward_state_dict(sd)
    v, t = config.vision, config.text
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.image_size, v.patch_size) == (
        VISION_WIDTH, VISION_LAYERS, HEADS, IMAGE_SIZE, PATCH)
    assert (v.intermediate_size, v.layer_norm_eps, v.hidden_act) == (4 * VISION_WIDTH, 1e-6, "gelu")
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.encoder_hidden_size, t.vocab_size) == (
        TEXT_WIDTH, TEXT_LAYERS, HEADS, VISION_WIDTH, model_vocab_size())
    assert (t.layer_norm_eps, t.hidden_act, t.is_decoder) == (1e-12, "gelu", True)
    assert config.head_dims == HEAD_DIMS

    # every model tensor comes from exactly one checkpoint tensor, unchanged
    set_aside = {"blip.text_encoder.embeddings.position_ids", "blip.vision_proj.weight", "blip.vision_proj.bias",
                 "blip.text_proj.weight", "blip.text_proj.bias"}
    v_top = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
             "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
             "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
             "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    v_block = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
               "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}

    def target(key):
        if key.startswith("blip.text_encoder."):  # BLIP's BERT and transformers' BLIP text model share the names
            return "text." + key[len("blip.text_encoder."):]
        if key.startswith("mlp."):
            return "head." + key[len("mlp."):]
        rest = key[len("blip.visual_encoder."):]
        if rest.startswith("blocks."):
            _, i, tail = rest.split(".", 2)
            name, param = tail.rsplit(".", 1)
            return f"vision.encoder.layers.{i}.{v_block[name]}.{param}"
        return "vision." + v_top[rest]

    mapped = {target(k): k for k in sd if k not in set_aside}
    assert set(mapped) == set(out) and len(mapped) == len(sd) - len(set_aside)
    assert all(torch.equal(out[hf], sd[src]) for hf, src in mapped.items())


@pytest.mark.parametrize("which", ["pt", "st", "wrapped"])
def test_load_checkpoint(files, which):
    model = load_imagereward_checkpoint(files[which])
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters()) and model.image_size == IMAGE_SIZE
    assert torch.equal(model.text.embeddings.position_ids, torch.arange(40).expand(1, -1))
    ids, mask = _tokens(files, PROMPTS)
    px = _norm(_images(h=IMAGE_SIZE, w=IMAGE_SIZE, seed=1))
    with torch.no_grad():
        got = model(px, ids, mask)
    assert got.shape == (2,)
    torch.testing.assert_close(got, reference_scores(tiny_imagereward_state_dict(SEED), px, ids, mask),
                               atol=1e-5, rtol=1e-5)


def test_explicit_config_and_head_count():
    sd = tiny_imagereward_state_dict(SEED)
    config = infer_imagereward_config(sd)
    # an explicit config is used as given: 4 heads of 32 instead of the inferred 2 of 64
    config.vision.num_attention_heads = 4
    got, _ = convert_imagereward_state_dict(sd, config)
    assert got is config and got.vision.num_attention_heads == 4
    wide = ImageRewardConfig(vision=infer_imagereward_config(sd).vision, text=config.text, head_dims=(128, 8, 1))
    with pytest.raises(ValueError, match="head: expected 6 widths"):
        convert_imagereward_state_dict(sd, wide)


# ------------------------------------------------------------------------------------------------------------------
# The reward: both paths against the reference
# ------------------------------------------------------------------------------------------------------------------

def test_float_path_matches_reference(files, reward):
    # a full config entry: the mixture's keys, unset (None) keys and the default differentiable=false are accepted
    spec = {"path": str(files["st"]), "tokenizer_path": str(files["tok"]), "kind": "imagereward", "weight": 1.0,
            "backprop": True, "processor_path": None, "clip_path": None, "function": None, "differentiable": False}
    r = build_imagereward("ir", spec)
    assert isinstance(r, ImageRewardScore) and isinstance(r, Reward) and r.differentiable and r.name == "ir"
    x = _images(h=40, w=48, seed=2)
    # Resize(32) on the short side -> 32x38 (int(32*48/40)), bicubic antialiased; CenterCrop(32): left round(3) = 3
    px = F.interpolate(x, size=(32, 38), mode="bicubic", align_corners=False, antialias=True)[..., :, 3:35]
    ids, mask = _tokens(files, PROMPTS)
    expected = reference_scores(tiny_imagereward_state_dict(SEED), _norm(px), ids, mask)
    got = r(x, PROMPTS)
    assert got.dtype == torch.float32 and got.shape == (2,)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reward(x, PROMPTS), got, atol=1e-6, rtol=1e-6)  # .pt and .safetensors agree


def test_rollout_path_matches_reference(files, reward):
    from PIL import Image

    x = _images(h=45, w=34, seed=3)
    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8)
    # PIL: 34x45 -> 32x42 (int(32*45/34)) bicubic, crop top round(5.0) = 5
    crops = []
    for arr in u8.permute(0, 2, 3, 1).numpy():
        img = Image.fromarray(arr).resize((32, 42), Image.BICUBIC).crop((0, 5, 32, 37))
        crops.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255)
    px = torch.stack(crops)
    torch.testing.assert_close(pil_resize_center_crop(quantize_uint8(x), 32), px, atol=0, rtol=0)
    ids, mask = _tokens(files, PROMPTS)
    expected = reference_scores(tiny_imagereward_state_dict(SEED), _norm(px), ids, mask)
    got = reward.advantage_score(x, PROMPTS)
    assert not got.requires_grad
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_batch_equals_one_by_one(reward):
    """Prompts are padded to 35 tokens, so a batch scores like each sample alone (ImageReward scores one by one)."""
    x = _images(n=3, seed=4)
    prompts = ["cat", "a red dog on the tree at night " * 5, PROMPTS[1]]
    alone = torch.cat([reward(x[i:i + 1], prompts[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(reward(x, prompts), alone, atol=1e-5, rtol=1e-5)


def test_score_depends_on_image_and_prompt(reward):
    x = _images(n=2, seed=5)
    same_prompt = reward(x, [PROMPTS[0]] * 2)
    same_image = reward(x[:1].expand(2, -1, -1, -1), PROMPTS)
    assert (same_prompt[0] - same_prompt[1]).abs() > 1e-3 and (same_image[0] - same_image[1]).abs() > 1e-3


def test_gradient_reaches_images_not_weights(reward):
    assert_gradient_reaches_images_not_weights(reward, _images(h=36, w=52, seed=6, grad=True), PROMPTS)


def test_float_and_uint8_paths(reward):
    # at the model's size nothing is resized: the two paths agree on uint8-level images
    x = quantize_uint8(_images(h=IMAGE_SIZE, w=IMAGE_SIZE, seed=7))
    torch.testing.assert_close(reward.advantage_score(x, PROMPTS), reward(x, PROMPTS), atol=2e-5, rtol=1e-5)
    # resized: PIL bicubic (on uint8) and the tensor bicubic differ a little
    x = quantize_uint8(_images(h=64, w=80, seed=8))
    a, b = reward.advantage_score(x, PROMPTS), reward(x, PROMPTS)
    assert not torch.allclose(a, b, atol=1e-6) and torch.allclose(a, b, atol=0.05)
    # the rollout path quantises float images first
    y = _images(seed=9)
    torch.testing.assert_close(reward.advantage_score(y, PROMPTS), reward.advantage_score(quantize_uint8(y), PROMPTS),
                               atol=0, rtol=0)


def test_tokenizer(files, reward):
    tok = load_blip_tokenizer(files["tok"])
    assert len(tok) == model_vocab_size()
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [model_vocab_size() - 2, model_vocab_size() - 1]
    assert tok.bos_token == "[DEC]"
    ids, mask = reward.tokens(["A PHOTO of the Cat", "cat " * 50])
    assert ids.shape == mask.shape == (2, 35)
    assert tok.convert_ids_to_tokens(ids[0, :7].tolist()) == ["[CLS]", "a", "photo", "of", "the", "cat", "[SEP]"]
    assert mask[0].sum() == 7 and (ids[0, 7:] == 0).all()
    assert mask[1].all() and ids[1, -1] == tok.sep_token_id  # truncated to 35 with [SEP] last


def test_input_checks_and_to(reward):
    with pytest.raises(ValueError, match="2 samples but 1 prompts"):
        reward.advantage_score(_images(), PROMPTS[:1])
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        reward(torch.rand(2, 4, 8, 8), PROMPTS)
    assert reward.to("cpu") is reward and reward.device == torch.device("cpu")


# ------------------------------------------------------------------------------------------------------------------
# Errors: one line, naming the key and the file
# ------------------------------------------------------------------------------------------------------------------

def test_converter_errors():
    sd = tiny_imagereward_state_dict(SEED)
    with pytest.raises(ValueError, match="does not use: blip.text_decoder.x"):
        convert_imagereward_state_dict({**sd, "blip.text_decoder.x": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing key 'blip.visual_encoder.norm.bias'"):
        convert_imagereward_state_dict({k: v for k, v in sd.items() if k != "blip.visual_encoder.norm.bias"})
    with pytest.raises(ValueError, match="missing key 'blip.text_encoder.encoder.layer.1.crossattention.self.key"):
        convert_imagereward_state_dict({k: v for k, v in sd.items() if "layer.1.crossattention.self.key" not in k})
    with pytest.raises(ValueError, match="missing key 'blip.text_proj.weight'"):
        convert_imagereward_state_dict({k: v for k, v in sd.items() if k != "blip.text_proj.weight"})
    with pytest.raises(ValueError, match="not the position range"):
        convert_imagereward_state_dict({**sd, "blip.text_encoder.embeddings.position_ids": torch.zeros(1, 40)})
    no_ids = {k: v for k, v in sd.items() if k != "blip.text_encoder.embeddings.position_ids"}
    assert len(convert_imagereward_state_dict(no_ids)[1]) == len(sd) - 5  # the buffer is optional
    with pytest.raises(ValueError, match="not numbered 0..n-1"):
        convert_imagereward_state_dict({k.replace("blocks.1.", "blocks.2."): v for k, v in sd.items()})
    bad_head = {**sd, "mlp.layers.4.weight": torch.zeros(64, 100)}
    with pytest.raises(ValueError, match="mlp.layers.4 takes 100 inputs but the layer before gives 128"):
        convert_imagereward_state_dict(bad_head)
    with pytest.raises(ValueError, match="pass an explicit ImageRewardConfig"):
        convert_imagereward_state_dict({**sd, "blip.text_encoder.embeddings.word_embeddings.weight": torch.zeros(
            model_vocab_size(), 96)})
    config = infer_imagereward_config(sd)
    config.text.intermediate_size = 256
    with pytest.raises(ValueError, match=r"intermediate.dense.weight has shape \(512, 128\), the config expects"):
        convert_imagereward_state_dict(sd, config)
    with pytest.raises(ValueError, match="non-empty mapping"):
        convert_imagereward_state_dict({})


def test_spec_errors(files, tmp_path):
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "bad.pt")  # not weights_only
    sd = tiny_imagereward_state_dict(SEED)
    torch.save({k: v for k, v in sd.items() if not k.startswith("mlp.layers.7")}, tmp_path / "nohead.pt")
    (tmp_path / "empty").mkdir()
    small_tok = tmp_path / "small_tok"
    save_tiny_bert_tokenizer(small_tok)
    with open(small_tok / "vocab.txt", "a") as f:
        f.write("extra\n")  # one token more than the model's vocabulary allows
    pt, tok = str(files["pt"]), str(files["tok"])
    cases = [
        ({"tokenizer_path": tok}, "rewards.ir.path: required for the imagereward reward"),
        ({"path": pt}, "rewards.ir.tokenizer_path: required"),
        ({"path": pt, "tokenizer_path": tok, "colour": 1}, "rewards.ir.colour: unknown key for the imagereward"),
        ({"path": pt, "tokenizer_path": tok, "differentiable": True}, "rewards.ir.differentiable: unknown key .*only "
                                                                       "plug-in"),
        ({"path": pt, "tokenizer_path": tok, "kind": "hpsv2"}, "rewards.ir.kind: "),
        ({"path": str(tmp_path / "no.pt"), "tokenizer_path": tok}, "rewards.ir.path: no such file: "),
        ({"path": str(tmp_path / "bad.pt"), "tokenizer_path": tok},
         r"rewards.ir.path: cannot load .* with torch.load\(weights_only=True\)"),
        ({"path": str(tmp_path / "nohead.pt"), "tokenizer_path": tok},
         "rewards.ir.path: .*nohead.pt: ImageReward state dict: missing key 'mlp.layers.7.weight'"),
        ({"path": pt, "tokenizer_path": str(tmp_path / "nope")}, "rewards.ir.tokenizer_path: no such folder"),
        ({"path": pt, "tokenizer_path": str(tmp_path / "empty")}, "rewards.ir.tokenizer_path: cannot load a BERT "
                                                                  "tokenizer .*no vocab.txt"),
        ({"path": pt, "tokenizer_path": str(small_tok)},
         f"rewards.ir.tokenizer_path: the tokenizer has {model_vocab_size() + 1} tokens"),
    ]
    for spec, match in cases:
        with pytest.raises(ValueError, match=match) as e:
            build_imagereward("ir", spec)
        assert "\n" not in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="rewards.ir: expected a mapping"):
        build_imagereward("ir", ["path"])


# ------------------------------------------------------------------------------------------------------------------
# The original implementation (only where the image-reward package is installed)
# ------------------------------------------------------------------------------------------------------------------

def _original_tiny_imagereward(tmp_path, tok_dir, monkeypatch):
    """The package's own ``ImageReward`` class built at the tiny sizes: its ``__init__`` runs with the ViT factory,
    the image size and the head width patched down, and the BLIP tokenizer read from the tiny folder."""
    ir_mod = importlib.import_module("ImageReward.ImageReward")
    blip_pretrain = importlib.import_module("ImageReward.models.BLIP.blip_pretrain")
    blip = importlib.import_module("ImageReward.models.BLIP.blip")
    vit = importlib.import_module("ImageReward.models.BLIP.vit")

    from_pretrained = blip.BertTokenizer.from_pretrained
    monkeypatch.setattr(blip.BertTokenizer, "from_pretrained", lambda name, *a, **k: from_pretrained(str(tok_dir)))
    monkeypatch.setattr(blip_pretrain, "create_vit", lambda name, image_size, *a: (vit.VisionTransformer(
        img_size=image_size, patch_size=PATCH, embed_dim=VISION_WIDTH, depth=VISION_LAYERS, num_heads=HEADS),
        VISION_WIDTH))
    blip_cls, transform, mlp = ir_mod.BLIP_Pretrain, ir_mod._transform, ir_mod.MLP
    monkeypatch.setattr(ir_mod, "BLIP_Pretrain", lambda **kw: blip_cls(**{**kw, "image_size": IMAGE_SIZE}))
    monkeypatch.setattr(ir_mod, "_transform", lambda n: transform(IMAGE_SIZE))
    monkeypatch.setattr(ir_mod, "MLP", lambda n: mlp(TEXT_WIDTH))
    (tmp_path / "med_config.json").write_text(json.dumps(tiny_med_config()))
    model = ir_mod.ImageReward(med_config=str(tmp_path / "med_config.json"), device="cpu")
    model.load_state_dict(tiny_imagereward_state_dict(SEED), strict=True)  # our tiny layout is the package's
    return model.eval(), ir_mod


def test_matches_original_imagereward(files, reward, tmp_path, monkeypatch):
    """The ``image-reward`` package's ``score`` (PIL), ``inference_rank`` and ``score_gard`` (on its ReFL tensor
    transform) against this module, on the same tiny weights."""
    try:
        importlib.import_module("ImageReward")
    except Exception as e:  # not installed, or one of its own dependencies (clip, timm, fairscale, ...) is not
        pytest.skip(f"the image-reward package is not importable here: {type(e).__name__}: {e}")
    from PIL import Image
    from torchvision.transforms import CenterCrop, Compose, Normalize, Resize

    original, ir_mod = _original_tiny_imagereward(tmp_path, files["tok"], monkeypatch)
    assert (original.mean, original.std) == (IMAGEREWARD_MEAN, IMAGEREWARD_STD)
    prompts = ["a photo of the cat", "An orange tree at night!", "the red dog on a blue tree " * 4]
    x = _images(n=3, h=41, w=55, seed=10)
    pil = [Image.fromarray(a) for a in (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()]
    tok = original.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert torch.equal(reward.tokens(prompts)[0], tok.input_ids)
    refl = Compose([Resize(IMAGE_SIZE, interpolation=ir_mod.BICUBIC), CenterCrop(IMAGE_SIZE),
                    Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])
    with torch.no_grad():
        score = torch.tensor([original.score(p, im) for p, im in zip(prompts, pil, strict=True)])
        _, ranked = original.inference_rank(prompts[0], pil)
        gard = original.score_gard(tok.input_ids, tok.attention_mask, refl(x)).reshape(-1)
    torch.testing.assert_close(reward.advantage_score(x, prompts), score, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reward.advantage_score(x, [prompts[0]] * 3), torch.tensor(ranked), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(reward(x, prompts), gard, atol=1e-5, rtol=1e-5)
