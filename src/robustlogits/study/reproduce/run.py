"""The `reproduce` job: the paper's whole study as one resumable command, and a report beside the paper.

It plans every step (`reproduce_plan`), checks the input, then runs the stages in order (train,
attack, distill, analyze); within a stage the steps not yet done are independent work items run
by the study engine's workers. All step runs nest under one parent run, which holds the report.
Running it again finds every finished step by its key and only redoes what is missing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from robustlogits import tracking
from robustlogits.config import ReproduceConfig, scale
from robustlogits.core.errors import UserError
from robustlogits.study.reproduce.plan import (
    STAGES,
    Step,
    build_plan,
    scale_params,
    select,
    select_groups,
    teacher_config,
)

log = logging.getLogger(__name__)
STUDY_JOB = "reproduce"


@dataclass
class ReproducePlan:
    study_key: str
    selection_key: str  # the chosen steps': a stage study runs what this selection queued, nothing else
    steps: list[Step]
    chosen: list[Step]
    done: dict[str, str | None]  # step name -> FINISHED run id (None: not done)
    datasets: dict[str, str]
    skipped_datasets: dict[str, str]
    storage: str | None = None  # the stage studies' Optuna storage (None: beside the tracking store)


def dataset_digests(datasets: tuple[str, ...], preset_name: str, data_dir: str | None) -> tuple[dict, dict]:
    """Digest of each dataset present. CIFAR-10 (or the synthetic set) must be there; CIFAR-100 is
    optional, looked for without a download."""
    from robustlogits.core.data import load_raw

    found, skipped = {}, {}
    for dataset in datasets:
        d = teacher_config(preset_name, dataset, "standard", 0).data
        synthetic = dict(
            train_per_class=d.synthetic_train_per_class,
            test_per_class=d.synthetic_test_per_class,
            num_classes=d.synthetic_classes,
            size=d.synthetic_size,
        )
        if dataset == "cifar100":
            previous = os.environ.get("ROBUSTLOGITS_NO_DOWNLOAD")
            os.environ["ROBUSTLOGITS_NO_DOWNLOAD"] = "1"
            try:
                found[dataset] = load_raw(dataset, data_dir).digest
            except UserError as exc:
                skipped[dataset] = str(exc).split(". Looked")[0]
            finally:
                if previous is None:
                    os.environ.pop("ROBUSTLOGITS_NO_DOWNLOAD", None)
        else:
            found[dataset] = load_raw(dataset, data_dir, synthetic=synthetic).digest
    return found, skipped


def check_storage(url: str | None) -> None:
    """An Optuna storage that cannot be reached fails here, before anything runs."""
    if url:
        from robustlogits.study.engine import open_storage

        open_storage(url, heartbeat=None)


def make_plan(opts: ReproduceConfig) -> ReproducePlan:
    """Validate everything and plan the study; nothing is written."""
    sc = scale(opts.scale)
    seeds = sc.seeds if opts.seeds is None else opts.seeds
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    opts.validate()
    groups = select_groups(opts.only, opts.skip)
    check_storage(opts.storage)
    datasets, skipped = dataset_digests(sc.datasets, sc.preset, opts.data_dir)
    tracking.check_store(opts.experiment)
    steps = build_plan(sc, seeds, datasets, opts.data_dir)
    chosen = select(steps, groups)
    finished = tracking.finished_runs_by_key()
    done = {s.name: finished.get(s.key) for s in steps}
    by_name = {s.name: s for s in steps}
    chosen_names = {s.name for s in chosen}
    for step in chosen:
        for ref in step.needs.values():
            for name in ref if isinstance(ref, list) else [ref]:
                if name not in chosen_names and not done[name]:
                    raise UserError(
                        f"step {step.name} needs {name} ({by_name[name].group}), which is neither done "
                        f"nor selected; drop --only/--skip {by_name[name].group}"
                    )
    # the stage studies are named from this key: a plan whose steps changed (another preset's values,
    # new code) gets new ones, so no item queued for the old plan is run under the new
    steps_digest = tracking.job_key(sorted(s.key for s in steps))
    study_key = tracking.job_key({"job": STUDY_JOB, **scale_params(sc, seeds), "data": datasets, "steps": steps_digest})
    # the stage studies are also named from the selection: a `--only sweeps` run must not work off
    # students an earlier, wider run of the same plan queued in the same stage (they share the stage)
    selection_key = tracking.job_key(sorted(s.key for s in chosen))[:12]
    return ReproducePlan(study_key, selection_key, steps, chosen, done, datasets, skipped, opts.storage)


def stage_study_name(plan: ReproducePlan, stage: str) -> str:
    return f"reproduce-{plan.study_key}-{plan.selection_key}-{stage}"


def run_reproduce(opts: ReproduceConfig) -> dict:
    """Plan, then (unless dry-run) run what is not done and write the report. Returns a summary."""
    from robustlogits.study.reproduce.estimate import estimate

    plan = make_plan(opts)
    if opts.dry_run:
        sources = estimate(plan.chosen, plan.steps, stage_threads(opts))
        return {"plan": plan, "throughput": sources}
    sc = scale(opts.scale)
    seeds = sc.seeds if opts.seeds is None else opts.seeds
    run_name = f"reproduce-{sc.name}-{seeds}seeds"
    parent = tracking.study_run(
        opts.experiment,
        run_name,
        key=plan.study_key,
        tags={"robustlogits.job": STUDY_JOB, "scale": sc.name},
        params=scale_params(sc, seeds) | {f"data_digest.{k}": v for k, v in plan.datasets.items()},
    )
    with tracking.holding(parent):
        # a process killed as it opened a run may not have told its trial (or anyone) about it: every
        # run on this machine whose process is gone is ended FAILED, saying so (reclaim continues it)
        for record, reason in tracking.stale_runs():
            if tracking.end_lost(record.run_id, reason):
                log.info("run %s was left RUNNING: %s; ended FAILED", record.run_id, reason)
        keys = {s.name: s.key for s in plan.steps}
        if any(not plan.done[s.name] for s in plan.chosen):
            # the same probe as --dry-run, recorded with each queued step so the report can set the
            # estimate beside what the step took
            sources = estimate(plan.chosen, plan.steps, stage_threads(opts))
            left = {s.key: s.estimate_s for s in plan.chosen if not plan.done[s.name]}
            log.info(
                "estimated %s for the %d step(s) left (%s)",
                duration(sum(left.values())),
                len(left),
                "; ".join(f"{arch} {text}" for arch, text in sources.items()),
            )
        for stage in STAGES:
            finished = tracking.finished_runs_by_key()
            todo: dict[str, Step] = {}
            for step in plan.chosen:  # one item per key: a sweep point equal to a student is that student
                if step.stage == stage and step.key not in finished:
                    todo.setdefault(step.key, step)
            if todo:
                log.info("stage %s: %d step(s) to run", stage, len(todo))
                items, estimates = [s.item(keys) for s in todo.values()], [s.estimate_s for s in todo.values()]
                run_stage(stage_study_name(plan, stage), items, opts, parent, estimates, opts.workers_for(stage))
        from robustlogits.study.reproduce.report import write_report

        report, verdicts = write_report(plan, sc, seeds, parent, Path(opts.out))
    return {"plan": plan, "parent_run_id": parent, "report": report, "verdicts": verdicts}


def stage_threads(opts: ReproduceConfig) -> dict[str, int | None]:
    """The threads each stage's workers get (what the study engine gives them): None where one worker
    runs in this process with torch's own thread count."""
    from robustlogits.study.engine import worker_threads

    return {stage: worker_threads(n) if n > 1 else None for stage in STAGES for n in [opts.workers_for(stage)]}


