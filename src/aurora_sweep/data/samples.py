"""Turn the canonical cube into `aurora.Batch` samples, split by time.

A sample is two input times (t-6h, t) and the target time t+6h. Only times whose neighbours are
exactly 6 h away and whose fields are complete make samples, so the cube may have gaps. A sample
belongs to a split when all three of its times fall inside that split's period, so no target
leaks from one split into another's inputs.

Aurora wants latitudes strictly decreasing and longitudes strictly increasing in [0, 360), with
a width that is a multiple of the patch size. It accepts one row more than a multiple of the patch
size but drops that row inside its forward pass, so its forecast is one row short of such an
input: samples are cut to the grid the model forecasts (`patch_crop`), and targets, baselines and
scores all live on that grid. `model_longitudes` maps a box onto that: western-
hemisphere boxes move by +360 (exact); a box crossing 0° is shifted east until its western edge
is 0°, which offsets Aurora's position encoding by that many degrees (reported in `lon_shift`).
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import psutil
import torch
import xarray as xr
from aurora import Batch, Metadata

from aurora_sweep.config.recipe import MIN_GRID_POINTS
from aurora_sweep.config.study import DataConfig, Period
from aurora_sweep.config.targets import BOUND, DEFAULT, TARGETS, Target
from aurora_sweep.data.store import (
    ATMOS_VARS,
    AURORA_STATIC,
    STATIC_VARS,
    SURF_VARS,
    TRUE_LON,
    V15_SURF_VARS,
    surface_vars,
)
from aurora_sweep.data.store_reader import StoreReader
from aurora_sweep.errors import AuroraSweepError

PATCH = 4
STEP = np.timedelta64(6, "h")
#: The share of the memory available when a cube is opened that it may take in memory; a larger
#: cube is read sample by sample from the store (`StoreReader`).
MEMORY_SHARE = 0.5


def fits_in_memory(nbytes: int) -> bool:
    """Whether `nbytes` fit in memory with a margin: half of what the machine has free now."""
    return nbytes <= MEMORY_SHARE * psutil.virtual_memory().available


def _lazy(cube: xr.Dataset) -> bool:
    """True while some variable is still only on disk (xarray's lazy or dask arrays)."""
    return not all(v.variable._in_memory for v in cube.data_vars.values())


def model_longitudes(lon: np.ndarray) -> tuple[np.ndarray, float]:
    """Longitudes in [0, 360) for Aurora, and the shift applied beyond the exact +360 move."""
    lon = np.asarray(lon, dtype=np.float64)
    if lon.min() >= 0:
        return lon, 0.0
    if lon.max() < 0:
        return lon + 360.0, 0.0
    shift = -float(lon.min())
    return lon + shift, shift


def patch_crop(n_lat: int, n_lon: int) -> tuple[int, int]:
    """The grid Aurora forecasts for an n_lat x n_lon region: both sides multiples of 4.

    Aurora also takes 4k+1 rows, but crops the last one in `Batch.crop` and forecasts 4k rows; a
    region at 0.25° between whole degrees has 4k+1 rows, so that row is dropped here, up front.
    """
    rows = n_lat - n_lat % PATCH
    cols = n_lon - n_lon % PATCH
    if rows < MIN_GRID_POINTS or cols < MIN_GRID_POINTS:
        raise AuroraSweepError(
            f"the region is {n_lat}x{n_lon} grid points; Aurora needs at least "
            f"{MIN_GRID_POINTS}x{MIN_GRID_POINTS} (its backbone halves the 4-point patch grid "
            "twice): widen the region"
        )
    return rows, cols


def in_period(times: np.ndarray, period: Period) -> np.ndarray:
    start = np.datetime64(period.start)
    end = np.datetime64(period.end + dt.timedelta(days=1))
    return (times >= start) & (times < end)


def sample_times(cube: xr.Dataset, period: Period, target: str, steps: int = 1) -> np.ndarray:
    """Indices t of the cube's time axis whose sample lies wholly in `period`, 6 h apart and
    complete (the `target` variable there): the inputs t-1 and t, the targets t+1 .. t+steps (a
    lead of `steps` model steps), and the steps t-steps+1 .. t that persistence takes over the
    same length."""
    times = cube["time"].values
    back = max(1, steps - 1)
    if times.size < back + steps + 1:
        return np.zeros(0, dtype=int)
    t = np.arange(back, times.size - steps)
    inside = in_period(times, period)
    complete = _complete(cube, target)
    ok = inside[t - back] & inside[t + steps]
    for k in range(-back, steps + 1):
        ok &= complete[t + k]
        if k > -back:
            ok &= times[t + k] - times[t + k - 1] == STEP
    return t[ok]


def land_mask(cube: xr.Dataset) -> np.ndarray:
    """The land points (`static_lsm` >= 0.5), where a land-only target is defined and scored."""
    return np.asarray(cube["static_lsm"].values) >= 0.5


def _complete(cube: xr.Dataset, target: str) -> np.ndarray:
    """Per time, whether the target's field is there: probed at the first grid point, a
    land-only target's (`targets.Target.land_only`) at the first land point."""
    i = j = 0
    if TARGETS[target].land_only:
        land = np.argwhere(land_mask(cube))
        if not land.size:
            raise AuroraSweepError(
                f"the region has no land point, and {target} is defined over land only: choose a "
                "region with land"
            )
        i, j = land[0]
    return np.isfinite(cube[target].isel(latitude=i, longitude=j).values)


@dataclass(frozen=True)
class TargetStats:
    """The target's normalisation (in its units), from the train split only.

    The location is the target's lower bound or its train mean, as its row says
    (`targets.Target.location`): Aurora clamps a positive variable (`positive_surf_vars`) at 0
    in normalised units, which is the bound only when the location is the bound. The mean is
    kept to start the new head at the train-split mean.
    """

    location: float
    scale: float
    mean: float = 0.0
    #: the target they are of (`targets.TARGETS`)
    target: str = DEFAULT


def target_stats(cube: xr.Dataset, train: Period, target: str) -> TargetStats:
    values = cube[target].sel(time=in_period(cube["time"].values, train))
    if TARGETS[target].land_only:  # over land alone
        values = values.where(land_mask(cube))
    if values.sizes["time"] == 0:
        raise AuroraSweepError(f"no data in the train period {train.start}..{train.end}")
    mean, std = float(values.mean()), float(values.std())
    spec = TARGETS[target]
    location = spec.lower if spec.location == BOUND and spec.lower is not None else mean
    return TargetStats(location=location, scale=max(std, 1e-3), mean=mean, target=target)


def forecast_times(cube: xr.Dataset, period: Period, target: str) -> np.ndarray:
    """Indices t of the cube's time axis in `period` whose inputs (t-1, t) are there: the times a
    forecast can start from, whether or not the store has what follows them."""
    times = cube["time"].values
    if times.size < 2:
        return np.zeros(0, dtype=int)
    t = np.arange(1, times.size)
    ok = (times[t] - times[t - 1] == STEP) & in_period(times, period)[t]
    complete = _complete(cube, target)
    return t[ok & complete[t - 1] & complete[t]]


def _model_cube(cube: xr.Dataset, levels: Sequence[int]) -> xr.Dataset:
    """The cube on the grid Aurora forecasts (`patch_crop`) and on `levels`, in their order:
    labels come from the selection itself, so the level axis of every tensor and
    `atmos_levels` always name the same levels."""
    missing = [lv for lv in levels if lv not in cube["level"].values]
    if missing:
        raise AuroraSweepError(f"the data store has no level(s) {missing} hPa; rebuild it")
    rows, cols = patch_crop(cube.sizes["latitude"], cube.sizes["longitude"])
    cube = cube.isel(latitude=slice(0, rows), longitude=slice(0, cols))
    return cube.sel(level=list(levels))


class Samples:
    """The samples of one split, as `aurora.Batch`es with the study's target (`data.target`,
    `variable`) at the next time as the truth (with `target=False`: every time of the split a
    forecast can start from, for `inputs`)."""

    def __init__(
        self,
        cube: xr.Dataset,
        data: DataConfig,
        split: str,
        *,
        target: bool = True,
        in_memory: bool | None = None,
        steps: int = 1,
    ):
        periods = {"train": data.train, "validation": data.validation, "test": data.test}
        if split not in periods:
            raise AuroraSweepError(f"unknown split {split!r}: use train, validation or test")
        cube = _model_cube(cube, data.levels)
        # in memory when it fits (in_memory None: decided by the memory free now), else read
        # sample by sample straight from the store
        self._reader: StoreReader | None = None
        if _lazy(cube) and in_memory is None:
            in_memory = fits_in_memory(cube.nbytes)
        if _lazy(cube) and not in_memory and "source" in cube.encoding:
            self._reader = StoreReader(cube)
        self.cube = cube.load() if in_memory else cube
        self._memory: dict[str, np.ndarray] | None = None  # the cube's arrays, once asked for
        #: positions of `levels` on the level axis of the cube's arrays (None: all of them);
        #: set by `with_levels` for a subset read from memory
        self._level_pick: list[int] | None = None
        self.split = split
        #: what the study predicts: its name in the store and the batch, and how it is combined
        #: over a lead (`targets.Target.accumulate`)
        self.variable: Target = TARGETS[data.target]
        self.levels = tuple(int(v) for v in self.cube["level"].values)
        #: model steps of 6 h from the last input to the target: the lead time
        self.steps = steps
        p = self.period = periods[split]
        name = self.variable.name
        self.index = sample_times(cube, p, name, steps) if target else forecast_times(cube, p, name)
        if self.index.size == 0:
            p = periods[split]
            if not target:
                raise AuroraSweepError(
                    f"no time from {p.start} to {p.end} in the store has the two input times a "
                    "forecast starts from (6 hours apart, complete)"
                )
            raise AuroraSweepError(f"no complete samples in the {split} period {p.start}..{p.end}")
        self.lat = torch.tensor(cube["latitude"].values, dtype=torch.float64)
        lon, self.lon_shift = model_longitudes(cube["longitude"].values)
        if self.lon_shift:
            warnings.warn(
                f"the region crosses 0° longitude; Aurora sees it shifted east by "
                f"{self.lon_shift:g}° (its position encoding is offset by that much)",
                stacklevel=2,
            )
        self.lon = torch.tensor(lon)
        self.times = pd.DatetimeIndex(cube["time"].values)
        #: the instantaneous surface variables a batch carries and a forecast is scored on
        self.surface: tuple[str, ...] = SURF_VARS
        self.static = {
            AURORA_STATIC[k]: torch.from_numpy(cube[k].values.astype(np.float32))
            for k in STATIC_VARS
        }

    def __len__(self) -> int:
        return int(self.index.size)

    def at_lead(self, steps: int, *, init_hours: Sequence[int] | None = None) -> Samples | None:
        """The same split's samples for a lead of `steps` model steps (sharing this one's data in
        memory or its store reader), started only at `init_hours` (UTC) when given; None when
        the split holds none."""
        if steps == self.steps and init_hours is None:
            return self
        other = copy.copy(self)
        other.steps = steps
        index = sample_times(self.cube, self.period, self.variable.name, steps)
        if init_hours is not None:
            index = index[np.isin(self.times[index].hour, list(init_hours))]
        other.index = index
        return other if other.index.size else None

    def with_levels(self, levels: Sequence[int]) -> Samples:
        """The same samples on a subset of this one's pressure levels (in this one's order),
        sharing its data in memory or its store reader: a trial that trains on fewer levels
        reads, and holds, only those."""
        levels = tuple(int(v) for v in levels)
        if levels == self.levels:
            return self
        outside = [lv for lv in levels if lv not in self.levels]
        if outside or not levels:
            raise AuroraSweepError(
                f"levels {list(levels)} hPa: the samples hold only {list(self.levels)}"
            )
        pick = [self.levels.index(lv) for lv in levels]
        other = copy.copy(self)
        other.levels = levels
        # the cube without its atmospheric variables: they are read through `read` alone, so
        # nothing can take the cube's level axis for the subset's
        other.cube = self.cube.drop_dims("level", errors="ignore")
        if self._reader is not None:  # the reader reads the subset itself
            other._reader = copy.copy(self._reader)
            other._reader.level_pos = [self._reader.level_pos[i] for i in pick]
        else:  # positions on the level axis of the arrays in memory, shared, not copied
            held = self._level_pick or list(range(len(self.levels)))
            other._level_pick = [held[i] for i in pick]
            other._memory = self._arrays()
        return other

    def for_v15(self, statics: dict[str, torch.Tensor]) -> Samples:
        """The same samples as a base with its own precipitation reads them
        (`hourly.SixHourAurora15`): Aurora 1.5's fourteen more surface inputs beside Aurora's
        four, its static fields `statics` (cut at this grid, `aurora15.region_statics`) for
        Aurora's, and the true longitudes where Aurora sees the box shifted; sharing this one's
        data in memory or its store reader."""
        missing = [k for k in V15_SURF_VARS if k not in self.cube]
        if missing:
            raise AuroraSweepError(
                f"the data store lacks Aurora 1.5's input(s) {', '.join(missing[:4])}: rebuild it "
                "for this study, which uses Aurora 1.5"
            )
        other = copy.copy(self)
        other.surface = surface_vars(True)
        other.static = dict(statics)
        if self.lon_shift:
            lon = torch.tensor(self.cube["longitude"].values, dtype=torch.float32)
            other.static[TRUE_LON] = lon.expand(len(self.lat), -1).clone()
        return other

    def target_times(self) -> pd.DatetimeIndex:
        """Each sample's valid time: `steps` model steps after its last input."""
        return self.times[self.index + self.steps]

    def target_days(self) -> np.ndarray:
        """Each sample's target day (datetime64[D]): the bootstrap's blocks."""
        return self.target_times().values.astype("datetime64[D]")

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of the grid the model forecasts."""
        return self.cube.sizes["latitude"], self.cube.sizes["longitude"]

    @functools.cached_property
    def scored_points(self) -> np.ndarray | None:
        """The grid points the target is scored on: land for a land-only target, else None
        (every point). Read once: every training batch's truth asks for it (`as_truth`)."""
        return land_mask(self.cube) if self.variable.land_only else None

    @property
    def lazy(self) -> bool:
        """True when samples are read from the store as they are asked for."""
        return self._reader is not None

    def read(self, positions: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """`names` at the cube's time `positions`, float32 numpy arrays (one copy each): from
        memory, or straight from the store for a cube too large for it; Aurora 1.5's inputs
        without NaN."""
        positions = np.asarray(positions).reshape(-1)
        if self._reader is not None:
            out = self._reader.read(self.times[positions], names)
        else:
            arrays, pick = self._arrays(), self._level_pick
            out = {
                k: arrays[k][np.ix_(positions, pick)]
                if pick is not None and k in ATMOS_VARS
                else arrays[k][positions]
                for k in names
            }
        # sea ice NaN over land: 0, as Aurora 1.5 reads it; a land-only target's at sea too
        for k in (*V15_SURF_VARS, *((self.variable.name,) if self.variable.land_only else ())):
            if k in out:
                np.nan_to_num(out[k], copy=False, nan=0.0)
        return out

    def _arrays(self) -> dict[str, np.ndarray]:
        """The cube's arrays in memory, made once (views of the loaded cube, no copy);
        Aurora 1.5's surface inputs where the store has them."""
        if self._memory is None:
            names = [k for k in (*SURF_VARS, *V15_SURF_VARS) if k in self.cube]
            self._memory = {
                k: np.asarray(self.cube[k].values, dtype=np.float32)
                for k in (*names, self.variable.name, *ATMOS_VARS)
            }
        return self._memory

    def batch(self, indices: Sequence[int]) -> tuple[Batch, torch.Tensor]:
        """Inputs for samples `indices` and the target at the next time, shaped (B, lat, lon)."""
        t = self.index[np.asarray(indices)]
        name = self.variable.name
        target = self.read(t + 1, (name,))[name]
        return self.inputs(indices), torch.from_numpy(target)

    def training_batch(self, indices: Sequence[int]) -> tuple[Batch, dict[str, torch.Tensor]]:
        """Inputs for samples `indices` and every variable at the valid time (the loss's truth
        for the last step of a rollout): surface variables and the target's value of the step
        ending then (B, lat, lon), atmospheric ones (B, level, lat, lon)."""
        names = (*self.surface, self.variable.name, *ATMOS_VARS)
        truth = self.as_truth(self.read(self.index[np.asarray(indices)] + self.steps, names))
        return self.inputs(indices), truth

    def as_truth(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Arrays `read` gave, as the loss's truth (tensors): a land-only target NaN at sea,
        where it is undefined and the loss leaves it out (an input reads 0 there)."""
        out = {k: torch.from_numpy(v) for k, v in arrays.items()}
        name, land = self.variable.name, self.scored_points
        if land is not None and name in out:
            out[name] = out[name].masked_fill(torch.from_numpy(~land), float("nan"))
        return out

    def inputs(self, indices: Sequence[int]) -> Batch:
        """The two input times of samples `indices` (for a forecast, with or without a target),
        read once into the arrays the batch holds: no copy after the read."""
        t = self.index[np.asarray(indices)]
        names = (*self.surface, self.variable.name, *ATMOS_VARS)
        arrays = self.read(np.stack([t - 1, t], axis=1), names)
        return self._inputs(
            indices, {k: a.reshape(len(t), 2, *a.shape[1:]) for k, a in arrays.items()}
        )

    def _inputs(self, indices: Sequence[int], arrays: dict[str, np.ndarray]) -> Batch:
        t = self.index[np.asarray(indices)]
        return Batch(
            surf_vars={k: torch.from_numpy(arrays[k]) for k in (*self.surface, self.variable.name)},
            static_vars=self.static,
            atmos_vars={k: torch.from_numpy(arrays[k]) for k in ATMOS_VARS},
            metadata=Metadata(
                lat=self.lat,
                lon=self.lon,
                time=tuple(self.times[i].to_pydatetime() for i in t),
                atmos_levels=self.levels,
            ),
        )

    def _over_lead(self, indices: Sequence[int], offsets: range) -> np.ndarray:
        """The target over the steps `offsets` from each sample's last input time, combined as
        its kind is (`targets.Target.over_lead`: summed, averaged, or the last)."""
        t = self.index[np.asarray(indices)]
        name, target = self.variable.name, self.variable
        if len(offsets) == 1 or not target.hourly:
            return self.read(t + offsets[-1], (name,))[name]
        parts = self.read(np.stack([t + k for k in offsets], axis=1), (name,))[name]
        return target.over_lead(parts.reshape(len(t), len(offsets), *parts.shape[1:]))

    def persistence(self, indices: Sequence[int]) -> np.ndarray:
        """The target over the lead's length ending at the last input time: the persistence
        forecast (at 6 h, the last observed 6-hour value)."""
        return self._over_lead(indices, range(1 - self.steps, 1))

    def observed(self, indices: Sequence[int]) -> np.ndarray:
        """The observed target over the lead, in its units: the steps' values summed (an
        accumulation), averaged (a mean rate), or the one at the valid time (instantaneous)."""
        return self._over_lead(indices, range(1, self.steps + 1))

    def observed_state(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Every variable Aurora already predicts, at the valid time: surface (n, lat, lon),
        atmospheric (n, level, lat, lon) with levels in `self.levels` order."""
        return self.read(self.index[np.asarray(indices)] + self.steps, (*self.surface, *ATMOS_VARS))
