"""Registry writes that are all-or-nothing and idempotent, tags that follow the registry, no
temporary leftovers, and where a sqlite store keeps its artifacts."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from robustlogits import tracking
from robustlogits.cli import app
from robustlogits.config import preset
from robustlogits.core import models
from robustlogits.jobs import tracked_training
from robustlogits.jobs.train import run_training


def everything(client: MlflowClient) -> tuple[int, int, int]:
    """(runs, versions, logged models) in the store."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = sum(len(client.search_runs([e])) for e in experiments)
    logged = len(client.search_logged_models(experiment_ids=experiments)) if experiments else 0
    return runs, len(client.search_model_versions("")), logged


@pytest.fixture
def weights(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "w.pt"
    torch.save(models.build_model("cnn-tiny", 10, "synthetic").net.state_dict(), path)
    return path


def imported(weights: Path, *extra: str, name: str = "ext"):
    args = ["import", "--checkpoint", str(weights), "--name", name, "--arch", "cnn-tiny", "--dataset", "synthetic"]
    return CliRunner().invoke(app, [*args, "--check-images", "20", *extra])


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--alias", "latest"], "alias 'latest'.*reserved"),
        (["--alias", "v1"], "alias 'v1'.*reserved"),
        (["--stage", "Bogus"], "unknown stage 'Bogus'"),
        (["--name", "../x"], "refuses the registered model name '../x'"),
        (["--name", "a/b"], "refuses the registered model name 'a/b'"),
    ],
)
def test_what_the_registry_refuses_is_refused_before_anything_is_written(weights, extra, message):
    result = imported(weights, *extra, name=extra[1] if extra[0] == "--name" else "ext")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), result.output
    assert everything(MlflowClient()) == (0, 0, 0)


def test_checkpoint_is_checked_before_any_test_image_is_decoded(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save(models.build_model("resnet20", 10).net.state_dict(), bad)
    args = ["import", "--checkpoint", str(bad), "--name", "x", "--arch", "cnn-tiny", "--data-dir", str(tmp_path)]
    result = CliRunner().invoke(app, args)  # cifar10 is not in tmp_path: only the checkpoint may be blamed
    assert result.exit_code == 2 and "does not match architecture cnn-tiny" in result.output, result.output


def test_importing_the_same_weights_twice_finds_the_version(weights):
    first = imported(weights)
    assert first.exit_code == 0, first.output
    again = imported(weights, "--alias", "teacher")
    assert again.exit_code == 0 and "already registered as ext version 1" in again.output, again.output
    client = MlflowClient()
    assert everything(client) == (1, 1, 1)
    mv = client.get_model_version_by_alias("ext", "teacher")
    assert str(mv.version) == "1" and len(mv.tags["weights_sha256"]) == 64
    assert client.get_logged_model(mv.model_id).params["weights_sha256"] == mv.tags["weights_sha256"]


def test_a_sqlite_store_keeps_artifacts_beside_the_database_unless_told_otherwise(tmp_path, monkeypatch):
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    explicit = (tmp_path / "explicit").as_uri()
    tracking.configure_store()
    mlflow.create_experiment("chosen", artifact_location=explicit)
    new = mlflow.get_experiment(tracking.check_store("fresh"))
    assert Path(new.artifact_location.removeprefix("file://")).parent == db.parent / "mlruns"
    assert mlflow.get_experiment(tracking.check_store("chosen")).artifact_location == explicit
    assert not (elsewhere / "mlruns").exists()


@pytest.mark.parametrize("uri", ["file", "sqlite"])
def test_an_experiment_another_worker_created_after_our_lookup_is_the_one_used(tmp_path, monkeypatch, uri):
    if uri == "sqlite":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.configure_store()
    theirs = mlflow.create_experiment("robustlogits-teacher-logits")  # the other worker, a moment earlier
    real, lookups = mlflow.get_experiment_by_name, []

    def lookup(name):  # our lookup ran before the other worker's create; later ones see it
        lookups.append(name)
        return None if len(lookups) == 1 else real(name)

    monkeypatch.setattr(mlflow, "get_experiment_by_name", lookup)
    assert tracking.check_store("robustlogits-teacher-logits", adopt_launched=False) == theirs
    assert len(MlflowClient().search_experiments(filter_string="name = 'robustlogits-teacher-logits'")) == 1


def test_training_leaves_no_temporary_files_and_teacher_tags_follow_the_registry(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    runs = []
    for seed in (0, 1):  # two trainings of one model: the later one takes the teacher alias
        cfg = preset("test")
        cfg.run.training, cfg.run.seed = "adversarial", seed
        cfg.optim.epochs, cfg.run.checkpoint_epochs, cfg.monitor.robust_every = 1, (1,), 0
        runs.append(run_training(cfg, progress=False))
    assert tracked_training.load_histograms(runs[0])
    assert tracked_training.checkpoint_test_logits(runs[0], 1)["logits"].shape[0] > 0
    assert list(scratch.iterdir()) == []  # histograms, test logits, models: every download removed
    client = MlflowClient()
    holder = client.get_model_version_by_alias("synthetic-cnn-tiny-at", "teacher")
    first, second = (client.get_run(r).data.tags for r in runs)
    assert holder.run_id == runs[1] and second["teacher_version"] == str(holder.version)
    assert "teacher_version" not in first and f"until version {holder.version}" in first["teacher_version_superseded"]
