"""The climatology baseline: the train split's mean target by calendar month, hour of day and
grid point, and its forecast over a lead (combined as the target's kind says)."""

from __future__ import annotations

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
