"""Run trials in a worker process: memory capped, released between trials, replaced on a crash.

A sweep is hours of trials in a row. Running each in the study's own process would let one
trial's CUDA allocations, fragmentation or a crash leak into the next. So trials run in a
separate process that pays the import of torch + aurora + peft and the data load once, trains
trial after trial with `torch.cuda.set_per_process_memory_fraction` set from the cap, and reports
back over a pipe. After an out-of-memory error, or if the process dies, it is replaced; the next
trial starts in a fresh process with nothing left over.

Each completed trial leaves its adapter in `adapter_dir` and its figures (PNG) in the folder
`figures` beside it.

Messages (dataclasses of `outcomes`), parent -> worker: `Start` first (a worker may be launched
before the data exist, and imports torch meanwhile), `RunTrial`, a `Verdict` in answer to each
report, `Stop`. Worker -> parent: `Ready` (or `StartFailed`), a `Report` at each evaluation, and
one outcome per trial, an `outcomes.Complete`, `Pruned`, `OutOfMemory` or `Failed`.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.sweep import outcomes
from aurora_sweep.sweep.outcomes import (
    Complete,
    Failed,
    OutOfMemory,
    Pruned,
    Ready,
    Report,
    RunTrial,
    Start,
    StartFailed,
    Stop,
    Verdict,
)
from aurora_sweep.sweep.process_setup import (
    blosc_thread_lock,
    cuda_visible,
    exit_on_sigterm,
    exit_with_parent,
)

if TYPE_CHECKING:  # imported where they are used: a worker launched early imports torch first
    import torch

    from aurora_sweep.config.study import StudyConfig
    from aurora_sweep.data.trial_data import TrialData


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to rebuild the study's data and model on its side."""

    config_path: Path
    workdir: Path
    checkpoint: Path | None
    memory_cap: int | None
    extra: dict[str, Any] | None = None  # saved with each adapter (the data description)
    #: The base model's MSE per variable on the validation split by precision, then by lead,
    #: as far as the study already has it (each precision computed once, by the first worker
    #: whose trial needs it: a trial is compared with the base run in its own precision).
    base_mse: dict[str, dict[str, dict[str, float]]] | None = None
    #: The zero-shot Aurora 1.5 baseline's scores by lead, once the study has them
    #: (`zero_shot.references_of`): a worker given them does not run Aurora 1.5
    aurora15: dict[str, dict] | None = None
    #: The training function, sent to the worker by reference (`train.fit` when None): the
    #: seam through which tests make a trial run out of memory or kill its worker.
    fit: Callable[..., Any] | None = None
    #: The GPU this worker trains on (CUDA_VISIBLE_DEVICES), None for the default device.
    gpu: int | None = None
    #: CPU threads for torch when training on the CPU (the cores split between workers).
    threads: int | None = None


class WorkerCrashed(RuntimeError):
    """The worker process died while running a trial."""

    def __init__(self, exitcode: int | None) -> None:
        import signal

        self.exitcode = exitcode
        #: The signal that killed it from outside (SIGKILL: the OOM killer, `kill -9`), if any.
        self.signal = (
            signal.Signals(-exitcode).name if exitcode is not None and exitcode < 0 else None
        )
        super().__init__(
            f"the trial worker was killed by {self.signal}"
            if self.signal
            else f"the trial worker died (exit code {exitcode})"
        )


