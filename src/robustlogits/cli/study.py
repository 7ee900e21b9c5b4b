"""Commands that fan out: `sweep` (and its workers and report) and `reproduce`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from robustlogits.cli.app import app, blank, cli_errors, comma_list, split_overrides
from robustlogits.config import DEFAULT_PRESET, STUDY_STAGES, ReproduceConfig, SweepConfig, parse_workers
from robustlogits.core.errors import UserError

SWEEP_DEFAULTS = SweepConfig(teacher="")  # the defaults a sweep command shows and MLproject declares

sweep_app = typer.Typer(
    help="Optuna sweeps over teacher epoch and distillation loss (Figures A.6, A.7).",
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(sweep_app, name="sweep")


@sweep_app.callback(invoke_without_command=True)
@cli_errors
def sweep(
    ctx: typer.Context,
    teacher: Optional[str] = typer.Option(
        None, help="registered AT teacher name (its checkpoints are the epochs swept)"
    ),
    teacher_epochs: str = typer.Option(
        ",".join(SWEEP_DEFAULTS.teacher_epochs), help="comma list of checkpoint epochs, or all"
    ),
    losses: str = typer.Option(",".join(SWEEP_DEFAULTS.losses), help="comma list: l1, kl, mse"),
    temperatures: str = typer.Option(",".join(SWEEP_DEFAULTS.temperatures), help="kl temperatures, comma list"),
    manipulations: str = typer.Option(
        ",".join(SWEEP_DEFAULTS.manipulations), help="comma list: none, permute, average, correct-fix, hybrid"
    ),
    ks: Optional[str] = typer.Option(None, help="k values for permute/average/correct-fix, comma list"),
    seeds: Optional[str] = typer.Option(None, help="student seeds, comma list (repeats give mean +- std)"),
    lrs: Optional[str] = typer.Option(None, help="student learning rates, comma list"),
    sampler: str = typer.Option(SweepConfig.sampler, help="grid (every point) | tpe | random"),
    n_trials: Optional[int] = typer.Option(None, help="trial budget of tpe/random (the whole study, all workers)"),
    objective: str = typer.Option(
        ",".join(SWEEP_DEFAULTS.objectives), help="adversarial | natural | natural,adversarial (Pareto)"
    ),
    preset: str = typer.Option(DEFAULT_PRESET, help="student/data/optimiser settings (as in distill)"),
    data_dir: Optional[str] = typer.Option(None, help="default: found again from the teacher's data (digest checked)"),
    study: Optional[str] = typer.Option(None, help="study name (default: derived from the search space)"),
    storage: Optional[str] = typer.Option(
        None, envvar="ROBUSTLOGITS_STORAGE", help="SQLAlchemy URL (default: sqlite optuna.db beside the MLflow store)"
    ),
    workers: int = typer.Option(
        SweepConfig.workers, help="worker processes on this machine (threads each = cores / workers)"
    ),
    create_only: bool = typer.Option(
        SweepConfig.create_only, help="create the study and queue the grid, run no worker here"
    ),
    workers_per_device: int = typer.Option(SweepConfig.workers_per_device, help="workers sharing one GPU"),
    heartbeat: int = typer.Option(
        SweepConfig.heartbeat, help="seconds between worker heartbeats (a silent worker's trial is retried)"
    ),
    sampler_seed: int = typer.Option(SweepConfig.sampler_seed, help="seed of the tpe/random sampler"),
    set_: List[str] = typer.Option([], "--set", help="any distill config value: section.field=value (repeatable)"),
    overrides: Optional[str] = typer.Option(None, help="several section.field=value separated by spaces"),
):
    """Sweep teacher checkpoint x distillation loss (and manipulation, k, seed, lr) with Optuna."""
    if ctx.invoked_subcommand:
        return
    from robustlogits.study.sweep import run_sweep

    if not blank(teacher):
        raise UserError("--teacher is required (a registered AT teacher name, e.g. cifar10-cnn-small-at)")
    settings = SweepConfig(
        teacher=teacher,
        teacher_epochs=comma_list(teacher_epochs) or ["all"],
        losses=comma_list(losses),
        temperatures=comma_list(temperatures),
        manipulations=comma_list(manipulations),
        ks=comma_list(blank(ks)),
        seeds=comma_list(blank(seeds)),
        lrs=comma_list(blank(lrs)),
        sampler=sampler,
        n_trials=n_trials or None,
        objectives=comma_list(objective),
        preset=preset,
        data_dir=blank(data_dir),
        study=blank(study),
        storage=blank(storage),
        workers=workers,
        workers_per_device=workers_per_device,
        heartbeat=heartbeat,
        sampler_seed=sampler_seed,
        create_only=create_only,
        overrides=[*set_, *split_overrides(overrides)],
    )
    try:
        result = run_sweep(settings)
    except KeyboardInterrupt:
        typer.echo("interrupted; finished trials are kept: run the same command again to resume", err=True)
        raise typer.Exit(130) from None
    typer.echo(result.message())
    if not result.status.done and not create_only:
        raise typer.Exit(1)


@sweep_app.command("worker")
@cli_errors
def sweep_worker(
    study: str = typer.Option(..., help="study name"),
    storage: str = typer.Option(
        ..., envvar="ROBUSTLOGITS_STORAGE", help="the study's SQLAlchemy URL, e.g. postgresql://user:pw@host/db"
    ),
    n_trials: Optional[int] = typer.Option(None, help="stop after this many trials (default: until none is left)"),
    heartbeat: int = typer.Option(10, help="seconds between heartbeats (0: none)"),
    data_dir: Optional[str] = typer.Option(
        None, help="where this machine keeps the data (else $ROBUSTLOGITS_DATA, defaults)"
    ),
):
    """Join a study from any machine that reaches its storage and MLFLOW_TRACKING_URI."""
    from robustlogits.study import engine as study_engine

    if blank(data_dir):
        os.environ["ROBUSTLOGITS_DATA"] = str(Path(data_dir).expanduser().resolve())
    ran = study_engine.run_worker(study, storage, n_trials, heartbeat or None)
    st = study_engine.status(study_engine.load(study, storage, heartbeat or None))
    typer.echo(f"worker ran {ran} trial(s); study {study}: {st.summary()}")


@sweep_app.command("report")
@cli_errors
def sweep_report(
    study: str = typer.Option(..., help="study name"),
    storage: Optional[str] = typer.Option(
        None, envvar="ROBUSTLOGITS_STORAGE", help="default: sqlite optuna.db beside the MLflow store"
    ),
):
    """Refresh a study's figures and trials.csv on its parent run and print the table."""
    from robustlogits.study import engine as study_engine

    url = blank(storage) or study_engine.default_storage()
    loaded = study_engine.load(study, url, None)
    study_engine.refresh_report(loaded)
    rows = study_engine.trial_rows(loaded)
    typer.echo(study_engine.trials_csv(rows).rstrip())
    typer.echo(
        f"study {study}: {study_engine.status(loaded).summary()}; parent run {study_engine.parent_run_id(loaded)}"
    )


