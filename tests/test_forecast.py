"""`aurora-sweep forecast`: an adapter's forecasts as a CF-1.8 NetCDF file, checked with xarray
against `load_finetuned` run on the same inputs."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from typer.testing import CliRunner

from aurora_sweep.cli import app
from aurora_sweep.data.samples import Samples
from aurora_sweep.data.store import open_store
from aurora_sweep.model.adapter import load_finetuned
from synthetic import tiny_lora_trial, trained_tiny_adapter

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_store):
    """A LoRA adapter of the tiny study, trained for two steps."""
    return trained_tiny_adapter(tmp_path_factory.mktemp("forecast"), tiny_store, tiny_lora_trial())


def _first_test_day(config) -> str:
    times = pd.DatetimeIndex(open_store(config.data.store)["time"].values)
    return str(times[times >= pd.Timestamp(config.data.test.start)][0].date())


def _forecast(adapter, day: str, lead: str, out) -> xr.Dataset:
    args = ["forecast", str(adapter), "--start", day, "--end", day, "--lead", lead]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return xr.open_dataset(out)


def test_a_6h_forecast_file_holds_what_load_finetuned_forecasts(adapter, tmp_path):
    path, config = adapter
    day = _first_test_day(config)
    ds = _forecast(path, day, "6h", tmp_path / "f.nc")

    assert ds.attrs["Conventions"] == "CF-1.8"
    assert len(ds.attrs["base_checkpoint_sha256"]) == 64 and "aurora-sweep" in ds.attrs["software"]
    assert ds["tp"].attrs["units"] == "mm" and ds["t2m"].attrs["units"] == "K"
    assert ds["latitude"].attrs["units"] == "degrees_north"
    assert ds["longitude"].attrs["units"] == "degrees_east"
    assert ds["pressure_level"].values.tolist() == [500.0, 700.0, 850.0]
    lead = ds["lead_time"].values
    assert lead.tolist() == [np.timedelta64(6, "h").astype("timedelta64[ns]")]
    np.testing.assert_array_equal(ds["valid_time"].values[:, 0], ds["time"].values + lead[0])
    assert all(str(t)[:10] == day for t in ds["time"].values)

    # the same init times, through the sample path and load_finetuned
    data = dataclasses.replace(config.data, test=config.data.test.__class__(
        pd.Timestamp(day).date(), pd.Timestamp(day).date()))  # fmt: skip
    samples = Samples(open_store(config.data.store), data, "test", target=False)
    init = samples.times[samples.index]
    np.testing.assert_array_equal(ds["time"].values, init.values)
    np.testing.assert_array_equal(ds["latitude"].values, samples.cube["latitude"].values)
    np.testing.assert_array_equal(ds["longitude"].values, samples.cube["longitude"].values)
    model = load_finetuned(path)
    with torch.no_grad():
        pred = model(samples.inputs(np.arange(len(samples))))
    np.testing.assert_allclose(
        ds["tp"].values[:, 0], pred.surf_vars["tp"][:, 0].numpy(), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        ds["z"].values[:, 0, 2], pred.atmos_vars["z"][:, 0, 2].numpy(), rtol=1e-4
    )
    assert (ds["tp"].values >= 0).all()


def test_a_24h_forecast_rolls_out_and_accumulates_tp(adapter, tmp_path):
    path, config = adapter
    day = _first_test_day(config)
    six = _forecast(path, day, "6h", tmp_path / "6.nc")
    day4 = _forecast(path, day, "24h", tmp_path / "24.nc")
    assert day4["lead_time"].values[0] == np.timedelta64(24, "h")
    # the first of four steps is the 6-hour forecast; tp only adds up from there
    assert (day4["tp"].values >= six["tp"].values - 1e-4).all()
    assert float(day4["tp"].mean()) > float(six["tp"].mean())
    assert not np.allclose(day4["t2m"].values, six["t2m"].values)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lead", "5h"], "multiple of 6 hours"),
        (["--start", "2024-13-01"], "YYYY-MM-DD"),
        (["--start", "2024-02-01", "--end", "2024-01-01"], "before --start"),
        (["--start", "2030-01-01", "--end", "2030-01-02"], "no time from 2030-01-01"),
    ],
)
def test_a_bad_forecast_request_is_one_line(adapter, tmp_path, args, message):
    path, _ = adapter
    opts = {"--start": "2024-01-01", "--end": "2024-01-02", **dict(zip(args[::2], args[1::2]))}
    flat = [x for kv in opts.items() for x in kv]
    result = CliRunner().invoke(app, ["forecast", str(path), *flat, "--out", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()