class TrialWorker:
    """A worker process that runs one trial at a time; restarts itself when it has to."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        # spawn, not fork: a forked child of a process that has run torch can hang in OpenMP
        self.context = mp.get_context("spawn")
        self.process: mp.process.BaseProcess | None = None
        self.conn = None
        #: what the worker said when it was last ready (None before)
        self.info: Ready | None = None
        self.starts = 0

    def launch(self) -> None:
        """Start the process, which imports torch, Aurora and peft (seconds) and then waits for
        `start`: the study process can make the data meanwhile."""
        parent, child = self.context.Pipe()
        self.process = self.context.Process(target=serve, args=(child, self.spec), daemon=True)
        self.process.start()
        child.close()
        self.conn = parent
        self.starts += 1

    def start(self) -> Ready:
        """Have the worker (launched now if it was not) load the data and the base model's
        scores; what it says when ready."""
        if self.process is None or self.conn is None:
            self.launch()
        assert self.conn is not None
        try:
            self.conn.send(Start(self.spec.base_mse, self.spec.aurora15))
        except (BrokenPipeError, OSError):
            pass  # it died while importing: _receive reports how
        message = self._receive(timeout=None)
        if isinstance(message, StartFailed):
            self.close()
            raise AuroraSweepError(message.message)
        self.info = message
        return message

    def _receive(self, timeout: float | None) -> Ready | StartFailed | Report | outcomes.Outcome:
        assert self.conn is not None and self.process is not None
        waited = 0.0
        while not self.conn.poll(0.2):
            waited += 0.2
            if not self.process.is_alive():
                code = self.process.exitcode
                self.close()
                raise WorkerCrashed(code)
            if timeout is not None and waited > timeout:
                raise TimeoutError("the trial worker did not answer")
        try:
            return self.conn.recv()
        except (EOFError, ConnectionResetError):
            self.process.join(timeout=10)  # reap it, to report how it ended
            code = self.process.exitcode
            self.close()
            raise WorkerCrashed(code) from None

    def run(
        self,
        trial: dict[str, Any],
        adapter_dir: Path,
        report: Callable[[int, float], bool],
        scored: Callable[[outcomes.Scored], bool] = lambda _: False,
        progress: Callable[[outcomes.Progress], None] = lambda _: None,
    ) -> outcomes.Outcome:
        """Run one trial; `report(step, value)` returns True to prune it, `scored(message)` True
        to stop scoring it (`outcomes.Scored`); `progress` is given its training curve as it
        grows (`outcomes.Progress`)."""
        if self.process is None or not self.process.is_alive():
            self.start()
        assert self.conn is not None
        self.conn.send(RunTrial(trial, str(adapter_dir)))
        while True:
            message = self._receive(timeout=None)
            if isinstance(message, Report):
                self.conn.send(Verdict(prune=report(message.step, message.value)))
                continue
            if isinstance(message, outcomes.Scored):
                self.conn.send(Verdict(prune=scored(message)))
                continue
            if isinstance(message, outcomes.Progress):
                progress(message)
                continue
            outcome = message
            if getattr(outcome, "restart", False):
                self.close()  # the next trial gets a fresh process and a clean allocator
            return outcome

    def interrupt(self) -> None:
        """Stop the running trial now (from another thread): the worker process exits and the
        thread waiting on it sees it gone."""
        process = self.process
        if process is not None and process.is_alive():
            process.terminate()  # SIGTERM: the worker exits normally, mid-trial

    def close(self, *, at_once: bool = False) -> None:
        """Stop the worker: ask it to finish (it does so between trials), or kill it at once."""
        if (
            not at_once
            and self.conn is not None
            and self.process is not None
            and self.process.is_alive()
        ):
            try:
                self.conn.send(Stop())
                self.process.join(timeout=30)  # one launched a moment ago is still importing
            except (BrokenPipeError, OSError):
                pass
        if self.process is not None and self.process.is_alive() and at_once:
            self.process.terminate()  # SIGTERM: the worker exits normally, mid-trial
            self.process.join(timeout=10)
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.process, self.conn = None, None

    def __enter__(self) -> TrialWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(conn, spec: WorkerSpec) -> None:
    """The worker's main loop (runs in the child process)."""
    exit_with_parent()
    # Ctrl-C reaches the whole process group: the study process handles it and stops this one,
    # with SIGTERM, which ends the trial by a normal exit (finalisers run, nothing is leaked)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    if spec.gpu is not None:  # before CUDA starts: this worker sees its GPU as cuda:0
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible(
            spec.gpu, os.environ.get("CUDA_VISIBLE_DEVICES")
        )
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    # what the first trials import (seconds), while the study process makes the data
    import peft  # noqa: F401

    import aurora_sweep.train.fit  # noqa: F401
    import aurora_sweep.verify.plots  # noqa: F401
    from aurora_sweep.config.recipe import TrialConfig

    blosc_thread_lock()

    # the study process may still be making the data: wait for its word (and the base model's
    # scores it has by then)
    start = conn.recv()
    if not isinstance(start, Start):
        return
    try:
        given = dataclasses.replace(spec, base_mse=start.base_mse, aurora15=start.aurora15)
        session = _Session.open(given)
    except AuroraSweepError as e:
        conn.send(StartFailed(str(e)))
        return
    conn.send(session.info())
    while True:
        message = conn.recv()
        if not isinstance(message, RunTrial):  # Stop
            return
        trial = TrialConfig.from_dict(message.trial)
        if not session.run(conn, trial, Path(message.adapter_dir)):
            return  # a fresh process replaces this one: nothing leaks into the next trial


