"""The trainer config (docs/training.md §1): presets, --config files, --set overrides, validation, hashing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from rtdmd._io import stable_hash
from rtdmd.config import (
    MOVED,
    Config,
    ConfigError,
    RewardConfig,
    available_presets,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)


def _leaves(d: dict, prefix: str = "") -> dict:
    """Dotted key -> value for every leaf of a nested dict."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _error(**kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(**kwargs)
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_toy_preset_matches_defaults_and_writes_every_key():
    assert "toy" in available_presets()
    cfg = load_config()
    # the preset differs from the dataclass defaults (the reference's values) only where toy.yaml says why
    tuned = {"stage1.steps", "stage1.fake_update_ratio", "stage1.generator_lr", "stage1.fake_lr",
             "stage2.steps", "stage2.group_size", "stage2.num_batches", "stage2.lr", "stage2.fake_lr",
             "stage2.aux_weight", "stage2.bp_scale", "rewards.binary.weight"}
    got, want = _leaves(config_to_dict(cfg)), _leaves(config_to_dict(Config()))
    assert {k for k in want if got[k] != want[k]} == tuned
    raw = yaml.safe_load((Path(__file__).parents[1] / "rtdmd" / "configs" / "toy.yaml").read_text())
    # every key the toy uses; the model section's other keys describe a real backbone
    assert set(_leaves(raw)) == {k for k in _leaves(config_to_dict(Config())) if k == "model.kind" or
                                 not k.startswith("model.")}
    assert cfg.toy.latent_shape == [4, 8, 8] and cfg.schedule.denoising_steps == [1000, 750, 500, 250]
    assert cfg.rewards["linear"].backprop and not cfg.rewards["binary"].backprop
    assert isinstance(cfg.toy.base_lr, float) and cfg.toy.base_lr == 1e-3
    assert load_config(preset=None) == Config()


