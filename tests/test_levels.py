"""Levels as a lever: a trial trains, is scored and forecasts on a subset of the store's pressure
levels (`[search] levels`), and its forgetting is measured against the base on those levels."""

from __future__ import annotations

import dataclasses

import numpy as np
import optuna
import pytest
import torch
import xarray as xr
from typer.testing import CliRunner

from aurora_sweep.cli import app
from aurora_sweep.config.recipe import BaseKey
from aurora_sweep.config.study_file import load_config
from aurora_sweep.data.samples import Samples
from aurora_sweep.data.store import open_store
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.memory import estimate as memory
from aurora_sweep.model.adapter import load_finetuned
from aurora_sweep.sweep.space import enqueue_references, reference_trial, sample_trial
from conftest import write_tiny_config
from synthetic import tiny_lora_trial, trained_tiny_adapter

pytestmark = pytest.mark.filterwarnings("ignore")


def _with_search(tmp_path, tiny_store, lines: str):
    path = write_tiny_config(tmp_path, store=tiny_store)
    path.write_text(path.read_text().replace("[search]", "[search]\n" + lines))
    return load_config(path, workdir=tmp_path)


def test_search_levels_are_subsets_of_the_stores_in_its_order(tmp_path, tiny_store):
    config = _with_search(tmp_path, tiny_store, "levels = [[850, 500], [500]]")
    assert config.level_choices == ((500, 850), (500,))
    one = _with_search(tmp_path, tiny_store, "levels = [850]")  # one list: one subset
    assert one.level_choices == ((850,),)
    plain = load_config(write_tiny_config(tmp_path, store=tiny_store), workdir=tmp_path)
    assert plain.level_choices == ((500, 700, 850),)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[[500], [250]]", "250 hPa not in [data] levels [500, 700, 850]"),
        ("[[500, 500]]", "listed twice"),
        ("[[500], [500]]", "[500] is listed twice"),
        ("[[]]", "lists of pressure levels"),
        ('"500"', "lists of pressure levels"),
    ],
)
def test_a_bad_levels_search_is_refused_in_one_line(tmp_path, tiny_store, value, message):
    with pytest.raises(AuroraSweepError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _with_search(tmp_path, tiny_store, f"levels = {value}")


@pytest.mark.parametrize("in_memory", [True, False])
def test_samples_on_a_subset_read_what_samples_of_those_levels_read(tiny_config, in_memory):
    cube = open_store(tiny_config.data.store)
    full = Samples(cube, tiny_config.data, "train", in_memory=in_memory)
    subset = full.with_levels((500, 850))
    direct = Samples(
        cube, dataclasses.replace(tiny_config.data, levels=(500, 850)), "train",
        in_memory=in_memory,
    )  # fmt: skip
    assert subset.lazy == direct.lazy == (not in_memory)
    assert subset.levels == direct.levels == (500, 850)
    for a, b in [(subset, direct), (subset.at_lead(4), direct.at_lead(4))]:
        batch, target = a.training_batch([0, 5])
        want, want_target = b.training_batch([0, 5])
        assert batch.metadata.atmos_levels == (500, 850)
        for k in ("z", "q"):
            np.testing.assert_array_equal(batch.atmos_vars[k], want.atmos_vars[k])
            np.testing.assert_array_equal(target[k], want_target[k])
        np.testing.assert_array_equal(batch.surf_vars["tp"], want.surf_vars["tp"])
        np.testing.assert_array_equal(a.observed_state([1])["t"], b.observed_state([1])["t"])
    # the subset of a subset, and in the order asked for
    np.testing.assert_array_equal(
        subset.with_levels((850,)).inputs([2]).atmos_vars["u"],
        full.inputs([2]).atmos_vars["u"][:, :, [2]],
    )
    assert "z" not in subset.cube  # its cube cannot be read on the wrong levels
    with pytest.raises(AuroraSweepError, match="hold only"):
        subset.with_levels((700,))


def test_trial_data_on_levels_shares_the_climates_and_the_base_scores(tiny_config):
    from aurora_sweep.data.trial_data import TrialData

    data = TrialData.prepare(open_store(tiny_config.data.store), tiny_config)
    assert data.for_levels((500, 700, 850)) is data
    view = data.for_levels((700,))
    assert view is data.for_levels((700,))  # made once
    assert view.levels == view.train.levels == view.scored.levels == (700,)
    assert view.train_for(2).levels == (700,)
    assert view.stats is data.stats and view.climatology is data.climatology
    data.base_mse = {"x": {}}
    assert data.for_levels((700,)).base_mse is data.base_mse  # one dict, kept in step
    assert data.reference_key("demo", "fp32", (500, 700, 850)) == BaseKey("demo", "fp32")
    assert str(view.reference_key("demo", "fp32", (700,))) == "demo/fp32/700hPa"
    assert str(BaseKey("demo", "bf16", (500, 700))) == "demo/bf16/500,700hPa"


def test_a_study_samples_levels_and_its_references_train_on_the_widest(tmp_path, tiny_store):
    config = _with_search(tmp_path, tiny_store, "levels = [[500], [500, 850]]")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(8):
        trial = study.ask()
        tc = sample_trial(trial, config)
        assert trial.params["levels"] == ",".join(map(str, tc.levels))
        seen.add(tc.levels)
        study.tell(trial, 0.0)
    assert seen == {(500,), (500, 850)}
    assert reference_trial(config).levels == (500, 850)
    references = optuna.create_study()
    enqueue_references(references, dataclasses.replace(config, reference=True))
    lora = references.trials[1].system_attrs["fixed_params"]
    assert lora["method"] == "lora" and lora["levels"] == "500,850"


def test_the_estimate_follows_the_levels_and_one_trace_serves_same_sized_subsets():
    from aurora_sweep.memory import traced as trace

    grid = (16, 16)
    one = memory.estimate_peak(tiny_lora_trial(levels=(500,)), grid=grid, levels=1, how="traced")
    three = memory.estimate_peak(tiny_lora_trial(), grid=grid, levels=3, how="traced")
    assert one.total_bytes < three.total_bytes
    before = trace._traced.cache_info().misses
    memory.estimate_peak(tiny_lora_trial(levels=(850,)), grid=grid, levels=1, how="traced")
    assert trace._traced.cache_info().misses == before


@pytest.fixture(scope="module")
def one_level_adapter(tmp_path_factory, tiny_store):
    """A LoRA adapter of the tiny study trained on 850 hPa alone, two steps."""
    root = tmp_path_factory.mktemp("levels")
    return trained_tiny_adapter(root, tiny_store, tiny_lora_trial(levels=(850,)))


def test_a_one_level_adapter_forecasts_on_its_level(one_level_adapter, tmp_path):
    path, config = one_level_adapter
    out = tmp_path / "f.nc"
    args = ["forecast", str(path), "--start", "2024-01-02", "--end", "2024-01-02"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    ds = xr.open_dataset(out)
    assert ds["pressure_level"].values.tolist() == [850.0]
    data = dataclasses.replace(config.data, levels=(850,))
    data = dataclasses.replace(data, test=data.test.__class__(*[ds.time.dt.date.values[0]] * 2))
    samples = Samples(open_store(config.data.store), data, "test", target=False)
    with torch.no_grad():
        pred = load_finetuned(path)(samples.inputs(np.arange(len(samples))))
    np.testing.assert_allclose(ds["t"].values[:, 0, 0], pred.atmos_vars["t"][:, 0, 0], rtol=1e-4)


def test_a_one_level_adapter_is_scored_against_the_base_on_its_level(one_level_adapter):
    from aurora_sweep.report.evaluate import evaluate_adapter

    path, _ = one_level_adapter
    scores = evaluate_adapter(path, split="validation", bootstrap=0, lead="6h")
    forgets = {k for k in scores if k.startswith("forget_")}
    assert {"forget_z850_ratio", "forget_q850_ratio", "forget_2t_ratio"} <= forgets
    assert not any("500" in k or "700" in k for k in forgets)
    assert all(np.isfinite(scores[k]) for k in forgets)
