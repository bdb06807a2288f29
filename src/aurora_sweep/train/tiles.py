"""Training on tiles of the region: each step a random square of whole patches, every variable,
static field and coordinate cut alike, so that a trial's activations follow the tile's area, not
the region's (Aurora's backbone takes any grid of 4-point patches, 12 points a side at least).
Validation, scores and forecasts stay on the whole region.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from aurora import Batch

from aurora_sweep.config.recipe import MIN_GRID_POINTS
from aurora_sweep.data.samples import PATCH


def tile_side(tile: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The (rows, columns) a trial trains on: `tile` points a side (0: the whole grid), never
    more than the grid, in whole 4-point patches, at least `MIN_GRID_POINTS`."""
    if tile <= 0:
        return grid
    side = max(MIN_GRID_POINTS, tile - tile % PATCH)
    return min(side, grid[0]), min(side, grid[1])


def tile_origins(
    rng: np.random.Generator, grid: tuple[int, int], side: tuple[int, int], n: int
) -> np.ndarray:
    """`n` (row, column) corners of `side` tiles drawn uniformly inside `grid`: a tile never
    crosses the region's edge, and every point lies in some tile's reach."""
    rows = rng.integers(0, grid[0] - side[0] + 1, size=n)
    cols = rng.integers(0, grid[1] - side[1] + 1, size=n)
    return np.stack([rows, cols], axis=1)


def crop_sample(
    batch: Batch, target: dict[str, torch.Tensor], origin: tuple[int, int], side: tuple[int, int]
) -> tuple[Batch, dict[str, torch.Tensor]]:
    """A training batch and its truth cut to the tile at `origin` of `side` points: every
    variable, the static fields and the coordinates alike (views, no copy)."""
    (i, j), (h, w) = origin, side
    rows, cols = slice(i, i + h), slice(j, j + w)
    return (
        Batch(
            surf_vars={k: v[..., rows, cols] for k, v in batch.surf_vars.items()},
            static_vars={k: v[rows, cols] for k, v in batch.static_vars.items()},
            atmos_vars={k: v[..., rows, cols] for k, v in batch.atmos_vars.items()},
            metadata=dataclasses.replace(
                batch.metadata, lat=batch.metadata.lat[rows], lon=batch.metadata.lon[cols]
            ),
        ),
        {k: v[..., rows, cols] for k, v in target.items()},
    )
