"""Evaluation of a real-model run you can look at (docs/training.md §7): every configured reward on the same prompts
and seeds for the base model run for the distilled steps, the stage-1 generator and the stage-2 generator — a
table of mean ± standard error per reward and row, and an image grid (rows = models, one column per prompt).

Images are drawn under the trainer's random-number contract (stream ``eval``), so every row sees the same initial
noise and the same CPS noise for sample i, and scored as the group advantages score them (uint8 images, each
reward's own preprocessing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ..distributed import DistEnv
from ..rollout import generate

ROWS = ("base", "stage1", "stage2")


def reward_table(scores: dict[str, torch.Tensor], names: Sequence[str]) -> dict[str, float]:
    """``{name: mean, name_stderr: standard error}`` of ``scores [N, R]`` per reward (``ddof = 1``; 0 for N = 1)."""
    out: dict[str, float] = {}
    for j, name in enumerate(names):
        col = scores[:, j].double()
        n = col.numel()
        out[name] = float(col.mean())
        out[f"{name}_stderr"] = float(col.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    return out


def format_reward_table(rows: dict[str, dict[str, float]], names: Sequence[str]) -> str:
    """The printed table: one line per row, ``mean ± stderr`` per reward."""
    width = max(len(r) for r in rows) if rows else 5
    head = "model".ljust(width) + "".join(f"  {n:>20}" for n in names)
    lines = [head]
    for row, vals in rows.items():
        cells = "".join(f"  {vals[n]:>11.4f} ± {vals[n + '_stderr']:<6.4f}" for n in names)
        lines.append(row.ljust(width) + cells)
    return "\n".join(lines)


def image_grid(rows: dict[str, torch.Tensor], path: str | Path, *, max_columns: int = 8) -> Path:
    """A PNG with one row of images per model (``[N, 3, H, W]`` in [0, 1], the same prompt and seed per column,
    at most ``max_columns``) and the model's name at the left of its row."""
    from PIL import Image, ImageDraw

    path = Path(path)
    names = list(rows)
    first = rows[names[0]]
    n = min(first.shape[0], max_columns)
    h, w = first.shape[2], first.shape[3]
    label = 8 * max(len(s) for s in names) + 8
    grid = Image.new("RGB", (label + n * w, len(names) * h), "white")
    draw = ImageDraw.Draw(grid)
    for r, name in enumerate(names):
        draw.text((4, r * h + h // 2 - 6), name, fill="black")
        imgs = (rows[name][:n].float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for c, img in enumerate(imgs):
            grid.paste(Image.fromarray(img), (label + c * w, r * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


@torch.no_grad()
def sample_images(generator, prompts: Sequence[str], *, steps: Sequence[int], shift: float, eta: float, seed: int,
                  step: int = 0, batch_size: int = 4, decode_chunk: int = 4,
                  env: DistEnv | None = None) -> torch.Tensor:
    """Decoded images ``[N, 3, H, W]`` (float32, on the generator's device) of ``generator`` for ``prompts``, one
    each: sample i draws global index i of stream ``eval`` at ``step``, whatever the batch size (and, under
    several processes, ``env``, whatever rank samples it)."""
    sigmas = generator.sigmas(steps, shift)
    device = generator.core.device
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        x = generate(generator, chunk, sigmas=sigmas, eta=eta, seed=seed, stream="eval", step=step,
                     indices=range(start, start + len(chunk)), batch_size=len(chunk), device=device, env=env)
        out.append(generator.decode(x.to(device), chunk=decode_chunk).float())
    return torch.cat(out)


def evaluate_rows(models: dict, rewards, prompts: Sequence[str], *, steps: Sequence[int], shift: float, eta: float,
                  seed: int, step: int = 0, batch_size: int = 4, decode_chunk: int = 4, env: DistEnv | None = None
                  ) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """Every model's images of ``prompts`` (same seeds) and their reward table; returns ``(rows, images)`` with the
    images on the CPU."""
    rows, images = {}, {}
    for name, model in models.items():
        imgs = sample_images(model, prompts, steps=steps, shift=shift, eta=eta, seed=seed, step=step,
                             batch_size=batch_size, decode_chunk=decode_chunk, env=env)
        rows[name] = reward_table(rewards.score_all(imgs, list(prompts)).cpu(), rewards.names)
        images[name] = imgs.cpu()
    return rows, images
