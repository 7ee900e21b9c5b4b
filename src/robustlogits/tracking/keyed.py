"""Keyed work: "find the FINISHED run with this key, or run it", the one way results are reused.

A unit of work's key hashes its resolved config and the identities of its inputs (model versions,
data digest, artifact digests): equal keys mean the same result. Teacher logits, test logits,
sweep trials and reproduce steps all go through `find_or_run`, so idempotence, resume and
"nothing done twice" come from this one place.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable

from mlflow.tracking import MlflowClient

KEY_TAG = "robustlogits.key"


def job_key(payload: dict[str, Any]) -> str:
    """A unit of work's identity: a hash of its resolved config and the identities of its inputs."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _all_experiments(client: MlflowClient) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def find_runs_with_key(key: str, statuses: tuple[str, ...]) -> list:
    """Runs (any experiment, newest first) tagged with this key and in one of these statuses."""
    client = MlflowClient()
    found = client.search_runs(
        _all_experiments(client), filter_string=f"tags.`{KEY_TAG}` = '{key}'", order_by=["attributes.start_time DESC"]
    )
    return [r for r in found if r.info.status in statuses]


def find_finished_run(key: str) -> str | None:
    """The newest FINISHED run (any experiment) tagged with this key, or None."""
    client = MlflowClient()
    found = client.search_runs(
        _all_experiments(client),
        filter_string=f"tags.`{KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0].info.run_id if found else None


def finished_runs_by_key() -> dict[str, str]:
    """Key -> newest FINISHED run id, for every keyed run in the store (one query, not one per key)."""
    client = MlflowClient()
    experiments = _all_experiments(client)
    out: dict[str, str] = {}
    token = None
    while True:
        page = client.search_runs(
            experiments,
            filter_string=f"tags.`{KEY_TAG}` LIKE '%' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time ASC"],
            max_results=1000,
            page_token=token,
        )
        out |= {r.data.tags[KEY_TAG]: r.info.run_id for r in page}
        token = page.token
        if not token:
            return out


# The key waiting for the first run opened inside `find_or_run` (a job's or an artifact's run).
_PENDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("robustlogits_pending_key", default=None)


def claim_pending_key() -> str | None:
    """The key of the innermost `find_or_run` whose run has not opened yet; claimed once."""
    slot = _PENDING.get()
    if not slot:
        return None
    return slot.pop()


@dataclass
class Keyed:
    run_id: str
    reused: bool  # True: an earlier FINISHED run with the key; False: `produce` just made it


def find_or_run(key: str, produce: Callable[[], str]) -> Keyed:
    """The FINISHED run with this key, or the run `produce()` makes: the first run it opens (a job
    run or an artifact run, wherever it lands) carries the key, so the next call finds it."""
    found = find_finished_run(key)
    if found:
        return Keyed(found, True)
    from robustlogits.tracking.runs import end_lost_with_key  # runs imports this module

    end_lost_with_key(key)  # a run a killed process left RUNNING with this key ends FAILED, saying why
    token = _PENDING.set([key])
    try:
        return Keyed(produce(), False)
    finally:
        _PENDING.reset(token)
