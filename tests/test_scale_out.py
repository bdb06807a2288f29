"""Sweeps that outgrow one process: workers sharing a study on PostgreSQL or a journal file, an
MLflow tracking server, and processes killed in the middle of a trial.

Every test here runs real `run` processes against real servers (the `postgres_url` and
`mlflow_server` fixtures of `servers.py`), on the tiny demo study.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient

TESTS = Path(__file__).parent
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

#: A `run` process with a seam for the training function (`marker`: train forever once running).
SCRIPT = f"""
import dataclasses, functools, json, sys
from pathlib import Path
sys.path.insert(0, {str(TESTS)!r})
import faults
from aurora_sweep.config.study import with_overrides
from aurora_sweep.config.study_file import load_config
from aurora_sweep.sweep.run import run_study

if __name__ == "__main__":
    a = json.loads(sys.argv[1])
    config = load_config(a["config"], workdir=Path(a["workdir"]))
    config = with_overrides(config, storage=a["storage"], tracking_uri=a.get("tracking"),
                            heartbeat_seconds=a.get("heartbeat"))
    fit = functools.partial(faults.train_forever, marker=a["marker"]) if a.get("marker") else None
    run_study(config, trials=a["trials"], workers=a.get("workers", 1), fit=fit)
"""


def _config(directory: Path, store: Path, *, steps: int = 2) -> tuple[Path, str]:
    """The tiny study under a name of its own (the MLflow server is shared by the session), in
    fp32."""
    from conftest import write_tiny_config

    name = f"tiny-{uuid.uuid4().hex[:8]}"
    path = write_tiny_config(directory, steps=steps, store=store)
    text = path.read_text().replace('name = "tiny"', f'name = "{name}"')
    # fp32 only: bf16 is emulated on a CPU, and what is tested here is the processes
    path.write_text(text.replace('precision = ["fp32", "bf16"]', 'precision = ["fp32"]'))
    return path, name


def _start(tmp_path: Path, name: str, **args) -> subprocess.Popen:
    script = tmp_path / "run_study.py"
    script.write_text(SCRIPT)
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        [sys.executable, str(script), json.dumps({k: str(v) if isinstance(v, Path) else v
                                                  for k, v in args.items()})],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def _finish(process: subprocess.Popen, log: Path, timeout: float = 400) -> None:
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, log.read_text()[-3000:]


def _wait_for(marker: Path, process: subprocess.Popen, log: Path, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while not marker.exists() or not marker.read_text():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the trial never started"
        time.sleep(0.2)
    return int(marker.read_text())


def _load(name: str, storage: str) -> optuna.Study:
    if storage.endswith(".journal"):
        from optuna.storages.journal import JournalFileBackend

        storage = optuna.storages.JournalStorage(JournalFileBackend(storage))
    return optuna.load_study(study_name=name, storage=storage)


def _mlflow_statuses(tracking: str, name: str) -> dict[str, str]:
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name(name)
    return {r.info.run_id: r.info.status for r in client.search_runs([experiment.experiment_id])}


def _configs(trials) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in trials if "retry_of" not in t.user_attrs]


@pytest.mark.slow
def test_two_processes_on_postgresql_reach_exactly_the_total_with_distinct_configs(
    tmp_path, tiny_store, postgres_url, mlflow_server, monkeypatch
):
    path, name = _config(tmp_path, tiny_store)
    common = dict(config=path, workdir=tmp_path, storage=postgres_url, tracking=mlflow_server)
    runs = [_start(tmp_path, f"worker{i}", trials=3, **common) for i in range(2)]
    for i, process in enumerate(runs):
        _finish(process, tmp_path / f"worker{i}.log")

    trials = _load(name, postgres_url).trials
    assert sum(t.state in FINISHED for t in trials) == 3  # the study-wide total, not 3 each
    assert len(set(_configs(trials))) == len(_configs(trials))  # no config proposed twice
    # both took part (a trial asked for in the same instant as the other's last one is given
    # back unused, as surplus, before it is sampled or claimed by a process)
    used = [t for t in trials if not t.user_attrs.get("surplus")]  # a surplus one has no run
    assert {t.user_attrs["pid"] for t in used} == {p.pid for p in runs}
    statuses = _mlflow_statuses(mlflow_server, name)
    parents = {t.user_attrs["mlflow_parent_run_id"] for t in used}
    assert len(parents) == 1  # one study run, whichever process came first
    assert set(statuses.values()) <= {"FINISHED", "KILLED"} and len(statuses) == len(used) + 1

    # the best trial's adapter is exported from another directory, through the server
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    from typer.testing import CliRunner

    from aurora_sweep.cli import app

    monkeypatch.chdir(elsewhere)
    best = CliRunner().invoke(app, ["best", "-c", str(path), "--storage", postgres_url,
                                    "--tracking-uri", mlflow_server, "--export", "adapter"])  # fmt: skip
    assert best.exit_code == 0, best.output
    assert (elsewhere / "adapter" / "adapter_model.safetensors").exists()
    # registered on the server (its registry in PostgreSQL): the version loads as the folder does
    assert f"registered in MLflow as models:/{name}/1" in best.output
    import torch

    from aurora_sweep import load_finetuned

    folder = load_finetuned(elsewhere / "adapter").state_dict()
    registered = load_finetuned(f"models:/{name}/1", tracking_uri=mlflow_server).state_dict()
    assert folder.keys() == registered.keys()
    assert all(torch.equal(folder[k], registered[k]) for k in folder)


def _kill_one_mid_trial(tmp_path: Path, store: Path, storage_of, tracking: str | None, **extra):
    """Worker A trains forever and is killed with SIGKILL; worker B finishes the study."""
    path, name = _config(tmp_path, store)
    storage = storage_of(name)
    common = dict(config=path, workdir=tmp_path, storage=storage, tracking=tracking, **extra)
    marker = tmp_path / "training"
    a = _start(tmp_path, "a", trials=2, marker=marker, **common)
    trainer = _wait_for(marker, a, tmp_path / "a.log")
    return name, storage, a, trainer


def _assert_settled(name: str, storage: str, tracking: str, killed: optuna.trial.FrozenTrial):
    trials = _load(name, storage).trials
    states = [t.state for t in trials]
    assert optuna.trial.TrialState.RUNNING not in states
    assert sum(s in FINISHED for s in states) == 2
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == killed.params
    assert trials[killed.number].state == optuna.trial.TrialState.FAIL
    statuses = _mlflow_statuses(tracking, name)
    assert "RUNNING" not in statuses.values()
    assert statuses[killed.user_attrs["mlflow_run_id"]] == "KILLED"


def _gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        assert time.monotonic() < deadline, f"process {pid} outlived its study process"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_worker_killed_on_another_node_is_found_by_heartbeat_and_retried_on_postgresql(
    tmp_path, tiny_store, postgres_url, mlflow_server
):
    name, storage, a, trainer = _kill_one_mid_trial(
        tmp_path, tiny_store, lambda _: postgres_url, mlflow_server, heartbeat=1
    )
    study = _load(name, storage)
    (killed,) = study.trials
    # as if A ran on another machine: its pid means nothing here, only its heartbeat tells
    study._storage.set_trial_user_attr(killed._trial_id, "host", "node-elsewhere")
    os_kill_group(a)
    _gone(trainer)
    b = _start(tmp_path, "b", trials=2, config=tmp_path / "tiny.toml", workdir=tmp_path,
               storage=storage, tracking=mlflow_server, heartbeat=1)  # fmt: skip
    _finish(b, tmp_path / "b.log")
    _assert_settled(name, storage, mlflow_server, _load(name, storage).trials[killed.number])


@pytest.mark.slow
def test_a_run_killed_with_sigkill_takes_its_worker_with_it_and_the_other_retries_its_trial(
    tmp_path, tiny_store
):
    name, storage, a, trainer = _kill_one_mid_trial(
        tmp_path, tiny_store, lambda n: str(tmp_path / f"{n}.journal"), None
    )
    # B joins while A's trial runs, runs the other one, and waits for A's, which never ends
    b = _start(tmp_path, "b", trials=2, config=tmp_path / "tiny.toml", workdir=tmp_path,
               storage=storage)  # fmt: skip
    deadline = time.monotonic() + 240
    while sum(t.state in FINISHED for t in _load(name, storage).trials) < 1:
        assert b.poll() is None, (tmp_path / "b.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(1)
    a.send_signal(signal.SIGKILL)  # A's run process only, with no warning: its trial
    a.wait()  # worker, left alone, must notice and exit by itself
    _gone(trainer)
    _finish(b, tmp_path / "b.log")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _assert_settled(name, storage, tracking, _load(name, storage).trials[0])
    # the worker that died with A left nothing for A's resource tracker to warn of
    assert "leaked" not in (tmp_path / "a.log").read_text(), (tmp_path / "a.log").read_text()


def os_kill_group(process: subprocess.Popen) -> None:
    import os

    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_ctrl_c_stops_both_workers_in_one_line_and_the_rerun_retries_both(tmp_path, tiny_store):
    from conftest import write_tiny_config

    long = write_tiny_config(tmp_path, steps=100000, store=tiny_store)  # still training when hit
    command = [sys.executable, "-m", "aurora_sweep.cli", "run", "-c", str(long), "--workers", "2"]
    run = subprocess.Popen(
        [*command, "--trials", "2"], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    storage = f"sqlite:///{tmp_path / 'tiny.optuna.db'}"
    deadline = time.monotonic() + 240
    while True:  # both workers are training
        time.sleep(1)
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline, "the trials never started"
        try:
            trials = _load("tiny", storage).trials
        except KeyError:
            continue
        if len(trials) == 2 and all("mlflow_run_id" in t.user_attrs for t in trials):
            break
    time.sleep(3)
    import os

    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = run.communicate(timeout=90)
    assert run.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted by SIGINT") and "Traceback" not in err, err
    trials = _load("tiny", storage).trials
    assert all(
        t.state == optuna.trial.TrialState.FAIL and t.user_attrs["interrupted"] for t in trials
    )
    statuses = _mlflow_statuses(f"sqlite:///{tmp_path / 'mlflow.db'}", "tiny")
    assert set(statuses.values()) == {"KILLED"} and len(statuses) == 3

    short = write_tiny_config(tmp_path, steps=2, store=tiny_store)
    rerun = subprocess.run(
        [*command[:5], str(short), "--workers", "2", "--trials", "2"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    trials = _load("tiny", storage).trials
    assert sum(t.state in FINISHED for t in trials) == 2  # exactly, with two workers
    assert {t.user_attrs.get("retry_of") for t in trials} >= {0, 1}
    statuses = _mlflow_statuses(f"sqlite:///{tmp_path / 'mlflow.db'}", "tiny")
    assert "RUNNING" not in statuses.values()
