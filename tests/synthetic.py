"""Canonical stores of any shape, made in memory: for tests outside the demo's grid.

The fields are smooth noise at plausible magnitudes (no physics): enough for Aurora's forward pass,
the splits, the baselines and the scores to meet every shape a real study has.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from aurora_sweep.data.store import write_store

SURFACE = {"2t": (285.0, 8.0), "10u": (0.0, 5.0), "10v": (0.0, 5.0), "msl": (101300.0, 900.0)}
ATMOS = {"z": (50000.0, 2000.0), "u": (5.0, 10.0), "v": (0.0, 8.0), "t": (260.0, 10.0),
         "q": (2e-3, 1e-3)}  # fmt: skip
#: Aurora 1.5's other surface inputs (`store.V15_SURF_VARS`): mean and spread, clipped to
#: their physical range where they have one
V15_SURFACE = {
    "2d": (278.0, 6.0), "tcwv": (15.0, 5.0), "tcc": (0.6, 0.3), "100u": (0.0, 7.0),
    "100v": (0.0, 6.0), "sp": (97000.0, 2000.0), "lcc": (0.4, 0.3), "mcc": (0.3, 0.3),
    "hcc": (0.3, 0.3), "skt": (283.0, 8.0), "stl1": (284.0, 6.0), "swvl1": (0.25, 0.08),
    "ci": (0.1, 0.1), "sd": (0.01, 0.02),
}  # fmt: skip
BOUNDED = {"tcwv": (0, None), "tcc": (0, 1), "lcc": (0, 1), "mcc": (0, 1), "hcc": (0, 1),
           "swvl1": (0, 0.7), "ci": (0, 1), "sd": (0, None)}  # fmt: skip


def day_times(days: list[str]) -> np.ndarray:
    """The four model times (00, 06, 12, 18 UTC) of each day, plus 00 UTC of the day after each."""
    out = set()
    for d in days:
        start = pd.Timestamp(d)
        out.update(start + pd.Timedelta(hours=h) for h in (0, 6, 12, 18, 24))
    return np.array(sorted(out), dtype="datetime64[ns]")


def make_cube(
    *,
    lat: np.ndarray,
    lon: np.ndarray,
    levels: tuple[int, ...],
    times: np.ndarray,
    seed: int = 0,
    v15: bool = False,
    target: str = "tp",
) -> xr.Dataset:
    """A canonical cube on the given coordinates (lat descending, lon ascending, levels hPa);
    with `v15`, Aurora 1.5's other surface inputs too (sea ice NaN over land, as in ERA5); tp
    and, when the study predicts another `target`, that one too (0 at sea for a land field)."""
    rng = np.random.default_rng(seed)
    nt, ny, nx = len(times), len(lat), len(lon)

    def field(mean: float, spread: float, *shape: int) -> np.ndarray:
        return (mean + spread * rng.standard_normal(shape)).astype(np.float32)

    levels = tuple(sorted(levels))
    data = {
        k: (("time", "latitude", "longitude"), field(m, s, nt, ny, nx))
        for k, (m, s) in SURFACE.items()
    }
    data |= {
        k: (("time", "level", "latitude", "longitude"), field(m, s, nt, len(levels), ny, nx))
        for k, (m, s) in ATMOS.items()
    }
    wet = rng.random((nt, ny, nx)) < 0.5
    tp = np.where(wet, rng.gamma(0.8, 2.0, (nt, ny, nx)), 0.0).astype(np.float32)
    data["tp"] = (("time", "latitude", "longitude"), tp)
    data["static_z"] = (("latitude", "longitude"), field(3000.0, 2000.0, ny, nx))
    lsm = (np.add.outer(np.arange(ny), np.arange(nx)) > (ny + nx) / 2).astype(np.float32)
    data["static_lsm"] = (("latitude", "longitude"), lsm)
    data["static_slt"] = (("latitude", "longitude"), np.ones((ny, nx), np.float32))
    if target != "tp":
        data[target] = (("time", "latitude", "longitude"), _target_field(target, tp, lsm, rng))
    for k, (m, sd) in V15_SURFACE.items() if v15 else ():
        values = np.clip(field(m, sd, nt, ny, nx), *BOUNDED.get(k, (None, None)))
        if k == "ci":
            values = np.where(lsm > 0.5, np.nan, values).astype(np.float32)
        data[k] = (("time", "latitude", "longitude"), values)
    return xr.Dataset(
        data,
        coords={"time": times, "level": np.array(levels), "latitude": lat, "longitude": lon},
    )


def _target_field(name: str, tp: np.ndarray, lsm: np.ndarray, rng) -> np.ndarray:
    """Values of another target: tp's wet pattern in its units, or soil moisture in 0.1..0.45;
    0 at sea for a land field."""
    from aurora_sweep.config.targets import TARGETS

    spec = TARGETS[name]
    if spec.precipitation_like:
        values = tp * spec.per_lead(1.0, 6)  # a mean rate is a sixth of the 6-hour total
    else:
        values = rng.uniform(0.1, 0.45, tp.shape)
    if spec.land_only:
        values = np.where(lsm > 0.5, values, 0.0)
    return values.astype(np.float32)


def region_axes(data) -> tuple[np.ndarray, np.ndarray]:
    """Latitudes and longitudes of a study's region at its grid (`data`: DataConfig)."""
    r, g = data.region, data.grid
    rows = int(round((r.north - r.south) / g)) + 1
    cols = int(round((r.east - r.west) / g)) + 1
    return r.north - g * np.arange(rows), r.west + g * np.arange(cols)