def test_round_trip_every_key(tmp_path):
    # change every leaf so a key that fails to round-trip cannot hide behind its default
    cfg = load_config(overrides=[
        "preset=mine", "seed=7", "device=cpu", "nonfinite=skip", "model.kind=sd3", "model.path=/m",
        "toy.num_layers=3", "toy.num_heads=4", "toy.head_dim=16", "toy.prompt_tokens=2", "toy.text_dim=8",
        "toy.pooled_dim=8",
        "model.lora_rank=4", "model.lora_alpha=8", "model.generator_path=/g", "model.dtype=float32",
        "model.resolution=64", "model.attention=xformers", "model.max_sequence_length=7",
        "stage2.ema_dtype=float32", "model.gradient_checkpointing=false", "data.train_prompts=/p.txt",
        "data.eval_prompts=/e.jsonl",
        "data.stage2_prompts=/s.jsonl", "rewards.linear.kind=clipscore", "rewards.linear.processor_path=/pp",
        "rewards.linear.tokenizer_path=/tp", "rewards.linear.clip_path=/cp", "rewards.binary.clip_path=/bc",
        "rewards.linear.function=m:f", "rewards.linear.differentiable=true",
        "rewards.binary.kind=hpsv2", "rewards.binary.processor_path=/bp", "rewards.binary.tokenizer_path=/bt",
        "rewards.binary.function=b:g", "rewards.binary.differentiable=true",
        "stage1.fake_gradient_checkpointing=false", "stage2.lora_init=peft", "stage2.fake_gradient_checkpointing=false",
        "stage2.vae_checkpointing=false", "stage2.bp_batch_size=2", "stage2.decode_batch_size=2",
        "stage2.sample_batch_size=3", "stage2.consistency=false", "stage2.eval_every=3", "eval.num_images=5",
        "log.tensorboard=true", "log.wandb=true", "toy.num_prompts=2", "toy.num_components=2",
        "toy.latent_shape=[2,4,6]", "toy.data_seed=1", "toy.min_weight=0.2", "toy.std_range=[0.1,0.2]",
        "ac_dmd.teacher_guidance=2.5", "toy.n_eval=16", "toy.beta=0.5", "toy.beta_max=2", "toy.beta_step=0.25",
        "toy.base_steps=3", "toy.base_batch_size=8", "toy.base_lr=1e-4", "toy.base_cfg_dropout=0",
        "toy.base_cache=false", "schedule.denoising_steps=[1000,500]", "schedule.shift=1.5", "schedule.eta=0",
        "rewards.linear.weight=0.5", "rewards.linear.path=/r", "rewards.linear.backprop=false",
        "rewards.binary.backprop=true", "rewards.binary.weight=-1", "rewards.binary.path=/b",
        "stage1.steps=1", "stage1.batch_size=3", "stage1.fake_update_ratio=2", "stage1.generator_lr=1e-3",
        "stage1.fake_lr=1e-3", "stage1.adam_betas=[0.8,0.9]", "stage1.adam_eps=1e-6", "stage1.weight_decay=0.1",
        "stage1.grad_clip=2", "stage1.ema_decay=0.5", "stage1.ema_dtype=float32", "stage1.random_stop=false",
        "stage1.chain_dtype=float32", "ac_dmd.renoise_offset=5", "ac_dmd.renoise_min=30", "ac_dmd.renoise_max=970",
        "ac_dmd.fake_weight_max=5", "stage1.consistency=false", "ac_dmd.consistency_weight=0.1",
        "ac_dmd.consistency_epsilon=100", "stage1.rollout_checkpoint=false",
        "stage1.rank_shared_timesteps=true", "stage1.checkpoint_every=7",
        "stage1.keep_checkpoints=3",
        "stage2.steps=2", "stage2.group_size=3", "stage2.prompts_per_epoch=2", "stage2.sampling_batches=2",
        "stage2.num_batches=2",
        "stage2.lr=1e-3", "stage2.adam_betas=[0.8,0.9]", "stage2.adam_eps=1e-6", "stage2.weight_decay=0.1",
        "stage2.grad_clip=2", "stage2.fake_lr=1e-3", "stage2.fake_batch_size=3", "stage2.ppo_steps=1",
        "stage2.ppo_step_range=[0,0]", "stage2.ppo_weight=0.5", "stage2.clip_range=0.1", "stage2.adv_clip=2",
        "stage2.aux_weight=0.5", "stage2.bp_scale=0.5", "stage2.bp_margin=1", "stage2.bp_steps=2",
        "stage2.ema_decay=0.5", "stage2.ema_interval=2", "stage2.ema_per_sub_batch=false",
        "stage2.checkpoint_every=3", "stage2.keep_checkpoints=3",
        "eval.batch_size=3", "log.interval=5", "log.progress=false",
        "distributed.strategy=fsdp",
    ])
    changed = _leaves(config_to_dict(cfg))
    defaults = _leaves(config_to_dict(Config()))
    assert [k for k in defaults if changed[k] == defaults[k]] == []
    assert config_from_dict(config_to_dict(cfg)) == cfg
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind
    again = load_config(preset="toy", config_file=path)  # the file wins over the preset
    assert again == cfg and config_to_dict(again) == config_to_dict(cfg)
    assert all(type(a) is type(b) for a, b in zip(_leaves(config_to_dict(again)).values(), changed.values(),
                                                   strict=True))


def test_config_file_partial_takes_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 3\ntoy:\n  n_eval: 8\n  base_lr: 1e-3\nrewards:\n  only:\n    weight: 2\n")
    cfg = load_config(config_file=f, overrides=["rewards.extra.backprop=true"])
    assert cfg.seed == 3 and cfg.toy.n_eval == 8 and cfg.toy.beta == 1.0 and cfg.toy.base_lr == 1e-3
    assert cfg.rewards == {"only": RewardConfig(weight=2.0), "extra": RewardConfig(backprop=True)}
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(config_file=tmp_path / "empty.yaml") == Config()


