"""The `sweep` entry point: which AT-teacher checkpoint and which distillation loss distil best
(the paper's Figures A.6 and A.7), as an Optuna study run by the study engine.

A trial is one `distill` run (teacher logits found again by their key), keyed on its resolved
config, the teacher version and the data digest, so a retried or repeated trial never trains
twice. The parent run shows Figure A.6 (accuracy against teacher epoch, one line per loss),
Figure A.7 (against loss), parameter importances, the Pareto front for two objectives and
`trials.csv`; the best trial's student gets the alias `best-<study>`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from optuna.trial import TrialState

from robustlogits import tracking
from robustlogits.config import SweepConfig, apply_overrides, distill_preset, keyed_view
from robustlogits.core.errors import UserError
from robustlogits.core.manipulations import MANIPULATIONS
from robustlogits.core.training import DISTILLATION_LOSSES
from robustlogits.study import engine
from robustlogits.tracking import registry

log = logging.getLogger(__name__)

OBJECTIVES = {"adversarial": "adversarial_accuracy", "natural": "natural_accuracy"}
NEEDS_K = ("permute", "average", "correct-fix")
# Where and on what a trial runs, not what it computes: left out of its key.
VOLATILE = ("data.data_dir", "run.device", "run.experiment")
SAMPLING = ("grid", "tpe", "random")


@dataclass
class SweepPlan:
    name: str
    spec: dict
    directions: list[str]
    items: list[dict]


@dataclass
class SweepResult:
    study: str
    storage: str
    parent_run_id: str
    status: engine.StudyStatus
    created_only: bool = False

    def message(self) -> str:
        if self.created_only:
            return (
                f"study {self.study} ready: {self.status.summary()}; workers join with "
                f"`robustlogits sweep worker --study {self.study} --storage {engine.redact(self.storage)}`"
            )
        state = "complete" if self.status.done else "not complete (run the same command again to resume)"
        return (
            f"study {self.study} {state}: {self.status.summary()}\n"
            f"parent run {self.parent_run_id}; storage {engine.redact(self.storage)}"
        )


# --- the teacher's checkpoints ------------------------------------------------------------------


def teacher_checkpoints(teacher: str) -> tuple[str, dict[int, str], dict]:
    """(registered name, {epoch: version} of the teacher's training run, that version's tags).

    The run is the one behind the Production version (or the alias/version the reference names),
    else the newest version: its checkpoints are the epochs a sweep can choose from.
    """
    body = teacher[len("models:/") :] if teacher.startswith("models:/") else teacher
    name = re.split(r"[@/]", body, maxsplit=1)[0]
    try:
        _, mv = tracking.resolve_model(teacher)
    except UserError:
        versions = _versions(name)
        if not versions:
            raise
        mv = max(versions, key=lambda v: int(v.version))
    same_run = [v for v in _versions(name) if v.run_id == mv.run_id and registry.EPOCH_TAG in v.tags]
    epochs = {int(v.tags[registry.EPOCH_TAG]): str(v.version) for v in sorted(same_run, key=lambda v: int(v.version))}
    if not epochs:
        raise UserError(f"registered model {name!r} has no checkpoint versions with an epoch tag")
    return name, dict(sorted(epochs.items())), dict(mv.tags)


def _versions(name: str) -> list:
    try:
        return tracking.model_versions(name)
    except Exception:  # noqa: BLE001
        return []


# --- planning: every check before anything is written -------------------------------------------


def _numbers(values: list[str], kind, what: str) -> list:
    try:
        return [kind(v) for v in values]
    except ValueError:
        raise UserError(f"--{what} must be comma-separated {kind.__name__}s, got {','.join(values)}") from None


def plan(s: SweepConfig) -> SweepPlan:
    """The study's spec, directions and grid from the settings, or a UserError naming the problem."""
    if s.workers < 1:
        raise UserError(f"--workers must be >= 1, got {s.workers}")
    if s.sampler not in SAMPLING:
        raise UserError(f"unknown sampler {s.sampler!r}; choose one of: {', '.join(SAMPLING)}")
    if s.sampler != "grid" and not s.n_trials:
        raise UserError(f"sampler {s.sampler} needs --n-trials (the study's trial budget)")
    if s.sampler == "grid" and s.n_trials:
        raise UserError("--n-trials applies to tpe and random; a grid runs every point once")
    if s.n_trials is not None and s.n_trials < 1:
        raise UserError(f"--n-trials must be >= 1, got {s.n_trials}")
    bad = [o for o in s.objectives if o not in OBJECTIVES]
    if bad or not s.objectives or len(set(s.objectives)) != len(s.objectives):
        raise UserError(
            f"unknown objective {','.join(bad or s.objectives)!r}; choose adversarial, natural or natural,adversarial"
        )
    for loss in s.losses:
        if loss not in DISTILLATION_LOSSES:
            raise UserError(f"unknown loss {loss!r}; choose one of: {', '.join(DISTILLATION_LOSSES)}")
    for m in s.manipulations:
        if m not in MANIPULATIONS:
            raise UserError(f"unknown manipulation {m!r}; choose one of: {', '.join(MANIPULATIONS)}")
    if not s.losses or not s.manipulations:
        raise UserError("--losses and --manipulations need at least one value each")
    temperatures = _numbers(s.temperatures, float, "temperatures")
    if any(t <= 0 for t in temperatures):
        raise UserError(f"temperatures must be > 0, got {s.temperatures}")
    ks, seeds, lrs = _numbers(s.ks, int, "ks"), _numbers(s.seeds, int, "seeds"), _numbers(s.lrs, float, "lrs")
    if any(lr <= 0 for lr in lrs):
        raise UserError(f"learning rates must be > 0, got {s.lrs}")
    needs_k = [m for m in s.manipulations if m in ("permute", "average")]
    if needs_k and not ks:
        raise UserError(f"manipulation {needs_k[0]!r} needs --ks (1..number of classes)")

    cfg = distill_preset(s.preset)
    apply_overrides(cfg, s.overrides)
    tracking.check_store(cfg.run.experiment)
    name, epochs, tags = teacher_checkpoints(s.teacher)
    if s.teacher_epochs == ["all"]:
        chosen = list(epochs)
    else:
        chosen = _numbers(s.teacher_epochs, int, "teacher-epochs")
        missing = [e for e in chosen if e not in epochs]
        if missing:
            raise UserError(
                f"teacher {name} has no registered checkpoint at epoch {', '.join(map(str, missing))}; "
                f"registered epochs: {', '.join(map(str, epochs))}"
            )
    classes = int(tags.get(registry.NUM_CLASSES_TAG) or 0)
    if classes and ks and any(m in NEEDS_K for m in s.manipulations):
        outside = [k for k in ks if not 1 <= k <= classes]
        if outside:
            raise UserError(f"k must be in 1..{classes} for {tags.get('dataset', 'this dataset')}, got {outside[0]}")
    # The student's config as a trial will build it: the preset's and --set values must be valid.
    cfg.data.dataset = tags.get(registry.DATASET_TAG) or cfg.data.dataset
    cfg.distill.loss, cfg.distill.manipulation = s.losses[0], s.manipulations[0]
    cfg.distill.k = ks[0] if ks and s.manipulations[0] in NEEDS_K else None
    cfg.run.checkpoint_epochs = (cfg.optim.epochs,)
    cfg.validate()
    if not cfg.distill.attack:
        raise UserError("a sweep's objective is the final attack: distill.attack must stay true")
    if "hybrid" in s.manipulations:
        tracking.resolve_model(cfg.st_teacher_spec())
    _check_data(name, epochs[chosen[0]], s.data_dir)

    space: dict[str, dict] = {"teacher_epoch": {"choices": chosen}, "loss": {"choices": list(s.losses)}}
    if "kl" in s.losses:
        space["temperature"] = {"choices": temperatures, "when": {"loss": ["kl"]}}
    space["manipulation"] = {"choices": list(s.manipulations)}
    if ks and any(m in NEEDS_K for m in s.manipulations):
        space["k"] = {"choices": ks, "when": {"manipulation": [m for m in s.manipulations if m in NEEDS_K]}}
    if seeds:
        space["seed"] = {"choices": seeds}
    if lrs:
        space["lr"] = {"choices": lrs}
    spec = {
        "task": "distill",
        "module": __name__,
        "kind": "sweep",
        "report": "sweep",
        "sampler": s.sampler,
        "n_trials": s.n_trials,
        "seed": s.sampler_seed,
        "space": space,
        "objectives": [OBJECTIVES[o] for o in s.objectives],
        "preset": s.preset,
        "table_metrics": ["natural_accuracy", "adversarial_accuracy"],
        "report_every_seconds": 30,
        "experiment": cfg.run.experiment,
        "base": {
            "teacher": name,
            "teacher_versions": {str(e): epochs[e] for e in chosen},
            "preset": s.preset,
            "overrides": list(s.overrides),
        },
    }
    study = s.study or f"sweep-{name}-{tracking.job_key(spec)[:8]}"
    items = engine.grid_items(space) if s.sampler == "grid" else []
    return SweepPlan(study, spec, ["maximize"] * len(s.objectives), items)


