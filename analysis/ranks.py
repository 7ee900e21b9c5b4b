"""Figure 3A/B: do two networks find the same images of a class easy?

Within each class of the test split, examples are ranked by each model's confidence (the
softmax probability of the true class, as the paper ranks softmax values; `score="logit"` ranks
the true-class logit instead; `target="top"` uses the predicted class's value). Ranks run 1..n_c,
highest confidence first, ties broken by test-set position so the order is deterministic. Two
models "rank an example far apart" when their ranks differ by more than half the class's
maximum rank (n_c / 2). The paper: 11.8% of examples for AT vs ST, 1.1% for AT vs AT.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from analysis.common import default_class, default_pair, group_pairs, pair_stats, prepare, write_and_log
from robustlogits.core.errors import UserError

SCORES = ("softmax", "logit")
TARGETS = ("label", "top")
PAPER = {"AT-ST": 0.118, "AT-AT": 0.011}


def confidence(logits: np.ndarray, labels: np.ndarray, score: str = "softmax", target: str = "label") -> np.ndarray:
    """Per example: the softmax probability (or logit) of the true (or predicted) class."""
    z = np.asarray(logits, dtype=np.float64)
    cls = labels if target == "label" else z.argmax(1)
    if score == "logit":
        return z[np.arange(len(z)), cls]
    shifted = z - z.max(1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return np.exp(log_p[np.arange(len(z)), cls])


def class_ranks(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Rank 1..n_c of every example within its class, largest value first; ties by position."""
    n = len(values)
    order = np.lexsort((np.arange(n), -np.asarray(values, dtype=np.float64), labels))
    sorted_labels = labels[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_labels)) + 1]
    first_of_group = np.repeat(starts, np.diff(np.r_[starts, n]))
    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = np.arange(n) - first_of_group + 1
    return ranks


