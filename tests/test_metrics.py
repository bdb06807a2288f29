import numpy as np
import pytest
import xarray as xr
from scores.categorical import seeps as scores_seeps
from scores.functions import create_latitude_weights

from aurora_sweep.config.objective import Objective
from aurora_sweep.config.targets import TARGETS
from aurora_sweep.data.climates import SeepsClimate, seeps_climate
from aurora_sweep.verify.bootstrap import block_bootstrap, paired_difference
from aurora_sweep.verify.metrics import (
    FSS_WINDOWS,
    lat_weighted_mse,
    lat_weighted_rmse,
    objective_terms,
    objective_value,
    scores,
    skill,
)

CATEGORICAL_THRESHOLDS_MM = TARGETS["tp"].thresholds
FSS_THRESHOLDS_MM = TARGETS["tp"].fss_thresholds

LAT = np.array([60.0, 0.0])
HOURS = [0, 6, 12, 18]  # the valid hours of 6-hour totals, UTC
DAY0 = np.datetime64("2023-01-01")


def _climate(p_dry, light_heavy, month: int = 1) -> SeepsClimate:
    """A climate known only for `month`, at all four hours: the given (lat, lon) fields, NaN
    elsewhere."""
    p = np.full((12, 4, *np.shape(p_dry)), np.nan)
    t = np.full_like(p, np.nan)
    p[month - 1], t[month - 1] = p_dry, light_heavy
    return SeepsClimate(p_dry=p, light_heavy=t)


def _lat(n: int) -> np.ndarray:
    return LAT if n == 2 else np.linspace(60.0, 0.0, n)


def _scores(
    forecast,
    observed,
    *,
    lat=None,
    seeps=False,
    persistence=None,
    climatology=None,
    hours=None,
    **kw,
):
    """scores of tp with every sample in January at 00 UTC (unless `hours`), one sample a day, a flat
    climate unless given."""
    n = len(observed)
    shape = np.shape(observed)[1:]
    lat = _lat(shape[0]) if lat is None else lat
    return scores(
        forecast=forecast,
        observed=observed,
        persistence=observed if persistence is None else persistence,
        climatology=observed if climatology is None else climatology,
        lat=lat,
        months=np.ones(n, dtype=int),
        hours=np.zeros(n, dtype=int) if hours is None else hours,
        days=DAY0 + np.arange(n),
        seeps=_climate(np.full(shape, 0.5), np.full(shape, 2.0)) if seeps is False else seeps,
        **{"bootstrap": 0, **kw, "objective": Objective.parse(kw.get("objective", "tp_rmse"))},
    )


def test_perfect_forecast_has_zero_rmse_and_skill_one():
    obs = np.random.default_rng(0).gamma(1.0, 2.0, (3, 2, 4))
    s = _scores(obs, obs, persistence=obs + 1, climatology=obs * 0)
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


def test_seeps_matches_the_hand_computed_error_matrix():
    # SEEPS (Rodwell et al. 2010, eq. 15; WeatherBench 2): with p1 the dry fraction and
    # p3 = (1 - p1) / 3 the heavy fraction, the error for forecast category (row) against
    # observed category (column), categories dry / light / heavy, is
    #   1/2 * [[0,                  1/(1-p1),  1/p3 + 1/(1-p1)],
    #          [1/p1,               0,         1/p3           ],
    #          [1/p1 + 1/(1-p3),    1/(1-p3),  0              ]]
    # dry: <= 0.1 mm; light: above that and <= the light/heavy threshold; heavy: above it.
    p1, threshold = 0.4, 3.0
    p3 = (1 - p1) / 3
    forecast = np.array(
        [[[0.05, 4.0, 2.0, 3.0]]]
    )  # dry, heavy, light, light (3.0: on the threshold)
    observed = np.array([[[1.0, 0.1, 3.5, 0.5]]])  # light, dry (0.1: on the dry line), heavy, light
    expected = np.mean(
        [
            0.5 / (1 - p1),  # dry forecast, light observed
            0.5 * (1 / p1 + 1 / (1 - p3)),  # heavy forecast, dry observed
            0.5 / p3,  # light forecast, heavy observed
            0.0,  # light, light
        ]
    )
    climate = _climate(np.full((1, 4), p1), np.full((1, 4), threshold))
    lat = np.array([0.0])
    s = _scores(forecast, observed, lat=lat, seeps=climate)
    assert s["tp_seeps"] == pytest.approx(expected)
    value = objective_value(
        Objective.parse("tp_seeps"),
        forecast=forecast,
        observed=observed,
        lat=lat,
        months=np.array([1]),
        hours=np.array([0]),
        seeps=climate,
    )
    assert value == s["tp_seeps"]


