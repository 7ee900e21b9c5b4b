"""Run lifecycle: the one place that decides where a run goes and makes sure it ends.

Every run opened here ends FINISHED or FAILED whatever happens (exceptions, Ctrl-C, SIGTERM), and a
FAILED run says why (an `error` tag and the traceback as an artifact). The call site names the kind
of run it wants; where that run lands follows from the caller's context, in one rule each:

- `job_run`: a job's own run. Inside a study trial (`child_runs`) it is a child of the study's run;
  else, under `mlflow run`, it is the run the launcher created; else a new run.
- `resume_run`: an existing (killed or failed) run, reopened.
- `artifact_run`: a reusable artifact's own run (teacher logits, test logits): never the launcher's
  run and never a study child, so one artifact serves many jobs.
- `nested_run`: a child of the active run (one per model inside an analysis).
- `study_run` + `holding`: a study's run, found again by key, held RUNNING by the process that
  drives the study while job runs in any process nest under it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import signal
import socket
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from robustlogits.core import checkout
from robustlogits.core.errors import StoreUnreachable, UserError
from robustlogits.core.scratch import process_start_time
from robustlogits.tracking import keyed
from robustlogits.tracking.store import check_store, launched_run_id, opened_and_abandoned

ERROR_TAG = "error"
PREVIOUS_ERROR_TAG = "previous_error"
TRACEBACK_ARTIFACT = "error/traceback.txt"
STUDY_RUN_TAG = "robustlogits.study_run"  # on a launcher's run that only points at an existing study run
# Which process holds a RUNNING run: a later job (or `robustlogits runs --stale`) can tell a run whose
# process is gone (SIGKILL, power loss) from one still at work, and end it FAILED with the reason.
PID_TAG, HOST_TAG, PROC_START_TAG = "robustlogits.pid", "robustlogits.host", "robustlogits.proc_start"
IDENTITY_TAG = "robustlogits.identity"  # a job's config and inputs: the same command again finds its killed run
LOST_TAG = "robustlogits.lost"  # on a run ended FAILED because its process was gone
CODE_TAG = "robustlogits.commit"  # the code the holding process ran (`+dirty`: with uncommitted changes)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt for the duration, so a killed job still closes its run."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    installed = False
    with contextlib.suppress(ValueError):  # not in the main thread: leave signals alone
        signal.signal(signal.SIGTERM, on_sigterm)
        installed = True
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)


def owner_tags() -> dict[str, str]:
    """This process as the holder of a run: pid, host, (where /proc exists) the pid's start time,
    and (in a git checkout) the commit it runs."""
    tags = {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}
    start, code = process_start_time(os.getpid()), checkout.described()
    return tags | ({PROC_START_TAG: start} if start else {}) | ({CODE_TAG: code} if code else {})


def process_gone(tags: dict[str, str]) -> str | None:
    """Why the process recorded on a run is known to be gone, or None (alive, on another host, or unrecorded)."""
    pid, host = tags.get(PID_TAG), tags.get(HOST_TAG)
    if not pid or not pid.isdigit() or host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return f"its process {pid} on {host} is gone (killed without closing the run)"
    except PermissionError:
        pass  # alive, another user's
    recorded, now = tags.get(PROC_START_TAG), process_start_time(int(pid))
    if recorded and now and recorded != now:
        return f"its process {pid} on {host} is gone (the pid now belongs to another process)"
    return None


def _opened_by_us(tags: dict[str, str]) -> bool:
    """Whether a run was opened by one of our commands: it carries one of our tags, or MLflow named our
    program as its source (the tags MLflow writes before ours)."""
    source = tags.get("mlflow.source.name", "").replace("\\", "/")
    return any(k.startswith("robustlogits.") for k in tags) or (
        tags.get("mlflow.source.type") != "PROJECT"  # a launcher's run waits for its job to adopt it
        and ("/robustlogits/" in source or source.endswith("/robustlogits") or "/entrypoints/" in source)
    )


def lost_reason(run) -> str | None:
    """Why a RUNNING run's process is known to be gone, or None: its recorded process is gone, or the
    process that opened it was killed before it could record itself (a file store's half-opened run)."""
    tags = run.data.tags
    if PID_TAG in tags:
        return process_gone(tags)
    if _opened_by_us(tags) and opened_and_abandoned(run.info.experiment_id, run.info.run_id):
        return "its process was killed as it opened the run, before recording itself (no process tags)"
    return None


def process_alive(tags: dict[str, str]) -> bool:
    """Whether the process recorded on a run is known to be alive here (same host, same process)."""
    pid, host = tags.get(PID_TAG), tags.get(HOST_TAG)
    return bool(pid and pid.isdigit() and host == socket.gethostname() and process_gone(tags) is None)


def end_lost(run_id: str, reason: str) -> bool:
    """End a RUNNING run whose process is gone FAILED, saying why; False if it is no longer RUNNING."""
    client = MlflowClient()
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return False
        client.set_tag(run_id, ERROR_TAG, f"lost: {reason}"[:5000])
        client.set_tag(run_id, LOST_TAG, "true")
        client.set_terminated(run_id, "FAILED")
        return True
    except MlflowException:
        return False


def record_failure(run_id: str, exc: BaseException) -> None:
    """A FAILED run says why in the store: the one-line error as a tag, the traceback as an artifact.
    Best effort: a store that just failed must not hide the original exception."""
    line = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    client = MlflowClient()
    with contextlib.suppress(Exception):
        client.set_tag(run_id, ERROR_TAG, line[:5000])
    with contextlib.suppress(Exception), tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(TRACEBACK_ARTIFACT).name
        path.write_text(text)
        client.log_artifact(run_id, str(path), str(Path(TRACEBACK_ARTIFACT).parent))


def clear_failure(run_id: str) -> None:
    """A resumed run is no longer failed: its last error moves to `previous_error` (the traceback stays)."""
    client = MlflowClient()
    error = client.get_run(run_id).data.tags.get(ERROR_TAG)
    if error:
        client.set_tag(run_id, PREVIOUS_ERROR_TAG, error)
        client.delete_tag(run_id, ERROR_TAG)


def end_run_if_running(run_id: str, status: str = "FAILED") -> bool:
    """Close a run a dead process left RUNNING; a run that already ended is left as it is."""
    client = MlflowClient()
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return False
        client.set_terminated(run_id, status)
        return True
    except MlflowException:
        return False


# --- study placement: a study's job runs nest under its run -----------------------------------


@dataclass
class ChildRuns:
    """Where job runs opened inside `child_runs` go: under a parent, with extra tags."""

    parent_run_id: str | None = None
    experiment_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    on_start: Callable[[str], None] | None = None

    def tags_for(self, tags: dict[str, str] | None) -> dict[str, str]:
        out = dict(tags or {}) | self.tags
        if self.parent_run_id:
            out["mlflow.parentRunId"] = self.parent_run_id
        return out


_CHILD_RUNS: contextvars.ContextVar[ChildRuns | None] = contextvars.ContextVar("robustlogits_child_runs", default=None)


@contextlib.contextmanager
def child_runs(
    parent_run_id: str | None = None,
    experiment_id: str | None = None,
    tags: dict[str, str] | None = None,
    on_start: Callable[[str], None] | None = None,
) -> Iterator[ChildRuns]:
    """Job runs opened inside go under `parent_run_id`, in its experiment, with `tags` added;
    `on_start` hears each new run id at once. Nested contexts add to the outer one, so a study
    places its trials and a step adds its name without any job knowing."""
    outer = _CHILD_RUNS.get() or ChildRuns()
    callbacks = [cb for cb in (outer.on_start, on_start) if cb]
    inner = ChildRuns(
        parent_run_id or outer.parent_run_id,
        experiment_id or outer.experiment_id,
        outer.tags | {k: str(v) for k, v in (tags or {}).items()},
        (lambda rid: [cb(rid) for cb in callbacks]) if callbacks else None,
    )
    token = _CHILD_RUNS.set(inner)
    try:
        yield inner
    finally:
        _CHILD_RUNS.reset(token)


# --- fluent runs ------------------------------------------------------------------------------


@contextlib.contextmanager
def _launcher_hidden(hide: bool) -> Iterator[None]:
    """MLflow consumes MLFLOW_RUN_ID on start and unsets it on end: a run that is not the
    launcher's hides it throughout and puts it back afterwards, for the job that adopts it."""
    launcher = os.environ.pop("MLFLOW_RUN_ID", None) if hide else None
    try:
        yield
    finally:
        if launcher:
            os.environ["MLFLOW_RUN_ID"] = launcher


# What a client says when the server is gone (requests / urllib3 wording, inside MlflowException).
_UNREACHABLE_SIGNS = (
    "Max retries exceeded",
    "Connection refused",
    "Failed to establish a new connection",
    "Connection aborted",
    "Remote end closed connection",
)


def store_unreachable(exc: BaseException | None) -> bool:
    """Whether `exc` (or what caused it) is the tracking store not answering."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StoreUnreachable) or any(sign in str(exc) for sign in _UNREACHABLE_SIGNS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _unreachable_error(run_id: str | None, exc: BaseException) -> StoreUnreachable:
    if isinstance(exc, StoreUnreachable):
        return exc
    reason = next((s for s in _UNREACHABLE_SIGNS if s in str(exc)), type(exc).__name__)
    where = f"run {run_id} could not be marked FAILED and stays RUNNING" if run_id else "no run was started"
    return StoreUnreachable(
        f"the tracking store {mlflow.get_tracking_uri()} stopped answering ({reason}); {where}. Once it "
        "answers again, the same command continues the run, or `robustlogits runs --stale --end` ends it"
    )


@contextlib.contextmanager
def _fluent_run(
    start: dict[str, Any],
    *,
    existing: str | None = None,
    hide_launcher: bool = False,
    on_start: Callable[[str], None] | None = None,
) -> Iterator[str]:
    """Start an active run and end it FINISHED, or FAILED with the reason; `existing` is the run
    that start adopts (the launcher's or a resumed one), closed FAILED even if start fails."""
    run = None
    # who holds it, set as it starts and first of our tags: a file store writes them one at a time
    start = start | {"tags": owner_tags() | dict(start.get("tags") or {})}
    with sigterm_as_interrupt(), _launcher_hidden(hide_launcher):
        try:
            run = mlflow.start_run(**start)
            if on_start:
                on_start(run.info.run_id)
            yield run.info.run_id
        except BaseException as exc:
            failed = run.info.run_id if run is not None else existing
            if store_unreachable(exc):  # nothing can be written: say so once, and how to recover
                with contextlib.suppress(Exception):
                    mlflow.end_run("FAILED")
                raise _unreachable_error(failed, exc) from exc
            if failed:
                record_failure(failed, exc)
            if run is not None:
                mlflow.end_run("FAILED")
            elif existing:  # the run exists but could not be started: never leave it RUNNING
                with contextlib.suppress(Exception):
                    MlflowClient().set_terminated(existing, "FAILED")
            raise
        else:
            mlflow.end_run("FINISHED")


def _with_key(tags: dict[str, str] | None) -> dict[str, str]:
    """The key of an enclosing `find_or_run`, for the first run opened inside it."""
    key = keyed.claim_pending_key()
    return dict(tags or {}) | ({keyed.KEY_TAG: key} if key else {})


@contextlib.contextmanager
def job_run(
    experiment: str, name: str, tags: dict[str, str] | None = None, identity: str | None = None
) -> Iterator[str]:
    """A job's own run: a study trial's child, else the `mlflow run` launcher's run, else new.
    `identity` (a hash of the job's config and inputs) lets the same command find this run again
    if its process is killed (`reclaim`)."""
    study = _CHILD_RUNS.get()
    tags = _with_key(tags) | ({IDENTITY_TAG: identity} if identity else {})
    if study is not None:
        check_store(experiment, adopt_launched=False)
        start = dict(run_name=name, tags=study.tags_for(tags), experiment_id=study.experiment_id)
        with _fluent_run(start, hide_launcher=True, on_start=study.on_start) as run_id:
            yield run_id
        return
    check_store(experiment)
    launched = launched_run_id()  # start_run adopts it; our name and tags are set on it
    start = dict(run_name=name, tags=tags)
    with _fluent_run(start, existing=launched) as run_id:
        yield run_id


@contextlib.contextmanager
def resume_run(run_id: str, experiment: str) -> Iterator[str]:
    """Reopen a killed or failed run to continue it; its last error moves to `previous_error`."""
    check_store(experiment, adopt_launched=False)
    # The run stays in its own experiment (a study's step runs live in the study's experiment).
    mlflow.set_experiment(experiment_id=MlflowClient().get_run(run_id).info.experiment_id)
    key = keyed.claim_pending_key()  # the key is this run's: no inner run may take it
    if key and keyed.KEY_TAG not in MlflowClient().get_run(run_id).data.tags:
        MlflowClient().set_tag(run_id, keyed.KEY_TAG, key)
    study = _CHILD_RUNS.get()
    on_start = study.on_start if study is not None else None
    with _fluent_run(dict(run_id=run_id), existing=run_id, hide_launcher=True, on_start=on_start) as resumed:
        clear_failure(resumed)
        with contextlib.suppress(MlflowException):
            MlflowClient().delete_tag(resumed, LOST_TAG)
        yield resumed


def _runs_with(filter_string: str) -> list:
    client = MlflowClient()
    return client.search_runs(
        keyed._all_experiments(client), filter_string=filter_string, order_by=["attributes.start_time DESC"]
    )


def reclaim(identity: str) -> str | None:
    """The run a killed process left for this job, to be continued: every RUNNING run with this
    identity whose process is gone is first ended FAILED with the reason; then the newest run with
    the identity, if it is one of those lost runs (not one that finished or failed on its own)."""
    found = _runs_with(f"tags.`{IDENTITY_TAG}` = '{identity}'")
    for run in found:
        reason = lost_reason(run) if run.info.status == "RUNNING" else None
        if reason and end_lost(run.info.run_id, reason):
            run.info._status = "FAILED"
            run.data.tags[LOST_TAG] = "true"
    for run in found:
        if run.info.status == "RUNNING":
            continue  # still at work in another process (a lost one was ended just above)
        lost = run.info.status == "FAILED" and run.data.tags.get(LOST_TAG) == "true"
        # a run declared lost (a late heartbeat) whose process still works is not taken from it
        return run.info.run_id if lost and not process_alive(run.data.tags) else None
    return None


def end_lost_with_key(key: str) -> list[str]:
    """End FAILED (with the reason) the RUNNING runs carrying this key whose process is gone."""
    ended = []
    for run in _runs_with(f"tags.`{keyed.KEY_TAG}` = '{key}' and attributes.status = 'RUNNING'"):
        reason = lost_reason(run)
        if reason and end_lost(run.info.run_id, reason):
            ended.append(run.info.run_id)
    return ended


def running_runs() -> list[tuple[RunRecord, str | None]]:
    """RUNNING runs (any experiment), each with the reason its process is known to be gone, or None."""
    return [(_record(run), lost_reason(run)) for run in _runs_with("attributes.status = 'RUNNING'")]


def stale_runs() -> list[tuple[RunRecord, str]]:
    """RUNNING runs (any experiment) whose recorded process is gone, with the reason."""
    return [(record, reason) for record, reason in running_runs() if reason]


@contextlib.contextmanager
def artifact_run(experiment: str, name: str, tags: dict[str, str] | None = None) -> Iterator[str]:
    """A reusable artifact's own run, in its own experiment, whatever run or study is around."""
    tags = _with_key(tags)
    if mlflow.active_run() is not None:  # an enclosing active run: keep the tree, as its child
        start = dict(run_name=name, tags=tags, nested=True)
    else:
        check_store(experiment, adopt_launched=False)
        start = dict(run_name=name, tags=tags)
    with _fluent_run(start, hide_launcher=True) as run_id:
        yield run_id


@contextlib.contextmanager
def nested_run(name: str, tags: dict[str, str] | None = None) -> Iterator[str]:
    """A child of the active run (e.g. one per model inside an analysis run)."""
    with _fluent_run(dict(run_name=name, tags=tags, nested=True)) as run_id:
        yield run_id


# --- study runs: held by the process that drives the study, not the active run ----------------


def study_run(
    experiment: str,
    name: str,
    *,
    key: str | None = None,
    tags: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    parent: str | None = None,
) -> str:
    """A study's run, created once: found again by `key` when one is given (whatever its status);
    else created, under `mlflow run` as the launcher's run. A launcher's run that finds an
    existing study run only points at it (`robustlogits.study_run`) and ends. Left not RUNNING:
    `holding` marks the time a process drives the study."""
    exp_id = check_store(experiment)
    client = MlflowClient()
    launched = os.environ.pop("MLFLOW_RUN_ID", None)  # adopted at most once: the study's jobs are children
    existing = keyed.find_runs_with_key(key, ("RUNNING", "FINISHED", "FAILED", "KILLED")) if key else []
    tags = dict(tags or {}) | ({keyed.KEY_TAG: key} if key else {}) | ({"mlflow.parentRunId": parent} if parent else {})
    if existing:
        run_id = existing[0].info.run_id
        if launched and launched != run_id:
            client.set_tag(launched, STUDY_RUN_TAG, run_id)
            client.set_terminated(launched, "FINISHED")
    elif launched:
        run_id = launched
        for tag, value in tags.items() | {("mlflow.runName", name)}:
            client.set_tag(run_id, tag, value)
        client.set_terminated(run_id, "FINISHED")  # RUNNING again while held
    else:
        run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
        client.set_terminated(run_id, "FINISHED")
    log_params_to(run_id, params or {})
    return run_id


@contextlib.contextmanager
def holding(run_id: str) -> Iterator[str]:
    """The driving process's lifetime on a study run: RUNNING inside, FINISHED or FAILED after."""
    client = MlflowClient()
    client.update_run(run_id, status="RUNNING")
    for tag, value in owner_tags().items():
        client.set_tag(run_id, tag, value)
    status = "FAILED"
    with sigterm_as_interrupt():
        try:
            yield run_id
            status = "FINISHED"
        finally:
            with contextlib.suppress(Exception):
                client.set_terminated(run_id, status)


# --- params and what a run recorded ------------------------------------------------------------


def log_params(params: dict[str, Any]) -> None:
    """Params the active run does not have yet: under `mlflow run` the launcher has already
    logged the `-P` values, under these same names and as the user spelled them."""
    log_params_to(mlflow.active_run().info.run_id, params)


def log_params_to(run_id: str, params: dict[str, Any]) -> None:
    """Params a run does not have yet (params are write-once), each as text of at most 6000 chars."""
    client = MlflowClient()
    existing = client.get_run(run_id).data.params
    fresh = {k: ("None" if v is None else str(v))[:6000] for k, v in params.items() if k not in existing}
    if fresh:
        from mlflow.entities import Param

        client.log_batch(run_id, params=[Param(k, v) for k, v in fresh.items()])


def active_run_id() -> str:
    return mlflow.active_run().info.run_id


def set_tags(tags: dict[str, Any], run_id: str | None = None) -> None:
    """Tags on a run (default: the active one)."""
    if run_id is None:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})
        return
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


