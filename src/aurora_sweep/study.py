"""The search: an Optuna study whose trials are fine-tunes, each tracked as an MLflow run.

`run_study` opens (or resumes) the study in its storage, runs trials until the study holds the
requested total, and records each one as a child run under one parent run per invocation. A
trial that fails is recorded and the study goes on. The objective is the study's `objective`
(SEEPS or RMSE of tp) on the whole validation split; the pruner sees the same score on a fixed
subset. The test split is never touched here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import signal
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from rich.console import Console

from aurora_sweep.config import StudyConfig
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.evaluation import worst_forgetting
from aurora_sweep.train import TrialConfig

#: The trials `--trials` counts: a failed or interrupted trial does not use up the total.
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
AURORA_PRETRAINING_END = dt.date(2022, 1, 1)
UI = "http://127.0.0.1:5000"


def sample_trial(trial: optuna.Trial, config: StudyConfig) -> TrialConfig:
    """Draw one trial's configuration from the study's search space."""
    s = config.search
    lr = (
        trial.suggest_float("learning_rate", *s.learning_rate, log=True)
        if s.learning_rate
        else config.train.learning_rate
    )
    return TrialConfig(
        lora_rank=trial.suggest_categorical("lora_rank", list(s.lora_rank)),
        lora_targets=trial.suggest_categorical("lora_targets", list(s.lora_targets)),
        unfrozen_blocks=trial.suggest_categorical("unfrozen_blocks", list(s.unfrozen_blocks)),
        batch_size=trial.suggest_categorical("batch_size", list(s.batch_size)),
        precision=trial.suggest_categorical("precision", list(s.precision)),
        learning_rate=lr,
        activation_checkpointing=trial.suggest_categorical(
            "activation_checkpointing", list(s.activation_checkpointing)
        ),
        base=config.model.base,
        levels=config.data.levels,
        steps=config.train.steps,
        eval_every=config.train.eval_every,
        val_samples=config.train.val_samples,
        weight_decay=config.train.weight_decay,
        seed=config.train.seed,
    )


def open_study(config: StudyConfig, *, create: bool = True) -> optuna.Study:
    """The study in its storage; heartbeats mark trials of a killed process as failed."""
    storage: Any = config.storage
    if storage.startswith(("sqlite", "postgresql", "mysql")):
        storage = optuna.storages.RDBStorage(storage, heartbeat_interval=30, grace_period=90)
    elif storage.endswith((".log", ".journal")):
        from optuna.storages.journal import JournalFileBackend

        storage = optuna.storages.JournalStorage(JournalFileBackend(storage))
    sampler = optuna.samplers.TPESampler(
        seed=config.sampler_seed, n_startup_trials=8, constraints_func=_constraints
    )
    pruner = optuna.pruners.MedianPruner(n_startup_trials=6, n_warmup_steps=0)
    try:
        if create:
            return optuna.create_study(
                study_name=config.name, storage=storage, sampler=sampler, pruner=pruner,
                direction="minimize", load_if_exists=True,
            )  # fmt: skip
        return optuna.load_study(
            study_name=config.name, storage=storage, sampler=sampler, pruner=pruner
        )
    except KeyError:
        raise AuroraSweepError(
            f"no study named {config.name!r} in {config.storage}: run 'aurora-sweep run' first"
        ) from None


def _constraints(trial: optuna.trial.FrozenTrial) -> tuple[float]:
    """> 0 when the trial's memory exceeded the cap (so samplers learn to avoid it)."""
    return (float(trial.user_attrs.get("memory_over_cap_mb", 0.0)),)


def tracking_uri(config: StudyConfig) -> str:
    """MLflow's own default store, made explicit so runs land beside the study."""
    return config.tracking_uri or f"sqlite:///{config.workdir / 'mlflow.db'}"


@dataclass
class StudySummary:
    study: optuna.Study
    new_trials: int
    experiment_id: str
    parent_run_id: str

    @property
    def ui_link(self) -> str:
        return f"{UI}/#/experiments/{self.experiment_id}/runs"


def _data_tags(config: StudyConfig) -> dict[str, str]:
    d = config.data
    r = d.region
    return {
        "data.source": d.source,
        "data.region": f"{r.north}N..{r.south}N, {r.west}E..{r.east}E",
        "data.levels": ",".join(map(str, d.levels)),
        "data.train": f"{d.train.start}..{d.train.end}",
        "data.validation": f"{d.validation.start}..{d.validation.end}",
    }


