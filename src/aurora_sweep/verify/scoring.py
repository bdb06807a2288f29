"""Forecast a split and verify it: the target against the baselines, and what the fine-tune broke.

A fine-tune for a target (tp, runoff, ...) is only useful if its forecast beats persistence and
climatology in the scores its users read, and if it did not ruin what Aurora already predicted.
One forward pass over the evaluation samples gives both: the target's forecast (over the lead, as
its kind combines steps), scored by `metrics.scores`, and the
latitude-weighted RMSE of every other variable (2t, 10u, 10v, msl, and z, u, v, t, q at the
study's levels). The untouched base model's RMSE on the same samples is computed once per study;
their ratio is the forgetting ratio (> 1: worse than before the fine-tune).

Everything here is on the grid the model forecasts (see `dataset.patch_crop`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from aurora_sweep.config.objective import at_lead, forget_name
from aurora_sweep.config.recipe import LEADS, BaseKey
from aurora_sweep.data.climates import climatology_forecast
from aurora_sweep.data.samples import Samples
from aurora_sweep.data.store import ATMOS_VARS, SURF_VARS
from aurora_sweep.model.build import clamped, merged_adapter
from aurora_sweep.model.loss import LossSpec, loss_terms
from aurora_sweep.verify.bootstrap import objective_from
from aurora_sweep.verify.early_stop import (
    DAILY,
    Block,
    ScoringStopped,
    block_count,
    daily_sums,
    decode_daily,
    paired_days,
    scoring_blocks,
)
from aurora_sweep.verify.metrics import lat_weighted_mse, scores
from aurora_sweep.verify.objective import subset_terms
from aurora_sweep.verify.rollout import rollout, run_steps

#: The key of the zero-shot Aurora 1.5 baseline among a lead's baseline scores.
ZERO_SHOT = "_aurora15"


#: the largest scoring batch: a CPU runs 32 samples a pass 2.4x faster than 8 for the demo
#: model; beyond it a GPU gains little and a rollout's leads hold more
MAX_EVAL_BATCH = 32


def eval_batch_size(train_batch: int, device: torch.device) -> int:
    """Samples per forecast pass when scoring, where no memory cap chose them
    (`memory.scoring_peak.plan_scoring` does under a cap: `TrialConfig.eval_batch`).

    A forward pass without gradients keeps a layer or two alive, not every activation, so on a GPU
    four times the training batch stays well inside the trial's own training peak. A CPU runs
    large batches much faster.
    """
    return MAX_EVAL_BATCH if device.type == "cpu" else min(MAX_EVAL_BATCH, 4 * train_batch)


def trial_eval_batch(trial, device: torch.device) -> int:
    """`trial`'s scoring batch: the one its memory cap chose (`TrialConfig.eval_batch`), else
    the device's (`eval_batch_size`); the trial and its exported adapter score alike."""
    return trial.eval_batch or eval_batch_size(trial.batch_size, device)


def state_names(levels: tuple[int, ...], surface: tuple[str, ...] = SURF_VARS) -> list[str]:
    """Names of the variables Aurora already predicts: '2t', ..., 'z500', 't850', ... (with
    Aurora 1.5's other surface inputs where the samples carry them, `Samples.surface`)."""
    return [*surface, *(f"{v}{lv}" for v in ATMOS_VARS for lv in levels)]


@dataclass
class Forecasts:
    """A model's forecasts of `indices`: the target over the lead in its units (n, lat, lon), the
    other variables' MSE, and (when asked) each variable's term of the training loss, averaged
    over the samples."""

    indices: np.ndarray
    values: np.ndarray | None
    mse: dict[str, float]
    loss_terms: dict[str, float] = dataclasses.field(default_factory=dict)
    #: the objective's per-sample (numerator, denominator) at the study's lead and each sample's
    #: valid day, set by `verify` (paired comparisons)
    objective_terms: tuple[np.ndarray, np.ndarray] | None = None
    objective_days: np.ndarray | None = None
    #: every sample's MSE of each variable of `mse` (samples, variables), in its order
    each: np.ndarray | None = None


def _without_target(batch, name: str):
    return dataclasses.replace(
        batch, surf_vars={k: v for k, v in batch.surf_vars.items() if k != name}
    )


@contextmanager
def _scoring(model, with_target: bool):
    """`model` in eval mode for the block, its target clamped at 0 as in a forecast; then back in
    training mode if it was."""
    was_training = model.training
    model.eval()
    with clamped(model) if with_target else nullcontext():
        yield
    if was_training:
        model.train()


def _passes(samples: Samples, indices: np.ndarray, batch_size: int, device, with_target: bool):
    """(positions, inputs on `device`) of each forward pass over `indices`, `batch_size` samples
    a pass; without the target for a model that does not predict it (the base)."""
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        batch = samples.inputs(idx)
        if not with_target:
            batch = _without_target(batch, samples.variable.name)
        yield idx, batch.to(device)


