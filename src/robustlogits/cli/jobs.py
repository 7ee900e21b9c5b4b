"""Commands that run one job: train, attack, distill, import; and `config`, which lists a preset."""

from __future__ import annotations

from typing import List, Optional

import typer

from robustlogits.cli.app import app, blank, cli_errors, fraction_text, parse_eps, split_overrides
from robustlogits.config import DEFAULT_PRESET, AttackConfig, DistillationConfig, ImportConfig, RunConfig


@app.command()
@cli_errors
def train(
    training: str = typer.Option(RunConfig.training, help="standard | adversarial"),
    preset: str = typer.Option(
        DEFAULT_PRESET, help="smoke | laptop | study | paper | test (see `robustlogits config`)"
    ),
    dataset: Optional[str] = typer.Option(None, help="cifar10 | cifar100 | synthetic (default: the preset's)"),
    arch: Optional[str] = typer.Option(
        None,
        help="resnet18 | resnet18-w32 | resnet18-w16 | resnet20 | vgg-fast | vgg-fast-wide | vgg-fast-s | vgg-fast-white "
        "| vgg-fast-wide-white | cnn-small | cnn-tiny",
    ),
    data_dir: Optional[str] = typer.Option(
        None, help="where the data is (default: $ROBUSTLOGITS_DATA, else ./data, then ../shared/data)"
    ),
    epochs: Optional[int] = typer.Option(None, help="override optim.epochs"),
    checkpoint_epochs: Optional[str] = typer.Option(None, help="comma list, e.g. 20,40,200"),
    teacher_epoch: Optional[int] = typer.Option(None, help="checkpoint promoted as the teacher (paper: 40)"),
    seed: Optional[int] = typer.Option(None, help="override run.seed"),
    resume: Optional[str] = typer.Option(None, help="continue this killed/failed run id from its last epoch"),
    set_: List[str] = typer.Option([], "--set", help="any config value: section.field=value (repeatable)"),
    overrides: Optional[str] = typer.Option(None, help="several section.field=value separated by spaces"),
):
    """Standard or PGD adversarial training; every epoch's logit distribution goes to MLflow."""
    from robustlogits.config import apply_overrides
    from robustlogits.config import preset as make_preset
    from robustlogits.jobs.train import run_training

    resume = blank(resume)
    cfg = make_preset(preset, training)
    pairs = [
        ("data.dataset", blank(dataset)),
        ("model.arch", blank(arch)),
        ("data.data_dir", blank(data_dir)),
        ("optim.epochs", epochs),
        ("run.checkpoint_epochs", blank(checkpoint_epochs)),
        ("run.teacher_epoch", teacher_epoch),
        ("run.seed", seed),
    ]
    extra = [*set_, *split_overrides(overrides)]
    apply_overrides(cfg, [f"{k}={v}" for k, v in pairs if v is not None])
    apply_overrides(cfg, extra)
    if not blank(checkpoint_epochs) and not any(o.startswith("run.checkpoint_epochs") for o in extra):
        user_teacher = teacher_epoch is not None or any(o.startswith("run.teacher_epoch") for o in extra)
        cfg.fit_schedule_to_epochs(keep_teacher=user_teacher)  # preset checkpoints follow --epochs
    run_id = run_training(cfg, resume=resume)
    typer.echo(training_summary(run_id))


def training_summary(run_id: str) -> str:
    """The closing line, from what the run itself recorded (a resumed run's config is its own)."""
    from robustlogits.tracking import run_record

    record = run_record(run_id)
    tags, metrics = record.tags, record.metrics
    line = f"run {run_id} finished"
    if tags.get("registered_model"):
        line += f"; registered model {tags['registered_model']} version(s) {tags.get('registered_versions', '?')}"
    if tags.get("teacher_version"):
        line += f", teacher = version {tags['teacher_version']}"
    held = next((k for k in ("val_accuracy", "test_accuracy") if k in metrics), None)
    return line + (f"; final {held} {metrics[held]:.4f}" if held else "")


