"""The base models: pinned where microsoft-aurora pins them, built at any width from the
checkpoint a study gives, and searched as one more dimension of a study."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import torch
import xarray as xr
from typer.testing import CliRunner

from aurora_sweep.cli import app
from aurora_sweep.config.bases import BASES, HF_REPO, arch_overrides
from aurora_sweep.config.recipe import BaseKey
from aurora_sweep.config.study_file import load_config
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.memory.meta_model import meta_device
from aurora_sweep.model.build import backbone_blocks, build_base
from aurora_sweep.sweep.records import BASE_MSE, TrialRecord
from synthetic import write_region_store

#: Both pretrained classes at a width that trains in seconds on a CPU: the full classes, their
#: own variables and layout, fewer and narrower blocks (the pretrained one deeper than the small)
REDUCED = {
    "small-pretrained": dict(embed_dim=32, num_heads=2, encoder_depths=[1, 1, 1],
                             decoder_depths=[1, 1, 1], encoder_num_heads=[1, 2, 4],
                             decoder_num_heads=[4, 2, 1]),
    "pretrained": dict(embed_dim=32, num_heads=2, encoder_depths=[1, 2, 1],
                       decoder_depths=[1, 2, 1], encoder_num_heads=[1, 2, 4],
                       decoder_num_heads=[4, 2, 1]),
    "v1.5": dict(embed_dim=32, num_heads=2, encoder_depths=[1, 1, 1],
                 decoder_depths=[1, 1, 1], encoder_num_heads=[1, 2, 4],
                 decoder_num_heads=[4, 2, 1]),
}  # fmt: skip


def test_the_pinned_checkpoints_are_those_the_installed_aurora_classes_name():
    import aurora

    for base in BASES.values():
        if base.checkpoint_name is None:
            continue
        cls = getattr(aurora, base.aurora_class)
        assert cls.default_checkpoint_repo == HF_REPO
        assert (cls.default_checkpoint_name, cls.default_checkpoint_revision) == (
            base.checkpoint_name,
            base.revision,
        )


def test_a_base_is_its_aurora_class_with_the_studys_overrides():
    import aurora

    with meta_device():
        full = build_base("pretrained", stats=(0.0, 1.0))
        reduced = build_base(
            "pretrained", stats=(0.0, 1.0), arch=arch_overrides(REDUCED["pretrained"])
        )
    assert type(full) is type(reduced) is aurora.AuroraPretrained
    assert full.backbone.embed_dim == 512 and len(backbone_blocks(full)) == 48
    assert reduced.backbone.embed_dim == 32 and len(backbone_blocks(reduced)) == 8
    with pytest.raises(AuroraSweepError, match=r"\[model\.arch\.pretrained\].*embed_dims"):
        build_base("pretrained", stats=(0.0, 1.0), arch=(("embed_dims", 32),))


def test_a_study_names_its_bases_checkpoints_and_widths(tmp_path):
    text = STUDY.format(arch="", checkpoints="")
    (tmp_path / "s.toml").write_text(text)
    config = load_config(tmp_path / "s.toml", workdir=tmp_path)
    assert config.bases == ("small-pretrained", "pretrained", "v1.5")
    assert config.data.v15_inputs  # Aurora 1.5 reads its own inputs: the store holds them
    assert config.model.checkpoint_for("pretrained") is None
    (tmp_path / "s.toml").write_text(_with_bases(text))
    config = load_config(tmp_path / "s.toml", workdir=tmp_path)
    assert config.model.checkpoint_for("pretrained") == tmp_path / "pretrained.ckpt"
    assert dict(config.model.arch_for("pretrained"))["encoder_depths"] == (1, 2, 1)
    (tmp_path / "s.toml").write_text(
        text.replace('base = "small-pretrained"\n', 'base = "demo"\n', 1)
    )
    with pytest.raises(AuroraSweepError, match=r"leaves out \[model\] base 'demo'"):
        load_config(tmp_path / "s.toml", workdir=tmp_path)
    (tmp_path / "s.toml").write_text(text + '\n[model.checkpoints]\nlarge = "x.ckpt"\n')
    with pytest.raises(AuroraSweepError, match=r"\[model\.checkpoints\] large: not a base"):
        load_config(tmp_path / "s.toml", workdir=tmp_path)


def test_a_study_of_several_bases_tries_each_first_and_runs_its_references_on_model_base(
    tmp_path,
):
    from aurora_sweep.sweep.records import TrialRecord
    from aurora_sweep.sweep.space import enqueue_references, sample_trial

    (tmp_path / "s.toml").write_text(STUDY.format(arch="", checkpoints=""))
    config = load_config(tmp_path / "s.toml", workdir=tmp_path)
    study = optuna.create_study()
    assert enqueue_references(study, config) == ["small-pretrained", "pretrained", "v1.5"]
    assert enqueue_references(study, config) == []  # once, on a new study
    firsts = [sample_trial(study.ask(), config).base for _ in range(3)]
    assert firsts == ["small-pretrained", "pretrained", "v1.5"]
    (tmp_path / "s.toml").write_text(
        STUDY.format(arch="", checkpoints="").replace("reference = false", "reference = true")
    )
    config = load_config(tmp_path / "s.toml", workdir=tmp_path)
    study = optuna.create_study()
    assert enqueue_references(study, config) == ["full", "lora", "pretrained", "v1.5"]
    trials = [study.ask() for _ in range(4)]
    picked = [(TrialRecord.of(t).reference, sample_trial(t, config).base) for t in trials]
    assert picked == [("full", "small-pretrained"), ("lora", "small-pretrained"),
                      (None, "pretrained"), (None, "v1.5")]  # fmt: skip


STUDY = """
[study]
name = "bases"
finalists = 1
edge_margin = 2.0  # 8 points of 0.25° in from each side: a 16x16 interior
reference = false
baselines = ["persistence", "climatology", "aurora-1.5"]

