"""MLproject entry point `sweep`: a thin Typer CLI over robustlogits.study.sweep."""

from robustlogits.cli import single_command, sweep

if __name__ == "__main__":
    single_command(sweep)()
