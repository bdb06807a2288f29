"""Forecasts from an exported adapter, as a CF-1.8 NetCDF file that xarray, CDO or a GIS opens.

    aurora-sweep forecast adapter/ --start 2025-03-01 --end 2025-03-31 --lead 24h --out mar.nc

For every time of the store in the date range that has the two input times Aurora needs (the
time and the one 6 hours before), the fine-tuned model forecasts `--lead` ahead: one step for 6h,
Aurora's rollout (each forecast fed back as the next input) for 12h, 24h or any multiple of 6 h.
The study's target (`targets.TARGETS`) is written under its name and units, over the lead as its
kind says: tp's (or runoff's, snowfall's) total over the `lead_time` hours ending at `valid_time`
(`cell_methods` "lead_time: sum"), pr's mean rate over them ("lead_time: mean"), rain_rate's or
swvl1's value at `valid_time` ("lead_time: point"). The variables Aurora already predicts are
written at `valid_time`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import xarray as xr

from aurora_sweep.config.study import Period
from aurora_sweep.data.samples import Samples
from aurora_sweep.data.store import ATMOS_VARS, SURF_VARS
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.verify.rollout import accumulate, last_step

if TYPE_CHECKING:
    from aurora_sweep.model.adapter import Adapter

STEP_HOURS = 6
#: Store name -> (NetCDF name as ERA5's files have it, CF standard name, units, long name); the
#: target's come from `targets.Target.lead_attrs`.
CF_VARS = {
    "2t": ("t2m", "air_temperature", "K", "2 metre temperature"),
    "10u": ("u10", "eastward_wind", "m s-1", "10 metre U wind component"),
    "10v": ("v10", "northward_wind", "m s-1", "10 metre V wind component"),
    "msl": ("msl", "air_pressure_at_mean_sea_level", "Pa", "mean sea level pressure"),
    "z": ("z", "geopotential", "m2 s-2", "geopotential"),
    "u": ("u", "eastward_wind", "m s-1", "U component of wind"),
    "v": ("v", "northward_wind", "m s-1", "V component of wind"),
    "t": ("t", "air_temperature", "K", "temperature"),
    "q": ("q", "specific_humidity", "kg kg-1", "specific humidity"),
}  # fmt: skip


def parse_lead(text: str) -> int:
    """'6h', '12h', '24h', '36h' ... -> model steps of 6 hours."""
    found = re.fullmatch(r"\s*(\d+)\s*h?\s*", text or "")
    hours = int(found.group(1)) if found else 0
    if hours <= 0 or hours % STEP_HOURS:
        raise AuroraSweepError(f"--lead {text!r}: give a multiple of 6 hours, e.g. 6h, 12h or 24h")
    return hours // STEP_HOURS


def _day(text: str, what: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except (TypeError, ValueError):
        raise AuroraSweepError(f"{what} {text!r}: give a date as YYYY-MM-DD") from None


def forecast_file(
    adapter: str | Path,
    *,
    start: str,
    end: str,
    lead: str = "6h",
    out: Path = Path("forecast.nc"),
    checkpoint: Path | None = None,
    batch_size: int = 4,
    tracking_uri: str | None = None,
) -> tuple[Path, int]:
    """Write the forecasts of `adapter` (a folder, or `models:/<study>/<version>` registered at
    `tracking_uri`) for init times from `start` to `end` (inclusive days) to `out`; returns the
    path and the number of forecasts."""
    from aurora_sweep.model.adapter import open_adapter
    from aurora_sweep.model.build import unwrap

    steps = parse_lead(lead)
    first, last = _days(start, end)
    opened = open_adapter(adapter, checkpoint=checkpoint, tracking_uri=tracking_uri)
    samples = _init_samples(opened, first, last)
    model = unwrap(opened.load_model())
    values, state = _roll_out(model, samples, steps, batch_size, opened.device)
    ds = to_dataset(
        values=values,
        state=state,
        init=samples.times[samples.index],
        steps=steps,
        samples=samples,
        attrs=_attrs(opened, first, last, steps),
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    ds.to_netcdf(partial, engine="netcdf4", encoding=_encoding(ds))
    partial.replace(out)
    return out, len(samples)


def _days(start: str, end: str) -> tuple[dt.date, dt.date]:
    """The first and last day of `--start` and `--end`."""
    first, last = _day(start, "--start"), _day(end, "--end")
    if last < first:
        raise AuroraSweepError(f"--end {end} is before --start {start}")
    return first, last


def _init_samples(adapter: Adapter, first: dt.date, last: dt.date) -> Samples:
    """The samples to forecast from: every time of the study's store from `first` to `last`
    with its two inputs, on the levels the trial trained on and as its base reads them."""
    from aurora_sweep.data.cube import open_cube
    from aurora_sweep.model.aurora15 import for_base

    config, trial = adapter.config, adapter.meta.trial
    data = dataclasses.replace(config.data, test=Period(first, last), levels=trial.levels)
    samples = Samples(load_cube(open_cube(config), first, last), data, "test", target=False)
    return for_base(samples, trial.base, config)


def _attrs(adapter: Adapter, first: dt.date, last: dt.date, steps: int) -> dict[str, str]:
    """The file's global attributes: what made the forecasts, from what, and how."""
    from aurora_sweep import __version__

    meta, path = adapter.meta, adapter.path
    return {
        "title": f"{adapter.config.data.target} forecasts of a fine-tuned Aurora "
        f"({meta.trial.method})",
        "source": f"Aurora ({meta.base.name} base) fine-tuned by aurora-sweep in "
        f"study {adapter.config.name}",
        "adapter": adapter.source or str(path.resolve()),
        "base_checkpoint": meta.base.checkpoint,
        "base_checkpoint_sha256": meta.base.sha256,
        "software": f"aurora-sweep {__version__}",
        "history": f"{dt.datetime.now(dt.UTC):%Y-%m-%dT%H:%M:%SZ} aurora-sweep forecast "
        f"{path} --start {first} --end {last} --lead {steps * STEP_HOURS}h",
    }


