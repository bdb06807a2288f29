"""ERA5 from the Climate Data Store, turned into the canonical store.

Fine-tuning Aurora for precipitation needs years of ERA5 over a region: tens of gigabytes that the
CDS hands out in requests it may queue for an hour, refuse as too large, or drop halfway. This
module plans those requests in chunks the CDS accepts, fetches them a few at a time with retries,
remembers finished chunks in a manifest so an interrupted download resumes where it stopped, and
turns whatever the CDS returned (NetCDF4, zips of NetCDF4 even under a `.nc` name, the odd legacy
NetCDF3 file) into the one cube that `store.py` defines.

Two facts shape the reading side (see DESIGN.md and shared/cds-real/PROVENANCE.md):

- ERA5 `tp` is the 1-hour accumulation ending at `valid_time`, even in files sampled every 6 h. A
  6-hour total ending at T is the sum of the six hourly values in (T-6h, T]; a series that is not
  hourly cannot give it and is refused.
- The same time can come twice, as final ERA5 (expver '0001') and as ERA5T ('0005'); the final
  value wins.

The cube is assembled in memory-mapped scratch arrays next to the store, so a multi-year import
needs disk, not RAM, and then written once with `store.write_store` (atomic).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import re
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from aurora_sweep import store
from aurora_sweep.config import DataConfig, Period, Region, StudyConfig
from aurora_sweep.errors import AuroraSweepError

CDS_URL = "https://cds.climate.copernicus.eu/api"
SINGLE_LEVELS = "reanalysis-era5-single-levels"
PRESSURE_LEVELS = "reanalysis-era5-pressure-levels"
MODEL_HOURS = (0, 6, 12, 18)
#: How many hourly tp values make one model step's total.
TP_HOURS = 6

#: CDS request name -> store name, per request kind.
SURFACE_REQUEST = {
    "2m_temperature": "2t",
    "10m_u_component_of_wind": "10u",
    "10m_v_component_of_wind": "10v",
    "mean_sea_level_pressure": "msl",
}
ATMOS_REQUEST = {
    "geopotential": "z",
    "u_component_of_wind": "u",
    "v_component_of_wind": "v",
    "temperature": "t",
    "specific_humidity": "q",
}
STATIC_REQUEST = {
    "geopotential": "static_z",
    "land_sea_mask": "static_lsm",
    "soil_type": "static_slt",
}
TP_REQUEST = {"total_precipitation": "tp"}

#: CDS NetCDF short name -> store name, for variables without a level dimension.
SINGLE_LEVEL_NAMES = {
    "t2m": "2t",
    "u10": "10u",
    "v10": "10v",
    "msl": "msl",
    "tp": "tp",
    "z": "static_z",
    "lsm": "static_lsm",
    "slt": "static_slt",
}
#: Where each store variable comes from, for error messages.
ORIGIN = {
    **{v: (SINGLE_LEVELS, k) for k, v in SURFACE_REQUEST.items()},
    **{v: (PRESSURE_LEVELS, k) for k, v in ATMOS_REQUEST.items()},
    **{v: (SINGLE_LEVELS, k) for k, v in STATIC_REQUEST.items()},
    "tp": (SINGLE_LEVELS, "total_precipitation"),
}
UNITS = {
    "2t": "K", "10u": "m s-1", "10v": "m s-1", "msl": "Pa", "tp": "mm",
    "z": "m2 s-2", "u": "m s-1", "v": "m s-1", "t": "K", "q": "kg kg-1",
    "static_z": "m2 s-2", "static_lsm": "1", "static_slt": "1",
}  # fmt: skip

#: Fields (variable x level x time step) per request; the CDS refuses much larger ones.
FIELDS_PER_REQUEST = 6000
MANIFEST = "manifest.json"
CREDENTIALS_HELP = (
    f"~/.cdsapirc must hold two lines 'url: {CDS_URL}' and 'key: <your-personal-access-token>'"
    " (the token is on your profile page at https://cds.climate.copernicus.eu/profile), or set the"
    " environment variables CDSAPI_URL and CDSAPI_KEY"
)
_EPS = 1e-6


class CorruptFileError(AuroraSweepError):
    """A file that cannot be read as CDS NetCDF (truncated download, HTML error page, ...)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} is truncated or corrupt ({reason})")
        self.path = Path(path)


