"""After the search: export the best trial's adapter, score an exported adapter, write its report.

The study's storage says which trial won (`ranking`); MLflow holds each trial's adapter as an
artifact, so exporting copies that artifact and adds a model card, rather than training anything
again.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna

from aurora_sweep.config.recipe import BaseKey
from aurora_sweep.config.study import StudyConfig
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.report.best import against_references, study_trials
from aurora_sweep.sweep.records import TrialRecord, completed, ranked
from aurora_sweep.sweep.tracking import client_for

if TYPE_CHECKING:
    from aurora_sweep.config.recipe import TrialConfig
    from aurora_sweep.data.trial_data import TrialData
    from aurora_sweep.model.adapter import Adapter, AdapterMeta


def export_best(
    config: StudyConfig,
    target: Path,
    *,
    number: int | None = None,
    trials: list[optuna.trial.FrozenTrial] | None = None,
) -> Path:
    """Copy the best trial's adapter (or trial `number`'s, a Pareto front member say) from
    MLflow to `target` and write its model card. `trials`: the study's, when already read."""
    return export_trial(config, target, number=number, trials=trials)[0]


def export_trial(
    config: StudyConfig,
    target: Path,
    *,
    number: int | None = None,
    trials: list[optuna.trial.FrozenTrial] | None = None,
) -> tuple[Path, optuna.trial.FrozenTrial]:
    """`export_best`, with the trial exported."""
    from aurora_sweep.model.adapter import META, write_model_card, write_references
    from aurora_sweep.report.best import recipe
    from aurora_sweep.report.finalists import finalist_lines

    every = study_trials(config) if trials is None else trials
    best, seeds_note = _trial_to_export(config, every, number)
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
    write_references(
        target, against_references(config, every), finalist_lines(config, every, recipe)
    )
    write_model_card(target, study=config.name, number=best.number, note=seeds_note)
    return target, best


def register_export(config: StudyConfig, folder: Path, trial: optuna.trial.FrozenTrial) -> str:
    """Log the exported `folder` to `trial`'s MLflow run as a model and register it under the
    study's name, a version tagged with its scores, recipe, base checkpoint and data; its
    `models:/` URI."""
    from aurora_sweep.model.adapter import read_meta
    from aurora_sweep.report.best import recipe
    from aurora_sweep.report.registry import register_adapter

    meta = read_meta(folder)
    record = TrialRecord.of(trial)
    objective = config.objective.at(config.lead_steps)
    scores = {
        k: record.scores[k]
        for k in (
            config.objective_metric,
            objective.skill("persistence"),
            objective.skill("climatology"),
        )
        if k in record.scores
    }
    tags = {
        "study": config.name,
        "trial": str(trial.number),
        "recipe": recipe(trial),
        "base": meta.base.name,
        "base_checkpoint": meta.base.checkpoint,
        "base_sha256": meta.base.sha256,
        **{f"data.{k}": str(v) for k, v in meta.data.items()},
        **{k: f"{v:.6g}" for k, v in scores.items()},
    }
    client_for(config)
    uri, _ = register_adapter(folder, run_id=record.mlflow_run_id, name=config.name, tags=tags)
    return uri


def _trial_to_export(
    config: StudyConfig, every: list[optuna.trial.FrozenTrial], number: int | None
) -> tuple[optuna.trial.FrozenTrial, str]:
    """The winning finalist's typical seed (`report.finalists`), else the best feasible trial,
    or trial `number` if it completed within the cap (feasible or not), and what the model card
    says of the seeds; refused in one line when there is none."""
    from aurora_sweep.report.finalists import ranked_finalists

    if number is None and (finalists := ranked_finalists(config, every)):
        return finalists[0].typical, _seeds_note(finalists[0])
    return _single_trial(config, every, number), ""


