"""The box's interior: every score made again on the points an edge margin in from each side.

A regional model is fed nothing through its box's edges: what would flow in from outside is
unknown to it, so its skill decays inward from the edges as the lead grows (about 4° a 6-hour
step). Scores over the whole box mix that edge zone with the interior a user's catchment may
lie in; `[study] edge_margin` (degrees, `data.samples.interior_window`) names the edge zone, and
every score at every lead is made on the interior too, for the model and every baseline
(`metrics.scores`, `_interior`). The forgetting ratios are the whole box's: the base model and
the fine-tune share the same edges.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from aurora_sweep.config.settings import Window
from aurora_sweep.data.climates import SeepsClimate


def cut(values: np.ndarray, window: Window | None) -> np.ndarray:
    """(..., lat, lon) `values` on the grid points of `window` (None: all of them)."""
    return values if window is None else np.asarray(values)[..., window[0], window[1]]


def cut_lat(lat: np.ndarray, window: Window | None) -> np.ndarray:
    """The latitudes of `window`'s rows (None: all of them)."""
    return np.asarray(lat) if window is None else np.asarray(lat)[window[0]]


def cut_seeps(seeps: SeepsClimate | None, window: Window | None) -> SeepsClimate | None:
    """A SEEPS climate on the grid points of `window` (None: all of them)."""
    if seeps is None or window is None:
        return seeps
    return dataclasses.replace(
        seeps, p_dry=cut(seeps.p_dry, window), light_heavy=cut(seeps.light_heavy, window)
    )


def objective_window(data) -> Window | None:
    """The grid points a study's objective is scored on (`data`: its `TrialData`): the
    interior's for an objective of the interior, else all of them (None)."""
    return data.interior if data.objective.interior else None
