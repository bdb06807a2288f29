"""The trial worker's life: it never outlives the study process that started it."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

TESTS = Path(__file__).parent


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
def test_after_sigkill_the_worker_dies_and_the_next_run_settles_and_retries_the_trial(
    tiny_config, tmp_path
):
    marker = tmp_path / "training"
    script = tmp_path / "study.py"
    script.write_text(
        f"""
import functools, sys
from pathlib import Path
sys.path.insert(0, {str(TESTS)!r})
import faults
from aurora_sweep.config import load_config
from aurora_sweep.study import run_study

if __name__ == "__main__":
    config = load_config({str(tiny_config.path)!r}, workdir=Path({str(tmp_path)!r}))
    run_study(config, trials=1, fit=functools.partial(faults.train_forever, marker={str(marker)!r}))
"""
    )
    study = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists() or not marker.read_text():
            assert study.poll() is None, "the study process ended before its trial started"
            assert time.monotonic() < deadline, "the trial never started"
            time.sleep(0.2)
        worker = int(marker.read_text())
        assert not _gone(worker)
        study.send_signal(signal.SIGKILL)  # as a scheduler's hard time limit does
        study.wait()
        deadline = time.monotonic() + 10
        while not _gone(worker):
            assert time.monotonic() < deadline, "the worker outlived its study process"
            time.sleep(0.2)
        _the_next_run_fails_the_killed_trial_ends_its_runs_and_retries_it(tiny_config, tmp_path)
    finally:
        study.kill()
        if marker.exists() and marker.read_text():
            try:
                psutil.Process(int(marker.read_text())).kill()
            except psutil.NoSuchProcess:
                pass


def _the_next_run_fails_the_killed_trial_ends_its_runs_and_retries_it(tiny_config, tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient

    from aurora_sweep.config import load_config
    from aurora_sweep.study import run_study
    from aurora_sweep.tracking import tracking_uri

    config = load_config(tiny_config.path, workdir=tmp_path)
    killed = optuna.load_study(study_name="tiny", storage=config.storage).trials[0]
    assert killed.state == optuna.trial.TrialState.RUNNING  # what SIGKILL leaves behind
    summary = run_study(config, trials=1)
    first, retry = summary.study.trials
    assert first.state == optuna.trial.TrialState.FAIL
    assert retry.state == optuna.trial.TrialState.COMPLETE
    assert retry.user_attrs["retry_of"] == 0 and retry.params == first.params
    client = MlflowClient(tracking_uri(config))
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    statuses = {r.info.run_id: r.info.status for r in runs}
    assert "RUNNING" not in statuses.values()
    assert statuses[first.user_attrs["mlflow_run_id"]] == "KILLED"
    # the study's run, reopened by the rerun, ended with it
    assert statuses[first.user_attrs["mlflow_parent_run_id"]] == "FINISHED"


@pytest.mark.slow
def test_sigterm_ends_the_trial_and_every_mlflow_run_and_the_rerun_retries_it(tmp_path, tiny_store):
    """A scheduler's preemption: one line, exit 143, nothing left RUNNING, the trial retried."""
    import optuna
    from mlflow.tracking import MlflowClient

    from aurora_sweep.config import load_config
    from aurora_sweep.tracking import tracking_uri
    from conftest import write_tiny_config

    path = write_tiny_config(tmp_path, steps=100000, store=tiny_store)  # still training when hit
    command = [sys.executable, "-m", "aurora_sweep.cli", "run", "-c", str(path), "--trials", "1"]
    run = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    config = load_config(path, workdir=tmp_path)
    for line in run.stderr:  # the study exists and its first trial starts right after this line
        if "trials so far" in line:
            break
    else:
        raise AssertionError(f"run ended before its first trial: {run.communicate()}")
    time.sleep(5)  # the trial is training (100000 steps)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 143, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted by SIGTERM") and "Traceback" not in err, err

    (trial,) = optuna.load_study(study_name="tiny", storage=config.storage).trials
    assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["interrupted"]
    client = MlflowClient(tracking_uri(config))
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"KILLED"}

    short = write_tiny_config(tmp_path, steps=2, store=tiny_store)
    rerun = subprocess.run(
        [*command[:5], str(short), "--trials", "1"], cwd=tmp_path, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr
    first, retry = optuna.load_study(study_name="tiny", storage=config.storage).trials
    assert retry.state == optuna.trial.TrialState.COMPLETE
    assert retry.user_attrs["retry_of"] == 0 and retry.params == first.params
