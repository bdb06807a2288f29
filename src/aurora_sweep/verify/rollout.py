"""A forecast over a lead: the model's prediction at each 6-hour step, and the target over the
steps so far.

The one loop every forecast of several steps runs: a split's scores at each lead
(`scoring.forecast`, `scoring.forecast_leads`, and through them the base model's scores and the
zero-shot Aurora 1.5 baseline, `zero_shot`) and the NetCDF forecasts of an exported adapter
(`report.forecast`). The target is combined over the steps as its kind says
(`targets.Target.accumulate`: a total, a mean rate, the last value), each step's value within
its bounds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from aurora_sweep.config.targets import Target

if TYPE_CHECKING:
    import torch
    from aurora import Batch

#: A step of a rollout: (step from 1, the prediction, the target over the steps so far or None)
Step = tuple[int, "Batch", "torch.Tensor | None"]


def model_steps(model, batch: Batch, steps: int) -> Iterator[Batch]:
    """The model's predictions at each of `steps` steps of 6 h: one forward for one step, else
    Aurora's rollout (each forecast fed back as the next input)."""
    if steps == 1:
        yield model(batch)
        return
    from aurora import rollout

    from aurora_sweep.model.build import unwrap

    yield from rollout(unwrap(model), batch, steps=steps)


def accumulate(predictions: Iterable[Batch], target: Target) -> Iterator[Step]:
    """(step, prediction, target over the steps so far) for each of `predictions`, the
    predictions of consecutive 6-hour steps (from 1): the target (B, lat, lon) combined as its
    kind says, None when the model does not predict it."""
    total = None
    for step, pred in enumerate(predictions, start=1):
        value = pred.surf_vars.get(target.name)
        if value is not None:
            total = target.accumulate(total, target.within_bounds(value[:, 0]), step)
        yield step, pred, total


def rollout(model, batch: Batch, steps: int, target: Target) -> Iterator[Step]:
    """`accumulate` over the model's predictions at each of `steps` steps (`model_steps`)."""
    return accumulate(model_steps(model, batch, steps), target)


def last_step(rolled: Iterable[Step]) -> tuple[Batch, torch.Tensor | None]:
    """The prediction and the target over the lead at the last step of a rollout."""
    _, pred, total = deque(rolled, maxlen=1).pop()  # run to its end, the last step kept
    return pred, total


def run_steps(model, batch: Batch, steps: int, target: Target) -> tuple[Batch, torch.Tensor | None]:
    """The model's prediction after `steps` steps of 6 h (each fed back as the next input, as
    Aurora's `rollout` does) and `target` (`targets.Target`) over them, combined as its kind
    says, (B, lat, lon) (None when the model does not predict it)."""
    return last_step(rollout(model, batch, steps, target))
