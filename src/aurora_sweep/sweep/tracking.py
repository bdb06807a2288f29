"""The MLflow side of a sweep: one place opens each run and one place ends it, in every outcome.

MLflow has no heartbeat: a run whose process dies stays RUNNING for good, and a run left open by
an exception path nobody thought of looks like a trial still training. So every run a sweep
opens is owned by a context manager here that ends it whatever happens: a trial's run FINISHED
when it completes, KILLED when it is pruned, infeasible or interrupted, FAILED when it raised;
the study's run FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED. Runs that a killed process left
RUNNING are ended by `end_runs` when the study finds them.

The study has one parent run and one experiment, whichever process or machine asks first: both
are looked up before they are created, and a creation race is settled by keeping the earliest.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aurora_sweep.errors import AuroraSweepError

#: The tag that marks a study's parent run (its trials are its children).
STUDY_RUN_TAG = "aurora_sweep.study_run"


class Killed(RuntimeError):
    """A trial stopped from outside its own code (its process killed): its run ends KILLED."""


def tracking_uri(config) -> str:
    """The study's MLflow tracking URI: the config's, or MLflow's own default store made
    explicit (`mlflow.db` in the working directory) so that `mlflow ui` there shows the runs."""
    return config.tracking_uri or f"sqlite:///{config.workdir / 'mlflow.db'}"


def client_for(config):
    """An MLflow client on the study's tracking URI, checked to answer (one line if not)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(config)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """A tracking server that does not answer is said at once, not retried for minutes."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        answer = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as e:
        raise AuroraSweepError(
            f"the MLflow tracking server {uri} does not answer ({type(e).__name__}): start it "
            "(see docs/scale-out.md) or check --tracking-uri"
        ) from None
    if answer.status_code != 200:
        raise AuroraSweepError(
            f"{uri} answered {answer.status_code} to /health: is it an MLflow tracking server? "
            "Check --tracking-uri"
        )


def experiment_id(client, name: str, *, artifacts: Path | None) -> str:
    """The experiment named after the study, created once even when workers race to create it.

    `artifacts`: where a local store keeps artifacts (`./mlruns`); None for a tracking server,
    which proxies them (`mlflow-artifacts:`) so that any machine can download them.
    """
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise AuroraSweepError(
                f"the MLflow experiment {name!r} was deleted: restore it "
                f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) "
                "or give the study another name"
            )
        return experiment.experiment_id
    try:
        location = artifacts.as_uri() if artifacts is not None else None
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        experiment = client.get_experiment_by_name(name)  # another worker created it first
        if experiment is None:
            raise
        return experiment.experiment_id


def _study_runs(client, experiment: str, study: str) -> list:
    runs = client.search_runs(
        [experiment], filter_string=f"tags.`{STUDY_RUN_TAG}` = '{study}'", max_results=100
    )
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


