"""TrialRecord: what a trial keeps in Optuna's storage, read and written without torch."""

from __future__ import annotations

import math

import optuna
import pytest

from aurora_sweep.config.objective import Objective
from aurora_sweep.processes import this_process
from aurora_sweep.sweep.records import SCORES, TrialRecord, attrs, write_attrs, write_scores

SEEPS = Objective.parse("tp_seeps")


class FakeTrial:
    """The part of an Optuna trial a record uses: a number and user attributes."""

    def __init__(self, number: int = 3, **attrs: object) -> None:
        self.number = number
        self.user_attrs = dict(attrs)
        self.writes = 0

    def set_user_attr(self, key: str, value: object) -> None:
        self.user_attrs[key] = value
        self.writes += 1


SCORED = {"tp_seeps": 0.2, "tp_seeps_q05": 0.18, "tp_seeps_q95": 0.22, "tp_seeps_24h": 0.3,
          "forget_worst_ratio": 1.04, "forget_worst_ratio_24h": 1.08, "peak_memory_mb": 1500.0}  # fmt: skip


def test_scores_are_written_in_one_attribute_and_read_back():
    trial = FakeTrial(predicted_peak_mb=90.0, config={"method": "dora"})
    write_scores(trial, SCORED, {"": "10v", "_24h": "2t"})
    assert trial.writes == 3  # the scores, and the worst variable at each of two leads
    record = TrialRecord.of(trial)
    assert record.scores == SCORED and record.method == "dora"
    assert record.interval(SEEPS) == (0.18, 0.22)
    assert record.interval(SEEPS.at(4)) is None  # no interval at 24 h was stored
    assert record.worst_forgetting() == ("10v", 1.04)
    assert record.worst_forgetting("_24h") == ("2t", 1.08)
    assert record.worst_forgetting("_12h") is None
    assert record.value("predicted_peak_mb") == 90.0 and record.value("peak_memory_mb") == 1500.0
    assert math.isnan(record.get("tp_rmse")) and record.value("tp_rmse") is None


def test_a_study_written_with_one_attribute_per_score_reads_the_same():
    trial = FakeTrial(
        **SCORED, forget_worst="10v", predicted_peak_mb=90.0, pid=4242, retry_of=1,
        memory_over_cap_mb=0.0, mlflow_run_id="abc", infeasible="forgets 10v",
    )  # fmt: skip
    record = TrialRecord.of(trial)
    assert record.scores == SCORED  # pid, retry_of, the cap and the prediction are not scores
    assert record.worst_forgetting() == ("10v", 1.04)
    assert record.retry_of == 1 and record.pid == 4242 and record.mlflow_run_id == "abc"
    assert record.infeasible == "forgets 10v"


def test_a_trial_without_scores_has_an_empty_record():
    record = TrialRecord.of(FakeTrial(number=7, reference="full", memory_over_cap_mb=12.5))
    assert record.number == 7 and record.scores == {} and record.reference == "full"
    assert record.method == "full" and record.memory_over_cap_mb == 12.5
    assert record.interval(SEEPS) is None and not record.on_gpu


def test_a_record_reads_a_real_optuna_trial():
    trial = optuna.trial.create_trial(
        value=0.2, user_attrs={SCORES: SCORED, "forget_worst": "msl", "peak_reserved_mb": 3.0}
    )
    record = TrialRecord.of(trial)
    assert record.worst_forgetting() == ("msl", 1.04) and record.get("tp_seeps") == 0.2
    assert not record.on_gpu  # peak_reserved_mb counts as a measurement only inside the scores
    gpu = optuna.trial.create_trial(value=0.2, user_attrs={SCORES: {"peak_reserved_mb": 3.0}})
    assert TrialRecord.of(gpu).on_gpu


def test_attributes_are_written_by_field_name_and_read_back_typed():
    trial = FakeTrial()
    write_attrs(trial, retry_of=0, interrupted=True, killed_by=None, **this_process())
    assert "killed_by" not in trial.user_attrs  # None is left out
    record = TrialRecord.of(trial)
    assert record.retry_of == 0 and record.interrupted and record.killed_by is None
    assert (record.host, record.pid, record.pid_started) == tuple(this_process().values())


def test_a_misspelt_attribute_is_refused_where_it_is_written():
    trial = FakeTrial()
    with pytest.raises(KeyError, match="retried_of"):
        write_attrs(trial, retried_of=2)
    with pytest.raises(KeyError, match="scores"):  # written by write_scores only
        attrs(scores={})
    assert trial.user_attrs == {}
