"""An adapter directory reproduces the model it was saved from, whatever levers the trial used."""

import numpy as np
import pytest
import torch

from aurora_sweep.dataset import Samples, tp_stats
from aurora_sweep.export import adapter_tensors, load_finetuned, save_adapter
from aurora_sweep.model import DEMO_CHECKPOINT
from aurora_sweep.store import open_store
from aurora_sweep.train import TrialConfig, build_trial_model

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_saved_adapter_forecasts_what_the_trained_model_forecast(
    tiny_config, tmp_path, checkpointing
):
    cube = open_store(tiny_config.data.store)
    train = Samples(cube, tiny_config.data, "train")
    trial = TrialConfig(
        lora_rank=2, lora_targets="qkv+proj", unfrozen_blocks=1, batch_size=2, precision="fp32",
        learning_rate=1e-2, activation_checkpointing=checkpointing, base="demo",
        levels=(500, 700, 850), steps=2, eval_every=2, val_samples=4, weight_decay=0.0, seed=0,
    )  # fmt: skip
    stats = tp_stats(train.cube, tiny_config.data.train)
    peft_model, model, parts = build_trial_model(trial, stats, DEMO_CHECKPOINT)
    if checkpointing:
        model.configure_activation_checkpointing()
    optimiser = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        batch, target = train.batch([step, step + 5])
        loss = ((peft_model(batch).surf_vars["tp"][:, 0] - target) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert len(adapter_tensors(peft_model)) == len(parts.lora)
    save_adapter(
        tmp_path / "adapter", model=peft_model, parts=parts, trial=trial, tp=stats,
        checkpoint=DEMO_CHECKPOINT, study_config=tiny_config.path, metrics={},
    )  # fmt: skip
    batch, _ = train.batch([7, 8])
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(batch).surf_vars["tp"].numpy()
        loaded = load_finetuned(tmp_path / "adapter")
        got = loaded(batch).surf_vars["tp"].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # and the adapter is not a no-op: LoRA B moved away from zero and was stored
    stored = adapter_tensors(loaded)
    assert any(v.abs().sum() > 0 for k, v in stored.items() if "lora_B" in k)
