"""The canonical local store: one zarr cube that every data source is turned into.

Whatever the origin (the embedded demo, CDS downloads, files a user already has), the data end up
in one layout that `dataset.py` reads without knowing where they came from:

- dims `time` (datetime64[ns], model times, ascending, gaps allowed), `level` (int, hPa,
  ascending), `latitude` (float64, strictly decreasing), `longitude` (float64, strictly
  increasing; a box crossing 0° keeps its western part negative, e.g. -12..40);
- surface variables `2t` (K), `10u`, `10v` (m/s), `msl` (Pa) on (time, latitude, longitude);
- the study's target (`targets.TARGETS`, tp by default) on (time, latitude, longitude), under its
  own name and in its units: `tp` (mm) is the total over the 6 hours ending at `time`, NaN where
  not every hourly value was available;
- atmospheric variables `z` (m²/s²), `u`, `v` (m/s), `t` (K), `q` (kg/kg) on
  (time, level, latitude, longitude);
- static variables `static_z` (m²/s²), `static_lsm` (0-1), `static_slt` (category) on
  (latitude, longitude);
- for a study that uses Aurora 1.5 (`[study] baselines` with "aurora-1.5"), its other surface
  inputs on (time, latitude, longitude): `2d`, `skt`, `stl1` (K), `tcwv` (kg m-2), `tcc`, `lcc`,
  `mcc`, `hcc`, `ci` (0-1), `100u`, `100v` (m/s), `sp` (Pa), `swvl1` (m3 m-3), `sd` (m of water
  equivalent).

Names follow Aurora's, so a sample is a rename away from an `aurora.Batch`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import xarray as xr

from aurora_sweep.config.targets import TARGETS
from aurora_sweep.errors import AuroraSweepError

SURF_VARS = ("2t", "10u", "10v", "msl")
ATMOS_VARS = ("z", "u", "v", "t", "q")
STATIC_VARS = ("static_z", "static_lsm", "static_slt")
#: Names Aurora uses for the static variables.
AURORA_STATIC = {"static_z": "z", "static_lsm": "lsm", "static_slt": "slt"}
#: The surface variables Aurora 1.5 reads besides SURF_VARS (instantaneous, at the model
#: times), in a store made for a study that uses it; `sd` is Aurora 1.5's `scaled_sd` (metres
#: of water equivalent: the model log-transforms it itself) and `ci` is NaN over land, as ERA5
#: has it (the batch puts 0 there, as Aurora's example does).
V15_SURF_VARS = (
    "2d", "tcwv", "tcc", "100u", "100v", "sp", "lcc", "mcc", "hcc", "skt", "stl1", "swvl1",
    "ci", "sd",
)  # fmt: skip
#: Store names that Aurora 1.5 calls otherwise.
AURORA_V15_NAMES = {"sd": "scaled_sd"}

#: A static field a batch may carry: the true longitude of each column (degrees east), where
#: the batch's metadata holds Aurora's shifted ones. Never given to the model itself.
TRUE_LON = "true_longitude"


def surface_vars(v15: bool) -> tuple[str, ...]:
    """The instantaneous surface variables of a store: Aurora's four, and Aurora 1.5's
    fourteen more for a study that uses it."""
    return SURF_VARS + (V15_SURF_VARS if v15 else ())


def check_cube(ds: xr.Dataset, *, where: str = "the data") -> None:
    """Raise if `ds` is not in the canonical layout."""
    missing = [v for v in (*SURF_VARS, *ATMOS_VARS, *STATIC_VARS) if v not in ds]
    if not any(t in ds for t in TARGETS):
        missing.append(f"a target variable ({', '.join(TARGETS)})")
    if missing:
        raise AuroraSweepError(f"{where} lacks {', '.join(missing)}")
    lat, lon = ds["latitude"].values, ds["longitude"].values
    if lat.size > 1 and not np.all(np.diff(lat) < 0):
        raise AuroraSweepError(f"{where}: latitudes must be strictly decreasing")
    if lon.size > 1 and not np.all(np.diff(lon) > 0):
        raise AuroraSweepError(f"{where}: longitudes must be strictly increasing")
    times = ds["time"].values
    if times.size > 1 and not np.all(np.diff(times) > np.timedelta64(0)):
        raise AuroraSweepError(f"{where}: times must be strictly increasing")


def write_store(ds: xr.Dataset, path: Path) -> Path:
    """Write `ds` as the store at `path`, atomically: a crash leaves the old store or none."""
    check_cube(ds)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    ds = ds.transpose("time", "level", "latitude", "longitude", missing_dims="ignore")
    encoding = {}
    for name, var in ds.data_vars.items():
        # uncompressed, four times per chunk: a time of a variable is a contiguous run of raw
        # float32 in its chunk file, read with one readinto per level and nothing to
        # decompress (`reader.StoreReader`); see bench/bench_loader.py for the layouts measured
        chunks = tuple(min(4, n) if d == "time" else n for d, n in zip(var.dims, var.shape))
        encoding[name] = {"chunks": chunks, "compressors": None}
    ds.to_zarr(tmp, mode="w", encoding=encoding, consolidated=True, zarr_format=2)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def open_store(path: Path) -> xr.Dataset:
    """Open the store, with a clear error when it is missing or unreadable."""
    path = Path(path)
    if not path.exists():
        raise AuroraSweepError(
            f"no data store at {path}: run 'aurora-sweep data download' or 'aurora-sweep data import'"
        )
    try:
        ds = xr.open_zarr(path, consolidated=True)
    except Exception as e:  # zarr raises many types for a damaged store
        raise AuroraSweepError(
            f"the data store at {path} cannot be read ({e}); delete it and rebuild"
        ) from None
    check_cube(ds, where=str(path))
    return ds
