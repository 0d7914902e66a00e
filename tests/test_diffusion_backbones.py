"""Real backbones on tiny pipelines: SD3 and FLUX.2-klein built in the test, saved with
``save_pretrained`` and loaded through the trainer's own loading code. One stage-1 step and one stage-2 epoch
per backbone, LoRA-only training on a shared frozen base, reward gradients reaching the generator's LoRA,
block checkpointing under adapter switching, the LoRA round trip into the stock diffusers pipeline with our
scheduler, the CLI end to end, and one-line errors for wrong paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny_clip import save_tiny_clip
from tiny_pipelines import build_tiny_flux1, build_tiny_flux2_klein, build_tiny_sd3

import rtdmd_kernels as rk
from rtdmd import checkpoint as ck
from rtdmd.config import load_config
from rtdmd.distributed import DistEnv
from rtdmd.models.diffusion import S1_FAKE, S1_GENERATOR, export_lora, load_core, stage1_models, stage2_models
from rtdmd.rewards import build_rewards
from rtdmd.rollout import generate
from rtdmd.stages import Stage1, Stage2, init_state

CPU = torch.device("cpu")
ONE = DistEnv()  # one process on the CPU


def lora_state(core, cfg, s1_modules=None):
    """A stage's state on a real backbone and its teacher: stage 1's fresh LoRAs, or (given stage 1's modules)
    stage 2's fresh adapters over stage 1's frozen ones."""
    if s1_modules is None:
        generator, fake, teacher = stage1_models(core, cfg)
        return init_state(1, generator, fake, cfg), teacher
    generator, fake, teacher = stage2_models(core, cfg, s1_modules)
    return init_state(2, generator, fake, cfg), teacher
PROMPTS = ["a red cube", "the blue sphere", "a cat on a mat", "green grass"]


# ---------------------------------------------------------------------------------------------- plug-in rewards
def brightness(images, prompts):
    """A differentiable plug-in reward (mean brightness) for the tests' reward back-propagation."""
    return images.mean(dim=(1, 2, 3))


def redness(images, prompts):
    """A non-differentiable plug-in (advantages only)."""
    return (images[:, 0] - images[:, 1:].mean(1)).mean(dim=(1, 2)).tolist()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "tag": i}) + "\n" for i, p in enumerate(PROMPTS)))
    return {"sd3": build_tiny_sd3(root / "sd3"), "flux2": build_tiny_flux2_klein(root / "flux2_base", variant="base"),
            "klein": build_tiny_flux2_klein(root / "flux2_klein", variant="klein"), "prompts": prompts,
            "flux1": build_tiny_flux1(root / "flux1"),
            "clip": save_tiny_clip(root / "clip")}


@pytest.fixture(autouse=True)
def _torch_backend():
    with rk.use_backend("torch"):
        yield


PRESET_KIND = {"sd35m": "sd3", "sd3m": "sd3", "flux1_dev": "flux1", "flux2_4b": "flux2", "flux2_9b": "flux2"}


def tiny_config(folders, kind: str, tmp_path: Path, extra: dict | None = None, preset: str | None = None) -> Path:
    """The real preset (by default sd35m / flux2_4b for ``kind``) shrunk to the tiny pipeline of its architecture:
    fp32, 64 px, rank-4 LoRA with alpha 8 (scale 2, as the reference's r32/a64), tiny batches, plug-in rewards."""
    preset = preset or {"sd3": "sd35m", "flux1": "flux1_dev", "flux2": "flux2_4b"}[kind]
    kind = PRESET_KIND[preset]
    data = yaml.safe_load((Path(__file__).parents[1] / "rtdmd" / "configs" / f"{preset}.yaml").read_text())
    data["device"] = "cpu"
    data["model"].update(path=str(folders[kind]), dtype="float32", resolution=64, lora_rank=4, lora_alpha=8.0)
    data["distributed"]["strategy"] = "none"
    if kind == "flux2":
        data["model"]["generator_path"] = str(folders["klein"])
    data["data"]["train_prompts"] = str(folders["prompts"])
    data["rewards"] = {
        "bright": {"function": "test_diffusion_backbones:brightness", "differentiable": True, "backprop": True},
        "red": {"function": "test_diffusion_backbones:redness", "weight": 0.5},
    }
    data["stage1"].update(steps=2, batch_size=2, fake_update_ratio=1, checkpoint_every=1)
    data["stage2"].update(steps=1, group_size=2, prompts_per_epoch=2, sampling_batches=2, num_batches=2,
                          sample_batch_size=2, fake_batch_size=2, bp_batch_size=1, decode_batch_size=2,
                          aux_weight=1.0, bp_scale=1.0)
    data["log"].update(progress=False, interval=1)
    for section, values in (extra or {}).items():
        data[section].update(values)
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def load_tiny(folders, kind, tmp_path, extra=None):
    cfg = load_config(config_file=tiny_config(folders, kind, tmp_path, extra))
    core = load_core(cfg.model, CPU)
    return cfg, core


