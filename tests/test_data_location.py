"""Data found again where a job runs: recorded folders are absolute hints, the content digest decides."""

from __future__ import annotations

import re
import shutil

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from robustlogits.cli import app
from robustlogits.core import data
from robustlogits.core.errors import UserError
from tests.test_data import write_cifar10_pickles


def test_a_recorded_folder_is_only_a_hint_and_the_digest_decides(tmp_path, monkeypatch):
    write_cifar10_pickles(tmp_path / "a")
    write_cifar10_pickles(tmp_path / "b", per_batch=10)  # other content
    monkeypatch.chdir(tmp_path)
    trained = data.load_raw("cifar10", "a")
    assert trained.root == str((tmp_path / "a").resolve())  # what runs record: absolute
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # The relative folder the run was given no longer resolves here; ROBUSTLOGITS_DATA does.
    monkeypatch.setenv("ROBUSTLOGITS_DATA", str(tmp_path / "a"))
    found = data.load_raw("cifar10", hint="a", digest=trained.digest)
    assert found.digest == trained.digest and found.root == trained.root
    # A given folder with other content is passed over for one that matches ...
    found = data.load_raw("cifar10", tmp_path / "b", hint=str(tmp_path / "a"), digest=trained.digest)
    assert found.root == trained.root
    # ... and when nothing matches, one line says what was found and why it was refused.
    monkeypatch.setenv("ROBUSTLOGITS_DATA", str(tmp_path / "b"))
    with pytest.raises(UserError) as err:
        data.load_raw("cifar10", hint="a", digest=trained.digest)
    assert f"content digest {trained.digest}" in str(err.value) and "holds digest" in str(err.value)


def test_distil_from_another_folder_after_the_data_moved(tmp_path, monkeypatch):
    """The user story: a teacher trained with a relative --data-dir, a student distilled from
    another folder on a machine where the data lives elsewhere (found through ROBUSTLOGITS_DATA)."""
    write_cifar10_pickles(tmp_path / "project" / "data")
    monkeypatch.chdir(tmp_path / "project")
    tiny = [
        "--preset",
        "test",
        "--set",
        "data.val_per_class=0",
        "--set",
        "optim.epochs=1",
        "--set",
        "run.checkpoint_epochs=1",
    ]
    result = CliRunner().invoke(
        app, ["train", "--training", "adversarial", "--dataset", "cifar10", "--data-dir", "data", *tiny]
    )
    assert result.exit_code == 0, result.output
    run_id = re.search(r"run ([0-9a-f]{32}) finished", result.output).group(1)
    recorded = MlflowClient().get_run(run_id).data.params["data.data_dir"]
    assert recorded == str((tmp_path / "project" / "data").resolve())
    shutil.move(tmp_path / "project" / "data", tmp_path / "moved")
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    monkeypatch.setenv("ROBUSTLOGITS_DATA", str(tmp_path / "moved"))
    result = CliRunner().invoke(app, ["distill", "--teacher", "cifar10-cnn-tiny-at", "--no-attack", *tiny])
    assert result.exit_code == 0, result.output
    student = MlflowClient().get_run(re.search(r"run ([0-9a-f]{32}) finished", result.output).group(1))
    assert student.data.params["data.data_dir"] == str((tmp_path / "moved").resolve())
    assert student.data.tags["data_digest"] == MlflowClient().get_run(run_id).data.tags["data_digest"]
