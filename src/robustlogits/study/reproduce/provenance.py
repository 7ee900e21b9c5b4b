"""What made a report's numbers: the machine, the code, and the time each step took.

A report kept as data (`results/<scale>/`) is read by people who will not rerun it, so it carries
its provenance: the CPU (timings differ between machines by integer factors), the precision the
runs trained in, the commit, and every step's run with its start, end and duration.
"""

from __future__ import annotations

import logging
import os
import platform
from datetime import datetime, timezone

import torch

from robustlogits import tracking
from robustlogits.core import checkout

log = logging.getLogger(__name__)


def machine() -> dict:
    from robustlogits.core.device import bf16_is_native, cpu_name

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1),
        "bf16_native_cpu": bf16_is_native(torch.device("cpu")),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "system": platform.platform(),
    }


def code() -> dict:
    """The commit of the checkout the package runs from, and whether it had uncommitted changes."""
    return dict(checkout.commit())


def _iso(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if ms else None


def step_times(steps, runs: dict[str, str | None], task_times: dict[str, dict] | None = None) -> list[dict]:
    """Each step's run, how long it took and how long the plan said it would; a step that is another's
    run (same key) is listed once.

    `task_times` (run id -> {"seconds", "estimate_s"}, from the stage studies) is the step as its worker
    timed it; the run's own start and end miss what the step did before opening it (a student's teacher
    logits, which go to a run of their own). Without it, the run's duration stands in, unestimated."""
    task_times = task_times or {}
    rows, seen = [], set()
    for step in steps:
        run_id = runs.get(step.name)
        if not run_id or run_id in seen:
            continue
        seen.add(run_id)
        record = tracking.run_record(run_id)
        timed = task_times.get(run_id, {})
        run_seconds = (record.end_time - record.start_time) / 1000 if record.end_time and record.start_time else None
        rows.append(
            {
                "step": step.name,
                "run": run_id,
                "started": _iso(record.start_time),
                "ended": _iso(record.end_time),
                "seconds": timed.get("seconds", run_seconds),
                "run_seconds": run_seconds,
                "timed_by": "worker" if timed else "run",
                "estimate_s": timed.get("estimate_s"),
                "precision": record.params.get("run.precision"),
                # runs from before the commit tag carry MLflow's own, where it found the checkout
                "commit": record.tags.get(tracking.CODE_TAG) or record.tags.get("mlflow.source.git.commit"),
                "_start": record.start_time,
                "_end": record.end_time,
            }
        )
    return rows


def worker_times(storage_url: str | None) -> dict[str, dict]:
    """Run id -> seconds its worker took and the plan's estimate, from the study's Optuna storage;
    empty where it cannot be read."""
    from robustlogits.study import engine

    try:
        return engine.task_times_by_run(storage_url or engine.default_storage())
    except Exception as exc:  # noqa: BLE001 - the report stands without them; it says which timing it used
        log.warning("step times from the runs only: the study storage could not be read (%s)", exc)
        return {}


def outside_steps_seconds(rows: list[dict]) -> float | None:
    """Wall clock from the first step's start to the last step's end that no step accounts for: each
    step covers the `seconds` before its end (its worker's time, teacher logits included), and what
    is left is stops between invocations, work done before a kill (a retried step is timed from its
    retry, even where it resumed that work), and the start-up and hand-offs between steps. A resumed
    study's first-to-last span means little without it."""
    spans = sorted(
        (r["_end"] / 1000 - r["seconds"], r["_end"] / 1000) for r in rows if r.get("_end") and r.get("seconds")
    )
    starts = [r["_start"] / 1000 for r in rows if r.get("_start")]
    if not spans or not starts:
        return None
    first, last = min(starts + [spans[0][0]]), max(end for _, end in spans)
    covered, reach = 0.0, first
    for start, end in spans:
        start = max(start, reach)
        if end > start:
            covered += end - start
            reach = end
    return max(0.0, (last - first) - covered)


def provenance(steps, runs: dict[str, str | None], task_times: dict[str, dict] | None = None) -> dict:
    rows = step_times(steps, runs, task_times)
    estimated = [r for r in rows if r["estimate_s"]]
    outside = outside_steps_seconds(rows)
    starts = [r.pop("_start") for r in rows]
    ends = [r.pop("_end") for r in rows]
    starts, ends = [s for s in starts if s], [e for e in ends if e]
    return {
        "machine": machine(),
        "code": code(),
        "started": _iso(min(starts)) if starts else None,
        "ended": _iso(max(ends)) if ends else None,
        # first step's start to last step's end: includes any pause between resumed sessions
        "wall_seconds": (max(ends) - min(starts)) / 1000 if starts and ends else None,
        "step_seconds": sum(r["seconds"] or 0 for r in rows),
        "outside_steps_seconds": outside,
        "steps_timed_by_worker": sum(r["timed_by"] == "worker" for r in rows),
        "precisions": sorted({r["precision"] for r in rows if r["precision"]}),
        "step_commits": sorted({r["commit"] for r in rows if r["commit"]}),
        # the plan's estimate against what those same steps took: how far to trust a `--dry-run`
        "estimated_steps": len(estimated),
        "estimate_seconds": sum(r["estimate_s"] for r in estimated),
        "estimated_steps_seconds": sum(r["seconds"] or 0 for r in estimated),
        "steps": rows,
    }


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def summary(p: dict) -> list[str]:
    """The provenance in sentences: what ran where, and how long it took."""
    m, c = p["machine"], p["code"]
    dirty = " (with uncommitted changes)" if c.get("uncommitted_changes") else ""
    ran = p.get("step_commits") or []
    ran_at = (
        "the steps ran at the same code"
        if c.get("commit") and ran == [c["commit"] + ("+dirty" if c.get("uncommitted_changes") else "")]
        else f"the steps ran at {', '.join(f'`{x}`' for x in ran)}"
        if ran
        else "the steps' commits are not recorded"
    )
    return [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
        + f"; bf16 native on the CPU: {'yes' if m['bf16_native_cpu'] else 'no'}; torch {m['torch']}.",
        f"Code: report written at commit `{c.get('commit') or 'unknown'}`{dirty}; {ran_at}. "
        f"Trained in: {', '.join(p['precisions']) or '–'}.",
        f"Time: {p['started'] or '–'} to {p['ended'] or '–'}, {_clock(p['wall_seconds'])} from the first step's "
        f"start to the last step's end{_outside(p)}; the steps themselves took {_clock(p['step_seconds'])}"
        + _timed_by(p)
        + ".",
        *_estimate_sentence(p),
    ]


def _outside(p: dict) -> str:
    outside = p.get("outside_steps_seconds")
    if outside is None or outside < 60:
        return ""
    return (
        f", {_clock(outside)} of it in no step's time (stops between invocations; work done before a kill, "
        "which the retried step's time leaves out; start-ups)"
    )


def _estimate_sentence(p: dict) -> list[str]:
    n, total = p.get("estimated_steps", 0), len(p["steps"])
    if not n:
        return ["Estimate: no step carries the plan's estimate (steps queued before estimates were recorded)."]
    took, planned = p["estimated_steps_seconds"], p["estimate_seconds"]
    which = "the steps" if n == total else f"{n} of the {total} steps (the others were queued without one)"
    return [
        f"Estimate: the plan, probing this machine when it queued them, put {which} at {_clock(planned)}; "
        f"they took {_clock(took)} ({took / planned:.2f}x the estimate)."
    ]


def _timed_by(p: dict) -> str:
    timed, total = p.get("steps_timed_by_worker", 0), len(p["steps"])
    if timed == total:
        return " (each as its worker timed it, teacher logits included)"
    if timed:
        return (
            f" ({timed} of {total} as their worker timed them; the rest by their run, which leaves out teacher logits)"
        )
    return " (by each step's run, which leaves out a student's teacher logits)"


def markdown_lines(p: dict) -> list[str]:
    lines = ["## Provenance", "", *[f"- {s}" for s in summary(p)], "", "| step | run | started | estimated | took |"]
    lines.append("| --- | --- | --- | --- | --- |")
    lines += [
        f"| {r['step']} | `{r['run'][:8]}` | {r['started']} | {_clock(r.get('estimate_s'))} | {_clock(r['seconds'])} |"
        for r in p["steps"]
    ]
    return lines + [""]


def html_lines(p: dict, escape) -> list[str]:
    out = ['<h2 id="provenance">Provenance</h2><ul>', *[f"<li>{escape(s)}</li>" for s in summary(p)], "</ul>"]
    out.append(
        '<table id="step-times"><tr><th>step</th><th>run</th><th>started</th><th>estimated</th><th>took</th></tr>'
    )
    out += [
        f"<tr><td>{escape(r['step'])}</td><td>{r['run'][:8]}</td><td>{escape(r['started'] or '')}</td>"
        f"<td>{_clock(r.get('estimate_s'))}</td><td>{_clock(r['seconds'])}</td></tr>"
        for r in p["steps"]
    ]
    return [*out, "</table>"]
