"""What a run holds: results, files, figures, and the data and models it read.

Files are written to a temporary folder first and uploaded whole, so the store never holds a
truncated artifact.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from robustlogits.core.errors import UserError


def metric_name(text: str) -> str:
    """A name MLflow accepts as a metric key (model labels contain spaces, '#', '@', ...)."""
    return re.sub(r"[^0-9A-Za-z_\-./ ]", "_", text)


def log_results(
    metrics: dict[str, Any], *, step: int | None = None, model_id: str | None = None, run_id: str | None = None
) -> None:
    """Numbers a run measured (NaN and None measure nothing and are left out). With `model_id` they
    are also the logged model's metrics, which the models table and `search_logged_models` rank."""
    finite = {
        metric_name(k): float(v)
        for k, v in metrics.items()
        if v is not None and not isinstance(v, bool) and math.isfinite(float(v))
    }
    if not finite:
        return
    if run_id is None:
        mlflow.log_metrics(finite, step=step, model_id=model_id, synchronous=True)
        return
    client = MlflowClient()
    for key, value in finite.items():
        client.log_metric(run_id, key, value, step=step or 0, model_id=model_id)


def _log_file(artifact_file: str, write: Callable[[Path], None], run_id: str | None = None) -> None:
    """Write into a temporary file, then upload it whole."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        write(path)
        folder = str(Path(artifact_file).parent)
        folder = None if folder == "." else folder
        if run_id is None:
            mlflow.log_artifact(str(path), folder)
        else:
            MlflowClient().log_artifact(run_id, str(path), folder)


def log_json(obj: Any, artifact_file: str, run_id: str | None = None) -> None:
    _log_file(artifact_file, lambda path: path.write_text(json.dumps(obj, indent=1, default=str)), run_id)


def log_text(text: str, artifact_file: str, run_id: str | None = None) -> None:
    _log_file(artifact_file, lambda path: path.write_text(text), run_id)


def log_bytes(blob: bytes, artifact_file: str) -> None:
    _log_file(artifact_file, lambda path: path.write_bytes(blob))


def log_arrays(artifact_file: str, **arrays: np.ndarray) -> None:
    _log_file(artifact_file, lambda path: np.savez(path, **arrays))


def log_figure(fig, artifact_file: str, run_id: str | None = None) -> None:
    """A matplotlib figure as an image artifact; the figure is closed afterwards."""
    import matplotlib.pyplot as plt

    if run_id is None:
        mlflow.log_figure(fig, artifact_file)
    else:
        MlflowClient().log_figure(run_id, fig, artifact_file)
    plt.close(fig)


def log_epoch_image(image: np.ndarray, key: str, epoch: int) -> None:
    """One image per epoch under one key: the run page shows them with a step slider."""
    mlflow.log_image(image, key=key, step=epoch, synchronous=True)


def log_folder(local_dir: str | Path, artifact_path: str | None = None, run_id: str | None = None) -> None:
    """Every file of a local folder (written completely before this call)."""
    if run_id is None:
        mlflow.log_artifacts(str(local_dir), artifact_path)
    else:
        MlflowClient().log_artifacts(run_id, str(local_dir), artifact_path)


def log_file(local_file: str | Path, artifact_path: str | None = None, run_id: str | None = None) -> None:
    if run_id is None:
        mlflow.log_artifact(str(local_file), artifact_path)
    else:
        MlflowClient().log_artifact(run_id, str(local_file), artifact_path)


_DOWNLOADS: list[str] = []  # this process's download folder, removed at exit


def _download_folder() -> str:
    if not _DOWNLOADS:
        _DOWNLOADS.append(tempfile.mkdtemp(prefix="robustlogits-downloads-"))
        atexit.register(shutil.rmtree, _DOWNLOADS[0], True)
    return _DOWNLOADS[0]


def _download(run_id: str, artifact_path: str, folder: str) -> Path:
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=folder))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"run {run_id} has no artifact {artifact_path!r}: {str(exc).splitlines()[0]}") from None


def download_artifact(run_id: str, artifact_path: str) -> Path:
    """An artifact in this process's download folder (removed when the process exits). Jobs
    prefer `downloaded`, whose folder is gone as soon as they have read it."""
    folder = tempfile.mkdtemp(dir=_download_folder())
    return _download(run_id, artifact_path, folder)


@contextlib.contextmanager
def downloaded(run_id: str, artifact_path: str) -> Iterator[Path]:
    """An artifact (file or folder) in a temporary folder removed on leaving the block."""
    with tempfile.TemporaryDirectory(prefix="robustlogits-") as tmp:
        yield _download(run_id, artifact_path, tmp)


def read_artifact(run_id: str, artifact_path: str) -> bytes:
    """One artifact file's bytes; nothing stays on disk."""
    with downloaded(run_id, artifact_path) as path:
        return path.read_bytes()


def list_artifacts(run_id: str, path: str | None = None) -> list[str]:
    return [f.path for f in MlflowClient().list_artifacts(run_id, path)]


def log_dataset_input(name: str, digest: str, source: str, context: str, n_rows: int | None = None) -> None:
    """Record the data a run used as an MLflow dataset input, identified by a content digest."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    src = HTTPDatasetSource(url=f"robustlogits://{name}/{source.replace(':', '/')}")
    dataset = MetaDataset(source=src, name=name, digest=digest)
    mlflow.log_input(dataset, context=context, tags={"rows": str(n_rows)} if n_rows else None)


def log_model_inputs(model_ids: list[str | None]) -> None:
    """Record models (the attacked model, a student's teachers) as inputs of the active run.

    The fluent `mlflow.log_inputs(models=...)` is Databricks-only; the client API works everywhere."""
    from mlflow.entities import LoggedModelInput

    ids = [m for m in model_ids if m]
    if ids:
        MlflowClient().log_inputs(mlflow.active_run().info.run_id, models=[LoggedModelInput(m) for m in ids])
