"""After the search: export the best trial's adapter, score an exported adapter, write its report.

The study's storage says which trial won (`ranking`); MLflow holds each trial's adapter as an
artifact, so exporting copies that artifact and adds a model card, rather than training anything
again.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import optuna

from aurora_sweep.config.recipe import BaseKey
from aurora_sweep.config.study import StudyConfig
from aurora_sweep.config.study_file import load_config
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.report.best import against_references, completed, ranked, study_trials
from aurora_sweep.sweep.records import TrialRecord
from aurora_sweep.sweep.tracking import client_for


def export_best(
    config: StudyConfig,
    target: Path,
    *,
    number: int | None = None,
    trials: list[optuna.trial.FrozenTrial] | None = None,
) -> Path:
    """Copy the best trial's adapter (or trial `number`'s, a Pareto front member say) from
    MLflow to `target` and write its model card. `trials`: the study's, when already read."""
    from aurora_sweep.model.adapter import META, write_model_card

    every = study_trials(config) if trials is None else trials
    best = _trial_to_export(config, every, number)
    run_id = TrialRecord.of(best).mlflow_run_id
    if not run_id:
        raise AuroraSweepError(f"trial {best.number} has no MLflow run recorded")
    target = Path(target)
    if target.exists() and any(target.iterdir()) and not (target / META).exists():
        raise AuroraSweepError(
            f"{target} exists and is not an adapter directory: choose an empty one"
        )
    client_for(config)  # says so at once when the tracking server does not answer
    _download_adapter(config, run_id, best.number, target)
    # how the exported trial compares with the study's reference recipes, for the report
    meta_path = target / META
    meta = json.loads(meta_path.read_text())
    meta["references"] = against_references(config, every)
    meta_path.write_text(json.dumps(meta, indent=2, default=str))
    write_model_card(target, study=config.name, number=best.number)
    return target


def _trial_to_export(
    config: StudyConfig, every: list[optuna.trial.FrozenTrial], number: int | None
) -> optuna.trial.FrozenTrial:
    """The best feasible trial, or trial `number` if it completed within the cap (feasible or
    not); refused in one line when there is none."""
    if number is not None:
        chosen = [t for t in completed(every) if t.number == number]
        if not chosen:
            raise AuroraSweepError(
                f"trial {number} of study {config.name!r} is not a completed trial within the "
                "memory cap: 'aurora-sweep best' lists those, 'best --pareto' the front"
            )
        return chosen[0]
    trials = ranked(every)
    if trials:
        return trials[0]
    if completed(every):
        raise AuroraSweepError(
            f"no completed trial of study {config.name!r} keeps the model whole: each makes a "
            f"variable Aurora already predicted worse than ×{config.max_forgetting:g} the base "
            "model's RMSE ('aurora-sweep best' marks them ✗); export one anyway with --trial N, "
            "or run more trials"
        )
    raise AuroraSweepError(f"study {config.name!r} has no completed trial to export yet")


def _download_adapter(config: StudyConfig, run_id: str, number: int, target: Path) -> None:
    """Trial `number`'s adapter from its MLflow run into `target` (replaced whole, through a
    temporary folder beside it, so a failed download leaves the old one)."""
    import mlflow

    with tempfile.TemporaryDirectory(dir=target.parent if target.parent.exists() else None) as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="adapter", dst_path=tmp
            )
        except Exception as e:
            hint = (
                f"check --tracking-uri {config.tracking_uri}"
                if config.tracking_uri
                else "run this from the directory that holds mlflow.db and mlruns/, "
                "or give the sweep's --tracking-uri"
            )
            raise AuroraSweepError(
                f"cannot read trial {number}'s adapter from MLflow ({type(e).__name__}); {hint}"
            ) from None
        if target.exists():
            shutil.rmtree(target)
        shutil.move(local, target)