def _adapter_data(config: StudyConfig) -> dict[str, Any]:
    """The data description each adapter carries (region, levels, splits, grid)."""
    tags = {k.removeprefix("data."): v for k, v in _data_tags(config).items()}
    return tags | {
        "grid": config.data.grid,
        "test": f"{config.data.test.start}..{config.data.test.end}",
    }


def run_study(
    config: StudyConfig,
    *,
    trials: int,
    console: Console | None = None,
    fit: Callable[..., Any] | None = None,
) -> StudySummary:
    """Run (or resume) `config`'s study until it holds `trials` finished trials.

    `fit` replaces `train.fit` inside the trial worker (a picklable top-level function; tests
    use it to simulate out-of-memory errors and crashes).
    """
    console = console or Console(stderr=True)
    import mlflow
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from aurora_sweep.data import open_cube
    from aurora_sweep.dataset import model_longitudes, patch_crop
    from aurora_sweep.memory import MIB, check_cap, estimate_peak
    from aurora_sweep.model import resolve_checkpoint
    from aurora_sweep.worker import TrialWorker, WorkerCrashed, WorkerSpec

    overlap = config.data.train.start < AURORA_PRETRAINING_END and config.model.base != "demo"
    if overlap:
        warnings.warn(
            f"the train period starts {config.data.train.start}, inside Aurora's pretraining "
            "period (ERA5 up to 2021): skill there is not a test of adaptation",
            stacklevel=2,
        )
    # failures are reported in one line each below; Optuna's own warning repeats the traceback
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = open_study(config)
    mlflow.set_tracking_uri(tracking_uri(config))
    client = MlflowClient()
    reaped = reap_dead_trials(study, client)
    if reaped:
        console.print(
            f"trial(s) {', '.join(map(str, reaped))} were left running by a process that no longer "
            "exists (killed): recorded as failed, their MLflow runs ended as KILLED; retrying them"
        )
    retry_interrupted(study)
    done = [t for t in study.trials if t.state in FINISHED]
    todo = max(0, trials - len(done))
    experiment = client.get_experiment_by_name(config.name)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(
            config.name, artifact_location=(config.workdir / "mlruns").as_uri()
        )
    )
    if todo == 0:
        console.print(f"study {config.name!r} already holds {len(done)} trials; nothing to add")
        return StudySummary(study, 0, experiment_id, "")

    # everything that can refuse (data, checkpoint) comes before the first MLflow run
    cube = open_cube(config, console=console)
    grid = patch_crop(cube.sizes["latitude"], cube.sizes["longitude"])
    _, lon_shift = model_longitudes(cube["longitude"].values)
    resolve_checkpoint(config.model.base, config.model.checkpoint)
    cap = config.gpu_memory_cap
    worker = TrialWorker(
        WorkerSpec(
            config_path=config.path, workdir=config.workdir, checkpoint=config.model.checkpoint,
            memory_cap=cap, extra={"data": _adapter_data(config)},
            fit=fit, base_mse=study.user_attrs.get("base_mse"),
        )
    )  # fmt: skip
    info = worker.start()
    if "base_mse" not in study.user_attrs:  # the base model's scores: once per study
        study.set_user_attr("base_mse", info["base_mse"])
    # a replacement worker (after an OOM or a crash) reuses them
    worker.spec = dataclasses.replace(worker.spec, base_mse=info["base_mse"])
    parent = client.create_run(
        experiment_id,
        run_name=f"{config.name} {dt.datetime.now():%Y-%m-%d %H:%M}",
        tags={"optuna.study": config.name, "optuna.storage": config.storage,
              "aurora_sweep.pretraining_overlap": str(overlap).lower(), "device": info["device"],
              "gpu_memory_cap_mb": str(cap / MIB if cap else None),
              # a box crossing 0° is shifted east for Aurora (its longitudes must lie in [0, 360))
              "data.lon_shift_deg": str(lon_shift), **_data_tags(config)},
    )  # fmt: skip
    summary = StudySummary(study, 0, experiment_id, parent.info.run_id)
    console.print(
        f"study {config.name!r}: {len(done)} trials so far, adding {todo}; {info['train']} train "
        f"and {info['validation']} validation samples on {info['device']}"
        + (f", cap {cap / MIB:.0f} MB" if cap else "")
    )

    def objective(trial: optuna.Trial) -> float:
        try:
            return run_trial(trial)
        except KeyboardInterrupt:
            # a signal stopped this trial: Optuna records it as FAIL; mark it for a retry and end
            # its MLflow run here, since nothing else will
            trial.set_user_attr("interrupted", True)
            run_id = trial.user_attrs.get("mlflow_run_id")
            if run_id:
                client.set_tag(run_id, "interrupted", "true")
                client.set_terminated(run_id, "KILLED")
            raise

    def run_trial(trial: optuna.Trial) -> float:
        tc = sample_trial(trial, config)
        run = client.create_run(
            experiment_id,
            run_name=f"trial-{trial.number}",
            tags={"mlflow.parentRunId": parent.info.run_id, "optuna.trial": str(trial.number)},
        )
        run_id = run.info.run_id
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("mlflow_parent_run_id", parent.info.run_id)
        for key, value in this_process().items():  # to tell later whether it was killed
            trial.set_user_attr(key, value)
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in tc.to_dict().items()])
        estimate = estimate_peak(tc, grid=grid, levels=len(tc.levels), device="cuda")
        trial.set_user_attr("predicted_peak_mb", estimate.megabytes)
        client.log_metric(run_id, "predicted_peak_mb", estimate.megabytes)

        def infeasible(reason: str, over_mb: float, seconds: float = 0.0) -> optuna.TrialPruned:
            trial.set_user_attr("memory_over_cap_mb", max(over_mb, 1.0))
            trial.set_user_attr("infeasible", reason)
            client.log_batch(
                run_id, tags=[RunTag("optuna.state", "PRUNED"), RunTag("infeasible", reason)]
            )
            client.log_metric(run_id, "trial_seconds", seconds)
            client.set_terminated(run_id, "KILLED")
            console.print(f"trial {trial.number:3d}  infeasible: {reason}")
            return optuna.TrialPruned(reason)

        over = check_cap(estimate, cap)
        if over > 0:
            raise infeasible(
                f"predicted peak {estimate.megabytes:.0f} MB exceeds the cap {cap / MIB:.0f} MB",
                over,
            )

        def report(step: int, value: float) -> bool:
            trial.report(value, step)
            return trial.should_prune()

        with tempfile.TemporaryDirectory() as tmp:
            adapter = Path(tmp) / "adapter"
            try:
                outcome = worker.run(tc.to_dict(), adapter, report)
            except WorkerCrashed as e:
                console.print(f"trial {trial.number:3d}  failed: {e}; starting a new worker")
                client.set_tag(run_id, "error", str(e))
                client.set_terminated(run_id, "FAILED")
                raise
            p = outcome.payload
            if outcome.status == "pruned":
                console.print(
                    f"trial {trial.number:3d}  pruned at step {p['step']} ({config.objective} "
                    f"{p['value']:.4f} on the pruner's subset)"
                )
                client.set_tag(run_id, "optuna.state", "PRUNED")
                client.log_metric(run_id, "trial_seconds", p["seconds"])
                client.set_terminated(run_id, "KILLED")
                raise optuna.TrialPruned(f"{config.objective} {p['value']:.4f} at step {p['step']}")
            if outcome.status == "oom":
                trial.set_user_attr("measured_peak_mb", p["peak_memory_mb"])
                client.log_metric(run_id, "peak_memory_mb", p["peak_memory_mb"])
                limit = cap / MIB if cap else p["peak_memory_mb"]
                raise infeasible(
                    f"out of memory at {p['peak_memory_mb']:.0f} MB ({p['message'][:200]})",
                    p["peak_memory_mb"] - limit,
                    p["seconds"],
                )
            if outcome.status == "error":
                console.print(f"trial {trial.number:3d}  failed: {p['message']}")
                client.set_tag(run_id, "error", p["message"][:5000])
                client.set_terminated(run_id, "FAILED")
                raise TrialError(p["message"])
            now = int(time.time() * 1000)
            metrics = [Metric("train_loss", v, now, s) for s, v in p["train_loss"]]
            metrics += [Metric("val_loss", v, now, s) for s, v in p["val_loss"]]
            metrics += [Metric(f"val_{config.objective}_subset", v, now, s)
                        for s, v in p["intermediate"]]  # fmt: skip
            scalars = {**p["metrics"], "peak_memory_mb": p["peak_memory_mb"],
                       "trial_seconds": p["seconds"]}  # fmt: skip
            if p.get("peak_reserved_mb") is not None:
                scalars["peak_reserved_mb"] = p["peak_reserved_mb"]
            worst = worst_forgetting(p["metrics"])
            if worst is not None:
                scalars["forget_worst_ratio"] = worst[1]
                trial.set_user_attr("forget_worst", worst[0])
            metrics += [Metric(k, float(v), now, 0) for k, v in scalars.items()]
            client.log_batch(run_id, metrics=metrics, tags=[RunTag("optuna.state", "COMPLETE")])
            for k, v in scalars.items():
                trial.set_user_attr(k, float(v))
            client.log_artifacts(run_id, str(adapter), "adapter")
            client.log_artifacts(run_id, str(adapter.parent / "figures"), "figures")
        client.set_terminated(run_id)
        m = p["metrics"]
        console.print(f"trial {trial.number:3d}  {_score_line(m, config.objective)}  "
                      f"({p['seconds']:.1f} s, {p['peak_memory_mb']:.0f} MB, predicted GPU "
                      f"{estimate.megabytes:.0f} MB)")  # fmt: skip
        return m[config.objective]

    interrupted = False
    try:
        with signals_as_interrupts():
            study.optimize(objective, n_trials=todo, catch=(Exception,), gc_after_trial=True)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        worker.close(at_once=interrupted)
        try:
            if not interrupted:
                log_study_figures(client, parent.info.run_id, study, config.objective)
        finally:
            client.set_terminated(parent.info.run_id, "KILLED" if interrupted else "FINISHED")
    summary.new_trials = todo
    return summary


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