def _check_data(teacher: str, version: str, data_dir: str | None) -> None:
    """This machine finds the teacher's training data (by its recorded folder and digest)."""
    from robustlogits.core.data import load_raw

    _, mv = tracking.resolve_model(teacher, version=version)
    run = tracking.run_record(mv.run_id)
    dataset = mv.tags.get(registry.DATASET_TAG) or run.params.get("data.dataset")
    hint = run.params.get("data.data_dir")
    synthetic = tracking.synthetic_params_from_run(mv.run_id) if dataset == "synthetic" else None
    load_raw(
        dataset,
        data_dir,
        synthetic=synthetic,
        hint=None if hint in (None, "", "None") else hint,
        digest=mv.tags.get(registry.DATA_DIGEST_TAG) or run.tags.get(registry.DATA_DIGEST_TAG),
    )


# --- the task: one distillation ---------------------------------------------------------------


def trial_config(params: dict):
    """The distillation a trial runs: the preset and --set values, then the sampled values."""
    cfg = distill_preset(params["preset"])
    apply_overrides(cfg, params.get("overrides", []))
    version = params["teacher_versions"][str(params["teacher_epoch"])]
    d = cfg.distill
    d.teacher, d.teacher_version, d.teacher_stage, d.teacher_alias = params["teacher"], version, None, None
    d.loss, d.manipulation = params["loss"], params["manipulation"]
    if "temperature" in params:
        d.temperature = float(params["temperature"])
    if "k" in params:
        d.k = int(params["k"])
    if "seed" in params:
        cfg.run.seed = int(params["seed"])
    if "lr" in params:
        cfg.optim.lr = float(params["lr"])
    return cfg


