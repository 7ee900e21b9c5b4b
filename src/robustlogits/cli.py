"""The `robustlogits` command line. Commands only parse arguments and call the library.

Bad input becomes one line on stderr and exit code 2; nothing else is printed as a traceback
unless ROBUSTLOGITS_DEBUG is set.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from typing import List, Optional

import typer

from robustlogits.errors import UserError

app = typer.Typer(help="Logit distributions of adversarially-trained networks, tracked in MLflow.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def cli_errors(fn):
    """Turn library errors into a one-line message and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
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
        except KeyboardInterrupt:
            typer.echo("interrupted; the run was marked FAILED and can be continued with --resume RUN_ID", err=True)
            raise typer.Exit(130) from None
    return wrapper


def _blank(value: Optional[str]) -> Optional[str]:
    """MLproject passes unset parameters as empty strings."""
    return value if value not in (None, "", "none", "None") else None


def split_overrides(text: Optional[str]) -> list[str]:
    return [t for t in re.split(r"[\s;]+", text or "") if t]


@app.command()
@cli_errors
def train(
    training: str = typer.Option("standard", help="standard | adversarial"),
    preset: str = typer.Option("smoke", help="smoke | study | paper (see `robustlogits config`)"),
    dataset: Optional[str] = typer.Option(None, help="cifar10 | cifar100 | synthetic (default: the preset's)"),
    arch: Optional[str] = typer.Option(None, help="resnet18 | resnet18-w32 | resnet18-w16 | resnet20 | cnn-small | cnn-tiny"),
    data_dir: Optional[str] = typer.Option(None, help="where the data is (default: $ROBUSTLOGITS_DATA or ./data)"),
    epochs: Optional[int] = typer.Option(None, help="override optim.epochs"),
    checkpoint_epochs: Optional[str] = typer.Option(None, help="comma list, e.g. 20,40,200"),
    teacher_epoch: Optional[int] = typer.Option(None, help="checkpoint promoted as the teacher (paper: 40)"),
    seed: Optional[int] = typer.Option(None, help="override run.seed"),
    resume: Optional[str] = typer.Option(None, help="continue this killed/failed run id from its last epoch"),
    set_: List[str] = typer.Option([], "--set", help="any config value: section.field=value (repeatable)"),
    overrides: Optional[str] = typer.Option(None, help="several section.field=value separated by spaces"),
):
    """Standard or PGD adversarial training; every epoch's logit distribution goes to MLflow."""
    from robustlogits.config import apply_overrides, preset as make_preset
    from robustlogits.train_job import run_training

    resume = _blank(resume)
    cfg = make_preset(preset)
    cfg.run.training = training
    pairs = [("data.dataset", _blank(dataset)), ("model.arch", _blank(arch)), ("data.data_dir", _blank(data_dir)),
             ("optim.epochs", epochs), ("run.checkpoint_epochs", _blank(checkpoint_epochs)),
             ("run.teacher_epoch", teacher_epoch), ("run.seed", seed)]
    apply_overrides(cfg, [f"{k}={v}" for k, v in pairs if v is not None])
    apply_overrides(cfg, [*set_, *split_overrides(overrides)])
    run_id = run_training(cfg, resume=resume)
    typer.echo(f"run {run_id} finished; registered model {cfg.registered_model_name()}")


@app.command("config")
@cli_errors
def show_config(preset: str = typer.Option("smoke", help="preset to print")):
    """Print every config key of a preset (what --set and MLflow params use)."""
    from robustlogits.config import flatten, preset as make_preset

    for key, value in flatten(make_preset(preset)).items():
        typer.echo(f"{key}={value}")


def single_command(fn) -> typer.Typer:
    """A one-command Typer app for an MLproject entry point, with the same error handling."""
    command_app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    command_app.command()(fn)
    return command_app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
