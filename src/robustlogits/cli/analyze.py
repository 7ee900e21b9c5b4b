"""`robustlogits analyze ...`: the paper's analyses, one command each."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from robustlogits.cli.app import app, blank, cli_errors, fraction_text, parse_eps
from robustlogits.config import ManifoldConfig
from robustlogits.core.errors import UserError

MODELS_HELP = "models to compare (registered names, models:/ or runs:/ URIs); more may follow as arguments"
GROUP_HELP = "NAME=MODEL,MODEL,... (repeatable), e.g. --group ST=a,b,c --group AT=d,e,f (default: by training, ST/AT)"

# The options every analysis of models shares.
Models = Annotated[Optional[str], typer.Option("--models", help=MODELS_HELP)]
MoreModels = Annotated[Optional[List[str]], typer.Argument(help="further models")]
Groups = Annotated[Optional[List[str]], typer.Option("--group", help=GROUP_HELP)]
Dataset = Annotated[Optional[str], typer.Option(help="default: the models' dataset")]
DataDir = Annotated[Optional[str], typer.Option(help="default: the first model's training data directory")]
Track = Annotated[bool, typer.Option(help="log to MLflow")]
Device = Annotated[str, typer.Option(help="auto (a study worker's device, else a GPU if any), cpu, cuda, cuda:N")]


analyze_app = typer.Typer(
    help="The paper's analyses: Appendix C theory (C.1-C.3), logit gaps (Fig. 2), confidence ranks "
    "(Fig. 3A/B), error classes (3C), average overlap (3D, B.6), image grids (B.2, B.3), manifolds (Fig. 5).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(analyze_app, name="analyze")


@analyze_app.command("theory")
@cli_errors
def analyze_theory(
    classes: str = typer.Option("10,100", help="class counts to analyse, comma separated"),
    error_rate: float = typer.Option(0.196, help="training error rate of the mean-field surface (paper: 19.6%)"),
    omega_correct: float = typer.Option(1.0, help="Omega for correctly classified samples (eq. 10)"),
    omega_wrong: float = typer.Option(1.0, help="Omega for misclassified samples (eq. 10)"),
    runs: Optional[str] = typer.Option(
        None, help="RUN_ID[:EPOCH],...: place these runs' test logits on the model's axes"
    ),
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
        typer.echo(
            f"{count} classes: misclassified samples need max logit > {info['misclassified_threshold']:.4f} "
            f"(paper: 3.5); correct samples need max logit <= {info['correct_upper_bound']:.4f}"
        )
    typer.echo(f"figures and theory.json in {out}" + (f"; run {summary['run_id']}" if "run_id" in summary else ""))


@analyze_app.command("manifold")
@cli_errors
def analyze_manifold(
    models: Optional[str] = typer.Option(
        None, "--models", help="models to compare (registry URIs or names); more may follow as arguments"
    ),
    more_models: MoreModels = None,
    n_images: int = typer.Option(ManifoldConfig.n_images, help="P: test images (stratified), one manifold each"),
    n_perturbations: int = typer.Option(ManifoldConfig.n_perturbations, help="M: points per manifold in the eps ball"),
    n_features: int = typer.Option(ManifoldConfig.n_features, help="N: random projection width for wider stages"),
    eps: str = typer.Option(fraction_text(ManifoldConfig.eps), help="Linf radius of the perturbation manifolds"),
    pgd_steps: int = typer.Option(
        ManifoldConfig.pgd_steps, help="PGD steps from each random start (0: random points of the ball)"
    ),
    simulated: bool = typer.Option(
        ManifoldConfig.simulated, help="also bisect for the simulated capacity (slow; Figure A.8)"
    ),
    definitions: str = typer.Option(
        ManifoldConfig.definitions,
        help="R_M and D_M as the MFTMA reference code (reference) or as printed in A.4 (printed)",
    ),
    center_method: str = typer.Option(
        ManifoldConfig.center_method,
        help="centre-structure removal: reference (as the reference code, K >= 1) | principal | none",
    ),
    center_reps: int = typer.Option(
        ManifoldConfig.center_reps, help="random starts per K of the reference centre-structure optimisation"
    ),
    seed: int = typer.Option(ManifoldConfig.seed),
    dataset: Dataset = None,
    data_dir: DataDir = None,
    out: str = typer.Option("outputs/manifold", help="folder for the figure and manifold.json"),
    track: bool = typer.Option(True, help="log to MLflow (a parent run plus one nested run per model)"),
    device: Device = "auto",
):
    """Figure 5: manifold capacity, radius, dimension and centre correlation per stage (MFTMA)."""
    from analysis.manifolds import run as run_manifold_job

    specs = [s for s in re.split(r"[\s,]+", models or "") if s] + list(more_models or [])
    settings = ManifoldConfig(
        n_images=n_images,
        n_perturbations=n_perturbations,
        n_features=n_features,
        eps=parse_eps(eps),
        pgd_steps=pgd_steps,
        simulated=simulated,
        seed=seed,
        definitions=definitions,
        center_method=center_method,
        center_reps=center_reps,
    )
    summary = run_manifold_job(specs, settings, Path(out), blank(data_dir), blank(dataset), track, device=device)
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
    track: Track = True,
):
    """Figure 2: logit-gap distributions and adversarial accuracy per gap bin, from attack runs."""
    from analysis.gaps import run as run_gap_job

    summary = run_gap_job([s for s in re.split(r"[\s,]+", runs) if s], Path(out), bins, max_gap, track)
    for label, info in summary["models"].items():
        curve = ", ".join("-" if a is None else f"{a:.2f}" for a in info["bins"]["adversarial_accuracy"])
        typer.echo(f"{label}: mean gap {info['mean_gap']:.3f}; adversarial accuracy per gap bin: {curve}")
    typer.echo(
        f"figure and gap_robustness.json in {out}" + (f"; run {summary['run_id']}" if "run_id" in summary else "")
    )


def _specs(models: Optional[str], more: Optional[List[str]]) -> list[str]:
    return [s for s in re.split(r"[\s,]+", models or "") if s] + [s for s in more or [] if s]


def _where(out: str, data_dir: str | None, dataset: str | None, device: str, track: bool) -> dict:
    """Where an analysis of models reads and writes: the arguments every one of them takes."""
    return dict(out_dir=Path(out), data_dir=blank(data_dir), dataset=blank(dataset), device=device, track=track)


def _done(summary: dict, out: str, what: str) -> None:
    typer.echo(f"figures and {what}.json in {out}" + (f"; run {summary['run_id']}" if summary.get("run_id") else ""))


@analyze_app.command("ranks")
@cli_errors
def analyze_ranks(
    models: Models = None,
    more_models: MoreModels = None,
    group: Groups = None,
    class_name: Optional[str] = typer.Option(
        None, "--class", help="class of the Figure 3A scatter, name or index (default: frog, else the first)"
    ),
    score: str = typer.Option("softmax", help="softmax (the paper's) | logit"),
    target: str = typer.Option("label", help="confidence in the true class (label) or the predicted one (top)"),
    dataset: Dataset = None,
    data_dir: DataDir = None,
    out: str = typer.Option("outputs/ranks", help="folder for the figures and ranks.json"),
    track: Track = True,
    device: Device = "auto",
):
    """Figure 3A/B: per-class confidence rank order of every pair of models."""
    from analysis.ranks import run

    summary = run(
        _specs(models, more_models),
        group or [],
        class_name=blank(class_name),
        score=score,
        target=target,
        **_where(out, data_dir, dataset, device, track),
    )
    for name, stats in summary["group_stats"].items():
        typer.echo(
            f"{name}: {100 * stats['mean']:.1f}% +- {100 * stats['std']:.1f}% of examples ranked far apart "
            f"({stats['n_pairs']} pair{'s' if stats['n_pairs'] > 1 else ''})"
        )
    _done(summary, out, "ranks")


@analyze_app.command("errors")
@cli_errors
def analyze_errors(
    models: Models = None,
    more_models: MoreModels = None,
    group: Groups = None,
    attack_runs: Optional[str] = typer.Option(
        None, help="attack run ids (default: each model version's newest attack run)"
    ),
    dataset: Dataset = None,
    data_dir: DataDir = None,
    out: str = typer.Option("outputs/errors", help="folder for the figure and errors.json"),
    track: Track = True,
    device: Device = "auto",
):
    """Figure 3C: rank of each error's predicted class in its true class's mean logit vector."""
    from analysis.error_classes import run

    summary = run(
        _specs(models, more_models),
        group or [],
        attack_runs=_specs(attack_runs, None),
        **_where(out, data_dir, dataset, device, track),
    )
    for label, entry in summary["models"].items():
        line = f"{label}: natural errors at rank 2..4: " + ", ".join(f"{v:.2f}" for v in entry["natural"][1:4])
        if entry["adversarial"] is not None:
            line += "; adversarial: " + ", ".join(f"{v:.2f}" for v in entry["adversarial"][1:4])
        typer.echo(line)
    _done(summary, out, "errors")


@analyze_app.command("overlap")
@cli_errors
def analyze_overlap(
    models: Models = None,
    more_models: MoreModels = None,
    group: Groups = None,
    seed: int = typer.Option(0, help="seed of the within-class permutation (control)"),
    dataset: Dataset = None,
    data_dir: DataDir = None,
    out: str = typer.Option("outputs/overlap", help="folder for the figure and overlap.json"),
    track: Track = True,
    device: Device = "auto",
):
    """Figure 3D / B.6: average overlap AO@k of the models' per-example logit rank orders."""
    from analysis.overlap import run

    summary = run(
        _specs(models, more_models),
        group or [],
        seed=seed,
        **_where(out, data_dir, dataset, device, track),
    )
    for name, entry in summary["group_curves"].items():
        for kind, stats in entry.items():
            cells = ", ".join(f"{m:.3f}+-{s:.3f}" for m, s in list(zip(stats["mean"], stats["std"]))[:5])
            typer.echo(f"{name} [{kind}]: AO@1..5 {cells}")
    _done(summary, out, "overlap")


