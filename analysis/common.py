"""What the cross-model analyses (ranks, errors, overlap, images) share: model groups, statistics
over pairs of models, and one tracked MLflow run per analysis.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np

matplotlib.use("Agg")

from robustlogits import tracking  # noqa: E402
from robustlogits.core.errors import UserError  # noqa: E402
from robustlogits.jobs.test_logits import TestModels, log_inputs, open_models  # noqa: E402
from robustlogits.tracking import registry  # noqa: E402

TRAINING_GROUP = {"standard": "ST", "adversarial": "AT"}


def parse_groups(items: list[str] | None) -> dict[str, list[str]]:
    """`["ST=a,b", "AT=c,d"]` -> {"ST": ["a", "b"], "AT": ["c", "d"]} (order kept)."""
    groups: dict[str, list[str]] = {}
    for item in items or []:
        name, sep, members = item.partition("=")
        specs = [s for s in re.split(r"[\s,]+", members) if s]
        if not sep or not name.strip() or not specs:
            raise UserError(f"--group takes NAME=MODEL,MODEL,... got {item!r}")
        groups.setdefault(name.strip(), []).extend(specs)
    return groups


def model_list(models: list[str] | None, groups: dict[str, list[str]] | None) -> list[str]:
    """Models given directly, then any group members not already listed."""
    out = [s for s in models or [] if s]
    for members in (groups or {}).values():
        out += [s for s in members if s not in out]
    return out


def assign_groups(ctx: TestModels, groups: dict[str, list[str]] | None) -> dict[str, list[str]]:
    """Group name -> model labels. Without explicit groups, models group by their training
    (ST / AT, from the registry tag `training`); others stand alone."""
    out: dict[str, list[str]] = {}
    if groups:
        for name, specs in groups.items():
            out[name] = [ctx.labels[ctx.specs.index(s)] for s in specs]
        return out
    for model, label in zip(ctx.models, ctx.labels):
        name = TRAINING_GROUP.get(model.tags.get(registry.TRAINING_TAG, ""), None)
        if model.tags.get(registry.MANIPULATION_TAG):
            name = f"student-{model.tags[registry.MANIPULATION_TAG]}"
        out.setdefault(name or label, []).append(label)
    return out


def group_pairs(groups: dict[str, list[str]]) -> dict[str, list[tuple[str, str]]]:
    """Within-group pairs (AT-AT) and cross-group pairs (AT-ST), as label pairs."""
    out: dict[str, list[tuple[str, str]]] = {}
    names = list(groups)
    for name in names:
        pairs = list(itertools.combinations(groups[name], 2))
        if pairs:
            out[f"{name}-{name}"] = pairs
    for a, b in itertools.combinations(names, 2):
        out[f"{a}-{b}"] = [(x, y) for x in groups[a] for y in groups[b]]
    return out


def pair_stats(values: dict[tuple[str, str], np.ndarray | float], pairs: list[tuple[str, str]]) -> dict:
    """Mean and standard deviation (over pairs; ddof=0, 0 for a single pair) of a per-pair value."""
    stacked = np.asarray([values[p] if p in values else values[(p[1], p[0])] for p in pairs], dtype=np.float64)
    return {
        "n_pairs": len(pairs),
        "mean": stacked.mean(0).tolist(),
        "std": stacked.std(0).tolist(),
        "pairs": [list(p) for p in pairs],
    }


def default_pair(ctx: TestModels, groups: dict[str, list[str]]) -> tuple[int, int]:
    """The two models a single-pair figure shows: the first of two different groups (ST, AT), else the first two."""
    firsts = [members[0] for members in groups.values()]
    order = sorted(firsts, key=lambda lab: {"ST": 0, "AT": 1}.get(_group_of(lab, groups), 2))
    if len(order) >= 2:
        return ctx.labels.index(order[0]), ctx.labels.index(order[1])
    return 0, 1


def default_class(ctx: TestModels) -> str:
    """The paper's example class, `frog`, where the dataset has it; else the first class."""
    return "frog" if "frog" in ctx.classes else ctx.classes[0]


def _group_of(label: str, groups: dict[str, list[str]]) -> str:
    return next((g for g, members in groups.items() if label in members), "")


def write_and_log(
    kind: str,
    ctx: TestModels,
    out_dir: Path,
    summary: dict,
    figures: dict,
    params: dict,
    metrics: dict[str, float],
    track: bool,
) -> dict:
    """Write figures and `<kind>.json` to out_dir; with `track`, one run holding them, the models as
    inputs, the params and headline metrics. Returns the summary with `run_id` (None untracked)."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary["files"] = sorted(figures) + [f"{kind}.json"]
    summary["run_id"] = None
    for filename, fig in figures.items():
        fig.savefig(out_dir / filename, dpi=110)
    if track:
        with tracking.job_run(
            ctx.experiment, f"analyze-{kind}", {"robustlogits.job": f"analyze-{kind}", "dataset": ctx.dataset}
        ) as run_id:
            summary["run_id"] = run_id
            tracking.log_params(params | {"models": ctx.specs, "dataset": ctx.dataset})
            log_inputs(ctx)
            tracking.log_results(metrics)
            for filename, fig in list(figures.items()):
                tracking.log_figure(fig, f"{kind}/{filename}")
            tracking.log_json(summary, f"{kind}/{kind}.json")
    for fig in figures.values():
        plt.close(fig)
    (out_dir / f"{kind}.json").write_text(json.dumps(summary, indent=1))
    return summary


def prepare(
    models: list[str] | None,
    groups: list[str] | dict | None,
    *,
    minimum: int,
    purpose: str,
    data_dir=None,
    dataset=None,
    device="auto",
    experiment="robustlogits",
    check: Callable[[TestModels], None] | None = None,
    track: bool = True,
):
    """Resolve models and groups, load the test split, run the caller's checks: all before any write."""
    group_specs = groups if isinstance(groups, dict) else parse_groups(groups)
    specs = model_list(models, group_specs)
    tracking.configure_store()  # untracked analyses still read models (and cache logits) in the same store
    if track:
        tracking.check_store(experiment)
    ctx = open_models(
        specs,
        data_dir=data_dir,
        dataset=dataset,
        device=device,
        experiment=experiment,
        minimum=minimum,
        purpose=purpose,
    )
    assigned = assign_groups(ctx, group_specs)
    if check is not None:
        check(ctx)
    return ctx, assigned