def base_params(core):
    """The frozen base weights (no LoRA), to check that training leaves them alone."""
    mods = {core.base.module, core.generator_base.module}
    return {f"{id(m)}.{k}": p.detach().clone() for m in mods for k, p in m.named_parameters() if "lora_" not in k}


def stage1_checkpoint(folders, kind, tmp_path):
    cfg, core = load_tiny(folders, kind, tmp_path)
    state, teacher = lora_state(core, cfg)
    Stage1(state, teacher, list(PROMPTS), cfg, ONE).run(run_dir=tmp_path / "run")
    return cfg, core, state, ck.load_checkpoint(ck.latest_checkpoint(tmp_path / "run", stage=1)).modules


# ---------------------------------------------------------------------------------------------- the stages
@pytest.mark.parametrize("kind", ["sd3", "flux2"])
def test_one_stage1_step_trains_only_the_loras(folders, kind, tmp_path):
    cfg, core = load_tiny(folders, kind, tmp_path)
    state, teacher = lora_state(core, cfg)
    assert (core.generator_base is core.base) == (kind == "sd3")  # FLUX.2's generator starts from klein
    frozen = base_params(core)
    gen0, fake0 = state.generator.state_dict(), state.fake.state_dict()
    gen0, fake0 = {k: v.clone() for k, v in gen0.items()}, {k: v.clone() for k, v in fake0.items()}
    assert gen0 and all(".lora_A." in k or ".lora_B." in k for k in gen0)  # the optimizer sees the LoRA only
    x = torch.randn(2, *core.latent_shape)
    sigma = torch.full((2,), 0.75)
    cond = core.encode(PROMPTS[:2])
    v_teacher = teacher.velocity(x, sigma, cond)
    stats = Stage1(state, teacher, list(PROMPTS), cfg, ONE).step(0)
    assert {"fake_loss", "gen_loss", "fake_grad_norm", "gen_grad_norm"} <= set(stats)
    assert all(torch.isfinite(v) for v in stats.values())
    assert all(torch.equal(v, base_params(core)[k]) for k, v in frozen.items())
    assert any(not torch.equal(gen0[k], v) for k, v in state.generator.state_dict().items())
    assert any(not torch.equal(fake0[k], v) for k, v in state.fake.state_dict().items())
    assert torch.equal(teacher.velocity(x, sigma, cond), v_teacher)  # adapters off: the teacher is the base
    assert not torch.allclose(state.generator.velocity(x, sigma, cond), v_teacher)


@pytest.mark.parametrize("kind", ["sd3", "flux2"])
def test_one_stage2_epoch_on_frozen_stage1_adapters(folders, kind, tmp_path):
    cfg, core, _, s1 = stage1_checkpoint(folders, kind, tmp_path)
    state, teacher = lora_state(core, cfg, s1)
    frozen = {k: p.detach().clone() for k, p in core.generator_base.named_adapter_parameters(S1_GENERATOR)}
    assert all(torch.equal(frozen[k], s1["generator_ema"][k]) for k in frozen)  # stage 1's EMA, unmerged
    assert not any(p.requires_grad for _, p in core.base.named_adapter_parameters(S1_FAKE))
    # docs/method.md §13.3: the fresh adapter's A ~ N(0, 1) and B = 0, so stage 2 starts exactly at stage 1's generator
    a = torch.cat([p.flatten() for k, p in state.generator.named_parameters() if ".lora_A." in k])
    assert 0.8 < float(a.std()) < 1.2
    assert all(float(p.abs().max()) == 0 for k, p in state.generator.named_parameters() if ".lora_B." in k)
    g0 = {k: v.clone() for k, v in state.generator.state_dict().items()}
    loop = Stage2(state, teacher, list(PROMPTS), build_rewards(cfg, device=CPU), cfg, ONE)
    stats = loop.epoch(0)
    assert {"ppo_loss", "aux_loss", "bp_loss", "fake_loss", "reward_bright", "reward_red"} <= set(stats)
    assert all(torch.isfinite(v) for v in stats.values())
    assert any(not torch.equal(g0[k], v) for k, v in state.generator.state_dict().items())
    assert all(torch.equal(p, frozen[k]) for k, p in core.generator_base.named_adapter_parameters(S1_GENERATOR))


