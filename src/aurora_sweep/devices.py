"""Where the trial workers run: one GPU each, or a share of the CPU cores this process may use."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from aurora_sweep.errors import AuroraSweepError

if TYPE_CHECKING:
    import torch


def default_device() -> torch.device:
    """The GPU torch sees first, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def plan_devices(workers: int, gpus: list[int] | None) -> list[dict[str, int | None]]:
    """One device per worker: a GPU each when there are GPUs, else a share of the CPU cores."""
    import torch

    count = torch.cuda.device_count()
    if gpus:
        if len(set(gpus)) != len(gpus):
            raise AuroraSweepError(f"--gpus {gpus}: each worker needs its own GPU")
        if workers not in (1, len(gpus)):
            raise AuroraSweepError(
                f"--workers {workers} with --gpus {','.join(map(str, gpus))}: give one GPU per "
                "worker (or leave out --workers)"
            )
        missing = [g for g in gpus if g >= count]
        if missing:
            raise AuroraSweepError(
                f"--gpus {','.join(map(str, gpus))}: this machine has {count} GPU(s) "
                f"(0..{count - 1}); GPU {missing[0]} does not exist"
            )
        return [{"gpu": g, "threads": None} for g in gpus]
    if count:
        if workers > count:
            raise AuroraSweepError(
                f"--workers {workers}: this machine has {count} GPU(s); one worker per GPU"
            )
        return [{"gpu": g, "threads": None} for g in range(workers)]
    cores = usable_cores()
    return [{"gpu": None, "threads": max(1, cores // workers)} for _ in range(workers)]


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (what a scheduler such as Slurm or
    `taskset` grants), which `os.cpu_count` ignores; torch threads beyond it only contend."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1
