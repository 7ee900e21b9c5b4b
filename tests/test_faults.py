"""Fault injection: every command killed with SIGKILL at seeded points, then run again; the disk
filling up while logging; a corrupt model read back.

A command runs in a forked child process (the parent has imported torch and MLflow once, so a run
costs its work only). Kill points are counted in tracking-store calls: an uninterrupted run counts
its calls, `POINTS` of them are drawn with a fixed seed, and at each the child SIGKILLs itself just
before that call (no handler, no cleanup: the worst case). Then the same command runs again, and
after it:
- no run is RUNNING, no READY version belongs to a run that is not FINISHED;
- no two FINISHED runs share a job identity or key, no two versions share their weights;
- no Optuna item has two COMPLETE trials;
- the temporary folder is empty (the killed process's leftovers included);
- the numbers equal the uninterrupted run's.
The counts (points killed, cases, all held) are printed as `faults: ...` lines (`pytest -s`).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from robustlogits import tracking
from robustlogits.cli import app
from robustlogits.core import models
from tests.browser import free_port

SEED = 20
POINTS = int(os.environ.get("ROBUSTLOGITS_FAULT_POINTS", "1"))  # kill points per command (CI budget: 1)
TALLY: dict[str, list[int]] = {}  # command -> [points killed, retries that held]


# --- a command in a child process, optionally killed at its Nth tracking call ------------------


def _counting_client(kill_at: int | None, counter: list[int], at_kill=None) -> None:
    """Every public MlflowClient method counts; the `kill_at`-th call SIGKILLs this process first
    (or runs `at_kill` instead: e.g. stops the tracking server)."""
    from mlflow.tracking import MlflowClient as Client

    for name in [n for n in dir(Client) if not n.startswith("_") and callable(getattr(Client, n))]:
        original = getattr(Client, name)

        def counted(*args, __original=original, **kwargs):
            counter[0] += 1
            if kill_at is not None and counter[0] == kill_at:
                at_kill() if at_kill else os.kill(os.getpid(), signal.SIGKILL)
            return __original(*args, **kwargs)

        setattr(Client, name, counted)


def run_command(
    args: list[str], env: dict, cwd: Path, kill_at: int | None = None, quota: int | None = None, at_kill=None
):
    """(exit code or -SIGKILL, tracking calls made, stderr text) of `robustlogits ARGS` in a fork."""
    read_fd, write_fd = os.pipe()
    err_path = cwd / f".stderr-{random.random()}"
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            # OpenMP's thread team does not survive a fork (GNU libgomp): the child's first parallel
            # region would wait forever on threads it does not have. One thread never enters one.
            torch.set_num_threads(1)
            err = open(err_path, "w")
            os.dup2(err.fileno(), 2)
            os.dup2(err.fileno(), 1)
            # pytest's capture replaced sys.stdout/stderr with objects of its own: write to the fds
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            os.close(read_fd)
            os.environ.update(env)
            os.chdir(cwd)
            mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
            import tempfile

            tempfile.tempdir = None  # read TMPDIR again, as a new process would
            counter = [0]
            _counting_client(kill_at, counter, at_kill)
            if quota is not None:
                _disk_quota(quota)
            try:
                returned = app(args=args, prog_name="robustlogits", standalone_mode=False)
                code = returned if isinstance(returned, int) else 0  # click returns an Exit's code here
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException as exc:  # noqa: BLE001
                import click

                code = exc.exit_code if isinstance(exc, click.exceptions.Exit) else 1
                if not isinstance(exc, click.exceptions.Exit):
                    import traceback

                    traceback.print_exc()
            os.write(write_fd, str(counter[0]).encode())
            sys.stdout.flush()
            sys.stderr.flush()
            atexit._run_exitfuncs()  # a fork skips them: the process's temporary folder goes here
        except BaseException:  # noqa: BLE001 - the harness itself failed: say so in the child's output
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    calls = os.read(read_fd, 64).decode()
    os.close(read_fd)
    stderr = err_path.read_text() if err_path.exists() else ""
    err_path.unlink(missing_ok=True)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return code, int(calls or 0), stderr


def _disk_quota(limit: int) -> None:
    """The artifact store's disk holds `limit` bytes: a write past it fails as a full disk does."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    used = [0]

    def charge(path: str) -> None:
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() else 0
        used[0] += size or Path(path).stat().st_size
        if used[0] > limit:
            raise OSError(errno.ENOSPC, "No space left on device", path)

    log_artifact, log_artifacts = LocalArtifactRepository.log_artifact, LocalArtifactRepository.log_artifacts

    def one(self, local_file, artifact_path=None):
        charge(local_file)
        return log_artifact(self, local_file, artifact_path)

    def many(self, local_dir, artifact_path=None):
        charge(local_dir)
        return log_artifacts(self, local_dir, artifact_path)

    LocalArtifactRepository.log_artifact, LocalArtifactRepository.log_artifacts = one, many


