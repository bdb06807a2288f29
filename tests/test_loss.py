"""Aurora's loss over every variable, and the training fixes that decide which recipe wins."""

import math

import numpy as np
import pytest
import torch
from aurora import Batch, Metadata
from aurora.normalisation import scales

from aurora_sweep.data.store import ATMOS_VARS, SURF_VARS
from aurora_sweep.model.loss import (
    ALPHA,
    ATMOS_WEIGHTS,
    BETA,
    SURFACE_WEIGHTS,
    LossSpec,
    censored_error,
    combine,
    loss_terms,
)
from aurora_sweep.train.optimiser import FINAL_LR_FACTOR, learning_rate_factor

LEVELS = (500, 850)


def _state(lat: int = 4, lon: int = 8, value: float = 0.0, b: int = 1):
    surf = {k: torch.full((b, lat, lon), value) for k in (*SURF_VARS, "tp")}
    atmos = {k: torch.full((b, len(LEVELS), lat, lon), value) for k in ATMOS_VARS}
    return surf, atmos


def _prediction(surf, atmos, lat):
    """A model output holding these fields (the loss reads latitudes from its spec)."""
    return Batch(
        surf_vars={k: v[:, None] for k, v in surf.items()},
        static_vars={},
        atmos_vars={k: v[:, None] for k, v in atmos.items()},
        metadata=Metadata(
            lat=torch.linspace(80, -80, len(lat)),
            lon=torch.arange(8.0),
            time=(None,),
            atmos_levels=LEVELS,
        ),
    )


def _spec(lat, **changes):
    return LossSpec(levels=LEVELS, lat=np.asarray(lat), target_scale=2.0, **changes)


def test_each_term_is_the_latitude_weighted_mean_absolute_error_in_normalised_units():
    lat = np.array([60.0, 60.0, 0.0, 0.0])
    surf, atmos = _state()
    truth = {**{k: v.clone() for k, v in surf.items()}, **{k: v.clone() for k, v in atmos.items()}}
    surf["2t"][:, :2] += 1.0  # an error of 1 K in the two rows at 60°N only
    atmos["z"][:, 1] += 10.0  # 10 m2 s-2 at 850 hPa, every row
    terms = loss_terms(_spec(lat), _prediction(surf, atmos, lat), truth)
    w60 = math.cos(math.radians(60)) / np.mean(np.cos(np.deg2rad(lat)))
    assert terms["2t"].item() == pytest.approx(w60 * (2 / 4) / scales["2t"], rel=1e-5)
    assert terms["z"].item() == pytest.approx(0.5 * 10.0 / scales["z_850"], rel=1e-5)
    assert terms["10u"].item() == 0.0 and terms["tp"].item() == 0.0


def test_an_error_near_the_pole_weighs_less_than_the_same_error_at_the_equator():
    lat = np.array([80.0, 40.0, 0.0, -40.0])
    surf, atmos = _state()
    truth = {**surf, **atmos}
    north, south = ({k: v.clone() for k, v in surf.items()} for _ in range(2))
    north["msl"][:, 0] += 100.0
    south["msl"][:, 2] += 100.0
    at_pole = loss_terms(_spec(lat), _prediction(north, atmos, lat), truth)["msl"]
    at_equator = loss_terms(_spec(lat), _prediction(south, atmos, lat), truth)["msl"]
    assert at_pole.item() == pytest.approx(at_equator.item() * math.cos(math.radians(80)))


def test_the_total_weighs_each_variable_as_aurora_does_and_tp_by_its_target_weight():
    terms = {k: 1.0 for k in (*SURF_VARS, "tp", *ATMOS_VARS)}
    n = len(terms)
    for weight in (0.5, 3.0):
        expected = (
            ALPHA * (sum(SURFACE_WEIGHTS.values()) + weight) + BETA * sum(ATMOS_WEIGHTS.values())
        ) / n
        assert combine(_spec([0.0], target_weight=weight), terms) == pytest.approx(expected)
    assert SURFACE_WEIGHTS == {"2t": 3.0, "msl": 1.5, "10u": 0.77, "10v": 0.66}
    assert ATMOS_WEIGHTS == {"z": 2.8, "q": 0.78, "t": 1.7, "u": 0.87, "v": 0.6}


