"""The study engine: keyed tasks, one parent run with nested trials, resume, spec checks, and
workers in separate processes, one of them killed with SIGKILL mid-trial."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

import tests.engine_tasks  # noqa: F401 - registers the "square" task
from robustlogits.core.errors import UserError
from robustlogits.study import engine as se

REPO = Path(__file__).resolve().parents[1]
SPACE = {"x": {"choices": [1, 2]}, "y": {"choices": ["a", "b"]}}


def spec(**extra):
    return {
        "task": "square",
        "module": "tests.engine_tasks",
        "kind": "test-study",
        "sampler": "grid",
        "space": SPACE,
        "objectives": ["score"],
    } | extra


def all_runs():
    client = MlflowClient()
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def storage_url(tmp_path):
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def start(tmp_path, name="s", **extra):
    study = se.open_study(name, storage_url(tmp_path), ["maximize"], spec(**extra))
    added = se.enqueue_items(study, se.grid_items(SPACE))
    return study, added


def test_grid_items_drop_inactive_conditional_dimensions():
    space = {
        "manipulation": {"choices": ["none", "permute"]},
        "k": {"choices": [1, 3], "when": {"manipulation": ["permute"]}},
        "loss": {"choices": ["l1", "kl"]},
        "temperature": {"choices": [1, 4], "when": {"loss": ["kl"]}},
    }
    items = se.grid_items(space)
    assert len(items) == (1 + 2) * (1 + 2)
    assert {"manipulation": "none", "loss": "l1"} in items
    assert {"manipulation": "permute", "k": 3, "loss": "kl", "temperature": 4} in items


def test_items_run_once_nested_under_one_parent_and_resume_adds_nothing(tmp_path):
    study, added = start(tmp_path)
    assert added == 4
    status = se.run_workers("s", storage_url(tmp_path), 1, heartbeat=1)
    assert status.done and status.complete == 4 and not status.failed
    parent = se.parent_run_id(study)
    client = MlflowClient()
    children = [r for r in all_runs() if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert all(r.data.tags["optuna.state"] == "COMPLETE" and "trial.x" in r.data.params for r in children)
    assert sorted(r.data.metrics["score"] for r in children) == [1, 1, 4, 4]
    assert client.get_run(parent).data.params["study.sampler"] == "grid"
    assert client.get_run(parent).info.status == "FINISHED"
    table = list(csv.DictReader(open(client.download_artifacts(parent, "trials.csv"))))
    assert {r["mlflow_run_id"] for r in table} == {r.info.run_id for r in children}
    # The same study again: nothing queued, nothing run.
    again, added = start(tmp_path)
    assert added == 0
    se.run_workers("s", storage_url(tmp_path), 1, heartbeat=1)
    assert len(again.get_trials()) == 4 and len(all_runs()) == 5
    # A second study over the same work finds the finished runs by their keys: no job runs again,
    # and each trial still has a child run under its own parent, naming the run it reused.
    other, _ = start(tmp_path, name="other")
    se.run_workers("other", storage_url(tmp_path), 1, heartbeat=1)
    assert se.status(other).complete == 4 and len(all_runs()) == 10
    reused = [r for r in all_runs() if r.data.tags.get("mlflow.parentRunId") == se.parent_run_id(other)]
    assert {r.data.tags["robustlogits.reused_run"] for r in reused} == {r.info.run_id for r in children}
    assert all(r.data.metrics["score"] in (1, 4) and r.info.status == "FINISHED" for r in reused)
    assert {t.user_attrs["reused"] for t in other.get_trials()} == {r.info.run_id for r in children}


def test_failed_trials_are_summarised_and_retried_on_the_next_run(tmp_path):
    study = se.open_study(
        "f", storage_url(tmp_path), ["maximize"], spec(space={"x": {"choices": [3]}, "y": {"choices": ["a", "fail"]}})
    )
    se.enqueue_items(study, se.grid_items({"x": {"choices": [3]}, "y": {"choices": ["a", "fail"]}}))
    status = se.run_workers("f", storage_url(tmp_path), 1, heartbeat=1)
    assert not status.done and status.complete == 1 and len(status.failed) == 1
    assert "asked to fail" in status.summary()
    failed_run = MlflowClient().get_run(study.get_trials()[1].user_attrs["mlflow_run_id"])
    assert failed_run.info.status == "FAILED" and failed_run.data.tags["optuna.state"] == "FAIL"
    assert se.enqueue_items(study, se.grid_items({"x": {"choices": [3]}, "y": {"choices": ["a", "fail"]}})) == 1


def test_a_different_spec_under_the_same_name_is_refused_with_the_difference(tmp_path):
    start(tmp_path)
    before = len(all_runs())
    with pytest.raises(UserError) as err:
        se.open_study("s", storage_url(tmp_path), ["maximize"], spec(space={"x": {"choices": [1, 2, 3]}}))
    assert "different spec" in str(err.value) and "space" in str(err.value) and "[1, 2, 3]" in str(err.value)
    assert len(all_runs()) == before


def test_unreachable_storage_is_one_clear_error_without_the_password():
    with pytest.raises(UserError) as err:
        se.open_study("s", "postgresql://user:secret@127.0.0.1:9/nodb", ["maximize"], spec())
    assert "not reachable" in str(err.value) and "secret" not in str(err.value)
    assert not all_runs()


def test_two_worker_processes_and_a_worker_killed_mid_trial(tmp_path, monkeypatch):
    """A SIGKILLed worker's trial is failed as stale and retried; its run ends FAILED; every item
    ends COMPLETE exactly once."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("SQUARE_SLEEP", "2")
    study, _ = start(tmp_path)
    url = storage_url(tmp_path)
    victim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "robustlogits.cli",
            "sweep",
            "worker",
            "--study",
            "s",
            "--storage",
            url,
            "--heartbeat",
            "1",
        ],
        env=os.environ.copy(),
    )
    deadline = time.monotonic() + 120
    while not any(
        t.state == optuna.trial.TrialState.RUNNING and "mlflow_run_id" in t.user_attrs for t in study.get_trials()
    ):
        assert time.monotonic() < deadline and victim.poll() is None
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = next(t for t in study.get_trials() if t.state == optuna.trial.TrialState.RUNNING)
    status = se.run_workers("s", url, 2, heartbeat=1)
    assert status.done and status.complete == 4 and not status.failed
    trials = study.get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4 and len({t.user_attrs["item_key"] for t in complete}) == 4
    assert [t.number for t in trials if t.state == optuna.trial.TrialState.FAIL] == [killed.number]
    killed_run = MlflowClient().get_run(killed.user_attrs["mlflow_run_id"])
    assert killed_run.info.status == "FAILED"
    assert all(r.info.status != "RUNNING" for r in all_runs())


