"""Precipitation verification: the tp scores every trial and every evaluation reports.

Why this module exists: a sweep ranks trials by one number and a report compares recipes, so the
numbers must mean what they mean elsewhere in the field. Every score comes from `scores` (the
Bureau of Meteorology's verification package, on xarray data); this module only chooses the
scores' settings, feeds them samples in chunks (bounded memory), combines per-sample statistics
(for pooling and for the bootstrap) and names the results. All values are mm per 6 h.

Inputs: arrays shaped (n, lat, lon) for n samples, `lat` in degrees, `months` (1..12), `hours`
(0, 6, 12 or 18 UTC) and `days` (datetime64[D]) of each sample's *target* (valid) time.

The scores, for a forecast f against observations o (`w` = cos(latitude), from scores'
`create_latitude_weights`; "pooled" = over all samples and grid points together):

- `tp_rmse`, `tp_mae`, `tp_bias`: latitude-weighted pooled root mean squared error, mean absolute
  error and mean error f - o (scores' `mse`, `mae`, `additive_bias`, per sample, then averaged:
  every kept sample has the same total weight, so that average is the pooled weighted mean).
- `tp_seeps`: the Stable Equitable Error in Probability Space (Rodwell et al. 2010) as WeatherBench 2
  uses it for 6-hour totals, via `scores.categorical.seeps`. Each value falls in a category: dry
  (<= `DRY_MM` = 0.1 mm; scores' default of 0.2 mm is for other accumulations), light (> 0.1 mm and
  <= the point's light/heavy threshold), heavy (> that threshold). With p1 the point's climatological
  dry fraction and p3 = (1 - p1)/3 its heavy fraction, the error for forecast category (row) and
  observed category (column) is

      1/2 * [[0,                    1/(1-p1),   1/p3 + 1/(1-p1)],
             [1/p1,                 0,          1/p3           ],
             [1/p1 + 1/(1-p3),      1/(1-p3),   0              ]]

  p1 and the threshold (the 2/3 quantile of wet totals) come from `SeepsClimate`, per grid point,
  calendar month and hour slot (valid hour // 6: 00, 06, 12, 18 UTC) of the target time, from the
  train split's 6-hour totals: 6-h totals have a diurnal cycle (afternoon convection) that a climate
  pooling the four valid times of a month would erase. A (month, hour) cell with fewer than
  `MIN_SEEPS_SAMPLES` totals widens to the month before, the month and the month after at the same
  hour (December and January wrap), and if that is still too few, to the month with all hours
  pooled (`seeps_climate`). Points whose p1 lies outside [0.1, 0.85] (scores keeps both ends) or
  have no climate are masked; the score is the latitude-weighted mean over the remaining points of
  all samples (0 perfect, about 1 for a climatological forecast; lower is better).
  How this differs from WeatherBench 2: WB2 takes its climate from ERA5 1990-2019, the wet
  threshold per day of year (a 61-day window) and hour, and p1 as the annual mean per grid point,
  and averages SEEPS over space per time and then over time. Here the climate comes from the
  study's own train split, p1 and the threshold both per month and hour, and the score is one
  latitude-weighted mean pooled over all samples and points.
- `tp_csi_{t}`, `tp_ets_{t}`, `tp_fbias_{t}`: critical success index hits/(hits+misses+false
  alarms), equitable threat score (hits corrected for random hits) and frequency bias (forecast
  events / observed events) for the event "tp >= t mm", t in `CATEGORICAL_THRESHOLDS_MM`. `>=` is
  the side of scores' `ThresholdEventOperator` default (`operator.ge`), which we pass explicitly.
  Counts are pooled over samples and points and NOT latitude-weighted: these are the usual
  grid-point contingency counts (scores' `transform` sums events; MET's grid-stat does the same by
  default), and they live in grid space like the FSS next to them.
- `tp_fss_{t}_w{w}`: fractions skill score (Roberts and Lean 2008) of the event "tp >= t mm" in
  square windows of w x w grid points, as `scores.spatial.fss_2d` computes it with
  `np.greater_equal` (its default is `>`, which we override to match the categorical scores) and
  its default inner border (windows wholly inside the region); pooled over samples the way scores
  aggregates (means of the window fraction terms, then one ratio). scores gives 0 when neither
  field has an event; a window larger than the region gives NaN here. `fss` is scores' algorithm
  (summed-area tables) over every sample at once: scores runs it sample by sample from Python,
  0.75 s of each demo trial; a test holds the two equal on fields with and without events.
- `tp_skill_persistence`, `tp_skill_climatology`: 1 - objective/objective of the reference
  (`skill`), on the chosen objective (`OBJECTIVES`).

Comparing trials: every trial of a study is scored on the same samples with the same bootstrap
resamples, so whether trial A beats trial B is a paired question. `objective_terms` (or
`tp_scores(terms_out=...)`) gives each sample's share of the objective, and `paired_difference`
the difference of two objectives with a bootstrap interval over the same resamples for both; an
interval containing 0 means the two are not distinguishable. Overlap of two marginal intervals
would ignore that both trials meet the same weather and so overstate the uncertainty.

Missing data: samples whose observed field holds any NaN are dropped from every score, for the
model and both references alike (the comparison stays paired); scores would otherwise skip NaN in
the continuous scores and SEEPS but count them as "no event" in the FSS. A forecast holding a NaN
or inf on a kept sample has failed: all its scores (and skills) are NaN rather than scores of the
points where it happened to be finite.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import xarray as xr
from scores.categorical import BasicContingencyManager, ThresholdEventOperator
from scores.categorical import seeps as scores_seeps
from scores.continuous import additive_bias, mae, mse, rmse
from scores.functions import create_latitude_weights

DRY_MM = 0.1  # WeatherBench 2's dry threshold for 6-hour totals
#: SEEPS's dry threshold by lead (hours): WeatherBench 2's 0.1 mm for 6-hour and 0.25 mm for
#: 24-hour totals; for 12 hours, which WeatherBench 2 does not score, the 0.2 mm of Rodwell et
#: al.'s original SEEPS (and scores' default)
DRY_MM_BY_LEAD = {6: 0.1, 12: 0.2, 24: 0.25}
CATEGORICAL_THRESHOLDS_MM = (0.1, 1.0, 5.0)
FSS_THRESHOLDS_MM = (1.0, 5.0)
FSS_WINDOWS = (5, 11)  # square windows, in grid points
OBJECTIVES = ("tp_rmse", "tp_seeps")
SEEPS_P_DRY_RANGE = (0.1, 0.85)  # Rodwell et al.'s climate mask; also scores' defaults
LIGHT_HEAVY_QUANTILE = 2 / 3
HOUR_SLOTS = (0, 6, 12, 18)  # UTC valid hours of 6-hour totals; slot = hour // 6
N_HOUR_SLOTS = len(HOUR_SLOTS)
# Fewest totals a (month, hour) SEEPS climate cell is built from before it widens. One train year
# gives 28 to 31 (one a day), so a single year fills most cells and two fill all; below that the
# dry fraction's sampling error (sd up to sqrt(0.25 / 30) = 0.09) spans much of the [0.1, 0.85]
# mask, and the 2/3 quantile of the wet totals rests on a handful of values.
MIN_SEEPS_SAMPLES = 30

DIMS = ("sample", "latitude", "longitude")
SPATIAL = ("latitude", "longitude")
# Grid points scored at once (samples x lat x lon): scores builds a dozen full-size temporaries per
# call, so 2**21 points (64 samples at 0.25 deg over Europe) keep that near 200 MB for any n.
CHUNK_POINTS = 2**21
_SEEPS_EXTREME_P = "`prob_dry` contains values that are exactly equal to 0 or 1"


@dataclass(frozen=True)
class SeepsClimate:
    """SEEPS climatology per calendar month, hour slot and grid point, from the train split.

    Index [month - 1, hour // 6, lat, lon]: the hour slots are the valid times 00, 06, 12 and
    18 UTC, because 6-hour totals have a diurnal cycle. A (month, slot) cell built from fewer than
    `MIN_SEEPS_SAMPLES` totals is the climate of the same slot in the month before, the month and
    the month after (December and January wrap); if those three still hold fewer, the climate of the
    month with all four slots pooled (`seeps_climate`). Months without samples, and points of a
    cell without wet values, are NaN: SEEPS masks them.
    """

    p_dry: np.ndarray  # (12, 4, lat, lon): fraction of totals <= the dry threshold
    light_heavy: np.ndarray  # (12, 4, lat, lon) mm: 2/3 quantile of the totals above it
    #: the dry/light boundary the climate was built with and the scores use (mm over the lead)
    dry_threshold: float = DRY_MM


def seeps_climate(
    tp: np.ndarray,
    months: np.ndarray,
    hours: np.ndarray,
    *,
    dry_threshold: float = DRY_MM,
    min_samples: int = MIN_SEEPS_SAMPLES,
) -> SeepsClimate:
    """The SEEPS climate of a series of 6-hour totals, per calendar month, hour slot and grid point.

    A total is dry when it is <= `dry_threshold` (the rule of scores' `seeps`) and wet otherwise;
    the light/heavy threshold is the 2/3 quantile of the wet totals with numpy's default (linear)
    interpolation. NaN totals are left out.

    Which totals make the climate of (month m, slot s), counting totals (entries of `months` and
    `hours`), not valid values per point: those of month m at slot s if there are at least
    `min_samples`; otherwise those of months m - 1, m and m + 1 at slot s (December and January
    wrap) if there are at least `min_samples`; otherwise those of month m at every hour (the climate
    pooled over the day, however few).

    Args:
        tp: 6-hour totals in mm, (n, lat, lon), typically the train split.
        months: the calendar month (1..12) of each total's valid time, (n,).
        hours: the hour (0, 6, 12 or 18 UTC) of each total's valid time, (n,).
        dry_threshold: the dry/light boundary in mm; use the one the scores will use.
        min_samples: the fewest totals a cell is built from before it widens (see above).
    """
    tp = np.asarray(tp)
    months = np.asarray(months)
    if tp.ndim != 3 or months.shape != tp.shape[:1] or np.shape(hours) != tp.shape[:1]:
        raise ValueError(
            f"tp must be (n, lat, lon) and months and hours (n,); got {tp.shape}, "
            f"{months.shape} and {np.shape(hours)}"
        )
    if months.size and not np.isin(months, np.arange(1, 13)).all():
        raise ValueError("months must be calendar months 1..12 (of each total's valid time)")
    slots = _hour_slots(hours)
    p_dry = np.full((12, N_HOUR_SLOTS, *tp.shape[1:]), np.nan)
    light_heavy = np.full_like(p_dry, np.nan)
    built: dict[tuple[tuple[int, ...], int | None], tuple[np.ndarray, np.ndarray]] = {}
    for m in range(1, 13):
        for slot in range(N_HOUR_SLOTS):
            source = _climate_source(months, slots, m, slot, min_samples)
            if source not in built:  # the pooled month serves several slots
                chosen = np.isin(months, source[0])
                if source[1] is not None:
                    chosen &= slots == source[1]
                built[source] = _dry_fraction_and_threshold(tp[chosen], dry_threshold)
            p_dry[m - 1, slot], light_heavy[m - 1, slot] = built[source]
    return SeepsClimate(p_dry=p_dry, light_heavy=light_heavy, dry_threshold=dry_threshold)


def _climate_source(
    months: np.ndarray, slots: np.ndarray, month: int, slot: int, min_samples: int
) -> tuple[tuple[int, ...], int | None]:
    """The months and hour slot (None: all) whose totals make the climate of (month, slot).

    Args:
        months: the calendar month (1..12) of each total, (n,).
        slots: the hour slot (0..3) of each total, (n,).
        month: the cell's month.
        slot: the cell's hour slot.
        min_samples: the fewest totals a cell is built from before it widens.
    """
    at_slot = slots == slot
    if np.count_nonzero(at_slot & (months == month)) >= min_samples:
        return (month,), slot
    window = tuple(sorted({(month + k - 1) % 12 + 1 for k in (-1, 0, 1)}))
    if np.count_nonzero(at_slot & np.isin(months, window)) >= min_samples:
        return window, slot
    return (month,), None


def _dry_fraction_and_threshold(
    values: np.ndarray, dry_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per grid point, the dry fraction of the totals and the 2/3 quantile of the wet ones.

    NaN totals are left out; a point without (wet) totals gets NaN.

    Args:
        values: 6-hour totals in mm, (k, lat, lon).
        dry_threshold: the dry/light boundary in mm.
    """
    values = values.astype(np.float64)
    if values.shape[0] == 0:
        nan = np.full(values.shape[1:], np.nan)
        return nan, nan.copy()
    n_valid = (~np.isnan(values)).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_dry = np.where(n_valid > 0, (values <= dry_threshold).sum(axis=0) / n_valid, np.nan)
    return p_dry, _nan_quantile(np.where(values > dry_threshold, values, np.nan))


def _hour_slots(hours: np.ndarray) -> np.ndarray:
    """Each valid hour's slot, hour // 6 (0..3); hours other than 0, 6, 12 and 18 are refused."""
    hours = np.asarray(hours)
    if hours.size and not np.isin(hours, HOUR_SLOTS).all():
        bad = np.unique(hours[~np.isin(hours, HOUR_SLOTS)])[:5]
        raise ValueError(
            f"hours must be the valid hours 0, 6, 12 or 18 UTC of 6-hour totals; got {bad}"
        )
    return (hours // 6).astype(int)


def _nan_quantile(values: np.ndarray, q: float = LIGHT_HEAVY_QUANTILE) -> np.ndarray:
    """np.nanquantile(values, q, axis=0), linear, without its Python loop over every grid point."""
    ordered = np.sort(values, axis=0)  # NaN sort last
    count = (~np.isnan(values)).sum(axis=0)
    pos = np.maximum(count - 1, 0) * q
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, np.maximum(count - 1, 0))
    below = np.take_along_axis(ordered, lo[None], axis=0)[0]
    above = np.take_along_axis(ordered, hi[None], axis=0)[0]
    return np.where(count > 0, below + (pos - lo) * (above - below), np.nan)


def lat_weighted_rmse(forecast: np.ndarray, observed: np.ndarray, lat: np.ndarray) -> float:
    """RMSE over samples and grid points, each point weighted by cos(latitude)."""
    return float(rmse(_field(forecast), _field(observed), weights=_weights(lat)))


def lat_weighted_mse(forecast: np.ndarray, observed: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """The squares of `lat_weighted_rmse` in NumPy, one per leading index after the first:
    (n, lat, lon) gives a scalar, (n, level, lat, lon) one MSE per level.

    The forgetting ratios need an MSE for every variable and level of every batch scored; through
    `scores` (xarray) that was a third of a demo trial's verification. The weights are the same
    `create_latitude_weights` values, so the two agree to rounding (tests/test_metrics.py).
    """
    w = _weights(lat).values[:, None]  # (lat, 1)
    err = (np.asarray(forecast, np.float64) - np.asarray(observed, np.float64)) ** 2
    axes = (0, -2, -1)
    return (err * w).sum(axis=axes) / (w.sum() * err.shape[0] * err.shape[-1])


def skill(score: float, reference: float) -> float:
    """1 - score/reference: 1 is perfect, 0 is no better than the reference."""
    return 1.0 - score / reference if reference > 0 else float("nan")


def block_bootstrap(
    days: np.ndarray, *, n_resamples: int, block_days: int, seed: int
) -> list[np.ndarray]:
    """Resamples of the samples, in blocks of consecutive days (a circular block bootstrap).

    The scheme: order the distinct days present in `days` (n_days of them). A resample draws
    k = ceil(n_days / block_days) start days uniformly with replacement; each block is its start day
    and the next `block_days - 1` distinct days present, wrapping from the last day to the first
    (so every day is equally likely to be drawn); the resample is every sample of every day of the
    blocks, block after block. It holds k * block_days days, at most block_days - 1 more than the
    original. Whole days stay together and neighbouring days travel together, which keeps the
    day-to-day correlation of weather that an i.i.d. bootstrap over samples would ignore and so
    gives intervals that are not too narrow.

    Args:
        days: each sample's day, datetime64[D] (any order; repeated for several samples a day).
        n_resamples: how many resamples to draw.
        block_days: the number of consecutive days in a block (>= 1).
        seed: the random generator's seed; the same seed gives the same resamples.

    Returns:
        `n_resamples` integer arrays of indices into `days`.
    """
    if block_days < 1 or n_resamples < 0:
        raise ValueError(
            f"need block_days >= 1 and n_resamples >= 0; got {block_days}, {n_resamples}"
        )
    unique, day_of_sample = np.unique(np.asarray(days), return_inverse=True)
    n_days = unique.size
    if n_days == 0:
        return [np.zeros(0, dtype=int) for _ in range(n_resamples)]
    by_day = np.argsort(day_of_sample, kind="stable")  # sample indices grouped by day
    per_day = np.bincount(day_of_sample, minlength=n_days)
    first = np.cumsum(per_day) - per_day  # where each day's samples start in `by_day`
    n_blocks = math.ceil(n_days / block_days)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n_days, size=(n_resamples, n_blocks))
    chosen = (starts[..., None] + np.arange(block_days)) % n_days  # (resample, block, day)
    resamples = []
    for picked in chosen.reshape(n_resamples, -1):
        lengths = per_day[picked]
        ends = np.cumsum(lengths)
        offsets = np.repeat(first[picked] - (ends - lengths), lengths)
        resamples.append(by_day[offsets + np.arange(ends[-1])])
    return resamples


def objective_value(
    objective: str,
    *,
    forecast: np.ndarray,
    observed: np.ndarray,
    lat: np.ndarray,
    months: np.ndarray,
    hours: np.ndarray,
    seeps: SeepsClimate,
) -> float:
    """The objective alone, for one forecast: the same number `tp_scores` reports for it.

    Args:
        objective: one of `OBJECTIVES`.
        forecast: the model's forecast, mm per 6 h, (n, lat, lon).
        observed: the observed totals, (n, lat, lon).
        lat: latitudes in degrees, (lat,).
        months: calendar month (1..12) of each sample's target time, (n,).
        hours: valid hour (0, 6, 12 or 18 UTC) of each sample's target time, (n,).
        seeps: the train split's SEEPS climate (used for `tp_seeps`).
    """
    num, den = objective_terms(
        objective,
        forecast=forecast,
        observed=observed,
        lat=lat,
        months=months,
        hours=hours,
        seeps=seeps,
    )
    keep = _observed_samples(observed)
    return _objective_from(objective, num[keep].sum(), den[keep].sum())


def objective_terms(
    objective: str,
    *,
    forecast: np.ndarray,
    observed: np.ndarray,
    lat: np.ndarray,
    months: np.ndarray,
    hours: np.ndarray,
    seeps: SeepsClimate,
) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's (numerator, denominator) of the objective, for pairing trials later.

    Summed over the samples whose observation is complete and passed to the objective's formula
    (sqrt(num/den) for tp_rmse, num/den for tp_seeps) they give `objective_value`; over a bootstrap
    resample, the objective of that resample (`paired_difference`). Samples whose observation holds
    a NaN get NaN terms, so that every trial drops the same samples; a forecast holding a NaN or
    inf on any other sample has failed and gets NaN terms throughout.

    Args:
        objective: one of `OBJECTIVES`.
        forecast: the model's forecast, mm per 6 h, (n, lat, lon).
        observed: the observed totals, (n, lat, lon).
        lat: latitudes in degrees, (lat,).
        months: calendar month (1..12) of each sample's target time, (n,).
        hours: valid hour (0, 6, 12 or 18 UTC) of each sample's target time, (n,).
        seeps: the train split's SEEPS climate (used for `tp_seeps`).

    Returns:
        Two float64 arrays of length n, in the order of the samples given.
    """
    _check_objective(objective)
    _check_inputs(observed, lat, months, hours, seeps, forecast=forecast)
    keep = _observed_samples(observed)
    forecast, observed = _take(keep, forecast), _take(keep, observed)
    months, hours = np.asarray(months)[keep], np.asarray(hours)[keep]
    if not np.isfinite(forecast).all():
        nan = np.full(len(keep), np.nan)
        return nan, nan.copy()
    terms = _objective_terms(objective, forecast, observed, lat, months, hours, seeps)
    return _spread(keep, terms[0]), _spread(keep, terms[1])


def paired_difference(
    objective: str,
    a: tuple[np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray],
    days: np.ndarray,
    *,
    n_resamples: int = 1000,
    block_days: int = 3,
    seed: int = 0,
) -> tuple[float, float, float]:
    """The objective of A minus that of B, with a paired block bootstrap interval.

    Both forecasts were scored on the same samples, so the interval comes from the same resamples
    (`block_bootstrap`) applied to both: the weather they share cancels out of the difference. An
    interval containing 0 means A and B are not distinguishable. Samples where either side has a
    NaN term are dropped from both.

    Args:
        objective: one of `OBJECTIVES`, the objective the terms are of.
        a: A's per-sample (numerator, denominator), as `objective_terms` gives them, (n,) each.
        b: B's, over the same samples in the same order.
        days: each sample's target day, datetime64[D], (n,).
        n_resamples: how many bootstrap resamples (>= 1).
        block_days: consecutive days per bootstrap block.
        seed: the bootstrap's seed.

    Returns:
        The difference, and its 5 % and 95 % quantiles over the resamples.
    """
    _check_objective(objective)
    if n_resamples < 1:
        raise ValueError(f"need n_resamples >= 1 for an interval; got {n_resamples}")
    arrays = [np.asarray(x, dtype=np.float64) for x in (*a, *b)]
    days = np.asarray(days)
    lengths = {np.shape(x) for x in (*arrays, days)}
    if len(lengths) != 1 or days.ndim != 1:
        raise ValueError(
            "a's and b's terms and days must be 1-d arrays over the same samples; got shapes "
            + ", ".join(str(np.shape(x)) for x in (*arrays, days))
        )
    keep = ~np.isnan(np.stack(arrays)).any(axis=0)
    a_num, a_den, b_num, b_den = (x[keep] for x in arrays)
    difference = _objective_from(objective, a_num.sum(), a_den.sum()) - _objective_from(
        objective, b_num.sum(), b_den.sum()
    )
    resamples = block_bootstrap(
        days[keep], n_resamples=n_resamples, block_days=block_days, seed=seed
    )
    differences = _objective_from(
        objective, _resampled_sums(a_num, resamples), _resampled_sums(a_den, resamples)
    ) - _objective_from(
        objective, _resampled_sums(b_num, resamples), _resampled_sums(b_den, resamples)
    )
    return (float(difference), *_interval(differences))


def encode_terms(num: np.ndarray, den: np.ndarray, days: np.ndarray) -> dict[str, str]:
    """Per-sample objective terms and their days as short JSON-safe text (base64 of float32 and
    int32 days since 1970), small enough to keep with every trial in Optuna's storage: a year of
    Europe's 6-hourly samples is about 23 kB."""
    import base64

    def pack(values: np.ndarray, dtype: str) -> str:
        return base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes()).decode()

    day_numbers = np.asarray(days, dtype="datetime64[D]").astype(np.int64)
    return {"num": pack(num, "<f4"), "den": pack(den, "<f4"), "days": pack(day_numbers, "<i4")}


def decode_terms(packed: dict[str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (num, den, days) that `encode_terms` packed."""
    import base64

    def unpack(key: str, dtype: str) -> np.ndarray:
        return np.frombuffer(base64.b64decode(packed[key]), dtype=dtype)

    days = unpack("days", "<i4").astype("datetime64[D]")
    return unpack("num", "<f4").astype(np.float64), unpack("den", "<f4").astype(np.float64), days


def tp_scores(
    *,
    forecast: np.ndarray,
    observed: np.ndarray,
    persistence: np.ndarray,
    climatology: np.ndarray,
    lat: np.ndarray,
    months: np.ndarray,
    hours: np.ndarray,
    days: np.ndarray,
    seeps: SeepsClimate,
    objective: str = "tp_rmse",
    bootstrap: int = 1000,
    block_days: int = 3,
    seed: int = 0,
    terms_out: dict | None = None,
    references: dict | None = None,
) -> dict[str, float]:
    """The tp scores of the model and of the persistence and climatology forecasts.

    Keys: `tp_rmse`, `tp_mae`, `tp_bias`, `tp_seeps`, `tp_csi_{t}`, `tp_ets_{t}`, `tp_fbias_{t}`
    (t in `CATEGORICAL_THRESHOLDS_MM`, written `f"{t:g}"`), `tp_fss_{t}_w{w}` (t in
    `FSS_THRESHOLDS_MM`, w in `FSS_WINDOWS`), each for the model and with the suffixes
    `_persistence` and `_climatology`; `tp_skill_persistence` and `tp_skill_climatology` on
    `objective`; and, when `bootstrap` > 0, the 5 % and 95 % quantiles (`_q05`, `_q95`) of the
    objective and of both skills over a paired block bootstrap of days (`block_bootstrap`; the same
    resamples for the model and both references). The module docstring defines each score.

    Args:
        forecast: the model's forecast, mm per 6 h, (n, lat, lon).
        observed: the observed totals, (n, lat, lon).
        persistence: the persistence forecast (tp at the last input time), (n, lat, lon).
        climatology: the climatology forecast, (n, lat, lon).
        lat: latitudes in degrees, (lat,).
        months: calendar month (1..12) of each sample's target time, (n,).
        hours: valid hour (0, 6, 12 or 18 UTC) of each sample's target time, (n,).
        days: each sample's target day, datetime64[D], (n,).
        seeps: the train split's SEEPS climate.
        objective: the score the skills and the bootstrap use, one of `OBJECTIVES`.
        bootstrap: number of bootstrap resamples; 0 for none.
        block_days: consecutive days per bootstrap block.
        seed: the bootstrap's seed.
        terms_out: when a dict, filled with `"num"` and `"den"`: the model's per-sample objective
            terms over all n samples given, NaN for dropped ones (as `objective_terms`), to keep
            for `paired_difference` without scoring again.
        references: when a dict, the baselines' scores are read from it if there (keyed by
            suffix) and kept in it otherwise: every trial of a study is scored against the same
            persistence and climatology on the same samples, which need scoring once.
    """
    _check_objective(objective)
    _check_inputs(
        observed,
        lat,
        months,
        hours,
        seeps,
        days=days,
        forecast=forecast,
        persistence=persistence,
        climatology=climatology,
    )
    keep = _observed_samples(observed)
    observed = _take(keep, observed)
    months, hours = np.asarray(months)[keep], np.asarray(hours)[keep]
    days = np.asarray(days)[keep]
    forecasts = {"": forecast, "_persistence": persistence, "_climatology": climatology}
    out: dict[str, float] = {}
    terms: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for suffix, values in forecasts.items():
        if suffix and references is not None and suffix in references:
            scores_, terms[suffix] = references[suffix]  # the same baselines, scored before
        else:
            values = _take(keep, values)
            scores_, terms[suffix] = _all_scores(
                objective, values, observed, lat, months, hours, seeps
            )
            if suffix and references is not None:
                references[suffix] = (scores_, terms[suffix])
        out.update({f"{name}{suffix}": v for name, v in scores_.items()})
    if terms_out is not None:
        terms_out["num"], terms_out["den"] = (_spread(keep, t) for t in terms[""])
    for ref in ("persistence", "climatology"):
        out[f"tp_skill_{ref}"] = skill(out[objective], out[f"{objective}_{ref}"])
    if bootstrap > 0:
        resamples = block_bootstrap(days, n_resamples=bootstrap, block_days=block_days, seed=seed)
        value = {
            s: _objective_from(objective, *(_resampled_sums(t, resamples) for t in terms[s]))
            for s in forecasts
        }
        out[f"{objective}_q05"], out[f"{objective}_q95"] = _interval(value[""])
        for ref in ("persistence", "climatology"):
            skills = np.array([skill(m, r) for m, r in zip(value[""], value[f"_{ref}"])])
            out[f"tp_skill_{ref}_q05"], out[f"tp_skill_{ref}_q95"] = _interval(skills)
    return out


def _all_scores(
    objective: str,
    forecast: np.ndarray,
    observed: np.ndarray,
    lat: np.ndarray,
    months: np.ndarray,
    hours: np.ndarray,
    seeps: SeepsClimate,
) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
    """Every score of one forecast, and its objective's per-sample (numerator, denominator)."""
    if len(observed) == 0 or not np.isfinite(forecast).all():
        nan = np.full(len(observed), np.nan)
        return dict.fromkeys(_score_names(), float("nan")), (nan, nan)
    rmse_terms = _objective_terms("tp_rmse", forecast, observed, lat, months, hours, seeps)
    seeps_terms = _objective_terms("tp_seeps", forecast, observed, lat, months, hours, seeps)
    n = len(observed)
    ab, err = np.zeros(n), np.zeros(n)
    counts = {
        t: dict.fromkeys(("tp_count", "tn_count", "fp_count", "fn_count"), 0.0)
        for t in CATEGORICAL_THRESHOLDS_MM
    }
    weights = _weights(lat)
    for sl, fc, ob, _, _ in _chunks(forecast, observed, months, hours, seeps):
        ab[sl] = mae(fc, ob, preserve_dims="sample", weights=weights).values
        err[sl] = additive_bias(fc, ob, preserve_dims="sample", weights=weights).values
        for t in CATEGORICAL_THRESHOLDS_MM:
            table = ThresholdEventOperator(default_event_threshold=t, default_op_fn=operator.ge)
            chunk_counts = (
                table.make_contingency_manager(fc, ob).transform(reduce_dims="all").counts
            )
            for key in counts[t]:
                counts[t][key] += float(chunk_counts[key])
    result = {
        # every kept sample has the same total weight: the mean of per-sample means is pooled
        "tp_rmse": _objective_from("tp_rmse", *(t.sum() for t in rmse_terms)),
        "tp_mae": float(ab.mean()),
        "tp_bias": float(err.mean()),
        "tp_seeps": _objective_from("tp_seeps", *(t.sum() for t in seeps_terms)),
    }
    for t, c in counts.items():
        c = {k: xr.DataArray(v) for k, v in c.items()}
        c["total_count"] = sum(c.values())
        table = BasicContingencyManager(c)
        result[f"tp_csi_{t:g}"] = float(table.critical_success_index())
        result[f"tp_ets_{t:g}"] = float(table.equitable_threat_score())
        result[f"tp_fbias_{t:g}"] = float(table.frequency_bias())
    for t in FSS_THRESHOLDS_MM:
        for w in FSS_WINDOWS:
            result[f"tp_fss_{t:g}_w{w}"] = fss(forecast, observed, t, w)
    return result, rmse_terms if objective == "tp_rmse" else seeps_terms


def _score_names() -> list[str]:
    names = ["tp_rmse", "tp_mae", "tp_bias", "tp_seeps"]
    for kind in ("csi", "ets", "fbias"):
        names += [f"tp_{kind}_{t:g}" for t in CATEGORICAL_THRESHOLDS_MM]
    names += [f"tp_fss_{t:g}_w{w}" for t in FSS_THRESHOLDS_MM for w in FSS_WINDOWS]
    return names


def _objective_terms(
    objective: str,
    forecast: np.ndarray,
    observed: np.ndarray,
    lat: np.ndarray,
    months: np.ndarray,
    hours: np.ndarray,
    seeps: SeepsClimate,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample (numerator, denominator) of the objective: summed over samples, they give it.

    tp_rmse: each sample's latitude-weighted MSE, and 1 (every kept sample weighs the same).
    tp_seeps: each sample's latitude-weighted sum of SEEPS over its valid points, and their weight,
    against the climate of its month and hour slot.
    """
    n = len(observed)
    num, den = np.zeros(n), np.ones(n)
    weights = _weights(lat)
    for sl, fc, ob, p_dry, light_heavy in _chunks(forecast, observed, months, hours, seeps):
        if objective == "tp_rmse":
            num[sl] = mse(fc, ob, preserve_dims="sample", weights=weights).values
        else:
            num[sl], den[sl] = _seeps_terms(
                fc, ob, p_dry, light_heavy, weights, seeps.dry_threshold
            )
    return num, den


def _objective_from(
    objective: str, num: np.ndarray | float, den: np.ndarray | float
) -> np.ndarray | float:
    """The objective from summed terms: sqrt of the mean squared error, or the SEEPS weighted mean."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.divide(num, den)
    value = np.sqrt(ratio) if objective == "tp_rmse" else ratio
    return float(value) if np.ndim(value) == 0 else value


def _seeps_terms(
    fc: xr.DataArray,
    ob: xr.DataArray,
    p_dry: xr.DataArray,
    light_heavy: xr.DataArray,
    weights: xr.DataArray,
    dry_threshold: float = DRY_MM,
) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: the latitude-weighted sum of SEEPS over valid points, and those points' weight."""
    low, high = SEEPS_P_DRY_RANGE
    with warnings.catch_warnings():
        # p1 of exactly 0 or 1 (never/always dry): scores warns, then masks them as we want
        warnings.filterwarnings("ignore", message=_SEEPS_EXTREME_P, category=UserWarning)
        pointwise = scores_seeps(
            fc,
            ob,
            p_dry,
            light_heavy,
            dry_light_threshold=dry_threshold,
            mask_clim_extremes=True,
            lower_masked_value=low,
            upper_masked_value=high,
            preserve_dims="all",
        )
    total = (pointwise * weights).sum(SPATIAL).values
    weight = weights.where(pointwise.notnull(), 0.0).sum(SPATIAL).values
    return total, weight


def fss(forecast: np.ndarray, observed: np.ndarray, threshold: float, window: int) -> float:
    """Fractions skill score of the event "tp >= threshold" in `window` x `window` windows
    wholly inside the region, pooled over the samples of (sample, lat, lon) fields as
    `scores.spatial.fss_2d` pools them; NaN when no window fits."""
    forecast, observed = np.asarray(forecast), np.asarray(observed)
    if window > min(forecast.shape[1:]):
        return float("nan")  # no window fits in the region
    if len(forecast) == 0:
        return 0.0

    def window_counts(field: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            events = np.greater_equal(field, threshold)  # NaN: no event, as in scores
        table = np.pad(events.cumsum(1, dtype=np.int32).cumsum(2), ((0, 0), (1, 0), (1, 0)))
        w = window
        return table[:, w:, w:] - table[:, w:, :-w] - table[:, :-w, w:] + table[:, :-w, :-w]

    f, o = window_counts(forecast), window_counts(observed)
    # each sample's mean over its windows, then the mean over samples (scores' aggregation)
    fcst = (f * f).mean(axis=(1, 2)).mean()
    obs = (o * o).mean(axis=(1, 2)).mean()
    diff = ((o - f) ** 2).mean(axis=(1, 2)).mean()
    denom = obs + fcst
    return float(min(max(1.0 - diff / denom, 0.0), 1.0)) if denom > 0 else 0.0


def _chunks(
    forecast: np.ndarray,
    observed: np.ndarray,
    months: np.ndarray,
    hours: np.ndarray,
    seeps: SeepsClimate,
) -> Iterator[tuple[slice, xr.DataArray, xr.DataArray, xr.DataArray, xr.DataArray]]:
    """Chunks of consecutive samples as DataArrays, with each one's (month, hour) SEEPS climate."""
    month_index = np.asarray(months, dtype=int) - 1
    slot = _hour_slots(hours)
    step = max(1, CHUNK_POINTS // (observed.shape[1] * observed.shape[2]))
    for start in range(0, len(observed), step):
        sl = slice(start, start + step)
        clim = [
            xr.DataArray(c[month_index[sl], slot[sl]], dims=DIMS)
            for c in (seeps.p_dry, seeps.light_heavy)
        ]
        yield sl, _field(forecast[sl]), _field(observed[sl]), *clim


def _resampled_sums(values: np.ndarray, resamples: list[np.ndarray]) -> np.ndarray:
    """The sum of `values` over each resample's indices, in one pass."""
    if values.size == 0:
        return np.zeros(len(resamples))
    lengths = np.array([len(r) for r in resamples])
    starts = np.cumsum(lengths) - lengths
    return np.add.reduceat(values[np.concatenate(resamples)], starts)


def _interval(values: np.ndarray) -> tuple[float, float]:
    q05, q95 = np.quantile(values, [0.05, 0.95])
    return float(q05), float(q95)


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


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: use one of {', '.join(OBJECTIVES)}")


def _check_inputs(
    observed: np.ndarray,
    lat: np.ndarray,
    months: np.ndarray,
    hours: np.ndarray,
    seeps: SeepsClimate,
    days: np.ndarray | None = None,
    **forecasts: np.ndarray,
) -> None:
    shape = np.shape(observed)
    if len(shape) != 3 or shape[1] != np.size(lat):
        raise ValueError(
            f"observed must be (n, lat, lon) with lat of length {np.size(lat)}; got {shape}"
        )
    for name, values in forecasts.items():
        if np.shape(values) != shape:
            raise ValueError(f"{name} is shaped {np.shape(values)}, observed {shape}")
    for name, values in {"months": months, "hours": hours, "days": days}.items():
        if values is not None and np.shape(values) != shape[:1]:
            raise ValueError(
                f"{name} must have one entry per sample ({shape[0]}); got {np.shape(values)}"
            )
    for name, clim in {"p_dry": seeps.p_dry, "light_heavy": seeps.light_heavy}.items():
        if np.shape(clim) != (12, N_HOUR_SLOTS, *shape[1:]):
            raise ValueError(
                f"the SEEPS climate's {name} is shaped {np.shape(clim)}, not (12 months, "
                f"{N_HOUR_SLOTS} hour slots, {shape[1]}, {shape[2]}): build it with "
                "seeps_climate(tp, months, hours) on the grid that is scored"
            )
    if shape[0] and not np.isin(months, np.arange(1, 13)).all():
        raise ValueError("months must be calendar months 1..12 (of each sample's target time)")
    _hour_slots(hours)


def _weights(lat: np.ndarray) -> xr.DataArray:
    return create_latitude_weights(xr.DataArray(np.asarray(lat, dtype=np.float64), dims="latitude"))


def _field(values: np.ndarray) -> xr.DataArray:
    """(n, lat, lon) values as a DataArray; float64 so that sums of squares keep their digits.

    No coordinates: arrays here share one grid, and indexes would make xarray align every operation.
    """
    return xr.DataArray(np.asarray(values, dtype=np.float64), dims=DIMS)