def test_a_wet_point_whose_raw_forecast_is_negative_still_gets_a_gradient():
    # Aurora's clamp in training made this point's gradient exactly zero
    raw = torch.tensor([-3.0, -3.0, 1.0], requires_grad=True)
    observed = torch.tensor([2.0, 0.0, 0.0])  # wet, dry, dry
    err = censored_error(raw, observed)
    err.abs().sum().backward()
    assert err.tolist() == [-5.0, 0.0, 1.0]  # a dry forecast of a dry point is no error
    assert raw.grad.tolist() == [-1.0, 0.0, 1.0]


def test_mse_squares_only_tps_error():
    lat = np.array([0.0] * 4)
    surf, atmos = _state()
    truth = {**{k: v.clone() for k, v in surf.items()}, **atmos}
    surf["tp"] += 4.0  # 2 in tp's normalised units (scale 2 mm)
    surf["2t"] += 2 * scales["2t"]
    for loss, expected in (("mae", 2.0), ("mse", 4.0)):
        terms = loss_terms(_spec(lat, target_loss=loss), _prediction(surf, atmos, lat), truth)
        assert terms["tp"].item() == pytest.approx(expected)
        assert terms["2t"].item() == pytest.approx(2.0)


def test_the_learning_rate_warms_up_then_decays_along_a_cosine():
    steps = 100
    factors = [learning_rate_factor(s, steps) for s in range(1, steps + 1)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(factors[:10], factors[1:10]))  # warm-up rises
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # then only falls
    assert factors[-1] == pytest.approx(FINAL_LR_FACTOR)
    assert learning_rate_factor(1, 1) == 1.0  # a one-step fine-tune trains at the peak


def test_a_targets_dry_limit_is_in_its_units_and_soil_moisture_is_not_censored():
    from aurora_sweep.config.targets import TARGETS

    lat = np.zeros(4)
    assert _spec(lat).dry == 0.01  # tp: mm per step
    assert _spec(lat, target=TARGETS["pr"]).dry == pytest.approx(0.01 / 6)  # mm h-1
    swvl1 = _spec(lat, target=TARGETS["swvl1"])
    assert swvl1.dry is None and swvl1.variables[len(SURF_VARS)] == "swvl1"
    surf, atmos = _state()
    surf["swvl1"] = surf.pop("tp") - 0.2  # a raw forecast below a dry (0) truth
    truth = {**{k: torch.zeros_like(v) for k, v in surf.items()}, **atmos}
    terms = loss_terms(swvl1, _prediction(surf, atmos, lat), truth)
    # soil moisture is not censored: the whole error counts, over the target's scale
    assert terms["swvl1"].item() == pytest.approx(0.2 / 2.0, rel=1e-6)
    surf["tp"] = surf.pop("swvl1")
    truth["tp"] = truth.pop("swvl1")
    assert loss_terms(_spec(lat), _prediction(surf, atmos, lat), truth)["tp"].item() == 0.0


@pytest.mark.parametrize("name", ["swvl1", "ro"])
def test_a_land_targets_term_leaves_the_sea_out_of_its_mean_and_its_gradient(name):
    from aurora_sweep.config.targets import TARGETS

    lat = np.array([60.0, 30.0, 0.0, -30.0])
    spec = _spec(lat, target=TARGETS[name])
    surf, atmos = _state()
    surf[name] = surf.pop("tp") + 0.5  # an error of 0.5 everywhere
    surf[name][:, :, 4:] += 100.0  # and a wild one at sea, the eastern half
    surf[name].requires_grad_(True)
    truth = {**{k: torch.zeros_like(v) for k, v in surf.items()}, **atmos}
    truth[name][:, :, 4:] = float("nan")  # `Samples.as_truth`: undefined at sea
    term = loss_terms(spec, _prediction(surf, atmos, lat), truth)[name]
    # the latitude-weighted mean over land alone: 0.5 over the scale 2 at every land point
    assert term.item() == pytest.approx(0.25, rel=1e-6)
    term.backward()
    grad = surf[name].grad
    assert (grad[:, :, 4:] == 0).all() and (grad[:, :, :4] != 0).all()
    # a tile all at sea has no land to be judged on: 0, not NaN
    truth[name][:] = float("nan")
    assert loss_terms(spec, _prediction(surf, atmos, lat), truth)[name].item() == 0.0
