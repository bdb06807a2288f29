"""ERA5 from the CDS: planning, reading what the CDS returns, tp totals, resume and errors.

No test touches the network: the cdsapi client is replaced by `FakeCDS`, which writes files in
the CDS layout. Real CDS files are read from ../shared/cds-real where that folder exists.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import xarray as xr
from typer.testing import CliRunner

from aurora_sweep.cli.data import data_app
from aurora_sweep.config.recipe import AURORA_LEVELS
from aurora_sweep.config.study import Region
from aurora_sweep.config.study_file import load_config
from aurora_sweep.data import era5, store
from aurora_sweep.errors import AuroraSweepError
from era5_fixtures import (
    FakeCDS,
    cds_dataset,
    request_dataset,
    study_config,
    tp_metres,
    write_netcdf,
    write_study_files,
    write_zip,
)

REPO = Path(__file__).parents[1]
CDS_REAL = Path(__file__).parents[2] / "shared" / "cds-real"
needs_real = pytest.mark.skipif(not CDS_REAL.is_dir(), reason="../shared/cds-real is absent")


def _times(start: str, n: int, step_h: int = 1) -> np.ndarray:
    return np.datetime64(start, "s") + np.arange(n) * np.timedelta64(step_h, "h")


def _field(values: np.ndarray, ny: int = 2, nx: int = 3) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    shape = values.shape + (ny, nx)
    return np.broadcast_to(values.reshape(values.shape + (1, 1)), shape).copy()


def _instant_files(config, folder: Path) -> list[Path]:
    """The planned files except tp, so a test can supply its own tp."""
    return [p for p in write_study_files(config, folder) if not p.name.startswith("tp-")]


def _grid(config):
    r = config.data.region
    g = config.data.grid
    return np.arange(r.north, r.south - g / 2, -g), np.arange(r.west, r.east + g / 2, g)


# ------------------------------------------------------------------------------------------
# Planning


def test_plan_asks_tp_every_hour_from_the_day_before_the_period(tmp_path):
    config = study_config(tmp_path, start=dt.date(2022, 1, 1), days=3)
    tp = [r for r in era5.plan_requests(config) if "total_precipitation" in r.request["variable"]]
    assert [r.target for r in tp] == ["tp-2021-12.nc", "tp-2022-01.nc"]
    assert tp[0].request["day"] == ["31"] and tp[0].request["month"] == ["12"]
    assert all(r.request["time"] == [f"{h:02d}:00" for h in range(24)] for r in tp)


def test_plan_requests_model_hours_reanalysis_netcdf_unarchived_area_and_grid(tmp_path):
    config = study_config(tmp_path, north=72, south=35, west=-12, east=40, grid=0.25)
    plan = era5.plan_requests(config)
    for r in plan:
        assert r.request["data_format"] == "netcdf"
        assert r.request["download_format"] == "unarchived"
        assert r.request["product_type"] == ["reanalysis"]
        assert r.request["area"] == [72, -12, 35, 40]
        assert r.request["grid"] == [0.25, 0.25]
    sfc = next(r for r in plan if r.target.startswith("sfc-"))
    assert sfc.dataset == era5.SINGLE_LEVELS
    assert sfc.request["time"] == ["00:00", "06:00", "12:00", "18:00"]
    assert set(sfc.request["variable"]) == set(era5.SURFACE_REQUEST)
    pl = next(r for r in plan if r.target.startswith("pl-"))
    assert pl.dataset == era5.PRESSURE_LEVELS
    assert pl.request["pressure_level"] == ["500", "850"]
    static = [r for r in plan if r.target == "static.nc"]
    assert len(static) == 1 and set(static[0].request["variable"]) == set(era5.STATIC_REQUEST)


def test_plan_splits_a_month_into_day_ranges_when_many_levels(tmp_path):
    config = study_config(tmp_path, levels=AURORA_LEVELS, days=31)
    pl = [
        r for r in era5.plan_requests(config, max_fields=3000) if r.dataset == era5.PRESSURE_LEVELS
    ]
    assert len(pl) > 1
    assert all(r.fields <= 3000 for r in pl)
    days = [d for r in pl for d in r.request["day"]]
    assert days == [f"{d:02d}" for d in range(1, 32)]  # every day once, in order
    assert len({r.target for r in pl}) == len(pl)


def test_plan_chunks_by_month(tmp_path):
    config = study_config(tmp_path, start=dt.date(2022, 1, 30), days=5)
    names = [r.target for r in era5.plan_requests(config)]
    assert {"sfc-2022-01.nc", "sfc-2022-02.nc", "pl-2022-01.nc", "pl-2022-02.nc"} <= set(names)


def test_estimate_grows_with_levels_and_region(tmp_path):
    small = era5.estimate_download(study_config(tmp_path, levels=(500,), name="a"))
    big = era5.estimate_download(study_config(tmp_path, levels=(250, 500, 850), name="b"))
    assert big.download_bytes > small.download_bytes > 0
    assert big.store_bytes > small.store_bytes


def test_request_area_wraps_a_west_given_in_0_360():
    assert era5.request_area(Region(72, 35, 348, 40)) == [72, -12, 35, 40]


# ------------------------------------------------------------------------------------------
# tp accumulation


def test_tp_total_is_sum_of_six_hourly_values_ending_at_time(tmp_path):
    config = study_config(tmp_path, days=3)
    files = _instant_files(config, tmp_path / "in")
    lat, lon = _grid(config)
    hours = _times("2021-12-31T19:00", 5 + 24 * 3)  # 19 UTC the day before .. 2022-01-03 23 UTC
    mm = np.arange(1, hours.size + 1, dtype=np.float64)  # 1 mm, 2 mm, 3 mm, ... per hour
    tp = cds_dataset({"tp": _field(mm / 1000, lat.size, lon.size)}, times=hours, lat=lat, lon=lon)
    files.append(write_netcdf(tp, tmp_path / "in" / "tp.nc"))
    cube = store.open_store(era5.import_files(files, config.data, progress=False))
    got = cube["tp"].isel(latitude=0, longitude=0).values
    # 2022-01-01 00 UTC: hours 19, 20, 21, 22, 23, 00 -> 1+2+3+4+5+6 mm; 06 UTC: 7+...+12 mm.
    assert got[0] == pytest.approx(21.0, rel=1e-5)
    assert got[1] == pytest.approx(57.0, rel=1e-5)
    assert got[2] == pytest.approx(13 + 14 + 15 + 16 + 17 + 18, rel=1e-5)
    assert cube["tp"].attrs["units"] == "mm"


def test_tp_total_is_nan_when_one_of_its_six_hours_is_missing(tmp_path):
    config = study_config(tmp_path, days=3)
    files = _instant_files(config, tmp_path / "in")
    lat, lon = _grid(config)
    hours = _times("2021-12-31T19:00", 5 + 24 * 3)
    keep = hours != np.datetime64("2022-01-01T09:00")  # inside the window ending at 12 UTC
    tp = cds_dataset(
        {"tp": _field(tp_metres(hours[keep]), lat.size, lon.size)},
        times=hours[keep],
        lat=lat,
        lon=lon,
    )
    files.append(write_netcdf(tp, tmp_path / "in" / "tp.nc"))
    cube = store.open_store(era5.import_files(files, config.data, progress=False))
    series = cube["tp"].isel(latitude=0, longitude=0).to_series()
    assert np.isnan(series[np.datetime64("2022-01-01T12:00")])
    assert np.isfinite(series[np.datetime64("2022-01-01T06:00")])
    assert np.isfinite(series[np.datetime64("2022-01-01T18:00")])


def test_six_hourly_tp_samples_are_refused_for_accumulation(tmp_path):
    config = study_config(tmp_path, days=3)
    files = _instant_files(config, tmp_path / "in")
    lat, lon = _grid(config)
    six = _times("2021-12-31T18:00", 4 * 4, step_h=6)
    tp = cds_dataset(
        {"tp": _field(tp_metres(six), lat.size, lon.size)}, times=six, lat=lat, lon=lon
    )
    files.append(write_netcdf(tp, tmp_path / "in" / "tp.nc"))
    with pytest.raises(AuroraSweepError, match="not every hour"):
        era5.import_files(files, config.data, progress=False)
    assert not config.data.store.exists()


def test_tp_without_the_hours_before_the_first_model_time_gives_nan_there(tmp_path):
    config = study_config(tmp_path, days=3)
    files = [p for p in write_study_files(config, tmp_path / "in") if p.name != "tp-2021-12.nc"]
    cube = store.open_store(era5.import_files(files, config.data, progress=False))
    tp = cube["tp"].isel(latitude=0, longitude=0).values
    assert np.isnan(tp[0]) and np.all(np.isfinite(tp[1:]))


# ------------------------------------------------------------------------------------------
# The other targets: each kind's time semantics through the import (`targets.TARGETS`)


def _target_import(tmp_path, target: str, parts: dict[str, np.ndarray], hours: np.ndarray):
    """The store of a 3-day study whose [model] target is `target`, imported from the study's
    instantaneous files and hand-made files of `parts` (short name -> value per hour, in
    ERA5's units, at `hours`)."""
    import dataclasses

    config = study_config(tmp_path, days=3)
    data = dataclasses.replace(config.data, target=target)
    files = _instant_files(config, tmp_path / "in")
    lat, lon = _grid(config)
    for short, values in parts.items():
        ds = cds_dataset({short: _field(values, lat.size, lon.size)}, times=hours, lat=lat, lon=lon)
        files.append(write_netcdf(ds, tmp_path / "in" / f"{short}.nc"))
    return store.open_store(era5.import_files(files, data, progress=False))


def test_runoff_is_the_sum_of_the_six_hours_ending_at_the_model_time(tmp_path):
    hours = _times("2021-12-31T19:00", 5 + 24 * 3)
    mm = np.arange(1, hours.size + 1, dtype=np.float64)  # 1, 2, 3 ... mm of water an hour
    cube = _target_import(tmp_path, "ro", {"ro": mm / 1000}, hours)
    got = cube["ro"].isel(latitude=0, longitude=0).values
    assert got[0] == pytest.approx(1 + 2 + 3 + 4 + 5 + 6, rel=1e-5)  # 19 .. 00 UTC
    assert got[1] == pytest.approx(7 + 8 + 9 + 10 + 11 + 12, rel=1e-5)
    assert cube["ro"].attrs["units"] == "kg m-2" and "tp" not in cube


def test_a_mean_precipitation_rate_is_the_mean_of_the_six_hours_per_hour(tmp_path):
    hours = _times("2021-12-31T19:00", 5 + 24 * 3)
    mm = np.arange(1, hours.size + 1, dtype=np.float64)
    cube = _target_import(tmp_path, "pr", {"tp": mm / 1000}, hours)
    got = cube["pr"].isel(latitude=0, longitude=0).values
    assert got[0] == pytest.approx((1 + 2 + 3 + 4 + 5 + 6) / 6, rel=1e-5)  # mm h-1
    assert got[2] == pytest.approx((13 + 14 + 15 + 16 + 17 + 18) / 6, rel=1e-5)
    assert cube["pr"].attrs["units"] == "mm h-1"


def test_a_rain_rate_is_the_convective_and_large_scale_rates_at_the_model_time(tmp_path):
    hours = _times("2022-01-01T00:00", 24 * 3)  # hourly files: only the model times count
    h = np.arange(hours.size, dtype=np.float64)
    cube = _target_import(tmp_path, "rain_rate", {"crr": 1e-4 * h, "lsrr": 1e-5 * h}, hours)
    got = cube["rain_rate"].isel(latitude=0, longitude=0)
    for k, t in enumerate(got["time"].values[:4]):
        i = int((t - hours[0]) // np.timedelta64(1, "h"))  # hour i of the files
        assert got.values[k] == pytest.approx(3600 * (1e-4 + 1e-5) * i, rel=1e-5, abs=1e-6)


def test_snowfall_sampled_every_6_hours_is_refused_in_one_line(tmp_path):
    six = _times("2021-12-31T18:00", 4 * 4, step_h=6)
    with pytest.raises(
        AuroraSweepError, match=r"sf is sampled every 0 days 06:00:00, not every"
    ) as e:
        _target_import(tmp_path, "sf", {"sf": np.ones(six.size) * 1e-3}, six)
    assert "request snowfall at every hour" in str(e.value) and "\n" not in str(e.value)


def test_the_plan_asks_for_each_target_as_its_time_semantics_need(tmp_path):
    import dataclasses

    config = study_config(tmp_path, start=dt.date(2022, 1, 1), days=3)
    for target, hourly, names in (("ro", True, ["runoff"]), ("pr", True, ["total_precipitation"]),
                                  ("rain_rate", False, ["convective_rain_rate",
                                                        "large_scale_rain_rate"])):  # fmt: skip
        study = dataclasses.replace(config, data=dataclasses.replace(config.data, target=target))
        plan = era5.plan_requests(study)
        asked = [r for r in plan if set(names) <= set(r.request["variable"])]
        assert asked, target
        if hourly:  # every hour, from the day before, in files of its own
            assert [r.target for r in asked] == [f"{target}-2021-12.nc", f"{target}-2022-01.nc"]
            assert len(asked[0].request["time"]) == 24
        else:  # with the surface variables, at the model times
            assert all(r.target.startswith("sfc-") for r in asked)
            assert asked[0].request["time"] == ["00:00", "06:00", "12:00", "18:00"]
        assert not any("total_precipitation" in r.request["variable"] for r in plan
                       if target != "pr")  # fmt: skip


# ------------------------------------------------------------------------------------------
# Layouts, regions, levels, expver


def test_final_era5_wins_over_era5t_for_the_same_time(tmp_path):
    config = study_config(tmp_path, days=3)
    folder = tmp_path / "in"
    files = write_study_files(config, folder)
    sfc = xr.open_dataset(folder / "sfc-2022-01.nc").load()
    # An ERA5T copy of the same month with different values, and a file that mixes both.
    t5 = sfc.copy(deep=True)
    t5["t2m"] = t5["t2m"] + 100.0
    t5 = t5.assign_coords(expver=("valid_time", np.full(t5.sizes["valid_time"], "0005", object)))
    files.append(write_netcdf(t5, folder / "sfc-2022-01-era5t.nc"))
    mixed = sfc.isel(valid_time=slice(0, 4)).copy(deep=True)
    mixed["t2m"] = mixed["t2m"] - 50.0
    mixed = mixed.assign_coords(
        expver=("valid_time", np.array(["0005", "0005", "0005", "0005"], object))
    )
    files.append(write_netcdf(mixed, folder / "aaa-mixed.nc"))
    cube = store.open_store(era5.import_files(files[::-1], config.data, progress=False))
    expected = sfc["t2m"].values
    np.testing.assert_allclose(cube["2t"].values, expected, rtol=1e-6)


def test_era5t_fills_times_the_final_release_does_not_have(tmp_path):
    config = study_config(tmp_path, days=3)
    folder = tmp_path / "in"
    files = write_study_files(config, folder)
    sfc = xr.open_dataset(folder / "sfc-2022-01.nc").load()
    last = sfc.sizes["valid_time"] - 4
    final = sfc.isel(valid_time=slice(0, last))
    era5t = sfc.isel(valid_time=slice(last, None)).copy(deep=True)
    era5t = era5t.assign_coords(expver=("valid_time", np.full(4, "0005", object)))
    (folder / "sfc-2022-01.nc").unlink()
    write_netcdf(final, folder / "sfc-final.nc")
    write_netcdf(era5t, folder / "sfc-era5t.nc")
    files = sorted(folder.iterdir())
    cube = store.open_store(era5.import_files(files, config.data, progress=False))
    assert cube.sizes["time"] == 12
    np.testing.assert_allclose(cube["2t"].values, sfc["t2m"].values, rtol=1e-6)


def test_box_crossing_zero_keeps_west_negative_from_a_global_0_360_grid(tmp_path):
    config = study_config(tmp_path, north=72, south=35, west=-12, east=40, grid=2.0, days=3)

    def to_global(name: str, ds: xr.Dataset) -> xr.Dataset:
        lon = np.arange(0.0, 360.0, 2.0)  # what a global request returns
        lat = np.arange(90.0, -90.1, -2.0)
        full = ds.reindex(latitude=lat, longitude=np.where(lon > 180, lon - 360, lon),
                          method="nearest")  # fmt: skip
        return full.assign_coords(longitude=lon)

    files = write_study_files(config, tmp_path / "in", edit=to_global)
    cube = store.open_store(era5.import_files(files, config.data, progress=False))
    lon = cube["longitude"].values
    assert lon[0] == -12.0 and lon[-1] == 40.0 and np.all(np.diff(lon) == 2.0)
    assert cube["latitude"].values[0] == 72.0 and cube["latitude"].values[-1] == 36.0


def test_box_crossing_zero_downloaded_as_cds_regional_files(tmp_path):
    config = study_config(tmp_path, north=72, south=35, west=-12, east=40, grid=1.0, days=3)
    fake = FakeCDS(config)
    cube = store.open_store(era5.download(config, client_factory=fake, progress=False, backoff=0))
    assert cube["longitude"].values[0] == -12 and cube["longitude"].values[-1] == 40
    assert 0.0 in cube["longitude"].values
    assert cube.sizes == {"time": 12, "level": 2, "latitude": 38, "longitude": 53}


def test_western_hemisphere_box_keeps_negative_longitudes(tmp_path):
    config = study_config(tmp_path, north=55, south=24, west=-126, east=-66, grid=2.0, days=3)
    files = write_study_files(config, tmp_path / "in")
    cube = store.open_store(era5.import_files(files, config.data, progress=False))
    lon = cube["longitude"].values
    assert lon[0] == -126 and lon[-1] == -66 and np.all(np.diff(lon) > 0)


def test_region_indices_give_the_same_box_from_0_360_and_minus_180_180():
    region = Region(north=72, south=35, west=-12, east=40)
    lat = np.arange(90.0, -90.1, -1.0)
    _, _, _, from_360 = era5.region_indices(lat, np.arange(0.0, 360.0, 1.0), region)
    _, _, _, from_180 = era5.region_indices(lat, np.arange(-180.0, 180.0, 1.0), region)
    np.testing.assert_array_equal(from_360, np.arange(-12.0, 40.1, 1.0))
    np.testing.assert_array_equal(from_180, from_360)


def test_region_crossing_180_is_contiguous_and_increasing():
    region = Region(north=10, south=-10, west=170, east=-170)
    _, lon_idx, _, lon = era5.region_indices(np.array([0.0]), np.arange(-180.0, 180.0, 5.0), region)
    np.testing.assert_array_equal(lon, [170, 175, 180, 185, 190])


def test_single_level_study_at_500_hpa(tmp_path):
    config = study_config(tmp_path, levels=(500,), days=3)
    files = write_study_files(config, tmp_path / "in")
    cube = store.open_store(era5.import_files(files, config.data, progress=False))
    assert cube["level"].values.tolist() == [500]
    assert cube["z"].dims == ("time", "level", "latitude", "longitude")


def test_levels_come_out_ascending_from_a_descending_file(tmp_path):
    config = study_config(tmp_path, levels=(850, 250, 500), days=3)
    files = write_study_files(config, tmp_path / "in")
    cube = store.open_store(era5.import_files(files, config.data, progress=False))
    assert cube["level"].values.tolist() == [250, 500, 850]
    z = cube["z"].isel(time=0, latitude=0, longitude=0).values
    assert z[0] < z[1] < z[2]  # the fixture adds level*0.01: each level landed where it belongs


def test_overlapping_months_in_any_order_give_the_same_store(tmp_path):
    config = study_config(tmp_path, start=dt.date(2022, 1, 30), days=4)
    files = write_study_files(config, tmp_path / "in")
    # A second copy of February's surface file, overlapping the first.
    shutil.copy(tmp_path / "in" / "sfc-2022-02.nc", tmp_path / "in" / "again.nc")
    a = store.open_store(era5.import_files(files, config.data, progress=False)).load()
    shuffled = [files[i] for i in np.random.default_rng(0).permutation(len(files))]
    b = store.open_store(
        era5.import_files([*shuffled, tmp_path / "in" / "again.nc"], config.data, progress=False)
    ).load()
    xr.testing.assert_identical(a, b)
    assert a.sizes["time"] == 16


def test_zip_under_a_nc_name_with_a_max_member_is_read(tmp_path):
    config = study_config(tmp_path, days=3)
    folder = tmp_path / "in"
    files = write_study_files(config, folder)
    sfc = xr.open_dataset(folder / "sfc-2022-01.nc").load()
    tp = xr.open_dataset(folder / "tp-2022-01.nc").load()
    mx = sfc[["t2m"]].rename(t2m="mx2t")
    mx["mx2t"].attrs["GRIB_stepType"] = "max"
    write_zip(
        {
            "data_stream-oper_stepType-instant.nc": sfc,
            "data_stream-oper_stepType-accum.nc": tp,
            "data_stream-oper_stepType-max.nc": mx,
        },
        folder / "download.nc",
        tmp_path,
    )
    (folder / "sfc-2022-01.nc").unlink()
    (folder / "tp-2022-01.nc").unlink()
    merged = era5.read_cds_file(folder / "download.nc")
    assert {"2t", "10u", "10v", "msl", "tp"} <= set(merged.data_vars)
    assert "mx2t" not in merged.data_vars
    files = sorted(folder.iterdir())
    cube = store.open_store(era5.import_files(files, config.data, progress=False))
    assert np.isfinite(cube["tp"].values).all()


def test_read_cds_file_normalises_valid_time_pressure_level_and_expver(tmp_path):
    ds = request_dataset(
        era5.PRESSURE_LEVELS,
        {"area": [50, -2, 48, 0], "grid": [1, 1], "year": ["2022"], "month": ["01"],
         "day": ["01"], "time": ["00:00", "06:00"], "variable": ["temperature"],
         "pressure_level": ["500", "850"]},
    )  # fmt: skip
    path = write_netcdf(ds, tmp_path / "pl.nc")
    raw = xr.open_dataset(path)
    assert raw["valid_time"].encoding["dtype"] == np.int64
    assert raw["pressure_level"].values.tolist() == [850.0, 500.0]
    out = era5.read_cds_file(path)
    assert set(out["t"].dims) == {"time", "level", "latitude", "longitude"}
    assert out["level"].dtype.kind == "i" and out["expver"].values.tolist() == ["0001", "0001"]
    assert "number" not in out.coords


# ------------------------------------------------------------------------------------------
# Clear errors for what the user can fix


def test_missing_variable_is_one_clear_error(tmp_path):
    config = study_config(tmp_path, days=3)
    files = [p for p in write_study_files(config, tmp_path / "in") if not p.name.startswith("sfc-")]
    with pytest.raises(AuroraSweepError, match=r"lack 2t.*reanalysis-era5-single-levels"):
        era5.import_files(files, config.data, progress=False)


def test_missing_level_is_one_clear_error(tmp_path):
    files = write_study_files(study_config(tmp_path, levels=(500,), name="a"), tmp_path / "in")
    config = study_config(tmp_path, levels=(500, 850), name="b")
    with pytest.raises(AuroraSweepError, match=r"z at 850 hPa.*reanalysis-era5-pressure-levels"):
        era5.import_files(files, config.data, progress=False)


def test_region_outside_the_files_is_one_clear_error(tmp_path):
    files = write_study_files(study_config(tmp_path, name="a"), tmp_path / "in")
    config = study_config(tmp_path, north=20, south=10, west=100, east=110, name="b")
    with pytest.raises(AuroraSweepError, match="no grid points in the region"):
        era5.import_files(files, config.data, progress=False)


def test_period_outside_the_files_is_one_clear_error(tmp_path):
    files = write_study_files(study_config(tmp_path, name="a"), tmp_path / "in")
    config = study_config(tmp_path, start=dt.date(2023, 6, 1), name="b")
    with pytest.raises(AuroraSweepError, match="no model time of the period 2023-06-01"):
        era5.import_files(files, config.data, progress=False)


def test_grid_spacing_other_than_configured_is_refused(tmp_path):
    files = write_study_files(study_config(tmp_path, grid=1.0, name="a"), tmp_path / "in")
    config = study_config(tmp_path, grid=0.25, name="b")
    with pytest.raises(AuroraSweepError, match="spacing is 1° but \\[data\\] grid is 0.25°"):
        era5.import_files(files, config.data, progress=False)


def test_grib_and_garbage_files_are_refused_clearly(tmp_path):
    (tmp_path / "a.nc").write_bytes(b"GRIB\x00\x00\x01")
    (tmp_path / "b.nc").write_bytes(b"<html>502 Bad Gateway</html>")
    with pytest.raises(AuroraSweepError, match="GRIB: request data_format 'netcdf'"):
        era5.read_cds_file(tmp_path / "a.nc")
    with pytest.raises(era5.CorruptFileError, match="truncated or corrupt"):
        era5.read_cds_file(tmp_path / "b.nc")


# ------------------------------------------------------------------------------------------
# Download: resume, retries, failures


def test_download_resumes_after_interruption_without_refetching_finished_chunks(tmp_path):
    config = study_config(tmp_path, days=3)
    n = len(era5.plan_requests(config))
    first = FakeCDS(config, fail_after=2)
    with pytest.raises(AuroraSweepError, match="cannot reach the CDS"):
        era5.download(config, client_factory=first, max_workers=1, progress=False, retries=0)
    folder = era5.download_folder(config.data)
    done = set(era5.load_manifest(folder))
    assert done == set(first.written) and len(done) == 2
    assert not list(folder.glob("*.partial"))
    assert not config.data.store.exists()

    second = FakeCDS(config)
    era5.download(config, client_factory=second, max_workers=2, progress=False, backoff=0)
    assert set(second.calls).isdisjoint(done)
    assert len(second.calls) == n - 2
    assert set(era5.load_manifest(folder)) == {r.target for r in era5.plan_requests(config)}
    assert store.open_store(config.data.store).sizes["time"] == 12

    third = FakeCDS(config)
    era5.download(config, client_factory=third, progress=False)
    assert third.calls == []


def test_a_partial_file_never_counts_as_done(tmp_path):
    config = study_config(tmp_path, days=3)
    folder = era5.download_folder(config.data)
    folder.mkdir(parents=True)
    (folder / "sfc-2022-01.nc.partial").write_bytes(b"\x89HDF half")
    # A file without a manifest entry is not trusted either.
    (folder / "pl-2022-01.nc").write_bytes(b"\x89HDF junk")
    fake = FakeCDS(config)
    era5.download(config, client_factory=fake, progress=False)
    assert {"sfc-2022-01.nc", "pl-2022-01.nc"} <= set(fake.calls)
    assert not list(folder.glob("*.partial"))


def test_a_changed_request_is_fetched_again(tmp_path):
    config = study_config(tmp_path, levels=(500,), days=3)
    era5.download(config, client_factory=FakeCDS(config), progress=False)
    changed = study_config(tmp_path, levels=(500, 850), days=3)
    fake = FakeCDS(changed)
    era5.download(changed, client_factory=fake, progress=False)
    assert fake.calls == ["pl-2022-01.nc"]


def test_transient_failures_are_retried_with_backoff(tmp_path):
    config = study_config(tmp_path, days=3)
    fake = FakeCDS(config, flaky=3)
    era5.download(config, client_factory=fake, max_workers=1, progress=False, backoff=0)
    assert len(fake.calls) == len(era5.plan_requests(config)) + 3


def test_truncated_download_is_retried_and_never_kept(tmp_path):
    config = study_config(tmp_path, days=3)
    fake = FakeCDS(config, truncate=["pl-2022-01.nc"])
    era5.download(config, client_factory=fake, max_workers=1, progress=False, backoff=0)
    assert fake.calls.count("pl-2022-01.nc") == 2


def test_corrupt_chunk_is_removed_from_the_manifest_and_fetched_again(tmp_path):
    config = study_config(tmp_path, days=3)
    era5.download(config, client_factory=FakeCDS(config), progress=False)
    folder = era5.download_folder(config.data)
    manifest = json.loads((folder / "manifest.json").read_text())
    # The file is damaged on disk after the download, keeping its size.
    path = folder / "sfc-2022-01.nc"
    size = path.stat().st_size
    path.write_bytes(b"\x00" * size)
    with pytest.raises(AuroraSweepError, match="sfc-2022-01.nc was truncated or corrupt.*again"):
        era5.download(config, client_factory=FakeCDS(config), progress=False)
    assert "sfc-2022-01.nc" not in era5.load_manifest(folder)
    assert "sfc-2022-01.nc" in manifest["chunks"]
    fake = FakeCDS(config)
    era5.download(config, client_factory=fake, progress=False)
    assert fake.calls == ["sfc-2022-01.nc"]


def _no_client():
    raise Exception("Missing/incomplete configuration file: /root/.cdsapirc")


def test_missing_credentials_say_what_cdsapirc_holds(tmp_path):
    config = study_config(tmp_path, days=3)
    with pytest.raises(AuroraSweepError) as e:
        era5.download(config, client_factory=_no_client, progress=False)
    msg = str(e.value)
    assert "~/.cdsapirc" in msg and "url: https://cds.climate.copernicus.eu/api" in msg
    assert "key: <your-personal-access-token>" in msg and "CDSAPI_KEY" in msg


class _Response:
    def __init__(self, status: int):
        self.status_code = status


def _http(status: int, text: str) -> requests.HTTPError:
    return requests.HTTPError(text, response=_Response(status))


@pytest.mark.parametrize(
    ("exc", "pattern"),
    [
        (
            _http(403, "403 Client Error: required licences not accepted"),
            r"accept the licence at https://cds.climate.copernicus.eu/datasets/"
            r"reanalysis-era5-\w+-levels\?tab=download",
        ),
        (_http(400, "cost limits exceeded: your request is too large"), "split it smaller"),
        (
            requests.ConnectionError("Max retries exceeded: Name or service not known"),
            "cannot reach the CDS",
        ),
        (_http(401, "401 Client Error: invalid key"), "refused your key"),
    ],
)
def test_cds_refusals_become_one_clear_error_and_keep_nothing_half_written(tmp_path, exc, pattern):
    config = study_config(tmp_path, days=3)
    fake = FakeCDS(config, fail_after=0, fail_with=exc)
    with pytest.raises(AuroraSweepError, match=pattern):
        era5.download(config, client_factory=fake, progress=False, retries=1, backoff=0)
    folder = era5.download_folder(config.data)
    assert not list(folder.glob("*.partial")) and not config.data.store.exists()


DNS_FAILURE = (
    "HTTPSConnectionPool(host='cds.climate.copernicus.eu', port=443): Max retries exceeded with "
    "url: /api/retrieve/v1/processes/reanalysis-era5-single-levels/execution (Caused by "
    'NameResolutionError("<urllib3.connection.HTTPSConnection object>: Failed to resolve '
    "'cds.climate.copernicus.eu' ([Errno -3] Temporary failure in name resolution)\"))"
)


def test_a_name_that_does_not_resolve_is_said_at_once_not_retried(tmp_path):
    config = study_config(tmp_path, days=3)
    fake = FakeCDS(config, fail_after=0, fail_with=requests.ConnectionError(DNS_FAILURE))
    started = time.monotonic()
    with pytest.raises(AuroraSweepError) as e:
        era5.download(config, client_factory=fake, progress=False, retries=5, backoff=30)
    assert time.monotonic() - started < 10  # not five backoffs of 30 s and more
    message = str(e.value)
    assert "cds.climate.copernicus.eu does not resolve" in message and "HTTPS_PROXY" in message
    assert "\n" not in message and "Traceback" not in message


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


@pytest.mark.parametrize("retries", ["0", "5"])
def test_cli_download_from_an_unreachable_cds_is_one_line_within_a_minute(
    tmp_path, monkeypatch, retries
):
    """The real cdsapi client against a closed loopback port: the CDS is found unreachable
    before the client's own retry loop (500 tries, two minutes apart, held to --retries) starts,
    and what the client prints is kept off the terminal."""
    config = study_config(tmp_path, days=3)
    monkeypatch.setenv("CDSAPI_URL", f"http://127.0.0.1:{_closed_port()}/api")
    monkeypatch.setenv("CDSAPI_KEY", "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b")
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    result = CliRunner().invoke(
        data_app, ["download", "-c", str(config.path), "--no-progress", "--retries", retries]
    )
    assert time.monotonic() - started < 60
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "cannot reach the CDS at 127.0.0.1 (Connection refused)" in result.output
    assert "0f1e2d3c" not in result.output


def test_a_cds_host_that_does_not_resolve_is_named(monkeypatch):
    import importlib
    import socket as socket_module

    module = importlib.import_module(
        "aurora_sweep.data.era5.download"
    )  # `era5.download` is the function

    def no_dns(*args, **kwargs):
        raise socket_module.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(module.socket, "create_connection", no_dns)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    with pytest.raises(AuroraSweepError, match="the name cds.climate.copernicus.eu does not"):
        module.check_reachable("https://cds.climate.copernicus.eu/api")


def test_error_messages_never_show_the_key():
    key = "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"
    failure = era5.classify_failure(
        RuntimeError(f"bad request for key {key}"), era5.Request("d", {}, "x.nc")
    )
    assert key not in failure.message


# ------------------------------------------------------------------------------------------
# CLI


def test_cli_download_error_prints_one_red_line_and_exits_nonzero(tmp_path, monkeypatch):
    config = study_config(tmp_path, days=3)
    monkeypatch.setenv("CDSAPI_RC", str(tmp_path / "nope"))
    monkeypatch.delenv("CDSAPI_URL", raising=False)
    monkeypatch.delenv("CDSAPI_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(data_app, ["download", "-c", str(config.path), "--no-progress"])
    assert result.exit_code == 1
    assert "error: no CDS credentials" in result.output
    assert not isinstance(result.exception, AuroraSweepError)


def test_cli_download_dry_run_prints_the_plan(tmp_path):
    config = study_config(tmp_path, days=3)
    result = CliRunner().invoke(data_app, ["download", "-c", str(config.path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "CDS requests" in result.output and "estimate" in result.output


def test_cli_import_builds_the_store(tmp_path, monkeypatch):
    config = study_config(tmp_path, days=3)
    write_study_files(config, tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    args = ["import", str(tmp_path / "in"), "-c", str(config.path), "--no-progress"]
    result = CliRunner().invoke(data_app, args)
    assert result.exit_code == 0, result.output
    assert store.open_store(tmp_path / "data" / "t" / "store.zarr").sizes["time"] == 12


def test_cli_import_of_six_hourly_tp_fails_with_one_line(tmp_path, monkeypatch):
    config = study_config(tmp_path, days=3)
    files = _instant_files(config, tmp_path / "in")
    lat, lon = _grid(config)
    six = _times("2021-12-31T18:00", 16, step_h=6)
    tp = cds_dataset(
        {"tp": _field(tp_metres(six), lat.size, lon.size)}, times=six, lat=lat, lon=lon
    )
    files.append(write_netcdf(tp, tmp_path / "in" / "tp.nc"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(data_app, ["import", *map(str, files), "-c", str(config.path)])
    assert result.exit_code == 1 and "error:" in result.output


# ------------------------------------------------------------------------------------------
# Study configs shipped with the project


@pytest.mark.parametrize("name", ["europe-tp", "north-america-tp", "europe-ro"])
def test_shipped_study_configs_load(name):
    config = load_config(REPO / "sweep" / f"{name}.toml", workdir=REPO)
    assert config.data.source == "era5" and config.model.base == "small-pretrained"
    assert config.data.grid == 0.25
    requests = era5.plan_requests(config)
    assert len(requests) > 100
    # the target's own hourly files (runoff: ERA5's "runoff", every hour)
    target = config.data.target
    assert config.objective.name == f"{target}_{'seeps' if target == 'tp' else 'rmse'}"
    if target == "ro":
        hourly = [r.request for r in requests if r.target.startswith("ro-")]
        assert len(hourly) == 49 and {v for r in hourly for v in r["variable"]} == {"runoff"}
        assert all(len(r["time"]) == 24 for r in hourly)


def test_europe_config_crosses_zero_and_north_america_is_west_of_it():
    eu = load_config(REPO / "sweep" / "europe-tp.toml", workdir=REPO).data.region
    na = load_config(REPO / "sweep" / "north-america-tp.toml", workdir=REPO).data.region
    assert eu.crosses_zero and (eu.west, eu.east, eu.south, eu.north) == (-12, 40, 35, 72)
    assert na.west < 0 and na.east < 0 and not na.crosses_zero


# ------------------------------------------------------------------------------------------
# Real files as the CDS returned them


REAL_READABLE = [
    "eric157__crop-yield-analysis/data_stream-oper_stepType-accum.nc",
    "eric157__crop-yield-analysis/data_stream-oper_stepType-instant.nc",
    "younessderfoufi911-design__wps-maroc/data__data_stream-oper_stepType-accum.nc",
    "Laboratorio-Oceanografia-Fisica-UACh__proj-balance-calor/flujos_valdivia_era5.nc",
    "enomarozi__Website_Volcanic/data__era_merapi_jan_2026.nc",
    "Buicongbang04__Forest_Fire_Detection/data__example__era5__download.zip",
    "Husaria55__simulations/data_for_weather_reanalysis.nc",
    "enomarozi__Website_Volcanic/data__era5_pressure_jan_2026.nc",
    "enomarozi__Website_Volcanic/data__era_merapi.nc",
    "DKS-MANAGER__civil25/era5_2024.nc",
    "MichelFaloughi__cis5200-project/download.nc",
    "Team-Sea-Resolution__Fishing-Gear-Management-System/era5_data.nc",
    "prakash023__Earth-within-the-air-flow-3D/data_stream-oper_stepType-instant.nc",
    "jmcastelo17__Noray/data__data_stream-enda_stepType-instant.nc",
    "abdrrahmmn__isitlakeffect/pressure_levels.nc",
    "abdrrahmmn__isitlakeffect/single_level.nc",
]


@needs_real
@pytest.mark.parametrize("rel", REAL_READABLE)
def test_real_cds_files_read_into_the_normalised_layout(rel):
    path = CDS_REAL / rel
    if not path.exists():
        pytest.skip(f"{rel} is absent")
    ds = era5.read_cds_file(path)
    assert "time" in ds.dims and "valid_time" not in ds.dims
    assert ds["expver"].dims == ("time",)
    assert "number" not in ds.coords
    assert np.all(np.diff(ds["latitude"].values) <= 0)
    if "level" in ds.dims:
        assert ds["level"].dtype.kind == "i"
    assert np.diff(ds["time"].values).min(initial=np.timedelta64(1, "s")) > np.timedelta64(0)


@needs_real
def test_real_expver_switch_is_kept_per_time():
    ds = era5.read_cds_file(
        CDS_REAL / "eric157__crop-yield-analysis/data_stream-oper_stepType-accum.nc"
    )
    assert ds["expver"].values[-1] == "0005" and ds["expver"].values[0] == "0001"


@needs_real
def test_real_zip_named_nc_merges_instant_and_accum_members():
    ds = era5.read_cds_file(CDS_REAL / "enomarozi__Website_Volcanic/data__era_merapi_jan_2026.nc")
    assert {"2t", "sshf", "zust"} <= set(ds.data_vars)
    one = era5.read_cds_file(
        CDS_REAL / "Buicongbang04__Forest_Fire_Detection/data__example__era5__download.zip"
    )
    assert {"2t", "10u", "10v", "tp"} <= set(one.data_vars) and one.sizes["time"] == 1


@needs_real
def test_real_max_member_is_ignored_when_zipped(tmp_path):
    folder = CDS_REAL / "eric157__crop-yield-analysis"
    with __import__("zipfile").ZipFile(tmp_path / "trio.nc", "w") as z:
        for kind in ("instant", "accum", "max"):
            z.write(
                folder / f"data_stream-oper_stepType-{kind}.nc",
                f"data_stream-oper_stepType-{kind}.nc",
            )
    ds = era5.read_cds_file(tmp_path / "trio.nc")
    assert "tp" in ds and "2t" in ds and "mx2t" not in ds and "mn2t" not in ds


@needs_real
@pytest.mark.parametrize(
    "rel",
    [
        "younessderfoufi911-design__wps-maroc/data__data_stream-oper_stepType-accum.nc",
        "eric157__crop-yield-analysis/data_stream-oper_stepType-accum.nc",
        "Buicongbang04__Forest_Fire_Detection/data__example__era5__download.zip",
    ],
)
def test_real_tp_not_sampled_hourly_is_refused_for_accumulation(rel):
    ds = era5.read_cds_file(CDS_REAL / rel)
    hours = era5.assemble._seconds(ds["time"].values)
    with pytest.raises(AuroraSweepError, match="request total_precipitation at every hour"):
        era5.check_hourly(hours, label=rel)


@needs_real
def test_real_6_hourly_tp_file_is_refused_by_import(tmp_path):
    """The Morocco daily tp with a matching instant file: import refuses, keeps no store."""
    config = study_config(tmp_path, north=36, south=21, west=-17, east=-1, grid=0.25,
                          start=dt.date(2024, 3, 1), levels=(500,))  # fmt: skip
    files = [
        CDS_REAL / "younessderfoufi911-design__wps-maroc/data__data_stream-oper_stepType-accum.nc",
        *_instant_files(config, tmp_path / "in"),
    ]
    with pytest.raises(AuroraSweepError, match="not every hour"):
        era5.import_files(files, config.data, progress=False)
    assert not config.data.store.exists()


@needs_real
def test_real_global_grid_crops_a_box_crossing_zero():
    ds = era5.read_cds_file(CDS_REAL / "MichelFaloughi__cis5200-project/download.nc")
    region = Region(north=72, south=35, west=-12, east=40)
    lat_idx, lon_idx, lat, lon = era5.region_indices(
        ds["latitude"].values, ds["longitude"].values, region
    )
    assert lon[0] == -12.0 and lon[-1] == 40.0 and lon.size == 209
    assert lat[0] == 72.0 and lat[-1] == 35.0 and lat.size == 149
    z = ds["z"].isel(time=0, level=0).values[np.ix_(lat_idx, lon_idx)]
    assert np.isfinite(z).all()


@needs_real
def test_real_legacy_netcdf3_reads_with_time_and_level_dims():
    ds = era5.read_cds_file(CDS_REAL / "abdrrahmmn__isitlakeffect/pressure_levels.nc")
    assert ds["level"].values.tolist() == [700, 850, 1000]
    assert ds["t"].dtype == np.float32 or ds["t"].dtype == np.float64
    assert 200 < float(ds["t"].mean()) < 320  # int16 packing decoded


# ------------------------------------------------------------------------------------------
# Interrupted data work


def _dead_pid() -> tuple[int, float]:
    import subprocess
    import sys

    import psutil

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, started


def test_a_killed_imports_scratch_is_removed_by_the_next_import(tmp_path, caplog):
    config = study_config(tmp_path, days=3)
    files = write_study_files(config, tmp_path / "in")
    parent = config.data.store.parent
    parent.mkdir(parents=True)
    pid, started = _dead_pid()
    killed = parent / ".import-killed"
    killed.mkdir()
    (killed / "2t.npy").write_bytes(b"\0" * 4096)  # what a killed import leaves
    owner = {"host": socket.gethostname(), "pid": pid, "pid_started": started}
    (killed / "owner.json").write_text(json.dumps(owner))
    running = parent / ".import-running"  # another import, alive: left alone
    running.mkdir()
    import psutil

    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "pid_started": psutil.Process().create_time()}  # fmt: skip
    (running / "owner.json").write_text(json.dumps(me))
    with caplog.at_level("WARNING"):
        era5.import_files(files, config.data, progress=False)
    assert not killed.exists() and running.exists()
    assert [p.name for p in parent.glob(".import-*")] == [".import-running"]
    assert "scratch of an import that was killed" in caplog.text


class _Blocking(FakeCDS):
    """Answers every request but one, which waits (as in the CDS queue) until released."""

    def __init__(self, config, slow: str):
        super().__init__(config)
        self.slow, self.release = slow, threading.Event()

    def retrieve(self, dataset: str, request: dict, target: str) -> str:
        if Path(target).name.removesuffix(".partial") == self.slow:
            self.release.wait(60)
            raise ConnectionError("abandoned")
        return super().retrieve(dataset, request, target)


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler for one test, whatever the runner left: a pytest-xdist worker
    ignores SIGINT, and `_thread.interrupt_main` does nothing for an ignored signal."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_a_download_stops_at_once_and_keeps_every_finished_chunk(
    tmp_path, python_ctrl_c
):
    import _thread

    config = study_config(tmp_path, days=3)
    plan = era5.plan_requests(config)
    fake = _Blocking(config, slow=plan[0].target)
    folder = era5.download_folder(config.data)

    def interrupt_when_the_rest_are_in() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if len(era5.load_manifest(folder)) == len(plan) - 1:
                break
            time.sleep(0.05)
        _thread.interrupt_main()  # Ctrl-C

    threading.Thread(target=interrupt_when_the_rest_are_in, daemon=True).start()
    started = time.monotonic()
    try:
        with pytest.raises(era5.DownloadInterrupted) as e:
            era5.download(config, client_factory=fake, max_workers=len(plan), progress=False)
        assert time.monotonic() - started < 20  # it did not wait for the request in the queue
        assert set(era5.load_manifest(folder)) == {r.target for r in plan[1:]}
        assert f"{len(plan) - 1} of {len(plan)} chunks" in str(e.value)
        assert "run 'aurora-sweep data download' again" in str(e.value)
    finally:
        fake.release.set()
    fake2 = FakeCDS(config)
    era5.download(config, client_factory=fake2, progress=False)
    assert fake2.calls == [plan[0].target]  # the resumed download fetches only the rest
