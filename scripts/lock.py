"""Write requirements/lock.txt: the exact versions a fresh install gets, resolved from pyproject.toml's
ranges (every extra included) by `uv pip compile --universal`, so one file serves every platform and
Python the ranges allow; the suite is then re-run on it before it is committed.

    python3 -m pip install uv          # once; uv is a resolver, not a dependency of robustlogits
    python3 scripts/lock.py            # after a pyproject.toml change: keep every pin that still fits
    python3 scripts/lock.py --upgrade-package mlflow   # move one package to its newest allowed version
    python3 scripts/lock.py --upgrade  # move every package
    rm -rf .venv && bash .ci/run       # install through the new lock and pass the tests, then commit

docs/dependencies.md says when to do this and what to do when the newest versions fail.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock.txt"
EXTRAS = ("test", "robustbench", "postgres")


def locked_versions(lock: Path = LOCK) -> dict[str, str]:
    """Canonical name -> the version the lock pins for this interpreter and platform (markers
    evaluated). Raises ValueError on a line that is not an exact pin, or a package pinned twice here."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==":
            raise ValueError(f"not an exact pin: {line}")
        if requirement.marker is None or requirement.marker.evaluate():
            name = canonicalize_name(requirement.name)
            if name in pins:
                raise ValueError(f"pinned twice for this platform: {line}")
            pins[name] = specifiers[0].version
    return pins


def compile_command(output: Path, upgrade: bool, upgrade_packages: list[str]) -> list[str]:
    uv = shutil.which("uv")
    if uv is None:
        print("error: uv is not installed; `python3 -m pip install uv` first", file=sys.stderr)
        sys.exit(2)
    command = [uv, "pip", "compile", str(REPO / "pyproject.toml"), "--universal", "--no-header", "--quiet"]
    command += [x for extra in EXTRAS for x in ("--extra", extra)]
    command += ["--output-file", str(output)]  # uv keeps the pins it finds there unless told to move them
    command += ["--upgrade"] if upgrade else [x for name in upgrade_packages for x in ("--upgrade-package", name)]
    return command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upgrade", action="store_true", help="move every pin to the newest version the ranges allow")
    parser.add_argument("--upgrade-package", action="append", default=[], metavar="NAME", help="move this one")
    args = parser.parse_args()
    LOCK.parent.mkdir(exist_ok=True)
    partial = LOCK.with_suffix(".txt.partial")
    if LOCK.exists():
        shutil.copyfile(LOCK, partial)  # the pins to keep (a pyproject change still moves what it must)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_INDEX", "UV_FIND_LINKS"))}
    done = subprocess.run(compile_command(partial, args.upgrade, args.upgrade_package), env=env)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        sys.exit(done.returncode)
    header = [
        "# The exact versions a fresh install gets: `pip install -c requirements/lock.txt -e '.[test]'`",
        "# (the README's commands and .ci/run). Written by `python3 scripts/lock.py` (uv pip compile",
        f"# --universal, extras {', '.join(EXTRAS)}) on {date.today().isoformat()}; the suite passed on the",
        "# versions it picks for CPython 3.11 on Linux x86_64 before it was committed. Lines for other",
        "# platforms and Pythons are the resolver's, not tested here. Do not edit by hand.",
    ]
    partial.write_text("\n".join(header) + "\n" + partial.read_text())
    partial.replace(LOCK)  # never a half-written lock
    print(f"wrote {LOCK.relative_to(REPO)}; now: rm -rf .venv && bash .ci/run")


if __name__ == "__main__":
    main()
