"""The zero-shot baseline: Aurora 1.5's (`aurora.AuroraV1p5`) own precipitation, untrained.

Aurora 1.5 predicts hourly precipitation itself (`scaled_tp_1h`, an output-only surface variable:
metres of water over the hour before the valid time, log-transformed inside the model and
returned physical). With its variable lead time, one initial state gives the hours 1..6 after
it (`aurora.rollout(..., fine_lead_times=[1, ..., 6])`; only the 6-hour prediction advances the
state), so its 6-hour total is the sum of the six hourly fields, and a 12- or 24-hour total the
sum over the steps of the rollout. That total, with no training at all, is the precipitation a
user gets for free from Aurora 1.5: the baseline a fine-tune must beat (`zero_shot_totals`).

It is the `v1.5` base's own forward pass (`hourly.SixHourAurora15`: the hours of a step stacked
along the batch, equal to `aurora.rollout`'s hour-by-hour loop, tested) run untrained with Aurora
1.5's own precision defaults, so the baseline and a fine-tune of Aurora 1.5 are one model.
Its 36 static fields come from the file microsoft/aurora publishes (`model.aurora15.read_statics`,
cut at a store's points by `crop_statics`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aurora_sweep.config.objective import INTERIOR
from aurora_sweep.model.aurora15 import region_statics, static_names
from aurora_sweep.model.files import resolve_statics


def zero_shot_totals(
    leads: dict,
    *,
    checkpoint: Path,
    static_file: Path,
    arch: tuple = (),
    device: str = "cpu",
    batch_size: int = 2,
    wrap_longitude: bool = False,
) -> dict[int, np.ndarray]:
    """Aurora 1.5's precipitation, untrained, over each lead's samples (`leads`: model steps ->
    `dataset.Samples` of one split, of a store with its inputs): the study's target over the
    lead (tp's total in mm or pr's mean rate in mm h-1), (n, lat, lon)
    per lead, in the samples' order, from one rollout per sample (`scoring.forecast_leads`);
    `batch_size` samples a pass, each of its six hours a row. Run in Aurora 1.5's own precision
    (its backbone under autocast, as microsoft/aurora runs it) unless `arch` says otherwise, and
    on the region as the trials run: its east and west edges joined only where the study's box
    goes round the globe (`wrap_longitude`, the study's `DataConfig.wrap_longitude`)."""
    from aurora_sweep.model.build import build_base, load_base_checkpoint, set_longitude_wrap
    from aurora_sweep.verify.scoring import forecast_leads

    target = leads[1].variable.name
    model = build_base("v1.5", target=target, clamp=True, arch=(("autocast", True), *arch))
    load_base_checkpoint(model, checkpoint)
    set_longitude_wrap(model, wrap_longitude)
    model.to(device)
    statics = region_statics(static_file, leads[1], static_names(arch))
    v15 = {steps: samples.for_v15(statics) for steps, samples in leads.items()}
    done = forecast_leads(model, v15, batch_size=batch_size, device=device, state=False)
    return {steps: result.values for steps, result in done.items()}


def study_zero_shot(leads: dict, config, device) -> dict[int, np.ndarray]:
    """`zero_shot_totals` of the study's Aurora 1.5: its checkpoint, static file and
    architecture as the study gives them ([model])."""
    from aurora_sweep.model.files import resolve_checkpoint

    return zero_shot_totals(
        leads,
        checkpoint=resolve_checkpoint("v1.5", config.model.checkpoint_for("v1.5")),
        static_file=resolve_statics(config.model.v15_static),
        arch=config.model.arch_for("v1.5"),
        device=str(device),
        wrap_longitude=config.data.wrap_longitude,
    )


def references_of(data) -> dict[str, dict]:
    """The zero-shot baseline's scores and per-sample objective terms at each lead (and on the
    box's interior, "interior"), made once (JSON: the study keeps them, `records.AURORA15`, and
    later workers reuse them instead of running Aurora 1.5 again); empty when `data` has no
    zero-shot totals."""
    from aurora_sweep.verify.scoring import ZERO_SHOT, lead_scores

    out = {}
    for steps, samples in data.leads.items():
        if steps not in data.aurora15:
            continue
        refs = data.baseline_scores.setdefault(steps, {})
        if ZERO_SHOT not in refs:  # its scores, made as a trial's baselines are
            lead_scores(data, samples, data.aurora15[steps], bootstrap=0)
        out[str(steps)] = _entry(refs[ZERO_SHOT])
        if ZERO_SHOT + INTERIOR in refs:
            out[str(steps)]["interior"] = _entry(refs[ZERO_SHOT + INTERIOR])
    return out


def _entry(scored: tuple[dict, tuple]) -> dict:
    scores, (num, den) = scored
    return {"scores": scores, "num": np.asarray(num).tolist(), "den": np.asarray(den).tolist()}


def known_references(known: dict[str, dict]) -> dict[int, dict]:
    """The zero-shot baseline's scores from `references_of`, by model steps, as `lead_scores`
    keeps them among a lead's baseline scores (`TrialData.baseline_scores`)."""
    from aurora_sweep.verify.scoring import ZERO_SHOT

    def restored(entry: dict) -> tuple[dict, tuple]:
        terms = (np.asarray(entry["num"], float), np.asarray(entry["den"], float))
        return dict(entry["scores"]), terms

    out = {}
    for steps, entry in known.items():
        out[int(steps)] = {ZERO_SHOT: restored(entry)}
        if "interior" in entry:
            out[int(steps)][ZERO_SHOT + INTERIOR] = restored(entry["interior"])
    return out
