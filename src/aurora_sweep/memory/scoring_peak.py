"""The peak of a trial's scoring, and the largest scoring batch its memory cap allows.

A trial scores without gradients (the pruner's checks while it trains, the whole split after),
many samples a pass: the larger the batch, the faster, up to what the cap allows. While it
scores, what training left is still alive: the weights, the gradients of the last step and the
optimiser's state. A forward pass without gradients keeps no unit's activations past the unit,
so besides those it holds the batch, the prediction that becomes the next input of a rollout,
and one unit's working tensors at a time, all in proportion to the batch.

`scoring_estimate` predicts that peak for a batch: "traced" runs the forward pass on fake
tensors (`memory.traced`: the same counter as a training step's, the CUDA allocator's rounding);
"fitted" bounds a unit's working tensors by what the largest unit saves for backward in
training (`estimate.largest_unit_bytes`), every block counted, with a margin (`UNIT_MARGIN`). `plan_scoring` picks the largest
batch, at most `MAX_EVAL_BATCH`, whose predicted peak fits the cap; the trial's predicted peak
is the larger of its training step's and its scoring's (`combined`).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from aurora_sweep.config.recipe import TrialConfig
from aurora_sweep.memory.estimate import (
    MemoryEstimate,
    _architecture,
    _with_overhead,
    input_bytes,
    largest_unit_bytes,
    state_bytes,
    trial_architecture,
)
from aurora_sweep.memory.traced import (
    _LOCK,
    TraceFailed,
    _structure,
    _trace,
    synthetic_sample,
    trained_state,
)
from aurora_sweep.verify.scoring import MAX_EVAL_BATCH, eval_batch_size

#: a gradient-free forward's working tensors over what the largest unit saves for backward:
#: the fit's margin, from traces of the demo (64x128) and AuroraSmallPretrained (64x64,
#: 148x208) in fp32 and bf16, where the traced per-sample bytes were up to 1.41x the unmargined
#: fit's (`tests/test_memory.py` holds the fit above the trace)
UNIT_MARGIN = 1.5


def scoring_estimate(
    trial: TrialConfig,
    *,
    grid: tuple[int, int],
    levels: int,
    batch: int,
    device: str = "cuda",
    how: str = "fitted",
) -> MemoryEstimate:
    """The predicted peak while `trial` scores `batch` samples a pass on `grid` with `levels`
    levels (module docstring); "traced" falls back to the fit where the trace fails."""
    note = ""
    if how == "traced":
        try:
            parts = _traced_scoring(_structure(trial), grid, levels, batch, device)
            return _with_overhead(parts, device, method="traced")
        except TraceFailed as e:
            note = f"the scoring trace failed ({e}); fitted instead"
    arch = _architecture(
        trial.base, 1, "qkv", 0, grid, "lora", True, trial.arch
    )  # every block on the path: a forward pass runs them all
    parts = {
        **state_bytes(trial_architecture(trial, grid).params, trial.optimizer),
        # the batch, and the prediction fed back as a rollout's next input
        "inputs": 2 * input_bytes(grid=grid, levels=levels, batch_size=batch),
        "activations": int(
            batch
            * UNIT_MARGIN
            * largest_unit_bytes(arch, grid=grid, levels=levels, precision=trial.precision)
        ),
    }
    return _with_overhead(parts, device, method="fitted", note=note)


def plan_scoring(
    trial: TrialConfig,
    *,
    grid: tuple[int, int],
    levels: int,
    cap_bytes: int | None,
    device: str = "cuda",
    how: str = "fitted",
) -> tuple[int, MemoryEstimate]:
    """The largest scoring batch (at most `MAX_EVAL_BATCH`) whose predicted peak fits the cap,
    and that peak; without a cap, the batch `verify.scoring.eval_batch_size` gives. None fits: a
    batch of one, whose peak the cap then refuses."""
    if cap_bytes is None:
        batch = eval_batch_size(trial.batch_size, torch.device(device))
        return batch, scoring_estimate(
            trial, grid=grid, levels=levels, batch=batch, device=device, how=how
        )

    def peak(b: int) -> MemoryEstimate:
        return scoring_estimate(trial, grid=grid, levels=levels, batch=b, device=device, how=how)

    one, two = peak(1), peak(2)
    per_sample = max(1, two.total_bytes - one.total_bytes)
    batch = int(min(MAX_EVAL_BATCH, max(1, 1 + (cap_bytes - one.total_bytes) // per_sample)))
    estimate = peak(batch)
    while batch > 1 and estimate.total_bytes > cap_bytes:  # the line was optimistic
        batch = max(1, batch * 3 // 4)
        estimate = peak(batch)
    return batch, estimate


def combined(train: MemoryEstimate, scoring: MemoryEstimate) -> MemoryEstimate:
    """The trial's predicted peak: its training step's or its scoring's, whichever is larger,
    with the other's total among the parts (`scoring_total`, `training_total`)."""
    if scoring.total_bytes <= train.total_bytes:
        return dataclasses.replace(
            train, parts={**train.parts, "scoring_total": scoring.total_bytes}
        )
    note = "; ".join(n for n in (train.note, scoring.note) if n)  # a trace's fallback, say
    return dataclasses.replace(
        scoring, parts={**scoring.parts, "training_total": train.total_bytes}, note=note
    )


@functools.lru_cache(maxsize=256)
def _traced_scoring(
    trial: TrialConfig, grid: tuple[int, int], levels: int, batch: int, device: str
) -> dict[str, int]:
    """The parts of the traced scoring peak (`scoring_estimate`), by the training step's own
    harness (`traced._trace`)."""
    scoring = dataclasses.replace(trial, batch_size=batch)
    with _LOCK:  # Aurora's mask cache is the process's; one trace at a time
        return _trace(scoring, grid, levels, device, reuse=True, run=_run_scoring).parts


def _run_scoring(
    model, trial: TrialConfig, *, grid: tuple[int, int], levels: int, cuda: bool, counter
) -> None:
    """What is alive after training (`traced.trained_state`, and the last step's gradients),
    then one forward pass without gradients of a scoring batch."""
    params, optimiser = trained_state(model, trial, cuda=cuda, counter=counter)  # kept alive
    counter.tag = "gradients"
    for p in params:
        p.grad = torch.zeros_like(p)
    counter.tag = "inputs"
    batch, _, _ = synthetic_sample(trial, grid, levels)
    counter.tag = "activations"
    counter.reset_peak()
    model.eval()
    with torch.no_grad():
        prediction = model(batch)
    del prediction, optimiser