# --- stores and what must hold in them ------------------------------------------------------------


def store_env(root: Path) -> dict:
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    return {
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "MLFLOW_TRACKING_URI": (root / "mlruns").as_uri(),
        "ROBUSTLOGITS_CACHE": str(root.parent / "cache"),
        "ROBUSTLOGITS_NO_DOWNLOAD": "1",
        "ROBUSTLOGITS_TMPDIR_BASE": str(root / "tmp"),
        "TMPDIR": str(root / "tmp"),
        "OMP_NUM_THREADS": "1",
    }


def use_store(root: Path) -> MlflowClient:
    mlflow.set_tracking_uri((root / "mlruns").as_uri())
    os.environ["MLFLOW_TRACKING_URI"] = (root / "mlruns").as_uri()
    tracking.configure_store()  # as the next command would: records a kill left empty are moved aside
    return MlflowClient()


def all_runs(client: MlflowClient) -> list:
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def check_invariants(root: Path) -> list[str]:
    """What must hold in a store once no command is running; returns what does not."""
    client = use_store(root)
    runs = all_runs(client)
    status = {r.info.run_id: r.info.status for r in runs}
    problems = [f"run {r.info.run_id} left RUNNING" for r in runs if r.info.status == "RUNNING"]
    for tag in (tracking.runs.IDENTITY_TAG, tracking.KEY_TAG):
        seen: dict[str, str] = {}
        for r in runs:
            value = r.data.tags.get(tag)
            if r.info.status != "FINISHED" or not value or "robustlogits.reused_run" in r.data.tags:
                continue
            if value in seen:
                problems.append(f"two FINISHED runs with {tag} {value}: {seen[value]}, {r.info.run_id}")
            seen[value] = r.info.run_id
    digests: dict[tuple, str] = {}
    for mv in client.search_model_versions(""):
        if mv.status == "READY" and status.get(mv.run_id) != "FINISHED":
            problems.append(f"{mv.name} v{mv.version} READY but its run {mv.run_id} is {status.get(mv.run_id)}")
        key = (mv.name, mv.tags.get("weights_sha256"))
        if key in digests:
            problems.append(f"{mv.name} v{mv.version} duplicates v{digests[key]}")
        digests[key] = mv.version
    optuna_db = root / "optuna.db"
    if optuna_db.exists():
        import optuna

        storage = f"sqlite:///{optuna_db}"
        for summary in optuna.get_all_study_summaries(storage):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            done = [
                t.user_attrs.get("item_key") or tuple(sorted(t.params.items()))
                for t in study.trials
                if t.state.name == "COMPLETE" and not t.user_attrs.get("idle")
            ]
            if len(done) != len(set(done)):
                problems.append(f"study {summary.study_name} has an item COMPLETE twice")
    left = [p for p in (root / "tmp").rglob("*")]
    if left:
        problems.append(f"temporary files left: {[str(p.relative_to(root)) for p in left[:5]]}")
    return problems


def copy_store(base: Path, root: Path) -> None:
    """A copy of a file store whose records point at the copy's own artifacts."""
    shutil.copytree(base, root, symlinks=True)
    for meta in (root / "mlruns").rglob("meta.yaml"):
        meta.write_text(meta.read_text().replace(str(base), str(root)))


def numbers(root: Path, job: str, keys: tuple[str, ...]) -> list[dict]:
    client = use_store(root)
    found = [r for r in all_runs(client) if r.data.tags.get("robustlogits.job") == job and r.info.status == "FINISHED"]
    found = [r for r in found if "robustlogits.reused_run" not in r.data.tags]
    return sorted(({k: round(r.data.metrics[k], 5) for k in keys if k in r.data.metrics} for r in found), key=str)


