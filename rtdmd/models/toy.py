"""Toy-world backbones (docs/toy.md): the exact teacher and the tiny SD3 network, plus the cached base pretraining.

- :class:`ExactTeacher` returns the closed-form mixture velocity (CFG is the caller's, against the
  unconditional mixture of ``encode([""])``), so distillation targets are exact.
- :class:`ToyNetwork` is a small diffusers ``SD3Transformer2DModel`` — the same code path as SD3 —
  conditioned on learned prompt tokens and a learned pooled embedding (one row per prompt plus one for
  the empty prompt, which CFG and prompt dropout use).
- :func:`pretrain_base` plays the part of SD3.5-M's pretraining: flow matching against the exact
  velocity at random ``(x_σ, σ, prompt)`` with prompt dropout. It is cached on disk keyed by
  everything that determines it, so it is trained once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import rng
from .._io import stable_hash
from ..checkpoint import load_safetensors, save_safetensors
from .base import Backbone, Cond
from .toy_world import UNCONDITIONAL, ToyWorld

log = logging.getLogger(__name__)

BASE_VERSION = 1  # bump when the pretraining recipe changes: invalidates cached bases


def _encode(world: ToyWorld, prompts: Sequence[str], device: torch.device) -> Cond:
    idx = [world.prompt_index(p) for p in prompts]
    return {"prompt": torch.tensor(idx, dtype=torch.long, device=device)}


class ExactTeacher(Backbone):
    """The closed-form teacher: ``velocity`` is the exact mixture velocity of the prompt (or of the
    unconditional mixture for ``""``), computed in float64 and returned in ``x.dtype``."""

    def __init__(self, world: ToyWorld):
        super().__init__()
        self.world = world
        self.latent_shape = world.latent_shape
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)

    def encode(self, prompts: Sequence[str]) -> Cond:
        return _encode(self.world, prompts, self._device_probe.device)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.world.velocity(x, sigma, cond["prompt"])


class ToyNetwork(Backbone):
    """The tiny ``SD3Transformer2DModel`` (patch 2) with learned prompt tokens; ``timestep = 1000σ`` as SD3."""

    def __init__(self, world: ToyWorld, *, num_layers: int = 2, num_heads: int = 2, head_dim: int = 32,
                 prompt_tokens: int = 4, text_dim: int = 64, pooled_dim: int = 32):
        from diffusers import SD3Transformer2DModel  # seconds to import: only when a network is built

        super().__init__()
        c, h, w = world.latent_shape
        if h != w or h % 2:
            raise ValueError(f"the toy network needs square latents with an even side, got {world.latent_shape}")
        self.world = world
        self.latent_shape = world.latent_shape
        self.transformer = SD3Transformer2DModel(
            sample_size=h, patch_size=2, in_channels=c, out_channels=c, num_layers=num_layers,
            attention_head_dim=head_dim, num_attention_heads=num_heads, joint_attention_dim=text_dim,
            caption_projection_dim=num_heads * head_dim, pooled_projection_dim=pooled_dim, pos_embed_max_size=h,
        )
        # Row P is the empty prompt "" (CFG's unconditional branch and prompt dropout).
        n = world.num_prompts + 1
        self.prompt_embeds = nn.Parameter(torch.randn(n, prompt_tokens, text_dim) * 0.5)
        self.pooled_embeds = nn.Parameter(torch.randn(n, pooled_dim) * 0.5)

    def encode(self, prompts: Sequence[str]) -> Cond:
        return _encode(self.world, prompts, self.prompt_embeds.device)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self(x, sigma, cond)  # through __call__, so module hooks (FSDP2's unshard) see every call

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        idx = cond["prompt"]
        idx = torch.where(idx == UNCONDITIONAL, self.world.num_prompts, idx)
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(x.shape[0])
        out = self.transformer(
            hidden_states=x.to(self.prompt_embeds.dtype), encoder_hidden_states=_rows(self.prompt_embeds, idx),
            pooled_projections=_rows(self.pooled_embeds, idx), timestep=sigma * 1000.0, return_dict=False,
        )[0]
        return out.to(x.dtype)


def _rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[idx]`` as a one-hot matmul: the same values, and a gradient that is a matmul too. An index gather's
    backward is a scatter-add whose multi-threaded CPU accumulation order varies from process to process, which
    made two identical toy runs differ in the last bits (and training amplified that)."""
    onehot = torch.nn.functional.one_hot(idx, table.shape[0]).to(table.dtype)
    return (onehot @ table.flatten(1)).view(idx.shape[0], *table.shape[1:])


def build_network(world: ToyWorld, toy_cfg) -> ToyNetwork:
    """The toy network from the config's ``model`` section."""
    return ToyNetwork(world, num_layers=toy_cfg.num_layers, num_heads=toy_cfg.num_heads,
                      head_dim=toy_cfg.head_dim, prompt_tokens=toy_cfg.prompt_tokens,
                      text_dim=toy_cfg.text_dim, pooled_dim=toy_cfg.pooled_dim)


