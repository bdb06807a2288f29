"""Assembling the store from CDS files: the region's grid points, final ERA5 over ERA5T, hourly
tp summed into 6-hour totals, in memory-mapped scratch arrays written once."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from aurora_sweep.config.study import DataConfig, Region
from aurora_sweep.config.targets import DEFAULT, TARGETS, Target
from aurora_sweep.data import store
from aurora_sweep.data.era5.plan import (
    ORIGIN,
    PRESSURE_LEVELS,
    SINGLE_LEVELS,
    TARGET_SOURCES,
    UNITS,
    model_times,
)
from aurora_sweep.data.era5.read import CorruptFileError, open_pieces
from aurora_sweep.data.era5.scratch import make_dir, scratch_folder
from aurora_sweep.errors import AuroraSweepError

log = logging.getLogger(__name__)
_EPS = 1e-6

# --------------------------------------------------------------------------------------------
# Regions and grids


def lon_frame(region: Region) -> tuple[float, float]:
    """(west, width) of the box with west in [-180, 180): a box crossing 0° starts negative."""
    west = ((region.west + 180.0) % 360.0) - 180.0
    width = (region.east - region.west) % 360.0 or 360.0
    return west, width


def region_indices(
    lat: np.ndarray, lon: np.ndarray, region: Region
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Indices into (lat, lon) that cut `region`, in store order, and the store coordinates.

    Latitudes come out strictly decreasing; longitudes strictly increasing, counted from the
    box's west edge, so 0..360 and -180..180 inputs give the same output (-12..40 for a box
    from 12°W to 40°E; 170..190 for one crossing 180°).
    """
    lat = np.asarray(lat, dtype=float)
    in_lat = np.flatnonzero((lat >= region.south - _EPS) & (lat <= region.north + _EPS))
    lat_idx = in_lat[np.argsort(-lat[in_lat], kind="stable")]
    west, width = lon_frame(region)
    framed = np.round(west + np.mod(np.asarray(lon, dtype=float) - west + _EPS, 360.0) - _EPS, 6)
    in_lon = np.flatnonzero(framed <= west + width + _EPS)
    order = in_lon[np.argsort(framed[in_lon], kind="stable")]
    _, first = np.unique(framed[order], return_index=True)  # a 360° grid may repeat a meridian
    lon_idx = order[np.sort(first)]
    return lat_idx, lon_idx, np.round(lat[lat_idx], 6), framed[lon_idx]


def _span(coord: xr.DataArray) -> str:
    return f"{float(coord.min()):g}..{float(coord.max()):g}"


def _describe_region(region: Region) -> str:
    return f"{region.south}..{region.north}°N, {region.west}..{region.east}°E"


# --------------------------------------------------------------------------------------------
# Building the store


@dataclass
class _Piece:
    """One opened NetCDF (file or zip member) and where it lands in the store."""

    ds: xr.Dataset
    label: str
    times: np.ndarray  # int64 seconds
    rank: np.ndarray  # 0 for final ERA5, 1 for ERA5T and other expvers
    lat_idx: np.ndarray
    lon_idx: np.ndarray


def _expver_rank(expver: np.ndarray) -> np.ndarray:
    return np.where(np.char.lstrip(expver.astype(str), "0") == "1", 0, 1)


def _seconds(values: np.ndarray) -> np.ndarray:
    return np.asarray(values).astype("datetime64[s]").astype(np.int64)


def _choose(
    table: dict[tuple, dict[int, tuple[int, int, int]]], key: tuple, piece_no: int, piece: _Piece
) -> None:
    """Record, for each time of `piece`, whether it is the best source seen so far for `key`."""
    slot = table.setdefault(key, {})
    for i, (t, r) in enumerate(zip(piece.times.tolist(), piece.rank.tolist(), strict=True)):
        best = slot.get(t)
        if best is None or r < best[0]:
            slot[t] = (r, piece_no, i)


