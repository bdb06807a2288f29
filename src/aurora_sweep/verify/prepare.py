"""The study's data as its trials are scored on it, made whole in one place.

`trial_data` is the one preparation of a study's data for a split, in one order: the splits and
the target's baselines (`TrialData.prepare`), Aurora 1.5's static fields where a base the study
adapts reads them, then the zero-shot Aurora 1.5 baseline where the study scores against it (run
here, or its scores as a first worker made them), and the base model's scores the study already
has. A worker (`sweep.worker`) and an exported adapter's evaluation (`report.evaluate`) both
start from it. `score_base` adds the untouched base model's scores a trial is compared with,
once per base, precision and levels.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from aurora_sweep.config.bases import reads_v15_inputs
from aurora_sweep.config.recipe import LEADS
from aurora_sweep.config.study import StudyConfig
from aurora_sweep.data.cube import open_cube
from aurora_sweep.data.trial_data import TrialData
from aurora_sweep.model.aurora15 import study_statics
from aurora_sweep.verify.early_stop import DAILY, daily_sums, encode_daily
from aurora_sweep.verify.scoring import block_days, eval_batch_size, forecast_leads
from aurora_sweep.verify.zero_shot import known_references, study_zero_shot


def trial_data(
    config: StudyConfig,
    device,
    *,
    split: str = "validation",
    zero_shot: dict[str, dict] | None = None,
    base_mse: dict[str, dict[str, dict[str, float]]] | None = None,
) -> TrialData:
    """What every trial of the study shares, with `split` as the evaluation split: the splits,
    the target's statistics and baselines, Aurora 1.5's static fields (for the trials of a base
    that reads them), the zero-shot baseline's totals on the study's levels (or, given the scores
    a first worker made of them, `zero_shot`, those scores and no run at all) and the base
    model's scores known so far (`base_mse`)."""
    data = TrialData.prepare(open_cube(config), config, eval_split=split)
    statics = (
        study_statics(data.train, config) if any(map(reads_v15_inputs, config.bases)) else None
    )
    totals, scores = {}, {}
    if "aurora-1.5" in config.baselines:
        if zero_shot:
            scores = known_references(zero_shot)
        else:
            totals = study_zero_shot(data.leads, config, device)
    return dataclasses.replace(
        data,
        v15_statics=statics,
        aurora15=totals,
        baseline_scores=scores,
        base_mse=dict(base_mse or {}),
    )


def score_base(
    data: TrialData,
    *,
    base: str,
    precision: str,
    levels: tuple[int, ...],
    checkpoint: Path,
    device,
    wrap_longitude: bool,
    arch: tuple = (),
) -> str:
    """The key in `data.base_mse` of the untouched base model's scores a trial of `base` in
    `precision` on `levels` is compared with (`TrialData.reference_key`), made on the trial's
    data (`TrialData.for_trial`) when not there yet."""
    key = str(data.reference_key(base, precision, levels))
    if key not in data.base_mse:
        data.base_mse[key] = base_state_mse(
            data.for_trial(base, levels),
            base=base,
            checkpoint=checkpoint,
            device=device,
            precision=precision,
            wrap_longitude=wrap_longitude,
            arch=arch,
        )
    return key


def base_state_mse(
    data,
    *,
    base: str,
    checkpoint: Path,
    device,
    batch_size: int | None = None,
    precision: str = "fp32",
    wrap_longitude: bool = False,
    arch: tuple = (),
) -> dict[str, dict]:
    """The untouched base model's MSE of every variable it predicts on the evaluation split at
    each lead scored, by lead ('6h', '12h', '24h'; `batch_size` samples a pass, default
    `eval_batch_size` for a batch of one), and its errors by day at the study's lead
    (`early_stop.DAILY`: what a trial's scoring is stopped on when it forgets), run in the
    `precision` and with the longitude wrap of the trials it is compared with: a forgetting
    ratio then measures the fine-tune, not a change of precision or of windows."""
    from aurora_sweep.model.build import (
        build_base,
        load_base_checkpoint,
        set_longitude_wrap,
        set_precision,
    )

    model = build_base(base, with_target=False, arch=arch)
    load_base_checkpoint(model, checkpoint)
    set_precision(model, precision)
    set_longitude_wrap(model, wrap_longitude)
    model.to(device)
    batch_size = batch_size or eval_batch_size(1, torch.device(device))
    results = forecast_leads(
        model, data.leads, batch_size=batch_size, device=device, with_target=False
    )
    scores: dict = {LEADS[steps]: result.mse for steps, result in results.items()}
    at = results[data.objective_steps]  # its errors by day there, for the forgetting test
    days, sums = daily_sums(at.each, block_days(data.leads, data.objective_steps))
    scores[DAILY] = encode_daily(days, list(at.mse), sums)  # `each`'s columns are `mse`'s
    return scores
