"""Aurora 1.5's own precipitation: built from a checkpoint this test writes (AuroraV1p5 at
reduced width, random weights), the `v1.5` base's 6-, 12- and 24-hour totals equal the hand sum
of the hourly fields `aurora.rollout` gives with `fine_lead_times` 1..6 (each clamped at 0); the
base fine-tuned, exported and loaded; the untrained model as a study's baseline."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import numpy as np
import pytest
import torch
from aurora import AuroraV1p5, Batch, Metadata, rollout
from aurora.insolation import insolation

from aurora_sweep.data.store import TRUE_LON
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.model.aurora15 import HOURLY_TP
from aurora_sweep.model.build import build_base, load_base_checkpoint
from synthetic import global_statics, write_v15_statics

pytestmark = pytest.mark.filterwarnings("ignore")
#: AuroraV1p5's class at the demo base's width, fp32 on the CPU
SMALL = (
    ("autocast", False), ("decoder_depths", (1, 1, 1)), ("decoder_num_heads", (8, 4, 2)),
    ("embed_dim", 48), ("encoder_depths", (1, 1, 1)), ("encoder_num_heads", (2, 4, 8)),
    ("latent_levels", 4), ("num_heads", 4), ("window_size", (2, 4, 8)),
)  # fmt: skip
LEVELS = (500, 850)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = AuroraV1p5(**dict(SMALL))
    with torch.no_grad():  # a random head's log-space output overflows exp: keep it near 0
        model.decoder.surf_heads[HOURLY_TP].weight.mul_(0.01)
    path = tmp_path_factory.mktemp("v15") / "aurora-v1.5-small.ckpt"
    torch.save(model.state_dict(), path)
    return path


def _plain(checkpoint):
    """Aurora 1.5 itself (microsoft-aurora's class) with the test's weights."""
    model = AuroraV1p5(**dict(SMALL))
    load_base_checkpoint(model, checkpoint)
    return model.eval()


def _v15_base(checkpoint, clamp: bool = True):
    model = build_base("v1.5", clamp=clamp, arch=SMALL)
    load_base_checkpoint(model, checkpoint)
    return model.eval()


def _store_batch(model, n: int = 2, grid: tuple[int, int] = (16, 24)) -> Batch:
    """A batch as a store gives it: Aurora 1.5's inputs under the store's names (`sd`), tp
    among them, no insolation."""
    g = torch.Generator().manual_seed(1)
    h, w = grid

    def field(*shape):
        return torch.rand(*shape, generator=g)

    names = [k for k in model.surf_vars if k not in (*model.output_only_surf_vars, "insolation")]
    surf = {("sd" if k == "scaled_sd" else k): field(n, 2, h, w) for k in names}
    surf["sd"] = 0.01 * surf["sd"]  # metres of snow water: small and positive
    surf["tp"] = 5 * field(n, 2, h, w)  # an input Aurora 1.5 does not read
    return Batch(
        surf_vars=surf,
        static_vars={k: field(h, w) for k in model.static_vars},
        atmos_vars={k: field(n, 2, len(LEVELS), h, w) for k in model.atmos_vars},
        metadata=Metadata(
            lat=torch.linspace(60, 45, h),
            lon=torch.linspace(0, 23, w),
            time=tuple(dt.datetime(2024, 1, 3, 6 * k) for k in range(n)),
            atmos_levels=LEVELS,
        ),  # fmt: skip
    )


def _as_aurora15_reads_it(batch: Batch) -> Batch:
    """The same inputs as Aurora 1.5's own batch: its names, no tp, the insolation at both
    input times from `aurora.insolation`."""
    import dataclasses

    surf = {("scaled_sd" if k == "sd" else k): v for k, v in batch.surf_vars.items() if k != "tp"}
    lat, lon = batch.metadata.lat.numpy(), batch.metadata.lon.numpy()
    sun = [
        [insolation([t - dt.timedelta(hours=6 * (1 - j))], lat, lon, enforce_2d=True)[0]
         for j in range(2)]
        for t in batch.metadata.time
    ]  # fmt: skip
    surf["insolation"] = torch.tensor(np.array(sun), dtype=torch.float32)
    return dataclasses.replace(batch, surf_vars=surf)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_the_v15_base_rolls_out_as_the_sum_of_aurora15s_hourly_precipitation(checkpoint, steps):
    """Each 6-hour step of the `v1.5` base is Aurora 1.5's hourly rollout from the same inputs:
    tp the six hours summed (each clamped at 0, in mm), the state its 6-hour prediction under
    the store's names."""
    model, plain = _v15_base(checkpoint), _plain(checkpoint)
    batch = _store_batch(model)
    with torch.no_grad():
        preds = list(rollout(model, batch, steps))
        hourly = list(
            rollout(plain, _as_aurora15_reads_it(batch), steps, fine_lead_times=[1, 2, 3, 4, 5, 6])
        )
    total = sum(p.surf_vars["tp"][:, 0] for p in preds)
    by_hand = sum(p.surf_vars[HOURLY_TP][:, 0].clamp(min=0) for p in hourly) * 1000.0
    assert len(preds) == steps and len(hourly) == 6 * steps
    assert total.shape == by_hand.shape == (2, 16, 24)
    np.testing.assert_allclose(total.numpy(), by_hand.numpy(), rtol=1e-3, atol=1e-5)
    assert (total >= 0).all() and total.abs().max() > 0
    last, reference = preds[-1], hourly[-1]
    assert set(last.surf_vars) == set(batch.surf_vars)  # the store's names, tp among them
    for k in ("2t", "tcwv"):
        np.testing.assert_allclose(last.surf_vars[k].numpy(), reference.surf_vars[k].numpy(),
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
    np.testing.assert_allclose(last.surf_vars["sd"].numpy(),
                               reference.surf_vars["scaled_sd"].numpy(), rtol=1e-4, atol=1e-6)  # fmt: skip
    assert last.metadata.time == reference.metadata.time


def test_the_v15_bases_pr_is_the_mean_rate_of_the_hours_whose_sum_is_its_tp(checkpoint):
    """With `[model] target = "pr"` the same six hours make the step's mean rate (mm h-1)."""
    tp_model = _v15_base(checkpoint)
    pr_model = build_base("v1.5", target="pr", clamp=True, arch=SMALL)
    load_base_checkpoint(pr_model, checkpoint)
    batch = _store_batch(tp_model)
    rate_batch = dataclasses.replace(
        batch, surf_vars={("pr" if k == "tp" else k): v for k, v in batch.surf_vars.items()}
    )
    with torch.no_grad():
        tp = tp_model(batch).surf_vars["tp"]
        pred = pr_model.eval()(rate_batch)
    assert "pr" in pred.surf_vars and "tp" not in pred.surf_vars
    np.testing.assert_allclose(pred.surf_vars["pr"].numpy(), tp.numpy() / 6, rtol=1e-5, atol=1e-7)
    with pytest.raises(AuroraSweepError, match="predict tp or pr with it, not ro"):
        build_base("v1.5", target="ro", arch=SMALL)  # runoff is not Aurora 1.5's precipitation


def test_in_training_the_hours_are_not_clamped(checkpoint):
    clamped, raw = _v15_base(checkpoint), _v15_base(checkpoint, clamp=False)
    with torch.no_grad():  # hours around 0 mm, in its log space
        for model in (clamped, raw):
            model.decoder.surf_heads[HOURLY_TP].bias.fill_(-0.4)
    batch = _store_batch(clamped)
    with torch.no_grad():
        a, b = clamped(batch).surf_vars["tp"], raw(batch).surf_vars["tp"]
    assert (b <= a + 1e-6).all() and (b < a - 1e-6).any()  # some raw hours are below 0


def test_a_checkpoint_of_another_model_is_refused_in_one_line(checkpoint, tmp_path):
    bad = tmp_path / "other.ckpt"
    state = torch.load(checkpoint, weights_only=True)
    del state["decoder.surf_heads.scaled_tp_1h.weight"]
    torch.save(state, bad)
    with pytest.raises(AuroraSweepError, match="does not match the base model: missing"):
        load_base_checkpoint(build_base("v1.5", arch=SMALL), bad)
    with pytest.raises(AuroraSweepError, match=r"cannot build the v1.5 base"):
        build_base("v1.5", arch=(("embed_dim", "wide"),))


# ------------------------------------------------------------------------------------------
# Static fields and batches from a store


@pytest.fixture(scope="module")
def static_file(tmp_path_factory, checkpoint):

    from aurora_sweep.model.aurora15 import static_names

    names = static_names(SMALL)
    path = tmp_path_factory.mktemp("static") / "aurora-0.25-v1.5-static.pickle"
    return write_v15_statics(path, names), names


def test_the_static_fields_are_cut_at_the_stores_points_across_0(static_file):
    from aurora_sweep.model.aurora15 import crop_statics, read_statics

    path, names = static_file
    assert len(read_statics(path, names)) == 36
    statics = global_statics(names, coded=True)
    cut = crop_statics(statics, np.array([50.0, 49.75]), np.array([-0.5, -0.25, 0.0, 0.25]))
    # 50°N is row 160; 0.5°W is column 1438 of the 0..359.75 grid, 0.25°E column 1
    np.testing.assert_array_equal(cut["lsm"][0] % 1e8, [1601438, 1601439, 1600000, 1600001])
    np.testing.assert_array_equal(cut["lsm"][1] - cut["lsm"][0], [10000] * 4)
    with pytest.raises(AuroraSweepError, match="not on Aurora 1.5's 0.25° grid"):
        crop_statics(statics, np.array([50.1]), np.array([0.0]))


def test_a_static_file_that_is_not_aurora15s_is_refused_without_running_it(tmp_path):
    import os
    import pickle

    from aurora_sweep.model.aurora15 import read_statics

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    evil = tmp_path / "evil.pickle"
    evil.write_bytes(pickle.dumps({"lsm": Payload()}))
    with pytest.raises(AuroraSweepError, match="is not Aurora 1.5's static pickle"):
        read_statics(evil, ("lsm",))
    assert not (tmp_path / "ran").exists()
    partial = tmp_path / "partial.pickle"
    partial.write_bytes(pickle.dumps({"lsm": np.zeros((721, 1440), np.float32)}))
    with pytest.raises(AuroraSweepError, match="lacks the static field"):
        read_statics(partial, ("lsm", "slt_0"))


@pytest.fixture(scope="module")
def v15_study(tmp_path_factory, checkpoint, static_file):
    """The tiny demo study with the "aurora-1.5" baseline (its store holds Aurora 1.5's
    inputs), Aurora 1.5 from this test's checkpoint and static file."""
    import dataclasses

    from aurora_sweep.config.study_file import load_config
    from aurora_sweep.data.cube import open_cube
    from conftest import write_tiny_config

    root = tmp_path_factory.mktemp("v15-store")
    path = write_tiny_config(root)
    path.write_text(path.read_text().replace(
        "[data]", 'baselines = ["persistence", "climatology", "aurora-1.5"]\n\n[data]', 1))  # fmt: skip
    config = load_config(path, workdir=root)
    model = dataclasses.replace(
        config.model, checkpoints={"v1.5": checkpoint}, arch={"v1.5": SMALL},
        v15_static=static_file[0],
    )  # fmt: skip
    config = dataclasses.replace(config, model=model)
    open_cube(config)
    return config


@pytest.fixture(scope="module")
def v15_samples(v15_study):
    """The tiny demo study's validation samples, from a store with Aurora 1.5's inputs."""
    from aurora_sweep.data.cube import open_cube
    from aurora_sweep.data.samples import Samples

    return Samples(open_cube(v15_study), v15_study.data, "validation")


def test_the_v15_base_reads_a_stores_samples_with_aurora15s_inputs(
    checkpoint, static_file, v15_samples
):
    """`Samples.for_v15`: the store's 18 surface inputs (no NaN: sea ice over land is 0), the
    static fields cut at its points; the model adds the insolation at both input times, at the
    true longitudes where Aurora sees the box shifted, and forecasts tp from it."""
    import dataclasses

    from aurora_sweep.model.aurora15 import crop_statics, read_statics, region_statics

    path, names = static_file
    samples = v15_samples.for_v15(region_statics(path, v15_samples, tuple(names)))
    model = _v15_base(checkpoint)
    batch = samples.inputs([0, 3])
    assert set(batch.surf_vars) == {*samples.surface, "tp"} and len(samples.surface) == 18
    t = v15_samples.index[[0, 3]]
    np.testing.assert_array_equal(batch.surf_vars["sd"][:, 1], v15_samples.read(t, ["sd"])["sd"])
    assert torch.isfinite(batch.surf_vars["ci"]).all()  # sea ice NaN over land -> 0
    lat, lon = v15_samples.cube["latitude"].values, v15_samples.cube["longitude"].values
    cut = crop_statics(read_statics(path, names), lat, lon)
    assert set(batch.static_vars) == set(names)
    assert np.allclose(batch.static_vars["slt_2"].numpy(), cut["slt_2"])
    inputs = model._inputs(batch)
    sun = insolation([v15_samples.times[t[1]].to_pydatetime()], lat, lon, enforce_2d=True)[0]
    np.testing.assert_allclose(inputs.surf_vars["insolation"][1, 1].numpy(), sun, rtol=1e-5)
    # a box Aurora sees shifted east by 12°: the insolation is still that of its true place
    shifted = dataclasses.replace(
        batch,
        static_vars={**batch.static_vars, TRUE_LON: torch.tensor(lon).expand(len(lat), -1)},
        metadata=dataclasses.replace(batch.metadata, lon=batch.metadata.lon + 12.0),
    )
    np.testing.assert_allclose(
        model._inputs(shifted).surf_vars["insolation"].numpy(),
        inputs.surf_vars["insolation"].numpy(), rtol=1e-6,
    )  # fmt: skip
    with torch.no_grad():
        pred = model(batch)
    assert pred.surf_vars["tp"].shape == (2, 1, *samples.grid)
    assert torch.isfinite(pred.surf_vars["tp"]).all()
    assert pred.metadata.time[0] == v15_samples.times[t[0]].to_pydatetime() + dt.timedelta(hours=6)


def test_a_study_with_the_aurora15_baseline_scores_it_and_best_shows_it(
    tmp_path, checkpoint, static_file, v15_study, monkeypatch
):
    """A study whose store holds Aurora 1.5's inputs runs a trial; the trial carries Aurora
    1.5's scores and its skill against them, `best` prints the zero-shot row and the model card
    explains it. Aurora 1.5 runs once per study: the scores the study keeps serve a later
    worker without its checkpoint."""
    import shutil

    from typer.testing import CliRunner

    from aurora_sweep.cli import _best_line, app
    from aurora_sweep.config.study_file import load_config
    from aurora_sweep.sweep.records import TrialRecord
    from aurora_sweep.sweep.run import run_study
    from aurora_sweep.sweep.storage import open_study
    from aurora_sweep.verify.prepare import trial_data
    from aurora_sweep.verify.scoring import lead_scores

    arch = "\n".join(
        f"{k} = {str(list(v)) if isinstance(v, tuple) else str(v).lower()}" for k, v in SMALL
    )
    own = shutil.copy(checkpoint, tmp_path / "v15.ckpt")
    text = v15_study.path.read_text().replace(
        '[model]\nbase = "demo"',
        f'[model]\nbase = "demo"\nv15_static = "{static_file[0]}"\n\n'
        f'[model.checkpoints]\n"v1.5" = "{own}"\n\n[model.arch."v1.5"]\n{arch}',
    ).replace(
        'store = "data/tiny/store.zarr"', f'store = "{v15_study.data.store}"'
    ).replace('"2023-04-30"]  # four months', '"2023-01-31"]  # one month')  # fmt: skip
    path = tmp_path / "v15.toml"
    path.write_text(text)
    config = load_config(path, workdir=tmp_path)
    assert config.model.arch_for("v1.5") == SMALL
    run_study(config, trials=1)
    trial = open_study(config, create=False).trials[0]
    scores = TrialRecord.of(trial).scores
    for name in ("tp_seeps_aurora15", "tp_skill_aurora15", "tp_seeps_aurora15_24h",
                 "tp_skill_aurora15_q05", "tp_seeps_aurora15_interior_24h"):  # fmt: skip
        assert np.isfinite(scores[name]), name
    assert scores["tp_skill_aurora15_q05"] <= scores["tp_skill_aurora15"]
    assert scores["tp_skill_aurora15"] <= scores["tp_skill_aurora15_q95"]
    kept = open_study(config, create=False).user_attrs["aurora15_by_lead"]
    assert set(kept) == {"1", "2", "4"}
    assert kept["1"]["scores"]["tp_seeps"] == pytest.approx(scores["tp_seeps_aurora15"])
    # a later worker given them does not run Aurora 1.5 (nor need its checkpoint) again, and
    # scores a forecast against the same baseline
    Path(own).unlink()
    data = trial_data(config, "cpu", zero_shot=kept)
    assert data.aurora15 == {}
    one = data.leads[4]
    again = lead_scores(data, one, one.persistence(np.arange(len(one))), bootstrap=0)
    assert again["tp_seeps_aurora15"] == pytest.approx(scores["tp_seeps_aurora15_24h"])
    assert again["tp_seeps_aurora15_interior"] == pytest.approx(
        scores["tp_seeps_aurora15_interior_24h"]
    )
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["best", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "A1.5" in result.output and "zero-shot" in result.output
    exported = CliRunner().invoke(app, ["best", "--config", str(path), "--export", "out"])
    assert exported.exit_code == 0, exported.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Against Aurora 1.5 untrained" in card and "| tp_skill_aurora15 |" in card
    line = _best_line(config)  # the line `run` ends with
    assert "vs Aurora 1.5 untrained" in line and "fine-tuned on IFS analyses" in line


@pytest.mark.parametrize("wrap", [False, True])
def test_the_zero_shot_baseline_runs_the_region_as_the_trials_do(
    checkpoint, static_file, v15_samples, monkeypatch, wrap
):
    """A regional box's east and west edges are not joined (Aurora's default joins them), in
    the baseline as in every trial; a box round the globe keeps them joined."""
    from aurora_sweep.verify import scoring
    from aurora_sweep.verify.zero_shot import zero_shot_totals

    seen = {}

    def fake_forecast_leads(model, leads, **kwargs):
        seen["model"] = model
        return {}

    monkeypatch.setattr(scoring, "forecast_leads", fake_forecast_leads)
    zero_shot_totals(
        {1: v15_samples},
        checkpoint=checkpoint,
        static_file=static_file[0],
        arch=SMALL,
        wrap_longitude=wrap,
    )
    blocks = [m for m in seen["model"].modules() if type(m).__name__ == "Swin3DTransformerBlock"]
    assert blocks
    assert all(getattr(m, "_aurora_sweep_no_wrap", False) != wrap for m in blocks)


def test_the_demo_world_writes_aurora15s_inputs_for_a_study_that_uses_it(v15_study):
    from aurora_sweep.data import store
    from aurora_sweep.data.cube import open_cube

    cube = open_cube(v15_study)
    assert all(v in cube for v in store.V15_SURF_VARS)
    land = cube["static_lsm"].values > 0.5
    ci = cube["ci"].isel(time=0).values
    assert np.isnan(ci[land]).all() and (ci[~land] == 0).all()  # ERA5's sea-ice mask
    assert float(cube["sd"].min()) >= 0 and float(cube["tcc"].max()) <= 1
    assert (cube["2d"] <= cube["2t"]).all()  # the dew point is never above the temperature


# ------------------------------------------------------------------------------------------
# Aurora 1.5 as a base a trial fine-tunes


@pytest.fixture(scope="module")
def v15_trained(v15_study, checkpoint, static_file, tmp_path_factory):
    """A LoRA trial of the v1.5 base fine-tuned for two steps on the tiny study (`train.fit`),
    its adapter saved: (data, trial, result, adapter directory)."""
    from aurora_sweep.data.cube import open_cube
    from aurora_sweep.data.trial_data import TrialData
    from aurora_sweep.model.adapter import save_adapter
    from aurora_sweep.model.aurora15 import region_statics
    from aurora_sweep.train.fit import fit
    from aurora_sweep.verify.prepare import base_state_mse
    from synthetic import tiny_lora_trial

    data = TrialData.prepare(open_cube(v15_study), v15_study)
    data.v15_statics = region_statics(static_file[0], data.train, tuple(static_file[1]))
    trial = tiny_lora_trial(base="v1.5", arch=SMALL, learning_rate=1e-3, unfrozen_blocks=1)
    key = data.reference_key("v1.5", "fp32", trial.levels)
    data.base_mse = {str(key): base_state_mse(data.for_trial("v1.5", trial.levels), base="v1.5",
                                         checkpoint=checkpoint, device="cpu", arch=SMALL)}  # fmt: skip
    result = fit(trial, data, checkpoint=checkpoint, bootstrap=0)
    adapter = tmp_path_factory.mktemp("v15-adapter") / "adapter"
    save_adapter(
        adapter, model=result.model, parts=result.parts, trial=trial, stats=data.stats,
        checkpoint=checkpoint, study_config=v15_study.path, metrics=result.metrics,
    )  # fmt: skip
    return data, trial, result, adapter


def test_a_v15_trial_trains_its_own_precipitation_and_keeps_the_rest_of_aurora15(
    v15_trained, checkpoint
):
    """Two steps of `fit` on the v1.5 base: the loss covers its 14 more surface inputs, the
    scores and the forgetting ratios every lead, its own precipitation head and the LoRA
    weights trained while the frozen weights (its input embedding of precipitation among them)
    are bit for bit the checkpoint's."""
    data, trial, result, _ = v15_trained
    m = result.metrics
    assert {"sd", "ci", "tcwv", "tp", "2t", "z"} <= set(result.val_terms)
    for name in ("tp_seeps", "tp_rmse_24h", "forget_sd_ratio", "forget_ci_ratio_24h",
                 "forget_2t_ratio_12h", "forget_z500_ratio"):  # fmt: skip
        assert np.isfinite(m[name]), name
    parts = result.parts
    assert any(k.startswith("decoder.surf_heads.scaled_tp_1h") for k in parts.new_variable)
    pretrained = torch.load(checkpoint, weights_only=True)
    from aurora_sweep.model.build import WRAPPED, unwrap

    named = {k.replace(WRAPPED, ""): p for k, p in unwrap(result.model).named_parameters()}
    trained = {k for k, p in named.items() if p.requires_grad}
    assert "encoder.surf_token_embeds.weights.scaled_tp_1h" not in trained
    head = "decoder.surf_heads.scaled_tp_1h.weight"
    assert head in trained and not torch.equal(named[head].detach(), pretrained[head])
    for k, p in named.items():
        if k in pretrained and k not in trained and "base_layer" not in k:
            assert torch.equal(p.detach(), pretrained[k]), k


def test_a_v15_adapter_loads_and_forecasts_as_it_was_trained(v15_trained, checkpoint):
    """The exported adapter, loaded, gives the trial's own forecast (tp and state)."""
    from aurora_sweep.model.adapter import load_finetuned
    from aurora_sweep.verify.scoring import forecast

    data, trial, result, adapter = v15_trained
    samples = data.for_trial("v1.5", trial.levels).validation
    loaded = load_finetuned(adapter, checkpoint=checkpoint)
    idx = np.arange(3)
    a = forecast(loaded, samples, idx, batch_size=3, device="cpu")
    b = forecast(result.model, samples, idx, batch_size=3, device="cpu")
    np.testing.assert_allclose(a.values, b.values, rtol=1e-4, atol=1e-5)
    assert (a.values >= 0).all() and set(a.mse) == set(b.mse) and "sd" in a.mse
    for k in a.mse:
        assert a.mse[k] == pytest.approx(b.mse[k], rel=1e-4), k
