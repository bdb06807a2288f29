"""An adapter directory reproduces the model it was saved from, whatever levers the trial used."""

import numpy as np
import pytest
import torch

from aurora_sweep.data.samples import Samples, target_stats
from aurora_sweep.data.store import open_store
from aurora_sweep.model.adapter import adapter_tensors, load_finetuned, save_adapter
from aurora_sweep.model.build import clamped
from aurora_sweep.model.files import DEMO_CHECKPOINT
from aurora_sweep.train.fit import build_trial_model
from synthetic import tiny_lora_trial, train_steps

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_saved_adapter_forecasts_what_the_trained_model_forecast(
    tiny_config, tmp_path, checkpointing
):
    cube = open_store(tiny_config.data.store)
    train = Samples(cube, tiny_config.data, "train")
    trial = tiny_lora_trial(unfrozen_blocks=1, activation_checkpointing=checkpointing)
    stats = target_stats(train.cube, tiny_config.data.train, "tp")
    peft_model, model, parts = build_trial_model(trial, stats, DEMO_CHECKPOINT)
    if checkpointing:
        model.configure_activation_checkpointing()
    train_steps(peft_model, train, steps=2, offset=5)
    assert len(adapter_tensors(peft_model)) == len(parts.lora)
    save_adapter(
        tmp_path / "adapter", model=peft_model, parts=parts, trial=trial, stats=stats,
        checkpoint=DEMO_CHECKPOINT, study_config=tiny_config.path, metrics={},
    )  # fmt: skip
    batch, _ = train.batch([7, 8])
    peft_model.eval()
    with torch.no_grad(), clamped(peft_model):  # a loaded adapter forecasts with tp clamped
        expected = peft_model(batch).surf_vars["tp"].numpy()
        loaded = load_finetuned(tmp_path / "adapter")
        got = loaded(batch).surf_vars["tp"].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # and the adapter is not a no-op: LoRA B moved away from zero and was stored
    stored = adapter_tensors(loaded)
    assert any(v.abs().sum() > 0 for k, v in stored.items() if "lora_B" in k)


@pytest.mark.parametrize(
    ("method", "checkpointing"), [("dora", True), ("blocks", False), ("head", False)]
)
def test_an_adapter_of_any_method_loads_with_plain_peft_and_its_trained_weights(
    tiny_config, tmp_path, method, checkpointing
):
    """DoRA through `peft.PeftModel.from_pretrained`; methods without LoRA from the base model and
    `trained_weights.safetensors` alone; both forecast what the trained model forecast."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from aurora_sweep.model.build import build_base, load_base_checkpoint, set_longitude_wrap

    cube = open_store(tiny_config.data.store)
    train = Samples(cube, tiny_config.data, "train")
    lora = method == "dora"
    trial = tiny_lora_trial(
        lora_rank=2 if lora else 0, lora_targets="qkv+proj" if lora else "",
        unfrozen_blocks=2 if method == "blocks" else 0, activation_checkpointing=checkpointing,
        method=method,
    )  # fmt: skip
    stats = target_stats(train.cube, tiny_config.data.train, "tp")
    trained, model, parts = build_trial_model(trial, stats, DEMO_CHECKPOINT)
    if checkpointing:
        model.configure_activation_checkpointing()
    train_steps(trained, train, steps=2, offset=5)
    directory = tmp_path / "adapter"
    save_adapter(
        directory, model=trained, parts=parts, trial=trial, stats=stats,
        checkpoint=DEMO_CHECKPOINT, study_config=tiny_config.path, metrics={},
    )  # fmt: skip
    assert (directory / "adapter_config.json").exists() == lora
    batch, _ = train.batch([7, 8])
    trained.eval()
    # as aurora_sweep.json describes it: tp clamped as in a forecast, windows as trained
    base = build_base("demo", stats=(stats.location, stats.scale), clamp=True)
    load_base_checkpoint(base, DEMO_CHECKPOINT)
    set_longitude_wrap(base, trial.wrap_longitude)
    plain = PeftModel.from_pretrained(base, directory) if lora else base
    weights = load_file(directory / "trained_weights.safetensors")
    result = (plain.get_base_model() if lora else plain).load_state_dict(weights, strict=False)
    assert not result.unexpected_keys
    with torch.no_grad(), clamped(trained):
        expected = trained(batch).surf_vars["tp"].numpy()
        for loaded in (plain.eval(), load_finetuned(directory)):
            np.testing.assert_allclose(
                loaded(batch).surf_vars["tp"].numpy(), expected, rtol=1e-5, atol=1e-6
            )


def test_the_metadata_of_an_adapter_from_before_other_targets_reads_as_tp(tmp_path):
    """An adapter written before targets other than tp keeps its statistics under `tp_stats`
    (and no objective): `read_meta` gives them as tp's, with tp's RMSE as the objective."""
    import json

    from aurora_sweep.data.samples import TargetStats
    from aurora_sweep.model.adapter import META, read_meta

    trial = tiny_lora_trial()
    old = {
        "trial": {k: v for k, v in trial.to_dict().items() if k != "method"},
        "tp_stats": {"location": 0.0, "scale": 2.5, "mean": 0.4},
        "base": {"name": "demo", "checkpoint": "demo.ckpt", "sha256": "0" * 64},
        "metrics": {"tp_rmse": 1.0},
    }
    (tmp_path / META).write_text(json.dumps(old))
    meta = read_meta(tmp_path)
    assert meta.stats == TargetStats(location=0.0, scale=2.5, mean=0.4, target="tp")
    assert meta.trial == trial and meta.trial.method == "lora"
    assert meta.base.sha256 == "0" * 64 and meta.objective == "tp_rmse"
    assert meta.data == {} and meta.history == {} and meta.references == ()
