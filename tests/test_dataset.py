import dataclasses
import datetime as dt

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from aurora_sweep.config.study import Period
from aurora_sweep.config.study_file import load_config
from aurora_sweep.config.targets import TARGETS
from aurora_sweep.data.climates import MIN_CLIMATOLOGY_SAMPLES, climatology, climatology_forecast
from aurora_sweep.data.samples import (
    Samples,
    model_longitudes,
    patch_crop,
    sample_times,
    target_stats,
)
from aurora_sweep.data.store import open_store
from aurora_sweep.errors import AuroraSweepError


def test_western_hemisphere_longitudes_move_by_exactly_360():
    lon, shift = model_longitudes(np.array([-126.0, -100.0, -66.0]))
    assert shift == 0 and np.allclose(lon, [234, 260, 294])


def test_box_crossing_zero_is_shifted_to_start_at_zero_and_stays_increasing():
    lon, shift = model_longitudes(np.arange(-12.0, 40.25, 0.25))
    assert shift == 12.0
    assert lon[0] == 0 and np.all(np.diff(lon) > 0) and lon[-1] < 360


def test_eastern_longitudes_are_left_alone():
    lon, shift = model_longitudes(np.array([4.0, 5.0]))
    assert shift == 0 and list(lon) == [4.0, 5.0]


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((32, 48), (32, 48)),
        ((149, 209), (148, 208)),
        ((125, 241), (124, 240)),
        ((35, 50), (32, 48)),
    ],
)
def test_patch_crop_gives_the_grid_aurora_forecasts_both_sides_multiples_of_four(shape, expected):
    # Aurora accepts 4k+1 rows but forecasts 4k: the crop keeps exactly the forecast grid
    assert patch_crop(*shape) == expected


def test_patch_crop_refuses_a_region_smaller_than_the_backbone_takes():
    with pytest.raises(AuroraSweepError, match="at least"):
        patch_crop(3, 40)


