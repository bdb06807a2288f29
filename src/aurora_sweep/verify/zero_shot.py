"""Aurora 1.5 (`aurora.AuroraV1p5`): its static fields, and its own precipitation untrained.

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
Its 36 static fields come from the file microsoft/aurora publishes (`read_statics`, cut at a
store's points by `crop_statics`).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from aurora_sweep.config.bases import BASELINE_MODELS, HF_REPO
from aurora_sweep.errors import AuroraSweepError

#: The checkpoint microsoft/aurora publishes for Aurora 1.5 (pinned as the bases are).
V15 = BASELINE_MODELS["v1.5"]
#: Its 36 static fields on the global 0.25° grid (721 latitudes from 90° to -90°, 1440
#: longitudes from 0°), as microsoft/aurora publishes them beside the checkpoint: its example
#: loads them from this file rather than building them from the CDS (soil and vegetation types
#: one-hot, orography as the model was trained on), and so does aurora-sweep.
STATIC_FILE = "aurora-0.25-v1.5-static.pickle"
GLOBAL_SHAPE = (721, 1440)
GLOBAL_STEP = 0.25


# --------------------------------------------------------------------------------------------
# Static fields and batches


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


def add_region_statics(data, config) -> None:
    """`data.v15_statics` (`study_data.TrialData`): Aurora 1.5's static fields at the study's
    grid, when a base the study adapts reads them (`bases.reads_v15_inputs`)."""
    from aurora_sweep.config.bases import reads_v15_inputs

    if any(map(reads_v15_inputs, config.bases)):
        data.v15_statics = study_statics(data.train, config)


def resolve_statics(path: Path | None) -> Path:
    """The static file: a given path, or the pinned one in the Hugging Face cache."""
    if path is not None:
        if not Path(path).is_file():
            raise AuroraSweepError(f"no Aurora 1.5 static file at {path}")
        return Path(path)
    from aurora_sweep.model.build import hub_file

    return hub_file(STATIC_FILE, V15.revision, "give the file as [model] v15_static = PATH")


# --------------------------------------------------------------------------------------------
# The zero-shot baseline


def zero_shot_totals(
    leads: dict,
    *,
    checkpoint: Path,
    static_file: Path,
    arch: tuple = (),
    device: str = "cpu",
    batch_size: int = 2,
) -> dict[int, np.ndarray]:
    """Aurora 1.5's precipitation, untrained, over each lead's samples (`leads`: model steps ->
    `dataset.Samples` of one split, of a store with its inputs): the study's target over the
    lead (tp's total in mm or pr's mean rate in mm h-1), (n, lat, lon)
    per lead, in the samples' order, from one rollout per sample (`evaluation.forecast_leads`);
    `batch_size` samples a pass, each of its six hours a row. Run as Aurora 1.5 runs by default
    (fp16 autocast, its edges joined), unless `arch` says otherwise."""
    from aurora_sweep.model.build import build_base, load_base_checkpoint
    from aurora_sweep.verify.scoring import forecast_leads

    target = leads[1].variable.name
    model = build_base("v1.5", target=target, clamp=True, arch=(("autocast", True), *arch))
    load_base_checkpoint(model, checkpoint)
    model.to(device)
    statics = region_statics(static_file, leads[1], static_names(arch))
    v15 = {steps: samples.for_v15(statics) for steps, samples in leads.items()}
    done = forecast_leads(model, v15, batch_size=batch_size, device=device, state=False)
    return {steps: result.values for steps, result in done.items()}


def add_zero_shot(data, config, device, known: dict | None = None) -> None:
    """`data.aurora15` (`study_data.TrialData`): Aurora 1.5's totals on the evaluation split
    at every lead scored, when the study's baselines ask for them; or, given the scores a
    first worker made of them (`known`, `references_of`), those scores and no run at all."""
    from aurora_sweep.model.build import resolve_checkpoint

    if "aurora-1.5" not in config.baselines:
        return
    if known:
        restore_references(data, known)
        return
    data.aurora15 = zero_shot_totals(
        data.leads,
        checkpoint=resolve_checkpoint("v1.5", config.model.checkpoint_for("v1.5")),
        static_file=resolve_statics(config.model.v15_static),
        arch=config.model.arch_for("v1.5"),
        device=str(device),
    )


def references_of(data) -> dict[str, dict]:
    """The zero-shot baseline's scores and per-sample objective terms at each lead, made once
    (JSON: the study keeps them, `records.AURORA15`, and later workers reuse them instead of
    running Aurora 1.5 again); empty when `data` has no zero-shot totals."""
    from aurora_sweep.verify.scoring import ZERO_SHOT, lead_scores

    out = {}
    for steps, samples in data.leads.items():
        if steps not in data.aurora15:
            continue
        refs = data.baseline_scores.setdefault(steps, {})
        if ZERO_SHOT not in refs:  # its scores, made as a trial's baselines are
            lead_scores(data, samples, data.aurora15[steps], bootstrap=0)
        scores, (num, den) = refs[ZERO_SHOT]
        out[str(steps)] = {"scores": scores, "num": np.asarray(num).tolist(),
                           "den": np.asarray(den).tolist()}  # fmt: skip
    return out


def restore_references(data, known: dict[str, dict]) -> None:
    """The zero-shot baseline's scores from `references_of`, as `lead_scores` keeps them."""
    from aurora_sweep.verify.scoring import ZERO_SHOT

    for steps, entry in known.items():
        terms = (np.asarray(entry["num"], float), np.asarray(entry["den"], float))
        data.baseline_scores.setdefault(int(steps), {})[ZERO_SHOT] = (dict(entry["scores"]), terms)