@analyze_app.command("images")
@cli_errors
def analyze_images(
    models: Models = None,
    more_models: MoreModels = None,
    group: Groups = None,
    class_name: Optional[str] = typer.Option(
        None, "--class", help="class of the Figure B.2 quadrants (default: frog, else the first)"
    ),
    score: str = typer.Option("softmax", help="softmax | logit confidence"),
    per_quadrant: int = typer.Option(16, help="images shown per quadrant"),
    seed_classes: Optional[str] = typer.Option(None, help="classes of the B.3 seed images (default: the first five)"),
    n_neighbours: int = typer.Option(5, help="nearest images per seed (cosine similarity of logits)"),
    n_random_seeds: int = typer.Option(1000, help="random seeds for the same-class-neighbour fraction"),
    seed: int = typer.Option(0),
    dataset: Dataset = None,
    data_dir: DataDir = None,
    out: str = typer.Option("outputs/images", help="folder for the figures and images.json"),
    track: Track = True,
    device: Device = "auto",
):
    """Figures B.2 (confidence quadrants of one class) and B.3 (nearest images by logit cosine)."""
    from analysis.images import run

    summary = run(
        _specs(models, more_models),
        group or [],
        class_name=blank(class_name),
        score=score,
        per_quadrant=per_quadrant,
        seed_classes=_specs(seed_classes, None) or None,
        n_neighbours=n_neighbours,
        n_random_seeds=n_random_seeds,
        seed=seed,
        **_where(out, data_dir, dataset, device, track),
    )
    q = summary["quadrants"]
    typer.echo(f"class {q['class']}: Spearman {q['spearman']:.3f} between {q['model_a']} and {q['model_b']}")
    for label, entry in summary["neighbours"]["models"].items():
        if "same_class_fraction" in entry:
            typer.echo(f"{label}: {100 * entry['same_class_fraction']:.1f}% of logit neighbours share the seed's class")
    _done(summary, out, "images")