@engine.task("distill")
def distill_task(params: dict) -> dict[str, float]:
    from robustlogits.jobs.distill import run_distill

    cfg = trial_config(params)
    _, mv = tracking.resolve_model(cfg.distill.teacher, version=cfg.distill.teacher_version)
    teacher_run = tracking.run_record(mv.run_id)
    identity = {
        "config": {k: v for k, v in keyed_view(cfg).items() if k not in VOLATILE},
        "teacher": tracking.logged_model_id(mv) or f"{mv.name}/{mv.version}",
        "data": mv.tags.get(registry.DATA_DIGEST_TAG) or teacher_run.tags.get(registry.DATA_DIGEST_TAG),
    }
    progress = False if os.environ.get("ROBUSTLOGITS_WORKER") else None  # no interleaved bars
    key = tracking.job_key({"task": "distill", **identity})
    return engine.keyed("distill", key, lambda: run_distill(cfg, progress=progress))


# --- the sweep --------------------------------------------------------------------------------


def run_sweep(s: SweepConfig) -> SweepResult:
    """Plan (every check first), open or resume the study, queue the grid, run the workers."""
    p = plan(s)
    url = s.storage or engine.default_storage()
    if s.data_dir:  # this machine's workers look here first (digest checked)
        os.environ["ROBUSTLOGITS_DATA"] = str(Path(s.data_dir).expanduser().resolve())
    study = engine.open_study(p.name, url, p.directions, p.spec, s.heartbeat)
    parent = engine.parent_run_id(study)
    launched = tracking.launched_run_id()
    if launched and launched != parent:  # `mlflow run` of an existing study: point at its parent
        tracking.set_tags({"robustlogits.study_parent_run": parent}, launched)
    added = engine.enqueue_items(study, p.items) if p.items else 0
    log.info(
        "study %s: %d grid point(s) queued, %d trial(s) already there; parent run %s",
        p.name,
        added,
        len(study.get_trials(deepcopy=False)) - added,
        parent,
    )
    if s.create_only:
        log.info("join with: robustlogits sweep worker --study %s --storage %s", p.name, engine.redact(url))
        return SweepResult(p.name, url, parent, engine.status(study), created_only=True)
    try:
        with engine.driving(study):
            st = engine.run_workers(
                p.name, url, s.workers, workers_per_device=s.workers_per_device, heartbeat=s.heartbeat
            )
            engine.refresh_report(study, parent)
    except KeyboardInterrupt:
        log.error(
            "interrupted: study %s keeps its finished trials in %s; run the same command again to resume",
            p.name,
            engine.redact(url),
        )
        raise
    return SweepResult(p.name, url, parent, st)


