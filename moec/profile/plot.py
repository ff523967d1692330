"""Plots of routing statistics (layer × expert frequency heatmap)."""

from __future__ import annotations

import os

import numpy as np

from moec.core.io import ensure_writable_dir
from moec.profile.stats import ExpertStats


def frequency_heatmap(stats: ExpertStats, path: str | os.PathLike) -> None:
    """Write a PNG heatmap of activation frequency, never-activated experts marked with x."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ensure_writable_dir(path)
    layers = sorted(stats.layers)
    freq = np.stack([stats.frequency(l) for l in layers])
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * stats.num_experts + 2), max(2.5, 0.5 * len(layers) + 1.5)))
    im = ax.imshow(freq, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    if stats.num_experts <= 32:
        ax.set_xticks(range(stats.num_experts))
        for (r, c), v in np.ndenumerate(freq):
            ax.text(c, r, "x" if v == 0 else f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v < freq.max() * 0.6 else "black")
    fig.colorbar(im, ax=ax, label="fraction of tokens routed")
    ax.set_title(f"expert activation frequency ({stats.tokens} tokens, top-{stats.top_k})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