@app.command()
@cli_errors
def attack(
    model: Optional[str] = typer.Option(
        None, help="models:/NAME@ALIAS, models:/NAME/STAGE, models:/NAME/VERSION, a registered NAME, or runs:/ID/PATH"
    ),
    stage: Optional[str] = typer.Option(None, help="with a registered NAME: the stage to pull (default Production)"),
    alias: Optional[str] = typer.Option(None, help="with a registered NAME: the alias to pull"),
    version: Optional[str] = typer.Option(None, help="with a registered NAME: the version to pull"),
    dataset: Optional[str] = typer.Option(None, help="default: the model's dataset"),
    data_dir: Optional[str] = typer.Option(None, help="default: the data directory of the model's training run"),
    eps: str = typer.Option(fraction_text(AttackConfig.eps), help="Linf radius in [0,1] pixel units"),
    n_iter: int = typer.Option(AttackConfig.n_iter, help="APGD iterations"),
    n_restarts: int = typer.Option(AttackConfig.n_restarts, help="APGD restarts"),
    seed: int = typer.Option(AttackConfig.seed),
    suite: str = typer.Option(AttackConfig.suite, help="apgd-ce-dlr (the paper's) | standard (full AutoAttack)"),
    n_examples: Optional[int] = typer.Option(None, help="stratified, seeded subset of the test split (default: all)"),
    batch_size: Optional[int] = typer.Option(None, help="default: chosen to fit the device"),
    device: str = typer.Option(AttackConfig.device),
    experiment: str = typer.Option(AttackConfig.experiment),
):
    """Adversarial accuracy: APGD-CE, then APGD-DLR on the survivors; per-example results in MLflow."""
    from robustlogits.jobs.attack import run_attack

    cfg = AttackConfig(
        model=blank(model) or "",
        stage=blank(stage),
        alias=blank(alias),
        version=blank(version),
        dataset=blank(dataset),
        data_dir=blank(data_dir),
        eps=parse_eps(eps),
        n_iter=n_iter,
        n_restarts=n_restarts,
        seed=seed,
        suite=suite,
        n_examples=n_examples or None,
        batch_size=batch_size or None,
        device=device,
        experiment=experiment,
    )
    run_id, result = run_attack(cfg)
    typer.echo(
        f"run {run_id}: natural {result.natural_accuracy:.4f}, after APGD-CE {result.accuracy_after_apgd_ce:.4f}, "
        f"adversarial {result.adversarial_accuracy:.4f} on {result.n_examples} examples ({result.seconds:.1f} s)"
    )


@app.command()
@cli_errors
def distill(
    manipulation: str = typer.Option(
        DistillationConfig.manipulation, help="none | permute | average | correct-fix | hybrid"
    ),
    k: Optional[str] = typer.Option(None, help="fix the top-k classes (permute/average; correct-fix default 1)"),
    teacher: Optional[str] = typer.Option(None, help="registry URI or registered name (default: <dataset>-<arch>-at)"),
    teacher_stage: Optional[str] = typer.Option(None, help="stage of a registered teacher name (default Production)"),
    teacher_alias: Optional[str] = typer.Option(None, help="alias of a registered teacher name"),
    teacher_version: Optional[str] = typer.Option(None, help="version of a registered teacher name"),
    st_teacher: Optional[str] = typer.Option(
        None, help="standard-trained teacher for hybrid (default: <dataset>-<arch>-st, Production)"
    ),
    fix_mode: str = typer.Option(
        DistillationConfig.fix_mode, help="correct-fix: permute | average the non-fixed classes"
    ),
    loss: str = typer.Option(DistillationConfig.loss, help="l1 (paper) | kl | mse"),
    temperature: float = typer.Option(DistillationConfig.temperature, help="softmax temperature for kl"),
    preset: str = typer.Option(
        DEFAULT_PRESET, help="student/data/optimiser settings: smoke | laptop | study | paper | test"
    ),
    data_dir: Optional[str] = typer.Option(None, help="default: the teacher's training data directory"),
    epochs: Optional[int] = typer.Option(None, help="override optim.epochs"),
    attack: bool = typer.Option(DistillationConfig.attack, help="attack the student at the end (APGD-CE + APGD-DLR)"),
    n_examples: Optional[int] = typer.Option(None, help="examples for the final attack (default: the preset's)"),
    teacher_logits_run: Optional[str] = typer.Option(None, help="reuse this run's teacher-logit artifact"),
    set_: List[str] = typer.Option([], "--set", help="any config value: section.field=value (repeatable)"),
    overrides: Optional[str] = typer.Option(None, help="several section.field=value separated by spaces"),
):
    """Distil an AT teacher's (manipulated) logits into a student; register it with its lineage."""
    from robustlogits.config import apply_overrides, distill_preset
    from robustlogits.jobs.distill import run_distill

    cfg = distill_preset(preset)
    pairs = [
        ("distill.manipulation", manipulation),
        ("distill.k", blank(k)),
        ("distill.teacher", blank(teacher)),
        ("distill.teacher_stage", blank(teacher_stage)),
        ("distill.teacher_alias", blank(teacher_alias)),
        ("distill.teacher_version", blank(teacher_version)),
        ("distill.st_teacher", blank(st_teacher)),
        ("distill.fix_mode", fix_mode),
        ("distill.loss", loss),
        ("distill.temperature", temperature),
        ("data.data_dir", blank(data_dir)),
        ("optim.epochs", epochs),
        ("distill.attack", attack),
        ("distill.attack_n_examples", n_examples or None),
        ("distill.teacher_logits_run", blank(teacher_logits_run)),
    ]
    apply_overrides(cfg, [f"{key}={value}" for key, value in pairs if value is not None])
    apply_overrides(cfg, [*set_, *split_overrides(overrides)])
    run_id = run_distill(cfg)
    typer.echo(distill_summary(run_id))


