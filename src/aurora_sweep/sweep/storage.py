"""The study's storage: Optuna's, opened (or created once, whoever races), and the trials a dead
process left behind found, failed and retried.

SQLite, a journal file or a database server (PostgreSQL, MySQL): database storage gets heartbeats,
so a trial whose machine died is failed when another worker next looks. A trial records its host,
pid and the pid's start time, so that a process killed with SIGKILL is noticed on its own host
at once (`reap_dead_trials`).
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna

from aurora_sweep.config.study import StudyConfig
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.processes import alive
from aurora_sweep.sweep.records import TrialRecord, attrs

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def sampler(seed: int) -> optuna.samplers.TPESampler:
    """Multivariate TPE over the conditional space (`group`: one model per set of parameters
    that appear together), and the constant liar so that workers avoid what others run."""
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=8, multivariate=True, group=True, constant_liar=True
    )


def study_pruner(config: StudyConfig) -> optuna.pruners.MedianPruner:
    """The median pruner, never at a trial's first evaluation: reports come every `eval_every`
    steps and the warm-up lasts past the first, so a trial is judged on at least two (a recipe
    that starts slowly, LoRA with its zero-initialised B say, is not cut for starting slowly)."""
    return TrainedMedianPruner(n_startup_trials=6, n_warmup_steps=config.train.eval_every + 1)


class TrainedMedianPruner(optuna.pruners.MedianPruner):
    """Optuna's median pruner over every trial that trained to its last step: the completed
    ones and those whose scoring stopped (`verify.early_stop`, pruned with a `partial` score).
    Their curves are whole; left out, the median would be that of the trials good enough to
    be scored whole, and every later trial would be judged against the best alone."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return super().prune(_Trained(study), trial)


