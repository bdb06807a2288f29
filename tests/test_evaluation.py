"""Forecasting a split and verifying it: forgetting ratios, the pruner's objective."""

import numpy as np
import pytest
import torch

from aurora_sweep.config.objective import Objective
from aurora_sweep.config.recipe import BaseKey, TrialConfig
from aurora_sweep.data.store import open_store
from aurora_sweep.data.trial_data import TrialData
from aurora_sweep.model.files import DEMO_CHECKPOINT
from aurora_sweep.sweep.records import worst_forgetting
from aurora_sweep.train.fit import build_trial_model
from aurora_sweep.verify.objective import subset_objective
from aurora_sweep.verify.prepare import base_state_mse
from aurora_sweep.verify.scoring import forecast, forgetting_ratios, state_names, verify

pytestmark = pytest.mark.filterwarnings("ignore")
CPU = torch.device("cpu")
DEMO_FP32 = BaseKey("demo", "fp32")  # the demo base's scores in fp32


@pytest.fixture(scope="module")
def prepared(tiny_store, tmp_path_factory):
    from aurora_sweep.config.study_file import load_config
    from conftest import write_tiny_config

    workdir = tmp_path_factory.mktemp("evaluation")
    config = load_config(write_tiny_config(workdir, store=tiny_store), workdir=workdir)
    data = TrialData.prepare(open_store(tiny_store), config)
    data.base_mse = {
        str(DEMO_FP32): base_state_mse(data, base="demo", checkpoint=DEMO_CHECKPOINT, device=CPU)
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
    model, *_ = build_trial_model(trial, data.stats, DEMO_CHECKPOINT)
    result = forecast(
        model, data.validation, np.arange(len(data.validation)), batch_size=16, device=CPU
    )
    ratios = forgetting_ratios(result.mse, data.base_mse[str(DEMO_FP32)]["6h"])
    assert len(ratios) == len(state_names(data.validation.levels))
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in ratios.values())


def test_a_damaged_layer_shows_up_as_forgetting(prepared):
    data, trial = prepared
    model, aurora, _ = build_trial_model(trial, data.stats, DEMO_CHECKPOINT)
    with torch.no_grad():
        aurora.decoder.surf_heads["2t"].weight.mul_(3.0)
    metrics, _ = verify(model, data, batch_size=16, device=CPU, bootstrap=0, reference=DEMO_FP32)
    name, ratio = worst_forgetting(metrics)
    assert name == "2t" and ratio > 1.5
    assert metrics["forget_z500_ratio"] == pytest.approx(1.0, abs=1e-5)


def test_the_pruners_value_is_the_completed_trials_objective_on_a_subset(prepared):
    data, trial = prepared
    model, *_ = build_trial_model(trial, data.stats, DEMO_CHECKPOINT)
    idx = np.arange(len(data.validation))
    metrics, result = verify(model, data, batch_size=16, device=CPU, bootstrap=0)
    assert subset_objective(result.values, data, idx) == pytest.approx(metrics[data.objective.name])
    # an objective of the interior: the pruner's value and the paired terms are the interior's
    import dataclasses

    assert data.interior is not None  # the tiny study's default edge margin
    inner = dataclasses.replace(data, objective=data.objective.on(True), baseline_scores={})
    metrics, result = verify(model, inner, batch_size=16, device=CPU, bootstrap=0)
    value = metrics["tp_seeps_interior"]
    assert subset_objective(result.values, inner, idx) == pytest.approx(value)
    assert value != pytest.approx(metrics["tp_seeps"])
    num, den = result.objective_terms
    assert np.nansum(num) / np.nansum(den) == pytest.approx(value)


def test_the_base_model_is_scored_in_the_trials_precision(prepared, tiny_config):
    import dataclasses
    import datetime as dt

    from aurora_sweep.config.study import Period

    _, trial = prepared
    # one week of validation: bf16 is emulated on a CPU, and every lead rolls out
    week = Period(dt.date(2023, 1, 1), dt.date(2023, 1, 7))
    config = dataclasses.replace(
        tiny_config, data=dataclasses.replace(tiny_config.data, validation=week)
    )
    data = TrialData.prepare(open_store(config.data.store), config)
    bf16 = dataclasses.replace(trial, precision="bf16")
    base = {
        p: base_state_mse(data, base="demo", checkpoint=DEMO_CHECKPOINT, device=CPU, precision=p)
        for p in ("fp32", "bf16")
    }
    assert base["bf16"] != base["fp32"]
    data.base_mse = {str(BaseKey("demo", p)): v for p, v in base.items()}
    model, *_ = build_trial_model(bf16, data.stats, DEMO_CHECKPOINT)
    metrics, _ = verify(
        model, data, batch_size=16, device=CPU, bootstrap=0, reference=BaseKey("demo", "bf16")
    )

    # not trained: the base model itself when both run in bf16, up to bf16's rounding of sums
    # that differ a little between a batch with tp (an all-zero variable) and one without;
    # against the base run in fp32 the same model is ten times further from it
    def worst(metrics, suffix):
        ratios = [v for k, v in metrics.items() if k.startswith("forget_") and k.endswith(suffix)]
        assert ratios
        return max(abs(v - 1) for v in ratios)

    assert worst(metrics, "_ratio") < 5e-4 and worst(metrics, "_24h") < 1e-2
    against_fp32, _ = verify(
        model, data, batch_size=16, device=CPU, bootstrap=0, reference=BaseKey("demo", "fp32")
    )
    assert worst(against_fp32, "_ratio") > 5 * worst(metrics, "_ratio")


