"""Everything that talks to MLflow: the store, run lifecycle, artifacts, models and the registry.

Guarantees the rest of the code relies on:
- a run opened here ends FINISHED or FAILED whatever happens (exceptions, Ctrl-C, SIGTERM);
- artifacts are written to a temporary file first and uploaded whole, never truncated;
- a registry version is created only after its model is logged, and is deleted again if
  tagging it fails, so no version exists without its model and metadata.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import signal
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from robustlogits.core.errors import UserError

log = logging.getLogger(__name__)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
PIP_REQUIREMENTS = ["torch", "torchvision", "robustlogits"]


def configure_store() -> str:
    """Use MLFLOW_TRACKING_URI when set, else the embedded sqlite store in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    if uri.startswith("file:") or "://" not in uri and not uri.startswith("sqlite"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


_warned_launches: set[str] = set()


def check_store(experiment: str, adopt_launched: bool = True) -> str:
    """Open the store and experiment up front so an unusable store fails before any work."""
    uri = configure_store()
    launched = os.environ.get("MLFLOW_RUN_ID") if adopt_launched else None
    try:
        if launched:  # under `mlflow run`: the launcher chose the experiment and created the run
            client = MlflowClient()
            exp_id = client.get_run(launched).info.experiment_id
            chosen = client.get_experiment(exp_id).name
            if chosen != experiment and launched not in _warned_launches:
                _warned_launches.add(launched)
                log.warning("mlflow run filed this run under experiment %r, not %r: add `--experiment-name %s` "
                            "to the mlflow run command to keep runs together", chosen, experiment, experiment)
            mlflow.set_experiment(experiment_id=exp_id)  # an earlier fresh run may have switched it
            return exp_id
        exp = mlflow.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else mlflow.create_experiment(experiment)
        mlflow.set_experiment(experiment_id=exp_id)
    except Exception as exc:  # noqa: BLE001 - any store error means "cannot track here"
        raise UserError(f"tracking store {uri} is not usable: {str(exc).splitlines()[0]}") from None
    return exp_id


@contextlib.contextmanager
def managed_run(experiment: str, run_name: str | None = None, run_id: str | None = None,
                tags: dict[str, str] | None = None, nested: bool = False,
                fresh: bool = False) -> Iterator[mlflow.ActiveRun]:
    """Start (or reopen) a run that always ends FINISHED or FAILED.

    SIGTERM is turned into an exception for the duration, so a killed job still closes its run.
    Under `mlflow run`, MLFLOW_RUN_ID names the run the project launcher created; we adopt it,
    unless `fresh` asks for a separate run (e.g. a reusable teacher-logit artifact).
    """
    child = None if nested or fresh or run_id else _CHILD_RUNS.get()
    if not nested:
        check_store(experiment, adopt_launched=not fresh and run_id is None and child is None)
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    with contextlib.suppress(ValueError):  # not in the main thread: leave signals alone
        signal.signal(signal.SIGTERM, on_sigterm)
    run = None
    adopted = run_id or (None if nested or fresh or child else os.environ.get("MLFLOW_RUN_ID"))
    # MLflow consumes MLFLOW_RUN_ID on start and unsets it on end: a fresh run hides it throughout
    # and puts it back afterwards, so the launcher's run is still there for the main job.
    launcher_run = os.environ.pop("MLFLOW_RUN_ID", None) if fresh or child else None
    try:
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, nested=nested,
                               tags=child.tags_for(tags) if child else tags,
                               experiment_id=child.experiment_id if child else None)
        if child and child.on_start:
            child.on_start(run.info.run_id)
        yield run
    except BaseException as exc:
        failed = run.info.run_id if run is not None else adopted
        if failed:
            record_failure(failed, exc)
        if run is not None:
            mlflow.end_run("FAILED")
        elif adopted:  # the run exists but could not be started: never leave it RUNNING
            with contextlib.suppress(Exception):
                MlflowClient().set_terminated(adopted, "FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        if launcher_run:
            os.environ["MLFLOW_RUN_ID"] = launcher_run
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, previous)


ERROR_TAG = "error"
TRACEBACK_ARTIFACT = "error/traceback.txt"


