"""Which tracking store and experiment a job writes to, checked before any work starts."""

from __future__ import annotations

import logging
import os

import mlflow
from mlflow.tracking import MlflowClient

from robustlogits.core.errors import UserError

log = logging.getLogger(__name__)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

_warned_launches: set[str] = set()


def configure_store() -> str:
    """Use MLFLOW_TRACKING_URI when set, else the embedded sqlite store in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    if uri.startswith("file:") or "://" not in uri and not uri.startswith("sqlite"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def launched_run_id() -> str | None:
    """The run `mlflow run` created for this process, if any (MLflow names it in MLFLOW_RUN_ID)."""
    return os.environ.get("MLFLOW_RUN_ID") or None


def check_store(experiment: str, adopt_launched: bool = True) -> str:
    """Open the store and experiment up front so an unusable store fails before any work.

    Returns the experiment id; under `mlflow run` (with `adopt_launched`) the one the launcher chose."""
    uri = configure_store()
    launched = launched_run_id() if adopt_launched else None
    try:
        if launched:
            client = MlflowClient()
            exp_id = client.get_run(launched).info.experiment_id
            chosen = client.get_experiment(exp_id).name
            if chosen != experiment and launched not in _warned_launches:
                _warned_launches.add(launched)
                log.warning(
                    "mlflow run filed this run under experiment %r, not %r: add `--experiment-name %s` "
                    "to the mlflow run command to keep runs together",
                    chosen,
                    experiment,
                    experiment,
                )
            mlflow.set_experiment(experiment_id=exp_id)  # an earlier artifact run may have switched it
            return exp_id
        exp = mlflow.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else mlflow.create_experiment(experiment)
        mlflow.set_experiment(experiment_id=exp_id)
    except Exception as exc:  # noqa: BLE001 - any store error means "cannot track here"
        raise UserError(f"tracking store {uri} is not usable: {str(exc).splitlines()[0]}") from None
    return exp_id


def experiment_name_of(run_id: str) -> str:
    client = MlflowClient()
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name
