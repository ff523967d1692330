"""Search plots: Pareto view of visited plans (accuracy loss vs latency, coloured by memory) and chosen bits vs frequency."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from moec.core.io import atomic_write_bytes
from moec.search.problem import SearchProblem


def _save(fig, path: str | os.PathLike) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Mask of the points no other point beats in every column (all minimised)."""
    keep = np.ones(len(points), dtype=bool)
    for i, p in enumerate(points):
        dominated = np.all(points <= p, axis=1) & np.any(points < p, axis=1)
        keep[i] = not dominated.any()
    return keep


def pareto_plot(visited: list[dict], chosen: dict, path: str | os.PathLike, title: str = "") -> Path:
    """Weighted accuracy loss vs latency of every visited plan, colour = weight MB; front and choice marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    feas = [v for v in visited if v["feasible"]] or visited
    lat = np.array([v["latency_s"] * 1e3 for v in feas])
    acc = np.array([v["accuracy"] for v in feas])
    mem = np.array([v["memory_bytes"] / 1e6 for v in feas])
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    sc = ax.scatter(lat, acc, c=mem, s=10, cmap="viridis", alpha=0.7)
    front = pareto_front(np.stack([lat, acc, mem], axis=1))
    order = np.argsort(lat[front])
    ax.plot(lat[front][order], acc[front][order], "k.", ms=4, label="Pareto front (latency, loss, memory)")
    ax.scatter([chosen["latency_s"] * 1e3], [chosen["accuracy"]], marker="*", s=220, c="red", label="chosen plan")
    fig.colorbar(sc, ax=ax, label="weight memory (MB)")
    ax.set_xlabel(f"latency per decode step (ms, {chosen['label']})")
    ax.set_ylabel("weighted accuracy loss Σ w·ΔNLL")
    ax.set_title(title or f"{len(feas)} plans visited")
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def bits_frequency_plot(problem: SearchProblem, assign: np.ndarray, path: str | os.PathLike,
                        title: str = "") -> Path:
    """Chosen bit-width of every expert against its activation frequency (one colour per layer)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = problem.bits_of(assign)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    jitter = (np.random.default_rng(0).random(problem.n) - 0.5) * 0.3
    for li, layer in enumerate(problem.layers):
        sel = problem.layer_index == li
        ax.scatter(problem.frequency[sel], bits[sel] + jitter[sel], label=f"layer {layer}", s=24, alpha=0.8)
    ax.set_yticks(list(problem.bits))
    ax.set_xlabel("activation frequency (fraction of tokens routed)")
    ax.set_ylabel("bits")
    ax.set_title(title or "chosen bits per expert")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)
