"""The `analyze` job: the paper's analyses, written to a folder and logged to an MLflow run.

`theory`: Appendix C's surrogate-logit model (figures C.1-C.3, key numbers as JSON and metrics),
optionally with logged runs' logits placed on the model's admissible-beta axes.
`manifold`: MFTMA of adversarial perturbation manifolds, stage by stage (Figure 5).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from robustlogits import tracking
from robustlogits.errors import UserError


def _flat_numbers(tree: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in tree.items():
        name = re.sub(r"[^0-9A-Za-z_\-./ ]", "_", f"{prefix}{key}")
        if isinstance(value, dict):
            out |= _flat_numbers(value, f"{name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            out[name] = float(value)
    return out


def logits_of_run(spec: str) -> tuple[np.ndarray, np.ndarray, str]:
    """`RUN_ID` or `RUN_ID:EPOCH`: a train run's checkpoint test logits (latest checkpoint by default),
    or an attack run's clean logits."""
    run_id, _, epoch = spec.partition(":")
    try:
        run = MlflowClient().get_run(run_id)
    except Exception:  # noqa: BLE001
        raise UserError(f"no run {run_id!r} in the tracking store") from None
    label = run.data.tags.get("mlflow.runName", run_id[:8])
    if run.data.tags.get("robustlogits.job") == "attack":
        from robustlogits.attack_job import load_attack_result

        result = load_attack_result(run_id)
        return result.clean_logits, result.label, label
    files = tracking.list_artifacts(run_id, "test_logits")
    epochs = sorted(int(Path(f).stem.split("_")[-1]) for f in files)
    if not epochs:
        raise UserError(f"run {run_id} has no checkpoint test logits (train with --checkpoint-epochs)")
    chosen = int(epoch) if epoch else epochs[-1]
    if chosen not in epochs:
        raise UserError(f"run {run_id} has test logits for epochs {epochs}, not {chosen}")
    path = tracking.download_artifact(run_id, f"test_logits/epoch_{chosen:04d}.npz")
    with np.load(path) as z:
        return z["logits"], z["labels"], f"{label} (epoch {chosen})"


def run_theory_job(out_dir: Path, class_counts=(10, 100), error_rate: float = 0.196, omega_correct: float = 1.0,
                   omega_wrong: float = 1.0, logits_runs: list[str] = (), track: bool = True,
                   experiment: str = "robustlogits") -> dict:
    from analysis.theory import place_empirical, run_theory

    out_dir = Path(out_dir)
    if track:
        tracking.check_store(experiment)
    models = [logits_of_run(spec) for spec in logits_runs]  # resolve runs before writing anything
    if models and len({z.shape[1] for z, _, _ in models}) != 1:
        raise UserError("the runs given have different class counts; compare runs of one dataset")
    summary = run_theory(out_dir, class_counts=tuple(class_counts), error_rate=error_rate,
                         omega_correct=omega_correct, omega_wrong=omega_wrong)
    if models:
        summary["empirical"] = place_empirical([(z, y, name) for z, y, name in models], None,
                                               out_dir / "fig_empirical_admissible.png")
        (out_dir / "theory.json").write_text(json.dumps(summary, indent=1, default=str))
    if track:
        with tracking.managed_run(experiment, run_name="analyze-theory", tags={"robustlogits.job": "analyze-theory"}):
            tracking.log_params({"class_counts": list(class_counts), "error_rate": error_rate,
                                 "omega_correct": omega_correct, "omega_wrong": omega_wrong,
                                 "logits_runs": list(logits_runs)})
            metrics = {k: v for k, v in _flat_numbers(summary).items() if not k.startswith("files")}
            mlflow.log_metrics(dict(list(metrics.items())[:900]))
            mlflow.log_artifacts(str(out_dir), "theory")
            summary["run_id"] = mlflow.active_run().info.run_id
    return summary