# --------------------------------------------------------------------------------------------- pretraining
def stage_networks(world: ToyWorld, toy_cfg, generator_weights: dict, fake_weights: dict,
                   device: torch.device | str = "cpu") -> tuple[ToyNetwork, ToyNetwork]:
    """A stage's trained generator and fake score, loaded: stage 1 starts both from the base network, stage 2 from
    stage 1's EMA generator and fake score."""
    nets = []
    for weights in (generator_weights, fake_weights):
        net = build_network(world, toy_cfg).to(device)
        net.load_state_dict(weights)
        nets.append(net)
    return nets[0], nets[1]


def cache_dir() -> Path:
    """Where cached base networks live: ``$RTDMD_CACHE`` or ``~/.cache/rtdmd``."""
    return Path(os.environ.get("RTDMD_CACHE") or Path.home() / ".cache" / "rtdmd")


def base_recipe(cfg) -> dict:
    """Everything that determines the pretrained base (the cache key)."""
    t = cfg.toy
    return {
        "version": BASE_VERSION, "seed": cfg.seed,
        "world": [t.num_prompts, t.num_components, list(t.latent_shape), t.data_seed, t.min_weight, list(t.std_range)],
        "network": [t.num_layers, t.num_heads, t.head_dim, t.prompt_tokens, t.text_dim, t.pooled_dim],
        "train": [t.base_steps, t.base_batch_size, t.base_lr, t.base_cfg_dropout],
    }


def pretrain_base(world: ToyWorld, cfg, *, device: torch.device | str = "cpu",
                  log_fn: Callable[[dict], None] | None = None, progress: bool = False) -> tuple[ToyNetwork, dict]:
    """The pretrained base network (float32), trained or loaded from the cache; returns ``(network, info)``.

    Flow matching against the exact velocity: each step draws prompts uniformly, exact data ``x0``, noise
    ``ε`` and ``σ ~ U[0, 1]`` (one seeded stream per step), drops the prompt with
    probability ``base_cfg_dropout`` (the target is then the unconditional mixture's velocity), and
    regresses ``v*(x_σ, σ)`` — lower variance than the ``ε - x0`` target and with the same minimiser.
    AdamW with a cosine learning-rate decay.
    """
    t = cfg.toy
    recipe = base_recipe(cfg)
    path = cache_dir() / f"toy-base-{stable_hash(recipe)}.safetensors"
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's global RNG alone
        torch.manual_seed(rng.derive_seed(cfg.seed, "base/init"))
        net = build_network(world, cfg.toy)
    if t.base_cache and path.is_file():
        net.load_state_dict(load_safetensors(path))
        log.info("loaded the cached toy base network from %s", path)
        return net.to(device), {"cached": True, "path": str(path), "seconds": 0.0}

    net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=t.base_lr, weight_decay=0.0)
    steps = t.base_steps
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    bs, p_count = t.base_batch_size, world.num_prompts
    start = time.perf_counter()
    for step in tqdm(range(steps), desc="base pretraining", disable=None if progress else True, leave=False):
        g = rng.generator(cfg.seed, "base", step)  # one stream per step: the base is not a sampled output
        prompt = torch.randint(0, p_count, (bs,), generator=g)
        x0 = world.sample(prompt, torch.rand(bs, generator=g, dtype=torch.float64),
                          torch.randn(bs, world.dim, generator=g, dtype=torch.float64))
        eps = torch.randn(bs, *world.latent_shape, generator=g, dtype=torch.float64)
        sigma = torch.rand(bs, generator=g, dtype=torch.float64)
        drop = torch.rand(bs, generator=g, dtype=torch.float64) < t.base_cfg_dropout
        cond_idx = torch.where(drop, UNCONDITIONAL, prompt)
        s = sigma.view(-1, 1, 1, 1)
        x_sigma = (1 - s) * x0 + s * eps
        target = world.velocity(x_sigma, sigma, cond_idx).float().to(device)
        v = net.velocity(x_sigma.float().to(device), sigma.float().to(device), {"prompt": cond_idx.to(device)})
        loss = (v - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_fn is not None and (step % cfg.log.interval == 0 or step == steps - 1):
            log_fn({"stage": "base", "step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0]})
    seconds = time.perf_counter() - start
    net.eval()
    if t.base_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors({k: v.detach().cpu() for k, v in net.state_dict().items()}, path,
                         metadata={"recipe": json.dumps(recipe)})
        log.info("cached the toy base network at %s", path)
    return net, {"cached": False, "path": str(path), "seconds": seconds}


def build_world(cfg) -> ToyWorld:
    """The toy world of the config's ``toy`` section (docs/toy.md's pinned construction)."""
    t = cfg.toy
    return ToyWorld.build(num_prompts=t.num_prompts, num_components=t.num_components, latent_shape=t.latent_shape,
                          seed=t.data_seed, min_weight=t.min_weight, std_range=t.std_range)
