"""Figure 3C: a model's errors follow its average logit vector.

Per model: the mean logit vector of each class over its correctly classified test examples;
for each misclassified example, the rank (1..C, 1 = largest) that the predicted class has in the
mean vector of the true class (ties by lowest class index, as `argmax`). The distribution of those
ranks is shown for natural errors (clean test split) and for adversarial errors: examples the
model classified correctly that an `attack` run of the same model version broke. Rank 1 is the
true class itself, so errors sit at ranks 2..C; the paper finds rank 2 most common, more so for ST.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from analysis.common import prepare, write_and_log
from robustlogits import tracking
from robustlogits.core.errors import UserError
from robustlogits.jobs.test_logits import TestModels, identity


def class_means(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """([C, C] mean logit vector per class over its correct examples (NaN rows where none), counts)."""
    correct = logits.argmax(1) == labels
    counts = np.bincount(labels[correct], minlength=num_classes)
    sums = np.zeros((num_classes, logits.shape[1]))
    np.add.at(sums, labels[correct], logits[correct].astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]
    means[counts == 0] = np.nan
    return means, counts


def rank_table(means: np.ndarray) -> np.ndarray:
    """[C, C]: rank (1..C) of class k in class c's mean vector; ties by lowest class index."""
    c = means.shape[1]
    order = np.lexsort((np.broadcast_to(np.arange(c), means.shape), -np.nan_to_num(means, nan=0.0)), axis=1)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(1, c + 1)[None, :].repeat(len(means), 0), axis=1)
    return ranks


def error_ranks(means: np.ndarray, labels: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, int]:
    """(rank of each error's predicted class in its true class's mean vector, errors left unranked
    because their class has no correctly classified example)."""
    wrong = predicted != labels
    usable = wrong & ~np.isnan(means[labels]).any(1)
    return rank_table(means)[labels[usable], predicted[usable]], int((wrong & ~usable).sum())


def distribution(ranks: np.ndarray, num_classes: int) -> list[float]:
    """Fraction of errors at each rank 1..C."""
    counts = np.bincount(ranks, minlength=num_classes + 1)[1:]
    return (counts / max(counts.sum(), 1)).tolist()


def find_attack_run(ctx_model) -> str | None:
    """The newest FINISHED `attack` run of this model version (or URI)."""
    ident = identity(ctx_model)
    tags = (
        {"model_name": ident["name"], "model_version": ident["version"]}
        if "name" in ident
        else {"model_uri": ident["uri"]}
    )
    found = tracking.finished_runs(tags={"robustlogits.job": "attack", **tags}, limit=1)
    return found[0].run_id if found else None


def match_attack_runs(ctx: TestModels, attack_runs: list[str]) -> dict[int, str | None]:
    """Model position -> attack run: the ones given (each must belong to one of the models), else found."""
    chosen: dict[int, str | None] = {}
    for run_id in attack_runs:
        tags = tracking.run_record(run_id).tags
        if tags.get("robustlogits.job") != "attack":
            raise UserError(f"run {run_id} is not an attack run")
        owner = (
            {"name": tags["model_name"], "version": tags.get("model_version")}
            if "model_name" in tags
            else {"uri": tags.get("model_uri")}
        )
        hits = [k for k, m in enumerate(ctx.models) if identity(m) == owner]
        if not hits:
            what = f"{owner.get('name')} v{owner.get('version')}" if "name" in owner else owner.get("uri")
            raise UserError(f"attack run {run_id} attacked {what}, which is not one of the models analysed")
        for k in hits:
            chosen[k] = run_id
    for k, model in enumerate(ctx.models):
        if k not in chosen:
            chosen[k] = find_attack_run(model)
    return chosen


def adversarial_errors(run_id: str, ctx: TestModels) -> tuple[np.ndarray, np.ndarray, int]:
    """(labels, adversarial predictions) of the examples the attack broke (clean-correct, adversarially
    wrong), and how many examples the attack covered; checked against the test split."""
    result = tracking.load_attack_result(run_id)
    idx = np.asarray(result.index, dtype=np.int64)
    if idx.max(initial=-1) >= len(ctx.y) or not np.array_equal(ctx.y[idx], result.label):
        raise UserError(f"attack run {run_id} was run on other data than the {ctx.dataset} test split analysed")
    clean_ok = result.clean_logits.argmax(1) == result.label
    adv_pred = result.adv_logits.argmax(1)
    broken = clean_ok & (adv_pred != result.label)
    return result.label[broken].astype(np.int64), adv_pred[broken].astype(np.int64), len(idx)


