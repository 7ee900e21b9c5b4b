"""The study engine: every fan-out (a sweep, a reproduce stage) is an Optuna study.

- A **task** is a named unit of work, `fn(params) -> metrics`, registered with `@task(name)`.
  It runs an existing job through `keyed`: the job's key (resolved config plus the identities of
  its inputs) is looked up first (`tracking.find_or_run`), so a retried or resumed trial returns
  the finished run's metrics instead of running twice.
- A **study** carries its whole description (`spec`) in its user attrs, so a worker anywhere
  needs only the study name and the storage URL. `open_study` creates or loads it and refuses a
  different spec under the same name.
- Fixed work (a grid, a list of job configs) is enqueued once by the process that opens the
  study (`enqueue_items`); samplers (tpe, random) propose the rest.
- Workers (`run_worker`, `run_workers`) are `study.optimize` with RDB heartbeats: a worker that
  dies mid-trial has its trial failed as stale and re-queued by another worker, and the MLflow run
  it left RUNNING is ended FAILED.
- MLflow: one parent run per study; each trial's job run nests under it (`tracking.child_runs`)
  with the trial number and sampled values as params and the Optuna state as a tag. After each
  trial the parent gets `trials.csv` and whatever the spec's report draws.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from robustlogits import tracking
from robustlogits.core.errors import UserError

log = logging.getLogger(__name__)

TASKS: dict[str, Callable[[dict], dict[str, float]]] = {}
REPORTS: dict[str, Callable[[optuna.Study, str], None]] = {}
SAMPLERS = ("grid", "items", "tpe", "random")
FIXED_SAMPLERS = ("grid", "items")  # every trial is an enqueued item; workers stop when none is left
SPEC_ATTR, PARENT_ATTR = "spec", "mlflow_parent_run_id"
HEARTBEAT_SECONDS = 10
ESTIMATE_ATTR = "estimate_seconds"  # a trial's user attribute: the time its item was estimated to take


def task(name: str):
    """Register `fn(params: dict) -> dict[str, float]` as the task `name`."""

    def register(fn):
        TASKS[name] = fn
        return fn

    return register


def report(name: str):
    """Register `fn(study, parent_run_id)`: figures refreshed on the parent run as trials finish."""

    def register(fn):
        REPORTS[name] = fn
        return fn

    return register


# --- keyed tasks --------------------------------------------------------------------------------


@dataclass
class _TrialScope:
    trial: optuna.Trial
    run_ids: list[str] = field(default_factory=list)
    reused_from: str | None = None  # the finished run a keyed task found instead of running


_SCOPE: list[_TrialScope] = []  # the trial this process is running (one at a time per worker)


def _record_reuse(source: str) -> None:
    """A trial answered by an earlier run still gets its own child run under this study: the
    source's params, lineage tags and metrics, and a tag naming the source (no job runs twice)."""
    original = tracking.run_record(source)
    tags = {
        k: v
        for k, v in original.tags.items()
        if not k.startswith("mlflow.") and k not in (tracking.KEY_TAG, "optuna.study", "optuna.trial", "optuna.state")
    }
    with tracking.job_run("robustlogits", f"{original.name} (reused)", tags | {"robustlogits.reused_run": source}):
        tracking.log_params(original.params)
        tracking.log_results(original.metrics)


def run_metrics(run_id: str) -> dict[str, float]:
    return tracking.run_record(run_id).metrics


def keyed(task_name: str, key: str, run: Callable[[], str]) -> dict[str, float]:
    """The metrics of the FINISHED run with this key, or of the job run `run()` opens (which
    carries the key). A trial answered by an earlier run records that in a child run of its own."""
    scope = _SCOPE[-1] if _SCOPE else None
    with tracking.child_runs(tags={"robustlogits.task": task_name}):
        found = tracking.find_or_run(key, run)
    if found.reused:
        log.info("%s: reusing finished run %s (key %s)", task_name, found.run_id, key)
        if scope:
            scope.reused_from = found.run_id
            _record_reuse(found.run_id)
    return run_metrics(found.run_id)


