"""The `attack` job: the paper's adversarial accuracy (APGD-CE, then APGD-DLR on the survivors)
for a registered or logged model, recorded so later analyses can reuse it.

The run is linked to the model it attacked (tags, and the model as an MLflow model input), keeps
one row per example as an artifact, and the adversarial accuracy is written back as a tag on
the registry version. Every check happens before the run exists; the tag only after success.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient

from robustlogits import tracking
from robustlogits.attacks import SUITES, AttackResult, evaluate_robustness
from robustlogits.data import Split, build_bundle, load_raw, stratified_indices
from robustlogits.errors import UserError
from robustlogits.train_job import resolve_device


@dataclass
class AttackConfig:
    model: str = ""
    stage: str | None = None
    alias: str | None = None
    version: str | None = None
    dataset: str | None = None   # default: the model's own dataset (registry tag / source run)
    data_dir: str | None = None  # default: the source run's data directory
    eps: float = 8 / 255
    n_iter: int = 100
    n_restarts: int = 1
    seed: int = 0
    suite: str = "apgd-ce-dlr"
    n_examples: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    experiment: str = "robustlogits"

    def validate(self) -> None:
        if not self.model:
            raise UserError("no model given: pass a registry URI (models:/NAME@ALIAS), a registered name, or runs:/ID/PATH")
        if self.eps < 0:
            raise UserError(f"eps must be >= 0, got {self.eps}")
        if self.n_examples is not None and self.n_examples < 1:
            raise UserError(f"n-examples must be >= 1, got {self.n_examples}")
        if self.suite not in SUITES:
            raise UserError(f"unknown suite {self.suite!r}; choose one of: {', '.join(SUITES)}")
        if self.n_iter < 1 or self.n_restarts < 1:
            raise UserError("n_iter and n_restarts must be >= 1")


@dataclass
class ResolvedModel:
    """A loaded model plus what the registry and its source run say about it."""

    uri: str
    model: torch.nn.Module
    name: str | None
    version: str | None
    model_id: str | None
    source_run_id: str | None
    dataset: str | None
    data_dir: str | None
    tags: dict

    def describe(self) -> str:
        return f"{self.name} v{self.version}" if self.name else self.uri


def resolve_and_load(spec: str, *, stage=None, alias=None, version=None, device="cpu") -> ResolvedModel:
    """Registry URI, registered name + stage/alias/version, or runs:/ URI -> loaded model and lineage."""
    uri, mv = tracking.resolve_model(spec, stage=stage, alias=alias, version=version)
    model = tracking.load_model(uri, device)
    source_run = mv.run_id if mv is not None else uri[len("runs:/"):].split("/", 1)[0]
    params = {}
    if source_run:
        try:
            params = MlflowClient().get_run(source_run).data.params
        except Exception:  # noqa: BLE001 - a model outliving its run is still attackable
            params = {}
    tags = dict(mv.tags) if mv is not None else {}
    data_dir = params.get("data.data_dir")
    return ResolvedModel(
        uri=uri, model=model, name=mv.name if mv else None, version=str(mv.version) if mv else None,
        model_id=getattr(mv, "model_id", None) if mv else None, source_run_id=source_run,
        dataset=tags.get("dataset") or params.get("data.dataset"),
        data_dir=None if data_dir in (None, "None", "") else data_dir, tags=tags,
    )


def load_test_split(dataset: str, data_dir: str | None, device: torch.device, synthetic_params: dict | None = None):
    raw = load_raw(dataset, data_dir, synthetic=synthetic_params)
    bundle = build_bundle(raw, val_per_class=0, split_seed=0, train_subset=None, stats_subset=1,
                          heldout_subset=None, device=device)
    return bundle.test, raw


def synthetic_params_from_run(run_id: str | None) -> dict | None:
    """Synthetic data is regenerated from the source run's settings (tests and tiny demos)."""
    if not run_id:
        return None
    params = MlflowClient().get_run(run_id).data.params
    keys = {"train_per_class": "data.synthetic_train_per_class", "test_per_class": "data.synthetic_test_per_class",
            "num_classes": "data.synthetic_classes", "size": "data.synthetic_size"}
    return {k: int(params[v]) for k, v in keys.items() if v in params} or None


def model_class_count(model: torch.nn.Module, device: torch.device, image_shape=(3, 32, 32)) -> int:
    count = getattr(model, "num_classes", None)
    if count is None:
        with torch.no_grad():
            count = model.eval()(torch.zeros(2, *image_shape, device=device)).shape[1]
    return int(count)