def kill_and_retry(name: str, base: Path | None, work: Path, args: list[str], job: str, keys: tuple[str, ...]):
    """The command uninterrupted, then killed at POINTS seeded points and run again, each in a copy of
    `base` (or an empty store); every case must hold every invariant and give the same numbers."""

    def fresh(label: str) -> Path:
        root = work / f"{name}-{label}"
        if base is not None:
            copy_store(base, root)
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / "tmp", ignore_errors=True)
        return root

    clean = fresh("clean")
    code, calls, err = run_command(args, store_env(clean), clean)
    assert code == 0, err[-3000:]
    expected = numbers(clean, job, keys)
    assert expected, f"{name}: the uninterrupted run measured nothing"
    assert check_invariants(clean) == []
    rng = random.Random(f"{SEED}-{name}")
    points = sorted(rng.sample(range(1, calls + 1), min(POINTS, calls)))
    held = 0
    for point in points:
        root = fresh(f"kill{point}")
        killed, _, err = run_command(args, store_env(root), root, kill_at=point)
        assert killed == -signal.SIGKILL, f"{name}: not killed at call {point}/{calls}: {err[-2000:]}"
        code, _, err = run_command(args, store_env(root), root)
        assert code == 0, f"{name} after a kill at call {point}/{calls}: {err[-3000:]}"
        problems = check_invariants(root)
        assert problems == [], f"{name} killed at call {point}/{calls}: {problems}"
        assert numbers(root, job, keys) == expected, f"{name} killed at call {point}/{calls}: other numbers"
        held += 1
        shutil.rmtree(root, ignore_errors=True)
    TALLY[name] = [len(points), held]
    print(f"faults: {name}: {len(points)} kill points of {calls} tracking calls ({points}), {held} held")


# --- the cases ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def teacher(work):
    """A store holding the `test` preset's AT teacher (2 versions, epoch 2 the teacher)."""
    root = work / "teacher"
    root.mkdir()
    code, _, err = run_command(["train", "--preset", "test", "--training", "adversarial"], store_env(root), root)
    assert code == 0, err[-3000:]
    shutil.rmtree(root / "tmp")
    return root


TRAIN = ["train", "--preset", "test", "--training", "adversarial"]


def test_train_killed_then_run_again(work):
    kill_and_retry("train", None, work, TRAIN, "train", ("test_accuracy", "train_loss", "checkpoint_test_accuracy"))


def test_attack_killed_then_run_again(work, teacher):
    args = ["attack", "--model", "synthetic-cnn-tiny-at", "--n-examples", "40", "--n-iter", "3"]
    kill_and_retry("attack", teacher, work, args, "attack", ("natural_accuracy", "adversarial_accuracy"))


def test_distill_killed_then_run_again(work, teacher):
    args = [
        "distill",
        "--preset",
        "test",
        "--manipulation",
        "permute",
        "--k",
        "3",
        "--epochs",
        "1",
        "--n-examples",
        "20",
    ]
    keys = ("checkpoint_test_accuracy", "adversarial_accuracy", "train_loss")
    kill_and_retry("distill", teacher, work, args, "distill", keys)


def test_import_killed_then_run_again(work):
    torch.manual_seed(0)
    weights = work / "external.pt"
    torch.save(models.build_model("cnn-tiny", 10, "synthetic").net.state_dict(), weights)
    args = ["import", "--checkpoint", str(weights), "--name", "ext", "--arch", "cnn-tiny", "--dataset", "synthetic"]
    kill_and_retry("import", None, work, [*args, "--check-images", "20"], "import", ("natural_accuracy",))


def test_sweep_killed_then_run_again(work, teacher):
    args = ["sweep", "--teacher", "synthetic-cnn-tiny-at", "--teacher-epochs", "2", "--losses", "l1",
            "--preset", "test", "--heartbeat", "1", "--set", "optim.epochs=1",
            "--set", "distill.attack_n_examples=20", "--set", "distill.attack_n_iter=2"]  # fmt: skip
    kill_and_retry("sweep", teacher, work, args, "distill", ("adversarial_accuracy", "checkpoint_test_accuracy"))


def test_reproduce_killed_then_run_again(work):
    args = ["reproduce", "--scale", "test", "--seeds", "1", "--only", "train", "--heartbeat", "1", "--out", "out"]
    kill_and_retry("reproduce", None, work, args, "train", ("test_accuracy", "train_loss"))


def test_disk_full_while_logging_is_one_message_and_registers_nothing(work):
    root = work / "diskfull"
    root.mkdir()
    code, _, err = run_command(TRAIN, store_env(root), root, quota=20_000)
    assert code == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in err, err[-3000:]
    client = use_store(root)
    (run,) = all_runs(client)
    assert run.info.status == "FAILED" and "No space left" in run.data.tags["error"]
    assert client.search_model_versions("") == [] and check_invariants(root) == []
    print("faults: disk full while logging: 1 case held")


