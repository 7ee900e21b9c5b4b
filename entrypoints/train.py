"""MLproject entry point `train`: its parameters are the `robustlogits train` options (see MLproject)."""

from robustlogits.cli.mlproject import run_entry_point

if __name__ == "__main__":
    run_entry_point("train")
