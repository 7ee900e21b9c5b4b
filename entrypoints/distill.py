"""MLproject entry point `distill`: a thin Typer CLI over robustlogits.distill_job."""

from robustlogits.cli import distill, single_command

if __name__ == "__main__":
    single_command(distill)()
