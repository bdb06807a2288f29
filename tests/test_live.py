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
    (sampled every 0.2 s here) on its run."""
    from mlflow import MlflowClient

    import faults
    from aurora_sweep.sweep.run import run_study
    from aurora_sweep.sweep.tracking import tracking_uri

    tiny_config = dataclasses.replace(tiny_config, system_metrics=0.2)
    marker = str(tmp_path / "trial")
    seen: dict = {}

    def read_while_paused() -> None:
        deadline = time.monotonic() + 120
        while not Path(marker + ".paused").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
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
    summary = run_study(tiny_config, trials=1, fit=fit)
    reader.join()
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
