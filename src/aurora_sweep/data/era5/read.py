"""Reading what the CDS returns (NetCDF4, zips of NetCDF4, legacy NetCDF3) into normalised
datasets with the store's names and units."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import xarray as xr

from aurora_sweep.data.era5.plan import SINGLE_LEVEL_NAMES, SINGLE_LEVELS
from aurora_sweep.errors import AuroraSweepError


class CorruptFileError(AuroraSweepError):
    """A file that cannot be read as CDS NetCDF (truncated download, HTML error page, ...)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} is truncated or corrupt ({reason})")
        self.path = Path(path)


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
    _refuse_other_products(ds, label)
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

    expver = _expver(ds)
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


def _refuse_other_products(ds: xr.Dataset, label: str) -> None:
    """Refuse monthly means, forecasts and the CDS layout before 2024, each in one line."""
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


def _expver(ds: xr.Dataset) -> np.ndarray:
    """Each time's ERA5 experiment version as text ('0001' where the file has none)."""
    n = ds.sizes["time"]
    if "expver" in ds.coords and ds["expver"].ndim == 1:
        return np.array([str(v) for v in ds["expver"].values])
    if "expver" in ds.coords:
        return np.full(n, str(ds["expver"].values.item()))
    return np.full(n, "0001")


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
