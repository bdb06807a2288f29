import numpy as np
import pytest

from aurora_sweep.metrics import lat_weighted_rmse, skill, tp_scores

LAT = np.array([60.0, 0.0])


def test_perfect_forecast_has_zero_rmse_and_skill_one():
    obs = np.random.default_rng(0).gamma(1.0, 2.0, (3, 2, 4))
    s = tp_scores(forecast=obs, observed=obs, persistence=obs + 1, climatology=obs * 0, lat=LAT)
    assert s["tp_rmse"] == 0 and s["tp_skill_persistence"] == 1 and s["tp_bias"] == 0


def test_errors_near_the_pole_weigh_less_than_at_the_equator():
    obs = np.zeros((1, 2, 4))
    north = obs.copy()
    north[:, 0] = 1.0  # error of 1 mm at 60N only
    equator = obs.copy()
    equator[:, 1] = 1.0
    assert lat_weighted_rmse(north, obs, LAT) < lat_weighted_rmse(equator, obs, LAT)
    # cos(60°) = 0.5: weights 0.5 and 1 -> mean squared error 0.5/1.5
    assert lat_weighted_rmse(north, obs, LAT) == pytest.approx(np.sqrt(0.5 / 1.5))


def test_skill_is_zero_when_no_better_than_the_reference():
    assert skill(2.0, 2.0) == 0 and skill(1.0, 2.0) == 0.5 and skill(3.0, 2.0) < 0
