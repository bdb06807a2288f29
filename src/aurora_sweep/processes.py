"""Who is running: the record a trial or an import leaves of its process, and whether that
process still lives (process ids are reused, so its start time is kept beside its id)."""

from __future__ import annotations

import os
import socket
from typing import Any

import psutil


def this_process() -> dict[str, Any]:
    """This process: host, pid and the pid's start time."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_started": psutil.Process().create_time(),
    }


def alive(pid: int | None, started: float | None) -> bool:
    """Whether the process `pid` started at `started` (on this host) still runs."""
    try:
        process = psutil.Process(int(pid))
        return (
            abs(process.create_time() - float(started)) < 1e-3
            and process.status() != psutil.STATUS_ZOMBIE
        )
    except (psutil.NoSuchProcess, TypeError, ValueError):
        return False