def run_stage(
    study_name: str,
    items: list[dict],
    opts: ReproduceConfig,
    parent: str,
    estimates: list[float] | None = None,
    workers: int | None = None,
) -> None:
    """One stage's independent steps as a study of fixed work items on the study engine: local
    workers run them, and with a shared `--storage` so can `sweep worker`s on other machines.
    The stage study's own parent run nests under the reproduce run, so the UI shows one tree."""
    from robustlogits.study import engine as study_engine
    from robustlogits.study.reproduce.steps import DONE_METRIC, STAGE_TASK

    storage = opts.storage or study_engine.default_storage()
    # the stage runs live in the study run's experiment (under `mlflow run`: the launcher's), and
    # the stage study's run nests under the study run, so the UI draws one tree
    spec = {
        "task": STAGE_TASK,
        "module": "robustlogits.study.reproduce.steps",
        "kind": "reproduce-stage",
        "sampler": "items",
        "objectives": [DONE_METRIC],
        "experiment": tracking.experiment_name_of(parent),
        "parent_run": parent,
    }
    study = study_engine.open_study(study_name, storage, ["maximize"], spec, opts.heartbeat)
    notes = [{study_engine.ESTIMATE_ATTR: e} if e else {} for e in estimates or [0.0] * len(items)]
    added = study_engine.enqueue_items(study, items, notes)
    log.info(
        "study %s: %d item(s) queued; other machines join with: robustlogits sweep worker --study %s --storage %s",
        study_name,
        added,
        study_name,
        study_engine.redact(storage),
    )
    with study_engine.driving(study):
        status = study_engine.run_workers(study_name, storage, workers or opts.workers, heartbeat=opts.heartbeat)
    if not status.done:
        raise UserError(f"stage study {study_name} did not finish: {status.summary()}")


