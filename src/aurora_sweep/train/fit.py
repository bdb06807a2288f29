"""One trial: build the model from a `TrialConfig`, fine-tune it, score it.

The loop is written out: sample a batch, forward, Aurora's loss over every variable (`loss`),
backward, gradients clipped, AdamW step, learning rate warmed up then decayed along a cosine.
Every `eval_every` steps the model forecasts a fixed subset of the validation split
(`val_samples` samples): the validation loss (the same loss, and each variable's term) is
logged, and the study's objective on that subset, in its own units, is reported to the pruner,
so a pruned trial's stored value means what a completed trial's does. At the end the model
forecasts the whole validation split and is scored against persistence and climatology
(`scoring.verify`); the last validation loss is the one of that whole split.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aurora_sweep.config.recipe import TrialConfig
from aurora_sweep.data.samples import (
    TargetStats,
)
from aurora_sweep.data.trial_data import TrialData
from aurora_sweep.devices import default_device
from aurora_sweep.model.build import (
    TrainableParts,
    apply_method,
    build_base,
    init_new_variable,
    load_base_checkpoint,
    set_longitude_wrap,
    set_precision,
)
from aurora_sweep.model.loss import LossSpec, combine, loss_terms
from aurora_sweep.train.optimiser import trial_optimiser
from aurora_sweep.train.runtime import PeakMemory, Prefetcher
from aurora_sweep.train.tiles import crop_sample, tile_draws, tile_side
from aurora_sweep.verify.early_stop import ScoringStopped
from aurora_sweep.verify.objective import subset_objective
from aurora_sweep.verify.scoring import forecast, model_steps_scored, trial_eval_batch, verify

#: Gradients are clipped to this global norm (over every trained tensor).
MAX_GRAD_NORM = 1.0


def pushforward(model, batch, steps: int):
    """The input of the last step of a `steps`-step rollout from `batch`: the first `steps` - 1
    steps run without gradients, each forecast fed back as the next input (Aurora's rollout).

    This is the scheme Aurora's maintainers describe for their rollout fine-tuning (a replay of
    the model's own forecasts, gradients through the last step only): the model learns to
    forecast from the states it will itself produce at longer leads, at the memory of one
    training step. Gradients through every step would multiply the activations kept by the
    number of steps, which is what the small GPUs we serve cannot afford.
    """
    if steps == 1:
        return batch
    from aurora import rollout
    from aurora.rollout import _advance_batch  # how `rollout` feeds a forecast back

    from aurora_sweep.model.build import unwrap

    aurora = unwrap(model)
    with torch.no_grad():
        for pred in rollout(aurora, batch, steps=steps - 1):
            batch = _advance_batch(batch, aurora.apply_rollout_input_clipping(pred))
    # Aurora clamps the target's output from its second rollout step on: the loss must see the raw one
    return dataclasses.replace(batch, metadata=dataclasses.replace(batch.metadata, rollout_step=0))


def loss_spec(trial: TrialConfig, data: TrialData) -> LossSpec:
    """The trial's loss settings on the grid it trains on."""
    return LossSpec(
        levels=trial.levels,
        lat=data.train.cube["latitude"].values,
        target_scale=data.stats.scale,
        target_weight=trial.target_weight,
        target_loss=trial.loss,
        surface=data.train.surface,
        target=data.train.variable,
    )


@dataclass
class TrialResult:
    """What one fine-tune produced."""

    train_loss: list[tuple[int, float]]
    val_loss: list[tuple[int, float]]
    #: each variable's term of the validation loss, by step (`val_loss_<var>` in MLflow)
    val_terms: dict[str, list[tuple[int, float]]]
    intermediate: list[tuple[int, float]]  # the objective on the pruner's subset, by step
    metrics: dict[str, float]
    peak_memory_mb: float
    peak_reserved_mb: float | None
    seconds: float
    #: the share of the training loop's wall time spent waiting for a batch
    loader_wait_fraction: float
    model: Any = field(repr=False)
    parts: TrainableParts = field(repr=False)
    forecasts: Any = field(default=None, repr=False)  # evaluation.Forecasts of the eval split


def build_trial_model(trial: TrialConfig, stats: TargetStats, checkpoint: Path):
    """Base model with the target (`stats.target`), pretrained weights, LoRA, freezing and
    precision, as `trial` says."""
    torch.manual_seed(trial.seed)
    model = build_base(
        trial.base, target=stats.target, stats=(stats.location, stats.scale), arch=trial.arch
    )
    load_base_checkpoint(model, checkpoint)
    init_new_variable(model, start=(stats.mean - stats.location) / stats.scale)
    peft_model, parts = apply_method(
        model,
        method=trial.method,
        rank=trial.lora_rank,
        targets=trial.lora_targets,
        unfrozen_blocks=trial.unfrozen_blocks,
        train_input=trial.target_input_lr > 0,
    )
    set_precision(model, trial.precision)
    set_longitude_wrap(model, trial.wrap_longitude)
    return peft_model, model, parts


def eval_indices(n: int, limit: int) -> np.ndarray:
    """Evenly spaced sample indices: the same subset every time for the same n and limit."""
    if limit <= 0 or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def fit(
    trial: TrialConfig,
    data: TrialData,
    *,
    checkpoint: Path,
    report: Callable[[int, float], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    device: torch.device | None = None,
    bootstrap: int = 1000,
    stop: Callable[[np.ndarray, np.ndarray, np.ndarray], bool] | None = None,
) -> TrialResult:
    """Fine-tune one trial. `report(step, objective)` may raise `optuna.TrialPruned`; `stop`
    may end its scoring early (`verify`'s, raising `early_stop.ScoringStopped` with where the
    trial's time went)."""
    device = device or default_device()
    started = time.perf_counter()
    data = data.for_trial(trial.base, trial.levels)  # its pressure levels, its base's inputs
    spec = loss_spec(trial, data)
    with PeakMemory(device) as memory:
        peft_model, model, parts = build_trial_model(trial, data.stats, checkpoint)
        if trial.checkpointed:
            model.configure_activation_checkpointing(trial.checkpointed)
        peft_model.to(device)
        trained = trial_optimiser(trial, peft_model, model, parts)
        step, curves = _Step(trial, spec, peft_model, *trained, device), _Curves(spec)
        checks = _PrunerChecks(trial, data, spec, trial_eval_batch(trial, device), device)
        loop_started = time.perf_counter()
        wait_share = _train_loop(trial, data, peft_model, step, curves, checks, on_step, report)
        metrics, forecasts = _verify_trial(
            peft_model,
            trial,
            data,
            spec,
            checks,
            since=loop_started,
            trained=step.forwards,
            device=device,
            bootstrap=bootstrap,
            stop=stop,
        )
        curves.validation(trial.steps, forecasts)
    return TrialResult(
        train_loss=curves.train_loss,
        val_loss=curves.val_loss,
        val_terms=curves.val_terms,
        intermediate=curves.intermediate,
        metrics=metrics,
        peak_memory_mb=memory.megabytes,
        peak_reserved_mb=memory.reserved / 2**20 if memory.reserved is not None else None,
        seconds=time.perf_counter() - started,
        loader_wait_fraction=wait_share,
        model=peft_model,
        parts=parts,
        forecasts=forecasts,
    )


def _verify_trial(
    model, trial, data, spec, checks, *, since, trained, device, bootstrap, stop
) -> tuple[dict[str, float], Any]:
    """`verify` the trained `model` (`stop`: in blocks, `verify`'s), its metrics with where the
    trial's time went since its training loop began (`since`): seconds and forward passes
    training (`trained`), in the pruner's `checks` and verifying; a stopped scoring's
    `ScoringStopped` carries the seconds."""
    started = time.perf_counter()

    def spent() -> dict[str, float]:
        seconds = {"train_seconds": started - since - checks.seconds}
        return seconds | {
            "check_seconds": checks.seconds,
            "verify_seconds": time.perf_counter() - started,
        }

    try:
        metrics, forecasts = verify(
            model,
            data,
            batch_size=checks.batch_size,
            device=device,
            bootstrap=bootstrap,
            reference=data.reference_key(trial.base, trial.precision, trial.levels),
            loss=spec,
            stop=stop,
        )
    except ScoringStopped as stopped:
        stopped.metrics = spent()
        raise
    forwards = {"train_forwards": trained, "check_forwards": checks.forwards}
    forwards |= {"verify_forwards": model_steps_scored(data.leads)}
    return metrics | spent() | forwards, forecasts


def _train_loop(
    trial: TrialConfig,
    data: TrialData,
    model,
    step: _Step,
    curves: _Curves,
    checks: _PrunerChecks,
    on_step: Callable[[int, float], None] | None,
    report: Callable[[int, float], None] | None,
) -> float:
    """The trial's optimiser steps, the pruner's checks between them; the share of the loop's
    wall time spent waiting for a batch."""
    rng = np.random.default_rng(trial.seed)
    train = data.train_for(trial.rollout_steps)
    model.train()
    # the batches in the order the seed gives, read ahead by a thread while the model trains:
    # an optimiser step's samples drawn together, in `accumulate` micro-batches
    n = trial.accumulate
    plan = [
        micro
        for _ in range(trial.steps)
        for micro in np.array_split(
            rng.choice(len(train), size=min(trial.batch_size * n, len(train)), replace=False), n
        )
        if len(micro)
    ]
    read = train.training_batch
    if trial.tile:  # each micro-batch on a tile of its own, drawn from a stream of its own
        side = tile_side(trial.tile, train.grid)
        plan = list(
            zip(
                plan,
                tile_draws(np.random.default_rng([trial.seed, 1]), train.grid, side, len(plan)),
            )
        )

        def read(item):
            micro, (origin, shape) = item
            return crop_sample(*train.training_batch(micro), origin, shape)

    with Prefetcher(read, plan) as batches:
        waited, loop_started, taken = 0.0, time.perf_counter(), 0
        for k in range(1, trial.steps + 1):
            asked = time.perf_counter()
            micro = [batches.next() for _ in range(min(n, len(plan) - taken))]
            taken += len(micro)
            waited += time.perf_counter() - asked
            value = step(k, micro)
            curves.train_loss.append((k, value))
            if on_step:
                on_step(k, value)
            # the last step is scored on the whole split after: the pruner cannot act on it
            if k % trial.eval_every == 0 and k < trial.steps:
                objective = checks.run(model, k, curves)
                if report:
                    report(k, objective)
    loop_seconds = time.perf_counter() - loop_started
    return waited / loop_seconds if loop_seconds > 0 else 0.0


@dataclass
class _Step:
    """One optimiser step over its micro-batches: for each, forward (after the rollout's
    gradient-free steps), Aurora's loss over the number of micro-batches, backward (scaled
    under fp16), gradients adding up; then clipped, the optimiser, the schedule."""

    trial: TrialConfig
    spec: LossSpec
    model: Any
    optimiser: torch.optim.Optimizer
    schedule: Any
    trained: list
    device: torch.device

    #: forward passes of one sample through one model step so far (a rollout's steps each)
    forwards: int = 0

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler("cuda") if self.trial.precision == "fp16" else None
        self.region_cos = float(np.cos(np.deg2rad(np.asarray(self.spec.lat, float))).mean())

    def __call__(self, step: int, micro: list) -> float:
        self.optimiser.zero_grad(set_to_none=True)
        value = 0.0
        name = self.spec.target.name
        samples = sum(len(target[name]) for _, target in micro)
        for batch, target in micro:
            # the raw output: the target is not clamped at 0 while training (model.clamped)
            batch = pushforward(self.model, batch.to(self.device), self.trial.rollout_steps)
            spec = self.spec
            if self.trial.tile:  # the tile's rows, weighed as the scores weigh them
                lat = batch.metadata.lat.cpu().numpy()
                spec = dataclasses.replace(spec, lat=lat, region_cos=self.region_cos)
            loss = combine(spec, loss_terms(spec, self.model(batch), target))
            # weighted by its share of the step's samples: the mean one batch of them would have
            loss = loss * (len(target[name]) / samples)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            value += float(loss.detach())
            self.forwards += len(target[name]) * self.trial.rollout_steps
        if self.scaler is not None:
            self.scaler.unscale_(self.optimiser)
            torch.nn.utils.clip_grad_norm_(self.trained, MAX_GRAD_NORM)
            self.scaler.step(self.optimiser)
            self.scaler.update()
        else:
            torch.nn.utils.clip_grad_norm_(self.trained, MAX_GRAD_NORM)
            self.optimiser.step()
        self.schedule.step()
        if not np.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {step}")
        return value


@dataclass
class _Curves:
    """The loss curves and the pruner's values, by step."""

    spec: LossSpec
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    val_terms: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    intermediate: list[tuple[int, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.val_terms = {k: [] for k in self.spec.variables}

    def validation(self, step: int, result) -> None:
        """The validation loss and each variable's term of an evaluation's result."""
        self.val_loss.append((step, float(combine(self.spec, result.loss_terms))))
        for k, v in result.loss_terms.items():
            self.val_terms[k].append((step, v))


class _PrunerChecks:
    """The intermediate evaluations: the validation loss on a fixed subset of the 6-hour
    samples, and the objective at the study's lead on a fixed subset, so that every trial's
    intermediate values are comparable."""

    def __init__(self, trial, data: TrialData, spec: LossSpec, batch_size: int, device) -> None:
        self.data, self.spec, self.batch_size, self.device = data, spec, batch_size, device
        self.val_idx = eval_indices(len(data.validation), trial.val_samples)
        self.scored_idx = eval_indices(len(data.scored), trial.val_samples)
        #: the checks' wall time and forward passes (one sample, one model step) so far
        self.seconds, self.forwards = 0.0, 0

    def run(self, model, step: int, curves: _Curves) -> float:
        """Evaluate at `step`, log it on `curves`; the objective on the subset."""
        started = time.perf_counter()
        objective = self._run(model, step, curves)
        self.seconds += time.perf_counter() - started
        self.forwards += len(self.val_idx)
        if self.data.objective_steps != 1:
            self.forwards += len(self.scored_idx) * self.data.objective_steps
        return objective

    def _run(self, model, step: int, curves: _Curves) -> float:
        run = dict(batch_size=self.batch_size, device=self.device, state=False)
        result = forecast(model, self.data.validation, self.val_idx, loss=self.spec, **run)
        curves.validation(step, result)
        if self.data.objective_steps != 1:  # the objective's lead: a rollout
            result = forecast(model, self.data.scored, self.scored_idx, **run)
        objective = subset_objective(result.values, self.data, self.scored_idx)
        curves.intermediate.append((step, objective))
        return objective
