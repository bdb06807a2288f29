"""Recording a trial's outcome in Optuna and MLflow: no worker, no database, no torch."""

from __future__ import annotations

import dataclasses
import math

import optuna
import pytest

from aurora_sweep.config.study_file import load_config
from aurora_sweep.sweep.outcomes import Complete, Failed, OutOfMemory, Pruned, Recorder, TrialError
from aurora_sweep.sweep.records import TrialRecord


class FakeTrial:
    def __init__(self) -> None:
        self.number, self.user_attrs, self.constraints = 5, {}, {}

    def set_user_attr(self, key, value) -> None:
        self.user_attrs[key] = value

    def set_constraint(self, key, value) -> None:
        self.constraints[key] = value


class FakeRun:
    def __init__(self) -> None:
        self.metrics, self.history, self.tags = {}, {}, {}

    def log_metrics(self, metrics) -> None:
        self.metrics |= metrics

    def log_history(self, history) -> None:
        self.history |= history

    def set_tags(self, tags) -> None:
        self.tags |= tags


@pytest.fixture
def recorder():
    said: list[str] = []
    config = dataclasses.replace(load_config(None), max_forgetting=1.10, gpu_memory_cap=2**30)
    return Recorder(config, say=said.append), said


def complete(**metrics: float) -> Complete:
    scores = {"tp_seeps": 0.2, "tp_seeps_q05": 0.19, "tp_seeps_q95": 0.21,
              "forget_2t_ratio": 1.02, "forget_10v_ratio": 1.05, "forget_2t_ratio_24h": 1.3}  # fmt: skip
    return Complete(
        metrics=scores | metrics, train_loss=[(1, 2.0), (2, 1.5)], val_loss=[(2, 1.4)],
        intermediate=[(1, 0.3)], peak_memory_mb=900.0, seconds=12.5,
        val_terms={"tp": [(2, 0.7)]}, objective_terms="packed", loader_wait_fraction=0.01,
    )  # fmt: skip


def test_a_completed_trial_keeps_its_scores_worst_forgetting_and_history(recorder):
    rec, said = recorder
    trial, run = FakeTrial(), FakeRun()
    scalars = rec.record(complete(), trial, run)
    assert scalars["tp_seeps"] == 0.2 and scalars["trial_seconds"] == 12.5
    assert scalars["peak_memory_mb"] == 900.0 and "peak_reserved_mb" not in scalars
    record = TrialRecord.of(trial)
    assert record.scores == scalars and record.objective_terms == "packed"
    # the constraint is at the study's lead (6 h); 24 h's worst is kept, not enforced
    assert record.worst_forgetting() == ("10v", 1.05)
    assert record.worst_forgetting("_24h") == ("2t", 1.3)
    assert trial.constraints["forgetting_over_max"] == pytest.approx(1.05 - 1.10)
    assert record.infeasible is None and "infeasible" not in run.tags
    assert run.history["train_loss"] == [(1, 2.0), (2, 1.5)]
    assert run.history["val_tp_seeps_subset"] == [(1, 0.3)]
    assert run.history["val_loss_tp"] == [(2, 0.7)] and run.history["tp_seeps"] == [(0, 0.2)]
    assert said == []


def test_a_trial_that_forgets_too_much_completes_but_is_infeasible(recorder):
    rec, _ = recorder
    trial, run = FakeTrial(), FakeRun()
    rec.record(complete(forget_msl_ratio=1.4), trial, run)
    assert trial.constraints["forgetting_over_max"] == pytest.approx(1.4 - 1.10)
    assert "forgets msl: RMSE ×1.40" in trial.user_attrs["infeasible"]
    assert run.tags["infeasible"] == trial.user_attrs["infeasible"]


def test_a_trial_whose_objective_is_not_finite_fails(recorder):
    rec, said = recorder
    trial = FakeTrial()
    with pytest.raises(TrialError, match="objective tp_seeps is nan"):
        rec.record(complete(tp_seeps=math.nan), trial, FakeRun())
    assert "objective tp_seeps is nan" in trial.user_attrs["error"] and "failed" in said[0]


def test_a_pruned_trial_is_pruned_with_its_seconds(recorder):
    rec, said = recorder
    run = FakeRun()
    with pytest.raises(optuna.TrialPruned, match="tp_seeps 0.3100 at step 16"):
        rec.record(Pruned(step=16, value=0.31, seconds=4.0), FakeTrial(), run)
    assert run.metrics == {"trial_seconds": 4.0} and "pruned at step 16" in said[0]
    assert "worse than the median" in said[0]  # what it was pruned for


def test_out_of_memory_is_infeasible_by_what_it_measured_over_the_cap(recorder):
    rec, said = recorder
    trial, run = FakeTrial(), FakeRun()
    with pytest.raises(optuna.TrialPruned):
        rec.record(OutOfMemory("CUDA out of memory", 1324.0, 3.0), trial, run)
    assert trial.user_attrs["measured_peak_mb"] == 1324.0
    assert trial.user_attrs["memory_over_cap_mb"] == pytest.approx(1324.0 - 1024.0)
    assert trial.constraints["memory_over_cap_mb"] == pytest.approx(300.0)
    assert run.tags["infeasible"].startswith("out of memory at 1324 MB")
    assert run.metrics["peak_memory_mb"] == 1324.0 and "infeasible" in said[0]


def test_a_failed_trial_records_its_error(recorder):
    rec, _ = recorder
    trial = FakeTrial()
    with pytest.raises(TrialError, match="ValueError: bad"):
        rec.record(Failed("ValueError: bad", traceback="..."), trial, FakeRun())
    assert trial.user_attrs["error"] == "ValueError: bad"