def test_seeps_ignores_points_whose_dry_fraction_is_outside_the_climate_mask():
    forecast = np.array([[[0.0, 0.0, 0.0]]])
    observed = np.array([[[1.0, 9.0, 9.0]]])  # a dry forecast of rain at all three points
    p_dry = np.array([[0.5, 0.9, 0.05]])  # only the first point lies in [0.1, 0.85]
    s = _scores(
        forecast, observed, lat=np.array([0.0]), seeps=_climate(p_dry, np.full((1, 3), 2.0))
    )
    assert s["tp_seeps"] == pytest.approx(0.5 / (1 - 0.5))


def test_pooled_seeps_is_what_scores_gives_over_all_samples_and_points():
    rng = np.random.default_rng(1)
    observed = rng.gamma(0.5, 2.0, (5, 3, 4))
    forecast = rng.gamma(0.5, 2.0, (5, 3, 4))
    lat = np.array([50.0, 40.0, 30.0])
    p_dry = rng.uniform(0.0, 1.0, (3, 4))  # some points masked
    climate = _climate(p_dry, np.full((3, 4), 1.5))
    dims = ("sample", "latitude", "longitude")
    direct = scores_seeps(
        xr.DataArray(forecast, dims=dims),
        xr.DataArray(observed, dims=dims),
        xr.DataArray(p_dry, dims=dims[1:]),
        xr.DataArray(np.full((3, 4), 1.5), dims=dims[1:]),
        dry_light_threshold=0.1,
        weights=create_latitude_weights(xr.DataArray(lat, dims="latitude")),
    )
    assert _scores(forecast, observed, lat=lat, seeps=climate)["tp_seeps"] == pytest.approx(
        float(direct)
    )


def test_contingency_scores_match_hand_counts():
    # event: tp >= 1 mm. Points: 2 hits (one forecast exactly 1.0), 1 miss, 3 false alarms,
    # 2 correct negatives.
    forecast = np.array([[[1.0, 3.0, 0.0, 2.0, 1.5, 1.2, 0.0, 0.5]]])
    observed = np.array([[[2.0, 1.0, 4.0, 0.0, 0.2, 0.9, 0.0, 0.3]]])
    hits, misses, false_alarms, total = 2, 1, 3, 8
    s = _scores(forecast, observed, lat=np.array([0.0]))
    assert s["tp_csi_1"] == pytest.approx(hits / (hits + misses + false_alarms))
    random_hits = (hits + misses) * (hits + false_alarms) / total
    ets = (hits - random_hits) / (hits + misses + false_alarms - random_hits)
    assert s["tp_ets_1"] == pytest.approx(ets)
    assert s["tp_fbias_1"] == pytest.approx((hits + false_alarms) / (hits + misses))


def test_seeps_climate_gives_dry_fraction_and_wet_two_thirds_quantile_per_month():
    tp = np.array([0.0, 0.1, 0.5, 1.0, 2.0, 4.0, 0.0, 3.0, 6.0, np.nan])[:, None, None]
    months = np.array([1, 1, 1, 1, 1, 1, 2, 2, 2, 2])
    climate = seeps_climate(tp, months, np.zeros(10, dtype=int))
    # too few totals for any (month, hour) cell: every hour of a month gets the month's climate
    # January: 0.0 and 0.1 are dry (<= 0.1): 2 of 6. Wet 0.5, 1, 2, 4: 2/3 quantile at
    # position (4 - 1) * 2/3 = 2 -> 2.0
    assert climate.p_dry[0, :, 0, 0] == pytest.approx(2 / 6)
    assert climate.light_heavy[0, :, 0, 0] == pytest.approx(2.0)
    # February (the NaN left out): 1 dry of 3. Wet 3, 6: position 2/3 -> 3 + 2/3 * 3 = 5
    assert climate.p_dry[1, :, 0, 0] == pytest.approx(1 / 3)
    assert climate.light_heavy[1, :, 0, 0] == pytest.approx(5.0)
    assert np.isnan(climate.p_dry[2:]).all() and np.isnan(climate.light_heavy[2:]).all()


