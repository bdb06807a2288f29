"""The targets' time semantics, known answers on hand-made hourly values: a 6-hour total is the
sum of the six hours ending at the model time, a mean rate their mean per hour, an
instantaneous value the field at the model time itself; a step missing a field is NaN."""

from __future__ import annotations

import numpy as np
import pytest

from aurora_sweep.config.targets import ACCUMULATED, INSTANTANEOUS, MEAN_RATE, TARGETS

T = 1_700_006_400  # a model time (18 UTC), seconds since 1970
HOUR = 3600


def _steps(target, fields: dict[tuple[str, int], float]) -> dict[int, float]:
    """Each model time's value from hourly fields {(short name, valid time): value}, entered
    as the import enters them (`step_of`, then `finish`)."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for (_, t), value in fields.items():
        step = target.step_of(t)
        if step is not None:
            sums[step] = sums.get(step, 0.0) + value
            counts[step] = counts.get(step, 0) + 1
    return {k: float(target.finish(np.array(sums[k]), counts[k])) for k in sums}


def _hourly(short: str, first: int, last: int) -> dict[tuple[str, int], float]:
    """Hour h (valid at T + h hours) holds h + 10 (in the file's units)."""
    return {(short, T + h * HOUR): h + 10.0 for h in range(first, last + 1)}


def test_a_6_hour_total_is_the_sum_of_the_six_hours_ending_at_the_model_time():
    tp = TARGETS["tp"]
    assert tp.kind == ACCUMULATED and tp.cell_methods == "time: sum"
    values = _steps(tp, _hourly("tp", -5, 6))  # (T - 6 h, T] and (T, T + 6 h]
    assert values[T] == pytest.approx(1000 * sum(h + 10 for h in range(-5, 1)))  # mm
    assert values[T + 6 * HOUR] == pytest.approx(1000 * sum(h + 10 for h in range(1, 7)))


def test_a_mean_rate_is_the_mean_of_the_same_six_hours_per_hour():
    pr = TARGETS["pr"]
    assert pr.kind == MEAN_RATE and pr.units == "mm h-1" and pr.cell_methods == "time: mean"
    values = _steps(pr, _hourly("tp", -5, 0))
    assert values[T] == pytest.approx(1000 * np.mean([h + 10 for h in range(-5, 1)]))
    # the same hours as tp's total, over six hours
    assert values[T] == pytest.approx(_steps(TARGETS["tp"], _hourly("tp", -5, 0))[T] / 6)


def test_an_instantaneous_value_is_the_fields_at_the_model_time_itself():
    rain = TARGETS["rain_rate"]
    assert rain.kind == INSTANTANEOUS and rain.cell_methods == "time: point"
    fields = _hourly("crr", -5, 6) | _hourly("lsrr", -5, 6)
    values = _steps(rain, fields)
    assert set(values) == {T, T + 6 * HOUR}  # the hours between enter no step
    # convective + large-scale, kg m-2 s-1 -> mm h-1, at T: hour 0 holds 10 in both
    assert values[T] == pytest.approx(3600 * (10.0 + 10.0))
    soil = TARGETS["swvl1"]
    assert _steps(soil, _hourly("swvl1", -1, 1)) == {T: pytest.approx(10.0)}
    assert (soil.lower, soil.upper) == (0.0, 0.766)


def test_a_step_missing_one_of_its_fields_is_nan():
    tp_fields = _hourly("tp", -5, 0)
    del tp_fields[("tp", T - 2 * HOUR)]
    assert np.isnan(_steps(TARGETS["tp"], tp_fields)[T])
    rain = _hourly("crr", 0, 0)  # the large-scale rain rate is missing
    assert np.isnan(_steps(TARGETS["rain_rate"], rain)[T])


def test_every_target_says_what_the_cds_calls_it_and_what_it_means():
    assert set(TARGETS) == {"tp", "pr", "rain_rate", "ro", "sf", "swvl1"}
    for name, t in TARGETS.items():
        assert t.name == name and t.sources and t.units and t.standard_name and t.long_name
        assert all(cds and short for cds, short in t.sources)
        assert t.seeps <= t.precipitation_like  # SEEPS only where precipitation scores apply
    assert [t.name for t in TARGETS.values() if t.seeps] == ["tp", "pr"]


def test_a_study_names_its_target_its_objective_follows_and_mismatches_are_refused(tmp_path):
    from aurora_sweep.config.study_file import load_config
    from aurora_sweep.errors import AuroraSweepError
    from conftest import write_tiny_config

    path = write_tiny_config(tmp_path)
    text = path.read_text()
    config = load_config(path, workdir=tmp_path)
    assert (config.data.target, config.objective.name) == ("tp", "tp_seeps")  # the defaults
    path.write_text(text.replace("[model]\n", '[model]\ntarget = "ro"\n', 1))
    config = load_config(path, workdir=tmp_path)
    # runoff has no SEEPS: its natural objective is its RMSE, and the skills are named for it
    assert (config.data.target, config.objective.name) == ("ro", "ro_rmse")
    assert config.objective.skill("persistence") == "ro_skill_persistence"
    rain = text.replace("[model]\n", '[model]\ntarget = "rain_rate"\n', 1)
    assert load_config(_write(path, rain), workdir=tmp_path).objective_metric == "rain_rate_rmse"
    pr = text.replace("[model]\n", '[model]\ntarget = "pr"\n', 1)
    assert load_config(_write(path, pr), workdir=tmp_path).objective.name == "pr_seeps"
    wrong = text.replace("[study]\n", '[study]\nobjective = "tp_seeps"\n', 1)
    _write(path, wrong.replace("[model]\n", '[model]\ntarget = "ro"\n', 1))
    with pytest.raises(AuroraSweepError, match=r"'tp_seeps' is not one of ro_rmse.*target ro"):
        load_config(path, workdir=tmp_path)
    path.write_text(text.replace("[model]\n", '[model]\ntarget = "rainrate"\n', 1))
    with pytest.raises(AuroraSweepError, match=r"not a target; did you mean rain_rate\?"):
        load_config(path, workdir=tmp_path)
    v15 = text.replace('[model]\nbase = "demo"', '[model]\nbase = "v1.5"\ntarget = "swvl1"')
    with pytest.raises(AuroraSweepError, match="v1.5 base forecasts Aurora 1.5's own.*swvl1"):
        load_config(_write(path, v15), workdir=tmp_path)
    v15 = text.replace('[model]\nbase = "demo"', '[model]\nbase = "v1.5"\ntarget = "ro"')
    with pytest.raises(AuroraSweepError, match="predict tp or pr with it"):
        load_config(_write(path, v15), workdir=tmp_path)
    v15 = text.replace('[model]\nbase = "demo"', '[model]\nbase = "v1.5"\ntarget = "pr"')
    assert load_config(_write(path, v15), workdir=tmp_path).data.target == "pr"


def test_a_study_keeps_its_target_another_is_refused_in_one_line(tmp_path):
    from aurora_sweep.config.study_file import load_config
    from aurora_sweep.errors import AuroraSweepError
    from aurora_sweep.sweep.storage import open_study
    from conftest import write_tiny_config

    path = write_tiny_config(tmp_path)
    text = path.read_text()
    assert open_study(load_config(path, workdir=tmp_path)).metric_names == ["tp_seeps"]
    _write(path, text.replace("[model]\n", '[model]\ntarget = "swvl1"\n', 1))
    with pytest.raises(AuroraSweepError, match=r"minimises tp_seeps, not swvl1_rmse: give the "
                       r"study a new \[study\] name, or put .*\[model\] target back"):  # fmt: skip
        open_study(load_config(path, workdir=tmp_path))


def _write(path, text: str):
    path.write_text(text)
    return path


def test_each_kind_combines_a_leads_steps_its_own_way_in_numpy_and_torch():
    import torch

    parts = np.array([[[1.0], [2.0], [6.0]]])  # one sample, three steps, one point
    assert TARGETS["tp"].over_lead(parts)[0, 0] == 9.0  # a total
    assert TARGETS["pr"].over_lead(parts)[0, 0] == 3.0  # a mean rate
    assert TARGETS["rain_rate"].over_lead(parts)[0, 0] == 6.0  # the value at the valid time
    total = None
    for step, value in enumerate((1.0, 2.0, 6.0), start=1):  # as a rollout adds its steps
        total = TARGETS["pr"].accumulate(total, torch.tensor([value]), step)
    assert float(total) == pytest.approx(3.0)
    assert TARGETS["pr"].per_lead(0.25, 24) == pytest.approx(0.25 / 24)
    raw = np.array([-0.1, 0.3, 0.9])
    np.testing.assert_array_equal(TARGETS["swvl1"].within_bounds(raw), [0.0, 0.3, 0.766])
    assert TARGETS["ro"].within_bounds(torch.tensor([-1.0, 50.0])).tolist() == [0.0, 50.0]
    assert TARGETS["tp"].per_lead(0.25, 24) == 0.25


def test_a_forecasts_cf_attributes_follow_the_targets_kind():
    assert TARGETS["tp"].lead_attrs() == {
        "standard_name": "lwe_thickness_of_precipitation_amount", "units": "mm",
        "long_name": "total precipitation over the lead time, ending at valid_time",
        "cell_methods": "lead_time: sum",
    }  # fmt: skip
    assert TARGETS["pr"].lead_attrs()["cell_methods"] == "lead_time: mean"
    swvl1 = TARGETS["swvl1"].lead_attrs()
    assert swvl1["cell_methods"] == "lead_time: point" and swvl1["units"] == "m3 m-3"
    assert swvl1["long_name"].endswith("(0-7 cm) at valid_time")
    assert TARGETS["swvl1"].each_step == "the value at each time"
    assert TARGETS["pr"].each_step == "the mean rate over the 6 hours ending at each time"
    assert TARGETS["ro"].each_step == "the total over the 6 hours ending at each time"


def test_a_metric_names_its_target_even_one_with_an_underscore():
    from aurora_sweep.config.objective import Objective
    from aurora_sweep.config.targets import of_metric

    assert of_metric("rain_rate_rmse_24h").name == "rain_rate"
    assert of_metric("tp_seeps").name == "tp" and of_metric("ro_rmse").name == "ro"
    rain = Objective.parse("rain_rate_rmse_24h")
    assert (rain.target, rain.score, rain.lead, rain.name) == ("rain_rate", "rmse", 4, str(rain))
    assert Objective.parse("swvl1_rmse").skill("climatology") == "swvl1_skill_climatology"
    assert rain.at(1).of("q05") == "rain_rate_rmse_q05" and rain.skill("persistence", "q95") == (
        "rain_rate_skill_persistence_q95_24h"
    )
    inner = Objective.parse("rain_rate_rmse_interior_24h")
    assert (inner.target, inner.score, inner.lead, inner.interior) == ("rain_rate", "rmse", 4, True)
    assert inner.name == "rain_rate_rmse_interior_24h" and inner.on(False) == rain
    assert inner.of("persistence") == "rain_rate_rmse_persistence_interior_24h"
    assert inner.skill("climatology", "q05") == "rain_rate_skill_climatology_q05_interior_24h"
    with pytest.raises(ValueError, match="names no target"):
        of_metric("peak_memory_mb")
    for wrong in ("peak_memory_mb", "tp_crps", "tp_seeps_36h", "seeps", "tp_interior_seeps"):
        with pytest.raises(ValueError, match="names no target's objective"):
            Objective.parse(wrong)


def test_a_targets_normalisation_is_centred_where_its_row_says():
    """Precipitation-like targets from their bound (0: Aurora's clamp then sits there), soil
    moisture about its train mean with no clamp, as Aurora normalises its own variables."""
    import datetime as dt

    import pandas as pd
    import xarray as xr

    from aurora_sweep.config.study import Period
    from aurora_sweep.data.samples import target_stats
    from aurora_sweep.model.build import build_base

    times = pd.date_range("2022-01-01", periods=8, freq="6h")
    values = np.linspace(0.2, 0.4, 8)[:, None, None] * np.ones((8, 2, 2))
    train = Period(dt.date(2022, 1, 1), dt.date(2022, 1, 2))
    for name, location in (("swvl1", 0.3), ("ro", 0.0)):
        cube = xr.Dataset(
            {name: (("time", "latitude", "longitude"), values),
             "static_lsm": (("latitude", "longitude"), np.ones((2, 2)))}, {"time": times},
        )  # fmt: skip
        stats = target_stats(cube, train, name)
        assert stats.location == pytest.approx(location) and stats.mean == pytest.approx(0.3)
        assert stats.scale == pytest.approx(values.std())
        model = build_base("demo", target=name, stats=(stats.location, stats.scale))
        assert model.target_name == name and name in model.surf_vars
        assert (name in model.positive_surf_vars) == (name == "ro")
