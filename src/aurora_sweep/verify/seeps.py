"""SEEPS's per-sample terms against the climate of the train split (`climates.SeepsClimate`).

`metrics` (its docstring defines SEEPS and how it differs from WeatherBench 2's) scores with
these.
"""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr
from scores.categorical import seeps as scores_seeps

from aurora_sweep.data.climates import DRY_MM, SEEPS_P_DRY_RANGE

SPATIAL = ("latitude", "longitude")


_SEEPS_EXTREME_P = "`prob_dry` contains values that are exactly equal to 0 or 1"


def seeps_terms(
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
