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
from robustlogits.core.errors import UserError
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


NAMES = ["ext", "cifar10-resnet18-at", "a.b_c-1", "A1", "_x", "x" * 255, "x" * 300, "", " ", "../x", "a/b", "a:b", ".", "..",
         "..x", ".x", "-x", "a b", "naïve", "a\\b", "a?b", "a%2Fb", "a#b"]  # fmt: skip
ALIASES = ["teacher", "prod_1", "a-b", "latest", "LATEST", "v1", "V12", "v1a", "va", "x" * 255, "x" * 256, "",
           "a.b", "a b", "a/b", "naïve", "-", "_"]  # fmt: skip


def _mlflow_accepts(action, *args) -> bool:
    try:
        action(*args)
    except (mlflow.exceptions.MlflowException, OSError):  # OSError: a file store's folder name too long
        return False
    return True


@pytest.mark.parametrize("store", ["file", "sqlite"])
def test_the_names_and_aliases_we_accept_are_ones_mlflow_accepts_and_we_refuse_what_it_refuses(
    tmp_path, monkeypatch, store
):
    """Our own check of MLflow's documented rules (no private validator) against MLflow itself, on a
    real store: a name or alias we let through must register; one MLflow refuses we must refuse."""
    if store == "sqlite":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.configure_store()
    client = MlflowClient()
    disagreements = []
    for name in NAMES:
        ours = tracking.registry.model_name_problem(name) is None
        theirs = _mlflow_accepts(client.create_registered_model, name)
        if ours and not theirs:  # stricter than MLflow is fine (spaces, non-ASCII); looser is not
            disagreements.append(f"name {name!r}: ours {ours}, MLflow {theirs}")
    client.create_registered_model("holder")
    client.create_model_version("holder", (tmp_path / "m").as_uri())
    for alias in ALIASES:
        ours = tracking.registry.alias_problem(alias) is None
        theirs = _mlflow_accepts(client.set_registered_model_alias, "holder", alias, "1")
        if ours and not theirs:
            disagreements.append(f"alias {alias!r}: ours {ours}, MLflow {theirs}")
        if theirs and not ours and alias.isascii():  # stricter only where MLflow's \w takes non-ASCII letters
            disagreements.append(f"alias {alias!r}: we refuse what MLflow accepts")
    assert disagreements == []
    # The documented rules themselves, as a reader of check_registration's message expects:
    assert tracking.registry.model_name_problem("cifar10-resnet18-at") is None
    assert tracking.registry.alias_problem("latest") and tracking.registry.alias_problem("v3")
    with pytest.raises(UserError, match="unknown stage 'Live'"):
        tracking.check_registration("ok", stage="Live")
    tracking.check_registration("ok", stage="production", alias="teacher")  # stages are case-insensitive