def _rain_days(n_days: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    observed = rng.gamma(0.5, 2.0, (n_days, 3, 4))
    return {"forecast": observed + rng.normal(0.0, 0.5, observed.shape), "observed": observed}


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_days():
    widths = []
    for n_days in (20, 400):
        data = _rain_days(n_days, seed=n_days)
        clim = np.broadcast_to(data["observed"].mean(0), data["observed"].shape)
        s = _scores(**data, climatology=clim, bootstrap=300)
        assert s["tp_rmse_q05"] <= s["tp_rmse"] <= s["tp_rmse_q95"]
        assert s["tp_skill_climatology_q05"] <= s["tp_skill_climatology"]
        assert s["tp_skill_climatology"] <= s["tp_skill_climatology_q95"]
        widths.append(s["tp_rmse_q95"] - s["tp_rmse_q05"])
    assert widths[1] < widths[0] / 2


def test_bootstrap_draws_whole_days_and_their_neighbours_together():
    days = DAY0 + np.array([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 5])  # several samples on some days
    unique = np.unique(days)
    for idx in block_bootstrap(days, n_resamples=50, block_days=2, seed=3):
        sequence, pos = [], 0
        while pos < len(idx):  # a resample is whole days, one after another
            members = np.flatnonzero(days == days[idx[pos]])
            assert sorted(idx[pos : pos + len(members)]) == list(members)
            sequence.append(np.searchsorted(unique, days[idx[pos]]))
            pos += len(members)
        assert len(sequence) == 6  # ceil(6 days / 2) blocks of 2 days
        for first, second in zip(sequence[::2], sequence[1::2]):
            assert second == (first + 1) % len(unique)  # the next day present, wrapping round


def test_perfect_forecast_scores_perfectly():
    rng = np.random.default_rng(2)
    observed = rng.gamma(0.5, 4.0, (2, 12, 12))  # 12x12: both FSS windows fit
    s = _scores(observed, observed, lat=np.linspace(50.0, 39.0, 12))
    assert s["tp_rmse"] == 0 and s["tp_mae"] == 0 and s["tp_seeps"] == 0
    assert all(s[f"tp_csi_{t:g}"] == 1 for t in CATEGORICAL_THRESHOLDS_MM)
    assert all(s[f"tp_fss_{t:g}_w{w}"] == 1 for t in FSS_THRESHOLDS_MM for w in FSS_WINDOWS)


def test_references_score_like_the_model_when_given_the_same_forecast():
    data = _rain_days(6, seed=4)
    s = _scores(**data, persistence=data["forecast"], climatology=data["forecast"], bootstrap=20)
    model_keys = [k for k in s if not k.startswith("tp_skill") and not k.endswith(("_q05", "_q95"))]
    model_keys = [k for k in model_keys if not k.endswith(("_persistence", "_climatology"))]
    for key in model_keys:
        for ref in ("persistence", "climatology"):
            assert s[f"{key}_{ref}"] == pytest.approx(s[key], nan_ok=True)
    assert s["tp_skill_persistence"] == 0 and s["tp_skill_climatology"] == 0


def test_objective_value_is_the_number_tp_scores_reports():
    data = _rain_days(9, seed=5)
    hours = np.zeros(9, dtype=int)
    climate = seeps_climate(data["observed"], np.ones(9, dtype=int), hours)
    for objective in ("tp_rmse", "tp_seeps"):
        s = _scores(**data, seeps=climate, objective=objective)
        months = np.ones(9, dtype=int)
        value = objective_value(
            Objective.parse(objective),
            **data,
            lat=_lat(3),
            months=months,
            hours=hours,
            seeps=climate,
        )
        assert value == s[objective]


def test_samples_with_missing_observations_are_dropped_and_nan_forecasts_score_nan():
    data = _rain_days(5, seed=6)
    holed = {**data, "observed": data["observed"].copy()}
    holed["observed"][2, 1, 1] = np.nan
    kept = {k: v[[0, 1, 3, 4]] for k, v in data.items()}
    assert _scores(**holed)["tp_rmse"] == pytest.approx(_scores(**kept)["tp_rmse"])
    broken = {**data, "forecast": data["forecast"].copy()}
    broken["forecast"][0, 0, 0] = np.nan
    s = _scores(**broken)
    assert np.isnan(s["tp_rmse"]) and np.isnan(s["tp_skill_persistence"])
    assert np.isfinite(s["tp_rmse_persistence"])


def test_numpy_state_mse_equals_the_scores_rmse_squared_by_level():
    rng = np.random.default_rng(3)
    lat = np.linspace(70, 30, 9)
    scale = np.array([1.0, 10.0, 100.0])[None, :, None, None]  # levels of different size
    fc, obs = (rng.normal(size=(5, 3, 9, 12)) * scale for _ in range(2))
    by_level = lat_weighted_mse(fc, obs, lat)
    assert by_level.shape == (3,)
    for j in range(3):
        assert by_level[j] == pytest.approx(lat_weighted_rmse(fc[:, j], obs[:, j], lat) ** 2)
    surface = lat_weighted_mse(fc[:, 0], obs[:, 0], lat)
    assert np.ndim(surface) == 0
    assert surface == pytest.approx(lat_weighted_rmse(fc[:, 0], obs[:, 0], lat) ** 2)


def test_an_unknown_objective_is_refused():
    data = _rain_days(2, seed=7)
    with pytest.raises(ValueError, match="objective"):
        _scores(**data, objective="tp_crps")


# --- SEEPS climate by month and hour ------------------------------------------------------------


def _series(*totals: tuple[int, int, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tp, months, hours) of single-point 6-h totals given as (month, hour, mm)."""
    months, hours, tp = zip(*totals)
    return np.array(tp, dtype=float)[:, None, None], np.array(months), np.array(hours)


def test_seeps_climate_keeps_the_diurnal_cycle_of_dry_nights_and_wet_afternoons():
    tp, months, hours = _series((1, 0, 0.0), (1, 0, 0.0), (1, 12, 2.0), (1, 12, 3.0))
    climate = seeps_climate(tp, months, hours, min_samples=2)
    assert climate.p_dry[0, 0, 0, 0] == 1.0  # 00 UTC, slot 0: always dry
    assert climate.p_dry[0, 2, 0, 0] == 0.0  # 12 UTC, slot 2: always wet
    # wet 2, 3: 2/3 quantile at position (2 - 1) * 2/3 -> 2 + 2/3
    assert climate.light_heavy[0, 2, 0, 0] == pytest.approx(2 + 2 / 3)
    # 06 and 18 UTC have no totals in December..February: the January climate, hours pooled
    assert climate.p_dry[0, [1, 3], 0, 0] == pytest.approx(0.5)


def test_a_sparse_cell_widens_to_the_month_before_and_after_at_the_same_hour():
    tp, months, hours = _series(
        (12, 0, 2.0),  # December wraps round to January's window
        (1, 0, 0.0),
        (2, 0, 4.0),
        (1, 12, 1.0),
        (1, 12, 1.0),
        (1, 12, 1.0),
    )
    climate = seeps_climate(tp, months, hours, min_samples=3)
    # January 00 UTC has 1 total < 3: December..February at 00 UTC give 2.0, 0.0, 4.0, without
    # January's 12 UTC totals. Dry 1 of 3; wet 2, 4: position 2/3 -> 2 + 2/3 * 2 = 10/3
    assert climate.p_dry[0, 0, 0, 0] == pytest.approx(1 / 3)
    assert climate.light_heavy[0, 0, 0, 0] == pytest.approx(10 / 3)
    # January 12 UTC has its 3: its own climate
    assert climate.p_dry[0, 2, 0, 0] == 0.0 and climate.light_heavy[0, 2, 0, 0] == 1.0


def test_a_cell_still_sparse_after_widening_uses_the_month_with_all_hours_pooled():
    tp, months, hours = _series((3, 6, 0.0), (4, 6, 0.5), (3, 18, 5.0), (3, 18, 6.0))
    climate = seeps_climate(tp, months, hours, min_samples=3)
    # March 06 UTC: 1 total; February..April at 06 UTC: 2 < 3. So March at every hour (April's
    # 0.5 left out): 0.0, 5.0, 6.0. Dry 1 of 3; wet 5, 6: position 2/3 -> 5 + 2/3
    assert climate.p_dry[2, 1, 0, 0] == pytest.approx(1 / 3)
    assert climate.light_heavy[2, 1, 0, 0] == pytest.approx(5 + 2 / 3)
    # every March hour is as sparse, so all four share it
    assert climate.p_dry[2, :, 0, 0] == pytest.approx(1 / 3)


def test_seeps_uses_the_climate_of_each_samples_hour():
    # one point, forecast dry (0.05) where 2.0 mm fell. At 12 UTC p1 = 0.4 and the light/heavy
    # threshold is 3 mm (2.0 is light); at the other hours p1 = 0.7 and 1 mm (2.0 is heavy).
    pooled = _climate(np.full((1, 1), 0.7), np.full((1, 1), 1.0))
    p_dry, light_heavy = pooled.p_dry.copy(), pooled.light_heavy.copy()
    p_dry[0, 2], light_heavy[0, 2] = 0.4, 3.0
    by_hour = SeepsClimate(p_dry=p_dry, light_heavy=light_heavy)
    data = {"forecast": np.array([[[0.05]]]), "observed": np.array([[[2.0]]])}
    at_noon = {**data, "lat": np.array([0.0]), "hours": np.array([12])}
    s = _scores(**at_noon, seeps=by_hour)["tp_seeps"]
    assert s == pytest.approx(0.5 / (1 - 0.4))  # dry forecast, light observed
    p3 = (1 - 0.7) / 3  # the pooled climate: dry forecast, heavy observed
    assert _scores(**at_noon, seeps=pooled)["tp_seeps"] == pytest.approx(
        0.5 * (1 / p3 + 1 / (1 - 0.7))
    )
    assert s != _scores(**at_noon, seeps=pooled)["tp_seeps"]
    at_midnight = {**at_noon, "hours": np.array([0])}
    assert (
        _scores(**at_midnight, seeps=by_hour)["tp_seeps"]
        == _scores(**at_midnight, seeps=pooled)["tp_seeps"]
    )


def test_hours_that_are_not_multiples_of_six_are_refused():
    tp, months, hours = _series((1, 0, 0.0), (1, 3, 1.0))
    with pytest.raises(ValueError, match="hours"):
        seeps_climate(tp, months, hours)
    with pytest.raises(ValueError, match="hours"):
        _scores(tp, tp, lat=np.array([0.0]), hours=np.array([0, 7]))


def test_a_climate_without_hour_slots_is_refused():
    flat = SeepsClimate(p_dry=np.full((12, 2, 4), 0.5), light_heavy=np.full((12, 2, 4), 2.0))
    with pytest.raises(ValueError, match="hour slots"):
        _scores(np.zeros((1, 2, 4)), np.zeros((1, 2, 4)), seeps=flat)


# --- per-sample terms and paired differences ---------------------------------------------------


def _terms(objective: str, forecast, observed, climate=None) -> tuple[np.ndarray, np.ndarray]:
    n, n_lat, n_lon = np.shape(observed)
    return objective_terms(
        Objective.parse(objective),
        forecast=forecast,
        observed=observed,
        lat=_lat(n_lat),
        months=np.ones(n, dtype=int),
        hours=np.array(HOURS * n)[:n],
        seeps=climate or _climate(np.full((n_lat, n_lon), 0.5), np.full((n_lat, n_lon), 2.0)),
    )


def test_objective_terms_sum_to_objective_value_and_are_nan_for_missing_observations():
    data = _rain_days(8, seed=8)
    data["observed"][2, 0, 1] = np.nan
    hours = np.array(HOURS * 2)
    climate = seeps_climate(data["observed"], np.ones(8, dtype=int), hours)
    for objective in ("tp_rmse", "tp_seeps"):
        num, den = _terms(objective, **data, climate=climate)
        assert num.shape == den.shape == (8,)
        assert np.isnan(num[2]) and np.isnan(den[2])
        kept = np.arange(8) != 2
        assert np.isfinite(num[kept]).all() and np.isfinite(den[kept]).all()
        total = num[kept].sum() / den[kept].sum()
        value = objective_value(
            Objective.parse(objective),
            **data,
            lat=_lat(3),
            months=np.ones(8, dtype=int),
            hours=hours,
            seeps=climate,
        )
        assert value == (np.sqrt(total) if objective == "tp_rmse" else total)


def test_a_non_finite_forecast_gives_nan_terms_for_every_sample():
    data = _rain_days(3, seed=9)
    data["forecast"][1, 0, 0] = np.inf
    num, den = _terms("tp_rmse", **data)
    assert np.isnan(num).all() and np.isnan(den).all()


def test_tp_scores_hands_out_the_objective_terms_over_all_samples():
    data = _rain_days(5, seed=10)
    data["observed"][3, 1, 2] = np.nan
    for objective in ("tp_rmse", "tp_seeps"):
        terms: dict = {}
        _scores(**data, objective=objective, hours=np.array(HOURS * 2)[:5], terms_out=terms)
        num, den = _terms(objective, **data)
        np.testing.assert_array_equal(terms["num"], num)
        np.testing.assert_array_equal(terms["den"], den)


def test_paired_difference_of_identical_terms_is_exactly_zero():
    data = _rain_days(10, seed=11)
    terms = _terms("tp_seeps", **data)
    seeps = Objective.parse("tp_seeps")
    assert paired_difference(seeps, terms, terms, DAY0 + np.arange(10)) == (0.0, 0.0, 0.0)


def test_paired_difference_of_a_forecast_shifted_up_lies_entirely_above_zero():
    data = _rain_days(30, seed=12)
    b = _terms("tp_rmse", **data)
    a = _terms("tp_rmse", data["forecast"] + 1.0, data["observed"])
    difference, q05, q95 = paired_difference(Objective.parse("tp_rmse"), a, b, DAY0 + np.arange(30))
    assert 0 < q05 <= difference <= q95


def _rmse_resampled(terms, days, seed: int) -> np.ndarray:
    num, den = terms
    resamples = block_bootstrap(days, n_resamples=300, block_days=3, seed=seed)
    return np.array([np.sqrt(num[r].sum() / den[r].sum()) for r in resamples])


def test_paired_interval_is_narrower_than_one_from_independent_resamples():
    rng = np.random.default_rng(13)
    observed = rng.gamma(0.5, 2.0, (40, 3, 4))
    shared = rng.normal(0.0, 1.0, observed.shape) * rng.uniform(0.2, 2.0, (40, 1, 1))
    a = _terms("tp_rmse", observed + shared + rng.normal(0.0, 0.1, observed.shape), observed)
    b = _terms("tp_rmse", observed + shared + rng.normal(0.0, 0.1, observed.shape), observed)
    days = DAY0 + np.arange(40)
    _, q05, q95 = paired_difference(Objective.parse("tp_rmse"), a, b, days, n_resamples=300)
    independent = _rmse_resampled(a, days, seed=1) - _rmse_resampled(b, days, seed=2)
    i05, i95 = np.quantile(independent, [0.05, 0.95])
    assert q95 - q05 < (i95 - i05) / 5


def test_paired_difference_drops_samples_where_either_side_is_nan():
    a = (np.array([1.0, np.nan, 4.0]), np.ones(3))
    b = (np.array([1.0, 9.0, np.nan]), np.ones(3))
    days = DAY0 + np.arange(3)
    assert paired_difference(Objective.parse("tp_seeps"), a, b, days, n_resamples=5) == (
        0.0,
        0.0,
        0.0,
    )


def test_paired_difference_refuses_terms_of_unequal_length():
    a = (np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="same samples"):
        paired_difference(
            Objective.parse("tp_rmse"), a, (np.ones(2), np.ones(2)), DAY0 + np.arange(3)
        )


@pytest.mark.parametrize("window", [1, 5, 11, 17])
@pytest.mark.parametrize("threshold", [0.1, 1.0, 5.0, 50.0])
def test_fss_equals_scores_fss_2d_pooled_over_samples(window, threshold):
    import xarray as xr
    from scores.spatial import fss_2d

    from aurora_sweep.verify.metrics import fss

    rng = np.random.default_rng(int(window * 10 + threshold))
    shape = (7, 17, 23)  # not the demo's grid; the last window spans every latitude
    observed = rng.gamma(0.4, 3.0, shape).astype(np.float32)
    forecast = (observed * rng.lognormal(0, 0.6, shape)).astype(np.float32)
    forecast[2, 3:6, 4:9] = np.nan  # missing points count as no event in both
    expected = fss_2d(
        xr.DataArray(forecast, dims=("time", "latitude", "longitude")),
        xr.DataArray(observed, dims=("time", "latitude", "longitude")),
        event_threshold=threshold, window_size=(window, window),
        spatial_dims=("latitude", "longitude"), threshold_operator=np.greater_equal,
    )  # fmt: skip
    assert fss(forecast, observed, threshold, window) == pytest.approx(float(expected), abs=1e-12)


def test_fss_is_zero_without_events_and_nan_when_no_window_fits():
    from aurora_sweep.verify.metrics import fss

    dry = np.zeros((3, 8, 9))
    assert fss(dry, dry, 1.0, 3) == 0.0  # scores' convention: neither field has an event
    assert np.isnan(fss(dry, dry, 1.0, 9))  # 9 > 8 latitudes
    wet = np.full((3, 8, 9), 2.0)
    assert fss(wet, wet, 1.0, 3) == 1.0 and fss(dry, wet, 1.0, 3) == 0.0


# --- targets other than tp ------------------------------------------------------------------


def test_pr_is_scored_as_tp_over_six_hours_with_seeps_unchanged_and_thresholds_its_own():
    """pr is tp / 6 h: its SEEPS (dry limit a sixth of tp's, climate from pr itself) equals tp's,
    its RMSE is a sixth, and its events are counted at its own thresholds in mm h-1."""
    rng = np.random.default_rng(4)
    train = rng.gamma(0.4, 3.0, (200, 3, 4)) * (rng.random((200, 3, 4)) > 0.4)
    months, hours = np.ones(200, dtype=int), np.zeros(200, dtype=int)
    data = _rain_days(40, seed=5)
    data["forecast"] = np.clip(data["forecast"], 0, None)
    data["persistence"] = np.roll(data["observed"], 1, axis=0)  # yesterday's
    tp = _scores(**data, seeps=seeps_climate(train, months, hours), objective="tp_seeps")
    rate = {k: v / 6 for k, v in data.items()}
    climate = seeps_climate(train / 6, months, hours, dry_threshold=0.1 / 6)
    pr = _scores(**rate, seeps=climate, objective="pr_seeps", target=TARGETS["pr"])
    assert pr["pr_seeps"] == pytest.approx(tp["tp_seeps"], rel=1e-9)
    assert pr["pr_rmse"] == pytest.approx(tp["tp_rmse"] / 6, rel=1e-9)
    assert pr["pr_skill_persistence"] == pytest.approx(tp["tp_skill_persistence"], abs=1e-9)
    assert {"pr_csi_0.02", "pr_csi_1", "pr_fss_0.2_w5"} <= set(pr)
    assert not any(k.startswith("tp_") for k in pr)


def test_soil_moisture_gets_continuous_scores_and_the_anomaly_correlation():
    from aurora_sweep.verify.spatial import anomaly_correlation

    rng = np.random.default_rng(6)
    clim = np.broadcast_to(0.3 + 0.05 * rng.random((1, 3, 4)), (30, 3, 4))
    observed = clim + 0.02 * rng.standard_normal((30, 3, 4))
    forecast = clim + 0.5 * (observed - clim) + 0.01 * rng.standard_normal((30, 3, 4))
    s = _scores(forecast, observed, climatology=clim, seeps=None, objective="swvl1_rmse",
                target=TARGETS["swvl1"])  # fmt: skip
    assert set(s) >= {"swvl1_rmse", "swvl1_mae", "swvl1_bias", "swvl1_acc", "swvl1_acc_persistence"}
    assert not any("seeps" in k or "csi" in k or "fss" in k for k in s)
    assert np.isnan(s["swvl1_acc_climatology"])  # its anomalies are zero: undefined
    # WeatherBench 2's ACC, by hand: per sample, weighted uncentred correlation of anomalies
    w = np.cos(np.deg2rad(_lat(3)))[:, None]
    fa, oa = forecast - clim, observed - clim
    acc = [
        (w * f * o).sum() / np.sqrt((w * f * f).sum() * (w * o * o).sum()) for f, o in zip(fa, oa)
    ]
    assert s["swvl1_acc"] == pytest.approx(np.mean(acc), rel=1e-12)
    assert 0.5 < s["swvl1_acc"] < 1
    assert anomaly_correlation(observed, observed, clim, _lat(3)) == pytest.approx(1.0)
    assert anomaly_correlation(2 * clim - observed, observed, clim, _lat(3)) == pytest.approx(-1.0)
    assert s["swvl1_skill_climatology"] == pytest.approx(
        1 - s["swvl1_rmse"] / s["swvl1_rmse_climatology"]
    )


def test_a_land_only_target_is_scored_on_land_whatever_the_sea_holds():
    """Runoff and soil moisture are land fields: a forecast's sea points, however wrong, and an
    observation NaN or 0 there change none of their scores."""
    rng = np.random.default_rng(8)
    observed = rng.gamma(0.5, 2.0, (20, 3, 4))
    forecast = observed + rng.normal(0.0, 0.5, observed.shape).clip(-observed)
    land = np.zeros((3, 4), dtype=bool)
    land[:, 2:] = True
    kw = dict(objective="ro_rmse", target=TARGETS["ro"], land=land)
    s = _scores(forecast, observed, **kw)
    wrong_at_sea = np.where(land, forecast, 100.0)
    assert _scores(wrong_at_sea, observed, **kw)["ro_rmse"] == pytest.approx(s["ro_rmse"])
    w = np.broadcast_to(np.cos(np.deg2rad(_lat(3)))[:, None], (3, 4))[land]
    per_sample = [
        (w * (f[land] - o[land]) ** 2).sum() / w.sum() for f, o in zip(forecast, observed)
    ]
    assert s["ro_rmse"] == pytest.approx(np.sqrt(np.mean(per_sample)), rel=1e-9)
    events = (forecast[:, land] >= 1) & (observed[:, land] >= 1)
    hits_everywhere = _scores(forecast, observed, objective="ro_rmse", target=TARGETS["ro"])
    assert s["ro_csi_1"] != hits_everywhere["ro_csi_1"] and events.any()
    value = objective_value(Objective.parse("ro_rmse"), forecast=wrong_at_sea, observed=observed, lat=_lat(3),
                            months=np.ones(20, int), hours=np.zeros(20, int), seeps=None,
                            land=land)  # fmt: skip
    assert value == pytest.approx(s["ro_rmse"])


def _rain_box(n: int = 40, shape=(16, 20), seed: int = 3) -> dict:
    """Rain on a box whose forecast is good inside and poor near its edges (a regional model's
    edge zone), with a SEEPS climate that defines the score everywhere."""
    rng = np.random.default_rng(seed)
    observed = rng.gamma(0.4, 3.0, (n, *shape))
    noise = np.full(shape, 4.0)
    noise[3:-3, 3:-3] = 0.2
    forecast = np.maximum(observed + rng.normal(0.0, 1.0, observed.shape) * noise, 0.0)
    climate = _climate(np.full(shape, 0.5), np.full(shape, 2.0))
    return {"forecast": forecast, "observed": observed, "seeps": climate}


def test_interior_scores_are_every_score_on_the_interior_points_alone():
    """With an interior window, each score of the model and of each baseline is the score of
    the same arrays cut to the window, named `_interior`; the whole box's are unchanged."""
    data = _rain_box()
    window = (slice(3, 13), slice(3, 17))
    lat = np.linspace(62.0, 47.0, 16)
    persistence = np.roll(data["observed"], 1, axis=0)
    climatology = np.broadcast_to(data["observed"].mean(axis=0), data["observed"].shape)
    kw = dict(lat=lat, persistence=persistence, objective="tp_seeps", bootstrap=50)
    kw |= dict(climatology=climatology)
    both = _scores(**data, interior=window, **kw)
    whole = _scores(**data, **kw)
    inside = _scores(
        data["forecast"][:, 3:13, 3:17],
        data["observed"][:, 3:13, 3:17],
        seeps=_climate(np.full((10, 14), 0.5), np.full((10, 14), 2.0)),
        lat=lat[3:13],
        persistence=persistence[:, 3:13, 3:17],
        climatology=climatology[:, 3:13, 3:17],
        **{k: v for k, v in kw.items() if k not in ("lat", "persistence", "climatology")},
    )
    assert {k: v for k, v in both.items() if not k.endswith("_interior")} == (
        pytest.approx(whole, nan_ok=True)
    )
    assert {k.removesuffix("_interior"): v for k, v in both.items() if k.endswith("_interior")} == (
        pytest.approx(inside, nan_ok=True)
    )
    # the names the objective gives for the interior are there
    interior = Objective.parse("tp_seeps_interior")
    for name in (interior.name, interior.of("persistence"), interior.skill("climatology"),
                 interior.of("q05"), interior.skill("persistence", "q95")):  # fmt: skip
        assert name in both
    # the edge zone's poor forecast shows: the interior scores better than the whole box
    assert both["tp_seeps_interior"] < both["tp_seeps"] - 0.05
    assert both["tp_rmse_interior"] < 0.5 * both["tp_rmse"]


def test_the_objective_terms_come_from_the_objectives_region():
    data = _rain_box()
    window = (slice(4, 12), slice(4, 16))
    terms, inner = {}, {}
    _scores(**data, interior=window, objective="tp_rmse", terms_out=terms)
    _scores(**data, interior=window, objective="tp_rmse_interior", terms_out=inner)
    cut = _scores(data["forecast"][:, 4:12, 4:16], data["observed"][:, 4:12, 4:16],
                  seeps=False, lat=_lat(16)[4:12], objective="tp_rmse")  # fmt: skip
    assert np.sqrt(terms["num"].mean()) == pytest.approx(
        _scores(**data, objective="tp_rmse")["tp_rmse"]
    )
    assert np.sqrt(inner["num"].mean()) == pytest.approx(cut["tp_rmse"])
    assert not np.allclose(terms["num"], inner["num"])


def test_baselines_scored_once_are_kept_apart_for_the_whole_box_and_the_interior():
    data = _rain_box()
    window = (slice(4, 12), slice(4, 16))
    references: dict = {}
    first = _scores(**data, interior=window, references=references, persistence=data["forecast"])
    assert {"_persistence", "_persistence_interior", "_climatology_interior"} <= set(references)
    # a second trial reads the baselines back: the same numbers, whatever it forecasts
    again = _scores(data["observed"], data["observed"], seeps=data["seeps"], interior=window,
                    references=references)  # fmt: skip
    for name in ("tp_rmse_persistence", "tp_rmse_persistence_interior"):
        assert again[name] == first[name]
    assert first["tp_rmse_persistence"] != first["tp_rmse_persistence_interior"]


@pytest.mark.parametrize("threshold", [0.1, 1.0, 5.0])
def test_contingency_counts_equal_scores_counts_with_missing_points(threshold):
    """`spatial.contingency_counts` is scores' `ThresholdEventOperator` (>=) and
    `transform(reduce_dims="all")`: a point where either field is NaN (a land-only target's
    sea) is in no count; values exactly at the threshold are events."""
    import operator

    from scores.categorical import ThresholdEventOperator

    from aurora_sweep.verify.spatial import contingency_counts

    rng = np.random.default_rng(4)
    forecast = rng.gamma(0.4, 3.0, (6, 9, 11)).round(1)
    observed = rng.gamma(0.4, 3.0, (6, 9, 11)).round(1)
    forecast[:, :2, :3] = np.nan  # sea in both
    observed[0, 5, 5] = np.nan  # one missing observation
    forecast[1, 6, 6] = threshold  # exactly at the threshold
    table = ThresholdEventOperator(default_event_threshold=threshold, default_op_fn=operator.ge)
    fc, ob = (
        xr.DataArray(v, dims=("sample", "latitude", "longitude")) for v in (forecast, observed)
    )
    expected = table.make_contingency_manager(fc, ob).transform(reduce_dims="all").counts
    counts = contingency_counts(forecast, observed, threshold)
    for key, value in counts.items():
        assert value == float(expected[key]), key
    assert sum(counts.values()) == float(expected["total_count"])