# --- search spaces ------------------------------------------------------------------------------


def active(dimension: dict, values: dict) -> bool:
    """A dimension with `when: {other: [choices...]}` exists only where the other value is listed."""
    return all(values.get(other) in allowed for other, allowed in (dimension.get("when") or {}).items())


def grid_items(space: dict[str, dict]) -> list[dict]:
    """Every point of a categorical space, inactive conditional dimensions dropped, no duplicates."""
    points: list[dict] = [{}]
    for name, dim in space.items():
        grown = []
        for point in points:
            if active(dim, point):
                grown += [point | {name: choice} for choice in dim["choices"]]
            else:
                grown.append(point)
        points = grown
    unique = {json.dumps(p, sort_keys=True): p for p in points}
    return list(unique.values())


def item_key(item: dict) -> str:
    return tracking.job_key({"item": item})


# --- storage and studies ------------------------------------------------------------------------


def redact(url: str) -> str:
    """A storage URL without its password, for logs and params."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url.split("@")[-1] if "@" in url else url


def default_storage() -> str:
    """An embedded SQLite database beside the MLflow store (same folder), as an absolute path."""
    uri = tracking.configure_store()
    folder = Path.cwd()
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).resolve().parent
    elif uri.startswith("file:"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        folder = Path(url2pathname(urlparse(uri).path)).resolve().parent
    elif "://" not in uri:
        folder = Path(uri).resolve().parent
    return f"sqlite:///{folder / 'optuna.db'}"


def _on_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A dead worker's trial: end its MLflow run FAILED, then queue the same work again."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id and tracking.process_alive(tracking.run_record(run_id).tags):
        log.warning("trial %d's heartbeat is late but its process still works; its run is left to it", trial.number)
    elif run_id and tracking.end_lost(run_id, f"its Optuna worker stopped beating (trial {trial.number})"):
        with contextlib.suppress(Exception):
            tracking.set_tags({"optuna.state": "FAIL (worker lost)"}, run_id)
    log.warning("trial %d lost its worker; queued again", trial.number)
    optuna.storages.RetryHeartbeatStaleTrialCallback()(study, trial)


def open_storage(url: str, heartbeat: int | None = HEARTBEAT_SECONDS) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats (dead workers' trials are retried), or a clear error."""
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 120}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=heartbeat,
                grace_period=None if heartbeat is None else 3 * heartbeat,
                heartbeat_stale_trial_callback=_on_stale_trial if heartbeat else None,
            )
    except Exception as exc:  # noqa: BLE001 - any failure to connect means "cannot use it"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"optuna storage {redact(url)} is not reachable: {detail[:300]}") from None


def spec_difference(stored: dict, given: dict) -> list[str]:
    """Human-readable differences between two specs, one per changed key."""
    lines = []
    for key in sorted(set(stored) | set(given)):
        a, b = stored.get(key, "<absent>"), given.get(key, "<absent>")
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            lines.append(f"{key}: study has {json.dumps(a, default=str)}, given {json.dumps(b, default=str)}")
    return lines


def open_study(
    name: str, storage_url: str, directions: list[str], spec: dict, heartbeat: int | None = HEARTBEAT_SECONDS
) -> optuna.Study:
    """Create the study (with its parent MLflow run) or load it; a different spec under the same
    name is refused with the differences listed. Nothing is written when it is refused."""
    spec = json.loads(json.dumps(spec | {"directions": list(directions)}, default=str))
    storage = open_storage(storage_url, heartbeat)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(study_name=name, storage=storage, directions=directions)
        study.set_user_attr(SPEC_ATTR, spec)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage)
        stored = _wait_for_spec(study)
        diff = spec_difference(stored, spec)
        if diff:
            raise UserError(
                f"study {name!r} already exists in {redact(storage_url)} with a different spec: " + "; ".join(diff)
            ) from None
    if PARENT_ATTR not in study.user_attrs:
        study.set_user_attr(PARENT_ATTR, _create_parent_run(study, spec, storage_url))
    return study


