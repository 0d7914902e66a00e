"""Peak memory and time of one stage-2 sub-batch of SD3.5-M at 512 px, bf16, random weights.

One RTDMD epoch cut to one sub-batch through the trainer's own code (``rtdmd.stages.rtdmd.Stage2.epoch``): the
rollout of ``--samples`` images (4 CPS steps + VAE decode + reward), the fake-score step on them, and one policy
sub-batch (PPO at the SubGRPO steps, and at the last step the AC-DMD aux + reward back-propagation sharing one
forward, then AdamW). The transformer is built from ``bench/configs/sd35_medium_transformer.json`` (the published
SD3.5-M config, 2.24 B parameters), the VAE from SD3's published VAE config, the reward is a CLIP ViT-L/14 image
tower (random weights) scored against a fixed text direction, and the text conditioning is random embeddings of
SD3.5's shapes (``[B, 205, 4096]``, ``[B, 2048]``) — the text encoders take no part in training memory.

Settings: ``ours`` (block checkpointing in the fake score, checkpointed chunked VAE decode in reward BP) and
``reference`` (neither, as the reference). Each runs in a fresh process so the peaks are clean.

    python bench/sd35m_stage2_substep.py                 # both settings, CUDA, prints a table, --json FILE
    python bench/sd35m_stage2_substep.py --tiny          # CPU dry run at a scaled-down size (minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
               layers_per_block=2, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
               use_post_quant_conv=False)
CLIP_L_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     patch_size=14, image_size=224, projection_dim=768)
SETTINGS = {"ours": {"fake_gradient_checkpointing": True, "vae_checkpointing": True},
            "reference": {"fake_gradient_checkpointing": False, "vae_checkpointing": False}}


def build(tiny: bool, device: torch.device, dtype: torch.dtype):
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from rtdmd.models.diffusion import SD3Core

    tcfg = json.loads((ROOT / "bench" / "configs" / "sd35_medium_transformer.json").read_text())
    tcfg = {k: v for k, v in tcfg.items() if not k.startswith("_")}
    vcfg = dict(SD3_VAE)
    if tiny:  # same code path, a size a CPU runs in minutes
        tcfg.update(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                    caption_projection_dim=32, pooled_projection_dim=32, dual_attention_layers=[0])
        vcfg.update(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4)
    torch.manual_seed(0)
    with torch.device(device):
        transformer = SD3Transformer2DModel.from_config(tcfg).to(dtype)
        vae = AutoencoderKL(**vcfg).to(dtype)
    text_dim, pooled_dim = tcfg["joint_attention_dim"], tcfg["pooled_projection_dim"]

    class BenchCore(SD3Core):
        def _encode(self, prompts):
            g = torch.Generator().manual_seed(len(prompts))
            n = len(prompts)
            return {"prompt_embeds": torch.randn(n, 205, text_dim, generator=g).to(device, dtype),
                    "pooled": torch.randn(n, pooled_dim, generator=g).to(device, dtype)}

    pipe = SimpleNamespace(vae=vae, transformer=transformer)
    return BenchCore(pipe, resolution=64 if tiny else 512, dtype=dtype, device=device, text_length=128)


class CLIPImageReward:
    """A CLIP ViT-L/14 image tower (random weights, fp32 as the reference's reward models) against a fixed text
    direction: the image-side memory of CLIPScore's back-propagation without a tokenizer."""

    def __init__(self, tiny: bool, device):
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        from rtdmd.rewards.base import Reward

        cfg = dict(CLIP_L_VISION)
        if tiny:
            cfg.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       projection_dim=16, image_size=32, patch_size=8)
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg)).to(device).eval().requires_grad_(False)
        direction = torch.nn.functional.normalize(torch.randn(cfg["projection_dim"], device=device), dim=0)
        size = cfg["image_size"]

        class _R(Reward):
            name, differentiable = "clip_image", True

            def score(self, samples, prompts):
                x = torch.nn.functional.interpolate(samples, size=(size, size), mode="bilinear", antialias=True)
                emb = torch.nn.functional.normalize(model(pixel_values=x).image_embeds, dim=-1)
                return emb @ direction

        self.reward = _R()


def run_one(setting: str, tiny: bool, samples: int) -> dict:
    from rtdmd.config import load_config
    from rtdmd.distributed import DistEnv
    from rtdmd.models.diffusion import stage1_models, stage2_models
    from rtdmd.rewards.base import RewardMixture, WeightedReward
    from rtdmd.stages import Stage2, init_state

    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    dtype = torch.bfloat16
    core = build(tiny, device, dtype)
    over = [f"stage2.{k}={str(v).lower()}" for k, v in SETTINGS[setting].items()]
    over += ["model.path=/unused", "data.train_prompts=/unused.txt", f"stage2.group_size={samples}",
             "stage2.prompts_per_epoch=1",
             "stage2.sampling_batches=1", "stage2.num_batches=1", f"stage2.sample_batch_size={samples}",
             f"stage2.fake_batch_size={min(samples, 8)}", "stage2.bp_batch_size=0", "model.lora_rank=32",
             "model.lora_alpha=64", "ac_dmd.teacher_guidance=4.5", "device=cpu"]
    cfg = load_config("sd35m", overrides=over)
    gen1, fake1, _ = stage1_models(core, cfg)  # stage 1's (fresh) adapters stand in for a trained stage 1
    s1 = {"generator_ema": gen1.state_dict(), "fake_score": fake1.state_dict()}
    generator, fake, teacher = stage2_models(core, cfg, s1)
    state = init_state(2, generator, fake, cfg)
    rewards = RewardMixture({"clip": WeightedReward(CLIPImageReward(tiny, device).reward, 1.0, backprop=True)})
    loop = Stage2(state, teacher, ["a photo"], rewards, cfg, DistEnv(device=device))
    cuda = device.type == "cuda"
    loop.epoch(0)  # warm-up: allocator, autotuning, lazy inits
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    stats = loop.epoch(1)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    n_base = sum(p.numel() for k, p in core.base.module.named_parameters() if "lora_" not in k)
    n_lora = sum(p.numel() for k, p in core.base.module.named_parameters() if "lora_" in k)
    return {"setting": setting, "device": torch.cuda.get_device_name() if cuda else "cpu", "tiny": tiny,
            "samples": samples, "seconds": round(seconds, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
            "base_params": n_base, "lora_params": n_lora,
            "finite": all(bool(torch.isfinite(v)) for v in stats.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default=None, help="run one setting in this process")
    p.add_argument("--samples", type=int, default=9, help="images in the sub-batch (the reference: 9)")
    p.add_argument("--tiny", action="store_true", help="scaled-down sizes (CPU dry run)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.setting is not None:
        print(json.dumps(run_one(args.setting, args.tiny, args.samples)))
        return 0
    rows = []
    for setting in SETTINGS:  # a fresh process each: clean peaks
        cmd = [sys.executable, __file__, "--setting", setting, "--samples", str(args.samples)] + (
            ["--tiny"] if args.tiny else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if out.returncode:
            rows.append({"setting": setting, "error": (out.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'setting':<10} {'device':<28} {'samples':>7} {'seconds':>8} {'peak GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['setting']:<10} error: {r['error']}")
        else:
            peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
            print(f"{r['setting']:<10} {r['device']:<28} {r['samples']:>7} {r['seconds']:>8.2f} {peak:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
