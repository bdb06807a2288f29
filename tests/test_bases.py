"""The base models: pinned where microsoft-aurora pins them, built at any width from the
checkpoint a study gives, and searched as one more dimension of a study."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import torch
import xarray as xr
from typer.testing import CliRunner

from aurora_sweep.bases import BASES, HF_REPO, arch_overrides
from aurora_sweep.cli import app
from aurora_sweep.config import load_config
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.meta import meta_device
from aurora_sweep.model import backbone_blocks, build_base
from aurora_sweep.records import BASE_MSE, TrialRecord, base_key
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
        full = build_base("pretrained", tp_stats=(0.0, 1.0))
        reduced = build_base(
            "pretrained", tp_stats=(0.0, 1.0), arch=arch_overrides(REDUCED["pretrained"])
        )
    assert type(full) is type(reduced) is aurora.AuroraPretrained
    assert full.backbone.embed_dim == 512 and len(backbone_blocks(full)) == 48
    assert reduced.backbone.embed_dim == 32 and len(backbone_blocks(reduced)) == 8
    with pytest.raises(AuroraSweepError, match=r"\[model\.arch\.pretrained\].*embed_dims"):
        build_base("pretrained", tp_stats=(0.0, 1.0), arch=(("embed_dims", 32),))


def test_a_study_names_its_bases_checkpoints_and_widths(tmp_path):
    text = STUDY.format(arch="", checkpoints="")
    (tmp_path / "s.toml").write_text(text)
    config = load_config(tmp_path / "s.toml", workdir=tmp_path)
    assert config.bases == ("small-pretrained", "pretrained")
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


STUDY = """
[study]
name = "bases"
reference = false

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
base = ["small-pretrained", "pretrained"]
lora_rank = [2]
batch_size = [1]
precision = ["fp32"]
{arch}"""


def _with_bases(text: str) -> str:
    checkpoints = "\n".join(f'[model.checkpoints]\n{b} = "{b}.ckpt"' for b in ["pretrained"])
    arch = "".join(
        f"\n[model.arch.{b}]\n" + "\n".join(f"{k} = {v}" for k, v in kw.items()) + "\n"
        for b, kw in REDUCED.items()
    )
    text = text.replace(
        'base = "small-pretrained"\n\n',
        f'base = "small-pretrained"\ncheckpoint = "small-pretrained.ckpt"\n{checkpoints}\n',
    )
    return text + arch


@pytest.mark.slow
def test_a_study_searches_two_bases_and_exports_one_that_forecasts(tmp_path, monkeypatch):
    """Both pretrained classes at reduced width, from checkpoints written here: trials of each,
    each scored against its own base, `best` line per base, and an exported trial of the larger
    base forecasts a NetCDF file."""
    monkeypatch.chdir(tmp_path)
    for base, kw in REDUCED.items():
        model = build_base(base, with_tp=False, arch=arch_overrides(kw))
        torch.save(model.state_dict(), tmp_path / f"{base}.ckpt")
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
    assert bases == {"small-pretrained", "pretrained"}, [t.params for t in study.trials]
    for t in done:
        assert np.isfinite(t.value) and "forget_z500_ratio" in TrialRecord.of(t).scores
    assert {base_key(b, "fp32") for b in bases} <= set(study.user_attrs[BASE_MSE])

    shown = runner.invoke(app, ["best", "-c", "study.toml"])
    assert shown.exit_code == 0, shown.output
    assert "best on small-pretrained: trial" in shown.output
    assert "best on pretrained: trial" in shown.output
    larger = min((t for t in done if TrialRecord.of(t).base == "pretrained"), key=lambda t: t.value)
    exported = runner.invoke(
        app, ["best", "-c", "study.toml", "--export", "adapter", "--trial", str(larger.number)]
    )
    assert exported.exit_code == 0, exported.output
    forecast = runner.invoke(app, [
        "forecast", "adapter", "--start", "2025-01-03", "--end", "2025-01-03",
        "--checkpoint", "pretrained.ckpt", "--out", "fc.nc",
    ])  # fmt: skip
    assert forecast.exit_code == 0, forecast.output
    with xr.open_dataset(tmp_path / "fc.nc", engine="netcdf4") as ds:
        assert np.isfinite(ds["tp"].values).all() and ds["tp"].sizes["time"] >= 1
