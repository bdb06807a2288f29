"""Training on tiles of the region: each micro-batch a tile of whole patches, every variable,
static field and coordinate cut alike, so that a trial's activations follow the tile's area, not
the region's (Aurora's backbone takes any grid of 4-point patches, 12 points a side at least).
Validation, scores and forecasts stay on the whole region.

A tile is a cell of a random partition of the region (`tile_draws`): each axis is cut into
segments of at most the tile's side, at a random offset, and one row segment and one column
segment are picked at random. Every point lies in exactly one cell of any partition, so every
point is trained on equally often in expectation, the region's edges and corners as often as its
middle; tiles of one size with uniformly drawn corners cover an edge row 64 times less often than
the interior at tile 64 on the Europe grid. The cells at the region's edges may be smaller than
the tile (at least 12 points a side); the memory a trial is predicted to need is that of a whole
tile (`tile_side`). A tile's loss weighs its rows as the scores weigh them (`loss.LossSpec`).

A tile trains one step, never a rollout: the gradient-free steps of a rollout carry into the tile
what lies outside it (about 4° a 6-hour step), which a tile cannot know, so the loss would train
the model to invent it; a trial with rollouts trains on the whole region (`sweep.space`).
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


def tile_draws(
    rng: np.random.Generator, grid: tuple[int, int], side: tuple[int, int], n: int
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """`n` tiles, each ((row, column) origin, (rows, columns) shape): a cell of a random
    partition of `grid` into segments of at most `side` points an axis, picked at random."""
    return [_cell(rng, grid, side) for _ in range(n)]


def _cell(
    rng: np.random.Generator, grid: tuple[int, int], side: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    rows = segments(rng, grid[0], side[0])
    cols = segments(rng, grid[1], side[1])
    (r0, r1), (c0, c1) = rows[rng.integers(len(rows))], cols[rng.integers(len(cols))]
    return (r0, c0), (r1 - r0, c1 - c0)


def segments(rng: np.random.Generator, length: int, side: int) -> list[tuple[int, int]]:
    """`range(length)` cut into consecutive (start, end) segments of at most `side` points, the
    cuts at whole patches from a random offset; no segment is shorter than `MIN_GRID_POINTS`
    (where no offset allows that, the last one reaches back to that length, overlapping)."""
    if side >= length:
        return [(0, length)]
    offsets = [o for o in range(0, side, PATCH) if _cuts_fit(o, length, side)]
    offset = int(rng.choice(offsets)) if offsets else 0
    starts = sorted({0, *range(offset, length, side)})
    cut = list(zip(starts, [*starts[1:], length]))
    if cut[-1][1] - cut[-1][0] < MIN_GRID_POINTS:
        cut[-1] = (length - MIN_GRID_POINTS, length)
    return cut


def _cuts_fit(offset: int, length: int, side: int) -> bool:
    """Whether cutting at `offset`, `offset + side`, ... leaves a first and a last segment of at
    least `MIN_GRID_POINTS`."""
    last = (length - offset - 1) % side + 1
    return (offset == 0 or offset >= MIN_GRID_POINTS) and last >= MIN_GRID_POINTS


def crop_sample(
    batch: Batch, target: dict[str, torch.Tensor], origin: tuple[int, int], side: tuple[int, int]
) -> tuple[Batch, dict[str, torch.Tensor]]:
    """A training batch and its truth cut to the tile at `origin` of `side` (rows, columns): every
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