def distill_summary(run_id: str) -> str:
    from robustlogits.tracking import run_record

    record = run_record(run_id)
    tags, metrics = record.tags, record.metrics
    line = (
        f"run {run_id} finished; student {tags.get('registered_model', '?')} version "
        f"{tags.get('registered_versions', '?')} from teacher {tags.get('teacher_name')} "
        f"version {tags.get('teacher_version')} ({tags.get('manipulation')}"
        + (f" k={tags['k']}" if tags.get("k") else "")
        + ")"
    )
    if "adversarial_accuracy" in metrics:
        line += (
            f"; on {int(metrics.get('n_examples', 0))} test examples: natural "
            f"{metrics['natural_accuracy']:.4f}, adversarial {metrics['adversarial_accuracy']:.4f}"
        )
    elif "checkpoint_test_accuracy" in metrics:
        line += f"; test accuracy {metrics['checkpoint_test_accuracy']:.4f} (not attacked)"
    return line


@app.command("import")
@cli_errors
def import_model(
    checkpoint: Optional[str] = typer.Option(
        None, help="TorchScript archive, state dict (.pt/.pth/.safetensors) or pickled module"
    ),
    name: str = typer.Option(..., help="registered model name to create a version of"),
    arch: Optional[str] = typer.Option(
        None,
        help="architecture for a state dict: one of ours (resnet18, cnn-small, ...), the community's CIFAR "
        "networks with their own key names (cifar-resnet18, preact-resnet18, wrn-28-10, wrn-34-10; "
        "needs the robustbench extra) or torchvision:NAME",
    ),
    dataset: str = typer.Option(ImportConfig.dataset, help="cifar10 | cifar100 | synthetic: what the model classifies"),
    normalization: Optional[str] = typer.Option(
        None,
        help="none | cifar10 | cifar100 | MEAN,STD | M1,M2,M3,S1,S2,S3: what the network expects its [0,1] input standardised with (default: the checkpoint's own, else none)",
    ),
    trust_pickle: bool = typer.Option(
        ImportConfig.trust_pickle, help="allow a pickled module (loading it runs code from the file)"
    ),
    robustbench: Optional[str] = typer.Option(
        None,
        help="import this RobustBench model zoo entry from MODEL_DIR/DATASET/THREAT_MODEL/NAME.pt "
        "(never downloads; needs the robustbench extra)",
    ),
    model_dir: str = typer.Option(
        ImportConfig.model_dir, help="RobustBench's model folder (MODEL_DIR/DATASET/THREAT_MODEL/NAME.pt)"
    ),
    threat_model: str = typer.Option(ImportConfig.threat_model, help="RobustBench threat model"),
    data_dir: Optional[str] = typer.Option(None, help="where the test images for the check are"),
    check_images: int = typer.Option(
        ImportConfig.check_images, help="stratified test images the model is checked and scored on"
    ),
    stage: Optional[str] = typer.Option(None, help="move the new version to this stage (e.g. Production)"),
    alias: Optional[str] = typer.Option(None, help="give the new version this alias (e.g. teacher)"),
    device: str = typer.Option(ImportConfig.device),
    experiment: str = typer.Option(ImportConfig.experiment),
):
    """Register a model trained elsewhere; attack, distill and analyze then use it like our own."""
    from robustlogits.jobs.import_model import run_import

    cfg = ImportConfig(
        name=name,
        checkpoint=blank(checkpoint),
        arch=blank(arch),
        dataset=dataset,
        normalization=blank(normalization) if normalization != "none" else "none",
        trust_pickle=trust_pickle,
        robustbench=blank(robustbench),
        model_dir=model_dir,
        threat_model=threat_model,
        data_dir=blank(data_dir),
        check_images=check_images,
        stage=blank(stage),
        alias=blank(alias),
        device=device,
        experiment=experiment,
    )
    result = run_import(cfg, log=lambda msg: typer.echo(msg, err=True))
    verb = "already registered as" if result.get("reused") else "registered"
    typer.echo(
        f"{verb} {result['name']} version {result['version']} (run {result['run_id']}): natural accuracy "
        f"{result['natural_accuracy']:.4f} on {result['n_images']} test images; format {result['source_format']} "
        f"(stored as {result.get('stored_as', 'factory')}), normalisation {result['normalization']}, "
        f"sha256 {result['source_sha256'][:16]}"
    )


@app.command("config")
@cli_errors
def show_config(
    preset: str = typer.Option(DEFAULT_PRESET, help="preset to print"),
    training: Optional[str] = typer.Option(None, help="standard | adversarial: that teacher's config"),
):
    """Print every config key of a preset (what --set and MLflow params use)."""
    from robustlogits.config import flatten
    from robustlogits.config import preset as make_preset

    for key, value in flatten(make_preset(preset, blank(training))).items():
        typer.echo(f"{key}={value}")
