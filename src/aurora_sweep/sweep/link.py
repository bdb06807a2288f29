"""What the study process answers a running trial's worker (`TrialLink`): the pruner's verdict
at each check, whether its scoring stops (`stops_scoring`), its curve into MLflow as it grows,
and the live view's news of it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from aurora_sweep.config.study import StudyConfig
from aurora_sweep.sweep.live import Watch
from aurora_sweep.sweep.records import TrialRecord, ranked, write_attrs


@dataclass
class TrialLink:
    """What the study process answers a running trial's worker: the pruner's verdict at each
    check (a finalist's replica trains to its end: its seed is what it is there for), whether
    its scoring stops, and its curve logged to MLflow as it grows; the live view follows it."""

    config: StudyConfig
    trial: optuna.Trial
    run: Any
    watch: Watch
    index: int = 0
    eval_every: int = 1
    steps: int = 1
    #: a finalist's replica (from its enqueueing on): never pruned
    replica: bool = False

    def report(self, step: int, value: float) -> bool:
        self.watch.worker_checked(self.index)
        self.run.log_history({f"val_{self.config.objective.name}_subset": [(step, value)]})
        self.run.flush()  # the pruner's value in MLflow as the trial trains
        if self.config.cost:  # Optuna prunes single-objective studies only
            return False
        self.trial.report(value, step)
        return not self.replica and self.trial.should_prune()

    def progress(self, message) -> None:
        step, loss = message.train_loss[-1]
        checking = step % self.eval_every == 0 and step < self.steps
        self.watch.worker_step(self.index, step, loss, checking=checking)
        self.run.log_history({"train_loss": message.train_loss})
        self.run.flush()

    def scored(self, message) -> bool:
        self.watch.worker_scored(self.index, len(message.positions), message.of)
        return stops_scoring(self.config, self.trial, message)


def stops_scoring(config: StudyConfig, trial: optuna.Trial, message) -> bool:
    """Whether `trial`, scored so far on some samples (`outcomes.Scored`), makes a variable
    Aurora already predicts worse than `[study] max_forgetting` allows beyond doubt
    (`early_stop.forgets`: it can never be the answer), or cannot beat the study's best
    feasible trial on the same samples (`early_stop.cannot_win`): then its scoring stops. The
    reference recipes, the finalists' replicas and the trials of a two-objective study (its
    Pareto front needs every trial's whole score) are always scored whole."""
    import numpy as np

    from aurora_sweep.verify.bootstrap import decode_terms
    from aurora_sweep.verify.early_stop import cannot_win, forgets

    record = TrialRecord.of(trial)
    if not config.scoring_pruner or config.cost or record.reference:
        return False
    if record.replica_of is not None:
        return False
    state = message.state
    found = state and forgets(state, config.max_forgetting, p_threshold=config.scoring_pruner)
    if found:
        variable, ratio, p, compared = found
        test = {"forgets": variable, "ratio": ratio, "p": p, "days": compared}
        write_attrs(trial, scoring_test=test)
        return True
    best = next(iter(ranked(trial.study.get_trials(deepcopy=False))), None)
    packed = TrialRecord.of(best).objective_terms if best is not None else None
    if packed is None:
        return False
    num, den, days = decode_terms(packed)
    at = np.asarray(message.positions, dtype=int)
    mine = (np.asarray(message.num, float), np.asarray(message.den, float))
    stop, p, compared = cannot_win(
        config.objective.at(config.lead_steps),
        mine,
        (num[at], den[at]),
        days[at],
        p_threshold=config.scoring_pruner,
    )
    if stop:
        write_attrs(trial, scoring_test={"against": best.number, "p": p, "days": compared})
    return stop
