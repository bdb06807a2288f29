"""The scheduler of one `run`: a thread per trial worker claims a slot under the study's total,
runs a trial in its worker, and records the outcome in Optuna and MLflow; signals become
interrupts that stop every trial and leave each recorded as interrupted (retried by the next run).
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from aurora_sweep.config.recipe import lead_suffix
from aurora_sweep.config.study import StudyConfig
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.processes import this_process
from aurora_sweep.sweep.link import TrialLink
from aurora_sweep.sweep.live import StudyCounts, Watch
from aurora_sweep.sweep.outcomes import Complete, Recorder
from aurora_sweep.sweep.records import (
    BASE_MSE,
    TrialRecord,
    ranked,
    worst_forgetting,
    write_attrs,
)
from aurora_sweep.sweep.space import sample_trial
from aurora_sweep.sweep.storage import FINISHED, reap_dead_trials, retry_once, sampler, worker_seed
from aurora_sweep.sweep.worker import WorkerCrashed


@dataclass
class Sweep:
    """What the worker threads of one `run` share: the study, MLflow, and the trial budget."""

    config: StudyConfig
    study: optuna.Study
    client: Any
    experiment: str
    parent: str
    watch: Watch
    grid: tuple[int, int]
    total: int
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    asking: threading.Lock = field(default_factory=threading.Lock)  # see `claim`
    signum: int = signal.SIGINT
    errors: list[BaseException] = field(default_factory=list)
    #: True: the finalists' replicas run, `total` counts them; False: the search's trials
    replicas: bool = False
    running: int = 0  # worker threads not ended yet
    failures_in_a_row: int = 0  # trials of this process that failed, since the last finished
    ended: threading.Event = field(default_factory=threading.Event)  # all of them have
    #: what every trial trains and is scored on, as MLflow dataset inputs (`data.lineage`)
    datasets: list[dict] = field(default_factory=list)

    def run(self, pool: list) -> None:
        """Run `pool`'s workers, one thread each, until the study holds the total."""
        threads = [
            threading.Thread(target=self.work, args=(w, i), name=f"trial-worker-{i}", daemon=True)
            for i, w in enumerate(pool)
        ]
        self.running = len(threads)
        self.watch.counts(self.study_counts(self.study))
        # wait on an event, not Thread.join: a signal that interrupts join() can leave the
        # thread marked as ended while it is still settling its trial
        try:
            with signals_as_interrupts():
                for t in threads:
                    t.start()
                while not self.ended.wait(0.5):
                    pass
        except KeyboardInterrupt as e:
            # stop every trial now: each thread records its trial as interrupted
            self.signum = getattr(e, "signum", signal.SIGINT)
            self.stop.set()
            for w in pool:
                w.interrupt()
            self.ended.wait(timeout=60)
            raise Interrupted(self.signum) from None
        if self.errors:
            raise self.errors[0]

    def work(self, worker, index: int) -> None:
        """One worker's loop (a thread): claim a trial, run it, until the total is reached."""
        study = optuna.load_study(
            study_name=self.config.name,
            storage=self.study._storage,
            sampler=sampler(worker_seed(self.config, self.study, index)),
            pruner=self.study.pruner,
        )
        held = {"asking": False}  # this thread holds `asking`: its trial does not exist yet

        def release() -> None:
            if held["asking"]:
                held["asking"] = False
                self.asking.release()

        def objective(trial: optuna.Trial) -> float | tuple[float, float]:
            release()  # the trial exists (RUNNING): the next claim here counts it
            try:
                return self.run_trial(trial, worker, index)
            except KeyboardInterrupt:
                write_attrs(trial, interrupted=True)
                raise

        try:
            while self.claim():
                held["asking"] = True
                try:
                    # the model lives in the worker process: a full collection of this
                    # process's heap after every trial (Optuna's gc_after_trial) freed nothing
                    # and took 0.5 s a trial
                    study.optimize(
                        objective,
                        n_trials=1,
                        catch=(Exception,),
                        gc_after_trial=False,
                        callbacks=[self.settle],
                    )
                finally:
                    release()
        except KeyboardInterrupt:
            pass  # the trial is recorded as interrupted; `run` re-raises in the main thread
        except BaseException as e:
            self.errors.append(e)
            self.stop.set()
        finally:
            release()
            worker.close(at_once=self.stop.is_set())
            with self.lock:
                self.running -= 1
                if self.running == 0:
                    self.ended.set()

    def claim(self) -> bool:
        """True when this worker may start a trial: the study's finished and running trials,
        here and in any other process, leave room under the total. When the rest are running,
        wait for them (one may fail and need replacing) rather than overshoot.

        On True the caller holds `asking` until its trial exists: the threads of one process
        create trials one at a time, so two never count the same free slot, nor take the same
        waiting (retried) trial, which SQLite's transactions would let them do.
        """
        while not self.stop.is_set():
            self.asking.acquire()
            phase = self.replicas  # what `finished` counts, for this pass
            states = [t.state for t in self.study.get_trials(deepcopy=False) if self.counts(t)]
            finished = sum(state in FINISHED for state in states)
            if finished >= self.total:
                self.asking.release()
                if not phase and self.begin_finalists():
                    continue
                return False
            if finished + states.count(optuna.trial.TrialState.RUNNING) < self.total:
                return True
            self.asking.release()
            self.stop.wait(2.0)
            with self.lock, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # fail_stale_trials is marked experimental
                optuna.storages.fail_stale_trials(self.study)
                reap_dead_trials(self.study, self.client)
        return False

    def begin_finalists(self) -> bool:
        """Once the search holds its total: enqueue the finalists' replicas (`finalists`) and
        count them from now on, in every thread of this run; False when there are none."""
        from aurora_sweep.sweep.finalists import enqueue_replicas, finalists

        with self.lock:
            if self.replicas:
                return True  # another thread began them since this one counted
            wanted = enqueue_replicas(self.study, self.config)
            if not wanted:
                return False
            chosen = finalists(self.config, self.study.get_trials(deepcopy=False))
            self.watch.say(
                f"finalists: trials {', '.join(str(t.number) for t in chosen)}, trained again "
                f"with {self.config.seeds - 1} more seed(s) each ({wanted} replicas)"
            )
            self.replicas, self.total = True, wanted
            self.watch.counts(self.study_counts(self.study))
            return True

    def counts(self, trial: optuna.trial.FrozenTrial) -> bool:
        """Whether `trial` counts towards `total`: a replica in the finalists' phase, a trial of
        the search otherwise (`--trials` counts those alone)."""
        return (TrialRecord.of(trial).replica_of is not None) == self.replicas

    def keep_base_scores(self, by_precision: dict[str, dict[str, float]]) -> None:
        """Add the base model's scores in a precision no trial had used yet to the study's
        (a worker scores the base in a trial's precision when the first such trial comes)."""
        with self.lock:
            known = self.study.user_attrs.get(BASE_MSE, {})
            if set(by_precision) - set(known):
                self.study.set_user_attr(BASE_MSE, known | by_precision)

    def settle(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """After each trial of this process: count failures in a row, and stop the run after
        `max_failures` of them (a study that cannot succeed must not spin)."""
        self.watch.counts(self.study_counts(study))
        failed = trial.state == optuna.trial.TrialState.FAIL
        error = TrialRecord.of(trial).error if failed else None
        if error is not None:
            with self.lock:
                self.failures_in_a_row += 1
                if self.failures_in_a_row < self.config.max_failures or self.stop.is_set():
                    return
                self.errors.append(
                    AuroraSweepError(
                        f"{self.failures_in_a_row} trials failed in a row, the last (trial "
                        f"{trial.number}) because {error}; fix that and run "
                        "again (finished trials are kept), or raise [study] max_failures"
                    )
                )
                self.stop.set()
        elif trial.state in FINISHED:
            with self.lock:
                self.failures_in_a_row = 0

    def study_counts(self, study: optuna.Study) -> StudyCounts:
        """The study's line of the live view: this phase's trials finished of its total, how
        the search's trials ended, the best feasible so far."""
        trials = study.get_trials(deepcopy=False)
        pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
        infeasible = sum(TrialRecord.of(t).infeasible is not None for t in pruned)
        best = next(iter(ranked(trials)), None)
        return StudyCounts(
            finished=sum(t.state in FINISHED for t in trials if self.counts(t)),
            target=self.total,
            pruned=len(pruned) - infeasible,
            failed=sum(t.state == optuna.trial.TrialState.FAIL for t in trials),
            infeasible=infeasible,
            best=(
                f"trial {best.number}, {self.config.objective_metric} {best.values[0]:.4f}"
                if best is not None
                else "none yet"
            ),
            phase="finalists" if self.replicas else "search",
        )

    def surplus(self, trial: optuna.Trial) -> bool:
        """True when the trials finished and those started before this one fill the total (two
        processes claimed the last slot at once: the later trial, by number, steps back)."""
        finished = ahead = 0
        for t in self.study.get_trials(deepcopy=False):
            if not self.counts(t):
                continue
            finished += t.state in FINISHED
            ahead += t.state == optuna.trial.TrialState.RUNNING and t.number < trial.number
        return finished + ahead >= self.total

    def say_complete(self, trial: optuna.Trial, outcome: Complete, estimate) -> None:
        """The completed trial's line: its score, time and memory (a replica: whose, which seed)."""
        record = TrialRecord.of(trial)
        replica = (
            f"  (finalist {record.replica_of}, seed {record.seed})"
            if record.replica_of is not None
            else ""
        )
        self.watch.say(
            f"trial {trial.number:3d}  {_score_line(outcome.metrics, self.config)}  "
            f"({outcome.seconds:.1f} s, {outcome.peak_memory_mb:.0f} MB, predicted GPU "
            f"{estimate.megabytes:.0f} MB){replica}"
        )

    def run_trial(self, trial: optuna.Trial, worker, index: int = 0) -> float | tuple[float, float]:
        """Sample `trial`, check its predicted memory against the cap, run it in `worker` (the
        `index`th of this run's) and record how it ended (`outcomes.Recorder`)."""
        completed = False
        try:
            value = self._run_trial(trial, worker, index)
            completed = True
            return value
        finally:
            self.watch.worker_ended(index, completed=completed)

    def _run_trial(self, trial: optuna.Trial, worker, index: int) -> float | tuple[float, float]:
        from aurora_sweep.sweep.tracking import log_datasets, trial_run

        config = self.config
        recorder = Recorder(config, say=self.watch.say)
        if self.surplus(trial):
            # another process took the last slot in the same instant: give it back unused
            write_attrs(trial, surplus=True)
            raise Surplus(f"the study already holds or runs its {self.total} trials")
        # the process, to tell later whether it was killed; then the whole recipe, sampled or
        # not, with its checkpointing planned
        write_attrs(trial, **this_process())
        tc, estimate = self.plan(sample_trial(trial, config))
        write_attrs(trial, config=tc.to_dict())
        replica = self.follow(trial, tc, index)
        with trial_run(
            self.client,
            self.experiment,
            parent=self.parent,
            number=trial.number,
            tags={
                "host": socket.gethostname(),
                "device": worker.info.device if worker.info else "",
            },
            system_metrics=config.system_metrics,
        ) as run:
            write_attrs(trial, mlflow_run_id=run.run_id, mlflow_parent_run_id=self.parent)
            if self.datasets:
                log_datasets(self.client, run.run_id, self.datasets)
            run.log_params(tc.to_dict())
            self.predict(trial, estimate, run, recorder)
            run.flush()  # the config is in MLflow while the trial trains

            link = TrialLink(
                config, trial, run, self.watch, index, tc.eval_every, tc.steps, replica
            )
            with tempfile.TemporaryDirectory() as tmp:
                adapter = Path(tmp) / "adapter"
                try:
                    outcome = worker.run(
                        tc.to_dict(), adapter, link.report, link.scored, link.progress
                    )
                except WorkerCrashed as e:
                    raise self.crashed(trial, e, recorder) from None
                scalars = recorder.record(outcome, trial, run)
                assert isinstance(outcome, Complete)
                self.keep_base_scores(outcome.base_mse)
                run.log_artifacts(adapter.parent)  # adapter/ and figures/, in one call
        self.say_complete(trial, outcome, estimate)
        value = outcome.metrics[config.objective_metric]
        if config.cost:
            return value, scalars.get(config.cost, estimate.megabytes)
        return value

    def follow(self, trial: optuna.Trial, tc, index: int) -> bool:
        """Show `trial` in the live view as the `index`th worker's; whether it is a finalist's
        replica."""
        record = TrialRecord.of(trial)
        replica = record.replica_of is not None
        whose = f"finalist {record.replica_of}, seed {record.seed}" if replica else ""
        self.watch.worker_started(index, trial.number, tc.steps, whose)
        return replica

    def plan(self, tc):
        """The trial's recipe with "auto" checkpointing made concrete and, under a cap, its
        scoring batch chosen (`memory`); its predicted peak GPU memory, training's or
        scoring's, whichever is larger."""
        from aurora_sweep.memory.estimate import plan_checkpointing
        from aurora_sweep.memory.scoring_peak import combined, plan_scoring

        cap, how = self.config.gpu_memory_cap, self.config.estimate_how
        levels = len(tc.levels)
        tc, train = plan_checkpointing(tc, grid=self.grid, levels=levels, cap_bytes=cap, how=how)
        batch, scoring = plan_scoring(tc, grid=self.grid, levels=levels, cap_bytes=cap, how=how)
        if cap is not None:  # without one, the worker's device decides (`eval_batch_size`)
            tc = dataclasses.replace(tc, eval_batch=batch)
        return tc, combined(train, scoring)

    def predict(self, trial: optuna.Trial, estimate, run, recorder: Recorder) -> None:
        """Record the trial's predicted peak GPU memory; a prediction over the cap makes the
        trial infeasible before it runs (raised)."""
        from aurora_sweep.memory.estimate import MIB, check_cap

        write_attrs(trial, predicted_peak_mb=estimate.megabytes)
        total, parts = estimate.megabytes, estimate.parts
        train = parts["training_total"] / MIB if "training_total" in parts else total
        scoring = parts["scoring_total"] / MIB if "scoring_total" in parts else total
        run.log_metrics(
            {
                "predicted_peak_mb": total,
                "predicted_train_peak_mb": train,
                "predicted_scoring_peak_mb": scoring,
            }
        )
        run.log_params({"memory_estimate": estimate.method})
        if estimate.note:
            self.watch.say(f"trial {trial.number:3d}  memory estimate: {estimate.note}")
        cap = self.config.gpu_memory_cap
        over = check_cap(estimate, cap)
        if over > 0:
            raise recorder.infeasible(
                trial,
                run,
                f"predicted peak {estimate.megabytes:.0f} MB exceeds the cap {cap / MIB:.0f} MB",
                over,
                0.0,
            )

    def crashed(self, trial: optuna.Trial, e: WorkerCrashed, recorder: Recorder) -> BaseException:
        """The worker died under `trial`: a signal to this process group is an interrupt; a
        crash of its own is the config's fault (not retried); a kill from outside (the OOM
        killer, kill -9) is retried once, elsewhere. Returns the exception to raise."""
        from aurora_sweep.sweep.tracking import Killed

        if self.stop.wait(2.0):  # the signal also reached this process: `run` is stopping
            return Interrupted(self.signum)
        if e.signal is None:
            return recorder.failed(trial, f"{e}; starting a new worker")
        write_attrs(trial, killed_by=e.signal)
        retried = retry_once(self.study, self.study.get_trials(deepcopy=False)[trial.number])
        self.watch.say(
            f"trial {trial.number:3d}  {e}"
            + ("; retrying it once in a new worker" if retried else "")
        )
        return Killed(str(e))


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (Ctrl-C, a scheduler's preemption); `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` in the main thread, so the study can end its trial
    and every MLflow run it opened before the process exits. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _score_line(m: dict[str, float], config: StudyConfig) -> str:
    """One line of a trial's verdict at the study's lead: objective with its interval, skills,
    and ✗ with the variable when it forgets beyond `[study] max_forgetting` (as `best` marks
    it: never the study's answer)."""
    objective = config.objective.at(config.lead_steps)
    persistence, climatology = (objective.skill(r) for r in ("persistence", "climatology"))
    lo, hi = m.get(objective.of("q05")), m.get(objective.of("q95"))
    interval = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
    worst = worst_forgetting(m, lead_suffix(config.lead_steps))
    forgets = (
        f"  ✗ forgets {worst[0]} ×{worst[1]:.2f} (max ×{config.max_forgetting:g}): never the answer"
        if worst is not None and worst[1] > config.max_forgetting
        else ""
    )
    return (
        f"{config.objective_metric} {m[config.objective_metric]:.3f}{interval}  skill vs "
        f"persistence {m[persistence]:+.3f}, vs climatology {m[climatology]:+.3f}{forgets}"
    )


class Surplus(RuntimeError):
    """A trial started when the study's total was already taken (recorded FAIL, never run)."""
