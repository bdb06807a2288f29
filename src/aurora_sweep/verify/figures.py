"""The figures a trial and an evaluation log: the loss curves and the maps of three fixed cases
(a wet, a median and a dry one) of the target, drawn by `plots`."""

from __future__ import annotations

import numpy as np

from aurora_sweep.data.samples import Samples


def case_indices(samples: Samples, indices: np.ndarray) -> dict[str, int]:
    """Positions in `indices` of a wet, a median and a dry case (by weighted area-mean target,
    over the points it is scored on)."""
    from aurora_sweep.verify.plots import pick_cases

    observed, points = samples.observed(indices), samples.scored_points
    observed = observed if points is None else np.where(points, observed, np.nan)
    return pick_cases(observed, samples.cube["latitude"].values)


def case_maps_png(samples: Samples, result) -> bytes:
    """Observed, forecast, persistence and error maps of three fixed cases, as a PNG."""
    from aurora_sweep.verify.plots import case_maps, png_bytes

    idx = result.indices
    times = samples.target_times()[idx]
    observed, persistence = samples.observed(idx), samples.persistence(idx)
    forecast, points = result.values, samples.scored_points
    if points is not None:  # a land-only target: its sea, where it is not scored, drawn grey
        observed, persistence, forecast = (
            np.where(points, v, np.nan) for v in (observed, persistence, forecast)
        )
    cases = [
        {
            "label": label,
            "time": f"{times[i]:%Y-%m-%d %H UTC}",
            "observed": observed[i],
            "forecast": forecast[i],
            "persistence": persistence[i],
        }
        for label, i in case_indices(samples, idx).items()
    ]
    lon = samples.cube["longitude"].values
    lsm = samples.cube["static_lsm"].values
    lat = samples.cube["latitude"].values
    return png_bytes(case_maps(cases=cases, lat=lat, lon=lon, lsm=lsm, target=samples.variable))


def trial_figures(result, data) -> dict[str, bytes]:
    """The PNG figures each completed trial logs: loss curves and the three case maps."""
    from aurora_sweep.verify.plots import loss_curves, png_bytes

    return {
        "loss_curves.png": png_bytes(loss_curves(result.train_loss, result.val_loss)),
        "cases.png": case_maps_png(data.validation, result.forecasts),
    }