def _read(var: xr.DataArray, **indices: np.ndarray) -> np.ndarray:
    """Values of `var` at integer index arrays per dim: read the bounding box, then pick."""
    boxes, picks = {}, []
    for dim in var.dims:
        idx = indices.get(dim)
        if idx is None:
            picks.append(slice(None))
            continue
        lo, hi = int(idx.min()), int(idx.max())
        boxes[dim] = slice(lo, hi + 1)
        picks.append(idx - lo)
    try:
        block = np.asarray(var.isel(boxes).values)
    except (OSError, RuntimeError, ValueError) as e:
        raise CorruptFileError(Path(var.attrs.get("_label", "a file")), str(e)) from None
    return block[
        np.ix_(
            *[
                p if isinstance(p, np.ndarray) else np.arange(n)
                for p, n in zip(picks, block.shape, strict=True)
            ]
        )
    ]


def check_hourly(hours: np.ndarray, *, label: str, name: str = DEFAULT) -> None:
    """Refuse an accumulated series (`name`, the default target's by default) that is not hourly: 6-hourly
    samples of ERA5's 1-hour accumulations do not sum to 6-hour totals."""
    hours = np.unique(hours)
    steps = np.diff(hours)
    ask = f"request {TARGET_SOURCES.get(name, name)} at every hour (00:00..23:00)"
    if steps.size == 0:
        raise AuroraSweepError(
            f"{label}: {name} has a single time step; a 6-hour total needs the six hourly values"
            f" ending at each model time: {ask}"
        )
    values, counts = np.unique(steps, return_counts=True)
    common = int(values[np.argmax(counts)])
    if common != 3600:
        raise AuroraSweepError(
            f"{label}: {name} is sampled every {pd.Timedelta(seconds=common)}, not every hour. "
            f"ERA5 {name} is the 1-hour accumulation ending at valid_time, so these samples do "
            f"not add up to 6-hour totals: {ask}"
        )


def _check_grid(lat: np.ndarray, lon: np.ndarray, grid: float, label: str) -> None:
    for name, c in (("latitude", lat), ("longitude", lon)):
        if c.size > 1:
            step = float(np.median(np.abs(np.diff(c))))
            if abs(step - grid) > 0.02 * grid:
                raise AuroraSweepError(
                    f"{label}: {name} spacing is {step:g}° but [data] grid is {grid:g}°: request"
                    f" grid [{grid:g}, {grid:g}] or change [data] grid"
                )


