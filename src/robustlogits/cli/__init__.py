"""The `robustlogits` command line. Commands only parse arguments and call the library.

Bad input becomes one line on stderr and exit code 2; nothing else is printed as a traceback
unless ROBUSTLOGITS_DEBUG is set.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from pathlib import Path
from typing import List, Optional

import typer

from robustlogits.core.errors import UserError

app = typer.Typer(help="Logit distributions of adversarially-trained networks, tracked in MLflow.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def cli_errors(fn):
    """Turn library errors into a one-line message and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        for noisy in ("mlflow", "alembic", "urllib3", "matplotlib", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            if os.environ.get("ROBUSTLOGITS_DEBUG"):
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; the run was marked FAILED and can be continued with --resume RUN_ID", err=True)
            raise typer.Exit(130) from None
    return wrapper


def _blank(value: Optional[str]) -> Optional[str]:
    """MLproject passes unset parameters as empty strings."""
    return value if value not in (None, "", "none", "None") else None


def split_overrides(text: Optional[str]) -> list[str]:
    return [t for t in re.split(r"[\s;]+", text or "") if t]


@app.command()
@cli_errors
def train(
    training: str = typer.Option("standard", help="standard | adversarial"),
    preset: str = typer.Option("smoke", help="smoke | study | paper (see `robustlogits config`)"),
    dataset: Optional[str] = typer.Option(None, help="cifar10 | cifar100 | synthetic (default: the preset's)"),
    arch: Optional[str] = typer.Option(None, help="resnet18 | resnet18-w32 | resnet18-w16 | resnet20 | cnn-small | cnn-tiny"),
    data_dir: Optional[str] = typer.Option(None, help="where the data is (default: $ROBUSTLOGITS_DATA, else ./data, then ../shared/data)"),
    epochs: Optional[int] = typer.Option(None, help="override optim.epochs"),
    checkpoint_epochs: Optional[str] = typer.Option(None, help="comma list, e.g. 20,40,200"),
    teacher_epoch: Optional[int] = typer.Option(None, help="checkpoint promoted as the teacher (paper: 40)"),
    seed: Optional[int] = typer.Option(None, help="override run.seed"),
    resume: Optional[str] = typer.Option(None, help="continue this killed/failed run id from its last epoch"),
    set_: List[str] = typer.Option([], "--set", help="any config value: section.field=value (repeatable)"),
    overrides: Optional[str] = typer.Option(None, help="several section.field=value separated by spaces"),
):
    """Standard or PGD adversarial training; every epoch's logit distribution goes to MLflow."""
    from robustlogits.config import apply_overrides, preset as make_preset
    from robustlogits.jobs.train import run_training

    resume = _blank(resume)
    cfg = make_preset(preset)
    cfg.run.training = training
    pairs = [("data.dataset", _blank(dataset)), ("model.arch", _blank(arch)), ("data.data_dir", _blank(data_dir)),
             ("optim.epochs", epochs), ("run.checkpoint_epochs", _blank(checkpoint_epochs)),
             ("run.teacher_epoch", teacher_epoch), ("run.seed", seed)]
    extra = [*set_, *split_overrides(overrides)]
    apply_overrides(cfg, [f"{k}={v}" for k, v in pairs if v is not None])
    apply_overrides(cfg, extra)
    if not _blank(checkpoint_epochs) and not any(o.startswith("run.checkpoint_epochs") for o in extra):
        user_teacher = teacher_epoch is not None or any(o.startswith("run.teacher_epoch") for o in extra)
        cfg.fit_schedule_to_epochs(keep_teacher=user_teacher)  # preset checkpoints follow --epochs
    run_id = run_training(cfg, resume=resume)
    typer.echo(training_summary(run_id))


def training_summary(run_id: str) -> str:
    """The closing line, from what the run itself recorded (a resumed run's config is its own)."""
    from robustlogits.tracking import run_record

    tags, metrics = run_record(run_id)
    line = f"run {run_id} finished"
    if tags.get("registered_model"):
        line += f"; registered model {tags['registered_model']} version(s) {tags.get('registered_versions', '?')}"
    if tags.get("teacher_version"):
        line += f", teacher = version {tags['teacher_version']}"
    held = next((k for k in ("val_accuracy", "test_accuracy") if k in metrics), None)
    return line + (f"; final {held} {metrics[held]:.4f}" if held else "")


def _eps(text: str) -> float:
    from robustlogits.config import coerce

    return coerce(text, float, "eps")


@app.command()
@cli_errors
def attack(
    model: str = typer.Option("", help="models:/NAME@ALIAS, models:/NAME/STAGE, models:/NAME/VERSION, a registered NAME, or runs:/ID/PATH"),
    stage: Optional[str] = typer.Option(None, help="with a registered NAME: the stage to pull (default Production)"),
    alias: Optional[str] = typer.Option(None, help="with a registered NAME: the alias to pull"),
    version: Optional[str] = typer.Option(None, help="with a registered NAME: the version to pull"),
    dataset: Optional[str] = typer.Option(None, help="default: the model's dataset"),
    data_dir: Optional[str] = typer.Option(None, help="default: the data directory of the model's training run"),
    eps: str = typer.Option("8/255", help="Linf radius in [0,1] pixel units"),
    n_iter: int = typer.Option(100, help="APGD iterations"),
    n_restarts: int = typer.Option(1, help="APGD restarts"),
    seed: int = typer.Option(0),
    suite: str = typer.Option("apgd-ce-dlr", help="apgd-ce-dlr (the paper's) | standard (full AutoAttack)"),
    n_examples: Optional[int] = typer.Option(None, help="stratified, seeded subset of the test split (default: all)"),
    batch_size: Optional[int] = typer.Option(None, help="default: chosen to fit the device"),
    device: str = typer.Option("auto"),
    experiment: str = typer.Option("robustlogits"),
):
    """Adversarial accuracy: APGD-CE, then APGD-DLR on the survivors; per-example results in MLflow."""
    from robustlogits.jobs.attack import AttackConfig, run_attack

    cfg = AttackConfig(model=model, stage=_blank(stage), alias=_blank(alias), version=_blank(version),
                       dataset=_blank(dataset), data_dir=_blank(data_dir), eps=_eps(eps), n_iter=n_iter,
                       n_restarts=n_restarts, seed=seed, suite=suite, n_examples=n_examples or None,
                       batch_size=batch_size or None, device=device, experiment=experiment)
    run_id, result = run_attack(cfg)
    typer.echo(f"run {run_id}: natural {result.natural_accuracy:.4f}, after APGD-CE {result.accuracy_after_apgd_ce:.4f}, "
               f"adversarial {result.adversarial_accuracy:.4f} on {result.n_examples} examples ({result.seconds:.1f} s)")


@app.command()
@cli_errors
def distill(
    manipulation: str = typer.Option("none", help="none | permute | average | correct-fix | hybrid"),
    k: Optional[str] = typer.Option(None, help="fix the top-k classes (permute/average; correct-fix default 1)"),
    teacher: Optional[str] = typer.Option(None, help="registry URI or registered name (default: <dataset>-<arch>-at)"),
    teacher_stage: Optional[str] = typer.Option(None, help="stage of a registered teacher name (default Production)"),
    teacher_alias: Optional[str] = typer.Option(None, help="alias of a registered teacher name"),
    teacher_version: Optional[str] = typer.Option(None, help="version of a registered teacher name"),
    st_teacher: Optional[str] = typer.Option(None, help="standard-trained teacher for hybrid (default: <dataset>-<arch>-st, Production)"),
    fix_mode: str = typer.Option("permute", help="correct-fix: permute | average the non-fixed classes"),
    loss: str = typer.Option("l1", help="l1 (paper) | kl | mse"),
    temperature: float = typer.Option(1.0, help="softmax temperature for kl"),
    preset: str = typer.Option("smoke", help="student/data/optimiser settings: smoke | study | paper"),
    data_dir: Optional[str] = typer.Option(None, help="default: the teacher's training data directory"),
    epochs: Optional[int] = typer.Option(None, help="override optim.epochs"),
    attack: bool = typer.Option(True, help="attack the student at the end (APGD-CE + APGD-DLR)"),
    n_examples: Optional[int] = typer.Option(None, help="examples for the final attack (default: the preset's)"),
    teacher_logits_run: Optional[str] = typer.Option(None, help="reuse this run's teacher-logit artifact"),
    set_: List[str] = typer.Option([], "--set", help="any config value: section.field=value (repeatable)"),
    overrides: Optional[str] = typer.Option(None, help="several section.field=value separated by spaces"),
):
    """Distil an AT teacher's (manipulated) logits into a student; register it with its lineage."""
    from robustlogits.config import apply_overrides
    from robustlogits.jobs.distill import distill_preset, run_distill

    cfg = distill_preset(preset)
    pairs = [("distill.manipulation", manipulation), ("distill.k", _blank(k)), ("distill.teacher", _blank(teacher)),
             ("distill.teacher_stage", _blank(teacher_stage)), ("distill.teacher_alias", _blank(teacher_alias)),
             ("distill.teacher_version", _blank(teacher_version)), ("distill.st_teacher", _blank(st_teacher)),
             ("distill.fix_mode", fix_mode), ("distill.loss", loss), ("distill.temperature", temperature),
             ("data.data_dir", _blank(data_dir)), ("optim.epochs", epochs), ("distill.attack", attack),
             ("distill.attack_n_examples", n_examples or None),
             ("distill.teacher_logits_run", _blank(teacher_logits_run))]
    apply_overrides(cfg, [f"{key}={value}" for key, value in pairs if value is not None])
    apply_overrides(cfg, [*set_, *split_overrides(overrides)])
    run_id = run_distill(cfg)
    typer.echo(distill_summary(run_id))


def distill_summary(run_id: str) -> str:
    from robustlogits.tracking import run_record

    tags, metrics = run_record(run_id)
    line = (f"run {run_id} finished; student {tags.get('registered_model', '?')} version "
            f"{tags.get('registered_versions', '?')} from teacher {tags.get('teacher_name')} "
            f"version {tags.get('teacher_version')} ({tags.get('manipulation')}"
            + (f" k={tags['k']}" if tags.get("k") else "") + ")")
    if "adversarial_accuracy" in metrics:
        line += (f"; on {int(metrics.get('n_examples', 0))} test examples: natural "
                 f"{metrics['natural_accuracy']:.4f}, adversarial {metrics['adversarial_accuracy']:.4f}")
    elif "checkpoint_test_accuracy" in metrics:
        line += f"; test accuracy {metrics['checkpoint_test_accuracy']:.4f} (not attacked)"
    return line


@app.command("import")
@cli_errors
def import_model(
    checkpoint: Optional[str] = typer.Option(None, help="TorchScript archive, state dict (.pt/.pth/.safetensors) or pickled module"),
    name: str = typer.Option(..., help="registered model name to create a version of"),
    arch: Optional[str] = typer.Option(None, help="architecture for a state dict: one of ours (resnet18, cnn-small, ...) or torchvision:NAME"),
    dataset: str = typer.Option("cifar10", help="cifar10 | cifar100 | synthetic: what the model classifies"),
    normalization: Optional[str] = typer.Option(None, help="none | cifar10 | cifar100 | MEAN,STD | M1,M2,M3,S1,S2,S3: what the network expects its [0,1] input standardised with (default: the checkpoint's own, else none)"),
    trust_pickle: bool = typer.Option(False, help="allow a pickled module (loading it runs code from the file)"),
    robustbench: Optional[str] = typer.Option(None, help="import this RobustBench model (package and weights already on the machine)"),
    model_dir: str = typer.Option("./models", help="RobustBench's model folder (MODEL_DIR/DATASET/THREAT_MODEL/NAME.pt)"),
    threat_model: str = typer.Option("Linf", help="RobustBench threat model"),
    data_dir: Optional[str] = typer.Option(None, help="where the test images for the check are"),
    check_images: int = typer.Option(200, help="stratified test images the model is checked and scored on"),
    stage: Optional[str] = typer.Option(None, help="move the new version to this stage (e.g. Production)"),
    alias: Optional[str] = typer.Option(None, help="give the new version this alias (e.g. teacher)"),
    device: str = typer.Option("auto"),
    experiment: str = typer.Option("robustlogits"),
):
    """Register a model trained elsewhere; attack, distill and analyze then use it like our own."""
    from robustlogits.jobs.import_model import ImportConfig, run_import

    cfg = ImportConfig(name=name, checkpoint=_blank(checkpoint), arch=_blank(arch), dataset=dataset,
                       normalization=_blank(normalization) if normalization != "none" else "none",
                       trust_pickle=trust_pickle, robustbench=_blank(robustbench), model_dir=model_dir,
                       threat_model=threat_model, data_dir=_blank(data_dir), check_images=check_images,
                       stage=_blank(stage), alias=_blank(alias), device=device, experiment=experiment)
    result = run_import(cfg, log=lambda msg: typer.echo(msg, err=True))
    typer.echo(f"registered {result['name']} version {result['version']} (run {result['run_id']}): natural accuracy "
               f"{result['natural_accuracy']:.4f} on {result['n_images']} test images; format {result['source_format']}, "
               f"normalisation {result['normalization']}, sha256 {result['source_sha256'][:16]}")


analyze_app = typer.Typer(help="The paper's analyses: Appendix C theory (C.1-C.3), logit gaps (Fig. 2), confidence ranks "
                          "(Fig. 3A/B), error classes (3C), average overlap (3D, B.6), image grids (B.2, B.3), manifolds (Fig. 5).",
                          no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
app.add_typer(analyze_app, name="analyze")


@analyze_app.command("theory")
@cli_errors
def analyze_theory(
    classes: str = typer.Option("10,100", help="class counts to analyse, comma separated"),
    error_rate: float = typer.Option(0.196, help="training error rate of the mean-field surface (paper: 19.6%)"),
    omega_correct: float = typer.Option(1.0, help="Omega for correctly classified samples (eq. 10)"),
    omega_wrong: float = typer.Option(1.0, help="Omega for misclassified samples (eq. 10)"),
    runs: Optional[str] = typer.Option(None, help="RUN_ID[:EPOCH],...: place these runs' test logits on the model's axes"),
    out: str = typer.Option("outputs/theory", help="folder for figures and theory.json"),
    track: bool = typer.Option(True, help="log figures and numbers to an MLflow run"),
):
    """Appendix C: admissible max logits (C.1), mean-field loss surface (C.2), FGSM gap change (C.3)."""
    from analysis.theory import run as run_theory_job

    try:
        counts = [int(c) for c in classes.replace(" ", "").split(",") if c]
    except ValueError:
        raise UserError(f"--classes must be comma-separated integers, got {classes!r}") from None
    specs = [s for s in re.split(r"[\s,]+", runs or "") if s]
    summary = run_theory_job(Path(out), counts, error_rate, omega_correct, omega_wrong, specs, track)
    for count, info in summary["class_counts"].items():
        typer.echo(f"{count} classes: misclassified samples need max logit > {info['misclassified_threshold']:.4f} "
                   f"(paper: 3.5); correct samples need max logit <= {info['correct_upper_bound']:.4f}")
    typer.echo(f"figures and theory.json in {out}" + (f"; run {summary['run_id']}" if "run_id" in summary else ""))


@analyze_app.command("manifold")
@cli_errors
def analyze_manifold(
    models: Optional[str] = typer.Option(None, "--models", help="models to compare (registry URIs or names); more may follow as arguments"),
    more_models: Optional[List[str]] = typer.Argument(None, help="further models"),
    n_images: int = typer.Option(50, help="P: test images (stratified), one manifold each"),
    n_perturbations: int = typer.Option(50, help="M: points per manifold in the eps ball"),
    n_features: int = typer.Option(500, help="N: random projection width for wider stages"),
    eps: str = typer.Option("8/255", help="Linf radius of the perturbation manifolds"),
    pgd_steps: int = typer.Option(5, help="PGD steps from each random start (0: random points of the ball)"),
    simulated: bool = typer.Option(False, help="also bisect for the simulated capacity (slow; Figure A.8)"),
    definitions: str = typer.Option("reference", help="R_M and D_M as the MFTMA reference code (reference) or as printed in A.4 (printed)"),
    center_method: str = typer.Option("reference", help="centre-structure removal: reference (as the reference code, K >= 1) | principal | none"),
    center_reps: int = typer.Option(10, help="random starts per K of the reference centre-structure optimisation"),
    seed: int = typer.Option(0),
    dataset: Optional[str] = typer.Option(None, help="default: the models' dataset"),
    data_dir: Optional[str] = typer.Option(None, help="default: the first model's training data directory"),
    out: str = typer.Option("outputs/manifold", help="folder for the figure and manifold.json"),
    track: bool = typer.Option(True, help="log to MLflow (a parent run plus one nested run per model)"),
    device: str = typer.Option("auto"),
):
    """Figure 5: manifold capacity, radius, dimension and centre correlation per stage (MFTMA)."""
    from analysis.manifolds import ManifoldSettings, run as run_manifold_job

    specs = [s for s in re.split(r"[\s,]+", models or "") if s] + list(more_models or [])
    settings = ManifoldSettings(n_images=n_images, n_perturbations=n_perturbations, n_features=n_features,
                                eps=_eps(eps), pgd_steps=pgd_steps, simulated=simulated, seed=seed,
                                definitions=definitions, center_method=center_method, center_reps=center_reps)
    summary = run_manifold_job(specs, settings, Path(out), _blank(data_dir), _blank(dataset), track, device=device)
    for label, table in summary["models"].items():
        cells = ", ".join(f"{s} {c:.3f}" for s, c in zip(table["stage"], table["capacity"]))
        typer.echo(f"{label}: capacity per stage: {cells}")
    typer.echo(f"figure and manifold.json in {out}" + (f"; run {summary['run_id']}" if "run_id" in summary else ""))


@analyze_app.command("gap")
@cli_errors
def analyze_gap(
    runs: str = typer.Option(..., help="attack run ids, comma separated (e.g. an ST and an AT model)"),
    bins: int = typer.Option(10, help="logit-gap bins"),
    max_gap: Optional[float] = typer.Option(None, help="upper edge of the last bin (default: 99th percentile)"),
    out: str = typer.Option("outputs/gap", help="folder for the figure and gap_robustness.json"),
    track: bool = typer.Option(True, help="log to MLflow"),
):
    """Figure 2: logit-gap distributions and adversarial accuracy per gap bin, from attack runs."""
    from analysis.gaps import run as run_gap_job

    summary = run_gap_job([s for s in re.split(r"[\s,]+", runs) if s], Path(out), bins, max_gap, track)
    for label, info in summary["models"].items():
        curve = ", ".join("-" if a is None else f"{a:.2f}" for a in info["bins"]["adversarial_accuracy"])
        typer.echo(f"{label}: mean gap {info['mean_gap']:.3f}; adversarial accuracy per gap bin: {curve}")
    typer.echo(f"figure and gap_robustness.json in {out}" + (f"; run {summary['run_id']}" if "run_id" in summary else ""))

MODELS_HELP = "models to compare (registered names, models:/ or runs:/ URIs); more may follow as arguments"
GROUP_HELP = "NAME=MODEL,MODEL,... (repeatable), e.g. --group ST=a,b,c --group AT=d,e,f (default: by training, ST/AT)"


def _specs(models: Optional[str], more: Optional[List[str]]) -> list[str]:
    return [s for s in re.split(r"[\s,]+", models or "") if s] + [s for s in more or [] if s]


def _done(summary: dict, out: str, what: str) -> None:
    typer.echo(f"figures and {what}.json in {out}" + (f"; run {summary['run_id']}" if summary.get("run_id") else ""))


@analyze_app.command("ranks")
@cli_errors
def analyze_ranks(
    models: Optional[str] = typer.Option(None, "--models", help=MODELS_HELP),
    more_models: Optional[List[str]] = typer.Argument(None, help="further models"),
    group: List[str] = typer.Option([], "--group", help=GROUP_HELP),
    class_name: Optional[str] = typer.Option(None, "--class", help="class of the Figure 3A scatter, name or index (default: frog, else the first)"),
    score: str = typer.Option("softmax", help="softmax (the paper's) | logit"),
    target: str = typer.Option("label", help="confidence in the true class (label) or the predicted one (top)"),
    dataset: Optional[str] = typer.Option(None, help="default: the models' dataset"),
    data_dir: Optional[str] = typer.Option(None, help="default: the first model's training data directory"),
    out: str = typer.Option("outputs/ranks", help="folder for the figures and ranks.json"),
    track: bool = typer.Option(True, help="log to MLflow"),
    device: str = typer.Option("auto"),
):
    """Figure 3A/B: per-class confidence rank order of every pair of models."""
    from analysis.ranks import run

    summary = run(_specs(models, more_models), group, class_name=_blank(class_name), score=score, target=target,
                  out_dir=Path(out), data_dir=_blank(data_dir), dataset=_blank(dataset), device=device, track=track)
    for name, stats in summary["group_stats"].items():
        typer.echo(f"{name}: {100 * stats['mean']:.1f}% +- {100 * stats['std']:.1f}% of examples ranked far apart "
                   f"({stats['n_pairs']} pair{'s' if stats['n_pairs'] > 1 else ''})")
    _done(summary, out, "ranks")


@analyze_app.command("errors")
@cli_errors
def analyze_errors(
    models: Optional[str] = typer.Option(None, "--models", help=MODELS_HELP),
    more_models: Optional[List[str]] = typer.Argument(None, help="further models"),
    group: List[str] = typer.Option([], "--group", help=GROUP_HELP),
    attack_runs: Optional[str] = typer.Option(None, help="attack run ids (default: each model version's newest attack run)"),
    dataset: Optional[str] = typer.Option(None, help="default: the models' dataset"),
    data_dir: Optional[str] = typer.Option(None, help="default: the first model's training data directory"),
    out: str = typer.Option("outputs/errors", help="folder for the figure and errors.json"),
    track: bool = typer.Option(True, help="log to MLflow"),
    device: str = typer.Option("auto"),
):
    """Figure 3C: rank of each error's predicted class in its true class's mean logit vector."""
    from analysis.error_classes import run

    summary = run(_specs(models, more_models), group, attack_runs=_specs(attack_runs, None), out_dir=Path(out),
                  data_dir=_blank(data_dir), dataset=_blank(dataset), device=device, track=track)
    for label, entry in summary["models"].items():
        line = f"{label}: natural errors at rank 2..4: " + ", ".join(f"{v:.2f}" for v in entry["natural"][1:4])
        if entry["adversarial"] is not None:
            line += "; adversarial: " + ", ".join(f"{v:.2f}" for v in entry["adversarial"][1:4])
        typer.echo(line)
    _done(summary, out, "errors")


@analyze_app.command("overlap")
@cli_errors
def analyze_overlap(
    models: Optional[str] = typer.Option(None, "--models", help=MODELS_HELP),
    more_models: Optional[List[str]] = typer.Argument(None, help="further models"),
    group: List[str] = typer.Option([], "--group", help=GROUP_HELP),
    seed: int = typer.Option(0, help="seed of the within-class permutation (control)"),
    dataset: Optional[str] = typer.Option(None, help="default: the models' dataset"),
    data_dir: Optional[str] = typer.Option(None, help="default: the first model's training data directory"),
    out: str = typer.Option("outputs/overlap", help="folder for the figure and overlap.json"),
    track: bool = typer.Option(True, help="log to MLflow"),
    device: str = typer.Option("auto"),
):
    """Figure 3D / B.6: average overlap AO@k of the models' per-example logit rank orders."""
    from analysis.overlap import run

    summary = run(_specs(models, more_models), group, seed=seed, out_dir=Path(out), data_dir=_blank(data_dir),
                  dataset=_blank(dataset), device=device, track=track)
    for name, entry in summary["group_curves"].items():
        for kind, stats in entry.items():
            cells = ", ".join(f"{m:.3f}+-{s:.3f}" for m, s in list(zip(stats["mean"], stats["std"]))[:5])
            typer.echo(f"{name} [{kind}]: AO@1..5 {cells}")
    _done(summary, out, "overlap")


@analyze_app.command("images")
@cli_errors
def analyze_images(
    models: Optional[str] = typer.Option(None, "--models", help=MODELS_HELP),
    more_models: Optional[List[str]] = typer.Argument(None, help="further models"),
    group: List[str] = typer.Option([], "--group", help=GROUP_HELP),
    class_name: Optional[str] = typer.Option(None, "--class", help="class of the Figure B.2 quadrants (default: frog, else the first)"),
    score: str = typer.Option("softmax", help="softmax | logit confidence"),
    per_quadrant: int = typer.Option(16, help="images shown per quadrant"),
    seed_classes: Optional[str] = typer.Option(None, help="classes of the B.3 seed images (default: the first five)"),
    n_neighbours: int = typer.Option(5, help="nearest images per seed (cosine similarity of logits)"),
    n_random_seeds: int = typer.Option(1000, help="random seeds for the same-class-neighbour fraction"),
    seed: int = typer.Option(0),
    dataset: Optional[str] = typer.Option(None, help="default: the models' dataset"),
    data_dir: Optional[str] = typer.Option(None, help="default: the first model's training data directory"),
    out: str = typer.Option("outputs/images", help="folder for the figures and images.json"),
    track: bool = typer.Option(True, help="log to MLflow"),
    device: str = typer.Option("auto"),
):
    """Figures B.2 (confidence quadrants of one class) and B.3 (nearest images by logit cosine)."""
    from analysis.images import run

    summary = run(_specs(models, more_models), group, class_name=_blank(class_name), score=score, per_quadrant=per_quadrant,
                  seed_classes=_specs(seed_classes, None) or None, n_neighbours=n_neighbours,
                  n_random_seeds=n_random_seeds, seed=seed, out_dir=Path(out), data_dir=_blank(data_dir),
                  dataset=_blank(dataset), device=device, track=track)
    q = summary["quadrants"]
    typer.echo(f"class {q['class']}: Spearman {q['spearman']:.3f} between {q['model_a']} and {q['model_b']}")
    for label, entry in summary["neighbours"]["models"].items():
        if "same_class_fraction" in entry:
            typer.echo(f"{label}: {100 * entry['same_class_fraction']:.1f}% of logit neighbours share the seed's class")
    _done(summary, out, "images")


sweep_app = typer.Typer(help="Optuna sweeps over teacher epoch and distillation loss (Figures A.6, A.7).",
                        pretty_exceptions_enable=False, add_completion=False)
app.add_typer(sweep_app, name="sweep")


def _csv(text: Optional[str]) -> list[str]:
    return [t for t in re.split(r"[\s,]+", text or "") if t]


@sweep_app.callback(invoke_without_command=True)
@cli_errors
def sweep(
    ctx: typer.Context,
    teacher: Optional[str] = typer.Option(None, help="registered AT teacher name (its checkpoints are the epochs swept)"),
    teacher_epochs: str = typer.Option("all", help="comma list of checkpoint epochs, or all"),
    losses: str = typer.Option("l1", help="comma list: l1, kl, mse"),
    temperatures: str = typer.Option("1", help="kl temperatures, comma list"),
    manipulations: str = typer.Option("none", help="comma list: none, permute, average, correct-fix, hybrid"),
    ks: Optional[str] = typer.Option(None, help="k values for permute/average/correct-fix, comma list"),
    seeds: Optional[str] = typer.Option(None, help="student seeds, comma list (repeats give mean +- std)"),
    lrs: Optional[str] = typer.Option(None, help="student learning rates, comma list"),
    sampler: str = typer.Option("grid", help="grid (every point) | tpe | random"),
    n_trials: Optional[int] = typer.Option(None, help="trial budget of tpe/random (the whole study, all workers)"),
    objective: str = typer.Option("adversarial", help="adversarial | natural | natural,adversarial (Pareto)"),
    preset: str = typer.Option("smoke", help="student/data/optimiser settings (as in distill)"),
    data_dir: Optional[str] = typer.Option(None, help="default: found again from the teacher's data (digest checked)"),
    study: Optional[str] = typer.Option(None, help="study name (default: derived from the search space)"),
    storage: Optional[str] = typer.Option(None, envvar="ROBUSTLOGITS_STORAGE",
                                          help="SQLAlchemy URL (default: sqlite optuna.db beside the MLflow store)"),
    workers: int = typer.Option(1, help="worker processes on this machine (threads each = cores / workers)"),
    create_only: bool = typer.Option(False, help="create the study and queue the grid, run no worker here"),
    workers_per_device: int = typer.Option(1, help="workers sharing one GPU"),
    heartbeat: int = typer.Option(10, help="seconds between worker heartbeats (a silent worker's trial is retried)"),
    sampler_seed: int = typer.Option(0, help="seed of the tpe/random sampler"),
    set_: List[str] = typer.Option([], "--set", help="any distill config value: section.field=value (repeatable)"),
    overrides: Optional[str] = typer.Option(None, help="several section.field=value separated by spaces"),
):
    """Sweep teacher checkpoint x distillation loss (and manipulation, k, seed, lr) with Optuna."""
    if ctx.invoked_subcommand:
        return
    from robustlogits.study.sweep import SweepSettings, run_sweep

    if not _blank(teacher):
        raise UserError("--teacher is required (a registered AT teacher name, e.g. cifar10-cnn-small-at)")
    settings = SweepSettings(
        teacher=teacher, teacher_epochs=_csv(teacher_epochs) or ["all"], losses=_csv(losses),
        temperatures=_csv(temperatures), manipulations=_csv(manipulations), ks=_csv(_blank(ks)),
        seeds=_csv(_blank(seeds)), lrs=_csv(_blank(lrs)), sampler=sampler, n_trials=n_trials or None,
        objectives=_csv(objective), preset=preset, data_dir=_blank(data_dir), study=_blank(study),
        storage=_blank(storage), workers=workers, workers_per_device=workers_per_device, heartbeat=heartbeat,
        sampler_seed=sampler_seed, create_only=create_only, overrides=[*set_, *split_overrides(overrides)])
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
    storage: str = typer.Option(..., envvar="ROBUSTLOGITS_STORAGE",
                                help="the study's SQLAlchemy URL, e.g. postgresql://user:pw@host/db"),
    n_trials: Optional[int] = typer.Option(None, help="stop after this many trials (default: until none is left)"),
    heartbeat: int = typer.Option(10, help="seconds between heartbeats (0: none)"),
    data_dir: Optional[str] = typer.Option(None, help="where this machine keeps the data (else $ROBUSTLOGITS_DATA, defaults)"),
):
    """Join a study from any machine that reaches its storage and MLFLOW_TRACKING_URI."""
    from robustlogits.study import engine as study_engine
    if _blank(data_dir):
        os.environ["ROBUSTLOGITS_DATA"] = str(Path(data_dir).expanduser().resolve())
    ran = study_engine.run_worker(study, storage, n_trials, heartbeat or None)
    st = study_engine.status(study_engine.load(study, storage, heartbeat or None))
    typer.echo(f"worker ran {ran} trial(s); study {study}: {st.summary()}")


@sweep_app.command("report")
@cli_errors
def sweep_report(
    study: str = typer.Option(..., help="study name"),
    storage: Optional[str] = typer.Option(None, envvar="ROBUSTLOGITS_STORAGE",
                                          help="default: sqlite optuna.db beside the MLflow store"),
):
    """Refresh a study's figures and trials.csv on its parent run and print the table."""
    from robustlogits.study import engine as study_engine
    url = _blank(storage) or study_engine.default_storage()
    loaded = study_engine.load(study, url, None)
    study_engine.refresh_report(loaded)
    rows = study_engine.trial_rows(loaded)
    typer.echo(study_engine.trials_csv(rows).rstrip())
    typer.echo(f"study {study}: {study_engine.status(loaded).summary()}; parent run {study_engine.parent_run_id(loaded)}")


@app.command()
@cli_errors
def reproduce(
    scale: str = typer.Option("smoke", help="smoke (CPU, minutes) | study (CPU, hours) | paper (appendix A.2, GPUs)"),
    seeds: Optional[str] = typer.Option(None, help="seeds per model (default: the scale's)"),
    only: Optional[str] = typer.Option(None, help="only these steps, comma list: train, attack, distill, sweeps, gap, "
                                                  "theory, manifold, ranks, errors, overlap, images"),
    skip: Optional[str] = typer.Option(None, help="skip these steps, comma list"),
    workers: int = typer.Option(1, help="local worker processes (threads each = cores / workers)"),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL shared with `sweep worker`s on other machines "
                                                     "(default: sqlite optuna.db beside the MLflow store)"),
    out: str = typer.Option("reproduce", help="folder for report/index.html and report/report.md"),
    data_dir: Optional[str] = typer.Option(None, help="where CIFAR-10 (and CIFAR-100, if present) are"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan: steps, keys, done or not, time estimate"),
    heartbeat: int = typer.Option(10, help="seconds between worker heartbeats (a silent worker's step is retried)"),
    experiment: str = typer.Option("robustlogits-reproduce", help="MLflow experiment of the study run"),
):
    """The paper's whole study as one resumable command, and a report beside the paper's numbers."""
    from robustlogits.study.reproduce.run import ReproduceOptions, plan_table, run_reproduce

    try:
        n_seeds = int(seeds) if _blank(seeds) else None
    except ValueError:
        raise UserError(f"--seeds must be an integer, got {seeds!r}") from None
    opts = ReproduceOptions(scale=scale, seeds=n_seeds, only=_csv(only), skip=_csv(skip), workers=workers,
                            storage=_blank(storage), out=out, data_dir=_blank(data_dir), dry_run=dry_run,
                            experiment=experiment, heartbeat=heartbeat)
    result = run_reproduce(opts)
    if dry_run:
        typer.echo(plan_table(result["plan"], workers, result["throughput"]))
        return
    verdicts = result["verdicts"]
    typer.echo(f"study run {result['parent_run_id']}: claims held {verdicts.count('held')}, not held "
               f"{verdicts.count('not held')}, not measured {verdicts.count('not measured')}; "
               f"report in {result['report']}/index.html")


@app.command("config")
@cli_errors
def show_config(preset: str = typer.Option("smoke", help="preset to print")):
    """Print every config key of a preset (what --set and MLflow params use)."""
    from robustlogits.config import flatten, preset as make_preset

    for key, value in flatten(make_preset(preset)).items():
        typer.echo(f"{key}={value}")


# Short MLproject names accepted beside the logged (dotted) ones, so the product's own usage
# `mlflow run . -e distill -P manipulation=permute -P k=3` works. A short name is recorded by the
# `mlflow run` launcher as typed and by the job under its dotted name; dotted names appear once.
MLPROJECT_ALIASES = {
    "training": "run.training", "dataset": "data.dataset", "arch": "model.arch", "data_dir": "data.data_dir",
    "epochs": "optim.epochs", "seed": "run.seed", "checkpoint_epochs": "run.checkpoint_epochs",
    "teacher_epoch": "run.teacher_epoch", "overrides": None,
    **{name: f"distill.{name}" for name in ("manipulation", "k", "teacher", "teacher_stage", "teacher_alias",
                                            "teacher_version", "st_teacher", "fix_mode", "loss", "temperature")},
}


def mlproject_args(argv: list[str], *, options_prefix: str | None = None, plain: tuple[str, ...] = (),
                   aliases: dict[str, str | None] | None = None) -> list[str]:
    """MLproject parameters arrive as `--section.field VALUE`, named as the run's params, so `mlflow
    run` logs each value once under one name. They become `--set section.field=VALUE` (or, with
    `options_prefix`, the command's own `--field` option); `plain` names pass as is; `aliases`
    maps short names to dotted ones (None: a space-separated list of `section.field=value`)."""
    aliases = MLPROJECT_ALIASES if aliases is None else aliases
    out, i = [], 0
    while i < len(argv):
        name, value = argv[i], argv[i + 1] if i + 1 < len(argv) else ""
        key = name[2:] if name.startswith("--") else name
        if options_prefix and "." not in key and key not in plain:
            key = f"{options_prefix}.{key}"
        if options_prefix and key.startswith(options_prefix + "."):
            out += [f"--{key[len(options_prefix) + 1:].replace('_', '-')}", value]
        elif key in plain:
            out += [f"--{key.replace('_', '-')}", value]
        elif not options_prefix and key in aliases:
            dotted = aliases[key]
            out += ["--overrides", value] if dotted is None else ["--set", f"{dotted}={value}"]
        elif not options_prefix and "." in key:
            out += ["--set", f"{key}={value}"]
        else:
            typer.echo(f"error: unknown MLproject parameter {key!r}: pass a config key as the run logs it, e.g. "
                       "-P run.training=adversarial (`robustlogits config` lists every key)", err=True)
            raise SystemExit(2)
        i += 2
    return out


def single_command(fn) -> typer.Typer:
    """A one-command Typer app for an MLproject entry point, with the same error handling."""
    command_app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    command_app.command()(fn)
    return command_app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
