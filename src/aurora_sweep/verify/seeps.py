"""SEEPS's per-sample terms against the climate of the train split (`climates.SeepsClimate`);
`metrics` scores with these.

`tp_seeps`, the Stable Equitable Error in Probability Space (Rodwell et al. 2010) as WeatherBench 2
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
