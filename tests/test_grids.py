"""Trials outside the demo's grid: every shipped study's shape, and AuroraSmallPretrained at 0.25°.

Regions between whole degrees at 0.25° have 4k+1 rows; Aurora forecasts 4k of them. These tests
run trials on exactly those shapes, so a forecast and its target can never disagree by a row.
"""

import datetime as dt
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from typer.testing import CliRunner

from aurora_sweep.cli import app
from aurora_sweep.config.recipe import BaseKey, TrialConfig
from aurora_sweep.config.study_file import load_config
from aurora_sweep.config.targets import TARGETS
from aurora_sweep.data.samples import patch_crop
from aurora_sweep.data.store import open_store
from aurora_sweep.data.trial_data import TrialData
from aurora_sweep.model.build import build_base
from aurora_sweep.model.files import DEMO_CHECKPOINT
from aurora_sweep.sweep.records import TrialRecord
from aurora_sweep.train.fit import fit
from aurora_sweep.verify.prepare import base_state_mse
from synthetic import write_region_store

pytestmark = pytest.mark.filterwarnings("ignore")
SHIPPED = sorted((Path(__file__).parents[1] / "sweep").glob("*.toml"))
CPU = torch.device("cpu")


def test_every_shipped_study_is_found():
    assert {p.stem for p in SHIPPED} >= {"demo", "europe-tp", "north-america-tp", "europe-ro"}


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_a_trial_runs_on_the_grid_of_every_shipped_study(path, tmp_path):
    config = load_config(path, workdir=tmp_path)
    d = config.data
    # two days a split: a 24-hour lead's sample spans 42 hours (three steps of history)
    starts = (d.train.start, d.validation.start, d.test.start)
    days = [str(day + dt.timedelta(days=k)) for day in starts for k in (0, 1)]
    write_region_store(d, d.store, days=days)
    cube = open_store(d.store)
    rows, cols = patch_crop(cube.sizes["latitude"], cube.sizes["longitude"])
    data = TrialData.prepare(cube, config)
    # the tiny demo base on the study's full grid and levels: the shapes are what is tested here
    data.base_mse = {
        str(BaseKey("demo", "fp32")): base_state_mse(
            data, base="demo", checkpoint=DEMO_CHECKPOINT, device=CPU
        )
    }
    trial = TrialConfig(
        lora_rank=2, lora_targets="qkv", unfrozen_blocks=0, batch_size=1, precision="fp32",
        learning_rate=1e-3, activation_checkpointing=False, base="demo", levels=d.levels,
        steps=1, eval_every=1, val_samples=2, weight_decay=0.0, seed=0,
    )  # fmt: skip
    result = fit(trial, data, checkpoint=DEMO_CHECKPOINT, device=CPU, bootstrap=20)
    n = len(data.validation)
    assert result.forecasts.values.shape == (n, rows, cols)
    assert data.validation.observed(np.arange(n)).shape == (n, rows, cols)
    assert np.isfinite(result.metrics[config.objective.name])
    land = data.validation.scored_points  # runoff: scored on land only
    assert (land is not None) == TARGETS[d.target].land_only
    assert land is None or 0 < land.sum() < land.size
    if land is not None:  # the loss's truth is NaN at sea (left out); the inputs read 0 there
        batch, truth = data.train.training_batch([0])
        values = truth[d.target].numpy()[0]
        assert np.isnan(values[~land]).all() and np.isfinite(values[land]).all()
        assert torch.isfinite(batch.surf_vars[d.target]).all()
    assert {f"forget_{v}{lv}_ratio" for v in "zuvtq" for lv in d.levels} <= set(result.metrics)
    assert all(np.isfinite(v) for k, v in result.metrics.items() if k.startswith("forget_"))


SMALL_STUDY = """
[study]
name = "small-025"
finalists = 1
edge_margin = 2.0  # 8 points of 0.25° in from each side: a 16x16 interior
reference = false  # one LoRA trial: the reference full fine-tune is not what this tests

[data]
source = "era5"
store = "store.zarr"
# 33 rows at 0.25° (4k+1, as every box between whole degrees), 32 columns
region = {{ north = 50.0, south = 42.0, west = 2.0, east = 9.75 }}
levels = {levels}
grid = 0.25
period = ["2022-01-01", "2025-12-31"]

[model]
base = "small-pretrained"

[train]
steps = 2
eval_every = 1
val_samples = 2

[search]
lora_rank = [2]
batch_size = [1]
precision = ["fp32"]
"""


