"""Reading chosen times of a store straight from its chunk files (`StoreReader`), for a cube
too large to hold in memory (`dataset.Samples` reads through it)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from aurora_sweep.config.targets import TARGETS
from aurora_sweep.data.store import ATMOS_VARS, SURF_VARS, V15_SURF_VARS
from aurora_sweep.errors import AuroraSweepError


class StoreReader:
    """Reads chosen times of a cube straight from its zarr store, without dask.

    The store `store.write_store` writes is uncompressed, chunked along time only: a time of a
    variable is a contiguous run of raw float32 (C order) in its chunk file, so the levels and
    rows a study uses are read with one `readinto` each (a chunk missing from the store is all
    NaN, as zarr leaves it). A store in another layout (compressed, say) is read through
    zarr.
    """

    def __init__(self, cube: xr.Dataset) -> None:
        import zarr

        self.path = Path(cube.encoding["source"])
        group = zarr.open_group(str(self.path), mode="r")
        store = xr.open_zarr(self.path, consolidated=True)
        self.time_index = pd.Index(store["time"].values)
        lat, lon = store["latitude"].values, store["longitude"].values
        self.rows = _offset_slice(lat, cube["latitude"].values, "latitude")
        self.cols = _offset_slice(lon, cube["longitude"].values, "longitude")
        levels = [int(v) for v in store["level"].values]
        self.level_pos = [levels.index(int(v)) for v in cube["level"].values]
        known = dict.fromkeys((*SURF_VARS, *V15_SURF_VARS, *TARGETS, *ATMOS_VARS))
        names = [n for n in known if n in group]
        self.arrays = {name: group[name] for name in names}
        self.meta = {name: self._raw_layout(name) for name in self.arrays}

    def _raw_layout(self, name: str) -> dict | None:
        """The chunk layout when a time of `name` is one raw float32 file, else None."""
        path = self.path / name / ".zarray"
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        raw = (
            meta.get("zarr_format") == 2
            and meta.get("compressor") is None
            and not meta.get("filters")
            and meta.get("order") == "C"
            and meta.get("dtype") == "<f4"
            and meta["chunks"][1:] == meta["shape"][1:]
        )
        return meta if raw else None

    @property
    def raw(self) -> bool:
        """True when every variable is read from its chunk files directly."""
        return all(m is not None for m in self.meta.values())

    def read(self, times: pd.DatetimeIndex, names: Sequence[str]) -> dict[str, np.ndarray]:
        """`names` at `times`: (n, rows, cols) for surface variables, (n, levels, rows, cols) for
        atmospheric ones, float32, as the cube the reader was made for has them."""
        positions = self.time_index.get_indexer(times)
        if (positions < 0).any():
            raise AuroraSweepError(f"the store at {self.path} lacks some of the times asked for")
        return {name: self._read(name, positions) for name in names}

    def _read(self, name: str, positions: np.ndarray) -> np.ndarray:
        meta, atmos = self.meta[name], name in ATMOS_VARS
        rows, cols = self.rows, self.cols
        if meta is None:
            sel = (positions, self.level_pos, rows, cols) if atmos else (positions, rows, cols)
            return np.asarray(self.arrays[name].get_orthogonal_selection(sel), dtype=np.float32)
        shape, per_chunk = meta["shape"][1:], meta["chunks"][0]
        ny, nx = shape[-2:]
        nl = shape[0] if atmos else 1
        levels = self.level_pos if atmos else [0]
        n_rows, n_cols = rows.stop - rows.start, cols.stop - cols.start
        # read straight into the result when whole rows are kept, else through one row buffer
        out = np.empty((positions.size, len(levels), n_rows, n_cols), np.float32)
        buffer = None if n_cols == nx else np.empty((n_rows, nx), np.float32)
        sep = meta.get("dimension_separator", ".")
        for i, t in enumerate(positions):
            chunk = self.path / name / sep.join([str(t // per_chunk)] + ["0"] * len(shape))
            try:
                f = open(chunk, "rb")  # noqa: SIM115 - closed below
            except FileNotFoundError:
                out[i] = np.nan  # an all-NaN chunk is not written
                continue
            with f:
                for j, lv in enumerate(levels):
                    f.seek(4 * ((((t % per_chunk) * nl + lv) * ny + rows.start) * nx))
                    target = out[i, j] if buffer is None else buffer
                    if f.readinto(memoryview(target).cast("B")) != target.nbytes:
                        raise AuroraSweepError(f"{chunk} is truncated: rebuild the store")
                    if buffer is not None:
                        out[i, j] = buffer[:, cols]
        return out if atmos else out[:, 0]


def _offset_slice(store_axis: np.ndarray, cube_axis: np.ndarray, what: str) -> slice:
    """Where the cube's (contiguous) part of an axis lies in the store's."""
    start = int(np.flatnonzero(np.isclose(store_axis, cube_axis[0]))[0]) if cube_axis.size else 0
    if not np.allclose(store_axis[start : start + cube_axis.size], cube_axis):
        raise AuroraSweepError(f"the cube's {what} is not a contiguous part of its store's")
    return slice(start, start + cube_axis.size)
