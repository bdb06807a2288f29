"""The training loss: Aurora's own, over every variable it forecasts, plus the new one.

A fine-tune for a target (tp, runoff, ...) whose loss is the target alone lets the backbone drift
away from everything else Aurora predicts, and a forecast rolled out to 24 h feeds that broken state
back into the model. So trials train on Aurora's loss (Bodnar et al., Nature 2025, supplementary):
the mean absolute error of normalised variables, latitude-weighted, surface variables weighted by
α = 1/4 and atmospheric ones by β = 1 (their levels averaged), each variable with Aurora's weight.
The new variable joins the surface sum with a weight of its own (`[search] target_weight`) and, as
`[search] loss` says, an absolute ("mae") or squared ("mse") error. The dataset weight γ is
dropped: a study trains on one dataset.

A base that reads more surface variables (Aurora 1.5's fourteen more inputs, `LossSpec.surface`)
is trained on them too, each with a weight of 1 (Aurora 1.5's own weights are not published),
in its normalised units: a log-transformed variable (`scaled_sd`, the store's `sd`) in its log
space, as Aurora 1.5 normalises it.

In symbols, with w(i) = cos(lat_i) / mean(cos lat) over the region (a tile's rows too) and errors in each variable's normalised
units (Aurora's scales; the target's from the train split):

    L = 1/(V_S + V_A) * [ α Σ_k w_k mean_ij w(i)|ΔS_k| + β Σ_k w_k mean_cij w(i)|ΔA_k| ]

`loss_terms` gives each variable's term (before its weight), which is also what the validation
loss logs per variable; `combine` weighs and sums them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from aurora.normalisation import level_to_str, log_transform, scales

from aurora_sweep.config.targets import DEFAULT, STEP_HOURS, TARGETS, Target
from aurora_sweep.data.store import ATMOS_VARS, AURORA_V15_NAMES, SURF_VARS

#: Aurora's per-variable weights (surface, then atmospheric).
SURFACE_WEIGHTS = {"2t": 3.0, "msl": 1.5, "10u": 0.77, "10v": 0.66}
#: The weight of a surface variable Aurora's loss does not name (Aurora 1.5's other inputs).
OTHER_SURFACE_WEIGHT = 1.0
ATMOS_WEIGHTS = {"z": 2.8, "q": 0.78, "t": 1.7, "u": 0.87, "v": 0.6}
ALPHA, BETA = 0.25, 1.0
#: An observed precipitation-like target at most this (mm over a step, or its rate) is dry: a
#: censored value (`censored_error`). ERA5's dry points hold zeros and packing noise of a few
#: thousandths of a mm; SEEPS's dry class ends at 0.1 mm.
DRY_CENSOR_MM = 0.01


@dataclass(frozen=True)
class LossSpec:
    """What one trial's loss needs besides the forecast and the truth."""

    levels: tuple[int, ...]
    lat: np.ndarray  # latitudes of the grid trained on, degrees
    target_scale: float  # the target's normalisation scale, in its units
    target_weight: float = 1.0
    target_loss: str = "mae"
    #: the instantaneous surface variables the model predicts (store names): Aurora's four, or
    #: with Aurora 1.5's fourteen more inputs (`dataset.Samples.surface`)
    surface: tuple[str, ...] = SURF_VARS
    target: Target = TARGETS[DEFAULT]
    #: the mean cos(latitude) of the whole region, when `lat` are a tile's: the tile's rows are
    #: weighed as the scores weigh them, not renormalised to a mean of 1 inside the tile
    region_cos: float | None = None

    @property
    def dry(self) -> float | None:
        """At most this, an observed target is censored (`censored_error`); None: never (a
        continuous target)."""
        return (
            self.target.per_lead(DRY_CENSOR_MM, STEP_HOURS)
            if self.target.lower == 0 and (self.target.precipitation_like)
            else None
        )

    def latitude_weights(self, device, dtype=torch.float32) -> torch.Tensor:
        """cos(latitude) over its mean over the region, shaped (lat, 1) to broadcast over
        longitudes."""
        w = np.cos(np.deg2rad(np.asarray(self.lat, dtype=np.float64)))
        return torch.tensor(w / (self.region_cos or w.mean()), device=device, dtype=dtype)[:, None]

    def atmos_scales(self, name: str, device) -> torch.Tensor:
        """Aurora's scale of `name` at each of the study's levels, shaped (level, 1, 1)."""
        values = [scales[f"{name}_{level_to_str(lv)}"] for lv in self.levels]
        return torch.tensor(values, device=device, dtype=torch.float32)[:, None, None]

    @property
    def variables(self) -> tuple[str, ...]:
        """The variables the loss covers, in the order `loss_terms` returns them."""
        return (*self.surface, self.target.name, *ATMOS_VARS)


