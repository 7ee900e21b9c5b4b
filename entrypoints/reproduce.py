"""MLproject entry point `reproduce`: a thin Typer CLI over robustlogits.study.reproduce.run."""

from robustlogits.cli import reproduce, single_command

if __name__ == "__main__":
    single_command(reproduce)()
