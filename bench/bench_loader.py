"""How fast can samples be read from a local store? (Europe, 0.25°, the europe-tp config)

Training on real ERA5 must not wait on the loader: a step of AuroraSmall takes about a second on
a GPU, so the loader should give many samples a second. This builds a synthetic store with the
Europe study's shape (149 x 209 points, its levels, a few weeks of 6-hourly times) twice in a
temporary folder: in today's layout (`store.write_store`: uncompressed, four times per chunk)
and in the layout stores had before (Blosc-LZ4, four times per chunk). Then it times batches of
1, 2, 4 and 8 samples:

- the baseline: the per-sample reader stores had before (xarray `isel` of a sample's three times
  and `load`, on the LZ4 store), kept so that every run measures its own ratio;
- `Samples.batch` reading lazily, as a store too large for memory is read: straight from the
  chunk files (`StoreReader`) on today's store, and through zarr on the LZ4 one;
- `Samples.batch` with the cube in memory.

Prints a table (with each reader's ratio to the baseline at the same batch size) and saves JSON
to bench/results/loader-cpu-<date>.json.

    PYTHONPATH=src .venv/bin/python bench/bench_loader.py [--weeks 3] [--seconds 5]
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

from aurora_sweep.config.study import Period
from aurora_sweep.config.study_file import load_config
from aurora_sweep.data import store

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


def write_lz4_store(cube: xr.Dataset, path: Path) -> Path:
    """The layout stores had before: Blosc-LZ4 (zarr's default), four times per chunk."""
    encoding = {
        name: {"chunks": tuple(min(4, n) if d == "time" else n for d, n in zip(v.dims, v.shape))}
        for name, v in cube.data_vars.items()
    }
    cube.to_zarr(path, mode="w", encoding=encoding, consolidated=True, zarr_format=2)
    return path


def readers(raw: xr.Dataset, lz4: xr.Dataset, data) -> list[tuple[str, int, object]]:
    """(name, n_samples, read(indices)) for each way of reading samples; the first is the
    baseline."""
    import warnings

    from aurora_sweep.data.samples import Samples

    def before(indices):
        return [lz4.isel(time=[t, t + 1, t + 2]).load() for t in indices]

    out = [("baseline: xarray per sample, LZ4 store", lz4.sizes["time"] - 2, before)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the box crosses 0°: Aurora's longitudes are shifted
        lazy = Samples(raw, data, "train", in_memory=False)
        lazy_lz4 = Samples(lz4, data, "train", in_memory=False)
        memory = Samples(raw, data, "train", in_memory=True)
    assert lazy._reader.raw and not lazy_lz4._reader.raw
    out.append(("Samples.batch, lazy, raw chunk files", len(lazy), lazy.batch))
    out.append(("Samples.batch, lazy, through zarr (LZ4 store)", len(lazy_lz4), lazy_lz4.batch))
    out.append(("Samples.batch, in memory", len(memory), memory.batch))
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
        synthetic = synthetic_cube(data, args.weeks)
        t0 = time.perf_counter()
        path = store.write_store(synthetic, Path(tmp) / "store.zarr")
        build_s = time.perf_counter() - t0
        lz4_path = write_lz4_store(synthetic, Path(tmp) / "lz4.zarr")
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        lz4_size = sum(f.stat().st_size for f in lz4_path.rglob("*") if f.is_file())
        cube = store.open_store(path)
        t0 = time.perf_counter()
        ways = readers(cube, store.open_store(lz4_path), data)
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
        base = {r["batch_size"]: r["samples_per_s"] for r in rows if r["reader"] == ways[0][0]}
        for r in rows:
            r["ratio_to_baseline"] = round(r["samples_per_s"] / base[r["batch_size"]], 2)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"loader, Europe 0.25° ({cube.sizes['latitude']}x"
                        f"{cube.sizes['longitude']}), levels {list(data.levels)}")  # fmt: skip
    table.add_column("reader")
    for col in ("batch size", "samples", "seconds", "samples/s", "× baseline"):
        table.add_column(col, justify="right")
    for r in rows:
        keys = ("reader", "batch_size", "samples", "seconds", "samples_per_s", "ratio_to_baseline")
        table.add_row(*(str(r[k]) for k in keys))
    Console().print(table)
    result = {
        "date": dt.date.today().isoformat(),
        "grid": [cube.sizes["latitude"], cube.sizes["longitude"]],
        "levels": list(data.levels),
        "times": cube.sizes["time"],
        "store_bytes": size,
        "lz4_store_bytes": lz4_size,
        "command": "PYTHONPATH=src .venv/bin/python bench/bench_loader.py "
        f"--weeks {args.weeks} --seconds {args.seconds}",
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
