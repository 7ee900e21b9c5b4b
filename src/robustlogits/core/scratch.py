"""A process's temporary files in one folder of its own, so a killed process's leftovers can be told
from a live one's and removed by the next command (nothing else can clean up after SIGKILL)."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
from pathlib import Path

PREFIX = "robustlogits-proc-"


def process_start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot), so a reused pid is not taken for the old one."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str:
    return process_start_time(pid) or "0"


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start in ("0", _start_time(pid))


def use_private_tempdir() -> Path:
    """Point this process's temporary files (its own and its libraries', e.g. MLflow's) into
    `$TMPDIR/robustlogits-proc-HOST-PID-START/`, removed at exit; first remove the folders of
    processes on this host that are gone. Idempotent."""
    base = Path(os.environ.get("ROBUSTLOGITS_TMPDIR_BASE") or tempfile.gettempdir())
    host = socket.gethostname().replace("-", "_")
    start = _start_time(os.getpid())
    mine = base / f"{PREFIX}{host}-{os.getpid()}-{start}"
    if tempfile.tempdir == str(mine):
        return mine
    os.environ["ROBUSTLOGITS_TMPDIR_BASE"] = str(base)  # child processes sweep the same folder
    for folder in base.glob(f"{PREFIX}{host}-*"):
        try:
            pid, pid_start = folder.name[len(f"{PREFIX}{host}-") :].split("-", 1)
            if not _alive(int(pid), pid_start):
                shutil.rmtree(folder, ignore_errors=True)
        except ValueError:
            continue
    mine.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(mine)
    atexit.register(_remove_if_mine, str(mine), os.getpid())
    return mine


def _remove_if_mine(folder: str, owner: int) -> None:
    """A forked child that runs its exit handlers must not remove its parent's folder."""
    if os.getpid() == owner:
        shutil.rmtree(folder, ignore_errors=True)