def _wait_for_spec(study: optuna.Study, seconds: float = 30.0) -> dict:
    """The creator writes the spec just after creating the study; give it a moment."""
    deadline = time.monotonic() + seconds
    while True:
        spec = study.user_attrs.get(SPEC_ATTR)
        if spec is not None:
            return spec
        if time.monotonic() > deadline:
            raise UserError(f"study {study.study_name!r} has no spec: it was not created by robustlogits")
        time.sleep(0.5)
        study = optuna.load_study(study_name=study.study_name, storage=study._storage)


def load(name: str, storage_url: str, heartbeat: int | None = HEARTBEAT_SECONDS) -> optuna.Study:
    storage = open_storage(storage_url, heartbeat)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise UserError(
            f"no study {name!r} in {redact(storage_url)}; studies there: {', '.join(names) or 'none'}"
        ) from None
    spec = _wait_for_spec(study)
    if spec.get("module"):
        importlib.import_module(spec["module"])  # registers the spec's task and report
    return optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(spec))


def make_sampler(spec: dict) -> optuna.samplers.BaseSampler:
    seed = spec.get("seed")
    if spec.get("sampler") == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=seed)


def _create_parent_run(study: optuna.Study, spec: dict, storage_url: str) -> str:
    """The study's parent run; under `mlflow run` the launcher's run becomes it."""
    params = {"study.name": study.study_name, "study.storage": redact(storage_url)}
    params |= {
        f"study.{k}": v if isinstance(v, str) else json.dumps(v, default=str)
        for k, v in spec.items()
        if k not in ("module",)
    }
    return tracking.study_run(
        spec.get("experiment", "robustlogits"),
        f"{spec.get('kind', 'study')}-{study.study_name}",
        tags={"robustlogits.job": spec.get("kind", "study"), "optuna.study": study.study_name},
        params=params,
        parent=spec.get("parent_run"),
    )


def parent_run_id(study: optuna.Study) -> str:
    return study.user_attrs[PARENT_ATTR]


def driving(study: optuna.Study):
    """The coordinator's lifetime: the parent run is RUNNING inside, FINISHED or FAILED after."""
    return tracking.holding(parent_run_id(study))


def enqueue_items(study: optuna.Study, items: list[dict], notes: list[dict] | None = None) -> int:
    """Queue the items that have no COMPLETE, RUNNING or WAITING trial yet; returns how many.

    `notes` (one dict per item) go into the trial's user attributes beside the item but not into its
    key: what the queuing process knew (a time estimate) must not make the same work a new item.
    Call it only from the process that opened the study (workers never enqueue), so a grid point
    is queued once however many workers join.
    """
    space = study.user_attrs[SPEC_ATTR].get("space", {})
    present = {
        t.user_attrs.get("item_key")
        for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
    }
    added = 0
    for item, note in zip(items, notes or [{}] * len(items), strict=True):
        key = item_key(item)
        if key in present:
            continue
        present.add(key)
        attrs = note | {"item": item, "item_key": key}
        study.enqueue_trial({k: v for k, v in item.items() if k in space}, user_attrs=attrs)
        added += 1
    return added


# --- the objective ------------------------------------------------------------------------------


class _Idle(Exception):
    """A fixed-item study had nothing left for this trial (another worker took the last item)."""


def _trial_params(trial: optuna.Trial, spec: dict) -> dict:
    item = trial.user_attrs.get("item")
    if item is None and spec.get("sampler") in FIXED_SAMPLERS:
        raise _Idle()
    values: dict = {}
    for name, dim in spec.get("space", {}).items():
        if active(dim, values):
            values[name] = trial.suggest_categorical(name, dim["choices"])
    return (item or {}) | values