@dataclass
class RunRecord:
    """What a run recorded, read back from the store."""

    run_id: str
    name: str
    status: str
    experiment_id: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    start_time: int | None = None
    end_time: int | None = None


def run_record(run_id: str) -> RunRecord:
    """A run's tags, params and latest metrics; a clear error for a run the store does not have."""
    try:
        run = MlflowClient().get_run(run_id)
    except Exception:  # noqa: BLE001
        raise UserError(f"no run {run_id!r} in the tracking store") from None
    return _record(run)


def _record(run) -> RunRecord:
    return RunRecord(
        run.info.run_id,
        run.info.run_name or run.data.tags.get("mlflow.runName", ""),
        run.info.status,
        run.info.experiment_id,
        dict(run.data.tags),
        dict(run.data.params),
        dict(run.data.metrics),
        run.info.start_time,
        run.info.end_time,
    )


def metric_history(run_id: str, key: str) -> dict[int, float]:
    """Every logged step of one metric (step -> value), e.g. a training run's per-epoch statistics."""
    return {m.step: m.value for m in MlflowClient().get_metric_history(run_id, key)}


def finished_runs(
    *, params: dict[str, str] | None = None, tags: dict[str, str] | None = None, limit: int = 5
) -> list[RunRecord]:
    """The newest FINISHED runs (any experiment) whose params and tags have these values."""
    client = MlflowClient()
    query = " and ".join(
        [f"params.`{k}` = '{v}'" for k, v in (params or {}).items()]
        + [f"tags.`{k}` = '{v}'" for k, v in (tags or {}).items()]
        + ["attributes.status = 'FINISHED'"]
    )
    found = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=query,
        order_by=["attributes.start_time DESC"],
        max_results=limit,
    )
    return [_record(r) for r in found]
