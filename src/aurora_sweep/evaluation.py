"""Forecast a split and verify it: tp against both baselines, and what the fine-tune broke.

A fine-tune for tp is only useful if its tp beats persistence and climatology in the scores
precipitation people use, and if it did not ruin what Aurora already predicted. One forward pass
over the evaluation samples gives both: the tp forecast, scored by `metrics.tp_scores`, and the
latitude-weighted RMSE of every other variable (2t, 10u, 10v, msl, and z, u, v, t, q at the
study's levels). The untouched base model's RMSE on the same samples is computed once per study;
their ratio is the forgetting ratio (> 1: worse than before the fine-tune).

Everything here is on the grid the model forecasts (see `dataset.patch_crop`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aurora_sweep.dataset import Samples, climatology_forecast
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.loss import LossSpec, loss_terms
from aurora_sweep.metrics import lat_weighted_rmse, objective_value, tp_scores
from aurora_sweep.model import clamped
from aurora_sweep.store import ATMOS_VARS, SURF_VARS, TARGET_VAR


def eval_batch_size(train_batch: int, device: torch.device) -> int:
    """Samples per forecast pass when scoring.

    A forward pass without gradients keeps a layer or two alive, not every activation, so on a GPU
    four times the training batch stays well inside the trial's own (capped) training peak. A CPU
    has no cap and runs large batches much faster (2.4x from 8 to 32 samples for the demo model).
    """
    return 32 if device.type == "cpu" else min(32, 4 * train_batch)


def state_names(levels: tuple[int, ...]) -> list[str]:
    """Names of the variables Aurora already predicts: '2t', ..., 'z500', 't850', ..."""
    return [*SURF_VARS, *(f"{v}{lv}" for v in ATMOS_VARS for lv in levels)]


@dataclass
class Forecasts:
    """A model's forecasts of `indices`: tp in mm (n, lat, lon), the other variables' MSE, and
    (when asked) each variable's term of the training loss, averaged over the samples."""

    indices: np.ndarray
    tp: np.ndarray | None
    mse: dict[str, float]
    loss_terms: dict[str, float] = dataclasses.field(default_factory=dict)
    #: the objective's per-sample (numerator, denominator), set by `verify` (paired comparisons)
    objective_terms: tuple[np.ndarray, np.ndarray] | None = None


def _without_tp(batch):
    return dataclasses.replace(
        batch, surf_vars={k: v for k, v in batch.surf_vars.items() if k != TARGET_VAR}
    )


@torch.no_grad()
def forecast(
    model,
    samples: Samples,
    indices: np.ndarray,
    *,
    batch_size: int,
    device,
    with_tp: bool = True,
    state: bool = True,
    loss: LossSpec | None = None,
) -> Forecasts:
    """Run `model` over `indices` in batches, tp clamped at 0 as in a forecast.

    Args:
        model: a fine-tuned model (with tp) or, with `with_tp=False`, the base model.
        samples: the split the indices point into.
        indices: sample indices.
        batch_size: samples per forward pass.
        device: where the model lives.
        with_tp: the model predicts tp (the base model does not and must not be given it).
        state: also score the variables Aurora already predicts (latitude-weighted MSE).
        loss: also average each variable's term of this training loss (the validation loss).
    """
    was_training = model.training
    model.eval()
    lat = samples.cube["latitude"].values
    tp_out: list[np.ndarray] = []
    sums = dict.fromkeys(state_names(samples.levels), 0.0) if state else {}
    term_sums: dict[str, float] = {}
    names = (*SURF_VARS, *((TARGET_VAR,) if with_tp else ()), *ATMOS_VARS)
    with clamped(model) if with_tp else _nothing():
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            batch = samples.inputs(idx)
            pred = model((batch if with_tp else _without_tp(batch)).to(device))
            if with_tp:
                tp_out.append(pred.surf_vars[TARGET_VAR][:, 0].float().cpu().numpy())
            if not (state or loss is not None):
                continue
            observed = samples.read(samples.index[np.asarray(idx)] + 1, names)
            if loss is not None and with_tp:
                truth = {k: torch.from_numpy(v) for k, v in observed.items()}
                for k, v in loss_terms(loss, pred, truth).items():
                    term_sums[k] = term_sums.get(k, 0.0) + float(v) * len(idx)
            if state:
                _add_state_mse(sums, pred, observed, samples.levels, lat, len(idx))
    if was_training:
        model.train()
    return Forecasts(
        indices=np.asarray(indices),
        tp=np.concatenate(tp_out) if with_tp else None,
        mse={k: v / len(indices) for k, v in sums.items()},
        loss_terms={k: v / len(indices) for k, v in term_sums.items()},
    )


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _add_state_mse(sums, pred, observed, levels, lat, n: int) -> None:
    """Add `n` samples' latitude-weighted MSE of every state variable to `sums`."""
    for k in SURF_VARS:
        fc = pred.surf_vars[k][:, 0].float().cpu().numpy()
        sums[k] += lat_weighted_rmse(fc, observed[k], lat) ** 2 * n
    for k in ATMOS_VARS:
        fc = pred.atmos_vars[k][:, 0].float().cpu().numpy()
        for j, lv in enumerate(levels):
            err = lat_weighted_rmse(fc[:, j], observed[k][:, j], lat)
            sums[f"{k}{lv}"] += err**2 * n