def _roll_out(aurora, samples, steps: int, batch_size: int, device):
    """Each sample's target over the `steps` model steps, every lead through Aurora's `rollout`
    (`verify.rollout.accumulate`; undefined at sea for a land-only target), and the state at
    the last one."""
    from aurora import rollout

    n = len(samples)
    values = np.zeros((n, *samples.grid), dtype=np.float32)
    state = {k: np.zeros((n, *samples.grid), np.float32) for k in SURF_VARS}
    state |= {k: np.zeros((n, len(samples.levels), *samples.grid), np.float32) for k in ATMOS_VARS}
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            idx = np.arange(lo, min(n, lo + batch_size))
            predictions = rollout(aurora, samples.inputs(idx).to(device), steps=steps)
            pred, total = last_step(accumulate(predictions, samples.variable))
            values[idx] = total.float().cpu().numpy()
            for k in SURF_VARS:
                state[k][idx] = pred.surf_vars[k][:, 0].float().cpu().numpy()
            for k in ATMOS_VARS:
                state[k][idx] = pred.atmos_vars[k][:, 0].float().cpu().numpy()
    if samples.scored_points is not None:  # a land-only target: undefined at sea
        values = np.where(samples.scored_points, values, np.nan).astype(np.float32)
    return values, state


def load_cube(cube: xr.Dataset, first: dt.date, last: dt.date) -> xr.Dataset:
    """The store's times the forecasts need: the range and the 6 hours before it."""
    lo = np.datetime64(first) - np.timedelta64(STEP_HOURS, "h")
    hi = np.datetime64(last + dt.timedelta(days=1))
    times = cube["time"].values
    return cube.isel(time=np.flatnonzero((times >= lo) & (times < hi)))


def to_dataset(
    *,
    values: np.ndarray,
    state: dict[str, np.ndarray],
    init: pd.DatetimeIndex,
    steps: int,
    samples,
    attrs: dict[str, str],
) -> xr.Dataset:
    """The forecasts as a CF-1.8 dataset: dims (time, lead_time, [pressure_level,] latitude,
    longitude), `valid_time` = time + lead_time."""
    lead = np.array([steps * STEP_HOURS], dtype="timedelta64[h]").astype("timedelta64[ns]")
    grid = ("latitude", "longitude")
    target = samples.variable
    dims = ("time", "lead_time", *grid)
    variables = {target.name: xr.DataArray(values[:, None], dims=dims, attrs=target.lead_attrs())}
    variables |= dict(_cf(k, state[k], grid) for k in SURF_VARS)
    variables |= dict(_cf(k, state[k], ("pressure_level", *grid)) for k in ATMOS_VARS)
    # xarray writes each variable's `coordinates` attribute (valid_time) itself
    coords = _coords(init, lead, samples)
    return xr.Dataset(variables, coords=coords, attrs={"Conventions": "CF-1.8", **attrs})


def _coords(init: pd.DatetimeIndex, lead: np.ndarray, samples) -> dict[str, tuple]:
    """The dataset's CF coordinates: initialisation, lead and valid times, levels, the grid."""
    times = init.values.astype("datetime64[ns]")
    return {
        "time": (
            "time",
            times,
            {"standard_name": "forecast_reference_time", "long_name": "initialisation time"},
        ),
        "lead_time": (
            "lead_time",
            lead,
            {"standard_name": "forecast_period", "long_name": "lead time"},
        ),
        "valid_time": (
            ("time", "lead_time"),
            init.values[:, None] + lead[None, :],
            {"standard_name": "time", "long_name": "time the forecast is valid for"},
        ),
        "pressure_level": (
            "pressure_level",
            np.asarray(samples.levels, dtype=np.float64),
            {
                "standard_name": "air_pressure",
                "units": "hPa",
                "positive": "down",
                "long_name": "pressure level",
            },
        ),
        "latitude": (
            "latitude",
            samples.cube["latitude"].values.astype(np.float64),
            {"standard_name": "latitude", "units": "degrees_north", "long_name": "latitude"},
        ),
        "longitude": (
            "longitude",
            samples.cube["longitude"].values.astype(np.float64),
            {"standard_name": "longitude", "units": "degrees_east", "long_name": "longitude"},
        ),
    }


def _cf(name: str, field: np.ndarray, dims: tuple[str, ...]) -> tuple[str, xr.DataArray]:
    """A state variable under its CF short name, with its standard name, units and long name."""
    short, standard, units, long = CF_VARS[name]
    return short, xr.DataArray(
        field[:, None],
        dims=("time", "lead_time", *dims),
        attrs={"standard_name": standard, "units": units, "long_name": long},
    )


def _encoding(ds: xr.Dataset) -> dict[str, dict]:
    """float32 data compressed (zlib level 4), times as hours since 1970."""
    enc: dict[str, dict] = {
        name: {"dtype": "float32", "zlib": True, "complevel": 4, "_FillValue": np.float32(np.nan)}
        for name in ds.data_vars
    }
    enc["time"] = {
        "units": "hours since 1970-01-01 00:00:00",
        "calendar": "proleptic_gregorian",
        "dtype": "float64",
    }
    enc["valid_time"] = dict(enc["time"])
    enc["lead_time"] = {"units": "hours", "dtype": "float64"}
    for c in ("time", "valid_time", "lead_time"):
        enc[c]["_FillValue"] = None  # CF: coordinates have no missing values
    for c in ("latitude", "longitude", "pressure_level"):
        enc[c] = {"_FillValue": None}
    return enc