[data]
source = "era5"
store = "store.zarr"
region = {{ north = 50.0, south = 42.0, west = 2.0, east = 9.75 }}
levels = [500]
grid = 0.25
period = ["2022-01-01", "2025-12-31"]

[model]
base = "small-pretrained"
{checkpoints}
[train]
steps = 2
eval_every = 1
val_samples = 2

[search]
base = ["small-pretrained", "pretrained", "v1.5"]
lora_rank = [2]
batch_size = [1]
precision = ["fp32"]
{arch}"""


def _with_bases(text: str) -> str:
    checkpoints = '[model.checkpoints]\npretrained = "pretrained.ckpt"\n"v1.5" = "v1.5.ckpt"\n'
    arch = "".join(
        f'\n[model.arch."{b}"]\n' + "\n".join(f"{k} = {v}" for k, v in kw.items()) + "\n"
        for b, kw in REDUCED.items()
    )
    text = text.replace(
        'base = "small-pretrained"\n\n',
        'base = "small-pretrained"\ncheckpoint = "small-pretrained.ckpt"\n'
        f'v15_static = "statics.pickle"\n{checkpoints}\n',
    )
    return text + arch


@pytest.mark.slow
def test_a_study_searches_three_bases_and_exports_aurora15_that_forecasts(tmp_path, monkeypatch):
    """AuroraSmallPretrained, AuroraPretrained and Aurora 1.5 at reduced width, from checkpoints
    written here, on a 0.25° store with every variable Aurora 1.5 reads: trials of each, each
    scored against its own base, `best` line per base and the zero-shot Aurora 1.5 row, and an
    exported Aurora 1.5 trial (its own precipitation adapted) forecasts a NetCDF file."""
    from aurora_sweep.model.aurora15 import static_names
    from synthetic import write_v15_statics

    monkeypatch.chdir(tmp_path)
    for base, kw in REDUCED.items():
        torch.manual_seed(0)
        model = build_base(base, with_target=False, arch=arch_overrides(kw))
        if base == "v1.5":  # a random head's log-space output overflows exp: keep it near 0
            with torch.no_grad():
                model.decoder.surf_heads["scaled_tp_1h"].weight.mul_(0.01)
        torch.save(model.state_dict(), tmp_path / f"{base}.ckpt")
    write_v15_statics(tmp_path / "statics.pickle", static_names())
    (tmp_path / "study.toml").write_text(_with_bases(STUDY.format(arch="", checkpoints="")))
    config = load_config(tmp_path / "study.toml", workdir=tmp_path)
    write_region_store(
        config.data, config.data.store, days=["2022-01-03", "2024-01-03", "2025-01-03"]
    )
    runner = CliRunner()
    result = runner.invoke(app, ["run", "-c", "study.toml", "--trials", "4"])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="bases", storage=config.storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    bases = {TrialRecord.of(t).base for t in done}
    assert bases == {"small-pretrained", "pretrained", "v1.5"}, [t.params for t in study.trials]
    for t in done:
        scores = TrialRecord.of(t).scores
        assert np.isfinite(t.value) and "forget_z500_ratio" in scores
        assert np.isfinite(scores["tp_skill_aurora15"])
        # Aurora 1.5's trials are held to its other inputs too
        assert ("forget_tcwv_ratio" in scores) == (TrialRecord.of(t).base == "v1.5")
    assert {str(BaseKey(b, "fp32")) for b in bases} <= set(study.user_attrs[BASE_MSE])

    shown = runner.invoke(app, ["best", "-c", "study.toml"])
    assert shown.exit_code == 0, shown.output
    for base in ("small-pretrained", "pretrained", "v1.5"):
        assert f"best on {base}: trial" in shown.output
    assert "A1.5" in shown.output
    v15 = min((t for t in done if TrialRecord.of(t).base == "v1.5"), key=lambda t: t.value)
    exported = runner.invoke(
        app, ["best", "-c", "study.toml", "--export", "adapter", "--trial", str(v15.number)]
    )
    assert exported.exit_code == 0, exported.output
    assert (
        "own hourly precipitation (scaled_tp_1h" in (tmp_path / "adapter" / "README.md").read_text()
    )
    forecast = runner.invoke(app, [
        "forecast", "adapter", "--start", "2025-01-03", "--end", "2025-01-03", "--lead", "12h",
        "--checkpoint", "v1.5.ckpt", "--out", "fc.nc",
    ])  # fmt: skip
    assert forecast.exit_code == 0, forecast.output
    with xr.open_dataset(tmp_path / "fc.nc", engine="netcdf4") as ds:
        assert np.isfinite(ds["tp"].values).all() and ds["tp"].sizes["time"] >= 1
        assert (ds["tp"].values >= 0).all() and "Aurora (v1.5 base)" in ds.attrs["source"]
