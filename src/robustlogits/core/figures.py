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
        mesh = ax.pcolormesh(x_edges, edges[lo : hi + 1], frac[:, lo:hi].T, cmap="magma", shading="flat")
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


class EpochHistograms:
    """One image per epoch (max logit over gap, each split overlaid) for MLflow's step slider.

    The run page's image panel shows MLflow's thumbnail (at most 256 px a side) in a square box, and
    the full image only when clicked: the figure is square, its two panels stacked, and its type
    large, so the thumbnail reads as it is; the full image is 600x600 px.

    The figure and its artists are built once and only their data changes each epoch: redrawing
    a 2-panel figure this way costs milliseconds, not the ~100 ms of a fresh matplotlib figure.
    """

    def __init__(self, title: str, splits: list[str], dpi: int = 120):
        self.fig, self.axes = plt.subplots(2, 1, figsize=(5, 5), dpi=dpi)
        self.title = title
        self.artists: dict[tuple[str, str], object] = {}
        self.splits = splits
        for ax, quantity in zip(self.axes, ("max_logit", "gap")):
            ax.set_xlabel(QUANTITY_LABEL[quantity].split(" (")[0], fontsize=14, labelpad=1)
            ax.set_ylabel("fraction", fontsize=13)
            ax.tick_params(labelsize=12)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
            ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(3))
            for split in splits:
                self.artists[quantity, split] = ax.stairs([0.0], [0.0, 1.0], label=split, fill=False, lw=2.5)
            ax.legend(loc="upper right", fontsize=12, frameon=False, handlelength=1.2)
        self.suptitle = self.fig.suptitle(title, fontsize=13)
        self.fig.subplots_adjust(left=0.17, right=0.97, bottom=0.1, top=0.86, hspace=0.5)

    def render(self, epoch: int, histograms: dict) -> np.ndarray:
        """RGB uint8 array of `histograms` ({split: {quantity: {edges, counts}}}) for one epoch."""
        for ax, quantity in zip(self.axes, ("max_logit", "gap")):
            fractions = {s: np.asarray(histograms[s][quantity]["counts"], float) for s in self.splits}
            fractions = {s: c / max(c.sum(), 1) for s, c in fractions.items()}
            edges = np.asarray(histograms[self.splits[0]][quantity]["edges"])
            lo, hi = _shown_bins(np.stack(list(fractions.values())))
            for split in self.splits:
                self.artists[quantity, split].set_data(fractions[split], edges)
            ax.set_xlim(edges[lo], edges[hi])
            ax.set_ylim(0, 1.05 * max(float(f.max()) for f in fractions.values()) or 1)
        self.suptitle.set_text(f"epoch {epoch}\n{self.title}")
        self.fig.canvas.draw()
        return np.asarray(self.fig.canvas.buffer_rgba())[..., :3].copy()

    def close(self) -> None:
        plt.close(self.fig)
