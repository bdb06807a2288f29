import datetime as dt

import numpy as np
import pytest
import xarray as xr

from aurora_sweep.config import Period
from aurora_sweep.dataset import (
    Samples,
    model_longitudes,
    patch_crop,
    sample_times,
    tp_stats,
)
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.store import open_store


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
    ("shape", "expected"), [((32, 48), (32, 48)), ((149, 209), (149, 208)), ((35, 50), (32, 48))]
)
def test_patch_crop_keeps_widths_multiple_of_four_and_heights_multiple_or_one_more(shape, expected):
    assert patch_crop(*shape) == expected


def test_patch_crop_refuses_a_region_smaller_than_one_patch():
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
    idx = sample_times(cube, Period(dt.date(2022, 1, 1), dt.date(2022, 1, 2)))
    assert list(idx) == [1, 4]


def test_a_sample_whose_target_falls_outside_the_split_is_dropped():
    cube = _cube(["2022-12-31T06", "2022-12-31T12", "2022-12-31T18", "2023-01-01T00"])
    idx = sample_times(cube, Period(dt.date(2022, 1, 1), dt.date(2022, 12, 31)))
    assert list(idx) == [1]  # the sample at 18 UTC would read its target from 2023


def test_samples_with_missing_tp_are_dropped():
    cube = _cube(["2022-01-01T00", "2022-01-01T06", "2022-01-01T12", "2022-01-01T18"])
    cube["tp"][0] = np.nan
    idx = sample_times(cube, Period(dt.date(2022, 1, 1), dt.date(2022, 1, 1)))
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
    stats = tp_stats(cube, tiny_config.data.train)
    train_only = cube["tp"].sel(time=slice("2022-01-01", "2022-12-31T23"))
    assert stats.location == pytest.approx(float(train_only.mean()), rel=1e-5)
    assert stats.location != pytest.approx(float(cube["tp"].mean()), rel=1e-3)
