"""What `run` shows while it works, on stderr.

On a terminal, a live panel (rich) under the trials' lines: for each worker its trial, the
phase (training, pruner check, scoring; a finalist's replica says so), step of steps, the last
loss, the time spent and an estimate of what is left; for the study, trials finished of the
target, pruned, failed, infeasible, and the best feasible so far. Elsewhere (a log file, CI, a
scheduler) the trials' lines alone, a line per trial. Quiet: neither; the caller prints its
final lines itself.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

#: the live panel's redraws a second (each reads memory only: no storage, no MLflow)
REFRESH_PER_SECOND = 2


@dataclass
class WorkerState:
    """One worker's trial as the study process sees it, from the messages its worker sends."""

    trial: int
    steps: int
    started: float
    replica: str = ""  # "finalist 24, seed 2" for a finalist's replica
    phase: str = "starting"
    step: int = 0
    loss: float | None = None
    training_ended: float | None = None  # when its last step was seen: scoring began
    scored: tuple[int, int] | None = None  # samples scored of all, when scoring in blocks


@dataclass
class StudyCounts:
    finished: int = 0
    target: int = 0
    pruned: int = 0
    failed: int = 0
    infeasible: int = 0
    best: str = "none yet"
    phase: str = "search"


class Watch:
    """The view of one `run`: `say` prints a trial's line, the `worker_*` methods follow each
    worker's trial, `counts` the study's; `with watch:` shows the live panel on a terminal."""

    def __init__(self, console: Console, *, quiet: bool = False, objective: str = "") -> None:
        self.console, self.quiet, self.objective = console, quiet, objective
        self.live = console.is_terminal and not quiet
        self.workers: dict[int, WorkerState] = {}
        self.study = StudyCounts()
        self.scoring_seconds: list[float] = []  # completed trials' scoring, for the estimate
        self.lock = threading.Lock()
        self._display: Live | None = None

    def __enter__(self) -> Watch:
        if self.live:
            self._display = Live(
                console=self.console,
                get_renderable=self.panel,
                refresh_per_second=REFRESH_PER_SECOND,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._display.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._display is not None:
            self._display.stop()
            self._display = None

    def say(self, line: str) -> None:
        """A line that stays: a trial's verdict, the finalists chosen, a worker killed."""
        if not self.quiet:
            self.console.print(line, highlight=False)

    def worker_started(self, index: int, trial: int, steps: int, replica: str = "") -> None:
        with self.lock:
            self.workers[index] = WorkerState(trial, steps, time.monotonic(), replica)

    def worker_step(self, index: int, step: int, loss: float, *, checking: bool) -> None:
        """A worker's training reached `step` (its loss): a pruner check follows when
        `checking`; the last step ends training (scoring follows)."""
        with self.lock:
            w = self.workers.get(index)
            if w is None:
                return
            w.step, w.loss = step, loss
            if step >= w.steps:
                w.phase, w.training_ended = "scoring", w.training_ended or time.monotonic()
            else:
                w.phase = "pruner check" if checking else "training"

    def worker_checked(self, index: int) -> None:
        with self.lock:
            if index in self.workers and self.workers[index].phase == "pruner check":
                self.workers[index].phase = "training"

    def worker_scored(self, index: int, done: int, of: int) -> None:
        with self.lock:
            w = self.workers.get(index)
            if w is not None:
                w.phase, w.scored = "scoring", (done, of)
                w.training_ended = w.training_ended or time.monotonic()

    def worker_ended(self, index: int, *, completed: bool) -> None:
        with self.lock:
            w = self.workers.pop(index, None)
            if completed and w is not None and w.training_ended is not None:
                self.scoring_seconds.append(time.monotonic() - w.training_ended)

    def counts(self, counts: StudyCounts) -> None:
        with self.lock:
            self.study = counts

    def panel(self) -> Any:
        """The live panel: a row per worker, then the study's line."""
        with self.lock:
            table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
            for name in ("worker", "trial", "phase", "step", "loss", "elapsed", "left"):
                table.add_column(name, justify="right" if name != "phase" else "left")
            now = time.monotonic()
            for index in sorted(self.workers):
                w = self.workers[index]
                table.add_row(*self._row(index, w, now))
            s = self.study
            line = Text(
                f"{s.phase}: {s.finished} of {s.target} trials finished; {s.pruned} pruned, "
                f"{s.failed} failed, {s.infeasible} infeasible; best feasible {s.best}"
            )
            return Group(table, line)

    def _row(self, index: int, w: WorkerState, now: float) -> tuple[str, ...]:
        phase = f"{w.phase} ({w.replica})" if w.replica else w.phase
        if w.scored is not None:
            phase += f" {w.scored[0]}/{w.scored[1]} samples"
        loss = f"{w.loss:.4f}" if w.loss is not None else ""
        return (
            str(index),
            str(w.trial),
            phase,
            f"{w.step}/{w.steps}",
            loss,
            _duration(now - w.started),
            _duration(self._left(w, now)),
        )

    def _left(self, w: WorkerState, now: float) -> float | None:
        """Seconds left, estimated: the steps to go at the pace so far, then scoring as long as
        this run's completed trials took (or, scoring in blocks, at its pace so far)."""
        scoring = (
            sum(self.scoring_seconds) / len(self.scoring_seconds) if self.scoring_seconds else None
        )
        if w.training_ended is None:
            if w.step == 0:
                return None
            training = (now - w.started) / w.step * (w.steps - w.step)
            return training + (scoring or 0.0)
        spent = now - w.training_ended
        if w.scored is not None and w.scored[0]:
            return spent / w.scored[0] * (w.scored[1] - w.scored[0])
        return max(0.0, scoring - spent) if scoring is not None else None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"
