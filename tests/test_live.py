"""A running trial's curves reach MLflow while it trains."""

import dataclasses
import functools
import json
import threading
import time
from pathlib import Path

import pytest


@pytest.mark.slow
def test_a_running_trials_curve_is_in_mlflow_before_it_ends(tiny_config, tmp_path):
    """Its training loss and the pruner's value while it trains, and MLflow's system metrics
    (sampled every 0.2 s here) on its run; on a terminal, the live panel shows the trial."""
    import io

    from mlflow import MlflowClient
    from rich.console import Console

    import faults
    from aurora_sweep.sweep.run import run_study
    from aurora_sweep.sweep.tracking import tracking_uri

    tiny_config = dataclasses.replace(tiny_config, system_metrics=0.2)
    marker = str(tmp_path / "trial")
    seen: dict = {}
    terminal = io.StringIO()
    console = Console(file=terminal, force_terminal=True, width=200, color_system=None)

    def read_while_paused() -> None:
        deadline = time.monotonic() + 120
        while not Path(marker + ".paused").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            time.sleep(1.5)  # three redraws of the panel
            seen["panel"] = terminal.getvalue()
            client = MlflowClient(tracking_uri(tiny_config))
            experiment = client.get_experiment_by_name("tiny")
            (run,) = [
                r
                for r in client.search_runs([experiment.experiment_id])
                if "mlflow.parentRunId" in r.data.tags
            ]
            seen["status"] = run.info.status
            for name in ("train_loss", "val_tp_seeps_subset"):
                seen[name] = [m.step for m in client.get_metric_history(run.info.run_id, name)]
        finally:
            Path(marker + ".resume").touch()

    reader = threading.Thread(target=read_while_paused)
    reader.start()
    fit = functools.partial(faults.pause_after_first_check, marker=marker)
    summary = run_study(tiny_config, trials=1, fit=fit, console=console)
    reader.join()
    # the panel: trial 0 training, at its pruner check's step, and the study's count
    assert "training" in seen["panel"] and "2/4" in seen["panel"]
    assert "search: 0 of 1 trials finished" in seen["panel"]
    # at step 3 of 4: the curve up to the pruner's check at step 2, and the check, are there
    assert seen["status"] == "RUNNING"
    assert seen["train_loss"] == [1, 2] and seen["val_tp_seeps_subset"] == [2]
    # at the end, the whole curve, each step once
    client = MlflowClient(tracking_uri(tiny_config))
    run_id = summary.study.trials[0].user_attrs["mlflow_run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run_id, "val_tp_seeps_subset")] == [2]
    # what it trained and was scored on, as the run's dataset inputs
    inputs = client.get_run(run_id).inputs.dataset_inputs
    contexts = {i.tags[0].value: i.dataset for i in inputs}
    assert set(contexts) == {"training", "evaluation"}
    assert (
        contexts["training"].name == "tiny-train"
        and contexts["evaluation"].name == "tiny-validation"
    )
    assert json.loads(contexts["training"].profile)["period"] == "2022-01-01..2022-12-31"
    assert contexts["training"].digest != contexts["evaluation"].digest
    metrics = client.get_run(run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        metrics
    )


def test_a_stores_digest_changes_with_its_files_and_metadata(tmp_path):
    from aurora_sweep.data.lineage import store_digest

    store = tmp_path / "store.zarr"
    (store / "tp").mkdir(parents=True)
    (store / ".zmetadata").write_text('{"tp": 1}')
    (store / "tp" / "0.0.0").write_bytes(b"1234")
    first = store_digest(store)
    assert store_digest(store) == first
    (store / "tp" / "1.0.0").write_bytes(b"5678")  # a chunk more: more times imported
    second = store_digest(store)
    (store / ".zmetadata").write_text('{"tp": 2}')  # the same files, other metadata
    assert len({first, second, store_digest(store)}) == 3


def _watch(terminal: bool, quiet: bool = False):
    import io

    from rich.console import Console

    from aurora_sweep.sweep.live import Watch

    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=200, color_system=None)
    return Watch(console, quiet=quiet), out


