"""`robustlogits sweep`: a 2 x 2 grid (teacher epoch x loss) on the test preset, a worker killed
mid-trial, resume, the parent run's report, two objectives, bad input, and the MLproject entry point."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from typer.testing import CliRunner

from robustlogits.cli import app
from robustlogits.study import engine as study_engine
from robustlogits.study import sweep

REPO = Path(__file__).resolve().parents[1]
TEACHER, STUDENT = "synthetic-cnn-tiny-at", "synthetic-cnn-tiny-student"
GRID = ["--teacher", TEACHER, "--teacher-epochs", "all", "--losses", "l1,kl", "--preset", "test", "--heartbeat", "1"]


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    """A store of its own with one synthetic AT teacher (checkpoints at epochs 1 and 2)."""
    from robustlogits.config import preset
    from robustlogits.jobs.train import run_training

    root = tmp_path_factory.mktemp("sweep-teacher")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mp.setenv("MLFLOW_TRACKING_URI", (root / "mlruns").as_uri())
    mp.setenv("ROBUSTLOGITS_NO_DOWNLOAD", "1")
    mlflow.set_tracking_uri((root / "mlruns").as_uri())
    cfg = preset("test")
    cfg.run.training = "adversarial"
    run_training(cfg, progress=False)
    mp.undo()
    return root


@pytest.fixture
def store(sweep_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (sweep_store / "mlruns").as_uri())
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    mlflow.set_tracking_uri((sweep_store / "mlruns").as_uri())
    return sweep_store


def all_runs():
    client = MlflowClient()
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def invoke(*args):
    return CliRunner().invoke(app, ["sweep", *args])


def test_grid_runs_every_point_once_survives_a_killed_worker_and_resumes(store, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = [*GRID, "--study", "grid", "--storage", url]
    # The coordinator (with its one in-process worker) is killed with SIGKILL mid-trial ...
    proc = subprocess.Popen(
        [sys.executable, "-m", "robustlogits.cli", "sweep", *args],
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before it could be killed"
        with pytest.MonkeyPatch.context():
            try:
                trials = optuna.load_study(study_name="grid", storage=url).get_trials()
            except KeyError:
                trials = []
        if any(t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs for t in trials):
            break
        time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # ... and the same command again finishes the study: the lost trial is retried, nothing twice.
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="grid", storage=url)
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4
    assert {(t.params["teacher_epoch"], t.params["loss"]) for t in complete} == {
        (1, "l1"),
        (1, "kl"),
        (2, "l1"),
        (2, "kl"),
    }
    assert [t.state for t in trials if t.state != TrialState.COMPLETE] == [TrialState.FAIL]
    parent = study.user_attrs["mlflow_parent_run_id"]
    client = MlflowClient()
    children = [r for r in all_runs() if r.data.tags.get("mlflow.parentRunId") == parent]
    finished = [r for r in children if r.info.status == "FINISHED"]
    # the killed trial's run was ended FAILED as lost, then continued by its retry: not a second run
    assert len(finished) == 4 and len(children) == 4
    (lost_trial,) = [t for t in trials if t.state == TrialState.FAIL]
    continued = client.get_run(lost_trial.user_attrs["mlflow_run_id"])
    assert continued.info.status == "FINISHED" and continued.data.tags["previous_error"].startswith("lost:")
    assert all(r.info.status != "RUNNING" for r in all_runs())
    assert {r.data.tags["optuna.state"] for r in finished} == {"COMPLETE"}
    assert all({"trial.teacher_epoch", "trial.loss", "optuna.trial_number"} <= set(r.data.params) for r in finished)
    assert all("adversarial_accuracy" in r.data.metrics for r in finished)
    # Four students, registered with their lineage, one per finished child.
    students = [
        v for v in client.search_model_versions(f"name='{STUDENT}'") if v.run_id in {r.info.run_id for r in finished}
    ]
    assert len(students) == 4
    assert {(v.tags["teacher_name"], v.tags["teacher_version"], v.tags["loss"]) for v in students} == {
        (TEACHER, "1", "l1"),
        (TEACHER, "1", "kl"),
        (TEACHER, "2", "l1"),
        (TEACHER, "2", "kl"),
    }
    # The parent: its params, figures, table; the best student carries the alias.
    p = client.get_run(parent)
    assert p.info.status == "FINISHED" and p.data.params["study.sampler"] == "grid"
    assert p.data.params["study.storage"] == url and "teacher_epoch" in p.data.params["study.space"]
    files = {f.path for f in client.list_artifacts(parent, "figures")}
    assert {"figures/fig_a6_teacher_epoch.png", "figures/fig_a7_loss.png"} <= files
    table = Path(client.download_artifacts(parent, "trials.csv", str(tmp_path))).read_text().splitlines()
    assert len(table) == 1 + 5 and all(
        s.split("/")[1] in "".join(table) for s in (f"{v.name}/{v.version}" for v in students)
    )
    best = client.get_model_version_by_alias(STUDENT, "best-grid")
    assert best.run_id == complete[max(range(4), key=lambda i: complete[i].value)].user_attrs["mlflow_run_id"]
    # Again: nothing queued, nothing run, no new runs.
    before = len(all_runs())
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert len(optuna.load_study(study_name="grid", storage=url).get_trials()) == len(trials)
    assert len(all_runs()) == before


def test_two_objectives_with_tpe_give_a_pareto_front(store, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    result = invoke(
        *GRID,
        "--sampler",
        "tpe",
        "--n-trials",
        "2",
        "--objective",
        "natural,adversarial",
        "--study",
        "pareto",
        "--storage",
        url,
    )
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="pareto", storage=url)
    assert len(study.directions) == 2
    assert len([t for t in study.get_trials() if t.state == TrialState.COMPLETE]) == 2
    files = {f.path for f in MlflowClient().list_artifacts(study.user_attrs["mlflow_parent_run_id"], "figures")}
    assert "figures/pareto_front.png" in files


def test_create_only_queues_the_grid_for_workers_elsewhere(store, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    result = invoke(*GRID, "--study", "queued", "--storage", url, "--create-only")
    assert result.exit_code == 0 and "sweep worker --study queued" in result.output, result.output
    study = optuna.load_study(study_name="queued", storage=url)
    assert [t.state for t in study.get_trials()] == [TrialState.WAITING] * 4
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert MlflowClient().get_run(parent).info.status == "FINISHED"
    assert not [r for r in all_runs() if r.data.tags.get("mlflow.parentRunId") == parent]


BAD = [
    (["--losses", "l1,hinge"], "unknown loss 'hinge'"),
    (["--manipulations", "shuffle"], "unknown manipulation 'shuffle'"),
    (["--teacher-epochs", "1,7"], "no registered checkpoint at epoch 7; registered epochs: 1, 2"),
    (["--manipulations", "permute", "--ks", "3,11"], "k must be in 1..10"),
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--storage", "postgresql://someone:hunter2@127.0.0.1:9/nodb"], "is not reachable"),
    (["--sampler", "tpe"], "needs --n-trials"),
    (["--objective", "robustness"], "unknown objective"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_input_exits_2_before_any_run_or_trial(store, tmp_path, args, message):
    before = {r.info.run_id for r in all_runs()}
    result = invoke(
        "--teacher",
        TEACHER,
        "--losses",
        "l1",
        "--preset",
        "test",
        "--storage",
        f"sqlite:///{tmp_path / 'optuna.db'}",
        *args,
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output and "hunter2" not in result.output
    assert {r.info.run_id for r in all_runs()} == before
    if (tmp_path / "optuna.db").exists():
        assert all(not s.n_trials for s in optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'optuna.db'}"))


def test_an_existing_study_with_another_space_is_refused_with_the_difference(store, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    p = sweep.plan(sweep.SweepConfig(teacher=TEACHER, losses=["l1"], preset="test", study="s"))
    study_engine.open_study(p.name, url, p.directions, p.spec)
    before = len(all_runs())
    result = invoke("--teacher", TEACHER, "--losses", "l1,mse", "--preset", "test", "--study", "s", "--storage", url)
    assert result.exit_code == 2, result.output
    assert "different spec" in result.output and '"mse"' in result.output and "space" in result.output
    assert len(all_runs()) == before


def test_mlflow_run_sweep_entry_point(store, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "run",
            str(REPO),
            "-e",
            "sweep",
            "--env-manager",
            "local",
            "-P",
            f"teacher={TEACHER}",
            "-P",
            "teacher_epochs=2",
            "-P",
            "losses=l1",
            "-P",
            "preset=test",
            "-P",
            f"storage={url}",
            "-P",
            "study=launched",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="launched", storage=url)
    parent = MlflowClient().get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags.get("mlflow.project.entryPoint") == "sweep"  # the launcher's run is the parent
    assert parent.info.status == "FINISHED"
    children = [r for r in all_runs() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    assert children[0].info.experiment_id == parent.info.experiment_id