def prepare_evaluation(adapter: Path, *, split: str, checkpoint: Path | None = None):
    """The adapter's model and its study's data with `split` as the evaluation split.

    The same splits and baselines as the trial had (the model carries its own target statistics),
    and the base model's scores on `split` for the forgetting ratios.
    """
    from aurora_sweep.config.recipe import TrialConfig
    from aurora_sweep.data.cube import open_cube
    from aurora_sweep.data.trial_data import TrialData
    from aurora_sweep.devices import default_device
    from aurora_sweep.model.adapter import load_finetuned, read_meta
    from aurora_sweep.model.aurora15 import add_region_statics
    from aurora_sweep.model.files import resolve_checkpoint
    from aurora_sweep.verify.scoring import base_state_mse
    from aurora_sweep.verify.zero_shot import add_zero_shot

    if split not in ("validation", "test"):
        raise AuroraSweepError(f"--split {split!r}: use validation or test")
    adapter = Path(adapter)
    meta = read_meta(adapter)
    config = load_config(adapter / "study.toml")
    trial = TrialConfig.from_dict(meta["trial"])
    device = default_device()
    data = TrialData.prepare(open_cube(config), config, eval_split=split)
    add_zero_shot(data, config, device)  # on the study's levels, as every trial met it
    add_region_statics(data, config)  # where the adapter's base reads Aurora 1.5's inputs
    data = data.for_trial(trial.base, trial.levels)  # its levels and its base's inputs
    model = load_finetuned(adapter, checkpoint=checkpoint, device=str(device))
    path = resolve_checkpoint(trial.base, checkpoint)
    data.base_mse = {  # by lead, the trial's base in its precision on its levels
        str(reference_key(data, trial)): base_state_mse(
            data,
            base=trial.base,
            checkpoint=path,
            device=device,
            precision=trial.precision,
            wrap_longitude=trial.wrap_longitude,
            arch=trial.arch,
        )  # fmt: skip
    }
    return model, data, trial, meta, device


def verify_prepared(model, data, trial, device, *, bootstrap: int):
    """`evaluation.verify` of a prepared adapter on its whole evaluation split, batched as its
    trial was scored (so the scores reproduce the trial's)."""
    from aurora_sweep.verify.scoring import eval_batch_size, verify

    batch = eval_batch_size(trial.batch_size, device)
    return verify(
        model, data, batch_size=batch, device=device, bootstrap=bootstrap,
        reference=reference_key(data, trial),
    )  # fmt: skip


def reference_key(data, trial) -> BaseKey:
    """The key of the base model's scores `trial` is compared with in `data.base_mse`."""
    return data.reference_key(trial.base, trial.precision, trial.levels)


def evaluate_adapter(
    adapter: Path,
    *,
    split: str,
    checkpoint: Path | None = None,
    bootstrap: int = 1000,
    lead: str | None = None,
) -> dict:
    """Score an exported adapter on the whole of `split` with its study's data: every lead's
    scores (with the worst forgetting ratio of each, `forget_worst_ratio`), or with `lead`
    ('12h', '24h') that lead's alone under the 6-hour names."""
    from aurora_sweep.config.objective import forget_name, split_lead
    from aurora_sweep.config.recipe import LEADS, lead_suffix, parse_lead
    from aurora_sweep.sweep.outcomes import worst_forgetting

    steps = parse_lead(lead, "--lead") if lead is not None else None
    model, data, trial, _, device = prepare_evaluation(adapter, split=split, checkpoint=checkpoint)
    if steps is not None and steps not in data.leads:
        raise AuroraSweepError(f"the {split} split holds no {lead} sample to score")
    scores, _ = verify_prepared(model, data, trial, device, bootstrap=bootstrap)
    for k in LEADS:  # the worst forgetting at each lead, as a trial records it
        worst = worst_forgetting(scores, lead_suffix(k))
        if worst is not None:
            scores[forget_name("worst", lead_suffix(k))] = worst[1]
    if steps is None:
        return {**scores, "split": split, "samples": len(data.validation)}
    named = {k: split_lead(k) for k in scores}
    picked = {name: scores[k] for k, (name, at) in named.items() if at == steps}
    return {**picked, "split": split, "lead": lead, "samples": len(data.leads[steps])}


def nearest_point(samples, lat: float, lon: float) -> tuple[int, int]:
    """Row and column of the grid point nearest (lat, lon); refuses a point off the region."""
    import numpy as np

    lats = samples.cube["latitude"].values
    lons = samples.cube["longitude"].values
    dlon = (lons - lon + 180.0) % 360.0 - 180.0  # -5 and 355 are the same meridian
    i, j = int(np.abs(lats - lat).argmin()), int(np.abs(dlon).argmin())
    step = abs(float(lats[0] - lats[1])) if lats.size > 1 else 1.0
    if abs(lats[i] - lat) > step or abs(dlon[j]) > step:
        raise AuroraSweepError(
            f"--point {lat:g},{lon:g} lies outside the region ({lats.min():g}..{lats.max():g}°N, "
            f"{lons.min():g}..{lons.max():g}°E); pick a point inside it"
        )
    return i, j


