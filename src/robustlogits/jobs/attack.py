"""The `attack` job: the paper's adversarial accuracy (APGD-CE, then APGD-DLR on the survivors)
for a registered or logged model, recorded so later analyses can reuse it.

The run is linked to the model it attacked (tags, and the model as an MLflow model input), keeps
one row per example as an artifact, and the adversarial accuracy is written back as a tag on
the registry version. Every check happens before the run exists; the tag only after success.
"""

from __future__ import annotations

from robustlogits import tracking
from robustlogits.config import AttackConfig
from robustlogits.core.attacks import AttackResult, attack_split, check_n_examples
from robustlogits.core.data import load_test_split
from robustlogits.core.device import resolve_device
from robustlogits.core.errors import UserError
from robustlogits.core.models import model_class_count


def run_attack(cfg: AttackConfig, progress: bool | None = None) -> tuple[str, AttackResult]:
    cfg.validate()
    tracking.check_store(cfg.experiment)
    device = resolve_device(cfg.device)
    resolved = tracking.resolve_and_load(
        cfg.model, stage=cfg.stage, alias=cfg.alias, version=cfg.version, device=device
    )
    dataset = cfg.dataset or resolved.dataset
    if not dataset:
        raise UserError(f"cannot tell which dataset {resolved.describe()} was trained on; pass --dataset")
    synthetic = tracking.synthetic_params_from_run(resolved.source_run_id) if dataset == "synthetic" else None
    own = dataset == resolved.dataset  # the model's own data: found again by its recorded folder and digest
    test, raw = load_test_split(
        dataset,
        cfg.data_dir,
        device,
        synthetic,
        hint=resolved.data_dir if own else None,
        digest=resolved.data_digest if own else None,
    )
    classes = model_class_count(resolved.model, device)
    if classes != raw.num_classes:
        raise UserError(f"{resolved.describe()} outputs {classes} classes but {dataset} has {raw.num_classes}")
    check_n_examples(cfg.n_examples, test)
    tags = {"robustlogits.job": "attack", "model_uri": resolved.uri, "dataset": dataset}
    tags |= {
        k: v
        for k, v in (
            ("model_name", resolved.name),
            ("model_version", resolved.version),
            ("source_run_id", resolved.source_run_id),
        )
        if v
    }
    name = f"attack-{resolved.name}-v{resolved.version}" if resolved.name else "attack"
    # The same attack again after its process was killed continues (and finishes) the killed run.
    identity = tracking.job_key(
        {
            "job": "attack",
            **{k: v for k, v in vars(cfg).items() if k != "device"},
            "model": resolved.model_id or resolved.uri,
            "data": raw.digest,
        }
    )
    reclaimed = tracking.reclaim(identity)
    opened = (
        tracking.resume_run(reclaimed, cfg.experiment)
        if reclaimed
        else tracking.job_run(cfg.experiment, name, tags, identity=identity)
    )
    with opened as run_id:
        tracking.log_params({f"attack.{k}": v for k, v in vars(cfg).items()})
        tracking.log_model_inputs([resolved.model_id])
        tracking.log_dataset_input(dataset, raw.digest, f"test/{raw.source}", "evaluation", len(test))
        result = attack_split(
            resolved.model, test, raw.num_classes, device=device, progress=progress, **cfg.attack_settings()
        )
        tracking.log_attack_result(result, model_id=resolved.model_id)
    if resolved.name and resolved.version:
        # The clean accuracy on the same attacked examples has its own name (the version's
        # `test_accuracy` is the full test split's).
        tracking.set_version_tags(
            resolved.name,
            resolved.version,
            {
                "adversarial_accuracy": f"{result.adversarial_accuracy:.4f}",
                "adversarial_accuracy_run": run_id,
                "adversarial_accuracy_setting": f"{cfg.suite} eps={cfg.eps:.5f} n={result.n_examples}",
                "attacked_natural_accuracy": f"{result.natural_accuracy:.4f}",
            },
        )
    return run_id, result