def loss_terms(
    spec: LossSpec, prediction, target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Each variable's latitude-weighted mean error in normalised units (a scalar tensor).

    Args:
        spec: the trial's loss settings.
        prediction: the model's output (`aurora.Batch`, one time step).
        target: the truth at the target time: surface variables and the target (B, lat, lon),
            atmospheric ones (B, level, lat, lon), in physical units as the store holds them.
    """
    name = spec.target.name
    device = prediction.surf_vars[name].device
    w = spec.latitude_weights(device)
    terms = {}
    for k in spec.surface:
        err = surface_error(k, prediction.surf_vars[k][:, 0].float(), target[k].to(device))
        terms[k] = (err.abs() * w).mean()
    terms[name] = target_term(spec, prediction.surf_vars[name][:, 0].float(), target[name], w)
    for name in ATMOS_VARS:
        err = (prediction.atmos_vars[name][:, 0].float() - target[name].to(device)) / (
            spec.atmos_scales(name, device)
        )
        terms[name] = (err.abs() * w).mean()
    return terms


def target_term(
    spec: LossSpec, raw: torch.Tensor, observed: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """The target's latitude-weighted mean error (absolute or squared, in its normalised units)
    of the raw output `raw` (B, lat, lon). A land-only target's truth is NaN at sea
    (`dataset.Samples.as_truth`): those points are left out of the mean, so the model is neither
    trained nor judged on values the target does not have there."""
    observed = observed.to(raw.device)
    defined = torch.isfinite(observed) if spec.target.land_only else None
    if defined is not None:
        observed = torch.where(defined, observed, torch.zeros_like(observed))
    err = censored_error(raw, observed, spec.dry) if spec.dry is not None else raw - observed
    err = err / spec.target_scale
    err = err**2 if spec.target_loss == "mse" else err.abs()
    if defined is None:
        return (err * w).mean()
    weights = w * defined  # (B, lat, lon): a tile all at sea gives 0, not NaN
    return (err * weights).sum() / weights.sum().clamp(min=1e-12)


def surface_error(name: str, forecast: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """A surface variable's error in the units Aurora normalises it in (store name `name`):
    over its scale, after the log transform for Aurora 1.5's `scaled_*` variables."""
    aurora_name = AURORA_V15_NAMES.get(name, name)
    if aurora_name.startswith("scaled_"):  # its floor, -1e-3, would be log(0)
        forecast, truth = log_transform(forecast.clamp(min=0)), log_transform(truth.clamp(min=0))
    return (forecast - truth) / scales[aurora_name]


def censored_error(
    raw: torch.Tensor, observed: torch.Tensor, dry: float = DRY_CENSOR_MM
) -> torch.Tensor:
    """The error of a raw (unclamped) forecast of a precipitation-like target (tp, runoff, a
    rate), with dry observations taken as censored.

    tp is a censored quantity: an observed 0 says "no more than 0", which a raw output of -2
    meets as well as 0 does (the forecast, clamped at 0, is dry either way). So where the
    observation is dry (at most `dry`, `LossSpec.dry`) only a raw output above it is an error;
    where it is wet the raw output's whole shortfall is, even below 0. Unlike a loss on the
    clamped output (Aurora's `clamp_at_first_step` in training), no wet point is ever left
    without a gradient; unlike a plain loss on the raw output, the model is free to forecast
    "clearly dry" below 0, which is what lets a clamped forecast be exactly dry.
    """
    err = raw - observed
    return torch.where(observed > dry, err, err.clamp(min=0))


def combine(spec: LossSpec, terms: Mapping[str, torch.Tensor | float]):
    """Aurora's weighted sum of the per-variable terms."""
    surface = sum(SURFACE_WEIGHTS.get(k, OTHER_SURFACE_WEIGHT) * terms[k] for k in spec.surface)
    surface = surface + spec.target_weight * terms[spec.target.name]
    atmos = sum(ATMOS_WEIGHTS[k] * terms[k] for k in ATMOS_VARS)
    n_vars = len(spec.surface) + 1 + len(ATMOS_VARS)
    return (ALPHA * surface + BETA * atmos) / n_vars
