import zipfile

import numpy as np
import pytest
import xarray as xr

from aurora_sweep.data import demo as demo_data
from aurora_sweep.data.store import open_store

SMALL = demo_data.DemoWorld(north=50.0, west=10.0, rows=8, cols=8, first_year=2024, last_year=2024)


@pytest.fixture(scope="module")
def cds_files(tmp_path_factory):
    return demo_data.write_cds_files(tmp_path_factory.mktemp("cds"), SMALL)


def test_single_levels_come_as_the_zip_of_instant_and_accumulated_files(cds_files):
    zpath = next(p for p in cds_files if p.suffix == ".zip")
    with zipfile.ZipFile(zpath) as zf:
        assert sorted(zf.namelist()) == [
            "data_stream-oper_stepType-accum.nc",
            "data_stream-oper_stepType-instant.nc",
        ]


def test_files_have_the_layout_the_cds_returns(cds_files):
    pl = next(p for p in cds_files if "pressure" in p.name)
    raw = xr.open_dataset(pl, decode_times=False)
    assert (
        raw["valid_time"].dtype == np.int64
        and raw["valid_time"].attrs["units"] == "seconds since 1970-01-01"
    )
    assert list(raw["pressure_level"].values) == [850.0, 700.0, 500.0]
    assert np.all(np.diff(raw["latitude"].values) < 0)
    assert raw["expver"].dims == ("valid_time",) and raw["expver"].values[0] == "0001"
    assert raw["number"].ndim == 0
    assert set(raw.data_vars) == {"z", "u", "v", "t", "q"}


def test_recent_months_are_flagged_as_era5t():
    world = demo_data.DemoWorld(rows=4, cols=4, first_year=2025, last_year=2025)
    coords = demo_data._cds_coords(world, demo_data.model_times(world), levels=False)
    assert set(coords["expver"][1]) == {"0001", "0005"}


def test_tp_is_hourly_in_metres_with_the_hours_before_each_model_time(cds_files):
    zpath = next(p for p in cds_files if p.suffix == ".zip")
    with zipfile.ZipFile(zpath) as zf:
        accum = xr.open_dataset(zf.open("data_stream-oper_stepType-accum.nc").read())
    steps = np.unique(np.diff(accum["valid_time"].values))
    assert np.timedelta64(1, "h") in steps
    assert accum["valid_time"].values[0] == np.datetime64(
        "2023-12-31T19:00"
    )  # before 2024-01-01 00 UTC
    assert float(accum["tp"].max()) < 0.2  # metres per hour


def test_imported_demo_equals_the_generator_cube(cds_files, tmp_path):
    import datetime as dt

    from aurora_sweep.config.study import DataConfig, Period, Region
    from aurora_sweep.data import era5

    year = Period(dt.date(2024, 1, 1), dt.date(2024, 12, 31))
    data = DataConfig(
        "demo",
        tmp_path / "store.zarr",
        Region(50, 43, 10, 17),
        (500, 700, 850),
        1.0,
        year,
        year,
        year,
        year,
    )
    era5.import_files(cds_files, data, progress=False)
    imported, reference = open_store(data.store).load(), demo_data.demo_cube(SMALL)
    assert list(imported["time"].values) == list(reference["time"].values)
    for name in ("tp", "2t", "msl", "q", "static_z"):
        np.testing.assert_allclose(
            imported[name].values, reference[name].values, rtol=2e-5, atol=1e-6
        )


def test_rain_falls_where_moist_air_moves_north():
    cube = demo_data.demo_cube(SMALL)
    v850 = cube["v"].sel(level=850).values.ravel()
    tp = cube["tp"].values.ravel()
    assert np.corrcoef(v850, tp)[0, 1] > 0.3
    assert (tp == 0).mean() > 0.3  # dry most of the time, like real precipitation


@pytest.fixture(scope="module")
def tp_week(tmp_path_factory):
    """The tiny demo world's tp over one week of 2022, as the other targets' reference."""
    return _target_store(tmp_path_factory.mktemp("tp-week"), "tp")


def _target_store(root, target: str):
    from aurora_sweep.config.study_file import load_config
    from aurora_sweep.data.cube import open_cube
    from conftest import write_tiny_config

    path = write_tiny_config(root)
    text = path.read_text().replace("[model]\n", f'[model]\ntarget = "{target}"\n', 1)
    for key, span in (("period", '["2022-01-01", "2022-01-07"]'),
                      ("train", '["2022-01-01", "2022-01-03"]'),
                      ("validation", '["2022-01-04", "2022-01-05"]'),
                      ("test", '["2022-01-06", "2022-01-07"]')):  # fmt: skip
        text = "\n".join(
            f"{key} = {span}" if line.startswith(f"{key} = [") else line
            for line in text.splitlines()
        )
    path.write_text(text)
    return open_cube(load_config(path, workdir=root))


@pytest.mark.parametrize("target", ["pr", "ro", "sf", "rain_rate", "swvl1"])
def test_the_demo_world_writes_every_target_and_the_import_makes_its_store(
    tmp_path, tp_week, target
):
    """A demo study of each target gets a store of it, within its bounds; pr is the same hours
    as tp over six hours, the known relation between two kinds of one variable."""
    from aurora_sweep.config.targets import TARGETS

    cube = _target_store(tmp_path, target)
    spec = TARGETS[target]
    values = cube[target].values
    assert target in cube and "tp" not in cube and cube[target].attrs["units"] == spec.units
    ok = np.isfinite(values)
    assert ok[1:].all() and values[ok].min() >= spec.lower
    assert spec.upper is None or values[ok].max() <= spec.upper
    assert values[ok].max() > 0  # something falls, runs off or soaks in
    if target == "pr":
        np.testing.assert_allclose(values[ok], tp_week["tp"].values[ok] / 6, rtol=1e-5, atol=1e-6)
