"""Many machines, with real servers: a PostgreSQL server holds the study, an `mlflow server`
process the runs and models; two worker processes that know only the two URLs run the study."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

PG_BIN = Path("/usr/lib/postgresql/15/bin")
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its binaries as the `postgres` user when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture
def postgres_url():
    if not (PG_BIN / "initdb").is_file():
        pytest.skip(f"PostgreSQL binaries not found under {PG_BIN} (apt-get install postgresql-15)")
    pytest.importorskip("psycopg2", reason="psycopg2 (the PostgreSQL driver) is not installed")
    folder = Path(tempfile.mkdtemp(prefix="rl-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()

    def run(*cmd):
        return subprocess.run(
            as_postgres([str(PG_BIN / cmd[0]), *cmd[1:]]), check=True, capture_output=True, text=True, timeout=120
        )

    run("initdb", "-D", str(data), "-A", "trust", "-U", "robust")
    run(
        "pg_ctl", "-D", str(data), "-l", str(folder / "log"), "-w", "-o", f"-p {port} -k {folder} -h 127.0.0.1", "start"
    )
    try:
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "robust", "optuna")
        yield f"postgresql+psycopg2://robust:unused-password@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run(
            as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "server.log", "w"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_two_workers_on_postgres_and_an_mlflow_server(postgres_url, mlflow_server, tmp_path, monkeypatch):
    from robustlogits.config import preset
    from robustlogits.jobs.train import run_training
    from robustlogits.study import engine as study_engine
    from robustlogits.study import sweep

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    mlflow.set_tracking_uri(mlflow_server)
    cfg = preset("test")
    cfg.run.training = "adversarial"
    run_training(cfg, progress=False)
    # The coordinator's side: plan, create the study on PostgreSQL, queue the grid once.
    plan = sweep.plan(
        sweep.SweepConfig(
            teacher="synthetic-cnn-tiny-at", losses=["l1", "mse"], teacher_epochs=["2"], preset="test", study="cluster"
        )
    )
    study = study_engine.open_study(plan.name, postgres_url, plan.directions, plan.spec)
    assert study_engine.enqueue_items(study, plan.items) == 2
    # Two workers that know only the two URLs, started from an empty folder.
    (tmp_path / "node").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ROBUSTLOGITS_"))}
    env |= {
        "MLFLOW_TRACKING_URI": mlflow_server,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]),
    }
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "robustlogits.cli",
                "sweep",
                "worker",
                "--study",
                "cluster",
                "--storage",
                postgres_url,
                "--heartbeat",
                "5",  # no worker dies here: a loaded CI machine must not make a live one look stale
            ],
            env=env,
            cwd=tmp_path / "node",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert "unused-password" not in "".join(outputs)
    study = optuna.load_study(study_name="cluster", storage=postgres_url)
    complete = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    states = [(t.number, t.state.name, t.user_attrs) for t in study.get_trials()]
    assert len(complete) == 2 and {t.params["loss"] for t in complete} == {"l1", "mse"}, f"{states}\n" + "\n".join(
        o[-3000:] for o in outputs
    )
    assert all(not t.user_attrs.get("idle") for t in complete)
    parent = study.user_attrs["mlflow_parent_run_id"]
    client = MlflowClient()
    assert client.get_run(parent).data.params["study.storage"].count("***") == 1  # no password
    runs = client.search_runs(
        [client.get_run(parent).info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert {t.user_attrs["mlflow_run_id"] for t in complete} == {r.info.run_id for r in runs}
    students = [v for v in client.search_model_versions("name='synthetic-cnn-tiny-student'")]
    assert sorted(v.tags["loss"] for v in students) == ["l1", "mse"]
    assert all(v.tags["teacher_name"] == "synthetic-cnn-tiny-at" and v.tags["teacher_version"] == "2" for v in students)
    assert "trials.csv" in {f.path for f in client.list_artifacts(parent)}