@pytest.mark.parametrize("item, key, value", [
    ("toy.n_eval=64", "toy.n_eval", 64),
    ("toy.base_lr=1e-3", "toy.base_lr", 1e-3),  # YAML 1.1 reads 1e-3 as a str
    ("toy.base_lr=2.5E-4", "toy.base_lr", 2.5e-4),
    ("toy.beta=2", "toy.beta", 2.0),  # int accepted for a float field, converted
    ("toy.base_cache=false", "toy.base_cache", False),
    ("log.progress=true", "log.progress", True),
    ("toy.latent_shape=[2, 4, 4]", "toy.latent_shape", [2, 4, 4]),
    ("toy.std_range=[1, 2]", "toy.std_range", [1.0, 2.0]),
    ("rewards.linear.path=null", "rewards.linear.path", None),
    ("model.path=/weights/sd3", "model.path", "/weights/sd3"),
    ("model.path=123", "model.path", "123"),  # a str field keeps the text
    ("device=cuda", "device", "cuda"),
    ("distributed.strategy=ddp", "distributed.strategy", "ddp"),
    (" seed = 5 ", "seed", 5),
])
def test_override_types(item, key, value):
    got = _leaves(config_to_dict(load_config(overrides=[item])))[key]
    assert got == value and type(got) is type(value)
    if isinstance(value, list):
        assert [type(x) for x in got] == [type(x) for x in value]


def test_overrides_apply_in_order_and_new_reward():
    cfg = load_config(overrides=["seed=1", "seed=2", "rewards.clip.weight=0.5"])
    assert cfg.seed == 2
    assert cfg.rewards["clip"] == RewardConfig(weight=0.5, backprop=False, path=None)
    assert set(cfg.rewards) == {"linear", "binary", "clip"}


@pytest.mark.parametrize("item, expect", [
    ("foo=1", "unknown config key 'foo'"),
    ("toy.foo=1", "unknown config key 'toy.foo'"),
    ("rewards.linear.foo=1", "unknown config key 'rewards.linear.foo'"),
    ("rewards.new.foo=1", "unknown config key 'rewards.new.foo'"),
    ("model.path.sub=1", "unknown config key 'model.path.sub'"),
    ("toy.n_eval=abc", "config key 'toy.n_eval' must be an int, got 'abc' (str)"),
    ("toy.n_eval=true", "config key 'toy.n_eval' must be an int, got True (bool)"),
    ("toy.n_eval=2.0", "config key 'toy.n_eval' must be an int, got 2.0 (float)"),
    ("toy.beta=true", "config key 'toy.beta' must be a float"),
    ("toy.base_cache=1", "config key 'toy.base_cache' must be a bool"),
    ("toy.latent_shape=[4, 8]", "config key 'toy.latent_shape' must be 3 positive ints"),
    ("toy.latent_shape=[4, 8, 0]", "config key 'toy.latent_shape' must be 3 positive ints"),
    ("toy.latent_shape=[4, 8.0, 8]", "config key 'toy.latent_shape[1]' must be an int"),
    ("toy.latent_shape=4", "config key 'toy.latent_shape' must be a list"),
    ("toy.latent_shape=[4, 7, 7]", "config key 'toy.latent_shape' must have height and width divisible"),
    ("toy.std_range=[0.6, 0.3]", "config key 'toy.std_range' must be 2 floats"),
    ("schedule.eta=1.5", "config key 'schedule.eta' must be in [0, 1], got 1.5"),
    ("schedule.shift=0", "config key 'schedule.shift' must be > 0, got 0"),
    ("seed=-1", "config key 'seed' must be >= 0, got -1"),
    ("toy.n_eval=1", "config key 'toy.n_eval' must be >= 2, got 1"),
    ("toy.base_lr=nan", "config key 'toy.base_lr' must be a finite float"),
    ("toy.min_weight=0.5", "config key 'toy.min_weight' must be <="),
    ("toy.beta_step=5", "config key 'toy.beta_step' must be <= toy.beta_max"),
    ("schedule.denoising_steps=[1000, 1000]", "config key 'schedule.denoising_steps' must be"),
    ("schedule.denoising_steps=[1001, 500]", "config key 'schedule.denoising_steps' must be"),
    ("schedule.denoising_steps=[]", "config key 'schedule.denoising_steps' must be"),
    ("device=tpu", "config key 'device' must be one of 'auto', 'cpu', 'cuda', got 'tpu' (str)"),
    ("model.kind=sd4", "config key 'model.kind' must be one of"),
    ("distributed.strategy=true", "config key 'distributed.strategy' must be one of"),
    ("toy=3", "config key 'toy' must be a mapping"),
    ("seed", "config override 'seed' must look like key.sub=value"),
    ("toy.n_eval=[1,", "config key 'toy.n_eval'"),
])
def test_override_errors(item, expect):
    assert _error(overrides=[item]).startswith(expect)