def report_adapter(
    adapter: Path,
    *,
    split: str,
    out: Path,
    point: tuple[float, float] | None = None,
    checkpoint: Path | None = None,
    bootstrap: int = 1000,
) -> Path:
    """Write one self-contained HTML page verifying an exported adapter on `split`."""
    import datetime as dt

    from aurora_sweep.config.bases import target_description
    from aurora_sweep.report.html import (
        forgetting_rows,
        lead_rows,
        report_notes,
        report_rows,
        write_report,
    )

    if point is not None and not (-90 <= point[0] <= 90):
        raise AuroraSweepError(f"--point {point[0]:g},{point[1]:g}: latitude must be in -90..90")
    model, data, trial, meta, device = prepare_evaluation(
        adapter, split=split, checkpoint=checkpoint
    )
    samples = data.validation
    ij = nearest_point(samples, *point) if point is not None else None  # refused before scoring
    scores, fc = verify_prepared(model, data, trial, device, bootstrap=bootstrap)
    times = samples.target_times()[fc.indices]
    recipe = {
        **trial.to_dict(),
        "base checkpoint": f"{meta['base']['checkpoint']} (sha256 {meta['base']['sha256'][:12]}…)",
        "region": meta.get("data", {}).get("region", "?"),
        "objective": data.objective.name,
    }
    objective = data.objective
    return write_report(
        Path(out),
        title=f"{Path(adapter).resolve().name}: {samples.variable.what} from Aurora",
        subtitle=(
            f"{split} split, {objective} {scores[objective.name]:.4f}; base {trial.base}; "
            f"levels {', '.join(map(str, trial.levels))} hPa; made {dt.date.today()}"
        ),
        recipe=recipe,
        scores=report_rows(scores, objective),
        forgetting=forgetting_rows(scores, data.base_mse[str(reference_key(data, trial))]["6h"]),
        leads=lead_rows(scores, objective),
        figures=_report_figures(data, fc, meta, ij),
        notes=report_notes(
            meta.get("references", []),
            len(samples),
            split,
            times,
            target_description(trial.base, samples.variable.name),
            samples.variable,
        ),  # fmt: skip
    )


def _report_figures(data, fc, meta: dict, ij: tuple[int, int] | None) -> dict[str, bytes]:
    """The report's pictures: case maps, reliability, the loss curves the adapter carries, and
    the series at grid point `ij` (row, column) when one is asked for."""
    from aurora_sweep.data.climates import climatology_forecast
    from aurora_sweep.verify import plots as fg
    from aurora_sweep.verify.scoring import case_maps_png

    samples = data.validation
    times = samples.target_times()[fc.indices]
    observed = samples.observed(fc.indices)
    baselines = {
        "persistence": samples.persistence(fc.indices),
        "climatology": climatology_forecast(
            data.climatology, times, samples.variable, samples.steps
        ),
    }
    pngs = {"cases.png": case_maps_png(samples, fc)}
    if samples.variable.thresholds:  # events to be reliable about (none for soil moisture)
        pngs["reliability.png"] = fg.png_bytes(
            fg.reliability({"model": fc.values, **baselines}, observed, samples.variable)
        )
    if ij is not None:
        i, j = ij
        lat, lon = samples.cube["latitude"].values[i], samples.cube["longitude"].values[j]
        series = {"observed": observed[:, i, j], "forecast": fc.values[:, i, j]}
        series |= {k: v[:, i, j] for k, v in baselines.items()}
        where = f"grid point {lat:.2f}°N, {lon:.2f}°E"
        pngs["point_series.png"] = fg.png_bytes(
            fg.point_series(times, series, title=where, target=samples.variable)
        )
    history = meta.get("history") or {}
    if history.get("train_loss"):
        pngs["loss_curves.png"] = fg.png_bytes(
            fg.loss_curves(history["train_loss"], history.get("val_loss", []))
        )
    return pngs
