"""The `attack` job: the paper's adversarial accuracy (APGD-CE, then APGD-DLR on the survivors)
for a registered or logged model, recorded so later analyses can reuse it.

The run is linked to the model it attacked (tags, and the model as an MLflow model input), keeps
one row per example as an artifact, and the adversarial accuracy is written back as a tag on
the registry version. Every check happens before the run exists; the tag only after success.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
import torch
from mlflow.tracking import MlflowClient

from robustlogits import tracking
from robustlogits.tracking.attack_records import log_attack_result
from robustlogits.core.attacks import SUITES, AttackResult, attack_split, check_n_examples
from robustlogits.core.data import load_test_split
from robustlogits.core.device import resolve_device
from robustlogits.core.errors import UserError
from robustlogits.tracking.models import model_class_count, resolve_and_load, synthetic_params_from_run


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

    def attack_settings(self) -> dict:
        return dict(n_examples=self.n_examples, eps=self.eps, n_iter=self.n_iter, n_restarts=self.n_restarts,
                    seed=self.seed, suite=self.suite, batch_size=self.batch_size)


def run_attack(cfg: AttackConfig, progress: bool | None = None) -> tuple[str, AttackResult]:
    cfg.validate()
    tracking.check_store(cfg.experiment)
    device = resolve_device(cfg.device)
    resolved = resolve_and_load(cfg.model, stage=cfg.stage, alias=cfg.alias, version=cfg.version, device=device)
    dataset = cfg.dataset or resolved.dataset
    if not dataset:
        raise UserError(f"cannot tell which dataset {resolved.describe()} was trained on; pass --dataset")
    synthetic = synthetic_params_from_run(resolved.source_run_id) if dataset == "synthetic" else None
    own = dataset == resolved.dataset  # the model's own data: found again by its recorded folder and digest
    test, raw = load_test_split(dataset, cfg.data_dir, device, synthetic, hint=resolved.data_dir if own else None,
                                digest=resolved.data_digest if own else None)
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
        result = attack_split(resolved.model, test, raw.num_classes, device=device, progress=progress, **cfg.attack_settings())
        log_attack_result(result, model_id=resolved.model_id)
        run_id = run.info.run_id
    if resolved.name and resolved.version:
        client = MlflowClient()
        client.set_model_version_tag(resolved.name, resolved.version, "adversarial_accuracy",
                                     f"{result.adversarial_accuracy:.4f}")
        client.set_model_version_tag(resolved.name, resolved.version, "adversarial_accuracy_run", run_id)
        client.set_model_version_tag(resolved.name, resolved.version, "adversarial_accuracy_setting",
                                     f"{cfg.suite} eps={cfg.eps:.5f} n={result.n_examples}")
        # The clean accuracy on the same attacked examples, under its own name (the version's
        # `test_accuracy` is the full test split's).
        client.set_model_version_tag(resolved.name, resolved.version, "attacked_natural_accuracy",
                                     f"{result.natural_accuracy:.4f}")
    return run_id, result

