"""What a trial leaves in Optuna's storage besides its parameters, values and constraints.

`TrialRecord` owns every user-attribute key: the sweep writes through `write_attrs` (a name that
is not a field of the record raises at once, in the process that writes) and `results`, `cli`,
the storage's recovery and the study figures read through `TrialRecord.of`, so a key is named in
one place. A trial's scores (every
tp score at every lead, the forgetting ratios, peak memory and seconds: about 250 numbers) are
one attribute, `scores`, written in one storage transaction; one attribute per score took 0.6 s
of each demo trial on SQLite. Studies written before keep one attribute per score, and read the
same. Everything here is plain Python: no torch, no worker, no database.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import optuna

from aurora_sweep.config.objective import Objective, forget_name, forgotten

#: every score and measurement of a finished trial, {name: value}
SCORES = "scores"
#: the study's user attribute with the base model's MSE per variable, by `recipe.BaseKey`, then lead
#: (a study written when one base was searched keyed it by precision alone, under another name:
#: its base scores are computed again, once)
BASE_MSE = "base_mse_by_base"
#: the study's user attribute with the zero-shot Aurora 1.5 baseline's scores by lead, made by
#: the first worker (`zero_shot.references_of`)
AURORA15 = "aurora15_by_lead"
#: the variable with the worst forgetting ratio at a lead: FORGET_WORST + lead suffix
FORGET_WORST = "forget_worst"
#: attributes that hold numbers but are not scores (a study before SCORES stored both flat)
_NOT_SCORES = frozenset(
    {"pid", "pid_started", "retry_of", "memory_over_cap_mb", "measured_peak_mb", "killed_by"}
)


class _HasAttrs(Protocol):
    number: int

    @property
    def user_attrs(self) -> dict[str, Any]: ...


class _SetsAttrs(Protocol):
    def set_user_attr(self, key: str, value: Any) -> None: ...


@dataclass(frozen=True)
class TrialRecord:
    """A trial's user attributes, typed. `of(trial)` reads any Optuna trial (frozen or live)."""

    number: int
    #: the whole recipe (`TrialConfig.to_dict`), sampled or not
    config: dict[str, Any] | None = None
    #: "full" or "lora" for the study's reference recipes
    reference: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    #: lead suffix ('' for 6 h, '_12h', '_24h') -> the variable forgotten most there
    worst_variable: dict[str, str] = field(default_factory=dict)
    predicted_peak_mb: float | None = None
    memory_over_cap_mb: float = 0.0
    measured_peak_mb: float | None = None  # an out-of-memory trial's peak
    infeasible: str | None = None
    error: str | None = None
    interrupted: bool = False
    killed_by: str | None = None
    retry_of: int | None = None
    surplus: bool = False
    #: the process that ran it (`processes.this_process`): a dead one's trial is reaped
    host: str | None = None
    pid: int | None = None
    pid_started: float | None = None
    mlflow_run_id: str | None = None
    mlflow_parent_run_id: str | None = None
    #: the objective's per-sample terms (bootstrap.encode_terms), for paired comparisons
    objective_terms: str | None = None
    #: a finalist's re-training with another seed: the finalist's trial number (`finalists`)
    replica_of: int | None = None
    #: the training seed a replica trains with (None: the study's `[train] seed`)
    seed: int | None = None
    #: a trial whose scoring stopped early (`verify.early_stop`): its objective over the days
    #: scored ("value", "days", "of"; with "forgets" and "ratio" when it forgot), a partial
    #: score; and the test that stopped it ("against": the best trial's number, or "forgets":
    #: the variable and its "ratio"; "p", "days" compared)
    partial: dict[str, Any] | None = None
    scoring_test: dict[str, Any] | None = None

    @classmethod
    def of(cls, trial: _HasAttrs) -> TrialRecord:
        a = trial.user_attrs
        scores = a.get(SCORES)
        if scores is None:  # a study written with one attribute per score
            scores = {
                k: float(v)
                for k, v in a.items()
                if isinstance(v, int | float)
                and not isinstance(v, bool)
                and k not in _NOT_SCORES
                and k != "predicted_peak_mb"
            }
        worst = {
            k[len(FORGET_WORST) :]: v
            for k, v in a.items()
            if k.startswith(FORGET_WORST) and isinstance(v, str)
        }
        return cls(
            number=trial.number,
            config=a.get("config"),
            reference=a.get("reference"),
            scores=dict(scores),
            worst_variable=worst,
            predicted_peak_mb=a.get("predicted_peak_mb"),
            memory_over_cap_mb=float(a.get("memory_over_cap_mb", 0.0)),
            measured_peak_mb=a.get("measured_peak_mb"),
            infeasible=a.get("infeasible"),
            error=a.get("error"),
            interrupted=bool(a.get("interrupted", False)),
            killed_by=a.get("killed_by"),
            retry_of=a.get("retry_of"),
            surplus=bool(a.get("surplus", False)),
            host=a.get("host"),
            pid=a.get("pid"),
            pid_started=a.get("pid_started"),
            mlflow_run_id=a.get("mlflow_run_id"),
            mlflow_parent_run_id=a.get("mlflow_parent_run_id"),
            objective_terms=a.get("objective_terms"),
            replica_of=a.get("replica_of"),
            seed=a.get("seed"),
            partial=a.get("partial"),
            scoring_test=a.get("scoring_test"),
        )

    def value(self, name: str) -> float | None:
        """A score or measurement by name ('tp_seeps_24h', 'peak_memory_mb',
        'predicted_peak_mb'); None when the trial has none."""
        if name in self.scores:
            return self.scores[name]
        if name == "predicted_peak_mb":
            return self.predicted_peak_mb
        return None

    def get(self, name: str, default: float = float("nan")) -> float:
        value = self.value(name)
        return default if value is None else value

    def interval(self, objective: Objective) -> tuple[float, float] | None:
        """The 90 % bootstrap interval of `objective` (at its lead)."""
        lo, hi = self.value(objective.of("q05")), self.value(objective.of("q95"))
        return (lo, hi) if lo is not None and hi is not None else None

    def worst_forgetting(self, suffix: str = "") -> tuple[str, float] | None:
        """(variable, ratio) of the worst forgetting at the lead `suffix` names."""
        ratio = self.value(forget_name("worst", suffix))
        variable = self.worst_variable.get(suffix)
        return (variable, ratio) if variable is not None and ratio is not None else None

    @property
    def on_gpu(self) -> bool:
        """Whether the trial ran on a GPU (CUDA reports the memory it reserved)."""
        return "peak_reserved_mb" in self.scores

    @property
    def base(self) -> str | None:
        """The base the trial adapted (None for a trial not yet sampled)."""
        return (self.config or {}).get("base")

    @property
    def method(self) -> str:
        return (self.config or {}).get("method") or self.reference or "lora"