def test_corrupt_weights_read_back_are_refused(work, teacher, monkeypatch):
    root = work / "corrupt"
    copy_store(teacher, root)
    for key, value in store_env(root).items():
        monkeypatch.setenv(key, value)
    client = use_store(root)
    mv = client.get_model_version("synthetic-cnn-tiny-at", "2")
    folder = Path(client.get_logged_model(mv.model_id).artifact_location.removeprefix("file://")) / "extra_files"
    weights, spec = folder / "robustlogits_weights.pt", folder / "robustlogits_model.json"
    blob = bytearray(weights.read_bytes())
    blob[-100] ^= 0xFF  # one flipped byte, and the spec's own digest removed: only the registry's record is left
    weights.write_bytes(bytes(blob))
    spec.write_text(spec.read_text().replace(f'"{mv.tags["weights_sha256"]}"', "null"))
    before = len(all_runs(client))
    result = CliRunner().invoke(app, ["attack", "--model", "synthetic-cnn-tiny-at", "--version", "2"])
    assert result.exit_code == 2, result.output
    assert "synthetic-cnn-tiny-at version 2" in result.output and "SHA-256 the registry recorded" in result.output
    assert len(all_runs(client)) == before
    print("faults: corrupt model read back: 1 case held")


def test_counts_are_reported():
    """The tally of this module's kill cases (run last): every point killed held."""
    if not TALLY:
        pytest.skip("no kill case ran")
    killed = sum(k for k, _ in TALLY.values())
    held = sum(h for _, h in TALLY.values())
    print(f"faults: {killed} points killed over {len(TALLY)} commands, {held} held")
    assert held == killed


def test_stale_run_is_listed_and_ended(work):
    """`robustlogits runs --stale`: a run whose process was SIGKILLed is listed (exit 1), then ended."""
    root = work / "stale"
    root.mkdir()
    env = store_env(root)
    killed, calls, _ = run_command(TRAIN, env, root, kill_at=12)
    assert killed == -signal.SIGKILL
    client = use_store(root)
    (run,) = all_runs(client)
    assert run.info.status == "RUNNING" and run.data.tags["robustlogits.pid"]
    code, _, out = run_command(["runs", "--stale"], env, root)
    assert code == 1 and run.info.run_id in out and "gone" in out, out
    code, _, out = run_command(["runs", "--stale", "--end"], env, root)
    assert code == 0 and "ended 1" in out, out
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("lost: its process")
    code, _, out = run_command(["runs", "--stale"], env, root)
    assert code == 0 and "0 stale run(s)" in out, out


def _start_server(root: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on a sqlite store and a local artifact folder, in a process group of its own."""
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", (root / "server-artifacts").as_uri(), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 300  # a loaded CPU can take minutes to start it
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except Exception:  # noqa: BLE001 - still starting
            if time.time() > deadline or server.poll() is not None:
                pytest.fail("mlflow server did not start")
            time.sleep(1)


def _stop_server(pid: int, port: int) -> None:
    """SIGKILL the server's whole process group and wait until its port refuses connections."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    for _ in range(100):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.1)


def test_store_stopped_mid_run_is_one_message_then_the_same_command_continues(work):
    root = work / "unreachable"
    root.mkdir()
    port = free_port()
    env = store_env(root) | {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # give up at once (the default retries for minutes)
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    }
    server = _start_server(root, port)
    try:
        code, calls, err = run_command(TRAIN, env, root, kill_at=60, at_kill=lambda: _stop_server(server.pid, port))
        server.wait(30)
        assert code == 1 and calls >= 60, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "stopped answering" in errors[0] and "Traceback" not in err, err[-3000:]
        assert "stays RUNNING" in errors[0] and "--stale --end" in errors[0]
        server = _start_server(root, port)  # the store is back: the same command continues the run
        code, _, err = run_command(TRAIN, env, root)
        assert code == 0, err[-3000:]
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        client = MlflowClient()
        runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
        training = [r for r in runs if r.data.tags.get("robustlogits.job") == "train"]
        assert [r.info.status for r in training] == ["FINISHED"], [(r.info.run_id, r.info.status) for r in runs]
        assert all(r.info.status != "RUNNING" for r in runs)
        versions = client.search_model_versions("")
        assert versions and all(client.get_run(v.run_id).info.status == "FINISHED" for v in versions)
        assert len({v.tags.get("weights_sha256") for v in versions}) == len(versions)
    finally:
        _stop_server(server.pid, port)
        mlflow.set_tracking_uri((work / "teacher" / "mlruns").as_uri())
    TALLY["store unreachable"] = [1, 1]
    print("faults: tracking server stopped mid-run: 1 case held")
