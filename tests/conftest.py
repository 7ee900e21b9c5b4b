"""Shared fixtures: every test gets its own local file tracking store and data cache."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(autouse=True)
def isolated_store(tmp_path, monkeypatch):
    """A temporary file store (MLflow needs MLFLOW_ALLOW_FILE_STORE for it) and cache per test."""
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("ROBUSTLOGITS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ROBUSTLOGITS_NO_DOWNLOAD", "1")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(store.as_uri())
    yield store
    while mlflow.active_run():
        mlflow.end_run("FAILED")


@pytest.fixture(scope="session")
def real_cifar10_dir() -> Path:
    archive = SHARED_DATA / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"real CIFAR-10 not found at {archive} (see README: data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_data_cache(tmp_path_factory) -> Path:
    """Decoding 60,000 JPEGs once per session, not once per test."""
    return Path(os.environ.get("ROBUSTLOGITS_TEST_CACHE") or tmp_path_factory.mktemp("real-cache"))


@pytest.fixture(scope="session")
def teacher_store(tmp_path_factory):
    """One store with a synthetic AT teacher (2 versions, epoch 2 in Production) and an ST teacher."""
    from robustlogits.config import preset
    from robustlogits.jobs.train import run_training

    root = tmp_path_factory.mktemp("teachers")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mp.setenv("MLFLOW_TRACKING_URI", (root / "mlruns").as_uri())
    mp.setenv("ROBUSTLOGITS_NO_DOWNLOAD", "1")
    mp.chdir(root)
    mlflow.set_tracking_uri((root / "mlruns").as_uri())
    runs = {}
    for training in ("adversarial", "standard"):
        cfg = preset("test")
        cfg.run.training = training
        runs[training] = run_training(cfg, progress=False)
    mp.undo()
    return {"root": root, "uri": (root / "mlruns").as_uri(), "runs": runs}


@pytest.fixture
def with_teachers(teacher_store, monkeypatch):
    """Point this test at the shared teacher store (tests only add runs and versions to it)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", teacher_store["uri"])
    mlflow.set_tracking_uri(teacher_store["uri"])
    return teacher_store
