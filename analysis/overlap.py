"""Figure 3D / B.6: do two networks order the classes of an example alike?

Average overlap (Webber et al. 2010) between two rankings L1, L2 of the C classes:
AO@k = 1/k sum_{d=1..k} |L1[:d] ∩ L2[:d]| / d, for k = 1..C, averaged over the test examples.
Each model's ranking of an example is its logits sorted high to low (ties by lowest class index).
Control (the paper's dashed lines): before comparing, the examples of each class are permuted
among themselves (seeded), so an example is compared with another image of its class; it shows
how much of the agreement is per-class structure rather than per-image.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from analysis.common import group_pairs, pair_stats, prepare, write_and_log


def positions(logits: np.ndarray) -> np.ndarray:
    """[N, C]: the place (0 = top) of every class in each example's ranking; ties by class index."""
    z = np.asarray(logits)
    n, c = z.shape
    order = np.lexsort((np.broadcast_to(np.arange(c), z.shape), -z.astype(np.float64)), axis=1)
    pos = np.empty_like(order)
    np.put_along_axis(pos, order, np.broadcast_to(np.arange(c), z.shape), axis=1)
    return pos


def average_overlap(pos_a: np.ndarray, pos_b: np.ndarray) -> np.ndarray:
    """[N, C]: AO@k for k = 1..C of every example, from class positions. A class is in both
    top-d lists exactly when the larger of its two positions is below d, so the intersection
    sizes for every d are a cumulative count of those maxima."""
    n, c = pos_a.shape
    deepest = np.maximum(pos_a, pos_b)
    counts = np.bincount((np.arange(n)[:, None] * c + deepest).ravel(), minlength=n * c).reshape(n, c)
    overlap = np.cumsum(counts, axis=1) / np.arange(1, c + 1)
    return np.cumsum(overlap, axis=1) / np.arange(1, c + 1)


def within_class_permutation(labels: np.ndarray, seed: int) -> np.ndarray:
    """A permutation that sends every example to another position of the same class."""
    rng = np.random.default_rng(seed)
    perm = np.arange(len(labels))
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        perm[members] = rng.permutation(members)
    return perm


def curve(logits_a: np.ndarray, logits_b: np.ndarray, perm: np.ndarray | None = None) -> np.ndarray:
    """Mean AO@k over examples (k = 1..C); with `perm`, example i of A meets example perm[i] of B."""
    pos_b = positions(logits_b)
    return average_overlap(positions(logits_a), pos_b if perm is None else pos_b[perm]).mean(0)


def run(
    models: list[str] | None = None,
    groups=None,
    *,
    seed: int = 0,
    out_dir: Path | str = "outputs/overlap",
    data_dir: str | None = None,
    dataset: str | None = None,
    device: str = "auto",
    track: bool = True,
    experiment: str = "robustlogits",
) -> dict:
    """AO@k for every pair and group (mean ± std over pairs), with the within-class permutation
    control for every pair and for each model against itself; one run, the figure, overlap.json."""
    ctx, assigned = prepare(
        models,
        groups,
        minimum=2,
        purpose="an overlap comparison",
        data_dir=data_dir,
        dataset=dataset,
        device=device,
        experiment=experiment,
        track=track,
    )
    y = ctx.y
    perm = within_class_permutation(y, seed)
    pos = [positions(m.logits) for m in ctx.logits()]
    labels = ctx.labels
    pairs, control = {}, {}
    for i, j in itertools.combinations(range(len(pos)), 2):
        pairs[(labels[i], labels[j])] = average_overlap(pos[i], pos[j]).mean(0)
        control[(labels[i], labels[j])] = average_overlap(pos[i], pos[j][perm]).mean(0)
    self_control = {labels[i]: average_overlap(pos[i], pos[i][perm]).mean(0).tolist() for i in range(len(pos))}
    grouped = {}
    for name, members in group_pairs(assigned).items():
        grouped[name] = {
            "same_example": pair_stats(pairs, members),
            "permuted_within_class": pair_stats(control, members),
        }
    for name, members in assigned.items():  # a group against its own permuted outputs
        arr = np.asarray([self_control[m] for m in members])
        grouped.setdefault(f"{name} self", {})["permuted_within_class"] = {
            "n_pairs": len(members),
            "mean": arr.mean(0).tolist(),
            "std": arr.std(0).tolist(),
            "pairs": [[m, m] for m in members],
        }
    c = len(ctx.classes)
    summary = {
        "analysis": "overlap",
        "dataset": ctx.dataset,
        "classes": list(ctx.classes),
        "k": list(range(1, c + 1)),
        "n_images": int(len(pos[0])),
        "models": labels,
        "groups": assigned,
        "seed": seed,
        "logit_sources": {m.label: {"source": m.source, "run_id": m.run_id} for m in ctx.logits()},
        "pairs": {f"{a} | {b}": v.tolist() for (a, b), v in pairs.items()},
        "pairs_permuted_within_class": {f"{a} | {b}": v.tolist() for (a, b), v in control.items()},
        "self_permuted_within_class": self_control,
        "group_curves": grouped,
    }
    metrics = {}
    for name, entry in grouped.items():
        for kind, stats in entry.items():
            for k in sorted({1, 2, 3, 5, c}):
                metrics[f"{name}.{kind}.AO@{k}"] = stats["mean"][k - 1]
    figures = {"figure3d_average_overlap.png": figure(summary)}
    return write_and_log(
        "overlap", ctx, Path(out_dir), summary, figures, {"seed": seed, "groups": assigned}, metrics, track
    )


def figure(summary: dict):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    k = np.asarray(summary["k"])
    colours = {}
    for name, entry in summary["group_curves"].items():
        base = name.replace(" self", "")
        halves = base.split("-")
        base = (
            halves[0] if len(halves) == 2 and halves[0] == halves[1] else base
        )  # "ST-ST" and "ST self" share a colour
        colour = colours.setdefault(base, f"C{len(colours)}")
        for kind, style in (("same_example", "-"), ("permuted_within_class", "--")):
            if kind not in entry:
                continue
            mean, std = np.asarray(entry[kind]["mean"]), np.asarray(entry[kind]["std"])
            tag = name + ("" if kind == "same_example" else " (permuted in class)")
            ax.plot(k, mean, style, color=colour, marker="o" if " self" not in name else None, ms=3, label=tag)
            ax.fill_between(k, mean - std, mean + std, color=colour, alpha=0.15)
    ax.set_xlabel("k")
    ax.set_ylabel("AO@k (mean ± std over pairs)")
    ax.set_ylim(0, 1.02)
    ax.set_title("D: average overlap of logit rank orders")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