def _objective(spec: dict, parent: str, experiment_id: str) -> Callable[[optuna.Trial], Any]:
    fn = TASKS.get(spec["task"])
    if fn is None:
        raise UserError(f"unknown task {spec['task']!r}; registered: {', '.join(TASKS) or 'none'}")

    def objective(trial: optuna.Trial):
        try:
            params = _trial_params(trial, spec)
        except _Idle:
            trial.set_user_attr("idle", True)
            raise optuna.TrialPruned("no queued item left") from None
        scope = _TrialScope(trial)
        _SCOPE.append(scope)

        def started(run_id: str) -> None:
            scope.run_ids.append(run_id)
            trial.set_user_attr("mlflow_run_id", run_id)  # before any work: a kill can then close it

        tags = {"optuna.study": trial.study.study_name, "optuna.trial": trial.number, "optuna.state": "RUNNING"}
        log.info("trial %d: %s", trial.number, json.dumps(params, default=str))
        start = time.perf_counter()
        try:
            with tracking.child_runs(parent, experiment_id, tags=tags, on_start=started):
                metrics = fn(dict(spec.get("base", {})) | params)
        except BaseException as exc:  # Ctrl-C included: the run ended FAILED, say so on it
            with contextlib.suppress(Exception):
                trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
                for run_id in scope.run_ids:
                    tracking.set_tags({"optuna.state": "FAIL"}, run_id)
            raise
        finally:
            _SCOPE.pop()
        seconds = time.perf_counter() - start
        missing = [o for o in spec["objectives"] if o not in metrics]
        if missing:
            raise UserError(f"task {spec['task']} returned no {', '.join(missing)} (it returned {', '.join(metrics)})")
        run_id = scope.run_ids[-1] if scope.run_ids else None
        trial.set_user_attr("metrics", {k: float(v) for k, v in metrics.items()})
        trial.set_user_attr("task_seconds", seconds)
        trial.set_user_attr("reused", scope.reused_from or "")
        if run_id:
            trial.set_user_attr("model_versions", _model_versions(scope.reused_from or run_id))
            with contextlib.suppress(Exception):
                tracking.log_params_to(
                    run_id, {"optuna.trial_number": trial.number, **{f"trial.{k}": v for k, v in params.items()}}
                )
        values = [float(metrics[o]) for o in spec["objectives"]]
        log.info(
            "trial %d: %s in %.1f s%s",
            trial.number,
            ", ".join(f"{o} {v:.4f}" for o, v in zip(spec["objectives"], values)),
            seconds,
            f" (reused finished run {scope.reused_from})" if scope.reused_from else "",
        )
        return values if len(values) > 1 else values[0]

    return objective


def _model_versions(run_id: str) -> list[str]:
    with contextlib.suppress(Exception):
        return [f"{v.name}/{v.version}" for v in tracking.run_versions(run_id)]
    return []


def _after_trial(spec: dict, parent: str, state: dict) -> Callable:
    """Optuna state on the child run; the parent's table after every trial, its figures at most
    every `report_every_seconds` of this worker (drawing them costs about a second)."""
    every = float(spec.get("report_every_seconds", 0))

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            with contextlib.suppress(Exception):
                tracking.set_tags({"optuna.state": trial.state.name}, run_id)
        if trial.user_attrs.get("idle"):
            study.stop()
            return
        due = time.monotonic() - state.get("reported", -1e9) >= every
        refresh_report(study, parent, figures=due)
        if due:
            state["reported"] = time.monotonic()

    return callback


# --- workers ------------------------------------------------------------------------------------


@dataclass
class StudyStatus:
    complete: int
    waiting: int
    running: int
    failed: list[dict]  # trials that failed and were not retried: number, params, error
    pending_items: int  # enqueued items without a COMPLETE trial
    budget_left: int | None  # sampler studies: trials still to propose

    @property
    def done(self) -> bool:
        """Every enqueued item (or the whole trial budget) has a COMPLETE trial."""
        return self.pending_items == 0 and not self.waiting and not self.running and not self.budget_left

    def summary(self) -> str:
        text = f"{self.complete} complete, {self.waiting} waiting, {self.running} running, {len(self.failed)} failed"
        for f in self.failed:
            text += f"\n  trial {f['number']} {json.dumps(f['params'], default=str)}: {f['error']}"
        return text