def _seeds_note(winner) -> str:
    """The model card's words on the winning recipe's seeds."""
    chosen = winner.typical
    seed = (TrialRecord.of(chosen).config or {}).get("seed")
    gaps = sorted(abs(v - winner.mean) for v in winner.values)
    why = (
        "its seeds lie equally far from their mean, so this is the search's own trial"
        if len(gaps) > 1 and np.isclose(gaps[0], gaps[1])
        else "the seed nearest the mean: a typical draw of the recipe rather than its luckiest"
    )
    return (
        f"This recipe won the study's finalists on its mean over {len(winner.values)} training "
        f"seeds: {winner.mean:.4f} ± {winner.spread:.4f} (standard deviation over the seeds; "
        f"each seed: {', '.join(f'{v:.4f}' for v in winner.values)}). This adapter is trial "
        f"{chosen.number}, trained with seed {seed}: {why}."
    )


def _single_trial(
    config: StudyConfig, every: list[optuna.trial.FrozenTrial], number: int | None
) -> optuna.trial.FrozenTrial:
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


@dataclass(frozen=True)
class Evaluation:
    """An exported adapter ready to score: the adapter, its model, and its study's data with
    the split asked for as the evaluation split (`prepare_evaluation`)."""

    adapter: Adapter
    model: Any
    data: TrialData

    @property
    def trial(self) -> TrialConfig:
        return self.adapter.meta.trial

    @property
    def reference(self) -> BaseKey:
        """Which base model's scores the trial is compared with (`data.base_mse`)."""
        trial = self.trial
        return self.data.reference_key(trial.base, trial.precision, trial.levels)

    def verify(self, *, bootstrap: int):
        """`scoring.verify` of the adapter on its whole evaluation split, batched as its trial
        was scored (so the scores reproduce the trial's)."""
        from aurora_sweep.verify.scoring import trial_eval_batch, verify

        device = self.adapter.device
        return verify(
            self.model,
            self.data,
            batch_size=trial_eval_batch(self.trial, device),
            device=device,
            bootstrap=bootstrap,
            reference=self.reference,
        )


def prepare_evaluation(
    adapter: str | Path,
    *,
    split: str,
    checkpoint: Path | None = None,
    tracking_uri: str | None = None,
) -> Evaluation:
    """The adapter's model (a folder, or `models:/<study>/<version>` registered at
    `tracking_uri`) and its study's data with `split` as the evaluation split.

    The same splits and baselines as the trial had (the model carries its own target statistics),
    and the base model's scores on `split` for the forgetting ratios.
    """
    from aurora_sweep.model.adapter import open_adapter
    from aurora_sweep.verify.prepare import score_base, trial_data

    if split not in ("validation", "test"):
        raise AuroraSweepError(f"--split {split!r}: use validation or test")
    opened = open_adapter(adapter, checkpoint=checkpoint, tracking_uri=tracking_uri)
    trial, device = opened.meta.trial, opened.device
    data = trial_data(opened.config, device, split=split)  # the zero-shot on the study's levels
    # by lead, the trial's base in its precision on its levels
    score_base(
        data,
        base=trial.base,
        precision=trial.precision,
        levels=trial.levels,
        checkpoint=opened.checkpoint,
        device=device,
        wrap_longitude=trial.wrap_longitude,
        arch=trial.arch,
    )
    model = opened.load_model()
    data = data.for_trial(trial.base, trial.levels)  # its levels and its base's inputs
    return Evaluation(opened, model, data)


def evaluate_adapter(
    adapter: str | Path,
    *,
    split: str,
    checkpoint: Path | None = None,
    bootstrap: int = 1000,
    lead: str | None = None,
    tracking_uri: str | None = None,
) -> dict:
    """Score an exported adapter on the whole of `split` with its study's data: every lead's
    scores (with the worst forgetting ratio of each, `forget_worst_ratio`), or with `lead`
    ('12h', '24h') that lead's alone under the 6-hour names."""
    from aurora_sweep.config.objective import forget_name, split_lead
    from aurora_sweep.config.recipe import LEADS, lead_suffix, parse_lead
    from aurora_sweep.sweep.outcomes import worst_forgetting

    steps = parse_lead(lead, "--lead") if lead is not None else None
    evaluation = prepare_evaluation(
        adapter, split=split, checkpoint=checkpoint, tracking_uri=tracking_uri
    )
    data = evaluation.data
    if steps is not None and steps not in data.leads:
        raise AuroraSweepError(f"the {split} split holds no {lead} sample to score")
    scores, _ = evaluation.verify(bootstrap=bootstrap)
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
    adapter: str | Path,
    *,
    split: str,
    out: Path,
    point: tuple[float, float] | None = None,
    checkpoint: Path | None = None,
    bootstrap: int = 1000,
    tracking_uri: str | None = None,
) -> Path:
    """Write one self-contained HTML page verifying an exported adapter on `split`."""
    from aurora_sweep.report.html import write_report

    if point is not None and not (-90 <= point[0] <= 90):
        raise AuroraSweepError(f"--point {point[0]:g},{point[1]:g}: latitude must be in -90..90")
    evaluation = prepare_evaluation(
        adapter, split=split, checkpoint=checkpoint, tracking_uri=tracking_uri
    )
    samples = evaluation.data.validation
    ij = nearest_point(samples, *point) if point is not None else None  # refused before scoring
    scores, fc = evaluation.verify(bootstrap=bootstrap)
    figures = _report_figures(evaluation.data, fc, evaluation.adapter.meta, ij)
    return write_report(Path(out), **_report_text(evaluation, split, scores, fc), figures=figures)


