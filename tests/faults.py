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


def untrained_then_forgetting(trial, *args, marker: str, checkpoint, **kwargs):
    """The first trial trains for 48 steps at 5e-3; the second at a learning rate that leaves it
    as it started (its new variable's head at zero: a forecast worse than the first's on nearly
    every day); from the third on, the trial starts from the base's weights with noise added
    (30 % of each weight's spread): it predicts every variable Aurora already predicted far
    worse than the base model does."""
    import dataclasses

    calls = Path(marker + ".calls")
    n = int(calls.read_text()) + 1 if calls.exists() else 1
    calls.write_text(str(n))
    if n == 1:
        trial = dataclasses.replace(trial, steps=48, eval_every=48, learning_rate=5e-3)
    elif n == 2:
        trial = dataclasses.replace(trial, learning_rate=1e-12)
    else:
        weights = torch.load(checkpoint, map_location="cpu", weights_only=True)
        generator = torch.Generator().manual_seed(0)
        for k, w in weights.items():
            if w.is_floating_point() and w.numel() > 1:
                noise = torch.randn(w.shape, generator=generator, dtype=w.dtype)
                weights[k] = w + 0.3 * w.std() * noise
        checkpoint = Path(marker + ".noisy.ckpt")
        torch.save(weights, checkpoint)
    return fit(trial, *args, checkpoint=checkpoint, **kwargs)


def killed_while_scoring(*args, marker: str, stop=None, **kwargs):
    """Killed (SIGKILL, as the OOM killer or a scheduler kills) the first time, after its first
    block of scoring; later calls train and score normally."""
    import signal

    first = _first_call(marker)

    def scored(*terms):
        if first:
            os.kill(os.getpid(), signal.SIGKILL)
        return stop(*terms) if stop else False

    return fit(*args, stop=scored, **kwargs)


def pause_after_first_check(*args, marker: str, on_step=None, **kwargs):
    """Trains as asked, but after the step that follows the first pruner check (step 3 of the
    tiny study's 4, checks every 2) writes `<marker>.paused` and waits, at most a minute, for
    `<marker>.resume`: a test reads the running trial's MLflow run meanwhile."""
    import time

    def step(k, value):
        if on_step:
            on_step(k, value)
        if k == 3:
            Path(marker + ".paused").touch()
            deadline = time.monotonic() + 60
            while not Path(marker + ".resume").exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    return fit(*args, on_step=step, **kwargs)
