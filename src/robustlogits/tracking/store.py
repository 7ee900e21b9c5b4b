"""Which tracking store and experiment a job writes to, checked before any work starts."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
from mlflow.tracking import MlflowClient

from robustlogits.core.errors import UserError

log = logging.getLogger(__name__)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

_warned_launches: set[str] = set()
# The MLflow UI (3.x) opens an experiment in its GenAI mode unless the experiment says what it is.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
_kind_checked: set[tuple[str, str]] = set()  # (tracking URI, experiment id) already tagged in this process


def mark_experiment_kind(exp_id: str) -> None:
    """Tag the experiment as model training, once per process; an experiment tagged otherwise by
    its owner keeps its kind."""
    key = (mlflow.get_tracking_uri(), exp_id)
    if key in _kind_checked:
        return
    client = MlflowClient()
    if EXPERIMENT_KIND_TAG not in client.get_experiment(exp_id).tags:
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    _kind_checked.add(key)


def configure_store() -> str:
    """Use MLFLOW_TRACKING_URI when set, else the embedded sqlite store in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    if uri.startswith("file:") or "://" not in uri and not uri.startswith("sqlite"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        repair_file_store(Path(unquote(urlparse(uri).path)) if uri.startswith("file:") else Path(uri))
    return uri


QUARANTINE_SUFFIX = ".quarantine"  # beside the store: MLflow would read a folder inside it as an experiment


def repair_file_store(root: Path) -> list[Path]:
    """Move aside the records a killed process left with an empty `meta.yaml`.

    MLflow's file store writes each meta.yaml in place, so SIGKILL mid-write leaves an empty file, and one
    empty input record makes every search of its experiment raise. Such a record (a run, a dataset, an
    input link, a logged model) is moved into `<root>.quarantine/`, never deleted."""
    moved: list[Path] = []
    if not root.is_dir():
        return moved
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in ("artifacts", ".trash")]
        record = Path(folder)
        if record == root or "meta.yaml" not in files or (record / "meta.yaml").stat().st_size > 0:
            continue
        target = root.with_name(root.name + QUARANTINE_SUFFIX) / record.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(record), str(target))
        subfolders[:] = []
        log.warning("moved %s aside to %s: its meta.yaml is empty (a process was killed writing it)", record, target)
        moved.append(target)
    return moved


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
            mark_experiment_kind(exp_id)
            return exp_id
        exp = mlflow.get_experiment_by_name(experiment)
        if exp:
            exp_id = exp.experiment_id
            mark_experiment_kind(exp_id)
        else:
            exp_id = mlflow.create_experiment(experiment, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        mlflow.set_experiment(experiment_id=exp_id)
    except Exception as exc:  # noqa: BLE001 - any store error means "cannot track here"
        raise UserError(f"tracking store {uri} is not usable: {str(exc).splitlines()[0]}") from None
    return exp_id


def experiment_name_of(run_id: str) -> str:
    client = MlflowClient()
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name