def worst_forgetting(scores: Mapping[str, float], suffix: str = "") -> tuple[str, float] | None:
    """The variable whose RMSE grew most at the lead `suffix` names ('': 6 h), and its ratio,
    from a trial's scores (`forget_<variable>_ratio<suffix>`)."""
    named = ((forgotten(k, suffix), v) for k, v in scores.items())
    ratios = {k: v for k, v in named if k not in (None, "worst") and math.isfinite(v)}
    if not ratios:
        return None
    name = max(ratios, key=ratios.__getitem__)
    return name, ratios[name]


#: the attributes `write_attrs` sets: the record's fields that are stored under their own name
WRITABLE = frozenset(f.name for f in fields(TrialRecord)) - {"number", "scores", "worst_variable"}


def attrs(**values: Any) -> dict[str, Any]:
    """User attributes by `TrialRecord` field name, None left out (for `enqueue_trial`); a name
    that is not a field raises KeyError."""
    unknown = set(values) - WRITABLE
    if unknown:
        raise KeyError(f"not a TrialRecord attribute: {', '.join(sorted(unknown))}")
    return {k: v for k, v in values.items() if v is not None}


def write_attrs(trial: _SetsAttrs, **values: Any) -> None:
    """Set `trial`'s user attributes by `TrialRecord` field name (None left out)."""
    for key, value in attrs(**values).items():
        trial.set_user_attr(key, value)


def write_scores(trial: _SetsAttrs, scores: Mapping[str, float], worst: Mapping[str, str]) -> None:
    """Store a finished trial's scores (one attribute) and, by lead suffix, the variable it
    forgot most."""
    trial.set_user_attr(SCORES, {k: float(v) for k, v in scores.items()})
    for suffix, variable in worst.items():
        trial.set_user_attr(FORGET_WORST + suffix, variable)


# The search's trials, ranked (what `best` shows and the finalists are chosen from)


def ranked(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Of `trials`, the feasible ones, best (lowest objective) first: completed, within the
    memory cap, and not forgetting more than the study allows (`forgets`)."""
    return [t for t in completed(trials) if not forgets(t)]


def completed(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Of `trials`, the completed ones within the memory cap (feasible or not), best first; a
    finalist's replicas (its other seeds) are not trials of the search and are left out."""
    done = [
        t
        for t in trials
        if t.state == optuna.trial.TrialState.COMPLETE
        and t.values
        and (record := TrialRecord.of(t)).memory_over_cap_mb <= 0
        and record.replica_of is None
    ]
    return sorted(done, key=score)


def forgets(trial: optuna.trial.FrozenTrial) -> bool:
    """True when the trial made a variable Aurora already predicted worse than the study's
    `max_forgetting` allows (its Optuna constraint is violated)."""
    return trial.constraints.get("forgetting_over_max", 0.0) > 0


def score(trial: optuna.trial.FrozenTrial) -> float:
    """A completed trial's objective (the first of a multi-objective study's values)."""
    return trial.values[0]