def test_reward_gradient_reaches_the_generator_lora(folders, tmp_path):
    """CLIPScore (a tiny CLIP loaded from its folder by the real builder) + a plug-in, back-propagated through the
    checkpointed VAE decode into the stage-2 adapter."""
    cfg, core, _, s1 = stage1_checkpoint(folders, "sd3", tmp_path)
    cfg = load_config(config_file=tiny_config(folders, "sd3", tmp_path),
                      overrides=[f"rewards.clipscore.path={folders['clip']}", "rewards.clipscore.backprop=true"])
    state, _ = lora_state(core, cfg, s1)
    rewards = build_rewards(cfg, device=CPU)
    assert rewards.backprop_names == ["bright", "clipscore"]
    gen = state.generator
    x3 = torch.randn(2, *core.latent_shape)
    sigma3 = 0.5
    v = gen.velocity(x3, torch.full((2,), sigma3), core.encode(PROMPTS[:2]))
    images = gen.decode(x3 - sigma3 * v, chunk=1, checkpoint=True)  # the BP path: chunked, checkpointed VAE
    rewards.backprop_score(images, PROMPTS[:2]).sum().backward()
    grads = {k: p.grad for k, p in gen.named_parameters()}
    assert any(g is not None and float(g.abs().max()) > 0 for k, g in grads.items() if ".lora_B." in k)
    assert all(p.grad is None for k, p in core.base.module.named_parameters() if "lora_" not in k)
    assert all(p.grad is None for _, p in core.base.named_adapter_parameters(S1_GENERATOR))


