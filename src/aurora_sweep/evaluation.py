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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aurora_sweep.dataset import Samples, climatology_forecast
from aurora_sweep.metrics import lat_weighted_rmse, objective_value, tp_scores
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
    """A model's forecasts of `indices`: tp in mm (n, lat, lon), the other variables' MSE."""

    indices: np.ndarray
    tp: np.ndarray | None
    mse: dict[str, float]


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
) -> Forecasts:
    """Run `model` over `indices` in batches.

    Args:
        model: a fine-tuned model (with tp) or, with `with_tp=False`, the base model.
        samples: the split the indices point into.
        indices: sample indices.
        batch_size: samples per forward pass.
        device: where the model lives.
        with_tp: the model predicts tp (the base model does not and must not be given it).
        state: also score the variables Aurora already predicts (latitude-weighted MSE).
    """
    was_training = model.training
    model.eval()
    lat = samples.cube["latitude"].values
    tp_out: list[np.ndarray] = []
    sums = dict.fromkeys(state_names(samples.levels), 0.0) if state else {}
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        batch, _ = samples.batch(idx)
        pred = model((batch if with_tp else _without_tp(batch)).to(device))
        if with_tp:
            tp_out.append(pred.surf_vars[TARGET_VAR][:, 0].float().cpu().numpy())
        if state:
            observed = samples.observed_state(idx)
            for k in SURF_VARS:
                fc = pred.surf_vars[k][:, 0].float().cpu().numpy()
                sums[k] += lat_weighted_rmse(fc, observed[k], lat) ** 2 * len(idx)
            for k in ATMOS_VARS:
                fc = pred.atmos_vars[k][:, 0].float().cpu().numpy()
                for j, lv in enumerate(samples.levels):
                    err = lat_weighted_rmse(fc[:, j], observed[k][:, j], lat)
                    sums[f"{k}{lv}"] += err**2 * len(idx)
    if was_training:
        model.train()
    return Forecasts(
        indices=np.asarray(indices),
        tp=np.concatenate(tp_out) if with_tp else None,
        mse={k: v / len(indices) for k, v in sums.items()},
    )


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
    data, *, base: str, checkpoint: Path, device, batch_size: int | None = None
) -> dict[str, float]:
    """The untouched base model's MSE of every variable it predicts on the evaluation split
    (`batch_size` samples a pass; default `eval_batch_size` for a batch of one)."""
    from aurora_sweep.model import build_base, load_base_checkpoint

    model = build_base(base, with_tp=False)
    load_base_checkpoint(model, checkpoint)
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
) -> tuple[dict[str, float], Forecasts]:
    """tp scores (with intervals) and forgetting ratios of `model` on `data`'s evaluation split."""
    samples: Samples = data.validation
    indices = np.arange(len(samples)) if indices is None else np.asarray(indices)
    result = forecast(
        model, samples, indices, batch_size=batch_size, device=device,
        state=data.base_mse is not None,
    )  # fmt: skip
    times = samples.target_times()[indices]
    metrics = tp_scores(
        forecast=result.tp,
        observed=samples.observed(indices),
        persistence=samples.persistence(indices),
        climatology=climatology_forecast(data.climatology, times),
        lat=samples.cube["latitude"].values,
        months=times.month.values,
        days=times.values.astype("datetime64[D]"),
        seeps=data.seeps,
        objective=data.objective,
        bootstrap=bootstrap,
    )
    if data.base_mse is not None:
        metrics |= forgetting_ratios(result.mse, data.base_mse)
    return metrics, result


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
