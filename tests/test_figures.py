import matplotlib
import numpy as np
import optuna
import pytest
from matplotlib.contour import ContourSet
from matplotlib.figure import Figure

from aurora_sweep.report.study_plots import skill_vs_memory, study_figures
from aurora_sweep.verify.plots import (
    case_maps,
    loss_curves,
    pick_cases,
    png_bytes,
    point_series,
    reliability,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAT = np.array([52.0, 51.0, 50.0, 49.0])  # descending, as stored
LON = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])  # a box across Greenwich


def renders(fig: Figure) -> bool:
    data = png_bytes(fig, dpi=40)
    return len(data) > 100 and data.startswith(PNG_SIGNATURE)


def a_case(label: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "label": label,
        "time": "2024-01-05 06:00",
        **{
            k: rng.gamma(0.5, 2.0, (LAT.size, LON.size))
            for k in ("observed", "forecast", "persistence")
        },
    }


def land_sea_mask() -> np.ndarray:
    lsm = np.zeros((LAT.size, LON.size))
    lsm[:2, :3] = 1.0  # land in the north-west corner
    return lsm


def a_study(n_complete: int) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    study.optimize(
        lambda t: t.suggest_float("lr", 1e-4, 1e-2, log=True) * 100 + t.suggest_int("rank", 2, 16),
        n_trials=n_complete,
    )
    return study


def memory_rows(study: optuna.Study) -> list[dict]:
    return [
        {"number": t.number, "skill": t.value, "peak_mb": 900.0 + t.number, "label": f"r{t.number}"}
        for t in study.trials
    ]


def test_pick_cases_ranks_samples_by_cos_latitude_weighted_mean():
    lat = np.array([80.0, 0.0])
    observed = np.zeros((3, 2, 2))
    observed[0, 0] = 10.0  # much rain near the pole: wettest by plain mean, not by area
    observed[1, 1] = 3.0  # less rain at the equator, over more area
    observed[2] = 1.0  # a little everywhere
    # weighted means: 10 cos80 / (cos80 + 1) = 1.48, 3 / (cos80 + 1) = 2.56, 1
    assert pick_cases(observed, lat) == {"wet": 1, "median": 0, "dry": 2}


def test_pick_cases_gives_distinct_indices_even_when_every_sample_ties():
    cases = pick_cases(np.ones((3, LAT.size, LON.size)), LAT)
    assert sorted(cases.values()) == [0, 1, 2]


def test_pick_cases_ignores_samples_that_are_all_missing():
    observed = np.ones((3, LAT.size, LON.size))
    observed[1] = np.nan
    observed[2] *= 5.0
    assert pick_cases(observed, LAT) == {"wet": 2, "median": 0, "dry": 0}


def test_loss_curves_draw_training_as_a_line_and_validation_as_markers():
    fig = loss_curves([(s, 1.0 / (s + 1)) for s in range(20)], [(0, 1.0), (10, 0.2), (19, 0.1)])
    (ax,) = fig.axes
    train, val = ax.lines
    assert train.get_linestyle() == "-" and val.get_linestyle() == "None"
    assert val.get_marker() == "o"
    assert renders(fig)


def test_loss_curves_with_no_loss_still_render():
    assert renders(loss_curves([], []))


def test_case_maps_has_twelve_maps_and_two_colorbars_for_three_cases():
    fig = case_maps(
        cases=[a_case(n, i) for i, n in enumerate(("wet", "median", "dry"))],
        lat=LAT,
        lon=LON,
        lsm=land_sea_mask(),
    )
    maps = [ax for ax in fig.axes if ax.collections and ax.get_title()]
    assert len(maps) == 12 and len(fig.axes) == 14
    assert "mm per 6 h" in fig.get_suptitle()
    assert renders(fig)


@pytest.mark.parametrize("n_cases", [1, 3])
def test_case_maps_keeps_every_label_inside_the_figure(n_cases):
    fig = case_maps(
        cases=[a_case(str(i), i) for i in range(n_cases)], lat=LAT, lon=LON, lsm=land_sea_mask()
    )
    fig.canvas.draw()
    drawn = fig.get_tightbbox(fig.canvas.get_renderer())  # inches, what was drawn
    page = fig.bbox_inches
    assert drawn.x0 >= page.x0 and drawn.y0 >= page.y0, (drawn, page)
    assert drawn.x1 <= page.x1 and drawn.y1 <= page.y1, (drawn, page)


def test_case_maps_draws_the_coastline_from_the_land_sea_mask_on_every_panel():
    fig = case_maps(cases=[a_case("wet", 0)], lat=LAT, lon=LON, lsm=land_sea_mask())
    maps = fig.axes[:4]
    assert all(any(isinstance(c, ContourSet) for c in ax.collections) for ax in maps)


def test_case_maps_without_a_mask_draws_no_contour():
    fig = case_maps(cases=[a_case("wet", 0)], lat=LAT, lon=LON, lsm=None)
    assert not any(isinstance(c, ContourSet) for ax in fig.axes for c in ax.collections)


@pytest.mark.parametrize("lon", [LON, np.mod(LON, 360.0)], ids=["-180..180", "0..360 rolled"])
def test_case_maps_puts_longitudes_west_of_greenwich_on_the_negative_axis(lon):
    fig = case_maps(cases=[a_case("wet", 0)], lat=LAT, lon=lon, lsm=land_sea_mask())
    ax = fig.axes[0]
    west, east = ax.get_xlim()
    assert west < -1.9 and east > 1.9 and east - west < 10
    assert ax.xaxis.get_major_formatter()(-2.0, 0) == "2°W"
    assert ax.get_ylim()[0] < ax.get_ylim()[1]  # north up although latitudes descend