def test_block_checkpointing_recomputes_under_the_adapters_of_the_forward(folders, tmp_path):
    """A checkpointed generator block is recomputed in backward after the fake score ran with other adapters:
    the gradient must still be the generator's."""
    cfg, core = load_tiny(folders, "sd3", tmp_path)
    state, _ = lora_state(core, cfg)
    with torch.no_grad():
        for _, p in state.generator.named_parameters():
            p.normal_(0, 0.1)  # non-zero B so that every LoRA path carries gradient
    x, sigma, cond = torch.randn(2, *core.latent_shape), torch.full((2,), 0.9), core.encode(PROMPTS[:2])
    grads = []
    for checkpointing in (False, True):
        state.generator.block_checkpointing = checkpointing
        state.generator.zero_grad(set_to_none=True)
        out = state.generator.velocity(x, sigma, cond)
        with torch.no_grad():
            state.fake.velocity(x, sigma, cond)  # switches the shared base to the fake score's adapter
        (out**2).mean().backward()
        grads.append({k: p.grad.clone() for k, p in state.generator.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7)


def test_shared_base_memory_is_lora_only(folders, tmp_path):
    """Generator, EMA, fake score and teacher hold one base: what training adds is the LoRA weights."""
    cfg, core = load_tiny(folders, "sd3", tmp_path)
    n_base = sum(p.numel() for k, p in core.base.module.named_parameters() if "lora_" not in k)
    state, _ = lora_state(core, cfg)
    n_lora = sum(p.numel() for k, p in core.base.module.named_parameters() if "lora_" in k)
    n_trained = sum(p.numel() for p in [*state.generator.parameters(), *state.fake.parameters()])
    assert n_lora == 3 * n_trained // 2  # generator, its EMA shadow and the fake score: one adapter each
    assert n_lora < n_base


# ---------------------------------------------------------------------------------------------- round trip
def _perturb(view, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in view.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("kind", ["sd3", "flux2"])
def test_lora_round_trip_into_the_stock_pipeline(folders, kind, tmp_path):
    """Our 4-step generator (stage-1 LoRA + stage-2 LoRA, alpha != rank) exported as one diffusers LoRA and loaded
    with ``pipe.load_lora_weights`` into the stock pipeline with our CPS scheduler gives our sampler's images."""
    import diffusers

    from rtdmd.scheduler import CPSScheduler

    cfg, core = load_tiny(folders, kind, tmp_path)
    s1_state, _ = lora_state(core, cfg)
    _perturb(s1_state.generator, 1)
    s1 = {"generator_ema": s1_state.generator.state_dict(), "fake_score": s1_state.fake.state_dict()}
    s2_state, _ = lora_state(core, cfg, s1)
    _perturb(s2_state.generator, 2)
    gen = s2_state.generator
    out = export_lora(core, [s1["generator_ema"], gen.state_dict()], cfg.model, tmp_path / "lora")

    prompts = ["a red cube", "green grass"]
    sigmas = gen.sigmas(cfg.schedule.denoising_steps, cfg.schedule.shift)
    with torch.no_grad():
        ours = gen.decode(generate(gen, prompts, sigmas=sigmas, eta=0.9, seed=3, stream="sample"))

    cls = diffusers.StableDiffusion3Pipeline if kind == "sd3" else diffusers.Flux2KleinPipeline
    pipe = cls.from_pretrained(folders["sd3" if kind == "sd3" else "klein"], dtype=torch.float32)
    pipe.load_lora_weights(out)
    scheduler = CPSScheduler.for_pipeline(pipe, eta=0.9, denoising_steps=cfg.schedule.denoising_steps)
    scheduler.set_noise(seed=3, stream="sample", latent_shape=core.latent_shape)
    x_t = scheduler.initial_latents(len(prompts), latent_shape=core.latent_shape)
    extra = {"max_sequence_length": 128} if kind == "sd3" else {}
    theirs = pipe(prompt=prompts, latents=x_t, num_inference_steps=4, guidance_scale=1.0, height=64, width=64,
                  output_type="pt", **extra).images
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs.float(), ours, atol=2e-4, rtol=0)
    pipe.unload_lora_weights()  # without our LoRA the images differ: the test would notice a dropped LoRA
    scheduler.set_noise(seed=3, stream="sample", latent_shape=core.latent_shape)
    plain = pipe(prompt=prompts, latents=x_t, num_inference_steps=4, guidance_scale=1.0, height=64, width=64,
                 output_type="pt", **extra).images
    assert (plain.float() - ours).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------- CLI
def _run(main, argv, capsys):
    from rtdmd.cli import run_cli

    code = run_cli("prog", main, argv)
    return code, capsys.readouterr()


@pytest.mark.parametrize("override,needle", [
    ("model.path=/no/such/folder", "model.path: no such folder"),
    ("data.train_prompts=/no/such/prompts.txt", "data.train_prompts: no such file"),
    ("model.generator_path=/no/such/klein", "model.generator_path: no such folder"),
    ("rewards.bright.function=no_such_module:f", "rewards.bright.function"),
])
def test_wrong_paths_are_one_line_exit_2_and_no_run_folder(folders, tmp_path, capsys, override, needle):
    from rtdmd.train import main as train_main

    config = tiny_config(folders, "sd3", tmp_path)
    if override.startswith("model.generator_path"):
        config = tiny_config(folders, "flux2", tmp_path)
    out = tmp_path / "run"
    code, cap = _run(train_main, ["--config", str(config), "--out", str(out), "--set", override], capsys)
    assert code == 2
    assert cap.err.strip() == cap.err.strip().splitlines()[0] and needle in cap.err, cap.err  # one line
    assert not out.exists()  # checked before a run folder is made


def test_a_folder_that_is_not_a_pipeline_is_one_line(folders, tmp_path, capsys):
    from rtdmd.train import main as train_main

    (tmp_path / "empty").mkdir()
    config = tiny_config(folders, "sd3", tmp_path)
    code, cap = _run(train_main, ["--config", str(config), "--set", f"model.path={tmp_path / 'empty'}",
                                  "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "is not a diffusers folder" in cap.err


# ---------------------------------------------------------------------------------------------- conditioning
def test_sd3_conditioning_uses_the_references_t5_length(folders, tmp_path):
    _, core = load_tiny(folders, "sd3", tmp_path)
    cond = core.encode(PROMPTS[:3])
    assert cond["prompt_embeds"].shape[:2] == (3, 77 + 128)  # CLIP 77 + T5 128 (docs/method.md §13.13), not 77 + 256
    assert cond["pooled"].shape[0] == 3
    empty = core.encode(["", ""])  # the CFG branch: "" encoded once and expanded
    assert empty["prompt_embeds"].shape[0] == 2 and core.encode([""])["prompt_embeds"].data_ptr() == \
        empty["prompt_embeds"].data_ptr()


def test_flux2_timestep_is_quantised_through_the_model_dtype(folders, tmp_path):
    """docs/method.md §13.5: FLUX.2 sees bf16(1000σ)/1000 — 958.09 -> 960 -> 0.9609375 — as its pipeline feeds it."""
    cfg = load_config(config_file=tiny_config(folders, "flux2", tmp_path))
    cfg.model.dtype = "bfloat16"
    core = load_core(cfg.model, CPU)
    seen = []
    hook = core.base.module.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    try:
        x = torch.randn(1, *core.latent_shape)
        core.view([]).velocity(x, torch.tensor([0.95809]), core.encode(["a cat"]))
    finally:
        hook.remove()
    assert seen[0].dtype == torch.bfloat16 and float(seen[0]) == 0.9609375
    sig = core.sigmas([1000, 750, 500, 250], 3.0)  # the dynamic shift for this latent size, ends at 0
    assert sig[0] == 1.0 and sig[-1] == 0.0 and all(a > b for a, b in zip(sig[:-1], sig[1:], strict=True))
