"""Verification: the scores of the target every trial and every evaluation reports.

Why this module exists: a sweep ranks trials by one number and a report compares recipes, so the
numbers must mean what they mean elsewhere in the field. Every score comes from `scores` (the
Bureau of Meteorology's verification package, on xarray data); this module only chooses the
scores' settings, feeds them samples in chunks (bounded memory), combines per-sample statistics
(for pooling and for the bootstrap) and names the results `<target>_<score>`
(`targets.Target.metric`). Values are in the target's units over the lead (below, for tp: mm).
Which scores a target gets depends on its kind: a precipitation-like one (tp, pr, rain_rate,
ro, sf) all of the below, SEEPS only where it is defined (tp, pr), thresholds in its own units
(`Target.thresholds`); a continuous one (swvl1) RMSE, MAE, bias and the anomaly correlation
`acc` against the train climatology (WeatherBench 2's ACC: each sample's latitude-weighted
uncentred correlation of forecast and observed anomalies, averaged over samples; higher is
better, NaN for the climatology itself).

Inputs: arrays shaped (n, lat, lon) for n samples, `lat` in degrees, `months` (1..12), `hours`
(0, 6, 12 or 18 UTC) and `days` (datetime64[D]) of each sample's *target* (valid) time.

The scores, for a forecast f against observations o (`w` = cos(latitude), from scores'
`create_latitude_weights`; "pooled" = over all samples and grid points together):

- `tp_rmse`, `tp_mae`, `tp_bias`: latitude-weighted pooled root mean squared error, mean absolute
  error and mean error f - o (scores' `mse`, `mae`, `additive_bias`, per sample, then averaged:
  every kept sample has the same total weight, so that average is the pooled weighted mean).
- `tp_seeps`: the Stable Equitable Error in Probability Space (Rodwell et al. 2010) as WeatherBench 2
  uses it for 6-hour totals, via `scores.categorical.seeps`: `seeps` defines it and says how it
  differs from WeatherBench 2's.
- `tp_csi_{t}`, `tp_ets_{t}`, `tp_fbias_{t}`: critical success index hits/(hits+misses+false
  alarms), equitable threat score (hits corrected for random hits) and frequency bias (forecast
  events / observed events) for the event "tp >= t mm", t in `Target.thresholds`. `>=` is
  the side of scores' `ThresholdEventOperator` default (`operator.ge`); `spatial.contingency_counts`
  counts as scores does (a test holds them equal), in NumPy.
  Counts are pooled over samples and points and NOT latitude-weighted: these are the usual
  grid-point contingency counts (scores' `transform` sums events; MET's grid-stat does the same by
  default), and they live in grid space like the FSS next to them. Pooled, not per time and
  averaged: a small region's 6-hour window often holds no event at the higher thresholds, where
  a per-time CSI or ETS is undefined. Pooling over points of different climates credits a
  forecast for knowing where it rains more often (Hamill and Juras 2006), so these compare
  recipes of one study, not published values.
- `tp_fss_{t}_w{w}`: fractions skill score (Roberts and Lean 2008) of the event "tp >= t mm" in
  square windows of w x w grid points, as `scores.spatial.fss_2d` computes it with
  `np.greater_equal` (its default is `>`, which we override to match the categorical scores) and
  its default inner border (windows wholly inside the region); pooled over samples the way scores
  aggregates (means of the window fraction terms, then one ratio). scores gives 0 when neither
  field has an event; a window larger than the region gives NaN here. `fss` is scores' algorithm
  (summed-area tables) over every sample at once: scores runs it sample by sample from Python,
  0.75 s of each demo trial; a test holds the two equal on fields with and without events.
- `tp_skill_persistence`, `tp_skill_climatology`: 1 - objective/objective of the reference
  (`skill`), on the chosen objective (`<target>_seeps` or `<target>_rmse`).

Comparing trials: see `bootstrap`.

The box's interior: with an edge margin (`interior`), every score above is made again on the
points that far in from each side, for the model and every baseline, named with `_interior`
before the lead's suffix (`tp_seeps_interior_24h`).

Missing data: samples whose observed field holds any NaN are dropped from every score, for the
model and both references alike (the comparison stays paired); scores would otherwise skip NaN in
the continuous scores and SEEPS but count them as "no event" in the FSS. A forecast holding a NaN
or inf on a kept sample has failed: all its scores (and skills) are NaN rather than scores of the
points where it happened to be finite.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import xarray as xr
from scores.categorical import BasicContingencyManager
from scores.continuous import additive_bias, mae, mse, rmse
from scores.functions import create_latitude_weights

from aurora_sweep.config.objective import INTERIOR, Objective
from aurora_sweep.config.settings import Window
from aurora_sweep.config.targets import DEFAULT, TARGETS, Target
from aurora_sweep.data.climates import SeepsClimate, hour_slots
from aurora_sweep.verify.bootstrap import (
    block_bootstrap,
    interval,
    objective_from,
    resampled_sums,
)
from aurora_sweep.verify.inputs import check_inputs
from aurora_sweep.verify.interior import cut, cut_lat, cut_seeps
from aurora_sweep.verify.seeps import seeps_terms
from aurora_sweep.verify.spatial import anomaly_correlation, contingency_counts, fss

FSS_WINDOWS = (5, 11)  # square windows, in grid points

DIMS = ("sample", "latitude", "longitude")
SPATIAL = ("latitude", "longitude")
# Grid points scored at once (samples x lat x lon): scores builds a dozen full-size temporaries per
# call, so 2**21 points (64 samples at 0.25 deg over Europe) keep that near 200 MB for any n.
CHUNK_POINTS = 2**21


def lat_weighted_rmse(forecast: np.ndarray, observed: np.ndarray, lat: np.ndarray) -> float:
    """RMSE over samples and grid points, each point weighted by cos(latitude)."""
    return float(rmse(_field(forecast), _field(observed), weights=_weights(lat)))


def lat_weighted_mse(
    forecast: np.ndarray, observed: np.ndarray, lat: np.ndarray, *, each: bool = False
) -> np.ndarray:
    """The squares of `lat_weighted_rmse` in NumPy, one per leading index after the first:
    (n, lat, lon) gives a scalar, (n, level, lat, lon) one MSE per level; with `each`, one per
    sample too ((n,) and (n, level)), whose mean is the former.

    The forgetting ratios need an MSE for every variable and level of every batch scored; through
    `scores` (xarray) that was a third of a demo trial's verification. The weights are the same
    `create_latitude_weights` values, so the two agree to rounding (tests/test_metrics.py).
    """
    w = _weights(lat).values[:, None]  # (lat, 1)
    err = (np.asarray(forecast, np.float64) - np.asarray(observed, np.float64)) ** 2
    if each:
        return (err * w).sum(axis=(-2, -1)) / (w.sum() * err.shape[-1])
    axes = (0, -2, -1)
    return (err * w).sum(axis=axes) / (w.sum() * err.shape[0] * err.shape[-1])


def skill(score: float, reference: float) -> float:
    """1 - score/reference: 1 is perfect, 0 is no better than the reference."""
    return 1.0 - score / reference if reference > 0 else float("nan")


def objective_value(
    objective: Objective,
    *,
    forecast: np.ndarray,
    observed: np.ndarray,
    lat: np.ndarray,
    months: np.ndarray,
    hours: np.ndarray,
    seeps: SeepsClimate | None,
    land: np.ndarray | None = None,
) -> float:
    """The objective alone, for one forecast: the same number `scores` reports for it.

    Args:
        objective: what is scored (`Objective.parse`).
        forecast: the model's forecast, in the target's units, (n, lat, lon).
        observed: the observed totals, (n, lat, lon).
        lat: latitudes in degrees, (lat,).
        months: calendar month (1..12) of each sample's target time, (n,).
        hours: valid hour (0, 6, 12 or 18 UTC) of each sample's target time, (n,).
        seeps: the train split's SEEPS climate (used for `<target>_seeps`; None: no SEEPS).
        land: the (lat, lon) points scored (a land-only target's); None: every point.
    """
    num, den = objective_terms(
        objective,
        forecast=forecast,
        observed=observed,
        lat=lat,
        months=months,
        hours=hours,
        seeps=seeps,
        land=land,
    )
    keep = _observed_samples(observed)
    return objective_from(objective, num[keep].sum(), den[keep].sum())


def objective_terms(
    objective: Objective,
    *,
    forecast: np.ndarray,
    observed: np.ndarray,
    lat: np.ndarray,
    months: np.ndarray,
    hours: np.ndarray,
    seeps: SeepsClimate | None,
    land: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's (numerator, denominator) of the objective, for pairing trials later.

    Summed over the samples whose observation is complete and passed to the objective's formula
    (sqrt(num/den) for an RMSE, num/den for SEEPS) they give `objective_value`; over a bootstrap
    resample, the objective of that resample (`paired_difference`). Samples whose observation holds
    a NaN get NaN terms, so that every trial drops the same samples; a forecast holding a NaN or
    inf on any other sample has failed and gets NaN terms throughout.

    Args:
        objective, forecast, observed, lat, months, hours, seeps, land: as for
            `objective_value`.

    Returns:
        Two float64 arrays of length n, in the order of the samples given.
    """
    check_inputs(observed, lat, months, hours, seeps, forecast=forecast)
    keep = _observed_samples(observed)
    forecast, observed = _take(keep, forecast), _take(keep, observed)
    months, hours = np.asarray(months)[keep], np.asarray(hours)[keep]
    if not np.isfinite(forecast).all():
        nan = np.full(len(keep), np.nan)
        return nan, nan.copy()
    forecast, observed = _on(land, forecast), _on(land, observed)
    terms = _objective_terms(objective, forecast, observed, lat, months, hours, seeps)
    return _spread(keep, terms[0]), _spread(keep, terms[1])


def scores(
    *,
    forecast: np.ndarray,
    observed: np.ndarray,
    persistence: np.ndarray,
    climatology: np.ndarray,
    lat: np.ndarray,
    months: np.ndarray,
    hours: np.ndarray,
    days: np.ndarray,
    seeps: SeepsClimate | None,
    objective: Objective,
    target: Target = TARGETS[DEFAULT],
    land: np.ndarray | None = None,
    bootstrap: int = 1000,
    block_days: int = 3,
    seed: int = 0,
    terms_out: dict | None = None,
    references: dict | None = None,
    others: dict[str, np.ndarray] | None = None,
    interior: Window | None = None,
) -> dict[str, float]:
    """The target's scores of the model and of the persistence, climatology and `others`
    forecasts: every score of the module docstring the target gets (`tp_rmse`, ...) for the
    model and with each baseline's suffix (`_persistence`, ...); `<target>_skill_<baseline>` on
    `objective`; with `bootstrap` > 0, the 5 % and 95 % quantiles (`_q05`, `_q95`) of the
    objective and each skill over a paired block bootstrap of days. With an `interior`, every
    one of them again on its points alone, named with `_interior` last
    (`tp_seeps_persistence_interior`, `tp_skill_climatology_interior`).

    Args:
        forecast, persistence, climatology: the model's, persistence's and climatology's
            forecasts (n, lat, lon).
        observed, lat, months, hours, seeps, land: as for `objective_value`.
        days: each sample's target day, datetime64[D], (n,).
        objective, target: what the skills and bootstrap use; what is scored (`targets`).
        bootstrap, block_days, seed: bootstrap resamples (0: none), days a block, seed.
        terms_out: a dict to fill with the model's per-sample `"num"` and `"den"` (on the
            objective's region); references: when a dict, the baselines' scores by suffix
            (and region), read or kept: every trial meets the same baselines the same way.
        others: more baselines by name as `forecast` ({"aurora15": ...}; None: in references).
        interior: the (lat, lon) slices of the box's interior (`samples.interior_window`).
    """
    forecasts = {"": forecast, "_persistence": persistence, "_climatology": climatology}
    forecasts |= {f"_{name}": v for name, v in (others or {}).items()}
    named = {k.removeprefix("_") or "forecast": v for k, v in forecasts.items() if v is not None}
    check_inputs(observed, lat, months, hours, seeps, days=days, **named)
    days = np.asarray(days)[keep := _observed_samples(observed)]
    inputs = dict(observed=observed, lat=lat, seeps=seeps, climatology=climatology, land=land)
    out: dict[str, float] = {}
    for region, window in (("", None), (INTERIOR, interior))[: 2 if interior else 1]:
        kept = _cut_inputs(keep, window, months=months, hours=hours, target=target, **inputs)
        box = objective.on(bool(region))
        terms = _region_scores(out, objective, forecasts, region, window, keep, kept, references)
        if terms_out is not None and box.interior == objective.interior:
            terms_out["num"], terms_out["den"] = (_spread(keep, t) for t in terms[""])
        out |= _skills(box, out, [k.removeprefix("_") for k in forecasts if k])
        if bootstrap > 0:
            out |= _intervals(box, terms, days, bootstrap, block_days, seed)
    return out


def _region_scores(
    out: dict[str, float],
    objective: Objective,
    forecasts: dict[str, np.ndarray | None],
    region: str,
    window: Window | None,
    keep: np.ndarray,
    kept: dict,
    references: dict | None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Add every forecast's scores on `window`'s points to `out`, named with `region`'s suffix
    ("", `_interior`); return each one's objective terms by its suffix."""
    terms = {}
    for suffix, values in forecasts.items():
        values = None if values is None else cut(values, window)
        key = suffix + region if suffix else None  # a baseline's key among `references`
        scores_, terms[suffix] = _scores_of(objective, key, values, keep, kept, references)
        out.update({f"{name}{suffix}{region}": v for name, v in scores_.items()})
    return terms


def _cut_inputs(keep: np.ndarray, window: Window | None, **inputs) -> dict:
    """`scores`' inputs of the `keep` samples on the grid points of `window`."""
    land, climatology = inputs["land"], inputs["climatology"]
    return dict(
        observed=cut(_take(keep, inputs["observed"]), window),
        lat=cut_lat(inputs["lat"], window),
        seeps=cut_seeps(inputs["seeps"], window),
        target=inputs["target"],
        land=None if land is None else cut(land, window),
        months=np.asarray(inputs["months"])[keep],
        hours=np.asarray(inputs["hours"])[keep],
        climatology=None if climatology is None else cut(_take(keep, climatology), window),
    )


def _skills(objective: Objective, out: dict[str, float], references: list[str]) -> dict[str, float]:
    """The model's skill on `objective` against each of `references`, from its scores `out`."""
    model = out[objective.name]
    return {objective.skill(ref): skill(model, out[objective.of(ref)]) for ref in references}


def _scores_of(
    objective: Objective,
    key: str | None,
    values: np.ndarray | None,
    keep: np.ndarray,
    kept: dict,
    references: dict | None,
) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
    """One forecast's scores and objective terms on the `keep` samples (`kept`: the inputs
    already cut to them); a baseline's (`key`: its suffix and region's, `_persistence_interior`;
    None: the model's) from `references` when scored before, and kept there otherwise."""
    if key and references is not None and key in references:
        return references[key]  # the same baselines, scored before: nothing to cut
    if values is None:
        raise ValueError(f"the baseline {key} has neither a forecast nor scores")
    result = _all_scores(objective, _take(keep, values), kept)
    if key and references is not None:
        references[key] = result
    return result


def _intervals(
    objective: Objective,
    terms: dict[str, tuple[np.ndarray, np.ndarray]],
    days: np.ndarray,
    n_resamples: int,
    block_days: int,
    seed: int,
) -> dict[str, float]:
    """The 5/95 % quantiles of the objective and each skill over a block bootstrap of `days`."""
    resamples = block_bootstrap(days, n_resamples=n_resamples, block_days=block_days, seed=seed)
    value = {
        s: objective_from(objective, *(resampled_sums(t, resamples) for t in pair))
        for s, pair in terms.items()
    }
    out = dict(zip((objective.of("q05"), objective.of("q95")), interval(value[""])))
    for ref in (s.removeprefix("_") for s in terms if s):
        skills = np.array([skill(m, r) for m, r in zip(value[""], value[f"_{ref}"])])
        out[objective.skill(ref, "q05")], out[objective.skill(ref, "q95")] = interval(skills)
    return out


def _all_scores(
    objective: Objective, forecast: np.ndarray, kept: dict
) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
    """Every score of one forecast of the `kept` samples (`scores`: the observations and the
    rest cut to them), and its objective's per-sample (numerator, denominator)."""
    observed, lat, target = kept["observed"], kept["lat"], kept["target"]
    months, hours, seeps = kept["months"], kept["hours"], kept["seeps"]
    if len(observed) == 0 or not np.isfinite(forecast).all():
        nan = np.full(len(observed), np.nan)
        return dict.fromkeys(_score_names(target), float("nan")), (nan, nan)
    # a land-only target: NaN at sea, which every score below leaves out
    forecast, observed = _on(kept["land"], forecast), _on(kept["land"], observed)
    terms = {
        score: _objective_terms(
            Objective(target.name, score), forecast, observed, lat, months, hours, seeps
        )
        for score in target.scores
    }
    n = len(observed)
    ab, err = np.zeros(n), np.zeros(n)
    counts = {
        t: dict.fromkeys(("tp_count", "tn_count", "fp_count", "fn_count"), 0.0)
        for t in target.thresholds
    }
    weights = _weights(lat)
    for sl, fc, ob, _, _ in _chunks(forecast, observed, months, hours, seeps):
        ab[sl] = mae(fc, ob, preserve_dims="sample", weights=weights).values
        err[sl] = additive_bias(fc, ob, preserve_dims="sample", weights=weights).values
        for t in target.thresholds:
            for key, v in contingency_counts(forecast[sl], observed[sl], t).items():
                counts[t][key] += v
    # every kept sample has the same total weight: the mean of per-sample means is pooled
    result = {
        s: objective_from(Objective(target.name, s), *(t.sum() for t in pair))
        for s, pair in terms.items()
    }
    result |= {"mae": float(ab.mean()), "bias": float(err.mean())}
    if not target.precipitation_like:
        clim = _on(kept["land"], kept["climatology"])
        result["acc"] = anomaly_correlation(forecast, observed, clim, lat)
    for t, c in counts.items():
        c = {k: xr.DataArray(v) for k, v in c.items()}
        c["total_count"] = sum(c.values())
        table = BasicContingencyManager(c)
        result[f"csi_{t:g}"] = float(table.critical_success_index())
        result[f"ets_{t:g}"] = float(table.equitable_threat_score())
        result[f"fbias_{t:g}"] = float(table.frequency_bias())
    for t in target.fss_thresholds:
        for w in FSS_WINDOWS:
            result[f"fss_{t:g}_w{w}"] = fss(forecast, observed, t, w)
    return {target.metric(k): v for k, v in result.items()}, terms[objective.score]


def _score_names(target: Target) -> list[str]:
    names = [*target.scores, "mae", "bias", *(() if target.precipitation_like else ("acc",))]
    for kind in ("csi", "ets", "fbias"):
        names += [f"{kind}_{t:g}" for t in target.thresholds]
    names += [f"fss_{t:g}_w{w}" for t in target.fss_thresholds for w in FSS_WINDOWS]
    return [target.metric(k) for k in names]


def _objective_terms(
    objective: Objective,
    forecast: np.ndarray,
    observed: np.ndarray,
    lat: np.ndarray,
    months: np.ndarray,
    hours: np.ndarray,
    seeps: SeepsClimate | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample (numerator, denominator) of the objective: summed over samples, they give it.

    rmse: each sample's latitude-weighted MSE, and 1 (every kept sample weighs the same).
    seeps: each sample's latitude-weighted sum of SEEPS over its valid points, and their weight,
    against the climate of its month and hour slot.
    """
    n = len(observed)
    num, den = np.zeros(n), np.ones(n)
    weights = _weights(lat)
    for sl, fc, ob, p_dry, light_heavy in _chunks(forecast, observed, months, hours, seeps):
        if objective.rmse:
            num[sl] = mse(fc, ob, preserve_dims="sample", weights=weights).values
        else:
            num[sl], den[sl] = seeps_terms(fc, ob, p_dry, light_heavy, weights, seeps.dry_threshold)
    return num, den


def _chunks(
    forecast: np.ndarray,
    observed: np.ndarray,
    months: np.ndarray,
    hours: np.ndarray,
    seeps: SeepsClimate | None,
) -> Iterator[tuple[slice, xr.DataArray, xr.DataArray, xr.DataArray, xr.DataArray]]:
    """Chunks of consecutive samples as DataArrays, with each one's (month, hour) SEEPS climate
    (None without one)."""
    month_index = np.asarray(months, dtype=int) - 1
    slot = hour_slots(hours)
    step = max(1, CHUNK_POINTS // (observed.shape[1] * observed.shape[2]))
    for start in range(0, len(observed), step):
        sl = slice(start, start + step)
        clim = [
            xr.DataArray(c[month_index[sl], slot[sl]], dims=DIMS) if seeps else None
            for c in ((seeps.p_dry, seeps.light_heavy) if seeps else (None, None))
        ]
        yield sl, _field(forecast[sl]), _field(observed[sl]), *clim


def _on(points: np.ndarray | None, values: np.ndarray) -> np.ndarray:
    """`values` (n, lat, lon) on the (lat, lon) `points` alone, NaN elsewhere (None: all)."""
    return values if points is None else np.where(points, values, np.nan)


def _observed_samples(observed: np.ndarray) -> np.ndarray:
    """Mask of the samples whose observed field is complete (NaN-free)."""
    return ~np.isnan(np.asarray(observed)).any(axis=(1, 2))


def _take(keep: np.ndarray, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    return values if keep.all() else values[keep]  # no copy of a year of fields in the usual case


def _spread(keep: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Values of the kept samples back in place among all samples, NaN for the dropped ones."""
    out = np.full(keep.shape, np.nan)
    out[keep] = values
    return out


def _weights(lat: np.ndarray) -> xr.DataArray:
    return create_latitude_weights(xr.DataArray(np.asarray(lat, dtype=np.float64), dims="latitude"))


def _field(values: np.ndarray) -> xr.DataArray:
    """(n, lat, lon) values as a DataArray; float64 so that sums of squares keep their digits.

    No coordinates: arrays here share one grid, and indexes would make xarray align every operation.
    """
    return xr.DataArray(np.asarray(values, dtype=np.float64), dims=DIMS)
