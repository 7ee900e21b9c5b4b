"""A run a kill left half-opened: MLflow's file store writes a new run's meta.yaml, then its tags one
file at a time, so SIGKILL between the two leaves a RUNNING run without the tags naming its process.
A fresh-clone CI saw one survive a resumed `reproduce` (test_reproduce's killed-between-steps test)."""

from __future__ import annotations

import os
import threading
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from robustlogits import tracking
from robustlogits.tracking import runs, store


def _half_opened(tags: dict[str, str], age_s: float = 60.0) -> str:
    """A RUNNING run with these tags and none of the process tags, last written `age_s` ago."""
    tracking.configure_store()
    client = MlflowClient()
    exp = client.get_experiment_by_name("robustlogits") or client.get_experiment(
        client.create_experiment("robustlogits")
    )
    run = client.create_run(exp.experiment_id, tags=tags)
    folder = store.file_store_root() / exp.experiment_id / run.info.run_id
    then = time.time() - age_s
    for path in folder.rglob("*"):
        os.utime(path, (then, then))
    return run.info.run_id


def test_a_keyed_run_killed_as_it_opened_is_ended_lost_when_its_key_is_produced_again():
    run_id = _half_opened({tracking.KEY_TAG: "k1", "robustlogits.job": "train"})
    assert runs.end_lost_with_key("k1") == [run_id]
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags[runs.LOST_TAG] == "true"
    assert run.data.tags[runs.ERROR_TAG].startswith("lost: its process was killed as it opened the run")


def test_a_run_killed_before_any_of_our_tags_is_known_by_the_program_mlflow_names_as_its_source():
    ours = _half_opened({"mlflow.source.name": "/x/src/robustlogits/cli/__main__.py", "mlflow.source.type": "LOCAL"})
    foreign = _half_opened({"mlflow.source.name": "/home/me/notebook.py", "mlflow.source.type": "LOCAL"})
    launcher = _half_opened({"mlflow.source.name": "/x/robustlogits/", "mlflow.source.type": "PROJECT"})
    stale = {record.run_id: reason for record, reason in tracking.stale_runs()}
    assert ours in stale and "killed as it opened" in stale[ours]
    assert foreign not in stale  # someone else's idle run is not ours to end
    assert launcher not in stale  # `mlflow run` made it and waits for its job to adopt it


def test_a_run_still_being_written_is_left_to_its_writer(monkeypatch):
    monkeypatch.setattr(store, "_OPEN_GRACE_S", 1.0)
    run_id = _half_opened({tracking.KEY_TAG: "k2"}, age_s=0.0)
    stop = threading.Event()

    def writer():  # a live, slow opener: one more tag every 0.2 s
        i = 0
        while not stop.is_set():
            MlflowClient().set_tag(run_id, f"t{i}", "v")
            i += 1
            time.sleep(0.2)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert runs.end_lost_with_key("k2") == []
    finally:
        stop.set()
        thread.join()
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"
    time.sleep(1.2)  # its writer stopped: now it is abandoned
    assert runs.end_lost_with_key("k2") == [run_id]


def test_a_database_store_never_has_a_half_opened_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    tracking.configure_store()
    client = MlflowClient()
    run = client.create_run(client.create_experiment("e"), tags={tracking.KEY_TAG: "k3"})
    assert store.file_store_root() is None
    assert runs.end_lost_with_key("k3") == []  # made in one transaction: a missing pid means another tool
    assert client.get_run(run.info.run_id).info.status == "RUNNING"


def test_our_runs_record_their_process_before_any_other_tag_of_ours(monkeypatch):
    written: list[str] = []
    real = mlflow.start_run

    def spy(*args, **kwargs):
        written.extend(kwargs.get("tags") or {})
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "start_run", spy)
    tracking.configure_store()
    with runs.job_run("robustlogits", "r", tags={tracking.KEY_TAG: "k4", "robustlogits.job": "train"}):
        pass
    assert written.index(runs.PID_TAG) < written.index(tracking.KEY_TAG)
    assert written.index(runs.HOST_TAG) < written.index("robustlogits.job")


@pytest.mark.parametrize("uri, expected", [("file:///a/b", "/a/b"), ("/a/b", "/a/b"), ("sqlite:///x.db", None)])
def test_the_file_store_root_is_read_off_the_uri(uri, expected):
    root = store.file_store_root(uri)
    assert (str(root) if root else None) == expected
