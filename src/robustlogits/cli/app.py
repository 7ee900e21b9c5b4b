"""The `robustlogits` command line's frame: the app, and how a command reports bad input.

Bad input becomes one line on stderr and exit code 2; nothing else is printed as a traceback
unless ROBUSTLOGITS_DEBUG is set. Commands only parse arguments and call the library.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import sys
from typing import Optional

import typer

from robustlogits.core.errors import StoreUnreachable, UserError

app = typer.Typer(
    help="Logit distributions of adversarially-trained networks, tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def cli_errors(fn):
    """Turn library errors into a one-line message and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from robustlogits.core.scratch import use_private_tempdir

        use_private_tempdir()  # temporary files in a folder of this process's own (a killed one's are swept)
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        for noisy in ("mlflow", "alembic", "urllib3", "matplotlib", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            if os.environ.get("ROBUSTLOGITS_DEBUG"):
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except StoreUnreachable as exc:
            if os.environ.get("ROBUSTLOGITS_DEBUG"):
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or os.environ.get("ROBUSTLOGITS_DEBUG"):
                raise
            typer.echo(f"error: {exc}; the run was marked FAILED and nothing was registered after it", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; the run was marked FAILED and can be continued with --resume RUN_ID", err=True)
            raise typer.Exit(130) from None

    return wrapper


def blank(value: Optional[str]) -> Optional[str]:
    """MLproject passes unset parameters as empty strings."""
    return value if value not in (None, "", "none", "None") else None


def split_overrides(text: Optional[str]) -> list[str]:
    return [t for t in re.split(r"[\s;]+", text or "") if t]


def fraction_text(value: float, denominator: int = 255) -> str:
    """8/255 rather than 0.03137...: how attack budgets are written (and read back by `parse_eps`)."""
    scaled = value * denominator
    return f"{round(scaled)}/{denominator}" if abs(scaled - round(scaled)) < 1e-9 else repr(value)


def parse_eps(text: str) -> float:
    from robustlogits.config import coerce

    return coerce(text, float, "eps")


def comma_list(text: Optional[str]) -> list[str]:
    return [t for t in re.split(r"[\s,]+", text or "") if t]


def main() -> None:
    import robustlogits.cli  # noqa: F401 - registers every command

    app()