@app.command()
@cli_errors
def reproduce(
    scale: str = typer.Option(
        ReproduceConfig.scale,
        help="smoke (CPU, minutes) | laptop (CPU, the paper's teacher regime, ~3 h) | study (CPU, hours) | paper (A.2, GPUs)",
    ),
    seeds: Optional[str] = typer.Option(None, help="seeds per model (default: the scale's)"),
    only: Optional[str] = typer.Option(
        None,
        help="only these steps, comma list: train, attack, distill, sweeps, gap, "
        "theory, manifold, ranks, errors, overlap, images",
    ),
    skip: Optional[str] = typer.Option(None, help="skip these steps, comma list"),
    workers: str = typer.Option(
        str(ReproduceConfig.workers),
        help="local worker processes, threads each = cores / workers: N for every stage, or per stage "
        "(train, attack, distill, analyze), e.g. 1,distill=2",
    ),
    storage: Optional[str] = typer.Option(
        None,
        help="Optuna storage URL shared with `sweep worker`s on other machines "
        "(default: sqlite optuna.db beside the MLflow store)",
    ),
    out: str = typer.Option(ReproduceConfig.out, help="folder for report/index.html and report/report.md"),
    data_dir: Optional[str] = typer.Option(None, help="where CIFAR-10 (and CIFAR-100, if present) are"),
    dry_run: bool = typer.Option(
        ReproduceConfig.dry_run, "--dry-run", help="print the plan: steps, keys, done or not, time estimate"
    ),
    heartbeat: int = typer.Option(
        ReproduceConfig.heartbeat, help="seconds between worker heartbeats (a silent worker's step is retried)"
    ),
    experiment: str = typer.Option(ReproduceConfig.experiment, help="MLflow experiment of the study run"),
):
    """The paper's whole study as one resumable command, and a report beside the paper's numbers."""
    from robustlogits.study.reproduce.evidence import VERDICTS
    from robustlogits.study.reproduce.run import plan_table, run_reproduce

    try:
        n_seeds = int(seeds) if blank(seeds) else None
    except ValueError:
        raise UserError(f"--seeds must be an integer, got {seeds!r}") from None
    n_workers, stage_workers = parse_workers(workers)
    opts = ReproduceConfig(
        scale=scale,
        seeds=n_seeds,
        only=comma_list(only),
        skip=comma_list(skip),
        workers=n_workers,
        stage_workers=stage_workers,
        storage=blank(storage),
        out=out,
        data_dir=blank(data_dir),
        dry_run=dry_run,
        experiment=experiment,
        heartbeat=heartbeat,
    )
    result = run_reproduce(opts)
    if dry_run:
        typer.echo(plan_table(result["plan"], {s: opts.workers_for(s) for s in STUDY_STAGES}, result["throughput"]))
        return
    verdicts = result["verdicts"]
    counts = ", ".join(f"{verdict} {verdicts.count(verdict)}" for verdict in VERDICTS)
    typer.echo(
        f"study run {result['parent_run_id']}: {len(verdicts)} claims: {counts}; report in {result['report']}/index.html"
    )