def _cube(times: list[str]) -> xr.Dataset:
    t = np.array(times, dtype="datetime64[ns]")
    tp = np.arange(len(t), dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    return xr.Dataset({"tp": (("time", "latitude", "longitude"), tp)}, coords={"time": t})


def test_samples_need_both_neighbours_exactly_six_hours_away():
    cube = _cube(
        [
            "2022-01-01T00",
            "2022-01-01T06",
            "2022-01-01T12",
            "2022-01-02T00",
            "2022-01-02T06",
            "2022-01-02T12",
        ]
    )
    idx = sample_times(cube, Period(dt.date(2022, 1, 1), dt.date(2022, 1, 2)), "tp")
    assert list(idx) == [1, 4]


def test_a_sample_whose_target_falls_outside_the_split_is_dropped():
    cube = _cube(["2022-12-31T06", "2022-12-31T12", "2022-12-31T18", "2023-01-01T00"])
    idx = sample_times(cube, Period(dt.date(2022, 1, 1), dt.date(2022, 12, 31)), "tp")
    assert list(idx) == [1]  # the sample at 18 UTC would read its target from 2023


def test_samples_with_missing_tp_are_dropped():
    cube = _cube(["2022-01-01T00", "2022-01-01T06", "2022-01-01T12", "2022-01-01T18"])
    cube["tp"][0] = np.nan
    idx = sample_times(cube, Period(dt.date(2022, 1, 1), dt.date(2022, 1, 1)), "tp")
    assert list(idx) == [2]


def test_batch_holds_two_input_times_and_the_next_tp_as_target(tiny_config):
    cube = open_store(tiny_config.data.store)
    samples = Samples(cube, tiny_config.data, "validation")
    batch, target = samples.batch([0, 3])
    assert batch.surf_vars["tp"].shape == (2, 2, 16, 16)
    assert batch.atmos_vars["q"].shape == (2, 2, 3, 16, 16)
    assert batch.metadata.atmos_levels == (500, 700, 850)
    t = samples.index[3]
    assert np.allclose(target[1].numpy(), cube["tp"].isel(time=t + 1).values)
    assert np.allclose(batch.surf_vars["tp"][1, 1].numpy(), samples.persistence([3])[0])
    assert batch.metadata.time[1] == samples.times[t].to_pydatetime()
    assert all(samples.target_times().year == 2023)


def test_tp_statistics_come_from_the_train_split_only(tiny_config):
    cube = open_store(tiny_config.data.store)
    stats = target_stats(cube, tiny_config.data.train, "tp")
    train_only = cube["tp"].sel(time=slice("2022-01-01", "2022-12-31T23"))
    assert stats.mean == pytest.approx(float(train_only.mean()), rel=1e-5)
    assert stats.mean != pytest.approx(float(cube["tp"].mean()), rel=1e-3)
    # location 0: Aurora's clamp of positive variables (in normalised units) then means tp >= 0
    assert stats.location == 0 and stats.scale == pytest.approx(float(train_only.std()), rel=1e-4)


def _store_with_levels(tmp_path, levels, study_levels):
    """A synthetic store holding `levels`, and a study config that uses `study_levels`."""
    from conftest import write_tiny_config
    from synthetic import write_region_store

    config = load_config(write_tiny_config(tmp_path), workdir=tmp_path)
    data = dataclasses.replace(config.data, levels=tuple(levels))
    write_region_store(data, tmp_path / "store.zarr", days=["2022-01-03", "2023-01-03"])
    cube = open_store(tmp_path / "store.zarr")
    return cube, dataclasses.replace(config.data, levels=tuple(study_levels))


def test_levels_listed_top_down_are_labelled_as_they_are_ordered(tmp_path):
    cube, data = _store_with_levels(tmp_path, [500, 700, 850], [850, 700, 500])
    samples = Samples(cube, data, "validation")
    batch, _ = samples.batch([0])
    assert batch.metadata.atmos_levels == (850, 700, 500)
    t = samples.index[0]
    for j, level in enumerate((850, 700, 500)):
        expected = cube["t"].isel(time=t).sel(level=level).values
        assert np.array_equal(batch.atmos_vars["t"][0, 1, j].numpy(), expected)


def test_a_store_with_more_levels_than_the_study_gives_only_the_study_levels(tmp_path):
    cube, data = _store_with_levels(tmp_path, [250, 500, 700, 850], [500])
    samples = Samples(cube, data, "train")
    batch, _ = samples.batch([0, 1])
    assert batch.metadata.atmos_levels == (500,)
    assert batch.atmos_vars["z"].shape[2] == 1
    t = samples.index[1]
    assert np.array_equal(
        batch.atmos_vars["z"][1, 1, 0].numpy(), cube["z"].isel(time=t).sel(level=500).values
    )
    assert samples.observed_state([0])["z"].shape[1] == 1


def test_targets_and_baselines_live_on_the_grid_the_model_forecasts(tmp_path):
    from synthetic import make_cube

    lat, lon = 50.0 - 0.25 * np.arange(33), 2.0 + 0.25 * np.arange(34)
    times = np.array(["2022-01-01T00", "2022-01-01T06", "2022-01-01T12"], dtype="datetime64[ns]")
    cube = make_cube(lat=lat, lon=lon, levels=(500,), times=times)
    config = load_config(__import__("conftest").write_tiny_config(tmp_path), workdir=tmp_path)
    data = dataclasses.replace(config.data, levels=(500,))
    samples = Samples(cube, data, "train")
    batch, target = samples.batch([0])
    assert batch.spatial_shape == (32, 32) and target.shape == (1, 32, 32)
    assert samples.observed([0]).shape == samples.persistence([0]).shape == (1, 32, 32)
    assert list(samples.cube["latitude"].values) == list(lat[:32])


def _monthly_cube(values_by_month: dict[int, float], days: int) -> xr.Dataset:
    times = pd.date_range("2022-01-01", "2022-12-31T18", freq="6h")
    times = times[times.day <= days]
    tp = np.array([values_by_month.get(t.month, 0.0) + t.hour / 6 for t in times])
    return xr.Dataset(
        {"tp": (("time", "latitude", "longitude"), tp[:, None, None] * np.ones((1, 2, 3)))},
        coords={"time": times.values},
    )


def test_climatology_has_a_seasonal_and_a_daily_cycle():
    cube = _monthly_cube({m: 10.0 * m for m in range(1, 13)}, days=5)  # 5 samples per (month, hour)
    assert MIN_CLIMATOLOGY_SAMPLES > 5
    clim = climatology(cube, Period(dt.date(2022, 1, 1), dt.date(2022, 12, 31)), "tp")
    assert clim.shape == (12, 4, 2, 3)
    times = pd.DatetimeIndex(["2022-03-02T06", "2022-07-04T18"])
    fc = climatology_forecast(clim, times, TARGETS["tp"])
    # with 5 samples a (month, hour) borrows its neighbours: March from Feb..Apr averages to March
    assert fc[0, 0, 0] == pytest.approx(30.0 + 1)
    assert fc[1, 0, 0] == pytest.approx(70.0 + 3)


def test_climatology_uses_the_month_alone_when_it_has_enough_samples():
    cube = _monthly_cube({1: 0.0, 2: 100.0, 12: 50.0}, days=MIN_CLIMATOLOGY_SAMPLES)
    clim = climatology(cube, Period(dt.date(2022, 1, 1), dt.date(2022, 12, 31)), "tp")
    assert clim[1, 0, 0, 0] == pytest.approx(100.0)  # February: its own samples only
    assert clim[0, 2, 0, 0] == pytest.approx(2.0)  # January at 12 UTC


def test_climatology_of_a_month_with_too_few_samples_borrows_its_neighbours():
    cube = _monthly_cube({1: 0.0, 2: 100.0, 12: 50.0}, days=MIN_CLIMATOLOGY_SAMPLES)
    cube = cube.sel(time=~((cube["time"].dt.month == 1) & (cube["time"].dt.day > 2)))
    clim = climatology(cube, Period(dt.date(2022, 1, 1), dt.date(2022, 12, 31)), "tp")
    # January keeps 2 samples per hour: it widens to December..February
    n = MIN_CLIMATOLOGY_SAMPLES
    expected = (2 * 0.0 + n * 100.0 + n * 50.0) / (2 + 2 * n)
    assert clim[0, 0, 0, 0] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "levels = [500, 700, 850]",
            "levels = [250, 500]",
            "holds levels 500, 700, 850 hPa, not 250",
        ),
        ("north = 62.0", "north = 66.0", "covers 47°N–62°N, 4°E–19°E, not the study's region"),
        ("grid = 1.0", "grid = 0.5", "has a 1° grid, not the study's 0.5°"),
        (
            'test = ["2024-01-01", "2024-12-31"]',
            'test = ["2025-01-01", "2025-12-31"]',
            "holds 2022-01-01..2024-12-06, nothing in the test period 2025-01-01..2025-12-31",
        ),
    ],
)
def test_a_store_built_for_another_study_is_refused_not_reused(
    tmp_path, tiny_store, old, new, message
):
    from aurora_sweep.config.study_file import load_config
    from aurora_sweep.data.cube import open_cube
    from conftest import write_tiny_config

    path = write_tiny_config(tmp_path, store=tiny_store)
    text = path.read_text().replace('source = "demo"', 'source = "era5"')
    if "2025" in new:
        text = text.replace(
            'period = ["2022-01-01", "2024-12-31"]', 'period = ["2022-01-01", "2025-12-31"]'
        )
    assert old in text
    path.write_text(text.replace(old, new))
    with pytest.raises(AuroraSweepError, match="rebuild it for this study") as e:
        open_cube(load_config(path, workdir=tmp_path))
    assert message in str(e.value) and str(tiny_store) in str(e.value)


