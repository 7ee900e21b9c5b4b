"""MLproject entry point `attack`: a thin Typer CLI over robustlogits.attack_job."""

from robustlogits.cli import attack, single_command

if __name__ == "__main__":
    single_command(attack)()
