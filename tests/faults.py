"""Trial functions that fail once, for the worker tests (top-level, so a spawned worker can load them).

Each takes a marker file: the first call creates it and fails; later calls, in this worker or in
the one that replaces it, train normally.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from aurora_sweep.train.fit import fit


def _first_call(marker: str) -> bool:
    if Path(marker).exists():
        return False
    Path(marker).touch()
    return True


def oom_once(*args, marker: str, **kwargs):
    if _first_call(marker):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
    return fit(*args, **kwargs)


def die_once(*args, marker: str, **kwargs):
    if _first_call(marker):
        os._exit(3)
    return fit(*args, **kwargs)


def nan_once(*args, marker: str, **kwargs):
    if _first_call(marker):
        raise FloatingPointError("training loss became nan at step 3")
    return fit(*args, **kwargs)


def train_forever(*args, marker: str, **kwargs):
    """A trial that never ends (it touches `marker` once it is running), like a long fine-tune."""
    import time

    Path(marker).write_text(str(os.getpid()))
    while True:
        time.sleep(0.1)


def killed_once(*args, marker: str, **kwargs):
    """As the OOM killer or `kill -9` ends a worker: SIGKILL, from outside the trial's code."""
    if _first_call(marker):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    return fit(*args, **kwargs)


def nan_objective(*args, **kwargs):
    """A trial that trains but whose objective comes out NaN (a score the data cannot define)."""
    result = fit(*args, **kwargs)
    result.metrics["tp_seeps"] = float("nan")
    return result