def test_a_demo_store_made_for_another_region_is_remade(tmp_path, tiny_store):
    import shutil

    from aurora_sweep.config.study_file import load_config
    from aurora_sweep.data.cube import open_cube
    from conftest import write_tiny_config

    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store)
    path = write_tiny_config(tmp_path, store=store)
    path.write_text(path.read_text().replace("north = 62.0", "north = 64.0"))
    cube = open_cube(load_config(path, workdir=tmp_path))
    assert float(cube["latitude"].max()) == 64.0 and cube.sizes["latitude"] == 18


def _same_batches(a: Samples, b: Samples, indices) -> None:
    for idx in indices:
        (x, tx), (y, ty) = a.batch(idx), b.batch(idx)
        torch.testing.assert_close(tx, ty, rtol=0, atol=0, equal_nan=True)
        for k in x.surf_vars:
            torch.testing.assert_close(
                x.surf_vars[k], y.surf_vars[k], rtol=0, atol=0, equal_nan=True
            )
        for k in x.atmos_vars:
            torch.testing.assert_close(x.atmos_vars[k], y.atmos_vars[k], rtol=0, atol=0)
        assert x.metadata.time == y.metadata.time
    np.testing.assert_array_equal(a.observed(indices[0]), b.observed(indices[0]))
    state_a, state_b = a.observed_state(indices[0]), b.observed_state(indices[0])
    for k in state_a:
        np.testing.assert_array_equal(state_a[k], state_b[k])