def test_an_objective_the_data_cannot_define_is_refused_before_any_trial(prepared):
    import dataclasses

    from aurora_sweep.data.climates import SeepsClimate
    from aurora_sweep.errors import AuroraSweepError
    from aurora_sweep.verify.objective import check_objective_defined

    data, _ = prepared
    check_objective_defined(data)  # the tiny demo has both dry and wet 6-hour totals
    always_dry = SeepsClimate(
        p_dry=np.ones_like(data.seeps.p_dry), light_heavy=data.seeps.light_heavy
    )
    dry = dataclasses.replace(data, seeps=always_dry, lead_seeps={1: always_dry})
    with pytest.raises(AuroraSweepError, match='tp_seeps is undefined.*"tp_rmse"'):
        check_objective_defined(dry)
    check_objective_defined(dataclasses.replace(dry, objective=Objective.parse("tp_rmse")))
    # dry only at the edge zone's points: the whole box's objective is defined, the interior's
    # not (every interior point is always dry)
    p_dry = data.seeps.p_dry.copy()
    p_dry[..., data.interior[0], data.interior[1]] = 1.0
    edges_wet = SeepsClimate(p_dry=p_dry, light_heavy=data.seeps.light_heavy)
    interior_dry = dataclasses.replace(data, seeps=edges_wet, lead_seeps={1: edges_wet})
    check_objective_defined(interior_dry)
    with pytest.raises(AuroraSweepError, match="at every grid point of the interior"):
        check_objective_defined(
            dataclasses.replace(interior_dry, objective=Objective.parse("tp_seeps_interior"))
        )


def test_scores_exist_at_every_lead_and_24h_seeps_uses_its_own_dry_threshold(prepared):
    from aurora_sweep.data.climates import DRY_MM_BY_LEAD

    data, trial = prepared
    assert set(data.leads) == {1, 2, 4}
    assert data.lead_seeps[4].dry_threshold == DRY_MM_BY_LEAD[24] == 0.25
    model, *_ = build_trial_model(trial, data.stats, DEMO_CHECKPOINT)
    metrics, _ = verify(model, data, batch_size=32, device=CPU, bootstrap=0, reference=DEMO_FP32)
    for name in ("tp_seeps", "tp_rmse_persistence", "forget_10v_ratio", "tp_skill_climatology"):
        assert {name, f"{name}_12h", f"{name}_24h"} <= set(metrics)
    # rolled out untrained, the fine-tune is still the base model at 24 h
    assert metrics["forget_z500_ratio_24h"] == pytest.approx(1.0, abs=1e-4)
    # a day's rain is more than six hours' (the totals add up over the lead)
    assert metrics["tp_rmse_persistence_24h"] > metrics["tp_rmse_persistence"]


def test_a_rollout_sums_tp_over_its_steps_and_trains_through_the_last_only(prepared):
    from aurora_sweep.model.build import clamped
    from aurora_sweep.train.fit import pushforward
    from aurora_sweep.verify.rollout import run_steps

    data, trial = prepared
    model, aurora, _ = build_trial_model(trial, data.stats, DEMO_CHECKPOINT)
    with torch.no_grad():
        aurora.decoder.surf_heads["tp"].bias.fill_(0.5)  # a wet forecast at every step
    batch = data.validation.inputs([0, 1])
    with torch.no_grad(), clamped(model):
        first = model(batch)
        _, one = run_steps(model, batch, 1, data.validation.variable)
        _, two = run_steps(model, batch, 2, data.validation.variable)
    np.testing.assert_allclose(one.numpy(), first.surf_vars["tp"][:, 0].numpy())
    assert (two > one).all()  # two 6-hour totals, each positive
    advanced = pushforward(model, batch, 2)
    assert advanced.metadata.rollout_step == 0  # Aurora then clamps nothing the loss sees
    np.testing.assert_allclose(
        advanced.surf_vars["2t"][:, 0].numpy(), batch.surf_vars["2t"][:, 1].numpy()
    )
    assert not advanced.surf_vars["2t"].requires_grad  # no graph through the first step