def this_process() -> dict[str, Any]:
    """Who runs a trial: host, pid and the pid's start time (pids are reused)."""
    import psutil

    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_started": psutil.Process().create_time(),
    }


def _alive(pid: int | None, started: float | None) -> bool:
    import psutil

    try:
        process = psutil.Process(int(pid))
        return (
            abs(process.create_time() - float(started)) < 1e-3
            and process.status() != psutil.STATUS_ZOMBIE
        )
    except (psutil.NoSuchProcess, TypeError, ValueError):
        return False


def reap_dead_trials(study: optuna.Study, client) -> list[int]:
    """Fail the trials that a process on this machine left RUNNING when it was killed.

    SIGKILL (a scheduler's hard limit, the OOM killer) gives a process no chance to settle its
    trial: Optuna keeps it RUNNING and MLflow keeps its runs RUNNING, forever. A trial records
    its host, pid and the pid's start time; a RUNNING trial of this host whose process is gone
    is marked FAIL, its MLflow run and parent run are ended as KILLED, and it is enqueued once
    again with the same parameters. Trials of other hosts are left to database heartbeats.
    """
    host = socket.gethostname()
    reaped = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        a = t.user_attrs
        if a.get("host") != host or _alive(a.get("pid"), a.get("pid_started")):
            continue
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        for key in ("mlflow_run_id", "mlflow_parent_run_id"):
            run_id = a.get(key)
            if run_id and client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, "KILLED")
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        reaped.append(t.number)
    return reaped