def test_case_maps_refuses_a_field_of_the_wrong_shape():
    case = a_case("wet", 0)
    case["forecast"] = case["forecast"].T
    with pytest.raises(ValueError, match="forecast has shape"):
        case_maps(cases=[case], lat=LAT, lon=LON, lsm=None)


def test_skill_vs_memory_highlights_the_most_skilful_trial():
    trials = [
        {"number": 0, "skill": 0.1, "peak_mb": 800.0, "label": "r4 qkv fp32"},
        {"number": 1, "skill": 0.3, "peak_mb": 1200.0, "label": "r8 qkv+proj bf16"},
        {"number": 2, "skill": float("nan"), "peak_mb": 900.0, "label": "failed"},
    ]
    fig = skill_vs_memory(trials)
    (ax,) = fig.axes
    points, best = ax.collections
    assert len(points.get_offsets()) == 2
    assert tuple(best.get_offsets()[0]) == (1200.0, 0.3)
    assert "r8 qkv+proj bf16" in ax.get_legend().get_texts()[1].get_text()
    assert renders(fig)


def test_study_figures_draw_history_importances_and_memory_without_leaking_pyplot_state():
    import matplotlib.pyplot as plt

    study = a_study(6)
    style_before = matplotlib.rcParams["axes.facecolor"]
    figures = study_figures(study, memory_rows(study))
    assert set(figures) == {
        "optimization_history.png",
        "param_importances.png",
        "skill_vs_memory.png",
    }
    assert plt.get_fignums() == []  # nothing left registered in pyplot
    assert matplotlib.rcParams["axes.facecolor"] == style_before  # Optuna's ggplot style undone
    assert all(renders(fig) for fig in figures.values())


def test_study_figures_leave_importances_out_with_one_complete_trial():
    study = a_study(1)
    figures = study_figures(study, memory_rows(study))
    assert "param_importances.png" not in figures
    assert "optimization_history.png" in figures


def test_study_figures_leave_history_out_when_no_trial_completed():
    study = optuna.create_study()
    study.tell(study.ask(), state=optuna.trial.TrialState.PRUNED)
    assert study_figures(study, []) == {}


@pytest.mark.parametrize("several", [False, True], ids=["one forecast", "dict of forecasts"])
def test_reliability_has_a_panel_per_threshold_and_a_frequency_panel(several):
    rng = np.random.default_rng(0)
    observed = rng.gamma(0.4, 2.0, 2000)
    model = observed * rng.lognormal(0.0, 0.5, observed.shape)
    forecast = {"model": model, "persistence": np.roll(observed, 1)} if several else model
    fig = reliability(forecast, observed, thresholds=(0.1, 1.0, 5.0))
    twins = 3  # each threshold panel has a faint count axis
    assert len(fig.axes) == 3 + twins + 1
    assert renders(fig)


def test_point_series_draws_the_observation_as_stems_and_the_others_as_lines():
    times = np.arange("2024-01-01T06", "2024-01-03T06", np.timedelta64(6, "h"), "datetime64[h]")
    rng = np.random.default_rng(0)
    series = {
        name: rng.gamma(0.5, 2.0, times.size) for name in ("observed", "model", "persistence")
    }
    fig = point_series(times, series, title="52°N 0°E")
    (ax,) = fig.axes
    assert len(ax.collections) == 1  # the observed stems
    assert len(ax.lines) == 4  # a line and its markers for each of the two forecasts
    assert renders(fig)


def test_point_series_draws_soil_moisture_observed_as_a_line_on_an_axis_fitting_its_range():
    from aurora_sweep.config.targets import TARGETS

    days = np.array(["2024-01-01T06", "2024-01-01T12", "2024-02-01T06", "2024-02-01T12"])
    series = {"observed": np.array([0.30, 0.31, 0.29, 0.30]), "model": np.full(4, 0.305)}
    fig = point_series(days, series, title="soil", target=TARGETS["swvl1"])
    (ax,) = fig.axes
    assert not ax.collections  # no stems from 0
    observed = ax.lines[0]
    assert observed.get_label() == "observed"
    assert np.isnan(np.asarray(observed.get_ydata(), dtype=float)[2])  # broken at the gap
    assert ax.get_ylim()[0] > 0.2  # the axis fits 0.29..0.31, not 0..0.31
    assert "m3 m-3" in ax.get_ylabel()


def test_point_series_breaks_its_lines_where_the_samples_have_a_gap():
    days = np.array(["2024-01-01T06", "2024-01-01T12", "2024-02-01T06", "2024-02-01T12"])
    series = {"observed": np.ones(4), "model": np.arange(4.0)}
    fig = point_series(days, series, title="gap")
    line = fig.axes[0].lines[0]
    y = np.asarray(line.get_ydata(), dtype=float)
    assert np.isnan(y[2]) and np.isfinite(y[[0, 1, 3]]).all()


def test_png_bytes_closes_a_figure_pyplot_knows():
    import matplotlib.pyplot as plt

    fig, _ = plt.subplots()
    assert png_bytes(fig).startswith(PNG_SIGNATURE)
    assert fig.number not in plt.get_fignums()
