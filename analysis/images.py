"""Figures B.2 and B.3: which images the networks are confident about, and which images they
place close together.

B.2 (confidence quadrants): for one class, model B's confidence against model A's per example
(the same confidence as the rank analysis), split at each model's median into four quadrants,
with the most typical images of each quadrant (farthest from both medians) as a grid.
B.3 (logit neighbours): for seed images from several classes, the test images nearest by cosine
similarity of the logits (the seed itself excluded), one row per seed and a block per model. As a
number behind it: over many random seeds, the fraction of neighbours that share the seed's class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from analysis.common import default_class, default_pair, prepare, write_and_log
from analysis.ranks import SCORES, confidence
from robustlogits.core.errors import UserError

QUADRANTS = ("A high, B high", "A low, B high", "A high, B low", "A low, B low")


def quadrants(conf_a: np.ndarray, conf_b: np.ndarray, per_quadrant: int) -> dict[str, dict]:
    """Per quadrant (split at the medians): member positions and the `per_quadrant` most extreme."""
    ma, mb = np.median(conf_a), np.median(conf_b)
    high_a, high_b = conf_a > ma, conf_b > mb
    ra = (conf_a - ma) / (conf_a.std() or 1.0)
    rb = (conf_b - mb) / (conf_b.std() or 1.0)
    out = {}
    for name, mask in zip(QUADRANTS, (high_a & high_b, ~high_a & high_b, high_a & ~high_b, ~high_a & ~high_b)):
        members = np.flatnonzero(mask)
        extremity = np.minimum(np.abs(ra[members]), np.abs(rb[members]))
        shown = members[np.lexsort((members, -extremity))][:per_quadrant]
        out[name] = {"members": members, "shown": shown}
    return out


def nearest_by_cosine(
    logits: np.ndarray, seeds: np.ndarray, k: int, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """([S, k] indices, [S, k] cosine similarities) of each seed's k nearest other examples;
    ties by lowest index."""
    z = np.asarray(logits, dtype=np.float64)
    unit = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    idx_out, sim_out = [], []
    for start in range(0, len(seeds), chunk):
        s = seeds[start : start + chunk]
        sim = unit[s] @ unit.T
        sim[np.arange(len(s)), s] = -np.inf
        top = np.argpartition(-sim, k, axis=1)[:, : k + 1] if k < sim.shape[1] - 1 else np.argsort(-sim, axis=1)
        top_sim = np.take_along_axis(sim, top, 1)
        order = np.lexsort((top, -top_sim), axis=1)[:, :k]
        idx = np.take_along_axis(top, order, 1)
        idx_out.append(idx)
        sim_out.append(np.take_along_axis(sim, idx, 1))
    return np.concatenate(idx_out), np.concatenate(sim_out)


def seed_images(labels: np.ndarray, classes: list[int], per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes])


def run(
    models: list[str] | None = None,
    groups=None,
    *,
    class_name: str | None = None,
    score: str = "softmax",
    per_quadrant: int = 16,
    seed_classes: list[str] | None = None,
    n_neighbours: int = 5,
    n_random_seeds: int = 1000,
    seed: int = 0,
    out_dir: Path | str = "outputs/images",
    data_dir: str | None = None,
    dataset: str | None = None,
    device: str = "auto",
    track: bool = True,
    experiment: str = "robustlogits",
) -> dict:
    """B.2 for the first two models of different groups (ST, AT) and B.3 for every model."""
    if score not in SCORES:
        raise UserError(f"unknown score {score!r}; choose {' or '.join(SCORES)}")
    if per_quadrant < 1 or n_neighbours < 1 or n_random_seeds < 0:
        raise UserError("per-quadrant and n-neighbours must be >= 1, n-random-seeds >= 0")

    def check(ctx):
        ctx.class_index(class_name or default_class(ctx))
        for name in seed_classes or []:
            ctx.class_index(name)
        if n_neighbours >= len(ctx.y):
            raise UserError(f"n-neighbours must be below the {len(ctx.y)} test images")

    ctx, assigned = prepare(
        models,
        groups,
        minimum=2,
        purpose="the image comparison",
        data_dir=data_dir,
        dataset=dataset,
        device=device,
        experiment=experiment,
        track=track,
        check=check,
    )
    y = ctx.y
    focus = ctx.class_index(class_name or default_class(ctx))
    a, b = default_pair(ctx, assigned)
    logits = [m.logits for m in ctx.logits()]
    members = np.flatnonzero(y == focus)
    conf_a = confidence(logits[a][members], y[members], score)
    conf_b = confidence(logits[b][members], y[members], score)
    quads = quadrants(conf_a, conf_b, per_quadrant)
    seed_cls = [ctx.class_index(n) for n in seed_classes] if seed_classes else list(range(min(5, len(ctx.classes))))
    seeds = seed_images(y, seed_cls, 1, seed)
    neighbours = {}
    rng = np.random.default_rng(seed + 1)
    random_seeds = rng.choice(len(y), min(n_random_seeds, len(y)), replace=False)
    for label, z in zip(ctx.labels, logits):
        idx, sim = nearest_by_cosine(z, seeds, n_neighbours)
        entry = {
            "seed_index": ctx.indices[seeds].tolist(),
            "neighbour_index": ctx.indices[idx].tolist(),
            "cosine": sim.tolist(),
            "neighbour_label": y[idx].tolist(),
        }
        if len(random_seeds):
            ridx, _ = nearest_by_cosine(z, random_seeds, n_neighbours)
            entry["same_class_fraction"] = float((y[ridx] == y[random_seeds][:, None]).mean())
        neighbours[label] = entry
    quad_summary = {
        name: {"n": int(len(q["members"])), "test_index": ctx.indices[members[q["shown"]]].tolist()}
        for name, q in quads.items()
    }
    summary = {
        "analysis": "images",
        "dataset": ctx.dataset,
        "classes": list(ctx.classes),
        "score": score,
        "models": ctx.labels,
        "groups": assigned,
        "quadrants": {
            "class": ctx.classes[focus],
            "model_a": ctx.labels[a],
            "model_b": ctx.labels[b],
            "median_a": float(np.median(conf_a)),
            "median_b": float(np.median(conf_b)),
            "test_index": ctx.indices[members].tolist(),
            "confidence_a": conf_a.tolist(),
            "confidence_b": conf_b.tolist(),
            "spearman": float(np.corrcoef(np.argsort(np.argsort(conf_a)), np.argsort(np.argsort(conf_b)))[0, 1]),
            "quadrants": quad_summary,
        },
        "neighbours": {
            "n_neighbours": n_neighbours,
            "n_random_seeds": int(len(random_seeds)),
            "seed": seed,
            "models": neighbours,
        },
    }
    images = ctx.test.images.cpu().numpy()
    figures = {
        "figure_b2_confidence_quadrants.png": figure_quadrants(
            summary["quadrants"], images, members, quads, conf_a, conf_b
        ),
        "figure_b3_logit_neighbours.png": figure_neighbours(summary["neighbours"], images, seeds, ctx),
    }
    metrics = {
        f"{label}.neighbours_same_class": e["same_class_fraction"]
        for label, e in neighbours.items()
        if "same_class_fraction" in e
    }
    metrics["quadrants.spearman"] = summary["quadrants"]["spearman"]
    params = {
        "class": ctx.classes[focus],
        "score": score,
        "per_quadrant": per_quadrant,
        "seed_classes": [ctx.classes[c] for c in seed_cls],
        "n_neighbours": n_neighbours,
        "n_random_seeds": n_random_seeds,
        "seed": seed,
    }
    return write_and_log("images", ctx, Path(out_dir), summary, figures, params, metrics, track)


def _tile(images: np.ndarray, cols: int) -> np.ndarray:
    """[n, 3, H, W] uint8 -> one [rows*H, cols*W, 3] image with 1-pixel white gutters."""
    n, _, h, w = images.shape
    rows = max(1, -(-n // cols))
    canvas = np.full((rows * (h + 1), cols * (w + 1), 3), 255, np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = img.transpose(1, 2, 0)
    return canvas


def figure_quadrants(info: dict, images: np.ndarray, members: np.ndarray, quads: dict, conf_a, conf_b):
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 6))
    grid = fig.add_gridspec(2, 3, width_ratios=[1.3, 1, 1])
    ax = fig.add_subplot(grid[:, 0])
    ax.scatter(conf_a, conf_b, s=5, c="0.4", lw=0)
    ax.axvline(info["median_a"], color="k", lw=0.8)
    ax.axhline(info["median_b"], color="k", lw=0.8)
    ax.set_xlabel(f"confidence, A = {info['model_a']}")
    ax.set_ylabel(f"confidence, B = {info['model_b']}")
    ax.set_title(f"class '{info['class']}' (Spearman {info['spearman']:.2f})")
    place = {QUADRANTS[0]: (0, 2), QUADRANTS[1]: (0, 1), QUADRANTS[2]: (1, 2), QUADRANTS[3]: (1, 1)}
    for name, (r, c) in place.items():
        sub = fig.add_subplot(grid[r, c])
        shown = members[quads[name]["shown"]]
        if len(shown):
            sub.imshow(_tile(images[shown], 4), interpolation="nearest")
        sub.set_title(f"{name} ({len(quads[name]['members'])})", fontsize=8)
        sub.axis("off")
    fig.tight_layout()
    return fig


def figure_neighbours(info: dict, images: np.ndarray, seeds: np.ndarray, ctx):
    import matplotlib.pyplot as plt

    labels = list(info["models"])
    k = info["n_neighbours"]
    pos_of = {int(t): p for p, t in enumerate(ctx.indices)}
    fig, axes = plt.subplots(
        1,
        1 + len(labels),
        figsize=(1.2 + 1.1 * k * len(labels), 0.9 * len(seeds) + 0.8),
        gridspec_kw={"width_ratios": [1] + [k] * len(labels)},
    )
    axes[0].imshow(_tile(images[seeds], 1), interpolation="nearest")
    axes[0].set_title("seed", fontsize=8)
    axes[0].axis("off")
    for ax, label in zip(axes[1:], labels):
        idx = np.asarray([[pos_of[int(t)] for t in row] for row in info["models"][label]["neighbour_index"]])
        ax.imshow(_tile(images[idx.ravel()], k), interpolation="nearest")
        frac = info["models"][label].get("same_class_fraction")
        ax.set_title(label + (f"\nsame class: {frac:.0%}" if frac is not None else ""), fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig
