"""The `robustlogits` command line: Typer commands that parse arguments and call the library.

`app` holds every command; importing this package registers them. The MLproject entry points
(`entrypoints/`) run the same commands (`mlproject.run_entry_point`).
"""

from robustlogits.cli import analyze, jobs, runs, study  # noqa: F401 - each module registers its commands
from robustlogits.cli.app import app, cli_errors, main

__all__ = ["app", "cli_errors", "main"]