def record_failure(run_id: str, exc: BaseException) -> None:
    """A FAILED run says why in the store: the one-line error as a tag, the traceback as an artifact.
    Best effort: a store that just failed must not hide the original exception."""
    import traceback

    line = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    client = MlflowClient()
    with contextlib.suppress(Exception):
        client.set_tag(run_id, ERROR_TAG, line[:5000])
    with contextlib.suppress(Exception), tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(TRACEBACK_ARTIFACT).name
        path.write_text(text)
        client.log_artifact(run_id, str(path), str(Path(TRACEBACK_ARTIFACT).parent))


def clear_failure(run_id: str) -> None:
    """A resumed run is no longer failed: its last error moves to `previous_error` (the traceback stays)."""
    client = MlflowClient()
    error = client.get_run(run_id).data.tags.get(ERROR_TAG)
    if error:
        client.set_tag(run_id, "previous_error", error)
        client.delete_tag(run_id, ERROR_TAG)


# --- child runs: a study's trials nest under its parent run -----------------------------------

@dataclass
class ChildRuns:
    """How top-level runs opened inside `child_runs` are placed: under a parent, with extra tags."""

    parent_run_id: str | None = None
    experiment_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    on_start: Callable[[str], None] | None = None

    def tags_for(self, tags: dict[str, str] | None) -> dict[str, str]:
        out = dict(tags or {}) | self.tags
        if self.parent_run_id:
            out["mlflow.parentRunId"] = self.parent_run_id
        return out


_CHILD_RUNS: contextvars.ContextVar[ChildRuns | None] = contextvars.ContextVar("robustlogits_child_runs", default=None)


@contextlib.contextmanager
def child_runs(parent_run_id: str | None = None, experiment_id: str | None = None,
               tags: dict[str, str] | None = None, on_start: Callable[[str], None] | None = None) -> Iterator[ChildRuns]:
    """Jobs run inside this context open their (top-level, non-fresh) run as a child of
    `parent_run_id`, in its experiment, with `tags` added; `on_start` hears each new run id at once.

    Nested contexts add to the outer one, so a study can place trials and a keyed task can add
    its key tag without any job knowing. Jobs need no change: `managed_run` reads the context.
    """
    outer = _CHILD_RUNS.get() or ChildRuns()
    callbacks = [cb for cb in (outer.on_start, on_start) if cb]
    inner = ChildRuns(parent_run_id or outer.parent_run_id, experiment_id or outer.experiment_id,
                      outer.tags | {k: str(v) for k, v in (tags or {}).items()},
                      (lambda rid: [cb(rid) for cb in callbacks]) if callbacks else None)
    token = _CHILD_RUNS.set(inner)
    try:
        yield inner
    finally:
        _CHILD_RUNS.reset(token)


def end_run_if_running(run_id: str, status: str = "FAILED") -> bool:
    """Close a run a dead process left RUNNING; a run that already ended is left as it is."""
    client = MlflowClient()
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return False
        client.set_terminated(run_id, status)
        return True
    except MlflowException:
        return False


@contextlib.contextmanager
def parent_run(experiment: str, key: str, run_name: str, tags: dict[str, str] | None = None) -> Iterator[str]:
    """A study's parent run, found again by its key (whatever its status) and reopened, held
    open while steps (in this or other processes) nest under it by tag, then ended FINISHED or
    FAILED like `managed_run`. Not the fluent active run, so jobs inside start their own runs.
    Under `mlflow run` the launcher's run is adopted on first use."""
    exp_id = check_store(experiment)
    client = MlflowClient()
    launched = os.environ.pop("MLFLOW_RUN_ID", None)
    existing = find_runs_with_key(key, ("RUNNING", "FINISHED", "FAILED", "KILLED"))
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        if launched and launched != run_id:  # the launcher's own run only points at the study
            client.set_tag(launched, "robustlogits.study_run", run_id)
            client.set_terminated(launched, "FINISHED")
    elif launched:
        run_id = launched
        for name, value in ({KEY_TAG: key, "mlflow.runName": run_name} | (tags or {})).items():
            client.set_tag(run_id, name, value)
    else:
        run_id = client.create_run(exp_id, run_name=run_name, tags={KEY_TAG: key} | (tags or {})).info.run_id
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGTERM, on_sigterm)
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    finally:
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, status)
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, previous)


# --- keyed work: "find the FINISHED run with this key, or run it" ------------------------------

KEY_TAG = "robustlogits.key"
def find_runs_with_key(key: str, statuses: tuple[str, ...], tag: str = KEY_TAG) -> list:
    """Runs (any experiment, newest first) tagged with this key and in one of these statuses."""
    client = MlflowClient()
    found = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               filter_string=f"tags.`{tag}` = '{key}'", order_by=["attributes.start_time DESC"])
    return [r for r in found if r.info.status in statuses]


