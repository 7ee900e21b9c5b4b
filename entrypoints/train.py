"""MLproject entry point `train`: a thin Typer CLI over robustlogits.train_job."""

from robustlogits.cli import single_command, train

if __name__ == "__main__":
    single_command(train)()