def run(
    models: list[str] | None = None,
    groups=None,
    *,
    attack_runs: list[str] = (),
    out_dir: Path | str = "outputs/errors",
    data_dir: str | None = None,
    dataset: str | None = None,
    device: str = "auto",
    track: bool = True,
    experiment: str = "robustlogits",
) -> dict:
    """Figure 3C for every model (and group means): one run, the figure, errors.json."""
    matched: dict[int, str | None] = {}

    def check(ctx):
        matched.update(match_attack_runs(ctx, list(attack_runs)))

    ctx, assigned = prepare(
        models,
        groups,
        minimum=1,
        purpose="the error-class analysis",
        data_dir=data_dir,
        dataset=dataset,
        device=device,
        experiment=experiment,
        track=track,
        check=check,
    )
    y, c = ctx.y, len(ctx.classes)
    per_model = {}
    for k, item in enumerate(ctx.logits()):
        means, counts = class_means(item.logits, y, c)
        pred = item.logits.argmax(1)
        natural, unranked = error_ranks(means, y, pred)
        entry = {
            "natural_accuracy": float((pred == y).mean()),
            "n_natural_errors": int((pred != y).sum()),
            "natural_unranked": unranked,
            "natural": distribution(natural, c),
            "correct_per_class": counts.tolist(),
            "class_means": np.nan_to_num(means).tolist(),
            "attack_run": matched.get(k),
            "adversarial": None,
            "n_adversarial_errors": None,
        }
        if matched.get(k):
            labels, adv_pred, n_attacked = adversarial_errors(matched[k], ctx)
            ranks, unranked_adv = error_ranks(means, labels, adv_pred)
            entry |= {
                "adversarial": distribution(ranks, c),
                "n_adversarial_errors": int(len(labels)),
                "adversarial_unranked": unranked_adv,
                "n_attacked": n_attacked,
            }
        per_model[item.label] = entry
    group_curves = {}
    for name, labels in assigned.items():
        for kind in ("natural", "adversarial"):
            rows = [per_model[lab][kind] for lab in labels if per_model[lab][kind] is not None]
            if rows:
                arr = np.asarray(rows)
                group_curves.setdefault(name, {})[kind] = {
                    "mean": arr.mean(0).tolist(),
                    "std": arr.std(0).tolist(),
                    "n_models": len(rows),
                }
    summary = {
        "analysis": "errors",
        "dataset": ctx.dataset,
        "classes": list(ctx.classes),
        "models": per_model,
        "groups": assigned,
        "group_curves": group_curves,
        "ranks": list(range(1, c + 1)),
        "logit_sources": {m.label: {"source": m.source, "run_id": m.run_id} for m in ctx.logits()},
    }
    metrics = {}
    for label, entry in per_model.items():
        for kind in ("natural", "adversarial"):
            if entry[kind] is not None:
                metrics[f"{label}.{kind}.rank2_fraction"] = entry[kind][1]
    figures = {"figure3c_error_ranks.png": figure(summary)}
    params = {"attack_runs": [matched[k] for k in sorted(matched)], "groups": assigned}
    return write_and_log("errors", ctx, Path(out_dir), summary, figures, params, metrics, track)


def figure(summary: dict):
    import matplotlib.pyplot as plt

    kinds = ["natural"] + (["adversarial"] if any(e["adversarial"] for e in summary["models"].values()) else [])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    ranks = np.asarray(summary["ranks"])
    curves = summary["group_curves"]
    for ax, kind in zip(axes[0], kinds):
        names = [n for n in curves if kind in curves[n]]
        width = 0.8 / max(len(names), 1)
        for k, name in enumerate(names):
            cur = curves[name][kind]
            ax.bar(
                ranks + (k - (len(names) - 1) / 2) * width,
                cur["mean"],
                width,
                yerr=cur["std"],
                capsize=2,
                label=f"{name} ({cur['n_models']} model{'s' if cur['n_models'] > 1 else ''})",
            )
        ax.set_xticks(ranks)
        ax.set_xlabel("rank of the predicted class in the true class's mean logit vector")
        ax.set_ylabel("fraction of errors")
        ax.set_title(f"C: {kind} errors")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
