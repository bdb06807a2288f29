"""The trial worker's life under signals: SIGTERM to `run` ends the trial, the worker and every
MLflow run. (A `run` killed with SIGKILL takes its worker with it: test_scale_out.py.)"""

import signal
import subprocess
import sys
import time

import pytest


@pytest.mark.slow
def test_sigterm_ends_the_trial_and_every_mlflow_run_in_one_line(tmp_path, tiny_store):
    """A scheduler's preemption: one line, exit 143, nothing left RUNNING (the rerun's retry is
    tested with Ctrl-C in test_scale_out.py)."""
    import optuna
    from mlflow.tracking import MlflowClient

    from aurora_sweep.config.study_file import load_config
    from aurora_sweep.sweep.tracking import tracking_uri
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


def test_a_workers_gpu_is_numbered_within_what_the_scheduler_made_visible():
    from aurora_sweep.errors import AuroraSweepError
    from aurora_sweep.sweep.process_setup import cuda_visible

    assert cuda_visible(1, None) == "1"
    assert cuda_visible(0, "") == "0"
    # SLURM gave this job physical GPUs 2 and 3: worker 1 must train on 3, not on 1
    assert cuda_visible(1, "2,3") == "3"
    assert cuda_visible(0, "GPU-5f1c,GPU-77aa") == "GPU-5f1c"
    with pytest.raises(AuroraSweepError, match="not among the 2 visible"):
        cuda_visible(2, "2,3")


def test_cpu_workers_split_the_cores_a_scheduler_granted_not_the_machines(monkeypatch):
    # Slurm or taskset grant a process some cores; os.cpu_count() still counts all of them
    from aurora_sweep import devices

    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {2, 5, 7}, raising=False)
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 64)
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert devices.usable_cores() == 3
    assert devices.plan_devices(1, None) == [{"gpu": None, "threads": 3}]
    assert devices.plan_devices(2, None) == [{"gpu": None, "threads": 1}] * 2


def test_a_worker_launched_early_and_never_started_stops_when_asked(tmp_path):
    """The study launches its first worker before it makes or opens the data; when the data
    refuse, the worker, still waiting for its start, ends at once and cleanly."""
    from aurora_sweep.sweep.worker import TrialWorker, WorkerSpec

    spec = WorkerSpec(
        config_path=tmp_path / "never-read.toml", workdir=tmp_path, checkpoint=None,
        memory_cap=None, threads=1,
    )  # fmt: skip
    worker = TrialWorker(spec)
    worker.launch()
    process = worker.process
    assert process is not None and process.is_alive()
    started = time.monotonic()
    worker.close()  # asks it to stop: it leaves as soon as its imports are done
    assert not process.is_alive() and process.exitcode == 0
    assert time.monotonic() - started < 60 and worker.process is None