def forgetting_ratios(finetuned: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """RMSE of the fine-tuned model over that of the base model, per variable (> 1: worse)."""
    return {
        f"forget_{k}_ratio": float(np.sqrt(finetuned[k] / base[k])) if base[k] > 0 else float("nan")
        for k in finetuned
        if k in base
    }


def worst_forgetting(metrics: dict[str, float]) -> tuple[str, float] | None:
    """The variable whose RMSE grew most, and its ratio."""
    ratios = {
        k.removeprefix("forget_").removesuffix("_ratio"): v
        for k, v in metrics.items()
        if k.startswith("forget_") and k.endswith("_ratio") and np.isfinite(v)
    }
    if not ratios:
        return None
    name = max(ratios, key=ratios.get)
    return name, ratios[name]


def base_state_mse(
    data,
    *,
    base: str,
    checkpoint: Path,
    device,
    batch_size: int | None = None,
    precision: str = "fp32",
    wrap_longitude: bool = False,
) -> dict[str, float]:
    """The untouched base model's MSE of every variable it predicts on the evaluation split
    (`batch_size` samples a pass; default `eval_batch_size` for a batch of one), run in the
    `precision` and with the longitude wrap of the trials it is compared with: a forgetting
    ratio then measures the fine-tune, not a change of precision or of windows."""
    from aurora_sweep.model import (
        build_base,
        load_base_checkpoint,
        set_longitude_wrap,
        set_precision,
    )

    model = build_base(base, with_tp=False)
    load_base_checkpoint(model, checkpoint)
    set_precision(model, precision)
    set_longitude_wrap(model, wrap_longitude)
    model.to(device)
    samples = data.validation
    result = forecast(
        model, samples, np.arange(len(samples)),
        batch_size=batch_size or eval_batch_size(1, torch.device(device)), device=device,
        with_tp=False,
    )  # fmt: skip
    return result.mse


def verify(
    model,
    data,
    *,
    batch_size: int,
    device,
    indices: np.ndarray | None = None,
    bootstrap: int = 1000,
    precision: str = "fp32",
    loss: LossSpec | None = None,
) -> tuple[dict[str, float], Forecasts]:
    """tp scores (with intervals) and forgetting ratios of `model` on `data`'s evaluation split,
    against the base model run in `precision`; with `loss`, the validation loss's terms too."""
    samples: Samples = data.validation
    indices = np.arange(len(samples)) if indices is None else np.asarray(indices)
    base_mse = (data.base_mse or {}).get(precision)
    result = forecast(
        model, samples, indices, batch_size=batch_size, device=device,
        state=base_mse is not None, loss=loss,
    )  # fmt: skip
    times = samples.target_times()[indices]
    terms: dict[str, np.ndarray] = {}
    metrics = tp_scores(
        forecast=result.tp,
        observed=samples.observed(indices),
        persistence=samples.persistence(indices),
        climatology=climatology_forecast(data.climatology, times),
        lat=samples.cube["latitude"].values,
        months=times.month.values,
        hours=times.hour.values,
        days=times.values.astype("datetime64[D]"),
        seeps=data.seeps,
        objective=data.objective,
        bootstrap=bootstrap,
        terms_out=terms,
    )
    result.objective_terms = (terms["num"], terms["den"])
    if base_mse is not None:
        metrics |= forgetting_ratios(result.mse, base_mse)
    return metrics, result


def check_objective_defined(data) -> None:
    """Refuse, before the first trial, an objective the evaluation split cannot define.

    SEEPS scores only grid points whose climatological dry fraction lies within 0.1..0.85 (in
    the month and hour of each target): a region and period where every point is always dry or
    always wet there leaves nothing to score, every trial's objective would be NaN and a study
    would never finish a trial.
    """
    if data.objective != "tp_seeps":
        return
    from aurora_sweep.metrics import SEEPS_P_DRY_RANGE

    times = data.validation.target_times()
    p_dry = data.seeps.p_dry[times.month.values - 1, times.hour.values // 6]
    low, high = SEEPS_P_DRY_RANGE
    with np.errstate(invalid="ignore"):
        scored = (p_dry >= low) & (p_dry <= high) & np.isfinite(data.seeps.light_heavy[
            times.month.values - 1, times.hour.values // 6
        ])  # fmt: skip
    if not scored.any():
        seen = p_dry[np.isfinite(p_dry)]
        span = f"{seen.min():.2f}..{seen.max():.2f}" if seen.size else "undefined"
        raise AuroraSweepError(
            f"tp_seeps is undefined on the {data.validation.split} split: at every grid point the "
            f"train split's dry fraction (here {span}) lies outside {low}..{high} in the months "
            "and hours scored, so SEEPS leaves nothing to score; use [study] objective = "
            '"tp_rmse", or a region and period with both dry and wet 6-hour totals'
        )


def subset_objective(tp: np.ndarray, data, indices: np.ndarray) -> float:
    """The study's objective for a forecast of the evaluation samples `indices` (for pruning)."""
    samples: Samples = data.validation
    times = samples.target_times()[indices]
    return objective_value(
        data.objective,
        forecast=tp,
        observed=samples.observed(indices),
        lat=samples.cube["latitude"].values,
        months=times.month.values,
        hours=times.hour.values,
        seeps=data.seeps,
    )


def case_indices(samples: Samples, indices: np.ndarray) -> dict[str, int]:
    """Positions in `indices` of a wet, a median and a dry case (by weighted area-mean tp)."""
    from aurora_sweep.figures import pick_cases

    return pick_cases(samples.observed(indices), samples.cube["latitude"].values)


def case_maps_png(samples: Samples, result: Forecasts) -> bytes:
    """Observed, forecast, persistence and error maps of three fixed cases, as a PNG."""
    from aurora_sweep.figures import case_maps, png_bytes

    idx = result.indices
    times = samples.target_times()[idx]
    observed, persistence = samples.observed(idx), samples.persistence(idx)
    cases = [
        {
            "label": label,
            "time": f"{times[i]:%Y-%m-%d %H UTC}",
            "observed": observed[i],
            "forecast": result.tp[i],
            "persistence": persistence[i],
        }
        for label, i in case_indices(samples, idx).items()
    ]
    lon = samples.cube["longitude"].values
    lsm = samples.cube["static_lsm"].values
    return png_bytes(case_maps(cases=cases, lat=samples.cube["latitude"].values, lon=lon, lsm=lsm))


def trial_figures(result, data) -> dict[str, bytes]:
    """The PNG figures each completed trial logs: loss curves and the three case maps."""
    from aurora_sweep.figures import loss_curves, png_bytes

    return {
        "loss_curves.png": png_bytes(loss_curves(result.train_loss, result.val_loss)),
        "cases.png": case_maps_png(data.validation, result.forecasts),
    }