def finished_runs_by_key(tag: str = KEY_TAG) -> dict[str, str]:
    """Key -> newest FINISHED run id, for every keyed run in the store (one query, not one per key)."""
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    out: dict[str, str] = {}
    token = None
    while True:
        page = client.search_runs(experiments, filter_string=f"tags.`{tag}` LIKE '%' and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time ASC"], max_results=1000, page_token=token)
        out |= {r.data.tags[tag]: r.info.run_id for r in page}
        token = page.token
        if not token:
            return out


def job_key(payload: dict[str, Any]) -> str:
    """A unit of work's identity: a hash of its resolved config and the identities of its inputs
    (model versions, data digest, artifact digests). Equal keys mean the same result."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def find_finished_run(key: str, tag: str = KEY_TAG) -> str | None:
    """The newest FINISHED run (any experiment) tagged with this key, or None."""
    client = MlflowClient()
    found = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               filter_string=f"tags.`{tag}` = '{key}' and attributes.status = 'FINISHED'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0].info.run_id if found else None


def run_record(run_id: str) -> tuple[dict[str, str], dict[str, float]]:
    """A finished run's tags and latest metrics: what closing messages report, read from the store."""
    data = MlflowClient().get_run(run_id).data
    return dict(data.tags), dict(data.metrics)


def log_params(params: dict[str, Any]) -> None:
    """Log params the active run does not have yet: under `mlflow run` the launcher has already
    logged the `-P` values, under these same names and as the user spelled them."""
    existing = MlflowClient().get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({k: ("None" if v is None else str(v))[:6000] for k, v in params.items() if k not in existing})


def _log_file(artifact_file: str, write) -> None:
    """Write into a temporary file, then upload it whole: the store never sees a partial file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        write(path)
        folder = str(Path(artifact_file).parent)
        mlflow.log_artifact(str(path), None if folder == "." else folder)


def log_json(obj: Any, artifact_file: str) -> None:
    _log_file(artifact_file, lambda path: path.write_text(json.dumps(obj, indent=1)))


def log_bytes(blob: bytes, artifact_file: str) -> None:
    _log_file(artifact_file, lambda path: path.write_bytes(blob))


def log_arrays(artifact_file: str, **arrays: np.ndarray) -> None:
    _log_file(artifact_file, lambda path: np.savez(path, **arrays))


def log_figure(fig, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(fig, artifact_file)
    plt.close(fig)


def download_artifact(run_id: str, artifact_path: str) -> Path:
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"run {run_id} has no artifact {artifact_path!r}: {str(exc).splitlines()[0]}") from None


def list_artifacts(run_id: str, path: str) -> list[str]:
    return [f.path for f in MlflowClient().list_artifacts(run_id, path)]


def log_dataset_input(name: str, digest: str, source: str, context: str, n_rows: int | None = None) -> None:
    """Record the data a run used as an MLflow dataset input, identified by a content digest."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    src = HTTPDatasetSource(url=f"robustlogits://{name}/{source.replace(':', '/')}")
    dataset = MetaDataset(source=src, name=name, digest=digest)
    mlflow.log_input(dataset, context=context, tags={"rows": str(n_rows)} if n_rows else None)


def log_model_inputs(model_ids: list[str]) -> None:
    """Record models (e.g. the attacked model, a student's teachers) as inputs of the active run.

    The fluent `mlflow.log_inputs(models=...)` is Databricks-only; the client API works everywhere.
    """
    from mlflow.entities import LoggedModelInput

    ids = [m for m in model_ids if m]
    if ids:
        MlflowClient().log_inputs(mlflow.active_run().info.run_id, models=[LoggedModelInput(m) for m in ids])


# --- models and the registry ------------------------------------------------------------------