def test_a_store_read_sample_by_sample_gives_the_same_batches_as_one_in_memory(tiny_config):
    """The lazy path reads each time's raw chunk file (the layout write_store uses), here with
    two of three levels and a cropped grid, and agrees bit for bit with the in-memory path."""
    import dataclasses

    data = dataclasses.replace(tiny_config.data, levels=(850, 500))
    cube = open_store(tiny_config.data.store)
    memory = Samples(cube, data, "validation", in_memory=True)
    lazy = Samples(cube, data, "validation", in_memory=False)
    assert lazy.lazy and lazy._reader.raw and not memory.lazy
    _same_batches(memory, lazy, [[0], [3, 1], list(range(5, 13))])


def test_a_store_in_another_layout_is_read_through_zarr(tiny_config, tmp_path):
    """Compressed (stores written before the raw layout): the same batches, through zarr."""
    cube = open_store(tiny_config.data.store)
    old = tmp_path / "old.zarr"
    encoding = {
        name: {"chunks": tuple(min(4, n) if d == "time" else n for d, n in zip(v.dims, v.shape))}
        for name, v in cube.data_vars.items()
    }
    cube.load().to_zarr(old, encoding=encoding, consolidated=True, zarr_format=2)
    lazy = Samples(open_store(old), tiny_config.data, "validation", in_memory=False)
    assert lazy.lazy and not lazy._reader.raw
    memory = Samples(cube, tiny_config.data, "validation", in_memory=True)
    _same_batches(memory, lazy, [[0], [4, 2, 9]])


def test_the_prefetcher_hands_out_batches_in_plan_order_and_raises_the_readers_error():
    import threading

    from aurora_sweep.train.runtime import Prefetcher

    with Prefetcher(lambda i: i * 10, [3, 1, 2]) as batches:
        assert [batches.next() for _ in range(3)] == [30, 10, 20]

    def read(i):
        if i == 2:
            raise OSError("store unreadable")
        return i

    with Prefetcher(read, [1, 2, 3]) as batches:
        assert batches.next() == 1
        with pytest.raises(OSError, match="unreadable"):
            batches.next()
    # a consumer that stops early (a pruned trial) leaves no reader thread behind
    before = threading.active_count()
    with Prefetcher(lambda i: i, list(range(100))) as batches:
        batches.next()
    assert threading.active_count() == before


def test_a_24h_sample_needs_every_step_from_its_persistence_window_to_its_target():
    hours = [0, 6, 12, 18, 24, 30, 36, 42, 48]  # nine consecutive model times
    times = [str(np.datetime64("2022-01-01T00") + np.timedelta64(h, "h")) for h in hours]
    cube = _cube(times)
    period = Period(dt.date(2022, 1, 1), dt.date(2022, 1, 3))
    # t-3 .. t+4: persistence's four totals ending at t, inputs t-1 and t, four targets
    assert list(sample_times(cube, period, "tp", steps=4)) == [3, 4]
    assert list(sample_times(cube, period, "tp", steps=2)) == list(range(1, 7))
    gap = _cube(times[:5] + times[6:])  # 30 h missing
    assert list(sample_times(gap, period, "tp", steps=4)) == []


