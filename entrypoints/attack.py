"""MLproject entry point `attack`: `-P attack.model=models:/NAME@ALIAS -P attack.n_examples=500`;
every setting is named as the run logs it (`attack.eps`, `attack.n_iter`, `attack.data_dir`, ...)."""

import sys

from robustlogits.cli import attack, mlproject_args, single_command

if __name__ == "__main__":
    sys.argv[1:] = mlproject_args(sys.argv[1:], options_prefix="attack")
    single_command(attack)()