def _name(adapter) -> str:
    """What the report calls the adapter: its folder's name, or its `models:/` URI."""
    from aurora_sweep.model.files import is_model_uri

    return adapter.source if is_model_uri(adapter.source) else adapter.path.resolve().name


def _report_text(evaluation: Evaluation, split: str, scores: dict, fc) -> dict[str, Any]:
    """The report's words and tables: its title, what was scored, the recipe, the scores, the
    forgetting ratios by variable and the notes (`html.render_report`'s arguments)."""
    import datetime as dt

    from aurora_sweep.config.bases import target_description
    from aurora_sweep.report.tables import forgetting_rows, lead_rows, report_notes, report_rows

    data, meta, trial = evaluation.data, evaluation.adapter.meta, evaluation.trial
    samples, objective = data.validation, data.objective
    recipe = {
        **trial.to_dict(),
        "base checkpoint": f"{meta.base.checkpoint} (sha256 {meta.base.sha256[:12]}…)",
        "region": meta.data.get("region", "?"),
        "objective": objective.name,
    }
    if "verify_seconds" in meta.metrics:
        recipe["where the trial's time went"] = time_split(meta.metrics)
    return {
        "title": f"{_name(evaluation.adapter)}: {samples.variable.what} from Aurora",
        "subtitle": (
            f"{split} split, {objective} {scores[objective.name]:.4f}; base {trial.base}; "
            f"levels {', '.join(map(str, trial.levels))} hPa; made {dt.date.today()}"
        ),
        "recipe": recipe,
        "scores": report_rows(scores, objective),
        "forgetting": forgetting_rows(scores, data.base_mse[str(evaluation.reference)]["6h"]),
        "leads": lead_rows(scores, objective),
        "finalists": meta.finalists,
        "notes": report_notes(
            meta.references,
            len(samples),
            split,
            samples.target_times()[fc.indices],
            target_description(trial.base, samples.variable.name),
            samples.variable,
        ),
    }


def time_split(metrics: dict[str, float]) -> str:
    """A trial's seconds and forward passes (one sample through one model step) by what they
    were spent on, from its metrics."""
    parts = {"training": "train", "the pruner's checks": "check", "verifying": "verify"}
    total = sum(metrics[f"{key}_seconds"] for key in parts.values())
    return f"{total:.1f} s: " + "; ".join(
        f"{what} {metrics[f'{key}_seconds']:.1f} s ({metrics[f'{key}_forwards']:.0f} "
        "sample-steps forward)"
        for what, key in parts.items()
    )


def _report_figures(
    data: TrialData, fc, meta: AdapterMeta, ij: tuple[int, int] | None
) -> dict[str, bytes]:
    """The report's pictures: case maps, reliability, the loss curves the adapter carries, and
    the series at grid point `ij` (row, column) when one is asked for."""
    from aurora_sweep.data.climates import climatology_forecast
    from aurora_sweep.verify import plots as fg
    from aurora_sweep.verify.figures import case_maps_png

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
    history = meta.history
    if history.get("train_loss"):
        pngs["loss_curves.png"] = fg.png_bytes(
            fg.loss_curves(history["train_loss"], history.get("val_loss", []))
        )
    return pngs
