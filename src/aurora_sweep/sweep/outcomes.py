"""How a trial ended, and what that means for Optuna and MLflow; and what the study process
and a trial worker say to each other over their pipe.

The worker sends one outcome per trial over its pipe, a dataclass: `Complete`, `Pruned`,
`OutOfMemory` or `Failed`. The pipe's other messages are dataclasses too (`Start`, `RunTrial`,
`Verdict`, `Stop` to the worker; `Ready`, `StartFailed`, `Report` from it), so that either side
reads fields, not positions in a tuple. `record(outcome, trial, run, ...)` is the one place that turns an
outcome into the trial's Optuna state (a value, `TrialPruned`, `TrialError`), its user attributes
(through `records`) and its MLflow metrics, tags and history. It needs no worker, no database and
no torch: its tests pass a fake trial and a fake run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import optuna

from aurora_sweep.config.objective import forget_name
from aurora_sweep.config.recipe import LEADS, lead_suffix
from aurora_sweep.config.study import MIB, StudyConfig
from aurora_sweep.sweep.records import worst_forgetting, write_attrs, write_scores

if TYPE_CHECKING:
    from aurora_sweep.verify.early_stop import Block, PairedState

History = list[tuple[int, float]]


@dataclass
class Complete:
    """The trial trained to its last step and was scored on the whole evaluation split."""

    metrics: dict[str, float]
    train_loss: History
    val_loss: History
    intermediate: History  # the objective on the pruner's subset, by step
    peak_memory_mb: float
    seconds: float
    val_terms: dict[str, History] = field(default_factory=dict)
    objective_terms: str | None = None  # bootstrap.encode_terms, for paired comparisons
    peak_reserved_mb: float | None = None  # CUDA only
    loader_wait_fraction: float | None = None
    #: the base model's scores by precision, then lead, as the worker has them (it scores the
    #: base in a precision when its first trial in that precision comes)
    base_mse: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)


@dataclass
class Pruned:
    """The pruner stopped the trial at `step`, where its objective on the subset was `value`."""

    step: int
    value: float
    seconds: float


@dataclass
class ScoringStopped:
    """The trial trained to its last step, but its scoring stopped after `days` of the split's
    `of` days: on those it could not beat the best trial (`verify.early_stop`); `value` is its
    objective over them, a partial score."""

    value: float
    days: int
    of: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)  # where its time went


@dataclass
class OutOfMemory:
    """The device ran out of memory; the worker exits and a fresh one takes the next trial."""

    message: str
    peak_memory_mb: float
    seconds: float
    restart: bool = True


@dataclass
class Failed:
    """The trial raised in the worker (its config's fault: not retried)."""

    message: str
    traceback: str = ""
    restart: bool = False


Outcome = Complete | Pruned | ScoringStopped | OutOfMemory | Failed

#: the study's base-model scores: by `recipe.BaseKey` (as text), then lead, then variable
BaseScores = dict[str, dict[str, dict[str, float]]]


@dataclass(frozen=True)
class Start:
    """To a worker, first (it may be launched before the data exist): make or open the data,
    with the base model's and Aurora 1.5's scores the study already has."""

    base_mse: BaseScores | None
    aurora15: dict[str, dict] | None


@dataclass(frozen=True)
class Ready:
    """From a worker that has its data: what it holds and where it trains, and the base model's
    and Aurora 1.5's scores as it has them now (the study keeps them for later workers)."""

    train: int
    validation: int
    device: str
    checkpoint: str
    base_mse: BaseScores
    aurora15: dict[str, dict]


@dataclass(frozen=True)
class StartFailed:
    """From a worker that could not make its data or model (a config's fault: said as is)."""

    message: str


@dataclass(frozen=True)
class RunTrial:
    """To a worker: run this trial (`TrialConfig.to_dict`), leaving its adapter in
    `adapter_dir`."""

    trial: dict[str, Any]
    adapter_dir: str


@dataclass(frozen=True)
class Report:
    """From a worker: the trial's objective on the pruner's subset at `step`; it waits for a
    `Verdict`."""

    step: int
    value: float


@dataclass
class Progress:
    """From a training worker, unanswered: the training loss of the steps since its last
    `Progress`, sent every few seconds, before each pruner check and at the last step, so that
    a running trial's curve grows in MLflow and in the live view (`worker.LIVE_SECONDS`)."""

    train_loss: list[tuple[int, float]]


@dataclass
class Scored:
    """From a worker scoring a trial block by block: the objective's per-sample terms of the
    samples scored so far (`positions` among the objective lead's `of` samples) and, where the
    study has the base model's errors by day, every state variable's errors by day beside the
    base's (`state`); it waits for a `Verdict` (prune: stop scoring, the trial cannot win or
    forgets)."""

    positions: list[int]
    num: list[float]
    den: list[float]
    of: int = 0
    state: PairedState | None = None

    @classmethod
    def of_block(cls, block: Block, of: int) -> Scored:
        """The message of an `early_stop.Block`."""
        terms = (block.positions.tolist(), block.num.tolist(), block.den.tolist())
        return cls(*terms, of, block.state)


@dataclass(frozen=True)
class Verdict:
    """To a worker, in answer to a `Report`: stop the trial (prune) or go on."""

    prune: bool


@dataclass(frozen=True)
class Stop:
    """To a worker between trials: exit."""


class TrialError(RuntimeError):
    """A trial raised inside its worker (recorded as FAIL; the study goes on)."""


class _Trial(Protocol):
    number: int
    user_attrs: dict[str, Any]

    def set_user_attr(self, key: str, value: Any) -> None: ...
    def set_constraint(self, key: str, value: float) -> None: ...


class _Run(Protocol):
    def log_metrics(self, metrics: dict[str, float]) -> None: ...
    def log_history(self, history: dict[str, History]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...


@dataclass
class Recorder:
    """Records outcomes for one study: its config, memory cap and where to say what happened."""

    config: StudyConfig
    say: Callable[[str], None]

    def failed(self, trial: _Trial, reason: str) -> TrialError:
        """Record why `trial` failed and say so; the error to raise (Optuna records FAIL)."""
        write_attrs(trial, error=reason[:1000])
        self.say(f"trial {trial.number:3d}  failed: {reason}")
        return TrialError(reason)

    def infeasible(self, trial: _Trial, run: _Run, reason: str, over_mb: float, seconds: float):
        """A trial over the memory cap (predicted or measured): a constraint the samplers avoid,
        pruned so that it counts towards the study's total. Returns the exception to raise."""
        over_mb = max(over_mb, 1.0)
        write_attrs(trial, memory_over_cap_mb=over_mb)
        trial.set_constraint("memory_over_cap_mb", over_mb)
        write_attrs(trial, infeasible=reason)
        run.set_tags({"infeasible": reason})
        run.log_metrics({"trial_seconds": seconds})
        self.say(f"trial {trial.number:3d}  infeasible: {reason}")
        return optuna.TrialPruned(reason)

    def check_forgetting(self, trial: _Trial, run: _Run, variable: str, ratio: float) -> None:
        """A trial that made a variable Aurora already predicted worse than `max_forgetting`
        times the base model's RMSE is infeasible: the constraint steers the sampler away and
        `best` never offers it as the answer."""
        limit = self.config.max_forgetting
        trial.set_constraint("forgetting_over_max", ratio - limit)
        if ratio > limit:
            reason = f"forgets {variable}: RMSE ×{ratio:.2f} the base model's (max ×{limit:g})"
            write_attrs(trial, infeasible=reason)
            run.set_tags({"infeasible": reason})

    def record(self, outcome: Outcome, trial: _Trial, run: _Run) -> dict[str, float]:
        """Record `outcome` in the trial and its run. Returns a completed trial's scalars (every
        score, peak memory, seconds); raises `optuna.TrialPruned` for a pruned or out-of-memory
        trial and `TrialError` for a failed one."""
        config = self.config
        if isinstance(outcome, Pruned):
            self.say(
                f"trial {trial.number:3d}  pruned at step {outcome.step}: {config.objective} "
                f"{outcome.value:.4f} on the pruner's subset, worse than the median of the "
                "trials before it at that step"
            )
            run.log_metrics({"trial_seconds": outcome.seconds})
            raise optuna.TrialPruned(
                f"{config.objective} {outcome.value:.4f} at step {outcome.step}"
            )
        if isinstance(outcome, ScoringStopped):
            self.stopped(outcome, trial, run)
        if isinstance(outcome, OutOfMemory):
            write_attrs(trial, measured_peak_mb=outcome.peak_memory_mb)
            run.log_metrics({"peak_memory_mb": outcome.peak_memory_mb})
            cap = config.gpu_memory_cap
            limit = cap / MIB if cap else outcome.peak_memory_mb
            raise self.infeasible(
                trial,
                run,
                f"out of memory at {outcome.peak_memory_mb:.0f} MB ({outcome.message[:200]})",
                outcome.peak_memory_mb - limit,
                outcome.seconds,
            )
        if isinstance(outcome, Failed):
            raise self.failed(trial, outcome.message)
        return self._complete(outcome, trial, run)

    def stopped(self, outcome: ScoringStopped, trial: _Trial, run: _Run) -> None:
        """A trial whose scoring stopped: pruned, its partial objective kept apart from a
        completed trial's scores (`partial`) and labelled so wherever it is shown; one stopped
        for forgetting (the study's test says so, `link.stops_scoring`) is infeasible too."""
        config, name = self.config, self.config.objective_metric
        partial = {"value": outcome.value, "days": outcome.days, "of": outcome.of}
        why = f"{name} {outcome.value:.4f} on those days (partial), worse than the best trial's "
        why += "on the same days"
        test = trial.user_attrs.get("scoring_test") or {}
        if test.get("forgets"):
            variable, ratio = test["forgets"], test["ratio"]
            partial |= {"forgets": variable, "ratio": ratio}
            self.check_forgetting(trial, run, variable, ratio)
            why = (
                f"forgets {variable} ×{ratio:.2f} on those days (max "
                f"×{config.max_forgetting:g}): never the answer; {name} {outcome.value:.4f} "
                "there (partial)"
            )
        write_attrs(trial, partial=partial)
        metrics = {f"{name}_partial": outcome.value, "scored_days": outcome.days}
        run.log_metrics(metrics | {"trial_seconds": outcome.seconds, **outcome.metrics})
        self.say(
            f"trial {trial.number:3d}  scoring stopped after {outcome.days} of {outcome.of} days: "
            + why
        )
        raise optuna.TrialPruned(
            f"{config.objective} {outcome.value:.4f} over {outcome.days} of {outcome.of} days"
        )

    def _complete(self, outcome: Complete, trial: _Trial, run: _Run) -> dict[str, float]:
        config = self.config
        value = outcome.metrics.get(config.objective_metric, float("nan"))
        if not math.isfinite(value):
            raise self.failed(
                trial,
                f"its objective {config.objective_metric} is {value} (the forecast or the "
                "scores are not finite)",
            )
        scalars = {
            **outcome.metrics,
            "peak_memory_mb": outcome.peak_memory_mb,
            "trial_seconds": outcome.seconds,
        }
        if outcome.peak_reserved_mb is not None:
            scalars["peak_reserved_mb"] = outcome.peak_reserved_mb
        if outcome.loader_wait_fraction is not None:
            scalars["loader_wait_fraction"] = outcome.loader_wait_fraction
        worst_variable: dict[str, str] = {}
        for steps in LEADS:  # the worst forgetting at every lead scored
            suffix = lead_suffix(steps)
            worst = worst_forgetting(outcome.metrics, suffix)
            if worst is not None:
                scalars[forget_name("worst", suffix)] = worst[1]
                worst_variable[suffix] = worst[0]
                if steps == config.lead_steps:  # the constraint: at the study's lead
                    self.check_forgetting(trial, run, *worst)
        run.log_history(
            {
                "train_loss": outcome.train_loss,
                "val_loss": outcome.val_loss,
                **{f"val_loss_{k}": v for k, v in outcome.val_terms.items()},
                f"val_{config.objective.name}_subset": outcome.intermediate,
                **{k: [(0, v)] for k, v in scalars.items()},
            }
        )
        write_scores(trial, scalars, worst_variable)
        if outcome.objective_terms:
            write_attrs(trial, objective_terms=outcome.objective_terms)
        return scalars