# --- the report: Figures A.6, A.7, importances, Pareto front, best-<study> alias ---------------


def _complete_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        metrics = t.user_attrs.get("metrics") or {}
        row = (t.user_attrs.get("item") or {}) | t.params
        row |= {
            "trial": t.number,
            "natural": metrics.get("natural_accuracy"),
            "adversarial": metrics.get("adversarial_accuracy"),
            "versions": t.user_attrs.get("model_versions", []),
        }
        rows.append(row)
    return rows


def _variant(row: dict, keys: list[str]) -> str:
    return " ".join(f"{k}={row[k]}" if k != "loss" else str(row[k]) for k in keys if k in row)


def _grouped(rows: list[dict], x: str, series: list[str]) -> dict[str, dict]:
    """{series label: {x value: (mean, std, n) per objective}} with repeats (seeds) averaged."""
    out: dict[str, dict] = defaultdict(dict)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(_variant(row, series), row.get(x))].append(row)
    for (label, xv), members in groups.items():
        stats = {}
        for what in ("natural", "adversarial"):
            vals = np.array([m[what] for m in members if m[what] is not None], dtype=float)
            stats[what] = (float(vals.mean()), float(vals.std()), len(vals)) if len(vals) else None
        out[label][xv] = stats
    return out


def _varying(rows: list[dict], keys: list[str]) -> list[str]:
    """The dimensions that take more than one value where they exist (k only with permute, ...)."""
    return [k for k in keys if len({json.dumps(r[k]) for r in rows if k in r}) > 1]


def _accuracy_figure(table: dict[str, dict], xlabel: str, title: str, categorical: bool):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    xs_all = sorted({x for series in table.values() for x in series}, key=lambda v: (str(type(v)), v))
    for ax, what in zip(axes, ("natural", "adversarial")):
        for label, series in sorted(table.items()):
            xs = [x for x in xs_all if x in series and series[x][what] is not None]
            if not xs:
                continue
            pos = [xs_all.index(x) for x in xs] if categorical else xs
            mean = [series[x][what][0] for x in xs]
            std = [series[x][what][1] for x in xs]
            ax.errorbar(
                pos, mean, yerr=std, marker="o", capsize=3, label=label or "all", linestyle=":" if categorical else "-"
            )
        ax.set_title(f"student {what} accuracy")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (mean ± std over repeats)")
        ax.set_xticks(range(len(xs_all)) if categorical else xs_all, [str(x) for x in xs_all])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.85, wspace=0.22)  # tight_layout: 4x slower
    return fig


def _bar_figure(values: dict[str, dict[str, float]], title: str):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(values), figsize=(5 * len(values), 3.6), squeeze=False)
    for ax, (objective, importances) in zip(axes[0], values.items()):
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set_title(objective)
        ax.set_xlabel("importance (Optuna's default evaluator)")
    fig.suptitle(title)
    fig.subplots_adjust(left=0.3, right=0.97, bottom=0.18, top=0.82, wspace=0.6)
    return fig


