"""Scores of whole fields computed in NumPy: the contingency counts of an event, the fractions
skill score and the anomaly correlation (`metrics` names and pools them).

The FSS is `scores.spatial.fss_2d`'s algorithm (summed-area tables) over every sample at once;
the anomaly correlation is WeatherBench 2's ACC. A leaf: NumPy only.
"""

from __future__ import annotations

import numpy as np


def contingency_counts(
    forecast: np.ndarray, observed: np.ndarray, threshold: float
) -> dict[str, float]:
    """Hits, correct negatives, false alarms and misses of the event "value >= threshold" over
    every point where both fields are defined, as `scores.categorical`'s `ThresholdEventOperator`
    (`operator.ge`) and `transform(reduce_dims="all")` count them (a point where either is NaN
    is in no count), keyed as scores keys them; NumPy over the arrays as they are (its xarray
    tables took a third of a demo trial's scoring)."""
    forecast, observed = np.asarray(forecast), np.asarray(observed)
    defined = ~(np.isnan(forecast) | np.isnan(observed))
    with np.errstate(invalid="ignore"):
        f = np.greater_equal(forecast, threshold) & defined
        o = np.greater_equal(observed, threshold) & defined
    hits = int(np.count_nonzero(f & o))
    forecast_events, observed_events = int(np.count_nonzero(f)), int(np.count_nonzero(o))
    return {
        "tp_count": float(hits),
        "fp_count": float(forecast_events - hits),
        "fn_count": float(observed_events - hits),
        "tn_count": float(np.count_nonzero(defined) - forecast_events - observed_events + hits),
    }


def fss(forecast: np.ndarray, observed: np.ndarray, threshold: float, window: int) -> float:
    """Fractions skill score of the event "value >= threshold" in `window` x `window` windows
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


def anomaly_correlation(
    forecast: np.ndarray, observed: np.ndarray, climatology: np.ndarray, lat: np.ndarray
) -> float:
    """WeatherBench 2's anomaly correlation coefficient of (sample, lat, lon) fields against the
    climatology's fields for the same samples: per sample, the cos(latitude)-weighted uncentred
    correlation of the forecast's and the observation's anomalies,

        ACC = sum w f' o' / sqrt(sum w f'^2 * sum w o'^2),   f' = f - c, o' = o - c,

    then the mean over samples (1 perfect, 0 no skill); NaN when a sample's forecast or
    observation equals the climatology everywhere (the climatology forecast itself)."""
    c = np.asarray(climatology, np.float64)
    f, o = np.asarray(forecast, np.float64) - c, np.asarray(observed, np.float64) - c
    if len(f) == 0:
        return float("nan")
    w = np.cos(np.deg2rad(np.asarray(lat, np.float64)))[None, :, None]
    # NaN points (a land-only target's sea) left out
    num = np.nansum(w * f * o, axis=(1, 2))
    den = np.sqrt(np.nansum(w * f * f, axis=(1, 2)) * np.nansum(w * o * o, axis=(1, 2)))
    with np.errstate(invalid="ignore", divide="ignore"):
        per_sample = np.where(den > 0, num / den, np.nan)
    return float(per_sample.mean())
