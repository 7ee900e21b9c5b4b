"""MLproject entry point `distill`: `-P distill.manipulation=permute -P distill.k=3`, any other
config value as `-P section.field=value` (the names the run logs), and `-P preset=NAME`."""

import sys

from robustlogits.cli import distill, mlproject_args, single_command

if __name__ == "__main__":
    sys.argv[1:] = mlproject_args(sys.argv[1:], plain=("preset",))
    single_command(distill)()
