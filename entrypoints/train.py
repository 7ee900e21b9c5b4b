"""MLproject entry point `train`: `-P section.field=value` for any config value, under the name
the run logs it as (`robustlogits config` lists them), plus `-P preset=NAME` and `-P resume=RUN_ID`."""

import sys

from robustlogits.cli import mlproject_args, single_command, train

if __name__ == "__main__":
    sys.argv[1:] = mlproject_args(sys.argv[1:], plain=("preset", "resume"))
    single_command(train)()