@pytest.mark.slow
def test_small_pretrained_runs_a_trial_on_a_025_degree_box_with_4k_plus_1_rows(
    tmp_path, monkeypatch
):
    """As a new user would: a local checkpoint, one pressure level out of a store with two."""
    monkeypatch.chdir(tmp_path)
    torch.save(
        build_base("small-pretrained", with_target=False).state_dict(), tmp_path / "small.ckpt"
    )
    (tmp_path / "study.toml").write_text(SMALL_STUDY.format(levels="[500, 850]"))
    store_config = load_config(tmp_path / "study.toml", workdir=tmp_path)
    write_region_store(
        store_config.data, store_config.data.store, days=["2022-01-03", "2024-01-03", "2025-01-03"]
    )
    (tmp_path / "study.toml").write_text(SMALL_STUDY.format(levels="[500]"))
    result = CliRunner().invoke(
        app, ["run", "-c", "study.toml", "--trials", "1", "--checkpoint", "small.ckpt"]
    )
    assert result.exit_code == 0, result.output
    config = load_config(tmp_path / "study.toml", workdir=tmp_path)
    (trial,) = optuna.load_study(study_name="small-025", storage=config.storage).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs
    assert np.isfinite(trial.value)
    scores = TrialRecord.of(trial).scores
    assert "forget_z500_ratio" in scores and "forget_z850_ratio" not in scores


def _batch(rows: int, cols: int, levels=(500, 850)):
    import datetime as dt

    from aurora import Batch, Metadata

    g = torch.Generator().manual_seed(rows * 1000 + cols)
    return Batch(
        surf_vars={k: torch.randn(1, 2, rows, cols, generator=g) for k in ("2t", "10u", "10v", "msl", "tp")},
        static_vars={k: torch.randn(rows, cols, generator=g) for k in ("lsm", "z", "slt")},
        atmos_vars={
            k: torch.randn(1, 2, len(levels), rows, cols, generator=g) for k in ("z", "u", "v", "t", "q")
        },
        metadata=Metadata(
            lat=torch.linspace(70, 70 - 0.25 * (rows - 1), rows),
            lon=torch.linspace(0, 0.25 * (cols - 1), cols),
            time=(dt.datetime(2024, 1, 1, 6),),
            atmos_levels=levels,
        ),
    )  # fmt: skip


def test_every_grid_patch_crop_accepts_forwards_through_the_demo_base():
    """Rows 12–64 by columns 12–128 in steps of 4, at batch size 1 (where a window partition
    across all latent levels once failed on Aurora's `view`), and the 4k+1 shapes that
    `patch_crop` trims to them."""
    from aurora_sweep.model.build import load_base_checkpoint

    model = build_base("demo", stats=(0.0, 1.0))
    load_base_checkpoint(model, DEMO_CHECKPOINT)
    model.eval()
    failed = []
    with torch.no_grad():
        for n_lat in range(12, 65, 4):
            for n_lon in range(12, 129, 4):
                rows, cols = patch_crop(n_lat + 1, n_lon + 3)
                assert (rows, cols) == (n_lat, n_lon)
                try:
                    pred = model(_batch(rows, cols))
                except Exception as e:  # noqa: BLE001 - collect every failing shape
                    failed.append((rows, cols, str(e)[:60]))
                    continue
                assert pred.surf_vars["tp"].shape == (1, 1, rows, cols)
                assert torch.isfinite(pred.surf_vars["tp"]).all()
    assert not failed, failed


@pytest.mark.parametrize("n", [4, 8, 11])
def test_a_grid_smaller_than_the_backbone_takes_is_refused_by_name(n):
    from aurora_sweep.errors import AuroraSweepError

    with pytest.raises(AuroraSweepError, match="at least 12x12"):
        patch_crop(n, 40)
    with pytest.raises(AuroraSweepError, match="at least 12x12"):
        patch_crop(40, n)