def test_a_longer_lead_adds_up_its_totals_and_its_persistence(tiny_config):
    cube = open_store(tiny_config.data.store)
    six = Samples(cube, tiny_config.data, "validation")
    day = six.at_lead(4)
    assert day is not None and 0 < len(day) < len(six) and day.steps == 4
    i = 5
    t = day.index[i]
    tp = cube["tp"].isel(latitude=slice(0, 16), longitude=slice(0, 16)).values
    np.testing.assert_allclose(day.observed([i])[0], tp[t + 1 : t + 5].sum(axis=0), rtol=1e-6)
    np.testing.assert_allclose(day.persistence([i])[0], tp[t - 3 : t + 1].sum(axis=0), rtol=1e-6)
    assert day.target_times()[i] == six.times[t + 4]
    _, target = day.training_batch([i])  # a rollout's last step: the 6-hour total ending then
    np.testing.assert_allclose(target["tp"][0].numpy(), tp[t + 4], rtol=1e-6)


def test_a_24h_climatology_adds_the_four_windows_it_covers():
    clim = np.zeros((12, 4, 1, 1))
    clim[0, :, 0, 0] = [1.0, 2.0, 3.0, 4.0]  # January by hour slot
    times = pd.DatetimeIndex(["2022-01-02T06"])
    assert climatology_forecast(clim, times, TARGETS["tp"])[0, 0, 0] == 2.0
    assert climatology_forecast(clim, times, TARGETS["tp"], steps=4)[0, 0, 0] == 10.0
    assert (
        climatology_forecast(clim, times, TARGETS["tp"], steps=2)[0, 0, 0] == 3.0
    )  # 06 and 00 UTC


@pytest.mark.parametrize("target", ["pr", "rain_rate"])
def test_a_longer_lead_combines_its_steps_as_the_target_is_over_time(tiny_config, target):
    """A mean rate over 24 h is the mean of its four steps (persistence too); an instantaneous
    value is the one at the valid time (persistence: at the last input time), not a sum."""
    import dataclasses

    cube = open_store(tiny_config.data.store).rename({"tp": target})
    data = dataclasses.replace(tiny_config.data, target=target)
    day = Samples(cube, data, "validation").at_lead(4)
    i = 5
    t = day.index[i]
    v = cube[target].isel(latitude=slice(0, 16), longitude=slice(0, 16)).values
    if target == "pr":
        observed, persistence = v[t + 1 : t + 5].mean(axis=0), v[t - 3 : t + 1].mean(axis=0)
    else:
        observed, persistence = v[t + 4], v[t]
    np.testing.assert_allclose(day.observed([i])[0], observed, rtol=1e-6)
    np.testing.assert_allclose(day.persistence([i])[0], persistence, rtol=1e-6)
    batch, target_now = day.batch([i])
    assert target in batch.surf_vars and "tp" not in batch.surf_vars


def test_a_longer_leads_climatology_is_the_mean_rate_or_the_valid_times_value():
    clim = np.zeros((12, 4, 1, 1))
    clim[0, :, 0, 0] = [1.0, 2.0, 3.0, 4.0]  # January by hour slot
    times = pd.DatetimeIndex(["2022-01-02T06"])
    # windows ending 12, 18 (day before), 00 and 06 UTC
    assert climatology_forecast(clim, times, TARGETS["pr"], steps=4)[0, 0, 0] == 2.5
    assert climatology_forecast(clim, times, TARGETS["rain_rate"], steps=4)[0, 0, 0] == 2.0
    assert climatology_forecast(clim, times, TARGETS["ro"], steps=4)[0, 0, 0] == 10.0