def _expand(paths: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix in (".nc", ".zip") and q.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise AuroraSweepError(f"no file at {p}")
    if not out:
        raise AuroraSweepError("no NetCDF or zip files to import")
    return sorted(set(out))


def progress_bar(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=False,
    )


def import_files(paths: Sequence[Path], data: DataConfig, *, progress: bool = True) -> Path:
    """Read CDS NetCDF files and zips (any mix and order, overlaps allowed) into the store.

    Selects `data.levels`, the region and `data.period` (with the five hours before the first
    model time that its tp total needs), turns hourly tp into 6-hour totals in mm, prefers final
    ERA5 over ERA5T where both are given, and writes the store at `data.store`.

    Model times kept are those of the period where every surface and atmospheric variable is
    present; tp is NaN at a time that lacks one of its six hours.
    """
    files = _expand(paths)
    with contextlib.ExitStack() as stack:
        pieces = _scan(files, data, stack)
        plan = _select(pieces, data)
        scratch = scratch_folder(make_dir(data.store.parent), stack)
        cube = _fill(pieces, plan, data, scratch, progress=progress)
        return store.write_store(cube, data.store)


def _scan(files: list[Path], data: DataConfig, stack: contextlib.ExitStack) -> list[_Piece]:
    pieces: list[_Piece] = []
    ref: tuple[np.ndarray, np.ndarray, str] | None = None
    for path in files:
        for ds in open_pieces(path):
            stack.callback(ds.close)
            label = ds.attrs["source"]
            wanted = [v for v in ds.data_vars if v in ORIGIN]
            if not wanted:
                continue
            lat_idx, lon_idx, lat, lon = region_indices(
                ds["latitude"].values, ds["longitude"].values, data.region
            )
            if lat_idx.size == 0 or lon_idx.size == 0:
                raise AuroraSweepError(
                    f"{label} has no grid points in the region {_describe_region(data.region)}"
                    f" (it covers {_span(ds['latitude'])}°N, {_span(ds['longitude'])}°E)"
                )
            if ref is None:
                _check_grid(lat, lon, data.grid, label)
                ref = (lat, lon, label)
            elif (
                lat.shape != ref[0].shape
                or lon.shape != ref[1].shape
                or not (np.allclose(lat, ref[0], atol=1e-4) and np.allclose(lon, ref[1], atol=1e-4))
            ):
                raise AuroraSweepError(
                    f"{label} and {ref[2]} cover the region on different grids"
                    f" ({lat.size}x{lon.size} vs {ref[0].size}x{ref[1].size} points): request"
                    " every file with the same area and grid"
                )
            for v in wanted:
                ds[v].attrs["_label"] = label
            pieces.append(
                _Piece(
                    ds=ds[wanted],
                    label=label,
                    times=_seconds(ds["time"].values),
                    rank=_expver_rank(ds["expver"].values),
                    lat_idx=lat_idx,
                    lon_idx=lon_idx,
                )
            )
    if ref is None:
        raise AuroraSweepError(
            "none of the files holds a variable the store needs (2t, 10u, 10v, msl, tp from"
            f" {SINGLE_LEVELS}; z, u, v, t, q from {PRESSURE_LEVELS})"
        )
    pieces[0].ds.attrs["_grid"] = ref[:2]
    return pieces


@dataclass
class _Plan:
    times: np.ndarray  # int64 seconds of the store's time axis
    levels: list[int]
    lat: np.ndarray
    lon: np.ndarray
    sources: dict[tuple, dict[int, tuple[int, int, int]]]  # (var, level) -> time -> (rank, p, i)
    statics: dict[str, int]  # var -> piece number
    target: Target  # the study's target: its ERA5 variables are summed into it, step by step

    @property
    def target_parts(self) -> tuple[str, ...]:
        """The short names of the ERA5 variables the target is made of."""
        return tuple(short for _, short in self.target.sources)


def _select(pieces: list[_Piece], data: DataConfig) -> _Plan:
    levels = sorted(data.levels)
    target = TARGETS[data.target]
    parts = [(short, None) for _, short in target.sources]
    sources: dict[tuple, dict[int, tuple[int, int, int]]] = {}
    statics: dict[str, int] = {}
    for n, p in enumerate(pieces):
        for v, var in p.ds.data_vars.items():
            if v in store.STATIC_VARS:
                statics.setdefault(v, n)
            elif "level" in var.dims:
                for lv in p.ds["level"].values.tolist():
                    if lv in levels:
                        _choose(sources, (v, lv), n, p)
            elif (v, None) in parts or v in store.surface_vars(data.v15_inputs):
                _choose(sources, (v, None), n, p)

    needed = [(v, None) for v in store.surface_vars(data.v15_inputs)] + [
        (v, lv) for v in store.ATMOS_VARS for lv in levels
    ]
    missing = [k for k in needed + parts if k not in sources]
    missing += [(v, None) for v in store.STATIC_VARS if v not in statics]
    if missing:
        what = ", ".join(f"{v} at {lv} hPa" if lv is not None else v for v, lv in missing[:6]) + (
            " ..." if len(missing) > 6 else ""
        )
        datasets = sorted({ORIGIN[v][0] for v, _ in missing})
        raise AuroraSweepError(
            f"the files lack {what}: download them from {' and '.join(datasets)}"
            " ('aurora-sweep data download' asks for all of them)"
        )

    wanted = _seconds(model_times(data.period).values)
    times = wanted
    for key in needed:
        times = times[np.isin(times, np.fromiter(sources[key], dtype=np.int64))]
        if times.size == 0:
            have = np.fromiter(sources[key], dtype=np.int64)
            v, lv = key
            raise AuroraSweepError(
                f"no model time of the period {data.period.start}..{data.period.end} has"
                f" {v}{f' at {lv} hPa' if lv else ''}: the files hold it from"
                f" {_iso(have.min())} to {_iso(have.max())}"
            )

    for part, _ in parts:
        _check_target_hours(pieces, sources[(part, None)], times, target, part)
    lat, lon = pieces[0].ds.attrs["_grid"]
    return _Plan(times, levels, lat, lon, sources, statics, target)


def _check_target_hours(
    pieces: list[_Piece], slots: dict, times: np.ndarray, target: Target, part: str
) -> None:
    """Refuse the fields of `part` (one of the ERA5 variables `target` is made of) where they
    cannot make a step's value: not hourly where the step needs every hour, or no model time
    with all the fields it needs."""
    hours = np.fromiter(slots, dtype=np.int64)
    labels = sorted({pieces[p].label for _, p, _ in slots.values()})
    if target.hourly:  # its step's value is made of every hour of the step
        check_hourly(
            hours, label=", ".join(labels[:3]) + (" ..." if len(labels) > 3 else ""), name=part
        )
    complete = np.all(np.isin(times[:, None] - 3600 * np.array(target.hours)[None, :], hours), 1)
    if not complete.any():
        needs = "all six hourly" if target.hourly else "the"
        raise AuroraSweepError(
            f"no model time between {_iso(times.min())} and {_iso(times.max())} has {needs}"
            f" {part} values {'ending at' if target.hourly else 'at'} it (the files hold {part}"
            f" from {_iso(hours.min())} to {_iso(hours.max())})"
            + ("; include the 5 hours before the first model time" if target.hourly else "")
        )


def _iso(seconds: int) -> str:
    return str(np.datetime64(int(seconds), "s")).replace("T", " ")[:16]


def _fill(
    pieces: list[_Piece], plan: _Plan, data: DataConfig, scratch: Path, *, progress: bool
) -> xr.Dataset:
    nt, nl, ny, nx = plan.times.size, len(plan.levels), plan.lat.size, plan.lon.size
    t_pos = {t: i for i, t in enumerate(plan.times.tolist())}
    l_pos = {lv: i for i, lv in enumerate(plan.levels)}

    def scratch_array(name: str, shape: tuple[int, ...]) -> np.ndarray:
        arr = np.lib.format.open_memmap(
            scratch / f"{name}.npy", mode="w+", dtype=np.float32, shape=shape
        )
        arr[...] = np.nan
        return arr

    surface = store.surface_vars(data.v15_inputs)
    out = {v: scratch_array(v, (nt, ny, nx)) for v in surface}
    out |= {v: scratch_array(v, (nt, nl, ny, nx)) for v in store.ATMOS_VARS}
    total = scratch_array(f"target-{plan.target.name}", (nt, ny, nx))  # swvl1 is an input too
    total[...] = 0.0
    count = np.zeros(nt, dtype=np.int64)

    jobs = _jobs_by_piece(plan, t_pos)
    with progress_bar(progress) as bar:
        task = bar.add_task("importing ERA5", total=len(jobs))
        for p, per_var in sorted(jobs.items()):
            piece = pieces[p]
            for v, entries in per_var.items():
                var = piece.ds[v]
                if v in plan.target_parts:  # summed into the target, step by step
                    src = np.array([e[0] for e in entries])
                    block = _read(var, time=src, latitude=piece.lat_idx, longitude=piece.lon_idx)
                    for row, (_, k, _) in zip(block, entries, strict=True):
                        total[k] += row
                        count[k] += 1
                elif v in surface:
                    src = np.array([e[0] for e in entries])
                    dst = np.array([e[1] for e in entries])
                    out[v][dst] = _read(
                        var, time=src, latitude=piece.lat_idx, longitude=piece.lon_idx
                    )
                else:
                    _fill_levels(out[v], var, piece, entries, l_pos)
            bar.advance(task)

    for k in range(nt):  # in place: the target's units, NaN where a field is missing
        total[k] = plan.target.finish(total[k], int(count[k]))
    return _cube(plan, out, total, _statics(pieces, plan))


def _jobs_by_piece(plan: _Plan, t_pos: dict) -> dict[int, dict[str, list[tuple]]]:
    """The plan's source table inverted: piece -> variable -> [(the file's time index, the
    store's time index, level)]; an hour of tp goes to the 6-hour step it ends in."""
    jobs: dict[int, dict[str, list[tuple[int, int, int | None]]]] = {}
    for (v, lv), slot in plan.sources.items():
        for t, (_, p, i) in slot.items():
            k = t_pos.get(plan.target.step_of(t) if v in plan.target_parts else t)
            if k is not None:
                jobs.setdefault(p, {}).setdefault(v, []).append((i, k, lv))
    return jobs


def _statics(pieces: list[_Piece], plan: _Plan) -> dict[str, np.ndarray]:
    static = {}
    for v, p in plan.statics.items():
        piece = pieces[p]
        static[v] = _read(
            piece.ds[v], time=np.array([0]), latitude=piece.lat_idx, longitude=piece.lon_idx
        )[0]
    return static


def _cube(plan: _Plan, out: dict, target: np.ndarray, static: dict) -> xr.Dataset:
    """The canonical cube of the filled arrays, with units."""
    coords = {
        "time": plan.times.astype("datetime64[s]").astype("datetime64[ns]"),
        "level": np.array(plan.levels, dtype=np.int64),
        "latitude": plan.lat.astype(np.float64),
        "longitude": plan.lon.astype(np.float64),
    }
    surf = ("time", "latitude", "longitude")
    atmos = ("time", "level", "latitude", "longitude")
    variables = {v: (atmos if v in store.ATMOS_VARS else surf, a) for v, a in out.items()}
    variables[plan.target.name] = (surf, target)
    variables |= {v: (("latitude", "longitude"), static[v]) for v in store.STATIC_VARS}
    cube = xr.Dataset(variables, coords=coords)
    for v in cube.data_vars:
        cube[v].attrs["units"] = plan.target.units if v == plan.target.name else UNITS[v]
    cube[plan.target.name].attrs["long_name"] = plan.target.long_name
    cube.attrs = {"source": "ERA5 (Copernicus Climate Change Service), via aurora_sweep.data.era5"}
    return cube


def _fill_levels(
    target: np.ndarray,
    var: xr.DataArray,
    piece: _Piece,
    entries: list[tuple[int, int, int | None]],
    l_pos: dict[int, int],
) -> None:
    file_levels = {lv: i for i, lv in enumerate(piece.ds["level"].values.tolist())}
    by_level: dict[int, list[tuple[int, int]]] = {}
    for i, k, lv in entries:
        by_level.setdefault(lv, []).append((i, k))
    # Most files give every level at every time: read them in one go.
    groups: dict[tuple, list[int]] = {}
    for lv, pairs in by_level.items():
        groups.setdefault(tuple(pairs), []).append(lv)
    for pairs, lvs in groups.items():
        src = np.array([i for i, _ in pairs])
        dst = np.array([k for _, k in pairs])
        block = _read(
            var,
            time=src,
            level=np.array([file_levels[lv] for lv in lvs]),
            latitude=piece.lat_idx,
            longitude=piece.lon_idx,
        )
        for j, lv in enumerate(lvs):
            target[dst, l_pos[lv]] = block[:, j]