def log_torch_model(model: torch.nn.Module, name: str, image_shape=(3, 32, 32)):
    """Log a model as weights plus architecture spec (see `model_format`), with MLflow's pickle-free
    `pt2` graph beside them so `mlflow.pytorch.load_model` also works. Returns MLflow's model info
    (`model_uri`, `model_id`)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from robustlogits.core import model_format
    was_training = model.training
    model.eval()
    example = np.random.default_rng(0).random((2, *image_shape), dtype=np.float32)
    classes = int(getattr(model, "num_classes", 0) or model(torch.from_numpy(example)).shape[1])
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *image_shape))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]))
    pytorch_logger = logging.getLogger("mlflow.pytorch")
    level = pytorch_logger.level
    try:
        pytorch_logger.setLevel(logging.ERROR)
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, files = model_format.write_files(model, Path(tmp))
            info = mlflow.pytorch.log_model(
                model, name=name, serialization_format="pt2", input_example=example, signature=signature,
                extra_files=[str(f) for f in files], pip_requirements=PIP_REQUIREMENTS,
                validate_serving_input=False,  # our own load is tested; this one re-exports the graph
            )
    finally:
        pytorch_logger.setLevel(level)
        model.train(was_training)
    return info


def register_version(model_uri: str, name: str, tags: dict[str, Any]):
    """Create a registered-model version with its tags, or nothing at all."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})


def promote(name: str, version: str | int, stage: str | None, alias: str | None) -> None:
    """Stage (deprecated in MLflow but still how many teams pull models) and alias, both supported."""
    client = MlflowClient()
    if stage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            client.transition_model_version_stage(name, str(version), stage, archive_existing_versions=True)
    if alias:
        client.set_registered_model_alias(name, alias, str(version))


def resolve_model(spec: str, *, stage: str | None = None, alias: str | None = None,
                  version: str | int | None = None):
    """Turn a user's model reference into (model URI, registry version or None).

    Accepts `models:/NAME@ALIAS`, `models:/NAME/STAGE`, `models:/NAME/VERSION`, `runs:/ID/PATH`,
    or a registered NAME plus one of stage/alias/version.
    """
    client = MlflowClient()
    if spec.startswith("runs:/"):
        return spec, None
    if spec.startswith("models:/"):
        body = spec[len("models:/"):]
        if "@" in body:
            name, alias = body.split("@", 1)
        elif "/" in body:
            name, ref = body.split("/", 1)
            if ref.isdigit():
                version = ref
            else:
                stage = ref
        else:
            name = body
    else:
        name = spec
    if sum(x is not None for x in (stage, alias, version)) > 1:
        raise UserError("give only one of stage, alias or version")
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise UserError(f"no registered model named {name!r}") from None
    try:
        if alias is not None:
            mv = client.get_model_version_by_alias(name, alias)
        elif version is not None:
            mv = client.get_model_version(name, str(version))
        else:
            stage = stage or "Production"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                found = client.get_latest_versions(name, stages=[stage])
            if not found:
                raise UserError(f"registered model {name!r} has no version in stage {stage!r}")
            mv = found[0]
    except MlflowException as exc:
        what = f"alias {alias!r}" if alias is not None else f"version {version}"
        raise UserError(f"registered model {name!r} has no {what}: {str(exc).splitlines()[0]}") from None
    return f"models:/{name}/{mv.version}", mv


def logged_model_id(mv) -> str | None:
    """The MLflow 3 logged-model id behind a registry version. Some stores (sqlite) leave the
    version's `model_id` empty; its source `models:/m-...` still names the logged model."""
    if mv is None:
        return None
    if getattr(mv, "model_id", None):
        return mv.model_id
    source = getattr(mv, "source", "") or ""
    if source.startswith("models:/m-"):
        return source[len("models:/"):].split("/", 1)[0]
    return None


def load_model(model_uri: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Download a logged model and rebuild it from its spec and weights (legacy pickles through an
    allowlist): nothing stored in the tracking server is executed."""
    from robustlogits.core import model_format
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        with tempfile.TemporaryDirectory() as tmp:
            repo = get_artifact_repository(model_uri)
            names = {Path(f.path).name for f in repo.list_artifacts("")}
            if "extra_files" in names:  # spec format: spec and weights suffice, not the pt2 copy
                folder = Path(repo.download_artifacts("extra_files", dst_path=tmp)).parent
                spec = model_format.ArchitectureSpec.from_json(
                    (folder / "extra_files" / model_format.SPEC_FILE).read_text())
                if spec.builder != model_format.FACTORY:  # an exported graph: MLflow's own folder
                    repo.download_artifacts("data", dst_path=tmp)
                    repo.download_artifacts("MLmodel", dst_path=tmp)
                return model_format.load_model_dir(folder, device)
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
            return model_format.load_model_dir(Path(local), device)
    except UserError as exc:
        raise UserError(f"cannot load model {model_uri}: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot load model {model_uri}: {str(exc).splitlines()[0]}") from None
