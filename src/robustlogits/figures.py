"""Figures people would rather look at than read: logit-distribution evolution (Figures 1, B.1)."""

from __future__ import annotations

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

QUANTITY_LABEL = {"max_logit": "max logit", "gap": "logit gap (top-1 minus top-2)"}


def evolution_figure(histograms: dict[int, dict], quantity: str, title: str = ""):
    """Per-split heatmaps: epoch on x, value on y, colour = fraction of examples, plus the mean.

    `histograms` maps epoch -> {split: {quantity: {edges, counts, ...}}} as logged each epoch.
    """
    epochs = sorted(histograms)
    splits = list(histograms[epochs[0]])
    edges = np.asarray(histograms[epochs[0]][splits[0]][quantity]["edges"])
    fractions = {}
    for split in splits:
        counts = np.array([histograms[e][split][quantity]["counts"] for e in epochs], dtype=float)
        fractions[split] = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    lo, hi = _shown_bins(np.concatenate(list(fractions.values())))
    centres = (edges[:-1] + edges[1:]) / 2
    x_edges = np.r_[epochs[0] - 0.5, np.asarray(epochs, dtype=float) + 0.5]
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4), squeeze=False, sharey=True)
    for ax, split in zip(axes[0], splits):
        frac = fractions[split]
        mesh = ax.pcolormesh(x_edges, edges[lo:hi + 1], frac[:, lo:hi].T, cmap="magma", shading="flat")
        ax.plot(epochs, (frac * centres).sum(1), color="cyan", lw=1.5, label="mean (binned)")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(split)
        ax.legend(loc="upper left", fontsize=8)
        fig.colorbar(mesh, ax=ax, label="fraction of examples")
    axes[0][0].set_ylabel(QUANTITY_LABEL.get(quantity, quantity))
    fig.suptitle(title or f"Evolution of the {QUANTITY_LABEL.get(quantity, quantity)} distribution")
    fig.tight_layout()
    return fig


def _shown_bins(fractions: np.ndarray, mass: float = 0.995) -> tuple[int, int]:
    """Bin range holding `mass` of every epoch's distribution: the axes zoom to where data is."""
    occupied = np.flatnonzero(fractions.sum(0) > 0)
    if not len(occupied):
        return 0, fractions.shape[1]
    upper = max(int(np.searchsorted(np.cumsum(row), mass * row.sum())) for row in fractions if row.sum() > 0)
    return int(occupied.min()), max(upper + 1, int(occupied.min()) + 2)
