"""``samples.png`` of a toy run: one row per model (teacher, base 4-step, stage 1, stage 2).

Columns: per prompt, the samples projected on the plane of that prompt's component means (where the
modes separate), coloured by nearest component with the means marked; last, the histogram of the
linear reward ⟨a_p, x⟩ over all prompts (the reward direction is orthogonal to the means, so the
tilt shows there), with the row's mean (red) against the first row's (dashed).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .models.toy_world import ToyWorld

MAX_POINTS = 600  # per panel: enough to see the modes, few enough to keep the file small


def _mean_plane(world: ToyWorld, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    mu = world.means[p]
    center = mu.mean(0)
    _, _, vh = torch.linalg.svd(mu - center, full_matrices=False)
    return center, vh[:2]  # the two axes spanning the means' affine plane


def plot_toy_rows(world: ToyWorld, prompt_idx: torch.Tensor, rows: dict[str, torch.Tensor], path: str | Path,
                  max_prompts: int = 4) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx_all = torch.as_tensor(prompt_idx).long()
    prompts = sorted(set(idx_all.tolist()))[:max_prompts]  # the prompts that have samples
    ncols = len(prompts) + 1
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.6 * ncols, 2.4 * len(rows)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rewards = {name: world.linear_reward(x.double().cpu(), idx_all) for name, x in rows.items()}
    first_mean = next(iter(rewards.values())).mean()
    lo = min(float(r.min()) for r in rewards.values())
    hi = max(float(r.max()) for r in rewards.values())
    for r, (name, x) in enumerate(rows.items()):
        xf = x.reshape(x.shape[0], -1).double().cpu()
        for c, p in enumerate(prompts):
            ax = axes[r][c]
            sel = (idx_all == p).nonzero().squeeze(1)[:MAX_POINTS]
            center, axes2 = _mean_plane(world, p)
            xy = (xf[sel] - center) @ axes2.T
            comp = world.nearest_component(xf[sel], idx_all[sel])
            ax.scatter(xy[:, 0], xy[:, 1], s=2, alpha=0.5, c=[colors[int(k) % len(colors)] for k in comp])
            m = (world.means[p] - center) @ axes2.T
            ax.scatter(m[:, 0], m[:, 1], marker="x", c="k", s=30)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"toy prompt {p}", fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=10)
        ax = axes[r][-1]
        ax.hist(rewards[name].numpy(), bins=60, range=(lo, hi), color="tab:gray")
        ax.axvline(float(rewards[name].mean()), color="tab:red", lw=1.5)  # this row's mean reward ...
        ax.axvline(float(first_mean), color="k", lw=1, ls="--")  # ... against the first row's (the teacher)
        ax.set_yticks([])
        if r == 0:
            ax.set_title("reward ⟨a_p, x⟩ →", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
