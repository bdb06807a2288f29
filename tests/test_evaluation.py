"""Forecasting a split and verifying it: forgetting ratios, the pruner's objective."""

import numpy as np
import pytest
import torch

from aurora_sweep.evaluation import (
    base_state_mse,
    forecast,
    forgetting_ratios,
    state_names,
    subset_objective,
    verify,
    worst_forgetting,
)
from aurora_sweep.model import DEMO_CHECKPOINT
from aurora_sweep.store import open_store
from aurora_sweep.train import TrialConfig, TrialData, build_trial_model

pytestmark = pytest.mark.filterwarnings("ignore")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def prepared(tiny_store, tmp_path_factory):
    from aurora_sweep.config import load_config
    from conftest import write_tiny_config

    workdir = tmp_path_factory.mktemp("evaluation")
    config = load_config(write_tiny_config(workdir, store=tiny_store), workdir=workdir)
    data = TrialData.prepare(open_store(tiny_store), config)
    data.base_mse = {
        "fp32": base_state_mse(data, base="demo", checkpoint=DEMO_CHECKPOINT, device=CPU)
    }
    trial = TrialConfig(
        lora_rank=4, lora_targets="qkv+proj", unfrozen_blocks=0, batch_size=2, precision="fp32",
        learning_rate=1e-3, activation_checkpointing=False, base="demo", levels=(500, 700, 850),
        steps=1, eval_every=1, val_samples=8, weight_decay=0.0, seed=0, wrap_longitude=False,
    )  # fmt: skip
    return data, trial


def test_state_names_cover_surface_variables_and_every_level():
    names = state_names((500, 850))
    assert names[:4] == ["2t", "10u", "10v", "msl"] and "q850" in names and len(names) == 14


def test_a_fine_tune_that_has_not_trained_yet_forgot_nothing(prepared):
    # LoRA's B and tp's embedding start at zero: the other variables are exactly the base model's
    data, trial = prepared
    model, *_ = build_trial_model(trial, data.tp, DEMO_CHECKPOINT)
    result = forecast(
        model, data.validation, np.arange(len(data.validation)), batch_size=16, device=CPU
    )
    ratios = forgetting_ratios(result.mse, data.base_mse["fp32"])
    assert len(ratios) == len(state_names(data.validation.levels))
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in ratios.values())


def test_a_damaged_layer_shows_up_as_forgetting(prepared):
    data, trial = prepared
    model, aurora, _ = build_trial_model(trial, data.tp, DEMO_CHECKPOINT)
    with torch.no_grad():
        aurora.decoder.surf_heads["2t"].weight.mul_(3.0)
    metrics, _ = verify(model, data, batch_size=16, device=CPU, bootstrap=0)
    name, ratio = worst_forgetting(metrics)
    assert name == "2t" and ratio > 1.5
    assert metrics["forget_z500_ratio"] == pytest.approx(1.0, abs=1e-5)


def test_the_pruners_value_is_the_completed_trials_objective_on_a_subset(prepared):
    data, trial = prepared
    model, *_ = build_trial_model(trial, data.tp, DEMO_CHECKPOINT)
    idx = np.arange(len(data.validation))
    metrics, result = verify(model, data, batch_size=16, device=CPU, bootstrap=0)
    assert subset_objective(result.tp, data, idx) == pytest.approx(metrics[data.objective])


def test_the_base_model_is_scored_in_the_trials_precision(prepared):
    import dataclasses

    data, trial = prepared
    bf16 = dataclasses.replace(trial, precision="bf16")
    base_bf16 = base_state_mse(
        data, base="demo", checkpoint=DEMO_CHECKPOINT, device=CPU, precision="bf16"
    )
    assert base_bf16 != data.base_mse["fp32"]
    scored = dataclasses.replace(data, base_mse={**data.base_mse, "bf16": base_bf16})
    model, *_ = build_trial_model(bf16, data.tp, DEMO_CHECKPOINT)
    metrics, _ = verify(model, scored, batch_size=16, device=CPU, bootstrap=0, precision="bf16")
    # not trained: exactly the base model, when both run in bf16
    ratios = {k: v for k, v in metrics.items() if k.startswith("forget_")}
    assert ratios and all(v == pytest.approx(1.0, abs=1e-6) for v in ratios.values())


def test_an_objective_the_data_cannot_define_is_refused_before_any_trial(prepared):
    import dataclasses

    from aurora_sweep.errors import AuroraSweepError
    from aurora_sweep.evaluation import check_objective_defined
    from aurora_sweep.metrics import SeepsClimate

    data, _ = prepared
    check_objective_defined(data)  # the tiny demo has both dry and wet 6-hour totals
    always_dry = SeepsClimate(
        p_dry=np.ones_like(data.seeps.p_dry), light_heavy=data.seeps.light_heavy
    )
    dry = dataclasses.replace(data, seeps=always_dry)
    with pytest.raises(AuroraSweepError, match='tp_seeps is undefined.*"tp_rmse"'):
        check_objective_defined(dry)
    check_objective_defined(dataclasses.replace(dry, objective="tp_rmse"))
