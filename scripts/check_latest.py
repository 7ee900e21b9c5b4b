"""Does robustlogits still work on the newest versions its ranges allow? (The lock says what CI
tested; this says whether the world has moved under it.)

Installs this checkout (not editable, as a user would get it) with the newest versions pyproject.toml
allows into a fresh venv, prints the versions it got beside the lock's, and runs a short smoke:
train 1 epoch of an ST `smoke` network (registered as a teacher), distil 1 epoch from it, attack
50 images, and plan `reproduce --scale test --dry-run`, in a sqlite store of its own. Exit 0 when
every step passed; otherwise each failed step's last lines and exit 1.

    python3 scripts/check_latest.py                 # a fresh venv in a temporary folder
    python3 scripts/check_latest.py --keep /tmp/latest --pytest   # keep it; also run the suite on it
                                                                  # (editable, as the tests read the checkout)

docs/dependencies.md says how often to run it and what to do when it fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WATCHED = ("mlflow", "torch", "torchvision", "optuna", "numpy", "scipy", "matplotlib", "typer", "pyautoattack",
           "robustbench", "timm", "setuptools", "sqlalchemy", "pandas", "pytest")  # fmt: skip


def _index_env() -> dict[str, str]:
    """pip resolving torch and torchvision together from the index (as the README installs)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "PIP_CONSTRAINT")}
    return env | {"PIP_CONFIG_FILE": os.devnull}


def _installed_and_locked(python: Path) -> tuple[dict[str, str], dict[str, str]]:
    """What the venv holds and what the lock pins for it, both read by the venv's own Python (its
    markers are the ones that count, and it has `packaging`)."""
    script = (
        "import importlib.metadata as m, json, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from lock import locked_versions\n"
        "from packaging.utils import canonicalize_name\n"
        "installed = {canonicalize_name(d.metadata['Name']): d.version for d in m.distributions()}\n"
        "print(json.dumps([installed, locked_versions()]))\n"
    )
    done = subprocess.run([str(python), "-c", script], capture_output=True, text=True, check=True)
    installed, locked = json.loads(done.stdout)
    return installed, locked


def _data_args(data_dir: str | None) -> list[str]:
    if data_dir is not None and not Path(data_dir).exists():
        print(f"error: --data-dir {data_dir} does not exist", file=sys.stderr)
        sys.exit(2)
    candidates = [data_dir, os.environ.get("ROBUSTLOGITS_DATA"), str(REPO.parent / "shared" / "data")]
    found = next((c for c in candidates if c and Path(c).exists()), None)
    return ["--data-dir", str(Path(found).resolve())] if found else ["--dataset", "synthetic"]


def smoke_steps(data: list[str]) -> list[tuple[str, list[str]]]:
    teacher = "check-latest-st"
    return [
        ("train 1 epoch (smoke, ST) and register",
         ["train", "--training", "standard", "--preset", "smoke", "--epochs", "1", "--checkpoint-epochs", "1",
          "--teacher-epoch", "1", *data, "--set", f"run.registered_name={teacher}"]),
        ("distill 1 epoch (permute k=3)",
         ["distill", "--teacher", teacher, "--manipulation", "permute", "--k", "3", "--epochs", "1", "--no-attack",
          "--preset", "smoke"]),
        ("attack 50 images (APGD-CE + APGD-DLR)",
         ["attack", "--model", teacher, "--n-examples", "50", "--n-iter", "10"]),
        ("reproduce --scale test --dry-run", ["reproduce", "--scale", "test", "--dry-run"]),
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build the venv here and keep it (default: a temporary folder)")
    parser.add_argument("--data-dir", help="CIFAR-10 for the smoke (default: $ROBUSTLOGITS_DATA, ../shared/data)")
    parser.add_argument("--pytest", action="store_true", help="also run the test suite on the newest versions")
    args = parser.parse_args()
    data = _data_args(args.data_dir)  # bad input before a 3-minute install
    with tempfile.TemporaryDirectory(prefix="check-latest-") as scratch:
        root = args.keep or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        venv = root / "venv"
        python = venv / "bin" / "python"
        started = time.perf_counter()
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        install = [str(python), "-m", "pip", "install", "-q", "--upgrade", "--upgrade-strategy", "eager"]
        print(f"installing {REPO.name} with the newest versions its ranges allow into {venv} ...", flush=True)
        done = subprocess.run([*install, f"{REPO}[test,robustbench]"], env=_index_env())
        if done.returncode != 0:
            print("FAILED: the install itself (pip's message above)")
            return 1
        print(f"installed in {time.perf_counter() - started:.0f} s\n")
        installed, locked = _installed_and_locked(python)
        print(f"{'package':<14} {'newest allowed':<16} lock")
        for name in WATCHED:
            if name in installed:
                mark = "" if installed[name] == locked.get(name) else "   <- differs"
                print(f"{name:<14} {installed[name]:<16} {locked.get(name, '-')}{mark}")
        moved = sorted(n for n in installed if n in locked and installed[n] != locked[n])
        print(f"\n{len(moved)} of {len(locked)} locked packages differ from the lock: {', '.join(moved) or 'none'}\n")

        work = root / "work"
        work.mkdir(exist_ok=True)
        env = _index_env() | {
            "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
            "ROBUSTLOGITS_CACHE": str(root / "cache"),
            "MPLBACKEND": "Agg",
        }
        failed = []
        steps = smoke_steps(data)
        if args.pytest:  # on an editable install of the same versions: tests read the checkout (its commit)
            steps.append(
                ("editable install for the suite", ["-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)])
            )
            steps.append(("the test suite", ["-m", "pytest", "-q", "-x", str(REPO / "tests")]))
        for title, command in steps:
            step_started = time.perf_counter()
            argv = [str(python), *command] if command[0] == "-m" else [str(python), "-m", "robustlogits.cli", *command]
            proc = subprocess.run(argv, cwd=REPO if args.pytest and command[0] == "-m" else work, env=env,
                                  capture_output=True, text=True)  # fmt: skip
            seconds = time.perf_counter() - step_started
            print(f"{'ok    ' if proc.returncode == 0 else 'FAILED'} {title} ({seconds:.0f} s)", flush=True)
            if proc.returncode != 0:
                failed.append(title)
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
                print("\n".join("    " + line for line in tail))
        print(f"\n{'all steps passed' if not failed else f'{len(failed)} failed: ' + '; '.join(failed)} "
              f"({time.perf_counter() - started:.0f} s in all)")  # fmt: skip
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
