"""The study's objective on part of the evaluation split: the pruner's fixed subset, the blocks
of days a trial is scored in (`early_stop`), and whether the split defines it at all."""

from __future__ import annotations

import numpy as np

from aurora_sweep.data.climates import SEEPS_P_DRY_RANGE
from aurora_sweep.data.samples import Samples
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.verify.interior import cut, cut_lat, cut_seeps, objective_window
from aurora_sweep.verify.metrics import objective_terms, objective_value


def check_objective_defined(data) -> None:
    """Refuse, before the first trial, an objective the evaluation split cannot define.

    SEEPS scores only grid points whose climatological dry fraction lies within 0.1..0.85 (in
    the month and hour of each target): a region and period where every point is always dry or
    always wet there leaves nothing to score, every trial's objective would be NaN and a study
    would never finish a trial.
    """
    if data.objective.score != "seeps":
        return
    times = data.scored.target_times()
    seeps = cut_seeps(data.lead_seeps[data.objective_steps], objective_window(data))
    p_dry = seeps.p_dry[times.month.values - 1, times.hour.values // 6]
    low, high = SEEPS_P_DRY_RANGE
    with np.errstate(invalid="ignore"):
        scored = (
            (p_dry >= low)
            & (p_dry <= high)
            & np.isfinite(seeps.light_heavy[times.month.values - 1, times.hour.values // 6])
        )
    if not scored.any():
        seen = p_dry[np.isfinite(p_dry)]
        span = f"{seen.min():.2f}..{seen.max():.2f}" if seen.size else "undefined"
        raise AuroraSweepError(
            f"{data.objective} is undefined on the {data.validation.split} split: at every grid "
            f"point {'of the interior ' if data.objective.interior else ''}the train split's dry fraction (here {span}) lies outside {low}..{high} in "
            "the months and hours scored, so SEEPS leaves nothing to score; use [study] objective"
            f' = "{data.validation.variable.metric("rmse")}", or a region and period with both '
            "dry and wet 6-hour values"
        )


def subset_objective(values: np.ndarray, data, indices: np.ndarray) -> float:
    """The study's objective for a forecast of the evaluation samples `indices` at the
    objective's lead (for pruning)."""
    return objective_value(data.objective, **_subset(values, data, indices))


def subset_terms(values: np.ndarray, data, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each of the evaluation samples `indices`' (numerator, denominator) of the study's
    objective at its lead, for their forecast `values` (`metrics.objective_terms`)."""
    return objective_terms(data.objective, **_subset(values, data, indices))


def _subset(values: np.ndarray, data, indices: np.ndarray) -> dict:
    """The arguments of `metrics.objective_value` for a forecast `values` of the evaluation
    samples `indices` at the objective's lead, on the objective's points."""
    samples: Samples = data.scored
    times = samples.target_times()[indices]
    window = objective_window(data)
    land = samples.scored_points
    return dict(
        forecast=cut(values, window),
        observed=cut(samples.observed(indices), window),
        lat=cut_lat(samples.cube["latitude"].values, window),
        months=times.month.values,
        hours=times.hour.values,
        seeps=cut_seeps(data.lead_seeps[samples.steps], window),
        land=None if land is None else cut(land, window),
    )