def write_region_store(data, path: Path, *, days: list[str], seed: int = 0) -> Path:
    """A store covering `data`'s region, levels and grid on `days` (with Aurora 1.5's inputs
    where the study asks for them)."""
    lat, lon = region_axes(data)
    cube = make_cube(
        lat=lat, lon=lon, levels=data.levels, times=day_times(days), seed=seed,
        v15=data.v15_inputs, target=data.target,
    )  # fmt: skip
    return write_store(cube, path)


def global_statics(names, coded: bool = False) -> dict[str, np.ndarray]:
    """Aurora 1.5's static fields `names` on the global 0.25° grid: smooth values of 0..1, or
    (`coded`) each point's global row index * 10000 + column index."""
    rows, cols = np.meshgrid(np.arange(721), np.arange(1440), indexing="ij")
    if coded:
        return {k: (rows * 10000 + cols + i * 1e8).astype(np.float32) for i, k in enumerate(names)}
    return {
        k: (0.5 + 0.5 * np.sin(rows / 40 + cols / 90 + i)).astype(np.float32)
        for i, k in enumerate(names)
    }


def write_v15_statics(path: Path, names) -> Path:
    """A static file in the layout of Aurora 1.5's (`aurora15.STATIC_FILE`)."""
    import pickle

    Path(path).write_bytes(pickle.dumps(global_statics(names)))
    return Path(path)


def train_steps(model, samples, *, steps: int, offset: int, lr: float = 1e-2):
    """A few AdamW steps of `model` on tp's squared error, on samples (i, i + offset) at step i;
    the last loss."""
    import torch

    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        batch, target = samples.batch([step, step + offset])
        loss = ((model(batch).surf_vars["tp"][:, 0] - target) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return loss


def tiny_lora_trial(**changes):
    """A small LoRA recipe on the demo base and the tiny study's levels, for tests that train a
    model by hand (`changes` replace any field)."""
    from aurora_sweep.config.recipe import TrialConfig

    recipe = dict(
        lora_rank=2, lora_targets="qkv+proj", unfrozen_blocks=0, batch_size=2, precision="fp32",
        learning_rate=1e-2, activation_checkpointing=False, base="demo",
        levels=(500, 700, 850), steps=2, eval_every=2, val_samples=4, weight_decay=0.0, seed=0,
        wrap_longitude=False,
    )  # fmt: skip
    return TrialConfig(**(recipe | changes))


def trained_tiny_adapter(root: Path, tiny_store: Path, trial):
    """An adapter of `trial` on the tiny study (its train split on the trial's levels), trained
    for two steps and saved under `root / "adapter"`; the adapter's path and the study config."""
    from aurora_sweep.config.study_file import load_config
    from aurora_sweep.data.samples import Samples, target_stats
    from aurora_sweep.data.store import open_store
    from aurora_sweep.model.adapter import save_adapter
    from aurora_sweep.model.files import DEMO_CHECKPOINT
    from aurora_sweep.train.fit import build_trial_model
    from conftest import write_tiny_config

    config = load_config(write_tiny_config(root, store=tiny_store), workdir=root)
    train = Samples(open_store(tiny_store), config.data, "train").with_levels(trial.levels)
    stats = target_stats(train.cube, config.data.train, "tp")
    peft_model, _, parts = build_trial_model(trial, stats, DEMO_CHECKPOINT)
    train_steps(peft_model, train, steps=2, offset=3)
    save_adapter(
        root / "adapter", model=peft_model, parts=parts, trial=trial, stats=stats,
        checkpoint=DEMO_CHECKPOINT, study_config=config.path, metrics={},
    )  # fmt: skip
    return root / "adapter", config
