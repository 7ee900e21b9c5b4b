"""`robustlogits runs`: the store's RUNNING runs, and which of them a killed process left behind."""

from __future__ import annotations

import typer

from robustlogits.cli.app import app, cli_errors


@app.command("runs")
@cli_errors
def runs(
    stale: bool = typer.Option(False, "--stale", help="only RUNNING runs whose process is gone (killed)"),
    end: bool = typer.Option(False, "--end", help="with --stale: end them FAILED, with the reason as tag `error`"),
):
    """List RUNNING runs with the process holding each; `--stale`: those whose process is gone
    (exit code 1 when there are any and `--end` was not given, so scripts can watch for them)."""
    from robustlogits.core.errors import UserError
    from robustlogits.tracking import check_store_uri, running_runs

    if end and not stale:
        raise UserError("--end needs --stale (only runs whose process is gone are ended)")
    check_store_uri()
    found = running_runs()
    shown = [(record, reason) for record, reason in found if reason or not stale]
    for record, reason in shown:
        holder = f"pid {record.tags.get('robustlogits.pid', '?')} on {record.tags.get('robustlogits.host', '?')}"
        state = f"stale: {reason}" if reason else "running"
        typer.echo(f"{record.run_id}  {record.name or '-'}  experiment {record.experiment_id}  {holder}  {state}")
    if stale and end:
        from robustlogits.tracking import end_lost

        ended = [record.run_id for record, reason in shown if end_lost(record.run_id, reason)]
        typer.echo(f"ended {len(ended)} stale run(s) FAILED")
        return
    typer.echo(f"{len(shown)} {'stale ' if stale else ''}run(s)", err=True)
    if stale and shown:
        raise typer.Exit(1)