def test_ctrl_c_fails_the_trial_and_its_run_and_leaves_a_resumable_study(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("SQUARE_SLEEP", "30")
    # long enough that the signal lands inside a trial however loaded the machine is (the interrupt ends it)
    study, _ = start(tmp_path)
    url = storage_url(tmp_path)
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "robustlogits.cli",
            "sweep",
            "worker",
            "--study",
            "s",
            "--storage",
            url,
            "--heartbeat",
            "1",
        ],
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # a worker at a terminal: a shell's background job (`.ci/run &`) inherits SIGINT ignored,
        # and a Python started that way keeps ignoring it, as Unix intends
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )

    def task_at_work() -> bool:
        """The trial's task has opened its own run: the signal lands in the task, not in the set-up
        around it (a loaded CI machine can spend seconds there)."""
        try:
            runs = all_runs()
        except Exception:  # noqa: BLE001 - a record read while the worker writes it: look again
            return False
        return any(r.info.status == "RUNNING" and r.data.tags.get("robustlogits.job") == "square" for r in runs)

    deadline = time.monotonic() + 120
    while not task_at_work():
        assert time.monotonic() < deadline and worker.poll() is None
        time.sleep(0.2)
    time.sleep(1)  # from logging its params into its 30 s sleep
    worker.send_signal(signal.SIGINT)
    assert worker.wait(timeout=60) != 0
    interrupted = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.FAIL]
    assert len(interrupted) == 1 and "KeyboardInterrupt" in interrupted[0].user_attrs["error"]
    run = MlflowClient().get_run(interrupted[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["optuna.state"] == "FAIL"
    monkeypatch.setenv("SQUARE_SLEEP", "0")
    assert se.enqueue_items(study, se.grid_items(SPACE)) == 1  # only the interrupted item again
    status = se.run_workers("s", url, 1, heartbeat=1)
    assert status.done and status.complete == 4
    assert all(r.info.status != "RUNNING" for r in all_runs())


def test_worker_devices_round_robin_and_per_device_limit(monkeypatch):
    import torch

    from robustlogits.core.device import resolve_device, worker_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert worker_devices(3) == [None, None, None]  # CPU-only: simply N workers
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert worker_devices(4, workers_per_device=2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    with pytest.raises(UserError, match="do not fit 2 GPU"):
        worker_devices(5, workers_per_device=2)
    monkeypatch.setenv("ROBUSTLOGITS_DEVICE", "cpu")
    assert resolve_device("auto").type == "cpu"  # a worker's assigned device wins over "a GPU if any"


def test_step_times_are_read_by_the_run_each_try_made(tmp_path):
    """A step done twice (its first run deleted, or made at older code) is charged for the run a
    report reads, not for the slowest of the tries; a try that reused a finished run is no time."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"

    def done(run_id, seconds, reused="", estimate=None):
        attrs = {"item": {"key": "k1"}, "mlflow_run_id": run_id, "task_seconds": seconds, "reused": reused}
        attrs |= {se.ESTIMATE_ATTR: estimate} if estimate else {}
        return optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=1.0, user_attrs=attrs)

    first = optuna.create_study(study_name="first-try", storage=url)
    first.add_trial(done("run-a", 1860.0))  # beside the test suite: contended
    again = optuna.create_study(study_name="again", storage=url)
    again.add_trials([done("run-b", 731.0, estimate=800.0), done("run-b", 2.0, reused="1", estimate=5.0)])
    assert se.task_times_by_run(url) == {
        "run-a": {"seconds": 1860.0, "estimate_s": None},
        "run-b": {"seconds": 731.0, "estimate_s": 800.0},  # the estimate of the try that made the run
    }


def test_a_note_queued_with_an_item_is_kept_but_is_not_part_of_its_key(tmp_path):
    study = se.open_study("noted", storage_url(tmp_path), ["maximize"], spec())
    items = se.grid_items(SPACE)[:2]
    assert se.enqueue_items(study, items, [{se.ESTIMATE_ATTR: 60.0}, {}]) == 2
    trials = study.get_trials(deepcopy=False)
    assert trials[0].user_attrs[se.ESTIMATE_ATTR] == 60.0 and se.ESTIMATE_ATTR not in trials[1].user_attrs
    assert trials[0].user_attrs["item_key"] == se.item_key(items[0])
    assert se.enqueue_items(study, items, [{se.ESTIMATE_ATTR: 90.0}, {}]) == 0  # another estimate: same work
