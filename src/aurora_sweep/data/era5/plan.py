"""Planning ERA5 requests: what to ask the CDS for, in chunks it accepts, and how big it is."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from aurora_sweep.config.study import DataConfig, Period, Region, StudyConfig
from aurora_sweep.config.targets import TARGETS
from aurora_sweep.data import store

CDS_URL = "https://cds.climate.copernicus.eu/api"
SINGLE_LEVELS = "reanalysis-era5-single-levels"
PRESSURE_LEVELS = "reanalysis-era5-pressure-levels"
MODEL_HOURS = (0, 6, 12, 18)

#: CDS request name -> store name, per request kind.
SURFACE_REQUEST = {
    "2m_temperature": "2t",
    "10m_u_component_of_wind": "10u",
    "10m_v_component_of_wind": "10v",
    "mean_sea_level_pressure": "msl",
}
#: Aurora 1.5's other instantaneous surface inputs, asked with SURFACE_REQUEST when a study
#: uses it (microsoft/aurora's Aurora 1.5 example names the same CDS variables).
V15_SURFACE_REQUEST = {
    "2m_dewpoint_temperature": "2d",
    "total_column_water_vapour": "tcwv",
    "total_cloud_cover": "tcc",
    "100m_u_component_of_wind": "100u",
    "100m_v_component_of_wind": "100v",
    "surface_pressure": "sp",
    "low_cloud_cover": "lcc",
    "medium_cloud_cover": "mcc",
    "high_cloud_cover": "hcc",
    "skin_temperature": "skt",
    "soil_temperature_level_1": "stl1",
    "volumetric_soil_water_layer_1": "swvl1",
    "sea_ice_cover": "ci",
    "snow_depth": "sd",
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
#: The ERA5 variables any target is made of, under their NetCDF short names in the store
#: (an import reads the study's target's and sums them into it).
TARGET_SOURCES = {short: cds for t in TARGETS.values() for cds, short in t.sources}

#: CDS NetCDF short name -> store name, for variables without a level dimension.
SINGLE_LEVEL_NAMES = {
    "t2m": "2t",
    "u10": "10u",
    "v10": "10v",
    "msl": "msl",
    "z": "static_z",
    "lsm": "static_lsm",
    "slt": "static_slt",
    # Aurora 1.5's surface inputs: the CDS's short names
    "d2m": "2d", "tcwv": "tcwv", "tcc": "tcc", "u100": "100u", "v100": "100v", "sp": "sp",
    "lcc": "lcc", "mcc": "mcc", "hcc": "hcc", "skt": "skt", "stl1": "stl1", "swvl1": "swvl1",
    "siconc": "ci", "sd": "sd",
    **{short: short for short in TARGET_SOURCES},  # what the targets are made of
}  # fmt: skip
#: Where each store variable comes from, for error messages.
ORIGIN = {
    **{v: (SINGLE_LEVELS, k) for k, v in (SURFACE_REQUEST | V15_SURFACE_REQUEST).items()},
    **{v: (PRESSURE_LEVELS, k) for k, v in ATMOS_REQUEST.items()},
    **{v: (SINGLE_LEVELS, k) for k, v in STATIC_REQUEST.items()},
    **{short: (SINGLE_LEVELS, cds) for short, cds in TARGET_SOURCES.items()},
}
UNITS = {
    "2t": "K", "10u": "m s-1", "10v": "m s-1", "msl": "Pa",
    "z": "m2 s-2", "u": "m s-1", "v": "m s-1", "t": "K", "q": "kg kg-1",
    "static_z": "m2 s-2", "static_lsm": "1", "static_slt": "1",
    "2d": "K", "tcwv": "kg m-2", "tcc": "1", "100u": "m s-1", "100v": "m s-1", "sp": "Pa",
    "lcc": "1", "mcc": "1", "hcc": "1", "skt": "K", "stl1": "K", "swvl1": "m3 m-3", "ci": "1",
    "sd": "m of water equivalent",
}  # fmt: skip

#: Fields (variable x level x time step) per request; the CDS refuses much larger ones.
FIELDS_PER_REQUEST = 6000

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


def surface_request(data: DataConfig) -> list[str]:
    """The CDS names of the instantaneous surface variables the store needs (an instantaneous
    target's among them: it is asked at the model hours only)."""
    target = TARGETS[data.target]
    names = list(SURFACE_REQUEST) + (list(V15_SURFACE_REQUEST) if data.v15_inputs else [])
    return names + [cds for cds, _ in target.sources if not target.hourly and cds not in names]


def plan_requests(config: StudyConfig, *, max_fields: int = FIELDS_PER_REQUEST) -> list[Request]:
    """The CDS requests that together hold everything the store needs.

    Per month: the surface variables at the model hours, the target at every hour where a step's
    value needs every hour (`targets.Target.hourly`: starting the day before the period, whose
    last five hours the first 6-hour total needs; else with the surface variables), and the
    pressure-level variables, split into day ranges when a month would exceed `max_fields`
    fields. The static fields come once, from the period's first day.
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
    target = TARGETS[data.target]
    surface = _base_request(data, surface_request(data), MODEL_HOURS)
    rain = _base_request(data, [cds for cds, _ in target.sources], range(24))
    atmos = {**_base_request(data, list(ATMOS_REQUEST), MODEL_HOURS)}
    atmos["pressure_level"] = [str(lv) for lv in levels]

    for y, m, days in _months(start - dt.timedelta(days=1), end) if target.hourly else ():
        out.append(
            Request(SINGLE_LEVELS, _dated(rain, y, m, days), f"{target.name}-{y}-{m:02d}.nc")
        )
    for y, m, days in _months(start, end):
        out.append(Request(SINGLE_LEVELS, _dated(surface, y, m, days), f"sfc-{y}-{m:02d}.nc"))
        per_day = len(ATMOS_REQUEST) * len(levels) * len(MODEL_HOURS)
        parts = min(len(days), max(1, math.ceil(per_day * len(days) / max_fields)))
        for chunk in np.array_split(np.array(days), parts):
            days_part = [int(d) for d in chunk]
            name = (
                f"pl-{y}-{m:02d}.nc"
                if parts == 1
                else (f"pl-{y}-{m:02d}-d{days_part[0]:02d}-{days_part[-1]:02d}.nc")
            )
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
    surface = len(store.surface_vars(data.v15_inputs)) + 1
    store_fields = n_times * (surface + len(store.ATMOS_VARS) * len(data.levels))
    return DownloadEstimate(
        len(plan), fields, points, fields * points * 4, store_fields * points * 4
    )


def describe_plan(config: StudyConfig) -> str:
    """A few lines saying what `download` will ask for and how big it is (an estimate)."""
    est = estimate_download(config)
    ny, nx = grid_shape(config.data.region, config.data.grid)
    return (
        f"{est.requests} CDS requests, {est.fields:,} fields on a {ny}x{nx} grid;"
        f" about {est.download_bytes / 1e9:.1f} GB of float32 before NetCDF compression"
        f" (an estimate), store about {est.store_bytes / 1e9:.1f} GB uncompressed"
    )