def far_apart(ranks_a: np.ndarray, ranks_b: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Examples whose two ranks differ by more than half their class's maximum rank."""
    counts = np.bincount(labels, minlength=num_classes)
    return np.abs(ranks_a - ranks_b) > counts[labels] / 2


def disagreement(
    ranks_a: np.ndarray, ranks_b: np.ndarray, labels: np.ndarray, num_classes: int
) -> tuple[float, np.ndarray]:
    """(mean over classes, per-class fraction) of examples ranked far apart."""
    far = far_apart(ranks_a, ranks_b, labels, num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    per_class = np.bincount(labels, weights=far.astype(float), minlength=num_classes) / np.maximum(counts, 1)
    present = counts > 0
    return float(per_class[present].mean()), per_class


def rank_matrix(
    logits: list[np.ndarray], labels: np.ndarray, num_classes: int, score: str = "softmax", target: str = "label"
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(pairwise mean disagreement [M, M], per-class disagreement [M, M, C], per-model ranks)."""
    ranks = [class_ranks(confidence(z, labels, score, target), labels) for z in logits]
    m = len(ranks)
    matrix = np.zeros((m, m))
    per_class = np.zeros((m, m, num_classes))
    for i, j in itertools.combinations(range(m), 2):
        matrix[i, j], per_class[i, j] = disagreement(ranks[i], ranks[j], labels, num_classes)
        matrix[j, i], per_class[j, i] = matrix[i, j], per_class[i, j]
    return matrix, per_class, ranks


def run(
    models: list[str] | None = None,
    groups=None,
    *,
    class_name: str | None = None,
    score: str = "softmax",
    target: str = "label",
    out_dir: Path | str = "outputs/ranks",
    data_dir: str | None = None,
    dataset: str | None = None,
    device: str = "auto",
    track: bool = True,
    experiment: str = "robustlogits",
) -> dict:
    """Figure 3A (one class, two models) and 3B (every pair, group means): one run, figures, ranks.json.

    `models`: registry names / URIs; `groups`: {"ST": [...], "AT": [...]} or ["ST=a,b", ...].
    Returns every number behind the figures plus `run_id`.
    """
    if score not in SCORES:
        raise UserError(f"unknown score {score!r}; choose {' or '.join(SCORES)}")
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}; choose {' or '.join(TARGETS)}")
    ctx, assigned = prepare(
        models,
        groups,
        minimum=2,
        purpose="a rank comparison",
        data_dir=data_dir,
        dataset=dataset,
        device=device,
        experiment=experiment,
        track=track,
        check=lambda c: c.class_index(class_name or default_class(c)),
    )
    focus = ctx.class_index(class_name or default_class(ctx))
    y, c = ctx.y, len(ctx.classes)
    logits = [m.logits for m in ctx.logits()]
    matrix, per_class, ranks = rank_matrix(logits, y, c, score, target)
    values = {(a, b): matrix[i, j] for (i, a), (j, b) in itertools.product(enumerate(ctx.labels), repeat=2)}
    group_stats = {name: pair_stats(values, pairs) for name, pairs in group_pairs(assigned).items()}
    i, j = default_pair(ctx, assigned)
    members = np.flatnonzero(y == focus)
    far = far_apart(ranks[i], ranks[j], y, c)[members]
    summary = {
        "analysis": "ranks",
        "dataset": ctx.dataset,
        "classes": list(ctx.classes),
        "score": score,
        "target": target,
        "threshold": "|rank difference| > n_c / 2",
        "n_images": int(len(y)),
        "models": ctx.labels,
        "logit_sources": {m.label: {"source": m.source, "run_id": m.run_id} for m in ctx.logits()},
        "groups": assigned,
        "matrix": matrix.tolist(),
        "per_class": {
            f"{ctx.labels[a]} | {ctx.labels[b]}": per_class[a, b].tolist()
            for a, b in itertools.combinations(range(len(ranks)), 2)
        },
        "group_stats": group_stats,
        "paper": PAPER,
        "focus": {
            "class": ctx.classes[focus],
            "models": [ctx.labels[i], ctx.labels[j]],
            "test_index": ctx.indices[members].tolist(),
            "rank_x": ranks[i][members].tolist(),
            "rank_y": ranks[j][members].tolist(),
            "far_apart": far.tolist(),
            "fraction_far_apart": float(far.mean()) if len(far) else None,
        },
    }
    figures = {
        "figure3a_rank_scatter.png": figure_a(summary["focus"]),
        "figure3b_rank_disagreement.png": figure_b(ctx.labels, matrix, group_stats),
    }
    metrics = {f"disagreement.{name}.mean": s["mean"] for name, s in group_stats.items()}
    metrics |= {f"disagreement.{name}.std": s["std"] for name, s in group_stats.items()}
    metrics["focus.fraction_far_apart"] = summary["focus"]["fraction_far_apart"]
    params = {"class": ctx.classes[focus], "score": score, "target": target, "groups": assigned}
    return write_and_log("ranks", ctx, Path(out_dir), summary, figures, params, metrics, track)


def figure_a(focus: dict):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    x, yv, far = np.asarray(focus["rank_x"]), np.asarray(focus["rank_y"]), np.asarray(focus["far_apart"], bool)
    ax.scatter(x[~far], yv[~far], s=6, c="0.6", lw=0, label="within half the range")
    ax.scatter(
        x[far], yv[far], s=8, c="tab:red", lw=0, label=f"far apart ({far.mean():.1%})" if len(far) else "far apart"
    )
    ax.set_xlabel(f"rank by {focus['models'][0]}")
    ax.set_ylabel(f"rank by {focus['models'][1]}")
    ax.set_title(f"A: confidence rank, class '{focus['class']}'")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def figure_b(labels: list[str], matrix: np.ndarray, group_stats: dict):
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_g) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1.3, 1]})
    im = ax_m.imshow(100 * matrix, cmap="viridis")
    ax_m.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax_m.set_yticks(range(len(labels)), labels, fontsize=7)
    for (a, b), v in np.ndenumerate(matrix):
        ax_m.text(
            b, a, f"{100 * v:.1f}", ha="center", va="center", fontsize=7, color="w" if v < matrix.max() / 2 else "k"
        )
    fig.colorbar(im, ax=ax_m, label="% of examples ranked far apart")
    names = list(group_stats)
    ax_g.bar(
        range(len(names)),
        [100 * group_stats[n]["mean"] for n in names],
        yerr=[100 * group_stats[n]["std"] for n in names],
        capsize=4,
        color="tab:blue",
    )
    for k, name in enumerate(names):
        ref = PAPER.get(name) or PAPER.get("-".join(reversed(name.split("-"))))
        if ref is not None:
            ax_g.plot([k - 0.4, k + 0.4], [100 * ref] * 2, "k--", lw=1)
    ax_g.set_xticks(range(len(names)), names)
    ax_g.set_ylabel("% far apart (mean ± std over pairs; dashed: paper)")
    ax_g.set_title("B: rank disagreement by group")
    fig.tight_layout()
    return fig
