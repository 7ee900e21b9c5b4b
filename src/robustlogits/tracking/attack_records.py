"""An attack's result in MLflow: metrics and per-example artifacts written, and read back.

Shared by the attack job, a distillation's final attack and every analysis that needs
adversarial outcomes per example.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow

from robustlogits.core.attacks import AttackResult
from robustlogits.core.errors import UserError
from robustlogits.tracking.artifacts import downloaded, log_folder, log_results


def log_attack_result(result: AttackResult, prefix: str = "", model_id: str | None = None) -> None:
    """Metrics (optionally prefixed) and the per-example table as CSV (people) and npz (exact).

    With `model_id` the metrics also belong to the attacked logged model, so the models table
    and `mlflow.search_logged_models` rank models by adversarial accuracy."""
    log_results({f"{prefix}{k}": v for k, v in result.metrics().items()}, model_id=model_id)
    with tempfile.TemporaryDirectory() as tmp:
        result.save(tmp, stem=f"{prefix}attack".strip("_"))
        log_folder(tmp, "attack")
    if result.warnings:
        mlflow.set_tag(f"{prefix}autoattack_warnings", " | ".join(result.warnings)[:5000])


def load_attack_result(run_id: str) -> AttackResult:
    with downloaded(run_id, "attack") as folder:
        paths = sorted(Path(folder).glob("*_result.npz"))
        if not paths:
            raise UserError(f"run {run_id} has no attack result artifact")
        return AttackResult.load(paths[0])