def _truth_names(samples: Samples, with_target: bool) -> tuple[str, ...]:
    """The variables read from the store to score a step against."""
    target = (samples.variable.name,) if with_target else ()
    return (*samples.surface, *target, *ATMOS_VARS)


@torch.no_grad()
def forecast(
    model,
    samples: Samples,
    indices: np.ndarray,
    *,
    batch_size: int,
    device,
    with_target: bool = True,
    state: bool = True,
    loss: LossSpec | None = None,
) -> Forecasts:
    """Run `model` over `indices` in batches, the target clamped at 0 as in a forecast.

    Args:
        model: a fine-tuned model (with the target) or, with `with_target=False`, the base.
        samples: the split the indices point into.
        indices: sample indices.
        batch_size: samples per forward pass.
        device: where the model lives.
        with_target: the model predicts the target (the base does not and must not be given it).
        state: also score the variables Aurora already predicts (latitude-weighted MSE).
        loss: also average each variable's term of this training loss (the validation loss).
    """
    if loss is not None and samples.steps != 1:
        raise ValueError("the validation loss is that of one model step")
    lat = samples.cube["latitude"].values
    out: list[np.ndarray] = []
    names = state_names(samples.levels, samples.surface) if state else []
    sums = np.zeros(len(names))
    term_sums: dict[str, float] = {}
    truth = _truth_names(samples, with_target)
    with _scoring(model, with_target):
        for idx, batch in _passes(samples, indices, batch_size, device, with_target):
            pred, values = run_steps(model, batch, samples.steps, samples.variable)
            if with_target:
                out.append(values.float().cpu().numpy())
            rows = _score_step(
                samples,
                idx,
                samples.steps,
                pred,
                truth,
                lat,
                state=state,
                loss=loss if with_target else None,
                terms=term_sums,
            )
            if rows is not None:
                sums += rows.sum(axis=0)
    return Forecasts(
        indices=np.asarray(indices),
        values=np.concatenate(out) if with_target else None,
        mse={k: float(v) / len(indices) for k, v in zip(names, sums)},
        loss_terms={k: v / len(indices) for k, v in term_sums.items()},
    )


def forecast_leads(
    model,
    leads: dict[int, Samples],
    *,
    batch_size: int,
    device,
    with_target: bool = True,
    state: bool = True,
    loss: LossSpec | None = None,
) -> dict[int, Forecasts]:
    """`forecast` of every sample of each lead's split (`leads`: model steps -> the samples at
    that lead, all views of one split), from one rollout per sample (`LeadRollouts`)."""
    rollouts = LeadRollouts(model, leads, batch_size, device, with_target, state, loss)
    rollouts.run(np.arange(len(leads[1])))
    return rollouts.results()


@dataclass
class LeadRollouts:
    """The forecasts of each lead's samples (`leads`: model steps -> the samples at that lead,
    all views of one split), made block by block (`run`), from one rollout per sample.

    A sample scored at 24 h is also a 6 h and a 12 h sample: it is rolled out once, as far as
    its longest lead, and its forecast is read off at every step a lead ends on; the 12- and
    24-hour scores then cost one rollout, not a rollout per lead. The 6-hour forecasts are those
    of one model step, as `forecast` makes them (with `loss`, its terms too).
    """

    model: Any
    leads: dict[int, Samples]
    batch_size: int
    device: Any
    with_target: bool = True
    state: bool = True
    loss: LossSpec | None = None

    def __post_init__(self) -> None:
        one = self.leads[1]
        self.longest, self.slot = _lead_slots(self.leads)
        grid = one.grid
        self.values = (
            {k: np.zeros((len(s), *grid), np.float32) for k, s in self.leads.items()}
            if self.with_target
            else {}
        )
        self.names = state_names(one.levels, one.surface) if self.state else []
        shape = (len(self.names),)
        self.each = {k: np.full((len(s), *shape), np.nan) for k, s in self.leads.items()}
        self.term_sums: dict[str, float] = {}

    @torch.no_grad()
    def run(self, positions: np.ndarray) -> None:
        """Roll out the 6-hour samples at `positions` (each as far as its longest lead) and
        keep their forecasts and scores' sums."""
        one, leads = self.leads[1], self.leads
        lat, truth = one.cube["latitude"].values, _truth_names(one, self.with_target)
        with _scoring(self.model, self.with_target):
            for m in sorted(set(self.longest[positions])):
                group = positions[self.longest[positions] == m]
                passes = _passes(one, group, self.batch_size, self.device, self.with_target)
                for idx, batch in passes:
                    for step, pred, total in rollout(self.model, batch, m, one.variable):
                        if step not in leads:
                            continue
                        if self.with_target:
                            self.values[step][self.slot[step][idx]] = total.float().cpu().numpy()
                        rows = _score_step(
                            one,
                            idx,
                            step,
                            pred,
                            truth,
                            lat,
                            state=self.state,
                            loss=self.loss if self.with_target and step == 1 else None,
                            terms=self.term_sums,
                        )
                        if rows is not None:
                            self.each[step][self.slot[step][idx]] = rows

    def results(self) -> dict[int, Forecasts]:
        """Each lead's forecasts, once every sample has been run."""
        return {
            k: Forecasts(
                indices=np.arange(len(s)),
                values=self.values[k] if self.with_target else None,
                mse=dict(zip(self.names, map(float, self.each[k].mean(axis=0)))),
                loss_terms={v: x / len(s) for v, x in self.term_sums.items()} if k == 1 else {},
                each=self.each[k] if self.state else None,
            )
            for k, s in self.leads.items()
        }