def test_off_a_terminal_the_run_says_a_line_per_trial_and_no_panel():
    watch, out = _watch(terminal=False)
    with watch:
        watch.worker_started(0, 7, steps=32)
        watch.worker_step(0, 16, 0.25, checking=True)
        watch.say("trial   7  tp_seeps 0.200")
    assert watch._display is None and out.getvalue() == "trial   7  tp_seeps 0.200\n"


def test_quiet_says_nothing_of_the_trials():
    watch, out = _watch(terminal=True, quiet=True)
    with watch:
        watch.say("trial   7  tp_seeps 0.200")
    assert out.getvalue() == ""


def test_on_a_terminal_the_panel_follows_each_workers_trial_through_its_phases():
    from aurora_sweep.sweep.live import StudyCounts

    watch, out = _watch(terminal=True)

    def shown() -> str:
        watch.console.print(watch.panel())
        text = out.getvalue()
        out.seek(0), out.truncate()
        return text

    watch.worker_started(0, 7, steps=32)
    watch.worker_started(1, 8, steps=32, replica="finalist 3, seed 1")
    watch.counts(StudyCounts(2, 30, 1, 0, 1, "trial 3, tp_seeps 0.2000"))
    text = shown()
    assert "starting" in text and "training (finalist 3, seed 1)" not in text
    assert "search: 2 of 30 trials finished; 1 pruned, 0 failed, 1 infeasible" in text
    assert "best feasible trial 3, tp_seeps 0.2000" in text
    watch.worker_step(0, 16, 0.2513, checking=True)
    watch.worker_step(1, 4, 0.5, checking=False)
    text = shown()
    assert "pruner check" in text and "16/32" in text and "0.2513" in text
    assert "training (finalist 3, seed 1)" in text
    watch.worker_checked(0)
    watch.worker_step(0, 32, 0.2, checking=False)  # its last step: scoring follows
    watch.worker_scored(1, 18, 72)
    text = shown()
    row0, row1 = [line for line in text.splitlines() if line.strip()[:1] in "01"]
    assert "scoring" in row0 and "32/32" in row0
    assert "18/72 samples" in row1
    watch.worker_ended(0, completed=True)
    assert len(watch.scoring_seconds) == 1 and "32/32" not in shown()


def test_the_time_left_is_the_steps_to_go_at_the_pace_so_far_then_scoring():
    from aurora_sweep.sweep.live import WorkerState

    watch, _ = _watch(terminal=True)
    w = WorkerState(trial=1, steps=100, started=0.0, step=25)
    assert watch._left(w, now=10.0) == 30.0  # 75 steps at 0.4 s
    watch.scoring_seconds = [4.0, 6.0]
    assert watch._left(w, now=10.0) == 35.0  # and scoring as long as the trials before
    w.training_ended, w.step = 40.0, 100
    assert watch._left(w, now=42.0) == 3.0
    w.scored = (10, 40)
    assert watch._left(w, now=42.0) == 6.0  # 30 samples at 0.2 s


def test_two_trials_starting_at_once_both_log_the_studys_datasets(tmp_path):
    """Two trial threads log the same new dataset into one experiment at the same instant: one
    insert of it loses MLflow's unique constraint, and that trial must not fail for it."""
    import threading

    from mlflow import MlflowClient

    from aurora_sweep.sweep.tracking import log_datasets

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    datasets = [
        {
            "name": "study-train",
            "digest": "abc",
            "source_type": "local",
            "source": "{}",
            "profile": "{}",
            "context": "training",
        }  # fmt: skip
    ]

    def log(run_id: str, start: threading.Barrier, errors: list) -> None:
        start.wait()
        try:
            log_datasets(client, run_id, datasets)
        except Exception as e:  # noqa: BLE001 - the test reports what either thread raised
            errors.append(e)

    for attempt in range(5):
        experiment = client.create_experiment(f"race-{attempt}")
        runs = [client.create_run(experiment).info.run_id for _ in range(2)]
        start, errors = threading.Barrier(2), []
        threads = [threading.Thread(target=log, args=(r, start, errors)) for r in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        for run_id in runs:
            (logged,) = client.get_run(run_id).inputs.dataset_inputs
            assert logged.dataset.name == "study-train"
