"""MLproject entry point `analyze`: its parameters are the `robustlogits analyze` options (see MLproject)."""

from robustlogits.cli.mlproject import run_entry_point

if __name__ == "__main__":
    run_entry_point("analyze")