def _pareto_figure(rows: list[dict], front: set[int]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for on in (False, True):
        pts = [r for r in rows if (r["trial"] in front) == on]
        ax.scatter(
            [r["natural"] for r in pts],
            [r["adversarial"] for r in pts],
            c="C3" if on else "C0",
            label="Pareto front" if on else "trials",
            zorder=3 if on else 2,
        )
        for r in pts if on else []:
            ax.annotate(f"e{r.get('teacher_epoch')} {r.get('loss')}", (r["natural"], r["adversarial"]), fontsize=7)
    ax.set_xlabel("student natural accuracy")
    ax.set_ylabel("student adversarial accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.96)
    return fig


def _importances(study) -> dict[str, dict[str, float]]:
    import optuna

    out = {}
    spec = study.user_attrs["spec"]
    params = [k for k, dim in spec["space"].items() if len(dim["choices"]) > 1]  # a constant ranks nothing
    if not params:
        return {}
    for i, name in enumerate(spec["objectives"]):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "too few trials" while a study is young
                out[name] = optuna.importance.get_param_importances(
                    study, params=params, target=(lambda t, i=i: t.values[i]) if len(study.directions) > 1 else None
                )
        except Exception as exc:  # noqa: BLE001 - too few or identical trials: nothing to rank yet
            log.debug("no importances for %s yet: %s", name, exc)
    return {k: v for k, v in out.items() if v}


def alias_name(study_name: str) -> str:
    return "best-" + re.sub(r"[^A-Za-z0-9_-]+", "-", study_name).strip("-")


@engine.report("sweep")
def sweep_report(study, parent: str) -> None:
    import matplotlib

    matplotlib.use("Agg")

    rows = _complete_rows(study)
    if not rows:
        return
    varying = _varying(rows, ["temperature", "manipulation", "k", "lr"])
    fig = _accuracy_figure(
        _grouped(rows, "teacher_epoch", ["loss", *varying]),
        "teacher checkpoint epoch",
        f"Figure A.6: students against teacher epoch ({study.study_name})",
        categorical=False,
    )
    tracking.log_figure(fig, "figures/fig_a6_teacher_epoch.png", run_id=parent)
    loss_keys = ["loss"] + [k for k in varying if k == "temperature"]
    for row in rows:
        row["loss_variant"] = _variant(row, loss_keys)
    fig = _accuracy_figure(
        _grouped(rows, "loss_variant", ["teacher_epoch", *[k for k in varying if k != "temperature"]]),
        "distillation loss",
        f"Figure A.7: students against loss ({study.study_name})",
        categorical=True,
    )
    tracking.log_figure(fig, "figures/fig_a7_loss.png", run_id=parent)
    importances = _importances(study)
    if importances:
        fig = _bar_figure(importances, f"parameter importances ({study.study_name})")
        tracking.log_figure(fig, "figures/param_importances.png", run_id=parent)
    front = {t.number for t in study.best_trials}
    if len(study.directions) > 1:
        fig = _pareto_figure(rows, front)
        tracking.log_figure(fig, "figures/pareto_front.png", run_id=parent)
    objective = study.user_attrs["spec"]["objectives"][0]
    key = "adversarial" if objective == "adversarial_accuracy" else "natural"
    best = max((r for r in rows if r["trial"] in front and r[key] is not None), key=lambda r: r[key], default=None)
    summary = {
        "best_trial": best and best["trial"],
        "pareto_front": sorted(front),
        "importances": importances,
        "complete_trials": len(rows),
    }
    if best:
        tracking.log_results({f"best_{objective}": best[key]}, run_id=parent)
        for ref in best["versions"][:1]:
            name, version = ref.rsplit("/", 1)
            tracking.set_alias(name, alias_name(study.study_name), version)
            summary["best_model"] = f"models:/{name}@{alias_name(study.study_name)}"
    tracking.log_json(summary, "sweep_summary.json", run_id=parent)