def status(study: optuna.Study) -> StudyStatus:
    spec = study.user_attrs[SPEC_ATTR]
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("idle")]
    retried = {t.system_attrs.get("failed_trial") for t in trials} | {
        n for t in trials for n in t.system_attrs.get("retry_history", [])
    }
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    done_keys = {t.user_attrs.get("item_key") for t in by_state[TrialState.COMPLETE]}
    item_keys = {t.user_attrs.get("item_key") for t in trials if t.user_attrs.get("item_key")}
    failed = [
        {
            "number": t.number,
            "params": t.user_attrs.get("item") or t.params,
            "error": t.user_attrs.get("error", "worker lost"),
        }
        for t in by_state[TrialState.FAIL]
        if t.number not in retried and t.user_attrs.get("item_key") not in done_keys
    ]
    budget = None
    if spec.get("sampler") not in FIXED_SAMPLERS and spec.get("n_trials"):
        budget = max(0, int(spec["n_trials"]) - _counted(trials, retried))
    return StudyStatus(
        len(by_state[TrialState.COMPLETE]),
        len(by_state[TrialState.WAITING]),
        len(by_state[TrialState.RUNNING]),
        failed,
        len(item_keys - done_keys),
        budget,
    )


def _counted(trials, retried) -> int:
    """Trials that use the budget: all but the idle ones and failures that were queued again."""
    return sum(1 for t in trials if t.number not in retried and t.state != TrialState.PRUNED)


def run_worker(
    study_name: str, storage_url: str, n_trials: int | None = None, heartbeat: int | None = HEARTBEAT_SECONDS
) -> int:
    """Work on a study until nothing is left; returns how many trials this worker ran.

    Fixed-item studies: take queued items until none is waiting and none is running elsewhere
    (a running trial whose worker dies is failed as stale here and queued again). Sampler
    studies: propose trials until the study's `n_trials` budget is used. `n_trials` caps this
    worker. Ctrl-C fails the current trial (its run ends FAILED); the study stays resumable.
    """
    study = load(study_name, storage_url, heartbeat)
    spec = study.user_attrs[SPEC_ATTR]
    parent = parent_run_id(study)
    experiment_id = tracking.run_record(parent).experiment_id
    objective = _objective(spec, parent, experiment_id)
    report_state: dict = {}
    callbacks = [_after_trial(spec, parent, report_state)]
    ran = 0
    fixed = spec.get("sampler") in FIXED_SAMPLERS
    while n_trials is None or ran < n_trials:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        now = status(study)
        if not now.waiting and (fixed or not now.budget_left):
            if not now.running or not heartbeat:  # without heartbeats a dead worker is never noticed
                break
            time.sleep(heartbeat)  # another worker is busy: stay to retry its trial if it dies
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=callbacks)
        ran += 1
    if ran:
        refresh_report(study, parent)  # the figures, whatever the throttle skipped
    return ran