class _Trained:
    """A study whose completed trials include those whose scoring stopped."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def get_trials(self, deepcopy: bool = True, states=None) -> list:
        done = optuna.trial.TrialState.COMPLETE
        if states is None or tuple(states) != (done,):
            return self._study.get_trials(deepcopy=deepcopy, states=states)
        pruned = optuna.trial.TrialState.PRUNED
        trials = self._study.get_trials(deepcopy=deepcopy, states=(done, pruned))
        return [t for t in trials if t.state == done or "partial" in t.user_attrs]


def open_study(
    config: StudyConfig,
    *,
    create: bool = True,
    seed: int | None = None,
    on_stale: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    on_create: Callable[[optuna.Study], None] | None = None,
) -> optuna.Study:
    """The study in its storage (created once, even when workers race to create it).

    Database storage gets heartbeats: a trial whose process or machine died is failed when a
    worker next looks, and `on_stale` is called for it (end its MLflow run, retry it).
    `on_create` runs in the one process whose call created the study (the storage refuses a
    second study of the same name), so what it adds, the reference trials, is added once.
    """
    storage = _storage(config, on_stale)
    tpe = sampler(config.sampler_seed if seed is None else seed)
    pruner = study_pruner(config)
    for attempt in range(5):
        try:
            created = False
            if create:
                try:
                    study = optuna.create_study(
                        study_name=config.name,
                        storage=storage,
                        sampler=tpe,
                        pruner=pruner,
                        directions=["minimize"] * len(config.objectives),
                    )
                    created = True
                except optuna.exceptions.DuplicatedStudyError:
                    pass  # it exists: load it
            if not created:
                study = optuna.load_study(
                    study_name=config.name, storage=storage, sampler=tpe, pruner=pruner
                )
            study = _same_objectives(study, config)
            if created and on_create is not None:
                on_create(study)
            return study
        except KeyError:
            raise AuroraSweepError(
                f"no study named {config.name!r} in {storage_label(config.storage)}: "
                "run 'aurora-sweep run' first (with the same --storage)"
            ) from None
        except optuna.exceptions.DuplicatedStudyError:
            time.sleep(0.2 * (attempt + 1))  # created by another worker a moment ago: load it
    raise AuroraSweepError(f"could not open study {config.name!r} in {config.storage}")


def _same_objectives(study: optuna.Study, config: StudyConfig) -> optuna.Study:
    """The study, its objectives named; refused when it was made with other objectives."""
    names = list(config.objectives)
    if len(study.directions) != len(names) or study.metric_names not in (None, names):
        made = study.metric_names or [f"{len(study.directions)} objective(s)"]
        raise AuroraSweepError(
            f"study {config.name!r} in {storage_label(config.storage)} minimises "
            f"{', '.join(made)}, not {', '.join(names)}: give the study a new [study] name, "
            "or put [study] objective and [model] target back"
        )
    if study.metric_names is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # set_metric_names is marked experimental
            study.set_metric_names(names)
    return study


def _storage(config: StudyConfig, on_stale) -> Any:
    url = config.storage
    if not url.startswith(("sqlite", "postgresql", "mysql")):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url))
    import sqlalchemy.exc

    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    # idle connections die during hour-long trials: test each before use
                    engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=config.heartbeat_seconds,
                    grace_period=3 * config.heartbeat_seconds,
                    heartbeat_stale_trial_callback=on_stale,
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            time.sleep(0.5 * (attempt + 1))  # another worker is creating the tables
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as e:
            reason = str(e.orig if hasattr(e, "orig") else e).strip().splitlines()[0]
            raise AuroraSweepError(
                f"cannot open the study storage {storage_label(url)}: {reason}; check that the "
                "database server runs and the URL (user, host, port, database) is right"
            ) from None
        except ModuleNotFoundError as e:
            raise AuroraSweepError(
                f"storage {storage_label(url)} needs the Python driver {e.name!r}: "
                "use postgresql+psycopg://… (psycopg is installed with aurora-sweep)"
            ) from None
    raise AuroraSweepError(f"could not create the study tables in {storage_label(url)}")


def storage_label(url: str) -> str:
    """The storage URL without its password, for messages and MLflow tags."""
    if "://" in url and "@" in url:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    return url


def worker_seed(config: StudyConfig, study: optuna.Study, index: int) -> int:
    """A sampler seed per worker and per invocation, so that workers (and a resumed run) do not
    propose the same configs. One process on SQLite is reproducible from the config's seed;
    processes sharing a journal or a database also mix in their host and pid."""
    single = config.storage.startswith("sqlite")
    trials = len(study.get_trials(deepcopy=False))
    if single and trials == 0 and index == 0:
        return config.sampler_seed  # a fresh study, first worker: as the config says
    parts = [config.sampler_seed, trials, index]
    if not single:
        parts += [socket.gethostname(), os.getpid()]
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big")


def reap_dead_trials(study: optuna.Study, client) -> list[int]:
    """Fail the trials that a process on this machine left RUNNING when it was killed.

    SIGKILL (a scheduler's hard limit, the OOM killer) gives a process no chance to settle its
    trial: Optuna keeps it RUNNING and MLflow keeps its run RUNNING, forever. A trial records
    its host, pid and the pid's start time; a RUNNING trial of this host whose process is gone
    is marked FAIL, its MLflow run is ended as KILLED, and it is retried once. Trials of other
    hosts are left to the database's heartbeats (`_retry_stale`).
    """
    from aurora_sweep.sweep.tracking import end_runs

    host = socket.gethostname()
    reaped = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        record = TrialRecord.of(t)
        if record.host != host or alive(record.pid, record.pid_started):
            continue
        try:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another process settled it a moment ago
        end_runs(client, [record.mlflow_run_id])
        retry_once(study, t)
        reaped.append(t.number)
    return reaped


def _retry_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial, *, client) -> None:
    """A trial whose heartbeat stopped (its process or machine died) was failed by Optuna:
    end its MLflow run as KILLED and retry it once."""
    from aurora_sweep.sweep.tracking import end_runs

    end_runs(client, [TrialRecord.of(trial).mlflow_run_id])
    retry_once(study, trial)


def retry_once(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """Enqueue `trial` again with the same parameters, unless it is itself a retry or has been
    retried already: a trial that kills its process every time is not retried forever."""
    record = TrialRecord.of(trial)
    replica = record.replica_of is not None
    if record.retry_of is not None or not (trial.params or record.reference or replica):
        return False
    if any(TrialRecord.of(t).retry_of == trial.number for t in study.get_trials(deepcopy=False)):
        return False
    # a finalist's replica keeps what makes it one: its finalist, seed and recipe
    again = attrs(retry_of=trial.number, reference=record.reference)
    if replica:
        again |= attrs(replica_of=record.replica_of, seed=record.seed, config=record.config)
    study.enqueue_trial(trial.params, user_attrs=again)
    return True


def retry_interrupted(study: optuna.Study) -> list[int]:
    """Enqueue once, with the same parameters, every trial a signal interrupted."""
    return [
        t.number
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
        if TrialRecord.of(t).interrupted and retry_once(study, t)
    ]