def describe_workers(per_stage: dict[str, int]) -> str:
    """ "1 worker", "2 workers", or "1 worker (distill: 2)" where the stages differ."""
    counts = [per_stage.get(stage, 1) for stage in STAGES]
    common = max(set(counts), key=counts.count)
    text = f"{common} worker{'s' if common > 1 else ''}"
    others = [f"{stage}: {n}" for stage, n in zip(STAGES, counts) if n != common]
    return text + (f" ({', '.join(others)})" if others else "")


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def plan_table(plan: ReproducePlan, workers: int | dict[str, int], throughput: dict[str, str]) -> str:
    """The dry-run's table: step, key, done or not, estimated time; then the totals with their spread.
    `workers`: every stage's local workers, or each stage's."""
    per_stage = workers if isinstance(workers, dict) else dict.fromkeys(STAGES, workers)
    first_of_key: dict[str, str] = {}
    rows = []
    for step in plan.chosen:
        run = plan.done.get(step.name)
        if run:
            state, seconds = f"done ({run[:8]})", (0.0, 0.0, 0.0)
        elif step.key in first_of_key:
            state, seconds = f"= {first_of_key[step.key]}", (0.0, 0.0, 0.0)
        else:
            state, seconds = "to do", (step.estimate_spread[0], step.estimate_s, step.estimate_spread[1])
        first_of_key.setdefault(step.key, step.name)
        rows.append((step.name, step.key, state, duration(seconds[1]) if seconds[1] else "-", step.stage, seconds))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'step':<{width}}  {'key':<24}  {'status':<22}  estimate", "-" * (width + 60)]
    lines += [f"{name:<{width}}  {key:<24}  {state:<22}  {est}" for name, key, state, est, _, _ in rows]

    def totals(at: int) -> tuple[float, float]:
        serial = sum(r[5][at] for r in rows)
        wall = 0.0
        for stage in STAGES:  # stages run one after another; a stage's steps share the workers
            times = [r[5][at] for r in rows if r[4] == stage and r[5][at]]
            if times:
                wall += max(sum(times) / per_stage.get(stage, 1), max(times))
        return serial, wall

    (_, fast), (serial, wall), (_, slow) = totals(0), totals(1), totals(2)
    todo = sum(1 for r in rows if r[2] == "to do")
    lines += [
        "-" * (width + 60),
        f"{len(rows)} steps, {len(rows) - todo} done or shared, {todo} to run: about {duration(serial)} of work, "
        f"{duration(wall)} with {describe_workers(per_stage)} ({duration(fast)} to {duration(slow)} at the probe's "
        "fastest and slowest repeat)",
        "throughput used: " + ", ".join(f"{arch} {text}" for arch, text in throughput.items()),
    ]
    for name, why in plan.skipped_datasets.items():
        lines.append(f"{name}: skipped ({why})")
    lines += training_count(plan.chosen)
    return "\n".join(lines)


PAPER_TRAINING_RUNS = 136  # appendix A.1: "the results in this paper represent 136 total training runs"


def training_count(steps: list[Step]) -> list[str]:
    """Training runs per kind against A.1's 136, and why the counts differ."""
    kinds = {"train": "teachers", "distill": "students (Table 2, fix-k)", "sweeps": "sweep students (A.6, A.7)"}
    listed = {kind: [s for s in steps if s.group == kind] for kind in kinds}
    keys: set[str] = set()
    distinct = {}
    for kind in kinds:  # a sweep point equal to a student (epoch-40 L1) is that student's run
        distinct[kind] = len({s.key for s in listed[kind]} - keys)
        keys |= {s.key for s in listed[kind]}
    total, unique = sum(len(v) for v in listed.values()), sum(distinct.values())
    lines = ["training runs: " + ", ".join(f"{distinct[k]} {name}" for k, name in kinds.items()) + f" = {unique}"]
    lines.append(
        f"  against appendix A.1's {PAPER_TRAINING_RUNS}: the plan lists {total} trainings, {total - unique} of them "
        f"the same run as another (a sweep point equal to a student), so {unique} distinct; A.1 does not itemise "
        f"its count, so the remaining {PAPER_TRAINING_RUNS - unique:+d} cannot be attributed"
    )
    return lines