def worker_threads(n_workers: int) -> int:
    """Each of N local workers' share of the cores."""
    return max(1, (os.cpu_count() or 1) // n_workers)


def worker_environment(index: int, n_workers: int, device: str | None) -> dict[str, str]:
    """A local worker's environment: its share of the cores, its device, no launcher run."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID",)}
    threads = str(worker_threads(n_workers))
    env |= {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "ROBUSTLOGITS_WORKER": str(index),
        "MLFLOW_TRACKING_URI": tracking.configure_store(),
    }
    if device:
        env["ROBUSTLOGITS_DEVICE"] = device
    return env


def run_workers(
    study_name: str,
    storage_url: str,
    n_workers: int,
    n_trials: int | None = None,
    workers_per_device: int = 1,
    heartbeat: int | None = HEARTBEAT_SECONDS,
) -> StudyStatus:
    """N worker processes on this machine (one runs in this process when N = 1), devices
    assigned round-robin, threads = cores / N. Returns the study's status when all have ended."""
    from robustlogits.core.device import worker_devices

    if n_workers < 1:
        raise UserError(f"--workers must be >= 1, got {n_workers}")
    devices = worker_devices(n_workers, workers_per_device)
    if n_workers == 1:
        if devices[0]:
            os.environ["ROBUSTLOGITS_DEVICE"] = devices[0]
        run_worker(study_name, storage_url, n_trials, heartbeat)
        return status(load(study_name, storage_url, heartbeat))
    command = [
        sys.executable,
        "-m",
        "robustlogits.cli",
        "sweep",
        "worker",
        "--study",
        study_name,
        "--storage",
        storage_url,
        "--heartbeat",
        str(heartbeat or 0),
    ]
    if n_trials is not None:
        command += ["--n-trials", str(n_trials)]
    procs = [subprocess.Popen(command, env=worker_environment(i, n_workers, devices[i])) for i in range(n_workers)]
    try:
        codes = [p.wait() for p in procs]
    except BaseException:  # Ctrl-C: workers got SIGINT too; give them time to fail their trials
        for p in procs:
            with contextlib.suppress(Exception):
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    bad = [c for c in codes if c not in (0,)]
    if bad:
        log.warning("%d of %d workers exited with errors (codes %s)", len(bad), n_workers, bad)
    return status(load(study_name, storage_url, heartbeat))


# --- the parent run's table and report ----------------------------------------------------------


def trial_rows(study: optuna.Study) -> list[dict]:
    """One row per trial (idle placeholders left out): state, params, values, runs and models."""
    spec = study.user_attrs[SPEC_ATTR]
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("idle"):
            continue
        row = {"trial": t.number, "state": t.state.name} | {k: "" for k in spec.get("space", {})}
        row |= (t.user_attrs.get("item") or {}) | t.params
        for name, value in zip(spec["objectives"], t.values or []):
            row[name] = value
        metrics = t.user_attrs.get("metrics") or {}
        for name in spec.get("table_metrics", []):
            row.setdefault(name, metrics.get(name, ""))
        row |= {
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id", ""),
            "model_versions": " ".join(t.user_attrs.get("model_versions", [])),
            "reused": t.user_attrs.get("reused", ""),
            "retry_of": t.system_attrs.get("failed_trial", ""),
            "task_seconds": t.user_attrs.get("task_seconds", ""),
            "error": t.user_attrs.get("error", ""),
        }
        rows.append(row)
    return rows


def task_times_by_run(storage_url: str) -> dict[str, dict[str, float | None]]:
    """MLflow run id -> how long the task that made that run took (not a task that reused it), and
    the estimate it was queued with, over every study in the storage: a step's time as its worker saw
    it, including what it did before its run opened (a student's teacher logits). By run, not by key:
    a step done again (its run deleted, or made at other code) is charged for the run a report reads.
    The longest of a run's tries."""
    storage = open_storage(storage_url, heartbeat=None)
    times: dict[str, dict[str, float | None]] = {}
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            run_id = t.user_attrs.get("mlflow_run_id")
            took = t.user_attrs.get("task_seconds")
            if not run_id or not took or t.user_attrs.get("reused"):
                continue
            if run_id not in times or float(took) > times[run_id]["seconds"]:
                estimate = t.user_attrs.get(ESTIMATE_ATTR)
                times[run_id] = {"seconds": float(took), "estimate_s": float(estimate) if estimate else None}
    return times


def trials_csv(rows: list[dict]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def refresh_report(study: optuna.Study, parent: str | None = None, figures: bool = True) -> None:
    """trials.csv plus (with `figures`) the spec's report on the parent run. A report that fails
    is logged, not fatal: the trials themselves are safe in the storage."""
    parent = parent or parent_run_id(study)
    spec = study.user_attrs[SPEC_ATTR]
    try:
        tracking.log_text(trials_csv(trial_rows(study)), "trials.csv", run_id=parent)
        st = status(study)
        tracking.log_results(
            {"study_complete_trials": st.complete, "study_failed_trials": len(st.failed)}, run_id=parent
        )
        if figures and spec.get("report") in REPORTS:
            REPORTS[spec["report"]](study, parent)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not refresh the report of study %s: %s", study.study_name, exc)