# --------------------------------------------------------------------------------------------
# Planning requests


@dataclass(frozen=True)
class Request:
    """One CDS retrieve call: which dataset, what to ask, which file in the download folder."""

    dataset: str
    request: dict[str, Any] = field(hash=False)
    target: str

    @property
    def fields(self) -> int:
        """How many 2-D fields the CDS must produce: its measure of a request's size."""
        r = self.request
        n = len(r["variable"]) * len(r["time"]) * len(r["day"]) * len(r["month"]) * len(r["year"])
        return n * len(r.get("pressure_level", [None]))

    @property
    def key(self) -> str:
        """A digest of the request: a finished chunk counts only if it answers this request."""
        text = json.dumps({"dataset": self.dataset, "request": self.request}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_times(period: Period) -> pd.DatetimeIndex:
    """The 6-hourly times (00/06/12/18 UTC) of a period, first day 00 to last day 18."""
    start = pd.Timestamp(period.start)
    end = pd.Timestamp(period.end) + pd.Timedelta(hours=MODEL_HOURS[-1])
    return pd.date_range(start, end, freq=f"{24 // len(MODEL_HOURS)}h")


def request_area(region: Region) -> list[float]:
    """The CDS `area` [N, W, S, E], longitudes in -180..180 as the CDS expects them."""

    def wrap(lon: float) -> float:
        return ((lon + 180.0) % 360.0) - 180.0 if not -180 <= lon <= 180 else lon

    return [region.north, wrap(region.west), region.south, wrap(region.east)]


def _months(first: dt.date, last: dt.date) -> Iterator[tuple[int, int, list[int]]]:
    """(year, month, days) for each month touching [first, last], days clipped to the range."""
    days = pd.date_range(first, last, freq="D")
    for (y, m), group in pd.Series(days.day, index=days).groupby([days.year, days.month]):
        yield int(y), int(m), [int(d) for d in group.values]


def _base_request(data: DataConfig, variables: Sequence[str], hours: Sequence[int]) -> dict:
    return {
        "product_type": ["reanalysis"],
        "variable": list(variables),
        "time": [f"{h:02d}:00" for h in hours],
        "data_format": "netcdf",
        "download_format": "unarchived",
        "area": request_area(data.region),
        "grid": [data.grid, data.grid],
    }


def _dated(base: dict, year: int, month: int, days: Sequence[int]) -> dict:
    return {
        **base,
        "year": [str(year)],
        "month": [f"{month:02d}"],
        "day": [f"{d:02d}" for d in days],
    }


def plan_requests(config: StudyConfig, *, max_fields: int = FIELDS_PER_REQUEST) -> list[Request]:
    """The CDS requests that together hold everything the store needs.

    Per month: the surface variables at the model hours, `tp` at every hour (starting the day
    before the period, whose last five hours the first 6-hour total needs), and the pressure-level
    variables, split into day ranges when a month would exceed `max_fields` fields. The static
    fields come once, from the period's first day.
    """
    data = config.data
    start, end = data.period.start, data.period.end
    levels = sorted(data.levels)
    out = [
        Request(
            SINGLE_LEVELS,
            _dated(
                _base_request(data, list(STATIC_REQUEST), [0]), start.year, start.month, [start.day]
            ),
            "static.nc",
        )
    ]
    surface = _base_request(data, list(SURFACE_REQUEST), MODEL_HOURS)
    rain = _base_request(data, list(TP_REQUEST), range(24))
    atmos = {**_base_request(data, list(ATMOS_REQUEST), MODEL_HOURS)}
    atmos["pressure_level"] = [str(lv) for lv in levels]

    for y, m, days in _months(start - dt.timedelta(days=1), end):
        out.append(Request(SINGLE_LEVELS, _dated(rain, y, m, days), f"tp-{y}-{m:02d}.nc"))
    for y, m, days in _months(start, end):
        out.append(Request(SINGLE_LEVELS, _dated(surface, y, m, days), f"sfc-{y}-{m:02d}.nc"))
        per_day = len(ATMOS_REQUEST) * len(levels) * len(MODEL_HOURS)
        parts = min(len(days), max(1, math.ceil(per_day * len(days) / max_fields)))
        for chunk in np.array_split(np.array(days), parts):
            days_part = [int(d) for d in chunk]
            name = f"pl-{y}-{m:02d}.nc" if parts == 1 else (
                f"pl-{y}-{m:02d}-d{days_part[0]:02d}-{days_part[-1]:02d}.nc"
            )  # fmt: skip
            out.append(Request(PRESSURE_LEVELS, _dated(atmos, y, m, days_part), name))
    return out


@dataclass(frozen=True)
class DownloadEstimate:
    """What a download will cost, before asking the CDS."""

    requests: int
    fields: int
    grid_points: int
    download_bytes: int  # float32 values, before the NetCDF compression (an upper bound)
    store_bytes: int  # the canonical store, uncompressed


def grid_shape(region: Region, grid: float) -> tuple[int, int]:
    """(latitudes, longitudes) of a box on a regular grid, both edges included."""
    width = (region.east - region.west) % 360 or 360
    return int(round((region.north - region.south) / grid)) + 1, int(round(width / grid)) + 1


def estimate_download(config: StudyConfig) -> DownloadEstimate:
    """Size of the planned download and of the store it becomes (both estimates)."""
    data = config.data
    plan = plan_requests(config)
    nlat, nlon = grid_shape(data.region, data.grid)
    points = nlat * nlon
    fields = sum(r.fields for r in plan)
    n_times = len(model_times(data.period))
    store_fields = n_times * (len(store.SURF_VARS) + 1 + len(store.ATMOS_VARS) * len(data.levels))
    return DownloadEstimate(
        len(plan), fields, points, fields * points * 4, store_fields * points * 4
    )


# --------------------------------------------------------------------------------------------
# Reading CDS files


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(8)
    except OSError as e:
        raise AuroraSweepError(f"cannot read {path}: {e.strerror}") from None


def _open_netcdf(source: Path | bytes, label: str) -> xr.Dataset:
    """Open NetCDF3/4 from a path or from bytes (a zip member), lazily."""
    import netCDF4

    try:
        if isinstance(source, bytes):
            nc = netCDF4.Dataset(label, mode="r", memory=source)
            return xr.open_dataset(xr.backends.NetCDF4DataStore(nc))
        return xr.open_dataset(source, engine="netcdf4")
    except (OSError, ValueError, RuntimeError, KeyError, IndexError) as e:
        raise CorruptFileError(Path(label), str(e).strip() or type(e).__name__) from None


def _raw_members(path: Path) -> list[tuple[str, Path | bytes]]:
    """The NetCDF payloads of a file: itself, or each NetCDF member of a zip (by magic bytes)."""
    head = _magic(path)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                members = [
                    (f"{path}!{name}", z.read(name))
                    for name in sorted(z.namelist())
                    if not name.endswith("/") and "stepType-max" not in name
                ]
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CorruptFileError(path, f"broken zip: {e}") from None
        if not members:
            raise CorruptFileError(path, "empty zip")
        return members
    if head.startswith((b"\x89HDF", b"CDF\x01", b"CDF\x02", b"CDF\x05")):
        return [(str(path), path)]
    if head.startswith(b"GRIB"):
        raise AuroraSweepError(f"{path} is GRIB: request data_format 'netcdf' from the CDS")
    if not head:
        raise CorruptFileError(path, "empty file")
    raise CorruptFileError(path, f"neither NetCDF nor zip; it starts with {head!r}")


def normalise(ds: xr.Dataset, *, label: str = "the file") -> xr.Dataset:
    """Rename one CDS NetCDF's dimensions and variables to the store's vocabulary.

    Dims become `time` and `level` (int hPa); `expver` becomes a string coordinate along `time`
    ('0001' where absent, as in legacy files); `number` goes; short names map to store names
    (t2m->2t, u10->10u, v10->10v, z/lsm/slt without a level -> static_*). Unknown variables keep
    their names. Nothing is loaded.
    """
    if "date" in ds.dims:
        raise AuroraSweepError(
            f"{label} holds monthly means (a 'date' dimension): download the hourly"
            f" 'reanalysis' product of {SINGLE_LEVELS} instead"
        )
    if "step" in ds.dims:
        raise AuroraSweepError(
            f"{label} has a forecast 'step' dimension: request reanalysis fields"
        )
    if "expver" in ds.dims:
        raise AuroraSweepError(
            f"{label} has expver as a dimension (the CDS layout before 2024): download it again"
        )
    if "valid_time" in ds.dims:
        ds = ds.drop_vars("time", errors="ignore").rename({"valid_time": "time"})
    elif "time" not in ds.dims:
        if "valid_time" in ds.coords:  # one time step kept as a scalar
            ds = ds.expand_dims("valid_time").rename({"valid_time": "time"})
        else:
            raise AuroraSweepError(f"{label} has no time dimension (valid_time)")
    if "pressure_level" in ds.dims:
        ds = ds.drop_vars("level", errors="ignore").rename({"pressure_level": "level"})
    if "level" in ds.dims:
        ds = ds.assign_coords(level=np.rint(ds["level"].values).astype(int))
    if "lat" in ds.dims and "latitude" not in ds.dims:
        ds = ds.rename({"lat": "latitude", "lon": "longitude"})
    if not {"latitude", "longitude"} <= set(ds.dims):
        raise AuroraSweepError(f"{label} has no latitude/longitude dimensions")

    n = ds.sizes["time"]
    if "expver" in ds.coords and ds["expver"].ndim == 1:
        expver = np.array([str(v) for v in ds["expver"].values])
    elif "expver" in ds.coords:
        expver = np.full(n, str(ds["expver"].values.item()))
    else:
        expver = np.full(n, "0001")
    keep = {"time", "level", "latitude", "longitude"}
    ds = ds.drop_vars([c for c in ds.coords if c not in keep])
    ds = ds.assign_coords(expver=("time", expver))

    names = {}
    for name, var in ds.data_vars.items():
        if "level" not in var.dims and name in SINGLE_LEVEL_NAMES:
            names[name] = SINGLE_LEVEL_NAMES[name]
    ds = ds.rename(names)
    ds.attrs = {"source": label}
    return ds


def _is_max_member(ds: xr.Dataset) -> bool:
    steps = {str(v.attrs.get("GRIB_stepType", "")) for v in ds.data_vars.values()}
    return steps == {"max"}


def open_pieces(path: Path) -> list[xr.Dataset]:
    """Each NetCDF inside `path` (one, or the members of a zip), normalised and still lazy."""
    path = Path(path)
    out = []
    for label, payload in _raw_members(path):
        ds = _open_netcdf(payload, label)
        if _is_max_member(ds):
            ds.close()
            continue
        out.append(normalise(ds, label=label))
    return out


def read_cds_file(path: Path) -> xr.Dataset:
    """One CDS file or zip as one normalised dataset (see `normalise`), lazily loaded."""
    pieces = open_pieces(Path(path))
    if len(pieces) == 1:
        return pieces[0]
    merged = xr.merge(pieces, join="outer", compat="override", combine_attrs="drop")
    merged.attrs = {"source": str(path)}
    return merged


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
    return block[np.ix_(*[p if isinstance(p, np.ndarray) else np.arange(n) for p, n in zip(
        picks, block.shape, strict=True)])]  # fmt: skip


def check_hourly(hours: np.ndarray, *, label: str) -> None:
    """Refuse a tp series that is not hourly: 6-hourly samples do not sum to 6-hour totals."""
    hours = np.unique(hours)
    steps = np.diff(hours)
    if steps.size == 0:
        raise AuroraSweepError(
            f"{label}: tp has a single time step; a 6-hour total needs the six hourly values"
            " ending at each model time: request total_precipitation at every hour (00:00..23:00)"
        )
    values, counts = np.unique(steps, return_counts=True)
    common = int(values[np.argmax(counts)])
    if common != 3600:
        raise AuroraSweepError(
            f"{label}: tp is sampled every {pd.Timedelta(seconds=common)}, not every hour. ERA5 tp"
            " is the 1-hour accumulation ending at valid_time, so these samples do not add up to"
            " 6-hour totals: request total_precipitation at every hour (00:00..23:00)"
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


def _progress(enabled: bool):
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
        scratch = Path(
            stack.enter_context(
                tempfile.TemporaryDirectory(prefix=".import-", dir=_mkdir(data.store.parent))
            )
        )
        cube = _fill(pieces, plan, data, scratch, progress=progress)
        return store.write_store(cube, data.store)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


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


def _select(pieces: list[_Piece], data: DataConfig) -> _Plan:
    levels = sorted(data.levels)
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
            elif v in (*store.SURF_VARS, store.TARGET_VAR):
                _choose(sources, (v, None), n, p)

    needed = [(v, None) for v in store.SURF_VARS] + [
        (v, lv) for v in store.ATMOS_VARS for lv in levels
    ]
    missing = [k for k in needed + [("tp", None)] if k not in sources]
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

    tp_hours = np.fromiter(sources[("tp", None)], dtype=np.int64)
    tp_labels = sorted({pieces[p].label for _, p, _ in sources[("tp", None)].values()})
    check_hourly(tp_hours, label=", ".join(tp_labels[:3]) + (" ..." if len(tp_labels) > 3 else ""))
    complete = np.all(
        np.isin(times[:, None] - 3600 * np.arange(TP_HOURS)[None, :], tp_hours), axis=1
    )
    if not complete.any():
        raise AuroraSweepError(
            f"no model time between {_iso(times.min())} and {_iso(times.max())} has all six hourly"
            f" tp values ending at it (the files hold tp from {_iso(tp_hours.min())} to"
            f" {_iso(tp_hours.max())}); include the 5 hours before the first model time"
        )
    lat, lon = pieces[0].ds.attrs["_grid"]
    return _Plan(times, levels, lat, lon, sources, statics)


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

    out = {v: scratch_array(v, (nt, ny, nx)) for v in store.SURF_VARS}
    out |= {v: scratch_array(v, (nt, nl, ny, nx)) for v in store.ATMOS_VARS}
    tp_sum = scratch_array("tp", (nt, ny, nx))
    tp_sum[...] = 0.0
    tp_count = np.zeros(nt, dtype=np.int64)

    # Invert the source table: piece -> var -> [(file time index, store time index, level)].
    jobs: dict[int, dict[str, list[tuple[int, int, int | None]]]] = {}
    for (v, lv), slot in plan.sources.items():
        for t, (_, p, i) in slot.items():
            if v == store.TARGET_VAR:
                k = t_pos.get(_model_step_ending(t))
            else:
                k = t_pos.get(t)
            if k is not None:
                jobs.setdefault(p, {}).setdefault(v, []).append((i, k, lv))

    with _progress(progress) as bar:
        task = bar.add_task("importing ERA5", total=len(jobs))
        for p, per_var in sorted(jobs.items()):
            piece = pieces[p]
            for v, entries in per_var.items():
                var = piece.ds[v]
                if v == store.TARGET_VAR:
                    src = np.array([e[0] for e in entries])
                    block = _read(var, time=src, latitude=piece.lat_idx, longitude=piece.lon_idx)
                    for row, (_, k, _) in zip(block, entries, strict=True):
                        tp_sum[k] += row
                        tp_count[k] += 1
                elif v in store.SURF_VARS:
                    src = np.array([e[0] for e in entries])
                    dst = np.array([e[1] for e in entries])
                    out[v][dst] = _read(
                        var, time=src, latitude=piece.lat_idx, longitude=piece.lon_idx
                    )
                else:
                    _fill_levels(out[v], var, piece, entries, l_pos)
            bar.advance(task)

    tp = tp_sum  # in place: metres summed -> mm, NaN where an hour is missing
    for k in range(nt):
        tp[k] = tp[k] * 1000.0 if tp_count[k] == TP_HOURS else np.nan

    static = {}
    for v, p in plan.statics.items():
        piece = pieces[p]
        static[v] = _read(piece.ds[v], time=np.array([0]), latitude=piece.lat_idx,
                          longitude=piece.lon_idx)[0]  # fmt: skip

    coords = {
        "time": plan.times.astype("datetime64[s]").astype("datetime64[ns]"),
        "level": np.array(plan.levels, dtype=np.int64),
        "latitude": plan.lat.astype(np.float64),
        "longitude": plan.lon.astype(np.float64),
    }
    surf = ("time", "latitude", "longitude")
    variables = {v: (surf, out[v]) for v in store.SURF_VARS}
    variables[store.TARGET_VAR] = (surf, tp)
    variables |= {v: (("time", "level", "latitude", "longitude"), out[v]) for v in store.ATMOS_VARS}
    variables |= {v: (("latitude", "longitude"), static[v]) for v in store.STATIC_VARS}
    cube = xr.Dataset(variables, coords=coords)
    for v in cube.data_vars:
        cube[v].attrs["units"] = UNITS[v]
    cube["tp"].attrs["long_name"] = "total precipitation over the 6 hours ending at time"
    cube.attrs = {"source": "ERA5 (Copernicus Climate Change Service), via aurora_sweep.era5"}
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


def _model_step_ending(t: int) -> int:
    """The model time T whose 6-hour window (T-6h, T] holds the hourly value at `t`."""
    step = 6 * 3600
    return -(-t // step) * step


# --------------------------------------------------------------------------------------------
# Downloading


def _redact(text: str) -> str:
    """Hide anything that looks like a CDS personal access token."""
    text = re.sub(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
                  "<key>", text)  # fmt: skip
    return re.sub(r"\b\d{3,8}:[0-9a-fA-F-]{20,}", "<key>", text)


@dataclass(frozen=True)
class _Failure:
    transient: bool
    message: str


def classify_failure(exc: BaseException, request: Request) -> _Failure:
    """Decide whether a failed retrieve is worth retrying, and what to tell the user if not."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    text = _redact(str(exc) or type(exc).__name__)
    low = text.lower()

    def has_code(code: int) -> bool:
        return status == code or re.search(rf"\b{code}\b", low) is not None

    if "missing/incomplete configuration" in low or "configuration file" in low:
        return _Failure(False, f"no CDS credentials: {CREDENTIALS_HELP}")
    if has_code(401) or "authentication failed" in low or "invalid api key" in low:
        return _Failure(False, f"the CDS refused your key (HTTP 401): check it. {CREDENTIALS_HELP}")
    if has_code(403) or "licen" in low or "terms of use" in low:
        return _Failure(
            False,
            f"the CDS refused {request.dataset} (HTTP 403): the dataset's licence is not accepted."
            f" Log in, accept the licence at https://cds.climate.copernicus.eu/datasets/"
            f"{request.dataset}?tab=download (at the bottom of the page), then run the download"
            " again",
        )
    if has_code(413) or "too large" in low or "cost limit" in low or "request too big" in low:
        return _Failure(
            False,
            f"the CDS refused {request.target} as too large ({request.fields} fields): split it"
            " smaller with --max-fields (e.g. half the current value), or ask for fewer levels or"
            " a smaller region",
        )
    network = isinstance(exc, ConnectionError | TimeoutError) or any(
        s in low for s in ("connection", "name or service", "temporary failure in name",
                           "max retries exceeded", "network is unreachable", "timed out")
    )  # fmt: skip
    if network:
        return _Failure(
            True,
            f"cannot reach the CDS ({text}): check the internet connection or proxy, then run the"
            " download again; finished chunks are kept",
        )
    server = status is not None and 500 <= int(status) < 600
    if server or any(s in low for s in ("queued too long", "queue", "503", "502", "500", "504",
                                         "service unavailable", "try again")):  # fmt: skip
        return _Failure(
            True,
            f"the CDS kept failing for {request.target} ({text}); finished chunks are kept, run"
            " the download again later",
        )
    return _Failure(False, f"the CDS request for {request.target} failed: {text}")


def _default_client() -> Any:
    import cdsapi

    return cdsapi.Client(quiet=True, progress=False)


def load_manifest(folder: Path) -> dict[str, dict]:
    """Finished chunks in the download folder: target -> {dataset, key, bytes, finished}."""
    path = folder / MANIFEST
    if not path.exists():
        return {}
    try:
        chunks = json.loads(path.read_text())["chunks"]
        return {k: dict(v) for k, v in chunks.items()}
    except (ValueError, KeyError, TypeError):
        return {}  # a damaged manifest only costs a re-download


def _save_manifest(folder: Path, chunks: dict[str, dict]) -> None:
    tmp = folder / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"version": 1, "chunks": chunks}, indent=1, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)


def check_chunk(path: Path) -> None:
    """Open every NetCDF in a downloaded chunk; raise `CorruptFileError` if one is broken."""
    for ds in open_pieces(path):
        try:
            for v in ds.data_vars.values():
                _ = v.isel({d: -1 for d in v.dims}).values  # touches the last block of the file
        except (OSError, RuntimeError, ValueError, IndexError) as e:
            raise CorruptFileError(path, str(e)) from None
        finally:
            ds.close()


def download_folder(data: DataConfig) -> Path:
    """Where the CDS chunks and their manifest live."""
    return data.store.parent / "cds"


def download(
    config: StudyConfig,
    *,
    client_factory: Callable[[], Any] | None = None,
    max_workers: int = 4,
    progress: bool = True,
    retries: int = 5,
    backoff: float = 10.0,
    max_fields: int = FIELDS_PER_REQUEST,
) -> Path:
    """Fetch the chunks the store still needs from the CDS, then build the store.

    Finished chunks are listed in `<store parent>/cds/manifest.json` and never fetched again; a
    chunk is written to `<target>.partial` and renamed only once it opens cleanly. Transient
    failures (network, 5xx, long queues) are retried `retries` times with exponential backoff
    from `backoff` seconds; anything else stops the download with an `AuroraSweepError`.
    """
    folder = _mkdir(download_folder(config.data))
    plan = plan_requests(config, max_fields=max_fields)
    chunks = load_manifest(folder)
    for stale in folder.glob("*.partial"):
        stale.unlink()
    done = {
        r.target
        for r in plan
        if (e := chunks.get(r.target)) is not None
        and e.get("key") == r.key
        and (folder / r.target).is_file()
        and (folder / r.target).stat().st_size == e.get("bytes")
    }
    chunks = {k: v for k, v in chunks.items() if k in done}
    todo = [r for r in plan if r.target not in done]
    if todo:
        _fetch_all(
            todo,
            folder,
            chunks,
            client_factory or _default_client,
            max_workers=max_workers,
            progress=progress,
            retries=retries,
            backoff=backoff,
            total=len(plan),
        )
    try:
        return import_files([folder / r.target for r in plan], config.data, progress=progress)
    except CorruptFileError as e:
        chunks.pop(e.path.name, None)
        _save_manifest(folder, chunks)
        e.path.unlink(missing_ok=True)
        raise AuroraSweepError(
            f"{e.path.name} was truncated or corrupt ({e}); it was removed from the manifest and"
            " deleted: run the download again to fetch it again"
        ) from None


def _fetch_all(
    todo: list[Request],
    folder: Path,
    chunks: dict[str, dict],
    client_factory: Callable[[], Any],
    *,
    max_workers: int,
    progress: bool,
    retries: int,
    backoff: float,
    total: int,
) -> None:
    """Fetch `todo` with at most `max_workers` requests in flight.

    Worker threads only talk to the CDS; checking a file (HDF5 is not thread-safe), renaming it
    and writing the manifest happen on the calling thread.
    """
    local = threading.local()
    try:
        first = client_factory()
    except Exception as e:  # cdsapi raises a bare Exception for missing credentials
        raise AuroraSweepError(classify_failure(e, todo[0]).message) from None

    def client() -> Any:
        if not hasattr(local, "client"):
            local.client = client_factory()
        return local.client

    def fetch(req: Request, attempt: int) -> int:
        """Retrieve into `<target>.partial`; returns the attempts used so far."""
        partial = folder / f"{req.target}.partial"
        while True:
            try:
                client().retrieve(req.dataset, req.request, str(partial))
                return attempt
            except Exception as e:
                partial.unlink(missing_ok=True)
                failure = classify_failure(e, req)
                if not failure.transient or attempt >= retries:
                    raise AuroraSweepError(failure.message) from None
            time.sleep(min(backoff * 2**attempt, 600.0))
            attempt += 1

    local.client = first  # the calling thread never fetches, but keeps the first client alive
    with _progress(progress) as bar:
        task = bar.add_task("CDS chunks", total=total, completed=total - len(todo))
        pool = cf.ThreadPoolExecutor(max_workers=max(1, max_workers))
        pending = {pool.submit(fetch, r, 0): r for r in todo}
        try:
            while pending:
                finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                # record every chunk that arrived before raising for one that failed
                for fut in sorted(finished, key=lambda f: f.exception() is not None):
                    req = pending.pop(fut)
                    attempt = fut.result()
                    partial, target = folder / f"{req.target}.partial", folder / req.target
                    try:
                        check_chunk(partial)
                    except CorruptFileError as e:
                        partial.unlink(missing_ok=True)
                        if attempt >= retries:
                            raise AuroraSweepError(
                                f"{req.target} arrived truncated or corrupt {attempt + 1} times"
                                f" ({e}); run the download again later"
                            ) from None
                        pending[pool.submit(fetch, req, attempt + 1)] = req
                        continue
                    os.replace(partial, target)
                    chunks[req.target] = {
                        "dataset": req.dataset,
                        "key": req.key,
                        "bytes": target.stat().st_size,
                        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    }
                    _save_manifest(folder, chunks)
                    bar.advance(task)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            for stale in folder.glob("*.partial"):
                stale.unlink(missing_ok=True)
            raise
        pool.shutdown(wait=True)


def describe_plan(config: StudyConfig) -> str:
    """A few lines saying what `download` will ask for and how big it is (an estimate)."""
    est = estimate_download(config)
    ny, nx = grid_shape(config.data.region, config.data.grid)
    return (
        f"{est.requests} CDS requests, {est.fields:,} fields on a {ny}x{nx} grid;"
        f" about {est.download_bytes / 1e9:.1f} GB of float32 before NetCDF compression"
        f" (an estimate), store about {est.store_bytes / 1e9:.1f} GB uncompressed"
    )
