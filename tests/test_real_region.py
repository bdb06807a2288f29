"""A study on CDS files for a box crossing 0°: `data import`, then `run`, through the CLI."""

import warnings

import numpy as np
import optuna
import pytest
from typer.testing import CliRunner

from aurora_sweep.cli import app
from aurora_sweep.config.study_file import load_config
from aurora_sweep.data.demo import DemoWorld, write_cds_files
from aurora_sweep.data.store import open_store
from aurora_sweep.sweep.records import TrialRecord

STUDY = """
[study]
name = "across-greenwich"
finalists = 1

[data]
source = "era5"
region = { north = 56.0, south = 41.0, west = -8.0, east = 7.0 }
levels = [500, 700, 850]
grid = 1.0
period = ["2022-01-01", "2023-12-31"]
train = ["2022-01-01", "2022-12-31"]
validation = ["2023-01-01", "2023-06-30"]
test = ["2023-07-01", "2023-12-31"]

[model]
base = "demo"

[train]
steps = 3
eval_every = 3
val_samples = 8

[search]
lora_rank = [2]
batch_size = [2]
precision = ["fp32"]
"""


@pytest.mark.slow
def test_a_box_crossing_greenwich_imports_and_runs_end_to_end(tmp_path, monkeypatch):
    # CDS-layout files for 8°W..7°E, with longitudes in -180..180 as regional requests return them
    files = write_cds_files(
        tmp_path / "downloads",
        DemoWorld(north=56.0, west=-8.0, rows=16, cols=16, first_year=2022, last_year=2023),
    )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "study.toml").write_text(STUDY)
    runner = CliRunner()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = runner.invoke(app, ["data", "import", *map(str, files), "-c", "study.toml"])
        assert result.exit_code == 0, result.output
        config = load_config(tmp_path / "study.toml", workdir=tmp_path)
        cube = open_store(config.data.store)
        lon = cube["longitude"].values
        assert lon[0] == -8.0 and lon[-1] == 7.0 and np.all(np.diff(lon) > 0)
        result = runner.invoke(app, ["run", "-c", "study.toml", "--trials", "1"])
        assert result.exit_code == 0, result.output
    trial = optuna.load_study(study_name="across-greenwich", storage=config.storage).trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert np.isfinite(trial.value) and "tp_skill_climatology" in TrialRecord.of(trial).scores
    from mlflow.tracking import MlflowClient

    from aurora_sweep.sweep.tracking import tracking_uri

    client = MlflowClient(tracking_uri(config))
    parent = client.get_run(
        client.get_run(trial.user_attrs["mlflow_run_id"]).data.tags["mlflow.parentRunId"]
    )
    assert parent.data.tags["data.lon_shift_deg"] == "8.0"
