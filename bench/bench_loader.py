"""How fast can samples be read from a local store? (Europe, 0.25°, the europe-tp config)

Training on real ERA5 must not wait on the loader: a step of AuroraSmall takes seconds on a GPU,
so the loader should give many samples a second. This builds a synthetic store with the Europe
study's shape (149 x 209 points, its levels, a few weeks of 6-hourly times) in a temporary folder
with `store.write_store`, then times batches of 1, 2, 4 and 8 samples read through
`aurora_sweep.dataset.Samples` (or, where that is not importable, the raw arrays of each sample's
three time steps). Prints a table and saves JSON to bench/results/loader-cpu-<date>.json.

    PYTHONPATH=src .venv/bin/python bench/bench_loader.py [--weeks 3] [--seconds 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from aurora_sweep import store
from aurora_sweep.config import Period, load_config

ROOT = Path(__file__).resolve().parents[1]


def synthetic_cube(data, weeks: int) -> xr.Dataset:
    """A cube in the canonical layout with the study's grid and levels; values are noise."""
    r, g = data.region, data.grid
    lat = np.round(np.arange(r.north, r.south - g / 2, -g), 6)
    lon = np.round(np.arange(r.west, r.east + g / 2, g), 6)
    times = pd.date_range(data.period.start, periods=weeks * 7 * 4, freq="6h")
    levels = sorted(data.levels)
    rng = np.random.default_rng(0)

    def field(*shape: int, loc: float = 0.0, scale: float = 1.0) -> np.ndarray:
        return (loc + scale * rng.standard_normal(shape)).astype(np.float32)

    nt, nl, ny, nx = len(times), len(levels), lat.size, lon.size
    surf, atmos = ("time", "latitude", "longitude"), ("time", "level", "latitude", "longitude")
    ds = xr.Dataset(
        {
            "2t": (surf, field(nt, ny, nx, loc=280, scale=10)),
            "10u": (surf, field(nt, ny, nx, scale=5)),
            "10v": (surf, field(nt, ny, nx, scale=5)),
            "msl": (surf, field(nt, ny, nx, loc=101000, scale=1000)),
            "tp": (surf, np.abs(field(nt, ny, nx, scale=2))),
            "z": (atmos, field(nt, nl, ny, nx, loc=50000, scale=5000)),
            "u": (atmos, field(nt, nl, ny, nx, scale=10)),
            "v": (atmos, field(nt, nl, ny, nx, scale=10)),
            "t": (atmos, field(nt, nl, ny, nx, loc=250, scale=10)),
            "q": (atmos, np.abs(field(nt, nl, ny, nx, scale=1e-3))),
            "static_z": (("latitude", "longitude"), field(ny, nx, scale=1000)),
            "static_lsm": (("latitude", "longitude"), rng.random((ny, nx)).astype(np.float32)),
            "static_slt": (
                ("latitude", "longitude"),
                rng.integers(0, 7, (ny, nx)).astype(np.float32),
            ),
        },
        coords={"time": times, "level": levels, "latitude": lat, "longitude": lon},
    )
    return ds


def readers(cube: xr.Dataset, data) -> list[tuple[str, int, object]]:
    """(name, n_samples, read(indices)) for each way of reading samples.

    `dataset.Samples` loads a cube under 4 GiB into memory when it opens, so it is timed next to
    reading each sample's three time steps straight from the zarr store, which is what a store
    too large for memory costs.
    """
    out = []
    try:
        from aurora_sweep.dataset import Samples
    except ImportError as e:
        print(f"aurora_sweep.dataset.Samples is not importable ({e}); reading raw arrays only")
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            samples = Samples(cube, data, "train")
        out.append(("dataset.Samples.batch", len(samples), samples.batch))

    def read(indices):
        return [cube.isel(time=[t, t + 1, t + 2]).load() for t in indices]

    out.append(("zarr store, per sample (t-1, t, t+1)", cube.sizes["time"] - 2, read))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weeks", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="time budget per batch size")
    args = parser.parse_args()

    config = load_config(ROOT / "sweep" / "europe-tp.toml", workdir=ROOT)
    start = dt.date(2022, 1, 1)
    end = start + dt.timedelta(days=7 * args.weeks - 1)
    data = dataclasses.replace(
        config.data,
        period=Period(start, end),
        train=Period(start, end),
        validation=Period(end + dt.timedelta(days=1), end + dt.timedelta(days=1)),
        test=Period(end + dt.timedelta(days=2), end + dt.timedelta(days=2)),
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = store.write_store(synthetic_cube(data, args.weeks), Path(tmp) / "store.zarr")
        build_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        cube = store.open_store(path)
        t0 = time.perf_counter()
        ways = readers(cube, data)
        open_s = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        rows = []
        for name, n, read in ways:
            for batch_size in (1, 2, 4, 8):
                read(list(rng.integers(0, n, batch_size)))  # warm up
                done, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < args.seconds:
                    read(list(rng.integers(0, n, batch_size)))
                    done += batch_size
                elapsed = time.perf_counter() - t0
                rows.append({"reader": name, "batch_size": batch_size, "samples": done,
                             "seconds": round(elapsed, 3),
                             "samples_per_s": round(done / elapsed, 2)})  # fmt: skip

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"loader, Europe 0.25° ({cube.sizes['latitude']}x"
                        f"{cube.sizes['longitude']}), levels {list(data.levels)}")  # fmt: skip
    table.add_column("reader")
    for col in ("batch size", "samples", "seconds", "samples/s"):
        table.add_column(col, justify="right")
    for r in rows:
        keys = ("reader", "batch_size", "samples", "seconds", "samples_per_s")
        table.add_row(*(str(r[k]) for k in keys))
    Console().print(table)
    result = {
        "date": dt.date.today().isoformat(),
        "grid": [cube.sizes["latitude"], cube.sizes["longitude"]],
        "levels": list(data.levels),
        "times": cube.sizes["time"],
        "store_bytes": size,
        "build_store_s": round(build_s, 2),
        "open_samples_s": round(open_s, 2),
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "results": rows,
    }
    out = ROOT / "bench" / "results" / f"loader-cpu-{dt.date.today():%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
