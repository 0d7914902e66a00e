"""CLIP-family image rewards (docs/method.md §7, §11, §13.15), the HPS open_clip converter and plug-in rewards.

Every scorer is built through ``build_image_reward`` from tiny local folders (tests/tiny_clip.py) and compared with
a direct transformers computation written out here.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from tiny_clip import (
    IMAGE_SIZE,
    save_tiny_clip,
    tiny_aesthetic_state_dict,
    tiny_clip_config,
    tiny_clip_model,
    tiny_hps_model,
    tiny_image_processor,
    to_open_clip_state_dict,
)
from tiny_tokenizers import clip_tokenizer

from rtdmd.data import Prompt, prompt_metadata
from rtdmd.rewards.base import Reward, quantize_uint8
from rtdmd.rewards.builder import build_image_reward
from rtdmd.rewards.hps import convert_open_clip_state_dict, load_open_clip_checkpoint
from rtdmd.rewards.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resize_max_pad
from rtdmd.rewards.plugin import PluginReward

PROMPTS = ["a photo of the cat", "an orange tree at night"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Tiny folders: CLIP (model+tokenizer+processor), PickScore model / processor, tokenizer, HPS and aesthetic
    weight files."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("rewards")
    out = {
        "clip": save_tiny_clip(root / "clip", seed=0),
        "pick_model": save_tiny_clip(root / "pick_model", seed=3, tokenizer=False, processor=False),
        "pick_proc": save_tiny_clip(root / "pick_proc", model=False),
        "tok": save_tiny_clip(root / "tok", model=False, processor=False),
        "hps_pt": root / "hps.pt",
        "hps_st": root / "hps.safetensors",
        "aes": root / "aes.pth",
    }
    hps = to_open_clip_state_dict(tiny_hps_model(seed=5), prefix="module.")
    torch.save({"state_dict": hps, "epoch": 3}, out["hps_pt"])
    save_file({k[len("module."):]: v.contiguous() for k, v in hps.items()}, str(out["hps_st"]))
    torch.save(tiny_aesthetic_state_dict(in_dim=16, seed=7), out["aes"])
    return out


def _images(n=2, h=40, w=48, seed=0, grad=False):
    x = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(grad)


def _tokens(prompts):
    return clip_tokenizer()(list(prompts), padding="max_length", max_length=77, truncation=True, return_tensors="pt")


def _norm(x):
    m = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (x - m) / s


def _feat(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _clip_model(folder):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(str(folder), local_files_only=True).float().eval()


# ------------------------------------------------------------------------------------------------------------------
# Scores against direct transformers computations
# ------------------------------------------------------------------------------------------------------------------

def test_clipscore_matches_transformers(dirs):
    # a full config entry: the mixture's keys, unset (None) keys and the default differentiable=false are accepted
    spec = {"path": str(dirs["clip"]), "weight": 1.0, "backprop": True, "kind": None, "processor_path": None,
            "tokenizer_path": None, "function": None, "differentiable": False}
    reward = build_image_reward("clipscore", spec)
    assert reward.differentiable and reward.name == "clipscore"
    x = _images(h=40, w=48)
    # torchvision Resize(32) on the short side -> 32x38 (int(32*48/40)), CenterCrop(32) -> left round(3) = 3
    px = F.interpolate(x, size=(32, 38), mode="bilinear", align_corners=False, antialias=True)[..., :, 3:35]
    model = _clip_model(dirs["clip"])
    tok = _tokens(PROMPTS)
    with torch.no_grad():
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=_norm(px))
    expected = out.logits_per_image.diag() / model.logit_scale.exp()
    got = reward(x, PROMPTS)
    assert got.dtype == torch.float32 and got.shape == (2,)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_pickscore_matches_transformers(dirs):
    spec = {"path": str(dirs["pick_model"]), "processor_path": str(dirs["pick_proc"])}
    reward = build_image_reward("pickscore", spec)
    model = _clip_model(dirs["pick_model"])
    tok = _tokens(PROMPTS)
    x = _images(h=44, w=36, seed=1)

    def pick(pixel_values):
        with torch.no_grad():
            img = _feat(model.get_image_features(pixel_values=pixel_values))
            txt = _feat(model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        return model.logit_scale.exp() * (img * txt).sum(-1) / 26

    # rollout path: uint8 images through the HF (PIL, bicubic) processor
    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8)
    pv = tiny_image_processor()(images=list(u8.permute(0, 2, 3, 1).numpy()), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(reward.advantage_score(x, PROMPTS), pick(pv), atol=1e-5, rtol=1e-5)
    # float path: bilinear torchvision transform; 36x44 -> 32x39 (int(32*44/36)), crop top round(3.5) = 4
    px = F.interpolate(x, size=(39, 32), mode="bilinear", align_corners=False, antialias=True)[..., 4:36, :]
    torch.testing.assert_close(reward(x, PROMPTS), pick(_norm(px)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weights", ["hps_pt", "hps_st"])
def test_hpsv2_matches_transformers(dirs, weights):
    reward = build_image_reward("hpsv2", {"path": str(dirs[weights]), "tokenizer_path": str(dirs["tok"])})
    model = tiny_hps_model(seed=5)  # the model the checkpoint was written from
    x = _images(h=24, w=40, seed=2)
    # ResizeMaxSize(32): 24x40 -> 19x32 (round(19.2)), bicubic; pad rows 6 above, 7 below
    px = F.interpolate(x, size=(19, 32), mode="bicubic", align_corners=False, antialias=True)
    px = F.pad(px, (0, 0, 6, 7))
    tok = _tokens(PROMPTS)
    with torch.no_grad():
        out = model(input_ids=tok["input_ids"], pixel_values=_norm(px))
    expected = out.logits_per_image.diag() / model.logit_scale.exp()
    torch.testing.assert_close(reward(x, PROMPTS), expected, atol=1e-5, rtol=1e-5)


def test_aesthetic_matches_transformers(dirs):
    reward = build_image_reward("aesthetic", {"path": str(dirs["aes"]), "clip_path": str(dirs["clip"])})
    assert not reward.differentiable
    model = _clip_model(dirs["clip"])
    sd = tiny_aesthetic_state_dict(in_dim=16, seed=7)

    def aesthetic(pixel_values):
        with torch.no_grad():
            e = _feat(model.get_image_features(pixel_values=pixel_values))
        e = e / e.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):  # dropout is the identity in eval; the predictor has no activations
            e = e @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
        return e.squeeze(-1)

    x = _images(h=48, w=40, seed=3)
    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8)
    pv = tiny_image_processor()(images=list(u8.permute(0, 2, 3, 1).numpy()), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(reward.advantage_score(x, PROMPTS), aesthetic(pv), atol=1e-5, rtol=1e-5)
    # float path: the processor's transform in torch (bicubic, HF floor crop): 40x48 -> 32x38, top (38-32)//2 = 3
    px = F.interpolate(x, size=(38, 32), mode="bicubic", align_corners=False, antialias=True)[..., 3:35, :]
    got = reward(x, PROMPTS)
    assert not got.requires_grad
    torch.testing.assert_close(got, aesthetic(_norm(px)), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Gradients, the rollout path, devices
# ------------------------------------------------------------------------------------------------------------------

def _all_rewards(dirs):
    return {
        "clipscore": build_image_reward("clipscore", {"path": str(dirs["clip"])}),
        "pickscore": build_image_reward("pick", {"kind": "pickscore", "path": str(dirs["pick_model"]),
                                                 "processor_path": str(dirs["pick_proc"])}),
        "hpsv2": build_image_reward("hpsv2", {"path": str(dirs["hps_pt"]), "tokenizer_path": str(dirs["tok"])}),
        "aesthetic": build_image_reward("aesthetic", {"path": str(dirs["aes"]), "clip_path": str(dirs["clip"])}),
    }


@pytest.fixture(scope="module")
def rewards(dirs):
    return _all_rewards(dirs)


def assert_gradient_reaches_images_not_weights(reward, x: torch.Tensor, prompts) -> None:
    """A differentiable reward's gradient reaches the images (bf16 ones too: scoring is float32), never the
    frozen weights; its advantage score carries none."""
    r = reward(x.to(torch.bfloat16), prompts)
    assert r.dtype == torch.float32 and r.requires_grad
    (g,) = torch.autograd.grad(r.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert all(not p.requires_grad for p in reward.model.parameters())
    assert not reward.advantage_score(x, prompts).requires_grad


@pytest.mark.parametrize("kind", ["clipscore", "pickscore", "hpsv2"])
def test_gradient_reaches_images_not_weights(rewards, kind):
    assert_gradient_reaches_images_not_weights(rewards[kind], _images(h=36, w=52, seed=4, grad=True), PROMPTS)


SQUARE = (IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("kind,size", [("clipscore", (37, 53)), ("hpsv2", (37, 53)), ("pickscore", SQUARE),
                                       ("aesthetic", SQUARE)])
def test_advantage_path_equals_float_path_on_uint8_images(rewards, kind, size):
    """On uint8-level images the rollout path equals the float path where the interpolation is the same (CLIPScore
    and HPS share one transform; PickScore/aesthetic images already at the processor size are not resized)."""
    reward = rewards[kind]
    x = quantize_uint8(_images(h=size[0], w=size[1], seed=5))
    torch.testing.assert_close(reward.advantage_score(x, PROMPTS), reward(x, PROMPTS), atol=2e-5, rtol=1e-5)


def test_advantage_path_quantizes(rewards):
    reward = rewards["clipscore"]
    x = _images(seed=6)
    q = quantize_uint8(x)
    assert torch.equal(q, (x * 255).round().clamp(0, 255) / 255)
    torch.testing.assert_close(reward.advantage_score(x, PROMPTS), reward(q, PROMPTS), atol=0, rtol=0)
    assert not torch.equal(reward.advantage_score(x, PROMPTS), reward(x, PROMPTS))


def test_pickscore_paths_differ_in_interpolation(rewards):
    """BP uses bilinear, the rollout bicubic (method.md §13.15): on resized images the two paths differ a little."""
    x = quantize_uint8(_images(h=64, w=80, seed=7))
    a, b = rewards["pickscore"].advantage_score(x, PROMPTS), rewards["pickscore"](x, PROMPTS)
    assert not torch.allclose(a, b, atol=1e-6) and torch.allclose(a, b, atol=0.05)


def test_input_checks_and_to(rewards):
    reward = rewards["clipscore"]
    with pytest.raises(ValueError, match="2 samples but 1 prompts"):
        reward.advantage_score(_images(), PROMPTS[:1])
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        reward(torch.rand(2, 4, 8, 8), PROMPTS)
    assert reward.to("cpu") is reward and reward.device == torch.device("cpu")
    prompts = [Prompt("a cat", {"tag": "x"}), Prompt("two dogs")]  # metadata-carrying prompts are plain strings
    assert reward(_images(), prompts).shape == (2,)


def test_resize_max_pad_geometry():
    x = torch.rand(1, 3, 30, 10)
    y = resize_max_pad(x, 32)  # 30x10 -> 32x11 (round(10.67)); pad columns 10 left, 11 right
    assert y.shape == (1, 3, 32, 32)
    assert (y[..., :10] == 0).all() and (y[..., 21:] == 0).all() and (y[..., 10:21] != 0).any()
    assert torch.equal(resize_max_pad(x[..., :10, :10], 10), x[..., :10, :10])  # already square at size


# ------------------------------------------------------------------------------------------------------------------
# HPS converter
# ------------------------------------------------------------------------------------------------------------------

def test_hps_converter_round_trip(tmp_path):
    from safetensors.torch import save_file

    model = tiny_hps_model(seed=11)
    sd = to_open_clip_state_dict(model)
    config, hf = convert_open_clip_state_dict(sd)
    ref = model.state_dict()
    assert set(hf) == set(ref) and all(torch.equal(hf[k], ref[k]) for k in ref)
    v, t, rv, rt = config.vision_config, config.text_config, model.config.vision_config, model.config.text_config
    for a in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
              "patch_size", "hidden_act", "layer_norm_eps"):
        assert getattr(v, a) == getattr(rv, a), a
    for a in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", "hidden_act", "layer_norm_eps"):
        assert getattr(t, a) == getattr(rt, a), a
    assert config.projection_dim == model.config.projection_dim and t.eos_token_id == t.vocab_size - 1
    # an explicit config is used as given
    explicit, _ = convert_open_clip_state_dict(sd, tiny_clip_config(width=128, heads=2, hidden_act="gelu"))
    assert explicit.text_config.eos_token_id == rt.eos_token_id

    save_file(sd, str(tmp_path / "w.safetensors"))
    loaded = load_open_clip_checkpoint(tmp_path / "w.safetensors", eos_token_id=rt.eos_token_id)
    assert all(not p.requires_grad for p in loaded.parameters())
    tok = _tokens(PROMPTS)
    px = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(input_ids=tok["input_ids"], pixel_values=px), loaded(input_ids=tok["input_ids"], pixel_values=px)
    assert torch.equal(a.logits_per_image, b.logits_per_image)
    assert torch.equal(a.text_embeds, b.text_embeds) and torch.equal(a.image_embeds, b.image_embeds)


def test_hps_converter_errors(tmp_path):
    sd = to_open_clip_state_dict(tiny_hps_model(seed=0))
    with pytest.raises(ValueError, match="does not use: visual.extra"):
        convert_open_clip_state_dict({**sd, "visual.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing key 'ln_final.bias'"):
        convert_open_clip_state_dict({k: v for k, v in sd.items() if k != "ln_final.bias"})
    with pytest.raises(ValueError, match="config expects"):
        convert_open_clip_state_dict(sd, tiny_clip_config(width=128, heads=2, layers=3, hidden_act="gelu"))
    odd = to_open_clip_state_dict(tiny_clip_model(0, width=96, heads=2, layers=1, hidden_act="gelu"))
    with pytest.raises(ValueError, match="pass an explicit CLIPConfig"):
        convert_open_clip_state_dict(odd)
    # open_clip CustomTextCLIP layout and a saved causal attn_mask are accepted
    text_keys = [k for k in sd if not k.startswith("visual.") and k != "logit_scale"]
    custom = {("text." + k if k in text_keys else k): v for k, v in sd.items()}
    custom["attn_mask"] = torch.full((77, 77), float("-inf")).triu(1)
    _, hf = convert_open_clip_state_dict(custom)
    assert torch.equal(hf["text_model.final_layer_norm.bias"], sd["ln_final.bias"])
    with pytest.raises(ValueError, match="not the causal attention mask"):
        convert_open_clip_state_dict({**sd, "attn_mask": torch.zeros(77, 77)})


def test_open_clip_matches_conversion():
    """A tiny random open_clip CLIP (open_clip's own classes) against our converted transformers model."""
    pytest.importorskip("open_clip")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from transformers import CLIPConfig, CLIPModel

    vocab = 500
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        oc = CLIP(embed_dim=24, quick_gelu=False,
                  vision_cfg=CLIPVisionCfg(layers=2, width=160, head_width=80, patch_size=8, image_size=32),
                  text_cfg=CLIPTextCfg(context_length=77, vocab_size=vocab, width=128, heads=2, layers=2))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, p in sorted(oc.named_parameters()):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    oc.eval()
    sd = {"module." + k: v for k, v in oc.state_dict().items()}
    with pytest.raises(ValueError, match="pass an explicit CLIPConfig"):  # 160-wide heads of 80: not inferable
        convert_open_clip_state_dict(sd)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                         projection_dim=24, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0),
        vision_config=dict(hidden_size=160, intermediate_size=640, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=24),
        projection_dim=24)
    config, hf_sd = convert_open_clip_state_dict(sd, cfg)
    hf = CLIPModel(config)
    hf.load_state_dict(hf_sd, strict=True)
    hf.eval()
    g = torch.Generator().manual_seed(2)
    px = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.zeros(3, 77, dtype=torch.long)  # open_clip layout: sot, tokens, eot (the largest id), zero padding
    for i, n in enumerate((5, 12, 75)):
        ids[i, 0] = vocab - 2
        ids[i, 1:n + 1] = torch.randint(1, vocab - 2, (n,), generator=g)
        ids[i, n + 1] = vocab - 1
    with torch.no_grad():
        torch.testing.assert_close(_feat(hf.get_image_features(pixel_values=px)), oc.encode_image(px),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_feat(hf.get_text_features(input_ids=ids)), oc.encode_text(ids),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hf.logit_scale, oc.logit_scale)

    # 64-wide heads (open_clip's default head width) are inferred without a config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        oc2 = CLIP(embed_dim=24, quick_gelu=False,
                   vision_cfg=CLIPVisionCfg(layers=1, width=128, head_width=64, patch_size=8, image_size=32),
                   text_cfg=CLIPTextCfg(context_length=77, vocab_size=vocab, width=128, heads=2, layers=1)).eval()
    config2, hf_sd2 = convert_open_clip_state_dict(oc2.state_dict())
    hf2 = CLIPModel(config2).eval()
    hf2.load_state_dict(hf_sd2, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(_feat(hf2.get_image_features(pixel_values=px)), oc2.encode_image(px),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_feat(hf2.get_text_features(input_ids=ids)), oc2.encode_text(ids),
                                   atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Plug-in rewards
# ------------------------------------------------------------------------------------------------------------------

PLUGIN_SOURCE = textwrap.dedent('''
    import torch
    from rtdmd.data import prompt_metadata

    def mean_red(images, prompts):
        return images[:, 0].mean(dim=(1, 2)) * torch.tensor([1.0 + len(p) * 0 for p in prompts])

    def from_metadata(images, prompts):
        return [float(prompt_metadata(p).get("bonus", 0)) for p in prompts]

    def seen_levels(images, prompts):
        return [float(((img * 255 - (img * 255).round()).abs().max()) < 1e-4) for img in images]

    def wrong_shape(images, prompts):
        return torch.zeros(len(prompts) + 1)

    def not_finite(images, prompts):
        return torch.full((len(prompts),), float("nan"))

    def strings(images, prompts):
        return ["good" for _ in prompts]

    class Scorer:
        @staticmethod
        def score(images, prompts):
            return torch.ones(len(prompts), 1)

    NOT_CALLABLE = 3
''')


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "my_plugin_rewards.py").write_text(PLUGIN_SOURCE)
    (tmp_path / "broken_plugin_rewards.py").write_text("import a_module_that_is_not_there\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_plugin_rewards"


def test_plugin_rewards(plugin_module):
    m = plugin_module
    reward = build_image_reward("red", {"function": f"{m}:mean_red", "weight": 2.0, "backprop": False})
    assert isinstance(reward, PluginReward) and isinstance(reward, Reward) and not reward.differentiable
    x = _images(seed=8)
    torch.testing.assert_close(reward(x, PROMPTS), x[:, 0].mean(dim=(1, 2)))

    diff = build_image_reward("red_bp", {"function": f"{m}:mean_red", "differentiable": True})
    xg = _images(seed=8, grad=True)
    (g,) = torch.autograd.grad(diff(xg, PROMPTS).sum(), xg)
    assert g.abs().sum() > 0

    meta = build_image_reward("meta", {"function": f"{m}:from_metadata"})
    prompts = [Prompt("a", {"bonus": 2.5}), Prompt("b")]
    assert prompt_metadata(prompts[0]) == {"bonus": 2.5}
    assert meta(x, prompts).tolist() == [2.5, 0.0]

    levels = build_image_reward("levels", {"function": f"{m}:seen_levels"})
    assert levels.advantage_score(x, PROMPTS).tolist() == [1.0, 1.0]  # the rollout path sees uint8 levels
    assert levels(x, PROMPTS).tolist() == [0.0, 0.0]

    nested = build_image_reward("nested", {"function": f"{m}:Scorer.score", "kind": "plugin"})
    assert nested(x, PROMPTS).tolist() == [1.0, 1.0]
    assert PluginReward("direct", lambda im, p: [0.5] * len(p))(x, PROMPTS).tolist() == [0.5, 0.5]


@pytest.mark.parametrize("function,match", [
    ("wrong_shape", r"returned shape \(3,\), expected \(2,\)"),
    ("not_finite", "non-finite"),
    ("strings", "non-number score 'good'"),
])
def test_plugin_bad_returns(plugin_module, function, match):
    reward = build_image_reward("p", {"function": f"{plugin_module}:{function}"})
    with pytest.raises(ValueError, match=match) as e:
        reward(_images(), PROMPTS)
    assert str(e.value).startswith("rewards.p.function: ")


@pytest.mark.parametrize("function,match", [
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("broken_plugin_rewards:f", "cannot import module 'broken_plugin_rewards': ModuleNotFoundError"),
    ("my_plugin_rewards:missing", "has no attribute 'missing'"),
    ("my_plugin_rewards:NOT_CALLABLE", "is not callable"),
    ("my_plugin_rewards.mean_red", "expected 'module:function'"),
])
def test_plugin_import_errors(plugin_module, function, match):
    with pytest.raises(ValueError, match=match) as e:
        build_image_reward("p", {"function": function})
    assert str(e.value).startswith("rewards.p.function: ") and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------------------------
# Spec errors: one line, naming the key
# ------------------------------------------------------------------------------------------------------------------

def test_spec_errors(dirs, tmp_path, plugin_module):
    import argparse

    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "bad.pt")  # not weights_only
    (tmp_path / "empty").mkdir()
    clip, tok = str(dirs["clip"]), str(dirs["tok"])
    cases = [
        ("clipscore", {"path": str(tmp_path / "nope")}, "rewards.clipscore.path: no such folder: "),
        ("clipscore", {}, "rewards.clipscore.path: required for the clipscore reward"),
        ("clipscore", {"path": clip, "colour": "red"}, "rewards.clipscore.colour: unknown key"),
        ("clipscore", {"path": clip, "differentiable": True}, "rewards.clipscore.differentiable: unknown key for "
                                                             "the clipscore reward \\(only plug-in rewards"),
        ("clipscore", {"path": str(tmp_path / "empty")}, "rewards.clipscore.path: cannot load a CLIPModel from "),
        ("pickscore", {"path": clip, "processor_path": str(tmp_path / "x")}, "rewards.pickscore.processor_path: no "),
        ("pickscore", {"path": str(dirs["pick_model"])}, "rewards.pickscore.path: cannot load a tokenizer"),
        ("mystery", {"path": clip}, "rewards.mystery: unknown image reward kind 'mystery'"),
        ("m", {"kind": "clip", "path": clip}, "rewards.m.kind: unknown image reward kind 'clip'"),
        ("hpsv2", {"path": str(dirs["hps_pt"])}, "rewards.hpsv2.tokenizer_path: required"),
        ("hpsv2", {"path": str(tmp_path / "no.pt"), "tokenizer_path": tok}, "rewards.hpsv2.path: no such file: "),
        ("hpsv2", {"path": str(tmp_path / "bad.pt"), "tokenizer_path": tok},
         "rewards.hpsv2.path: cannot load .* with torch.load\\(weights_only=True\\)"),
        ("hpsv2", {"path": str(dirs["aes"]), "tokenizer_path": tok}, "rewards.hpsv2.path: .*missing key"),
        ("aesthetic", {"path": str(dirs["aes"])}, "rewards.aesthetic.clip_path: required"),
        ("aesthetic", {"path": str(dirs["hps_st"]), "clip_path": clip}, "rewards.aesthetic.path: unexpected key"),
        ("p", {"function": f"{plugin_module}:mean_red", "differentiable": "yes"}, "rewards.p.differentiable: "),
        ("p", {"function": f"{plugin_module}:mean_red", "path": clip}, "rewards.p.path: unknown key for a plug-in"),
        ("p", {"function": f"{plugin_module}:mean_red", "kind": "hpsv2"}, "rewards.p.kind: "),
    ]
    for name, spec, match in cases:
        with pytest.raises(ValueError, match=match) as e:
            build_image_reward(name, spec)
        assert "\n" not in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="rewards.x: expected a mapping"):
        build_image_reward("x", ["path"])
