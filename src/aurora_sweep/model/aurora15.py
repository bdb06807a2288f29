"""Aurora 1.5 as a base a trial fine-tunes: its own hourly precipitation, summed to a step's total.

Aurora 1.5 (`aurora.AuroraV1p5`) already predicts precipitation: `scaled_tp_1h`, the metres of water
over the hour before its valid time, one of its seven output-only surface variables, at any lead
time in hours. A study's target is tp, the total over a 6-hour step (mm), or pr, the mean rate over
it (mm h-1, `targets.TARGETS`), so a trial on Aurora 1.5 adapts that head instead of adding a new
variable: `SixHourAurora15` runs the hours 1..6 of a step from the same state in one pass (stacked
along the batch, as `aurora.rollout(..., fine_lead_times=[1, ..., 6])` runs them one by one) and
returns a prediction shaped like every other base's: the target (the six hours' sum in mm, or their
mean in mm h-1) under its name, beside the state at +6 h under the store's names. The loss,
rollouts, scores, forecasts and the memory trace then treat it as they treat any base; a step's
activations are those of six forward passes, which the traced estimate sees because it runs this
forward.

It reads a store's batch (`dataset.Samples.for_v15`): the surface variables under the store's names
with Aurora 1.5's extra inputs, its 36 static fields cut at the region, and optionally the static
field `TRUE_LON`, the true longitudes of a box Aurora sees shifted east (one crossing 0°). It adds
what the store does not hold, the prescribed insolation at the two input times (at the true
longitudes), and leaves the target out of the inputs: precipitation is output-only in Aurora 1.5, as
it was pretrained.

Its 36 static fields come from the file microsoft/aurora publishes beside the checkpoint
(`read_statics`, which unpickles numpy arrays only), cut at a study's grid (`crop_statics`,
`region_statics`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import pickle
from pathlib import Path

import numpy as np
import torch
from aurora import AuroraV1p5, Batch

from aurora_sweep.config.bases import HF_REPO
from aurora_sweep.config.targets import TARGETS
from aurora_sweep.data.store import AURORA_V15_NAMES, TRUE_LON
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.model.files import STATIC_FILE, resolve_statics

#: Aurora 1.5's hourly precipitation (m over the hour before the valid time).
HOURLY_TP = "scaled_tp_1h"
#: The hours of a model step, each a lead time of one pass from the same state.
STEP_HOURS = 6
MM_PER_M = 1000.0
#: Store names of Aurora 1.5's variables, where they differ (`store.AURORA_V15_NAMES` reversed).
STORE_NAMES = {v: k for k, v in AURORA_V15_NAMES.items()}


def _stack_hours(batch: Batch, hours: list[int]) -> tuple[Batch, torch.Tensor]:
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


def _rows(pred: Batch, start: int, stop: int) -> Batch:
    """Rows `start:stop` of a prediction (one hour's samples of a stacked pass)."""
    return dataclasses.replace(
        pred,
        surf_vars={k: v[start:stop] for k, v in pred.surf_vars.items()},
        atmos_vars={k: v[start:stop] for k, v in pred.atmos_vars.items()},
        metadata=dataclasses.replace(pred.metadata, time=tuple(pred.metadata.time[start:stop])),
    )


def insolation_at(times, lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
    """The prescribed insolation (Aurora's `aurora.insolation`) at `times` on the grid of `lat`
    and `lon` (degrees east, any frame), shaped (len(times), lat, lon); zeros of that shape
    for fake tensors (the memory trace: only the shape matters there)."""
    from torch._subclasses.fake_tensor import is_fake

    shape = (len(times), lat.shape[0], lon.shape[0])
    if is_fake(lat) or is_fake(lon) or lat.device.type == "meta":
        return torch.zeros(shape)
    from aurora.insolation import insolation

    lat_np = lat.detach().cpu().numpy().astype(np.float32)
    lon_np = np.mod(lon.detach().cpu().numpy(), 360.0).astype(np.float32)
    return torch.from_numpy(
        np.asarray(
            insolation(list(times), lat_np, lon_np, enforce_2d=True), dtype=np.float32
        ).reshape(shape)
    )


class SixHourAurora15(AuroraV1p5):
    """Aurora 1.5 whose forward pass is one 6-hour step of a study: its `target_name` (tp, mm
    over the step: the sum of its hourly `scaled_tp_1h`; pr, mm h-1: their mean) and the state
    at +6 h, from a store-named batch.

    With `clamp_at_first_step` (forecasts, `model.clamped`, and the zero-shot baseline,
    `zero_shot.zero_shot_totals`) each hour is clamped at 0 before the sum; in training the loss
    sees the raw hours (each at least -1 mm, the log transform's floor).
    """

    #: the output whose head a trial trains (`model.target_var`)
    head = HOURLY_TP

    def __init__(self, *, target: str, **kwargs) -> None:
        super().__init__(**kwargs)
        if not TARGETS[target].from_hourly_precipitation:
            raise ValueError(f"Aurora 1.5's hourly precipitation does not make {target}")
        #: the study's target: the hours' total or mean rate over the step, in its units
        self.target_name = target
        # fed back in a rollout under the store's names: clip them as Aurora 1.5's
        for name, store in STORE_NAMES.items():
            if name in self.rollout_input_clipping:
                self.rollout_input_clipping[store] = self.rollout_input_clipping[name]

    def forward(self, batch: Batch, lead_times: torch.Tensor | None = None) -> Batch:
        """One 6-hour step from `batch` (`lead_times`, which `aurora.rollout` passes as the
        model's step, is ignored: a step is always the hours 1..6)."""
        batch = batch.crop(patch_size=self.patch_size)
        b = next(iter(batch.surf_vars.values())).shape[0]
        hours = list(range(1, STEP_HOURS + 1))
        stacked, lead = _stack_hours(self._inputs(batch), hours)
        pred = super().forward(stacked, lead_times=lead)
        hourly = pred.surf_vars[HOURLY_TP][:, 0]
        if self.clamp_at_first_step or pred.metadata.rollout_step > 1:  # as Aurora clamps tp
            hourly = hourly.clamp(min=0)
        total = hourly.reshape(STEP_HOURS, b, *hourly.shape[1:]).sum(dim=0) * MM_PER_M
        total = TARGETS[self.target_name].per_lead(total, STEP_HOURS)
        last = _rows(pred, (STEP_HOURS - 1) * b, STEP_HOURS * b)
        dropped = (*self.output_only_surf_vars, "insolation")
        surf = {STORE_NAMES.get(k, k): v for k, v in last.surf_vars.items() if k not in dropped}
        surf[self.target_name] = total[:, None]
        return dataclasses.replace(last, surf_vars=surf, static_vars=batch.static_vars)

    def _inputs(self, batch: Batch) -> Batch:
        """The batch Aurora 1.5 reads: its names, no NaN (sea ice over land, as its example
        sets it), not the target, the insolation at both input times, its static fields only."""
        surf = {
            AURORA_V15_NAMES.get(k, k): torch.nan_to_num(v, nan=0.0)
            for k, v in batch.surf_vars.items()
            if k != self.target_name
        }
        static = dict(batch.static_vars)
        true_lon = static.pop(TRUE_LON, None)
        last = batch.metadata.time
        times = [t - dt.timedelta(hours=STEP_HOURS) for t in last] + list(last)
        lon = true_lon[0] if true_lon is not None else batch.metadata.lon
        sun = insolation_at(times, batch.metadata.lat, lon)
        ref = next(iter(surf.values()))
        sun = sun.reshape(2, len(last), *sun.shape[1:]).transpose(0, 1)
        surf["insolation"] = sun.to(device=ref.device, dtype=ref.dtype)
        return dataclasses.replace(batch, surf_vars=surf, static_vars=static)

    def _update_insolation(self, pred: Batch) -> Batch:
        """Left out: the insolation is an input the next step recomputes (`_inputs`), and the
        prediction drops it."""
        return pred


# --------------------------------------------------------------------------------------------
# Its static fields, cut at a study's grid

GLOBAL_SHAPE = (721, 1440)
GLOBAL_STEP = 0.25


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds numpy arrays and nothing else: a downloaded pickle runs no code."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("builtins", "dict"),
    }  # fmt: skip

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array")
        return super().find_class(module, name)


def read_statics(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Aurora 1.5's global static fields from `path` (`STATIC_FILE`), each of `names`
    (the model's `static_vars`) a (721, 1440) float32 array."""
    try:
        with open(path, "rb") as f:
            table = _ArraysOnly(f).load()
    except FileNotFoundError:
        raise AuroraSweepError(f"no Aurora 1.5 static file at {path}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise AuroraSweepError(
            f"{path} is not Aurora 1.5's static pickle ({e}): download {STATIC_FILE} from "
            f"huggingface.co/{HF_REPO} again"
        ) from None
    if not isinstance(table, dict):
        raise AuroraSweepError(f"{path} does not hold a table of static fields")
    missing = [k for k in names if k not in table]
    if missing:
        raise AuroraSweepError(
            f"{path} lacks the static field(s) {', '.join(missing[:4])}: it is not the static "
            f"file of Aurora 1.5 ({STATIC_FILE})"
        )
    bad = [k for k in names if np.shape(table[k]) != GLOBAL_SHAPE]
    if bad:
        raise AuroraSweepError(
            f"{path}: {bad[0]} is {np.shape(table[bad[0]])}, not the global 0.25° grid "
            f"{GLOBAL_SHAPE}"
        )
    return {k: np.asarray(table[k], dtype=np.float32) for k in names}


def crop_statics(
    statics: dict[str, np.ndarray], lat: np.ndarray, lon: np.ndarray
) -> dict[str, np.ndarray]:
    """The global fields at a store's grid points (latitudes, longitudes in degrees, any
    frame): each point must lie on the 0.25° grid."""
    rows = (90.0 - np.asarray(lat, dtype=float)) / GLOBAL_STEP
    cols = np.mod(np.asarray(lon, dtype=float), 360.0) / GLOBAL_STEP
    for what, idx in (("latitude", rows), ("longitude", cols)):
        if np.abs(idx - np.round(idx)).max(initial=0) > 1e-6:
            raise AuroraSweepError(
                f"the store's {what}s are not on Aurora 1.5's 0.25° grid: use a [data] grid "
                "that is a multiple of 0.25° between whole-degree edges"
            )
    r, c = np.round(rows).astype(int), np.round(cols).astype(int) % GLOBAL_SHAPE[1]
    return {k: v[np.ix_(r, c)] for k, v in statics.items()}


def region_statics(path: Path, samples, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Aurora 1.5's static fields `names` from the file at `path`, cut at the grid of
    `samples` (`dataset.Samples`)."""
    lat, lon = samples.cube["latitude"].values, samples.cube["longitude"].values
    cut = crop_statics(read_statics(path, names), lat, lon)
    return {k: torch.from_numpy(v) for k, v in cut.items()}


def static_names(arch: tuple = ()) -> tuple[str, ...]:
    """The static fields Aurora 1.5 reads: its own, or those `arch` gives it."""
    import inspect

    import aurora

    default = inspect.signature(aurora.AuroraV1p5).parameters["static_vars"].default
    return tuple(dict(arch).get("static_vars") or default)


def study_statics(samples, config, base: str = "v1.5") -> dict[str, torch.Tensor]:
    """The static fields `base` (Aurora 1.5) reads at the grid of `samples`, from the file the
    study gives ([model] v15_static) or the pinned one."""
    path = resolve_statics(config.model.v15_static)
    return region_statics(path, samples, static_names(config.model.arch_for(base)))


def for_base(samples, base: str, config):
    """`samples` as a trial of `base` reads them: with Aurora 1.5's inputs and its static
    fields (`Samples.for_v15`) where the base reads them, else as they are."""
    from aurora_sweep.config.bases import reads_v15_inputs

    if not reads_v15_inputs(base):
        return samples
    return samples.for_v15(study_statics(samples, config, base))