def _cap_memory(device: torch.device, memory_cap: int | None) -> None:
    """Hold this process to the study's memory cap on a GPU (`cuda_memory_fraction`)."""
    import torch

    if device.type == "cuda" and memory_cap:
        from aurora_sweep.memory.estimate import cuda_memory_fraction

        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(cuda_memory_fraction(memory_cap, total), device)


def _check_data(data: TrialData, config: StudyConfig) -> None:
    """Refuse now, not trial after trial, an objective the evaluation split cannot define and a
    rollout the train split is too short for."""
    from aurora_sweep.verify.objective import check_objective_defined

    check_objective_defined(data)
    for steps in config.search.rollout_steps:
        data.train_for(steps)


@dataclass
class _Session:
    """What a worker keeps from trial to trial: the study's data, device and base checkpoint."""

    spec: WorkerSpec
    config: StudyConfig
    data: TrialData
    device: torch.device
    checkpoints: dict[str, Path] = field(default_factory=dict)  # by base
    #: the zero-shot Aurora 1.5 baseline's scores by lead (`zero_shot.references_of`), if any
    zero_shot: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def open(cls, spec: WorkerSpec) -> _Session:
        """Load the study's data and score the base model in the first precision searched."""
        from aurora_sweep.config.study_file import load_config
        from aurora_sweep.devices import default_device
        from aurora_sweep.verify.prepare import trial_data
        from aurora_sweep.verify.zero_shot import references_of

        config = load_config(spec.config_path, workdir=spec.workdir)
        device = default_device()
        _cap_memory(device, spec.memory_cap)
        data = trial_data(config, device, zero_shot=spec.aurora15, base_mse=spec.base_mse)
        _check_data(data, config)
        session = cls(spec, config, data, device, zero_shot=spec.aurora15 or references_of(data))
        session.base_scores(config.bases[0], config.search.precision[0], config.level_choices[0])
        return session

    def checkpoint_for(self, base: str) -> Path:
        """`base`'s checkpoint file (`--checkpoint` stands for [model] base's), resolved once."""
        from aurora_sweep.model.files import resolve_checkpoint

        if base not in self.checkpoints:
            given = self.config.model.checkpoint_for(base)
            if base == self.config.model.base and self.spec.checkpoint:
                given = self.spec.checkpoint
            self.checkpoints[base] = resolve_checkpoint(base, given)
        return self.checkpoints[base]

    def info(self) -> Ready:
        return Ready(
            train=len(self.data.train),
            validation=len(self.data.validation),
            device=str(self.device),
            checkpoint=str(self.checkpoint_for(self.config.bases[0])),
            base_mse=self.data.base_mse,
            aurora15=self.zero_shot,
        )

    def base_scores(self, base: str, precision: str, levels: tuple[int, ...]) -> None:
        """The base model's scores in `precision` on `levels`, once: when a trial first needs
        them."""
        from aurora_sweep.verify.prepare import score_base

        score_base(
            self.data,
            base=base,
            precision=precision,
            levels=levels,
            checkpoint=self.checkpoint_for(base),
            device=self.device,
            wrap_longitude=self.config.data.wrap_longitude,
            arch=self.config.model.arch_for(base),
        )

    def run(self, conn, trial, adapter_dir: Path) -> bool:
        """Run one trial and send its outcome; False when this process must end (out of
        memory: the allocator may hold on to what the failed trial took)."""
        import torch

        from aurora_sweep.train.fit import fit
        from aurora_sweep.verify.early_stop import ScoringStopped

        started = time.perf_counter()
        live = _Live(conn, trial.steps, trial.eval_every)

        def report(step: int, value: float) -> None:
            live.send()  # the curve up to the check, then the check
            conn.send(Report(step, value))
            verdict: Verdict = conn.recv()
            if verdict.prune:
                raise _Pruned(step, value)

        of = len(self.data.leads[self.data.objective_steps])

        def stop(block) -> bool:
            conn.send(outcomes.Scored.of_block(block, of))
            return conn.recv().prune

        try:
            self.base_scores(trial.base, trial.precision, trial.levels)
            result = (self.spec.fit or fit)(
                trial,
                self.data,
                checkpoint=self.checkpoint_for(trial.base),
                report=report,
                on_step=live.step,
                device=self.device,
                stop=stop,
            )
            conn.send(self.complete(result, trial, adapter_dir))
            del result
        except _Pruned as p:
            conn.send(Pruned(p.step, p.value, time.perf_counter() - started))
        except ScoringStopped as s:
            seconds = time.perf_counter() - started
            conn.send(outcomes.ScoringStopped(s.value, s.days, s.of, seconds, s.metrics))
        except torch.OutOfMemoryError as e:
            cuda = self.device.type == "cuda"
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else 0.0
            seconds = time.perf_counter() - started
            conn.send(OutOfMemory(str(e).splitlines()[0], peak, seconds))
            return False
        except Exception as e:
            failure = f"{type(e).__name__}: {e}"
            conn.send(Failed(failure, traceback=traceback.format_exc()[-4000:]))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return True

    def complete(self, result, trial, adapter_dir: Path) -> Complete:
        """Save a finished trial's adapter and figures beside it; its outcome."""
        from aurora_sweep.model.adapter import save_adapter
        from aurora_sweep.verify.bootstrap import encode_terms
        from aurora_sweep.verify.figures import trial_figures

        config = self.config
        save_adapter(
            adapter_dir,
            model=result.model,
            parts=result.parts,
            trial=trial,
            stats=self.data.stats,
            checkpoint=self.checkpoint_for(trial.base),
            study_config=config.path,
            metrics=result.metrics,
            history={"train_loss": result.train_loss, "val_loss": result.val_loss},
            extra=(self.spec.extra or {}) | {"objective": config.objective.name},
        )
        figures = adapter_dir.parent / "figures"
        figures.mkdir(parents=True, exist_ok=True)
        for name, png in trial_figures(result, self.data).items():
            (figures / name).write_bytes(png)
        terms = result.forecasts.objective_terms
        return Complete(
            metrics=result.metrics,
            train_loss=result.train_loss,
            val_loss=result.val_loss,
            intermediate=result.intermediate,
            peak_memory_mb=result.peak_memory_mb,
            seconds=result.seconds,
            val_terms=result.val_terms,
            objective_terms=encode_terms(*terms, result.forecasts.objective_days),
            peak_reserved_mb=result.peak_reserved_mb,
            loader_wait_fraction=result.loader_wait_fraction,
            base_mse=self.data.base_mse,
        )


#: seconds between two sends of a training trial's curve to the study process (and MLflow)
LIVE_SECONDS = 5.0


class _Live:
    """A training trial's loss by step, sent to the study process every `LIVE_SECONDS`, before
    each pruner check and at the last step (`outcomes.Progress`): batches, not a message per
    step; the study process learns from the step sent that a check or the scoring follows."""

    def __init__(self, conn, steps: int, eval_every: int) -> None:
        self.conn, self.pending, self.sent_at = conn, [], time.monotonic()
        self.steps, self.eval_every = steps, eval_every

    def step(self, step: int, value: float) -> None:
        self.pending.append((step, float(value)))
        ahead = step == self.steps or step % self.eval_every == 0  # scoring or a check next
        if ahead or time.monotonic() - self.sent_at >= LIVE_SECONDS:
            self.send()

    def send(self) -> None:
        if self.pending:
            self.conn.send(outcomes.Progress(self.pending))
            self.pending = []
        self.sent_at = time.monotonic()


class _Pruned(Exception):
    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"pruned at step {step}")
        self.step, self.value = step, value
