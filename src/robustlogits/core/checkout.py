"""Which code is running: the commit of the checkout this package is imported from.

Numbers kept as data are defended by naming the code that made them; a study resumed across
sessions may run its steps at different commits, so each run records its own.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(_HERE), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.cache
def commit() -> dict:
    """{"commit": sha or None (not a git checkout), "uncommitted_changes": bool or None}; read once per process."""
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"commit": sha, "uncommitted_changes": bool(status) if sha else None}


def described() -> str | None:
    """The commit as one string, `+dirty` appended when tracked files had changes (git describe's convention)."""
    found = commit()
    return found["commit"] and found["commit"] + ("+dirty" if found["uncommitted_changes"] else "")
