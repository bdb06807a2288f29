"""The checks of the arrays a score is given (`metrics`): shapes that agree, one month and hour
per sample, a SEEPS climate on the grid scored. A wrong shape is a caller's error (ValueError)."""

from __future__ import annotations

import numpy as np

from aurora_sweep.data.climates import N_HOUR_SLOTS, SeepsClimate, hour_slots


def check_inputs(
    observed: np.ndarray,
    lat: np.ndarray,
    months: np.ndarray,
    hours: np.ndarray,
    seeps: SeepsClimate | None,
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
    climate = {"p_dry": seeps.p_dry, "light_heavy": seeps.light_heavy} if seeps else {}
    for name, clim in climate.items():
        if np.shape(clim) != (12, N_HOUR_SLOTS, *shape[1:]):
            raise ValueError(
                f"the SEEPS climate's {name} is shaped {np.shape(clim)}, not (12 months, "
                f"{N_HOUR_SLOTS} hour slots, {shape[1]}, {shape[2]}): build it with "
                "seeps_climate(tp, months, hours) on the grid that is scored"
            )
    if shape[0] and not np.isin(months, np.arange(1, 13)).all():
        raise ValueError("months must be calendar months 1..12 (of each sample's target time)")
    hour_slots(hours)
