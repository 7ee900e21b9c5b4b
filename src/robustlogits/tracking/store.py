"""Which tracking store and experiment a job writes to, checked before any work starts."""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
from mlflow.exceptions import MlflowException
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
    root = file_store_root(uri)
    if root is not None:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        repair_file_store(root)
    return uri


def file_store_root(uri: str | None = None) -> Path | None:
    """The folder of a file-backed tracking store (`file:` URI or plain path); None for a database or server."""
    uri = uri or mlflow.get_tracking_uri()
    if uri.startswith("file:"):
        return Path(unquote(urlparse(uri).path))
    return Path(uri) if "://" not in uri and not uri.startswith("sqlite") else None


QUARANTINE_SUFFIX = ".quarantine"  # beside the store: MLflow would read a folder inside it as an experiment


# Folders whose every subfolder is one record with its own meta.yaml, and how deep below the store root
# that subfolder sits: <exp>/<run>/{inputs,outputs}/<id>, <exp>/{datasets,models}/<id>.
_RECORD_PARENTS = {"inputs": 4, "outputs": 4, "datasets": 3, "models": 3}
_WRITE_GRACE_S = 1.0  # a live writer fills meta.yaml within milliseconds of creating its folder


def _unreadable_record(record: Path, root: Path) -> bool:
    """A record MLflow would fail to read: its meta.yaml is empty, or (for an input, output, dataset or
    logged model, which MLflow reads unguarded) missing."""
    meta = record / "meta.yaml"
    if meta.is_file():
        return meta.stat().st_size == 0
    parts = record.relative_to(root).parts
    return parts[0] != "models" and _RECORD_PARENTS.get(record.parent.name) == len(parts)  # not the registry


def repair_file_store(root: Path) -> list[Path]:
    """Move aside the records a killed process left half-written.

    MLflow's file store creates a record's folder and then writes its meta.yaml in place, so SIGKILL
    leaves either no meta.yaml or an empty one, and one such input record makes every search of its
    experiment raise. A record still unreadable a moment later (so no live writer is finishing it) is
    moved into `<root>.quarantine/`, never deleted."""
    moved: list[Path] = []
    if not root.is_dir():
        return moved
    suspects: list[Path] = []
    for folder, subfolders, _files in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in ("artifacts", ".trash")]
        record = Path(folder)
        if record != root and _unreadable_record(record, root):
            suspects.append(record)
            subfolders[:] = []
    if suspects:
        time.sleep(_WRITE_GRACE_S)
    for record in suspects:
        if not _unreadable_record(record, root):
            continue
        target = root.with_name(root.name + QUARANTINE_SUFFIX) / record.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(record), str(target))
        log.warning(
            "moved %s aside to %s: its meta.yaml is empty or missing (a process was killed writing it)", record, target
        )
        moved.append(target)
    return moved


_OPEN_GRACE_S = 2.0  # a live process writes a new run's tags one file after another, milliseconds apart


def opened_and_abandoned(experiment_id: str, run_id: str) -> bool:
    """Whether a run of a file store was left half-opened: MLflow's file store writes a new run's
    meta.yaml and then its tags one file at a time, so a process killed in between leaves a RUNNING
    run without the tags that name its process. Such a run no longer changes: true when nothing in
    its record was written for `_OPEN_GRACE_S` (waiting out the rest of that once). A database store
    creates a run with its tags in one transaction, so there it is always False."""
    root = file_store_root()
    if root is None:
        return False
    folder = root / experiment_id / run_id

    def last_write() -> float | None:
        files = [folder / "meta.yaml", *(folder / "tags").glob("*"), *(folder / "params").glob("*")]
        return max((f.stat().st_mtime for f in files if f.is_file()), default=None)

    first = last_write()
    if first is None:
        return False
    wait = _OPEN_GRACE_S - (time.time() - first)
    if wait > 0:
        time.sleep(wait)
        return last_write() == first
    return True


def check_store_uri() -> str:
    """The configured store, read once so an unusable one is a clear error (nothing is created)."""
    uri = configure_store()
    try:
        MlflowClient().search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"tracking store {uri} is not usable: {str(exc).splitlines()[0]}") from None
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
            mark_experiment_kind(exp_id)
            return exp_id
        exp = mlflow.get_experiment_by_name(experiment)
        if exp:
            exp_id = exp.experiment_id
            mark_experiment_kind(exp_id)
        else:
            exp_id = create_experiment(experiment, uri)
        mlflow.set_experiment(experiment_id=exp_id)
    except Exception as exc:  # noqa: BLE001 - any store error means "cannot track here"
        raise UserError(f"tracking store {uri} is not usable: {str(exc).splitlines()[0]}") from None
    return exp_id


def artifact_root_beside(uri: str) -> Path | None:
    """Where a file-backed database store keeps new experiments' artifacts: `mlruns/` beside the
    database, whichever folder a command runs in. None for other stores (a server decides)."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    path = unquote(uri[len("sqlite:///") :].split("?", 1)[0])  # sqlite:///rel.db, sqlite:////abs.db
    return Path(path).resolve().parent / "mlruns"


def create_experiment(name: str, uri: str, artifact_location: str | None = None) -> str:
    """A new experiment; in a sqlite store its artifacts go beside the database (an explicit
    `artifact_location` wins), in a folder named after it and unique to it. One that another process
    created a moment ago is that one."""
    if artifact_location is None:
        root = artifact_root_beside(uri)
        if root is not None:
            slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:60] or "experiment"
            artifact_location = (root / f"{slug}-{uuid.uuid4().hex[:8]}").as_uri()
    try:
        return mlflow.create_experiment(
            name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    except MlflowException as exc:
        # Workers on one store start together: another may create it between our lookup and this call.
        existing = mlflow.get_experiment_by_name(name) if exc.error_code == "RESOURCE_ALREADY_EXISTS" else None
        if existing is None:
            raise
        mark_experiment_kind(existing.experiment_id)
        return existing.experiment_id


def experiment_name_of(run_id: str) -> str:
    client = MlflowClient()
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name