def check_n_examples(n_examples: int | None, test: Split) -> None:
    """Called before a run exists, so an impossible request fails without leaving anything behind."""
    if n_examples is not None and n_examples > len(test):
        raise UserError(f"n-examples {n_examples} is larger than the test split ({len(test)} images)")


def attack_split(model: torch.nn.Module, test: Split, num_classes: int, cfg: AttackConfig,
                 device: torch.device, progress: bool | None = None) -> AttackResult:
    """Attack a stratified, seeded subset (or all) of a test split; shared with distillation."""
    check_n_examples(cfg.n_examples, test)
    if cfg.n_examples is not None:
        test = test.subset(stratified_indices(test.labels.cpu().numpy(), cfg.n_examples, cfg.seed))
    if progress is None:
        import sys

        progress = sys.stderr.isatty()
    return evaluate_robustness(model, test.images, test.labels, indices=test.indices, eps=cfg.eps,
                               n_iter=cfg.n_iter, n_restarts=cfg.n_restarts, seed=cfg.seed, suite=cfg.suite,
                               batch_size=cfg.batch_size, device=device, progress=progress, n_classes=num_classes)


def log_attack_result(result: AttackResult, prefix: str = "") -> None:
    """Metrics (optionally prefixed) and the per-example table as CSV (people) and npz (exact)."""
    mlflow.log_metrics({f"{prefix}{k}": v for k, v in result.metrics().items() if v == v})
    with tempfile.TemporaryDirectory() as tmp:
        result.save(tmp, stem=f"{prefix}attack".strip("_"))
        mlflow.log_artifacts(tmp, "attack")
    if result.warnings:
        mlflow.set_tag(f"{prefix}autoattack_warnings", " | ".join(result.warnings)[:5000])


def run_attack(cfg: AttackConfig, progress: bool | None = None) -> tuple[str, AttackResult]:
    cfg.validate()
    tracking.check_store(cfg.experiment)
    device = resolve_device(cfg.device)
    resolved = resolve_and_load(cfg.model, stage=cfg.stage, alias=cfg.alias, version=cfg.version, device=device)
    dataset = cfg.dataset or resolved.dataset
    if not dataset:
        raise UserError(f"cannot tell which dataset {resolved.describe()} was trained on; pass --dataset")
    synthetic = synthetic_params_from_run(resolved.source_run_id) if dataset == "synthetic" else None
    test, raw = load_test_split(dataset, cfg.data_dir or resolved.data_dir, device, synthetic)
    classes = model_class_count(resolved.model, device)
    if classes != raw.num_classes:
        raise UserError(f"{resolved.describe()} outputs {classes} classes but {dataset} has {raw.num_classes}")
    check_n_examples(cfg.n_examples, test)
    tags = {"robustlogits.job": "attack", "model_uri": resolved.uri, "dataset": dataset}
    tags |= {k: v for k, v in (("model_name", resolved.name), ("model_version", resolved.version),
                               ("source_run_id", resolved.source_run_id)) if v}
    name = f"attack-{resolved.name}-v{resolved.version}" if resolved.name else "attack"
    with tracking.managed_run(cfg.experiment, run_name=name, tags=tags) as run:
        tracking.log_params({f"attack.{k}": v for k, v in vars(cfg).items()})
        tracking.log_model_inputs([resolved.model_id])
        tracking.log_dataset_input(dataset, raw.digest, f"test/{raw.source}", "evaluation", len(test))
        result = attack_split(resolved.model, test, raw.num_classes, cfg, device, progress)
        log_attack_result(result)
        run_id = run.info.run_id
    if resolved.name and resolved.version:
        client = MlflowClient()
        client.set_model_version_tag(resolved.name, resolved.version, "adversarial_accuracy",
                                     f"{result.adversarial_accuracy:.4f}")
        client.set_model_version_tag(resolved.name, resolved.version, "adversarial_accuracy_run", run_id)
        client.set_model_version_tag(resolved.name, resolved.version, "adversarial_accuracy_setting",
                                     f"{cfg.suite} eps={cfg.eps:.5f} n={result.n_examples}")
    return run_id, result


def load_attack_result(run_id: str) -> AttackResult:
    folder = tracking.download_artifact(run_id, "attack")
    paths = sorted(Path(folder).glob("*_result.npz"))
    if not paths:
        raise UserError(f"run {run_id} has no attack result artifact")
    return AttackResult.load(paths[0])