def model_steps_scored(leads: dict[int, Samples]) -> int:
    """Forward passes (one sample, one model step) that scoring every lead of `leads` takes:
    each sample rolled out once, as far as its longest lead (`forecast_leads`)."""
    return int(_lead_slots(leads)[0].sum())


def _lead_slots(leads: dict[int, Samples]) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Per 6-hour sample of `leads[1]`: its longest lead scored (model steps), and where it sits
    in each lead's sample list (-1: not scored at that lead)."""
    one = leads[1]
    longest = np.ones(len(one), dtype=int)
    slot = {k: np.full(len(one), -1) for k in leads}
    for k, s in leads.items():
        pos = np.searchsorted(one.index, s.index)
        if not np.array_equal(one.index[np.minimum(pos, len(one) - 1)], s.index):
            raise ValueError(f"the {k}-step samples are not 6-hour samples of the same split")
        longest[pos] = np.maximum(longest[pos], k)
        slot[k][pos] = np.arange(len(pos))
    return longest, slot


def block_days(leads: dict[int, Samples], steps: int) -> np.ndarray:
    """Each sample of `leads[steps]`'s day as the scoring blocks cut the split: its 6-hour
    sample's valid day (`early_stop.scoring_blocks`), so that a block holds whole such days."""
    _, slot = _lead_slots(leads)
    at = np.flatnonzero(slot[steps] >= 0)
    days = leads[1].target_days()
    out = np.empty(len(leads[steps]), dtype=days.dtype)
    out[slot[steps][at]] = days[at]
    return out


def _score_step(
    samples: Samples,
    idx: np.ndarray,
    step: int,
    pred,
    names: tuple[str, ...],
    lat: np.ndarray,
    *,
    state: bool,
    loss: LossSpec | None,
    terms: dict[str, float],
) -> np.ndarray | None:
    """Score the prediction `step` model steps after samples `idx` against the truth read
    from the store at that step: each variable's loss term added to `terms` (with `loss`), and
    with `state`, every state variable's MSE for each sample (`_state_mse`), returned."""
    if not state and loss is None:
        return None
    observed = samples.read(samples.index[idx] + step, names)
    if loss is not None:
        truth = samples.as_truth(observed)  # the target's own array is not changed
        for k, v in loss_terms(loss, pred, truth).items():
            terms[k] = terms.get(k, 0.0) + float(v) * len(idx)
    return _state_mse(pred, observed, samples, lat) if state else None


def _state_mse(pred, observed, samples: Samples, lat) -> np.ndarray:
    """Each sample's latitude-weighted MSE of every state variable, (samples, variables) in
    `state_names`'s order."""
    columns = []
    for k in samples.surface:
        fc = pred.surf_vars[k][:, 0].float().cpu().numpy()
        columns.append(lat_weighted_mse(fc, observed[k], lat, each=True)[:, None])
    for k in ATMOS_VARS:
        fc = pred.atmos_vars[k][:, 0].float().cpu().numpy()
        columns.append(lat_weighted_mse(fc, observed[k], lat, each=True))  # (n, level)
    return np.concatenate(columns, axis=1)