def test_file_errors(tmp_path):
    msg = _error(preset="nope")
    assert "unknown preset 'nope'" in msg and "toy" in msg
    missing = tmp_path / "missing.yaml"
    assert str(missing) in _error(config_file=missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("toy: [1, 2\nseed: 3\n")
    assert "invalid YAML" in (msg := _error(config_file=bad)) and str(bad) in msg
    (tmp_path / "list.yaml").write_text("- 1\n")
    assert "list.yaml" in _error(config_file=tmp_path / "list.yaml")
    (tmp_path / "unk.yaml").write_text("toy:\n  n_eval: 8\n  foo: 1\n")
    assert _error(config_file=tmp_path / "unk.yaml") == "unknown config key 'toy.foo'"
    (tmp_path / "rew.yaml").write_text("rewards:\n  linear:\n    weights: 1\n")
    assert _error(config_file=tmp_path / "rew.yaml").startswith("unknown config key 'rewards.linear.weights'")
    with pytest.raises(ConfigError, match="'toy.n_eval'"):
        config_from_dict({"toy": {"n_eval": "8"}})


def test_stable_hash():
    cfg = Config()
    h = stable_hash(cfg.toy)
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == stable_hash(Config().toy) == stable_hash(config_to_dict(Config())["toy"])
    assert stable_hash({"b": 1, "a": 2}) == stable_hash({"a": 2, "b": 1})  # key order does not matter
    assert stable_hash(dataclasses.replace(cfg.toy, n_eval=4)) != h
    assert stable_hash(dataclasses.replace(cfg.toy, latent_shape=[4, 8, 6])) != h
    assert stable_hash({"toy": cfg.toy, "model": cfg.model}) == stable_hash({"model": cfg.model, "toy": cfg.toy})
    assert stable_hash(cfg) != stable_hash(dataclasses.replace(cfg, seed=1))


@pytest.mark.parametrize("preset,guidance,gen_lr", [("sd35m", 4.5, 3e-5), ("flux2_4b", 4.0, 1e-6)])
def test_real_presets_write_every_key_and_need_their_paths(preset, guidance, gen_lr):
    raw = yaml.safe_load((Path(__file__).parents[1] / "rtdmd" / "configs" / f"{preset}.yaml").read_text())
    keys = {k for k in _leaves(config_to_dict(Config())) if not k.startswith(("toy.", "rewards."))}
    assert keys - set(_leaves(raw)) == set()
    with pytest.raises(ConfigError, match="'model.path' must be set"):
        load_config(preset)
    cfg = load_config(preset, overrides=["model.path=/m", "data.train_prompts=/p.txt"])
    assert (cfg.model.lora_rank, cfg.model.lora_alpha, cfg.ac_dmd.teacher_guidance) == (32, 64.0, guidance)
    assert cfg.stage1.generator_lr == gen_lr and cfg.stage2.lr == 3e-6 and cfg.stage2.aux_weight == 0.001
    assert sorted(cfg.rewards) == ["clipscore", "hpsv2", "pickscore"]
    assert all(r.backprop and r.weight == 1.0 for r in cfg.rewards.values())
    with pytest.raises(ConfigError, match="model.lora_rank"):
        load_config(preset, overrides=["model.path=/m", "data.train_prompts=/p.txt", "model.lora_rank=0"])


@pytest.mark.parametrize("old", sorted(MOVED))
def test_moved_keys_fail_naming_the_new_key(old, tmp_path):
    """A key of the old schema, in --set or in a file, fails with one line naming where it lives now."""
    message = f"config key '{old}' is now '{MOVED[old]}'"
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[f"{old}=1"])
    assert str(e.value) == message
    section, key = old.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({section: {key: 1}}))
    with pytest.raises(ConfigError) as e:
        load_config(config_file=path)
    assert str(e.value) == message
    new_section, new_key = MOVED[old].split(".")
    assert getattr(getattr(Config(), new_section), new_key) is not None  # the new key exists

