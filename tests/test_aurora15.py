"""Aurora 1.5's own precipitation: built from a checkpoint this test writes (AuroraV1p5 at
reduced width, random weights), its 6-, 12- and 24-hour totals equal the hand sum of the hourly
fields `aurora.rollout` gives with `fine_lead_times` 1..6 (each clamped at 0)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import torch
from aurora import Batch, Metadata, rollout

from aurora_sweep.aurora15 import HOURLY_TP, build_v15, hourly_totals, input_variables, load_v15
from aurora_sweep.errors import AuroraSweepError

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
    model = build_v15(SMALL)
    path = tmp_path_factory.mktemp("v15") / "aurora-v1.5-small.ckpt"
    torch.save(model.state_dict(), path)
    return path


def _batch(model, n: int = 2, grid: tuple[int, int] = (16, 24)) -> Batch:
    g = torch.Generator().manual_seed(1)
    h, w = grid

    def field(*shape):
        return torch.rand(*shape, generator=g)

    surf = {k: field(n, 2, h, w) for k in input_variables(model)}
    surf["scaled_sd"] = 0.01 * surf["scaled_sd"]  # metres of snow water: small and positive
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


@pytest.mark.parametrize(("steps", "per_pass"), [(1, 6), (2, 2), (4, 3)])
def test_aurora15_totals_are_the_sum_of_its_hourly_precipitation(checkpoint, steps, per_pass):
    model = load_v15(checkpoint, SMALL)
    batch = _batch(model)
    total, last = hourly_totals(model, batch, steps, hours_per_pass=per_pass)
    with torch.no_grad():
        preds = list(rollout(model, batch, steps, fine_lead_times=[1, 2, 3, 4, 5, 6]))
    by_hand = sum(p.surf_vars[HOURLY_TP][:, 0].clamp(min=0) for p in preds) * 1000.0
    assert len(preds) == 6 * steps
    assert total.shape == by_hand.shape == (2, 16, 24)
    np.testing.assert_allclose(total.numpy(), by_hand.numpy(), rtol=1e-4, atol=1e-6)
    assert (total >= 0).all() and total.abs().max() > 0
    # the state at the end is the rollout's last (6-hour) prediction
    np.testing.assert_allclose(
        last.surf_vars["2t"].numpy(), preds[-1].surf_vars["2t"].numpy(), rtol=1e-4, atol=1e-5
    )
    assert last.metadata.time == preds[-1].metadata.time


def test_a_checkpoint_of_another_model_is_refused_in_one_line(checkpoint, tmp_path):
    bad = tmp_path / "other.ckpt"
    state = torch.load(checkpoint, weights_only=True)
    del state["decoder.surf_heads.scaled_tp_1h.weight"]
    torch.save(state, bad)
    with pytest.raises(AuroraSweepError, match="does not match the base model: missing"):
        load_v15(bad, SMALL)
    with pytest.raises(AuroraSweepError, match="cannot build Aurora 1.5"):
        build_v15((("embed_dim", "wide"),))