def retry_interrupted(study: optuna.Study) -> list[int]:
    """Enqueue once, with the same parameters, every trial a signal interrupted."""
    retried = {t.user_attrs.get("retry_of") for t in study.trials}
    numbers = []
    for t in study.trials:
        if (
            t.state == optuna.trial.TrialState.FAIL
            and t.user_attrs.get("interrupted")
            and t.number not in retried
        ):
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            numbers.append(t.number)
    return numbers


def _score_line(m: dict[str, float], objective: str) -> str:
    """One line of a trial's verdict: objective with its interval, skills."""
    lo, hi = m.get(f"{objective}_q05"), m.get(f"{objective}_q95")
    interval = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
    return (
        f"{objective} {m[objective]:.3f}{interval}  skill vs persistence "
        f"{m['tp_skill_persistence']:+.3f}, vs climatology {m['tp_skill_climatology']:+.3f}"
    )


def log_study_figures(client, run_id: str, study: optuna.Study, objective: str) -> None:
    """Optuna's optimisation history and importances, and skill against peak memory."""
    from aurora_sweep.figures import study_figures

    complete = [
        t
        for t in study.trials
        if t.state == optuna.trial.TrialState.COMPLETE and "peak_memory_mb" in t.user_attrs
    ]
    if not complete:
        return
    points = [
        {
            "number": t.number,
            "skill": t.user_attrs.get("tp_skill_climatology", float("nan")),
            "peak_mb": t.user_attrs["peak_memory_mb"],
            "label": f"r{t.params.get('lora_rank')} {t.params.get('lora_targets')} "
            f"{t.params.get('precision')}",
        }
        for t in complete
    ]
    import matplotlib.pyplot as plt

    memory = (
        "peak GPU memory (MB)"
        if any("peak_reserved_mb" in t.user_attrs for t in complete)
        else "peak resident memory of the trial process (MB, CPU)"
    )
    labels = {"skill": f"skill vs climatology (1 − {objective}/climatology's)", "memory": memory}
    for name, fig in study_figures(study, points, **labels).items():
        client.log_figure(run_id, fig, f"study/{name}")
        plt.close(fig)


class TrialError(RuntimeError):
    """A trial raised inside its worker (recorded as FAIL; the study goes on)."""
