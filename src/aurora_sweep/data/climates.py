"""The climates of the train split, per grid point, calendar month and hour of day: the
climatology baseline (the mean target and its forecast over a lead, combined as the target's kind
says) and SEEPS's climate (the dry fraction and light/heavy threshold of the totals, which
`verify.seeps` scores against)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

from aurora_sweep.config.study import Period
from aurora_sweep.config.targets import TARGETS, Target
from aurora_sweep.data.samples import in_period, land_mask
from aurora_sweep.errors import AuroraSweepError


def complete_train(
    cube: xr.Dataset, train: Period, target: str
) -> tuple[np.ndarray, pd.DatetimeIndex]:
    """The `target` (float64, its units) at the train split's times whose field is complete,
    and those times."""
    field = cube[target].sel(time=in_period(cube["time"].values, train))
    values = np.asarray(field.values, dtype=np.float64)
    if TARGETS[target].land_only:  # complete over land; 0 at sea, where it is not scored
        land = land_mask(cube)
        ok = np.isfinite(values[:, land]).all(axis=1)
        values = np.nan_to_num(values)
    else:
        ok = np.isfinite(values).all(axis=(1, 2))
    return values[ok], pd.DatetimeIndex(field["time"].values)[ok]


#: A (month, hour) with fewer train samples than this borrows the neighbouring months.
MIN_CLIMATOLOGY_SAMPLES = 8


def climatology(cube: xr.Dataset, train: Period, target: str) -> np.ndarray:
    """Mean `target` by calendar month, hour of day and grid point over the train split.

    Shaped (12, 4, lat, lon) for months 1..12 and hours 0, 6, 12, 18 UTC: the climatology
    forecast with its seasonal and daily cycles. Where a (month, hour) has fewer than
    `MIN_CLIMATOLOGY_SAMPLES` train samples, the window widens to the month before and after,
    then to the whole train split at that hour.
    """
    values, times = complete_train(cube, train, target)
    months, hours = times.month.values, times.hour.values
    out = np.full((12, 4, *values.shape[1:]), np.nan)
    for h in range(4):
        at_hour = hours == 6 * h
        if not at_hour.any():
            raise AuroraSweepError(
                f"the train period has no {target} at {6 * h:02d} UTC: the climatology needs all four "
                "6-hourly model times"
            )
        for m in range(1, 13):
            for window in ({m}, {(m - 2) % 12 + 1, m, m % 12 + 1}, set(range(1, 13))):
                pick = at_hour & np.isin(months, list(window))
                if pick.sum() >= MIN_CLIMATOLOGY_SAMPLES or len(window) == 12:
                    out[m - 1, h] = values[pick].mean(axis=0)
                    break
    return out


def climatology_forecast(
    clim: np.ndarray, times: pd.DatetimeIndex, target: Target, steps: int = 1
) -> np.ndarray:
    """The climatology (12, 4, lat, lon) of the target over `steps` 6-hour windows ending at
    each valid time: (n, lat, lon), the windows' month-and-hour means combined as the target
    is over a lead (summed, averaged, or the valid time's alone)."""
    total = None
    for k, back in enumerate(range(steps - 1, -1, -1), start=1):  # earliest window first
        at = times - pd.Timedelta(hours=6 * back)
        total = target.accumulate(total, clim[at.month.values - 1, at.hour.values // 6], k)
    return total


# SEEPS's climate

DRY_MM = 0.1  # WeatherBench 2's dry threshold for 6-hour totals


#: SEEPS's dry threshold by lead (hours): WeatherBench 2's 0.1 mm for 6-hour and 0.25 mm for
#: 24-hour totals; for 12 hours, which WeatherBench 2 does not score, the 0.2 mm of Rodwell et
#: al.'s original SEEPS (and scores' default)
DRY_MM_BY_LEAD = {6: 0.1, 12: 0.2, 24: 0.25}


SEEPS_P_DRY_RANGE = (0.1, 0.85)  # Rodwell et al.'s climate mask; also scores' defaults


LIGHT_HEAVY_QUANTILE = 2 / 3


HOUR_SLOTS = (0, 6, 12, 18)  # UTC valid hours of 6-hour totals; slot = hour // 6


N_HOUR_SLOTS = len(HOUR_SLOTS)


# Fewest totals a (month, hour) SEEPS climate cell is built from before it widens. One train year
# gives 28 to 31 (one a day), so a single year fills most cells and two fill all; below that the
# dry fraction's sampling error (sd up to sqrt(0.25 / 30) = 0.09) spans much of the [0.1, 0.85]
# mask, and the 2/3 quantile of the wet totals rests on a handful of values.
MIN_SEEPS_SAMPLES = 30


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
    slots = hour_slots(hours)
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


def hour_slots(hours: np.ndarray) -> np.ndarray:
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
