"""Forecast skill for tp: latitude-weighted RMSE and bias, and skill against baselines.

Scores come from `scores` (the Bureau of Meteorology's verification package) on xarray data, so
that the numbers here mean what they mean elsewhere in the field. All tp values are mm per 6 h.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scores.continuous import additive_bias, rmse
from scores.functions import create_latitude_weights

DIMS = ("sample", "latitude", "longitude")


def _field(values: np.ndarray, lat: np.ndarray) -> xr.DataArray:
    return xr.DataArray(
        np.asarray(values, dtype=np.float64), dims=DIMS, coords={"latitude": np.asarray(lat)}
    )


def lat_weighted_rmse(forecast: np.ndarray, observed: np.ndarray, lat: np.ndarray) -> float:
    """RMSE over samples and grid points, each point weighted by cos(latitude)."""
    weights = create_latitude_weights(xr.DataArray(np.asarray(lat), dims="latitude"))
    fc, ob = _field(forecast, lat), _field(observed, lat)
    return float(rmse(fc, ob, weights=weights))


def lat_weighted_bias(forecast: np.ndarray, observed: np.ndarray, lat: np.ndarray) -> float:
    weights = create_latitude_weights(xr.DataArray(np.asarray(lat), dims="latitude"))
    return float(additive_bias(_field(forecast, lat), _field(observed, lat), weights=weights))


def skill(score: float, reference: float) -> float:
    """1 - score/reference: 1 is perfect, 0 is no better than the reference."""
    return 1.0 - score / reference if reference > 0 else float("nan")


def tp_scores(
    *,
    forecast: np.ndarray,
    observed: np.ndarray,
    persistence: np.ndarray,
    climatology: np.ndarray,
    lat: np.ndarray,
) -> dict[str, float]:
    """The tp metrics every trial and every evaluation reports."""
    model = lat_weighted_rmse(forecast, observed, lat)
    pers = lat_weighted_rmse(persistence, observed, lat)
    clim = lat_weighted_rmse(climatology, observed, lat)
    return {
        "tp_rmse": model,
        "tp_bias": lat_weighted_bias(forecast, observed, lat),
        "tp_rmse_persistence": pers,
        "tp_rmse_climatology": clim,
        "tp_skill_persistence": skill(model, pers),
        "tp_skill_climatology": skill(model, clim),
    }
