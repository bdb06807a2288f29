"""Open a study's data store, building the embedded demo's on first use.

The demo goes through the same road as real data: its generator writes files in the CDS layout,
and `era5.import_files` turns them into the store. Real studies build their store with
`aurora-sweep data download` or `aurora-sweep data import`.
"""

from __future__ import annotations

import shutil

import numpy as np
import xarray as xr
from rich.console import Console

from aurora_sweep.config.study import DataConfig, StudyConfig
from aurora_sweep.data.samples import in_period
from aurora_sweep.data.store import V15_SURF_VARS, open_store
from aurora_sweep.errors import AuroraSweepError


def build_demo_store(config: StudyConfig, *, console: Console | None = None) -> None:
    """Generate the demo's CDS-layout files and import them into the study's store."""
    from aurora_sweep.data import demo as demo_data
    from aurora_sweep.data import era5

    console = console or Console(stderr=True)
    cds_dir = config.data.store.parent / "cds"
    console.print(f"generating the demo data (CDS layout) in {cds_dir} ...")
    paths = demo_data.write_cds_files(cds_dir, demo_data.world_for(config.data))
    console.print(f"importing {len(paths)} files into {config.data.store} ...")
    era5.import_files(paths, config.data, progress=False)


def open_cube(config: StudyConfig, *, console: Console | None = None) -> xr.Dataset:
    """The study's canonical cube; the demo's is made here when missing (or remade when it was
    made for another region, grid, levels or period). A real store that does not cover the
    study is refused in one line: reusing it would train on other data than the config says."""
    data = config.data
    if data.source == "demo" and data.store.exists():
        mismatch = store_mismatch(open_store(data.store), data)
        if mismatch:
            (console or Console(stderr=True)).print(f"the demo store {mismatch}: remaking it")
            shutil.rmtree(data.store)
    if data.source == "demo" and not data.store.exists():
        build_demo_store(config, console=console)
    cube = open_store(data.store)
    mismatch = store_mismatch(cube, data)
    if mismatch:
        raise AuroraSweepError(
            f"the store at {data.store} {mismatch}: rebuild it for this study (delete it, then "
            "'aurora-sweep data download' or 'data import'), or set [data] store to another path"
        )
    return cube


def _describe(lat: np.ndarray, lon: np.ndarray) -> str:
    def deg(v: float, pos: str, neg: str) -> str:
        return f"{abs(v):g}°{pos if v >= 0 else neg}"

    return (
        f"{deg(lat.min(), 'N', 'S')}–{deg(lat.max(), 'N', 'S')}, "
        f"{deg(lon[0], 'E', 'W')}–{deg(lon[-1], 'E', 'W')}"
    )


def store_mismatch(cube: xr.Dataset, data: DataConfig) -> str | None:
    """What the store lacks for `data`, in words ('holds 500, 850 hPa, not 700'), or None when
    it covers the study's region, grid, levels and every split."""
    lat, lon = cube["latitude"].values, cube["longitude"].values
    r, g = data.region, data.grid
    if lat.size > 1 and lon.size > 1:
        spacing = (abs(float(lat[0] - lat[1])), abs(float(lon[1] - lon[0])))
        if any(abs(d - g) > 1e-6 for d in spacing):
            return f"has a {spacing[0]:g}° grid, not the study's {g:g}°"

    def apart(a: float, b: float) -> float:  # longitudes compared on the circle
        return abs((a - b + 180.0) % 360.0 - 180.0)

    corners = (
        abs(lat.max() - r.north),
        abs(lat.min() - r.south),
        apart(lon[0], r.west),
        apart(lon[-1], r.east),
    )
    if max(corners) > g / 2:
        return (
            f"covers {_describe(lat, lon)}, not the study's region "
            f"{_describe(np.array([r.south, r.north]), np.array([r.west, r.east]))}"
        )
    if data.target not in cube:
        return f"holds no {data.target}, the study's [model] target: import it again"
    if data.v15_inputs:
        lacks = [v for v in V15_SURF_VARS if v not in cube]
        if lacks:
            return (
                f"lacks Aurora 1.5's inputs ({', '.join(lacks[:4])}{' ...' if len(lacks) > 4 else ''}"
                '), which [study] baselines = ["aurora-1.5"] needs'
            )
    levels = [int(v) for v in cube["level"].values]
    missing = [lv for lv in data.levels if lv not in levels]
    if missing:
        return f"holds levels {', '.join(map(str, levels))} hPa, not {', '.join(map(str, missing))}"
    times = cube["time"].values
    for split in ("train", "validation", "test"):
        period = getattr(data, split)
        if not in_period(times, period).any():
            span = f"{str(times[0])[:10]}..{str(times[-1])[:10]}" if times.size else "no times"
            return f"holds {span}, nothing in the {split} period {period.start}..{period.end}"
    return None