def forgetting_ratios(finetuned: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """RMSE of the fine-tuned model over that of the base model, per variable (> 1: worse)."""
    return {
        forget_name(k): float(np.sqrt(finetuned[k] / base[k])) if base[k] > 0 else float("nan")
        for k in finetuned
        if k in base
    }


def verify(
    model,
    data,
    *,
    batch_size: int,
    device,
    bootstrap: int = 1000,
    reference: BaseKey | None = None,
    loss: LossSpec | None = None,
    stop: Callable[[np.ndarray, np.ndarray, np.ndarray], bool] | None = None,
) -> tuple[dict[str, float], Forecasts]:
    """The target's scores (with intervals) and forgetting ratios of `model` on `data`'s evaluation split
    at every lead scored (6-hour names plain, the others with `_12h`, `_24h`), against the base
    model's scores `data.base_mse[str(reference)]` (`recipe.BaseKey`: the trial's base in its
    precision; None or absent: no forgetting ratios); with `loss`, the 6-hour validation loss's
    terms too.

    With `stop`, the split is scored in blocks of days (`early_stop`), and after each block but
    the last `stop` is given what was scored so far (`early_stop.Block`: the objective's
    per-sample terms, and the errors by day of the variables Aurora already predicts beside the
    base model's, where the study has them): True ends the scoring there
    (`early_stop.ScoringStopped`).

    Returns the scores and the 6-hour forecasts, which carry the objective's per-sample terms at
    the study's lead (for paired comparisons between trials).
    """
    base = (data.base_mse or {}).get(str(reference)) or {} if reference else {}
    metrics: dict[str, float] = {}
    six_hours: Forecasts | None = None
    daily = decode_daily(base[DAILY]) if DAILY in base else None
    with merged_adapter(model):
        rollouts = LeadRollouts(model, data.leads, batch_size, device, True, bool(base), loss)
        _run_blocks(rollouts, data, stop, daily)
        results = rollouts.results()
    for steps, samples in data.leads.items():
        base_at = base.get(LEADS[steps])
        result = results[steps]
        terms: dict[str, np.ndarray] = {}
        scores = lead_scores(data, samples, result.values, bootstrap=bootstrap, terms_out=terms)
        if base_at is not None:
            scores |= forgetting_ratios(result.mse, base_at)
        metrics |= {at_lead(k, steps): v for k, v in scores.items()}
        if steps == data.objective_steps:
            objective = ((terms["num"], terms["den"]), samples.target_days())
        if steps == 1:
            six_hours = result
    assert six_hours is not None
    six_hours.objective_terms, six_hours.objective_days = objective
    return metrics, six_hours


def _run_blocks(rollouts: LeadRollouts, data, stop, daily=None) -> None:
    """Roll out every sample of `data`'s split; with `stop`, block by block, asking it after
    each block but the last whether to go on (with the trial's errors by day beside the base
    model's `daily`, `early_stop.decode_daily`, where given)."""
    one = data.leads[1]
    if stop is None:
        rollouts.run(np.arange(len(one)))
        return
    blocks = scoring_blocks(one.target_days(), block_count(len(one), rollouts.batch_size))
    slot, lead = rollouts.slot[data.objective_steps], data.objective_steps
    positions, num, den = np.zeros(0, int), np.zeros(0), np.zeros(0)
    by_day = block_days(data.leads, lead) if daily is not None and rollouts.state else None
    for block in blocks[:-1]:
        rollouts.run(block)
        scored = slot[block][slot[block] >= 0]
        terms = subset_terms(rollouts.values[lead][scored], data, scored)
        positions = np.concatenate([positions, scored])
        num, den = np.concatenate([num, terms[0]]), np.concatenate([den, terms[1]])
        state = None
        if by_day is not None:
            mine = daily_sums(rollouts.each[lead][positions], by_day[positions])
            state = paired_days(mine, rollouts.names, daily)
        if stop(Block(positions, num, den, state)):
            days = data.scored.target_days()
            raise ScoringStopped(
                objective_from(data.objective, np.nansum(num), np.nansum(den)),
                len(np.unique(days[positions])),
                len(np.unique(days)),
            )
    rollouts.run(blocks[-1])


def lead_scores(
    data, samples: Samples, values: np.ndarray, *, bootstrap: int, terms_out: dict | None = None
) -> dict[str, float]:
    """Every score of a forecast `values` of all of `samples` (over their lead), against
    persistence and climatology over the same lead (and Aurora 1.5's own, `data.aurora15`,
    where the study has it), with that lead's SEEPS climate."""
    times = samples.target_times()
    idx = np.arange(len(samples))
    references = data.baseline_scores.setdefault(samples.steps, {})
    zero_shot = (getattr(data, "aurora15", None) or {}).get(samples.steps)
    # Aurora 1.5's totals, or its scores made once per study (`zero_shot.references_of`)
    others = {"aurora15": zero_shot} if zero_shot is not None or ZERO_SHOT in references else None
    return scores(
        forecast=values,
        observed=samples.observed(idx),
        persistence=samples.persistence(idx),
        climatology=climatology_forecast(data.climatology, times, samples.variable, samples.steps),
        lat=samples.cube["latitude"].values,
        months=times.month.values,
        hours=times.hour.values,
        days=times.values.astype("datetime64[D]"),
        seeps=data.lead_seeps[samples.steps],
        objective=data.objective,
        target=samples.variable,
        land=samples.scored_points,
        bootstrap=bootstrap,
        terms_out=terms_out,
        references=references,
        others=others,
        interior=getattr(data, "interior", None),
    )