@contextmanager
def study_run(
    client, experiment: str, *, study: str, name: str, tags: dict[str, str]
) -> Iterator[str]:
    """The study's parent run, open (RUNNING) while this process runs trials under it.

    One per study: an earlier invocation's, or another worker's, is reopened; if two processes
    create one at the same moment, both keep the earliest and the other is deleted. It ends
    FINISHED on a normal exit, KILLED on Ctrl-C or SIGTERM, FAILED on an error.
    """
    runs = _study_runs(client, experiment, study)
    if runs:
        run_id = runs[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        mine = client.create_run(
            experiment, run_name=name, tags={STUDY_RUN_TAG: study, **tags}
        ).info.run_id
        run_id = _study_runs(client, experiment, study)[0].info.run_id
        if run_id != mine:
            client.delete_run(mine)
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(run_id, status)


class TrialRun:
    """A trial's MLflow run while it is open: what the trial logs goes through here.

    Params, metrics and tags are buffered and sent in as few requests as MLflow allows
    (`flush`): against a tracking server each request is a round trip, and a trial logs dozens
    of scores. `trial_run` flushes before training starts and when the run ends; a training
    trial's curve is flushed as it grows. A point of a curve (a step of 1 or more) is logged
    once: the whole curve logged at the end adds only the points not sent live.
    """

    def __init__(self, client, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self._params: list = []
        self._metrics: list = []
        self._tags: list = []
        self._logged: set[tuple[str, int]] = set()  # (metric, step) of curves, step >= 1

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self._params += [Param(k, str(v)) for k, v in params.items()]

    def log_metrics(self, values: dict[str, float]) -> None:
        self.log_history({k: [(0, v)] for k, v in values.items()})

    def log_history(self, series: dict[str, Iterable[tuple[int, float]]]) -> None:
        """Metrics by step, e.g. `{"train_loss": [(1, 0.9), (2, 0.7)]}`."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for name, points in series.items():
            for step, v in points:
                if step >= 1 and (name, int(step)) in self._logged:
                    continue
                if step >= 1:
                    self._logged.add((name, int(step)))
                self._metrics.append(Metric(name, float(v), now, int(step)))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._tags += [RunTag(k, str(v)) for k, v in tags.items()]

    def flush(self) -> None:
        """Send what is buffered: one request per MLflow batch limit (1000 metrics, 100 params
        and 100 tags)."""
        params, metrics, tags = self._params, self._metrics, self._tags
        self._params, self._metrics, self._tags = [], [], []
        while params or metrics or tags:
            self.client.log_batch(
                self.run_id, params=params[:100], metrics=metrics[:1000], tags=tags[:100]
            )
            params, metrics, tags = params[100:], metrics[1000:], tags[100:]

    def log_artifacts(self, local_dir: Path, path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), path)


@contextmanager
def trial_run(
    client,
    experiment: str,
    *,
    parent: str,
    number: int,
    tags: dict[str, str] | None = None,
    system_metrics: float = 0.0,
) -> Iterator[TrialRun]:
    """Open trial `number`'s run under `parent`; end it however the block ends. With
    `system_metrics` (seconds), MLflow's own monitor samples the machine's CPU, memory, disk
    and network (and GPUs, through NVML, where there are any) that often into the run
    (`system/...`), until it ends.

    Completed: FINISHED. `optuna.TrialPruned` (pruned, or infeasible for the memory cap):
    KILLED, tagged PRUNED. KeyboardInterrupt (Ctrl-C, SIGTERM): KILLED, tagged interrupted.
    `Killed` (the trial's process was killed from outside): KILLED, with the reason. Any other
    exception: FAILED, with the error as a tag.
    """
    import optuna

    run = client.create_run(
        experiment,
        run_name=f"trial-{number}",
        tags={"mlflow.parentRunId": parent, "optuna.trial": str(number), **(tags or {})},
    )
    trial = TrialRun(client, run.info.run_id)
    monitor = _system_monitor(client, trial.run_id, system_metrics)
    status, end_tags = "FAILED", {"optuna.state": "FAIL"}
    try:
        yield trial
        status, end_tags = "FINISHED", {"optuna.state": "COMPLETE"}
    except optuna.TrialPruned:
        status, end_tags = "KILLED", {"optuna.state": "PRUNED"}
        raise
    except KeyboardInterrupt:
        status, end_tags = "KILLED", {"optuna.state": "FAIL", "interrupted": "true"}
        raise
    except Killed as e:
        status, end_tags = "KILLED", {"optuna.state": "FAIL", "killed": str(e)}
        raise
    except BaseException as e:
        end_tags["error"] = f"{type(e).__name__}: {e}"[:5000]
        raise
    finally:
        try:
            if monitor is not None:
                monitor.finish()  # its last samples, while the run is still open
            trial.set_tags(end_tags)
            trial.flush()
        finally:
            client.set_terminated(trial.run_id, status)


def _system_monitor(client, run_id: str, seconds: float):
    """MLflow's system-metrics monitor of run `run_id`, started, sampling every `seconds` (0:
    none). It also reads the run's status each sample, and stops when it has ended."""
    if seconds <= 0:
        return None
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no line per trial
    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=seconds, tracking_uri=client.tracking_uri
    )
    monitor.start()
    return monitor


def log_datasets(client, run_id: str, datasets: list[dict]) -> None:
    """Log `datasets` (`data.lineage.split_datasets`) as the run's inputs, each with its context
    ("training", "evaluation"): MLflow's Datasets column and the run's Inputs show them."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = [
        DatasetInput(
            Dataset(d["name"], d["digest"], d["source_type"], d["source"], profile=d["profile"]),
            [InputTag("mlflow.data.context", d["context"])],
        )
        for d in datasets
    ]
    from mlflow.exceptions import MlflowException

    try:
        client.log_inputs(run_id, datasets=inputs)
    except MlflowException:
        # two trials starting at once both insert the experiment's first copy of a dataset;
        # one insert loses (a unique constraint) and, once the other's is there, takes it
        time.sleep(0.5)
        client.log_inputs(run_id, datasets=inputs)


def end_runs(client, run_ids: Iterable[str | None], status: str = "KILLED") -> None:
    """End the runs among `run_ids` that are still RUNNING (a killed process left them)."""
    for run_id in run_ids:
        if run_id and client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status)
