"""Files in the exact layout the CDS returns today, and a fake cdsapi client that writes them.

The layout follows shared/cds-real/PROVENANCE.md: `valid_time` int64 seconds since 1970,
`expver` a string coordinate along valid_time (a scalar for one time step), a scalar `number`,
`pressure_level` float64 descending, latitude descending, float32 variables under the CDS short
names, regional boxes in -180..180 and global grids in 0..360.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import threading
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from aurora_sweep.config.study import StudyConfig
from aurora_sweep.config.study_file import load_config

#: CDS request names -> NetCDF short names.
SHORT = {
    "2m_temperature": "t2m",
    "10m_u_component_of_wind": "u10",
    "10m_v_component_of_wind": "v10",
    "mean_sea_level_pressure": "msl",
    "total_precipitation": "tp",
    "geopotential": "z",
    "land_sea_mask": "lsm",
    "soil_type": "slt",
    "u_component_of_wind": "u",
    "v_component_of_wind": "v",
    "temperature": "t",
    "specific_humidity": "q",
    # Aurora 1.5's other surface inputs
    "2m_dewpoint_temperature": "d2m", "total_column_water_vapour": "tcwv",
    "total_cloud_cover": "tcc", "100m_u_component_of_wind": "u100",
    "100m_v_component_of_wind": "v100", "surface_pressure": "sp", "low_cloud_cover": "lcc",
    "medium_cloud_cover": "mcc", "high_cloud_cover": "hcc", "skin_temperature": "skt",
    "soil_temperature_level_1": "stl1", "volumetric_soil_water_layer_1": "swvl1",
    "sea_ice_cover": "siconc", "snow_depth": "sd",
}  # fmt: skip
EPOCH = np.datetime64("1970-01-01T00:00:00", "s")


def hours_since_epoch(times: np.ndarray) -> np.ndarray:
    return (np.asarray(times).astype("datetime64[s]") - EPOCH).astype(np.int64) // 3600


def tp_metres(times: np.ndarray) -> np.ndarray:
    """A known hourly tp (m) per time: 0.1 mm times (hour since epoch mod 7, plus 1)."""
    return 1e-4 * ((hours_since_epoch(times) % 7) + 1)


def field_value(name: str, times: np.ndarray, level: float | None = None) -> np.ndarray:
    """A deterministic value per time (and level) so tests can check where data landed."""
    h = hours_since_epoch(times).astype(np.float64)
    if name == "tp":
        return tp_metres(times)
    base = {"t2m": 280.0, "u10": 1.0, "v10": 2.0, "msl": 100000.0, "z": 50000.0, "u": 3.0,
            "v": 4.0, "t": 250.0, "q": 0.001, "lsm": 0.5, "slt": 2.0, "d2m": 275.0,
            "tcwv": 20.0, "tcc": 0.5, "u100": 5.0, "v100": 6.0, "sp": 95000.0, "lcc": 0.3,
            "mcc": 0.2, "hcc": 0.1, "skt": 281.0, "stl1": 279.0, "swvl1": 0.3, "siconc": 0.0,
            "sd": 0.01}[name]  # fmt: skip
    return base + (level or 0) * 0.01 + (h % 1000) * 1e-3


def cds_dataset(
    variables: dict[str, np.ndarray],
    *,
    times: Sequence[np.datetime64],
    lat: np.ndarray,
    lon: np.ndarray,
    levels: Sequence[float] | None = None,
    expver: Sequence[str] | str = "0001",
    step_type: str = "instant",
) -> xr.Dataset:
    """A dataset in the CDS layout; each variable is (time[, level], lat, lon) float32."""
    times = np.asarray(times, dtype="datetime64[s]")
    seconds = (times - EPOCH).astype(np.int64)
    dims = ("valid_time", "pressure_level", "latitude", "longitude") if levels is not None else (
        "valid_time", "latitude", "longitude")  # fmt: skip
    coords: dict = {
        "number": np.int64(0),
        "valid_time": ("valid_time", seconds, {"units": "seconds since 1970-01-01",
                                               "calendar": "proleptic_gregorian"}),
        "latitude": ("latitude", np.asarray(lat, np.float64), {"units": "degrees_north",
                                                               "stored_direction": "decreasing"}),
        "longitude": ("longitude", np.asarray(lon, np.float64), {"units": "degrees_east"}),
    }  # fmt: skip
    if levels is not None:
        coords["pressure_level"] = ("pressure_level", np.asarray(levels, np.float64),
                                    {"units": "hPa", "stored_direction": "decreasing"})  # fmt: skip
    if isinstance(expver, str) or len(times) == 1:
        ev = expver if isinstance(expver, str) else expver[0]
        coords["expver"] = np.array(ev, dtype=object)
    else:
        coords["expver"] = ("valid_time", np.array(list(expver), dtype=object))
    data_vars = {
        name: (dims, np.asarray(values, np.float32), {"GRIB_stepType": step_type, "units": "x"})
        for name, values in variables.items()
    }
    ds = xr.Dataset(data_vars, coords=coords)
    ds.attrs = {"GRIB_centre": "ecmf", "Conventions": "CF-1.7"}
    return ds


def write_netcdf(ds: xr.Dataset, path: Path) -> Path:
    encoding = {v: {"zlib": True, "complevel": 1, "shuffle": True, "_FillValue": np.nan}
                for v in ds.data_vars}  # fmt: skip
    if "expver" in ds.coords:
        encoding["expver"] = {"dtype": str}
    ds.to_netcdf(path, engine="netcdf4", format="NETCDF4", encoding=encoding)
    return path


def write_zip(members: dict[str, xr.Dataset], path: Path, tmp: Path) -> Path:
    """A zip of NetCDF members, as cdsapi writes it (also under a `.nc` name)."""
    with zipfile.ZipFile(path, "w") as z:
        for name, ds in members.items():
            member = write_netcdf(ds, tmp / f"member-{name}")
            z.write(member, name)
            member.unlink()
    return path


def request_dataset(dataset: str, request: dict) -> xr.Dataset:
    """What the CDS would return for a request: grid from area/grid, times from the dates."""
    north, west, south, east = request["area"]
    g = request["grid"][0]
    lat = np.round(np.arange(north, south - g / 2, -g), 6)
    width = (east - west) % 360 or 360
    lon = np.round(west + np.arange(0, width + g / 2, g), 6)
    lon = np.where(lon > 180, lon - 360, lon) if west < 0 or width < 360 else lon
    times = sorted(
        np.datetime64(f"{y}-{m}-{d}T{t}", "s")
        for y in request["year"]
        for m in request["month"]
        for d in request["day"]
        for t in request["time"]
    )
    times = np.array(times, dtype="datetime64[s]")
    levels = None
    if "pressure_level" in request:
        levels = sorted((float(v) for v in request["pressure_level"]), reverse=True)
    variables = {}
    for long_name in request["variable"]:
        short = SHORT[long_name]
        if levels is None:
            per_time = field_value(short, times)
            values = np.broadcast_to(per_time[:, None, None], (len(times), lat.size, lon.size))
        else:
            values = np.stack([field_value(short, times, lv) for lv in levels], axis=1)
            values = np.broadcast_to(values[:, :, None, None], (*values.shape, lat.size, lon.size))
        variables[short] = values
    step = "accum" if "total_precipitation" in request["variable"] else "instant"
    return cds_dataset(variables, times=times, lat=lat, lon=lon, levels=levels, step_type=step)


class FakeCDS:
    """Stands in for `cdsapi.Client`: writes the requested file, or fails as told.

    The files for `config`'s planned requests are rendered up front, on the calling thread:
    HDF5 is not thread-safe, and the download's worker threads call `retrieve`.

    Args:
        config: the study whose requests to answer.
        fail_after: raise `fail_with` on every call after this many successful retrieves.
        fail_with: the exception to raise (default: a dropped connection).
        flaky: raise a transient error on the first `flaky` calls, then succeed.
        truncate: targets to write truncated (cut in half) once, as a broken download would.
    """

    def __init__(
        self,
        config: StudyConfig,
        *,
        fail_after: int | None = None,
        fail_with: BaseException | None = None,
        flaky: int = 0,
        truncate: Sequence[str] = (),
    ):
        from aurora_sweep.data.era5 import plan_requests

        self.fail_after = fail_after
        self.fail_with = fail_with or ConnectionError("Connection aborted: remote end closed")
        self.flaky = flaky
        self.truncate = set(truncate)
        self.calls: list[str] = []
        self.written: list[str] = []
        self.files: dict[str, bytes] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for r in plan_requests(config):
                path = write_netcdf(request_dataset(r.dataset, r.request), Path(tmp) / r.target)
                self.files[r.key] = path.read_bytes()
        self.lock = threading.Lock()

    def __call__(self) -> FakeCDS:  # the client factory
        return self

    def retrieve(self, dataset: str, request: dict, target: str) -> str:
        from aurora_sweep.data.era5 import Request

        name = Path(target).name.removesuffix(".partial")
        with self.lock:
            self.calls.append(name)
            if self.flaky > 0:
                self.flaky -= 1
                raise RuntimeError("503 Server Error: Service Unavailable")
            if self.fail_after is not None and len(self.written) >= self.fail_after:
                Path(target).write_bytes(b"\x89HDF\r\n\x1a\n half")  # half-written, then fails
                raise self.fail_with
            data = self.files[Request(dataset, request, name).key]
            if name in self.truncate:
                data = data[: len(data) // 2]
                self.truncate.discard(name)
            self.written.append(name)
        Path(target).write_bytes(data)
        return target


def study_config(
    tmp: Path,
    *,
    north: float = 50,
    south: float = 45,
    west: float = -2,
    east: float = 3,
    levels: Sequence[int] = (500, 850),
    grid: float = 1.0,
    start: dt.date = dt.date(2022, 1, 1),
    days: int = 3,
    name: str = "t",
    study: str = "",
) -> StudyConfig:
    """A small study config written to TOML and loaded the way users load theirs (`study`:
    more lines of its [study] table)."""
    d = [start + dt.timedelta(days=i) for i in range(days)]
    text = f"""
[study]
name = "{name}"
finalists = 1
{study}
[data]
source = "era5"
store = "data/{name}/store.zarr"
region = {{ north = {north}, south = {south}, west = {west}, east = {east} }}
levels = {list(levels)}
grid = {grid}
period = ["{d[0]}", "{d[-1]}"]
train = ["{d[0]}", "{d[0]}"]
validation = ["{d[1]}", "{d[1]}"]
test = ["{d[2]}", "{d[-1]}"]
"""
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return load_config(path, workdir=tmp)


def write_study_files(
    config: StudyConfig,
    folder: Path,
    *,
    edit: Callable[[str, xr.Dataset], xr.Dataset] | None = None,
) -> list[Path]:
    """Every planned request's file written straight into `folder` (no download)."""
    from aurora_sweep.data.era5 import plan_requests

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for r in plan_requests(config):
        ds = request_dataset(r.dataset, r.request)
        if edit is not None:
            ds = edit(r.target, ds)
        out.append(write_netcdf(ds, folder / r.target))
    return out