def test_a_trial_clips_its_gradients_and_warms_up_its_learning_rate(prepared, monkeypatch):
    import dataclasses

    from aurora_sweep.train import fit as train
    from aurora_sweep.train.optimiser import FINAL_LR_FACTOR

    data, trial = prepared
    norms, rates = [], []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        norms.append(max_norm)
        return clip(parameters, max_norm, *args, **kwargs)

    step = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        rates.append([g["lr"] for g in self.param_groups])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    short = dataclasses.replace(trial, steps=20, eval_every=20, learning_rate=1e-3)
    train.fit(short, data, checkpoint=DEMO_CHECKPOINT, device=CPU, bootstrap=0)
    assert norms == [train.MAX_GRAD_NORM] * 20
    lrs = [r[0] for r in rates]  # the pretrained weights' group, step by step
    assert lrs[0] == pytest.approx(0.5e-3) and lrs[1] == pytest.approx(1e-3)  # two warm-up steps
    assert lrs[-1] == pytest.approx(1e-3 * FINAL_LR_FACTOR) and lrs[2] > lrs[-1]


def test_scoring_in_blocks_scores_a_survivor_as_a_whole_and_stops_a_hopeless_one(prepared):
    """Asked after every block and told to go on, the scores are those of one pass over the
    split; told to stop, the scoring ends there with the objective over the days scored."""
    from aurora_sweep.verify.bootstrap import objective_from
    from aurora_sweep.verify.early_stop import ScoringStopped

    data, trial = prepared
    model, *_ = build_trial_model(trial, data.stats, DEMO_CHECKPOINT)
    # passes of 4 samples: the split's 88 samples in 8 blocks (`early_stop.block_count`)
    whole, fc = verify(model, data, batch_size=4, device=CPU, bootstrap=0)
    asked = []

    def go_on(block):
        asked.append((block.positions.copy(), block.num.copy(), block.den.copy()))
        return False

    blocked, fc2 = verify(model, data, batch_size=4, device=CPU, bootstrap=0, stop=go_on)
    assert blocked == pytest.approx(whole, nan_ok=True)
    assert np.array_equal(fc2.values, fc.values)
    # asked after each block but the last, about more samples each time, never one twice, and
    # the terms it was given are the whole pass's for those samples
    sizes = [len(p) for p, _, _ in asked]
    assert len(asked) == 7 and sizes == sorted(sizes) and len(set(asked[-1][0])) == sizes[-1]
    positions, num, den = asked[-1]
    assert np.allclose(num, fc.objective_terms[0][positions], equal_nan=True)
    assert np.allclose(den, fc.objective_terms[1][positions], equal_nan=True)

    with pytest.raises(ScoringStopped) as stopped:
        verify(model, data, batch_size=4, device=CPU, bootstrap=0, stop=lambda *a: True)
    first = asked[0]
    assert stopped.value.value == pytest.approx(
        objective_from(data.objective, np.nansum(first[1]), np.nansum(first[2]))
    )
    days = data.scored.target_days()
    assert stopped.value.days == len(np.unique(days[first[0]])) < stopped.value.of
    assert stopped.value.of == len(np.unique(days))


@pytest.mark.parametrize("steps", [1, 4])
def test_each_block_sends_the_trial_and_base_errors_by_day_on_the_samples_scored(prepared, steps):
    """What the forgetting test reads after each block: every variable's errors summed by day
    over the samples scored so far, the trial's and the untouched base model's, on exactly those
    samples: at 6 h and at 24 h (whose samples are cut by their 6-hour sample's day)."""
    import dataclasses

    from aurora_sweep.model.build import build_base, load_base_checkpoint

    data, trial = prepared
    data = dataclasses.replace(data, objective_steps=steps)
    data.base_mse = {
        str(DEMO_FP32): base_state_mse(data, base="demo", checkpoint=DEMO_CHECKPOINT, device=CPU)
    }
    model, aurora, _ = build_trial_model(trial, data.stats, DEMO_CHECKPOINT)
    with torch.no_grad():
        aurora.decoder.surf_heads["2t"].weight.mul_(3.0)
    blocks = []
    verify(model, data, batch_size=4, device=CPU, bootstrap=0, reference=DEMO_FP32,
           stop=lambda block: blocks.append(block) or False)  # fmt: skip
    base = build_base("demo", with_target=False)
    load_base_checkpoint(base, DEMO_CHECKPOINT)
    samples, names = data.leads[steps], state_names(data.validation.levels)
    assert len(blocks) >= 2 and all(b.state is not None for b in blocks)
    for block in (blocks[0], blocks[-1]):
        state, at = block.state, block.positions
        assert state.names == names and state.mine.shape == state.base.shape
        theirs = forecast(base, samples, at, batch_size=8, device=CPU, with_target=False).mse
        mine = forecast(model, samples, at, batch_size=8, device=CPU).mse
        assert state.base.sum(axis=0) / len(at) == pytest.approx(
            [theirs[k] for k in names], rel=1e-4
        )
        assert state.mine.sum(axis=0) / len(at) == pytest.approx([mine[k] for k in names], rel=1e-4)
        two_t = np.sqrt(state.mine[:, 0].sum() / state.base[:, 0].sum())
        assert two_t > 1.5
        if steps == 1:  # one step: nothing fed back, the other variables are the base's
            assert state.mine[:, 5].sum() == pytest.approx(state.base[:, 5].sum())
