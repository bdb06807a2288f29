"""Every target end to end on the demo world: a 1-trial study trains and scores it, the trial
exports, forecasts a CF NetCDF of it and reports on it (tp's own study, and the search over
several trials: test_study.py)."""

import json
import warnings

import numpy as np
import pytest
import xarray as xr

from aurora_sweep.config.targets import TARGETS

pytestmark = pytest.mark.filterwarnings("ignore")

#: The demo world holds days 1-6 of each month: train on three of January's, validate on the other
#: three (enough for the 24-hour lead; SEEPS's climate of January, pr's too, comes from the
#: train split), forecast in February.
SPANS = {
    "period": '["2022-01-01", "2022-02-06"]',
    "train": '["2022-01-01", "2022-01-03"]',
    "validation": '["2022-01-04", "2022-01-06"]',
    "test": '["2022-02-01", "2022-02-06"]',
}


def _study_config(root, target: str):
    from aurora_sweep.config.study_file import load_config
    from conftest import write_tiny_config

    text = write_tiny_config(root, steps=2).read_text()
    text = text.replace("[model]\n", f'[model]\ntarget = "{target}"\n', 1)
    text = text.replace("data/tiny/store.zarr", f"data/{target}/store.zarr")
    lines = text.splitlines()
    for key, span in SPANS.items():
        lines = [f"{key} = {span}" if line.startswith(f"{key} = [") else line for line in lines]
    # one recipe family is enough here: the search itself is tested on tp's studies
    lines = ['precision = ["fp32"]' if line.startswith("precision = ") else line for line in lines]
    path = root / "tiny.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_config(path, workdir=root)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["pr", "rain_rate", "ro", "sf", "swvl1"])
def test_a_study_of_each_target_trains_scores_exports_forecasts_and_reports(tmp_path, target):
    from aurora_sweep.data.samples import land_mask
    from aurora_sweep.report.best import ranked_trials
    from aurora_sweep.report.evaluate import evaluate_adapter, export_best, report_adapter
    from aurora_sweep.report.forecast import forecast_file
    from aurora_sweep.sweep.records import TrialRecord
    from aurora_sweep.sweep.run import run_study

    spec = TARGETS[target]
    config = _study_config(tmp_path, target)
    assert config.objective.name == spec.objectives[0]  # its natural objective
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_study(config, trials=1)
    best = ranked_trials(config)[0]
    scores = TrialRecord.of(best).scores
    # the scores are the target's, by its kind, at every lead, against both baselines
    for sfx in ("", "_12h", "_24h"):
        for score in (*spec.scores, "mae", "bias"):
            for ref in ("", "_persistence", "_climatology"):
                assert np.isfinite(scores[f"{target}_{score}{ref}{sfx}"]), (score, ref, sfx)
        assert f"{target}_skill_persistence{sfx}" in scores
    assert not any(k.startswith("tp_") for k in scores)
    assert (f"{target}_seeps" in scores) == spec.seeps
    assert (f"{target}_acc" in scores) == (not spec.precipitation_like)
    if spec.precipitation_like:
        assert f"{target}_csi_{spec.thresholds[1]:g}" in scores
        assert f"{target}_fss_{spec.fss_thresholds[0]:g}_w5" in scores
    else:  # soil moisture: the anomaly correlation, undefined for the climatology itself
        assert -1 <= scores[f"{target}_acc"] <= 1
        assert np.isnan(scores.get(f"{target}_acc_climatology", np.nan))

    adapter = export_best(config, tmp_path / "adapter")
    meta = json.loads((adapter / "aurora_sweep.json").read_text())
    assert meta["target_stats"]["target"] == target
    assert meta["target_stats"]["units"] == spec.units
    card = (adapter / "README.md").read_text()
    assert f"({target})" in card and spec.units in card and f'surf_vars["{target}"]' in card
    assert f"the {spec.what}: {spec.each_step} ({spec.units}" in card and "nan" not in card
    if target == "swvl1":  # the climatology's anomaly is 0: its correlation is undefined
        assert "| swvl1_acc_climatology | – |" in card
    again = evaluate_adapter(adapter, split="validation", bootstrap=0)
    assert again[config.objective.name] == pytest.approx(best.value, rel=1e-4)

    nc, n = forecast_file(
        adapter, start="2022-02-02", end="2022-02-02", lead="12h", out=tmp_path / "f.nc"
    )
    with xr.open_dataset(nc) as ds:
        attrs = ds[target].attrs
        values = ds[target].values
        assert "tp" not in ds and ds[target].dims == ("time", "lead_time", "latitude", "longitude")
    assert n == 4 and values.shape[0] == 4
    assert attrs["units"] == spec.units and attrs["standard_name"] == spec.standard_name
    assert attrs["cell_methods"] == spec.lead_attrs()["cell_methods"]
    assert attrs["cell_methods"] == {
        "accumulated": "lead_time: sum", "mean_rate": "lead_time: mean",
        "instantaneous": "lead_time: point",
    }[spec.kind]  # fmt: skip
    land = land_mask(xr.open_zarr(config.data.store)).ravel()
    values = values.reshape(*values.shape[:2], -1)
    if spec.land_only:  # runoff and soil moisture: NaN at sea, where they are not defined
        assert np.isnan(values[..., ~land]).all()
        values = values[..., land]
    assert np.isfinite(values).all() and values.min() >= spec.lower  # within its bounds
    assert spec.upper is None or values.max() <= spec.upper

    page = report_adapter(adapter, split="validation", out=tmp_path / "r.html", bootstrap=20)
    html = page.read_text()
    assert f"{target}_rmse" in html and spec.units in html and "tp_" not in html
    assert ("reliability.png" in html) == spec.precipitation_like
    assert f"{spec.what}, {spec.each_step}, in {spec.units}" in html  # what one value is
