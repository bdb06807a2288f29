"""Aurora 1.5 (`aurora.AuroraV1p5`): the model, and its own precipitation over a study's lead.

Aurora 1.5 predicts hourly precipitation itself (`scaled_tp_1h`, an output-only surface variable:
metres of water over the hour before the valid time, log-transformed inside the model and
returned physical). With its variable lead time, one initial state gives the hours 1..6 after
it (`aurora.rollout(..., fine_lead_times=[1, ..., 6])`; only the 6-hour prediction advances the
state), so its 6-hour total is the sum of the six hourly fields, and a 12- or 24-hour total the
sum over the steps of the rollout. That total, with no training at all, is the precipitation a
user gets for free from Aurora 1.5: the baseline a fine-tune must beat.

`hourly_totals` computes it with the hours of a step stacked along the batch (one forward pass
of 6 × B samples, `hours_per_pass` to split it), which equals `aurora.rollout`'s hour-by-hour
loop (tested) in a sixth of the passes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from aurora_sweep.bases import Base

#: The checkpoint microsoft/aurora publishes for Aurora 1.5 (pinned as the other bases are).
V15 = Base(
    "v1.5", "AuroraV1p5", "aurora-0.25-v1.5.ckpt", "a96afd7ee6d65e3bd2d476f3be798a25a56f2296",
    summary="Aurora 1.5, 1.3 B parameters, 26 surface variables with hourly precipitation",
)  # fmt: skip
#: Its hourly precipitation (m over the hour before the valid time), and the hours of a step.
HOURLY_TP = "scaled_tp_1h"
STEP_HOURS = 6
MM_PER_M = 1000.0


def build_v15(arch: tuple[tuple[str, object], ...] = ()) -> torch.nn.Module:
    """AuroraV1p5 with its own variables and defaults, and the constructor overrides `arch`
    (a reduced width for tests: `[model.arch.v1.5]`)."""
    import aurora

    from aurora_sweep.errors import AuroraSweepError

    try:
        return aurora.AuroraV1p5(**dict(arch))
    except (TypeError, ValueError, AssertionError) as e:
        raise AuroraSweepError(
            f"cannot build Aurora 1.5 with {dict(arch)} ({e}): give arguments of AuroraV1p5"
        ) from None


def load_v15(checkpoint: Path, arch: tuple = (), device: str = "cpu") -> torch.nn.Module:
    """Aurora 1.5 with the weights of `checkpoint` (every key must match), in eval mode."""
    from aurora_sweep.model import load_base_checkpoint

    model = build_v15(arch)
    load_base_checkpoint(model, checkpoint)
    return model.to(device).eval()


def input_variables(model) -> tuple[str, ...]:
    """The surface variables a batch for `model` carries: all but the output-only ones."""
    return tuple(v for v in model.surf_vars if v not in model.output_only_surf_vars)


def _stack_hours(batch, hours: list[int]):
    """`batch` repeated once per hour of `hours` along the batch axis (hour-major), with each
    row's lead time in hours."""
    n = len(hours)
    b = next(iter(batch.surf_vars.values())).shape[0]
    stacked = dataclasses.replace(
        batch,
        surf_vars={k: v.repeat(n, *[1] * (v.dim() - 1)) for k, v in batch.surf_vars.items()},
        atmos_vars={k: v.repeat(n, *[1] * (v.dim() - 1)) for k, v in batch.atmos_vars.items()},
        metadata=dataclasses.replace(batch.metadata, time=tuple(batch.metadata.time) * n),
    )
    lead = torch.tensor([float(h) for h in hours for _ in range(b)])
    return stacked, lead


def _rows(pred, start: int, stop: int):
    """Rows `start:stop` of a prediction (one hour's samples of a stacked pass)."""
    return dataclasses.replace(
        pred,
        surf_vars={k: v[start:stop] for k, v in pred.surf_vars.items()},
        atmos_vars={k: v[start:stop] for k, v in pred.atmos_vars.items()},
        metadata=dataclasses.replace(pred.metadata, time=tuple(pred.metadata.time[start:stop])),
    )


@torch.no_grad()
def hourly_totals(model, batch, steps: int = 1, *, hours_per_pass: int = STEP_HOURS):
    """Aurora 1.5's precipitation over `steps` 6-hour steps from `batch`, in mm (B, lat, lon),
    and its prediction at the last step (the state, for the other variables' scores).

    Each step's six hourly fields come from the same state (`fine_lead_times` 1..6), each
    clamped at 0 (the log transform's inverse, 1e-3 (e^y - 1), reaches -1 mm an hour); the
    6-hour prediction, clipped as `aurora.rollout` clips it, is the next step's input.
    """
    from aurora.rollout import _advance_batch

    p = next(model.parameters())
    batch = batch.type(p.dtype).crop(model.patch_size).to(p.device)
    b = next(iter(batch.surf_vars.values())).shape[0]
    total = None
    for _ in range(steps):
        last = None
        for first in range(1, STEP_HOURS + 1, hours_per_pass):
            hours = list(range(first, min(first + hours_per_pass, STEP_HOURS + 1)))
            stacked, lead = _stack_hours(batch, hours)
            pred = model(stacked, lead_times=lead)
            tp = pred.surf_vars[HOURLY_TP][:, 0].float().clamp(min=0)
            part = tp.reshape(len(hours), b, *tp.shape[1:]).sum(dim=0)
            total = part if total is None else total + part
            last = _rows(pred, (len(hours) - 1) * b, len(hours) * b)  # the pass's last hour
        batch = _advance_batch(batch, model.apply_rollout_input_clipping(last))
    return total.cpu() * MM_PER_M, last
