"""One setting of a study file checked: its kind, its bounds, its vocabulary.

Each function takes a value as TOML gives it and the setting's name, and returns the value in the
type `config` stores, or raises one `AuroraSweepError` line that names the setting and how to write
it. `config` assembles the sections from these. The two values with a type of their own, a region
(`Region`) and a period (`Period`), are declared here too.
"""

from __future__ import annotations

import datetime as dt
import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aurora_sweep.config.objective import INTERIOR, Objective
from aurora_sweep.config.recipe import (
    AURORA_LEVELS,
    BASE_MODELS,
    COSTS,
    LEADS,
    LORA_MODULES,
    MIN_GRID_POINTS,
)
from aurora_sweep.errors import AuroraSweepError


@dataclass(frozen=True)
class Region:
    """A latitude/longitude box in degrees; west > east means the box crosses 180°."""

    north: float
    south: float
    west: float
    east: float

    @property
    def crosses_zero(self) -> bool:
        """True when the box spans the Greenwich meridian (e.g. 12°W to 40°E)."""
        west, east = self.west % 360, self.east % 360
        return west > east or (self.west < 0 <= self.east)


@dataclass(frozen=True)
class Period:
    """An inclusive range of days."""

    start: dt.date
    end: dt.date

    def contains(self, day: dt.date) -> bool:
        return self.start <= day <= self.end


def as_period(value: Any, where: str) -> Period:
    if not (isinstance(value, list) and len(value) == 2):
        raise AuroraSweepError(
            f"{where}: give a period as [start, end], e.g. [2024-01-01, 2024-12-31]"
        )
    start, end = as_date(value[0], where), as_date(value[1], where)
    if end < start:
        raise AuroraSweepError(f"{where}: the end {end} comes before the start {start}")
    return Period(start, end)


def parse_memory(text: str | int) -> int:
    """Parse '10GiB', '512MiB', '8GB' or a byte count into bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*", str(text))
    if not m:
        raise AuroraSweepError(
            f"cannot read memory size {text!r}: write a number and a unit, e.g. '10GiB' or '8GB'"
        )
    units = {
        None: 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KiB": 2**10,
        "MiB": 2**20,
        "GiB": 2**30,
        "TiB": 2**40,
    }
    return int(float(m.group(1)) * units[m.group(2)])


def as_date(value: Any, where: str) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise AuroraSweepError(f"{where}: {value!r} is not a date; write YYYY-MM-DD") from None


def check_region(region: Region) -> None:
    """Refuse boxes that cannot exist."""
    for name, v, lo, hi in (
        ("north", region.north, -90, 90),
        ("south", region.south, -90, 90),
        ("west", region.west, -180, 360),
        ("east", region.east, -180, 360),
    ):
        if not lo <= v <= hi:
            raise AuroraSweepError(f"[data.region] {name} = {v} is outside [{lo}, {hi}] degrees")
    if region.north <= region.south:
        raise AuroraSweepError(
            f"[data.region] north ({region.north}) must be greater than south ({region.south})"
        )
    if region.west == region.east:
        raise AuroraSweepError("[data.region] west and east are equal: the box has no width")
    width = (region.east - region.west) % 360
    if width > 180:
        raise AuroraSweepError(
            f"[data.region] the box runs {width:g}° east from west = {region.west:g} to east = "
            f"{region.east:g}: are west and east swapped? (west > east means a box across 180°)"
        )


def region_shape(region: Region, grid: float) -> tuple[int, int]:
    """The box's (rows, columns) of grid points at `grid` degrees."""
    rows = int((region.north - region.south) / grid + 1e-9) + 1
    cols = int(((region.east - region.west) % 360) / grid + 1e-9) + 1
    return rows, cols


def check_region_size(region: Region, grid: float) -> None:
    """Refuse a box too small for Aurora at this grid spacing (`run` asks before any trial; the
    data commands take any box, a store can serve several studies)."""
    rows, cols = region_shape(region, grid)
    if rows < MIN_GRID_POINTS or cols < MIN_GRID_POINTS:
        side = (MIN_GRID_POINTS - 1) * grid
        raise AuroraSweepError(
            f"[data.region] the box is {rows}x{cols} points at {grid}°; Aurora needs at least "
            f"{MIN_GRID_POINTS}x{MIN_GRID_POINTS} (its backbone halves the 4-point patch grid "
            f"twice): make the box at least {side:g}° on each side; scores can still be read at "
            "a point inside it (report --point)"
        )


#: (latitude, longitude) slices of a forecast grid: the box's interior
Window = tuple[slice, slice]


def interior_window(shape: tuple[int, int], grid: float, margin: float) -> Window | None:
    """The interior of a forecast grid of `shape` (rows, columns) at `grid` degrees: the points
    at least `margin` degrees in from every side (the edge zone a regional model is fed nothing
    through left out); None for a margin of 0. A margin that leaves no point is refused."""
    if margin <= 0:
        return None
    k = math.ceil(margin / grid - 1e-9)  # grid points left out on each side
    rows, cols = shape
    if 2 * k >= rows or 2 * k >= cols:
        raise AuroraSweepError(
            f"[study] edge_margin = {margin:g}°: the box is scored on {rows}x{cols} points at "
            f"{grid:g}°, so {k} points in from each side leave no interior; give a smaller "
            "edge_margin (0: no interior scores) or a larger box"
        )
    return slice(k, rows - k), slice(k, cols - k)


def nearest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else f"known: {', '.join(known)}"


def as_number(value: Any, what: str, *, minimum: float | None = None, above: bool = False) -> float:
    """A float from TOML (an integer is fine), at least (or above) `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuroraSweepError(f"{what} must be a number, not {value!r}")
    if minimum is not None and (value <= minimum if above else value < minimum):
        bound = f"above {minimum:g}" if above else f"at least {minimum:g}"
        raise AuroraSweepError(f"{what} must be {bound}, not {value!r}")
    return float(value)


def as_whole(value: Any, what: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AuroraSweepError(f"{what} must be a whole number, not {value!r}")
    if minimum is not None and value < minimum:
        raise AuroraSweepError(f"{what} must be at least {minimum}, not {value!r}")
    return value


def as_text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise AuroraSweepError(f"{what} must be a non-empty string, not {value!r}")
    return value


def as_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise AuroraSweepError(f"{what} must be true or false, not {value!r}")
    return value


def _database_url(text: str, workdir: Path) -> str:
    """A SQLite file relative to `workdir`; `postgresql://` as SQLAlchemy's psycopg 3 driver
    (the one installed); anything else as given."""
    text = str(text).strip()
    if text.startswith("sqlite:///"):
        file = text.removeprefix("sqlite:///")
        return text if file.startswith("/") else f"sqlite:///{workdir / file}"
    if text.startswith("postgresql://"):
        return "postgresql+psycopg://" + text.removeprefix("postgresql://")
    return text


def storage_url(text: str, workdir: Path) -> str:
    """An Optuna storage URL, with relative files taken relative to `workdir`.

    `sqlite:///FILE.db` (one process), a `FILE.journal` (processes on one machine) or
    `postgresql+psycopg://USER@HOST/DB` (many machines; `postgresql://` means the same).
    """
    text = _database_url(text, workdir)
    if text.startswith(("sqlite:///", "postgresql+", "mysql")):
        return text
    if "://" not in text and text.endswith((".journal", ".log")):
        return str(workdir / text)
    raise AuroraSweepError(
        f"storage {text!r}: give sqlite:///FILE.db (one process), FILE.journal (several "
        "processes on one machine) or postgresql+psycopg://USER@HOST:PORT/DB (many machines)"
    )


def tracking_url(text: str | None, workdir: Path) -> str | None:
    """An MLflow tracking URI: `http(s)://` for a tracking server, `sqlite:///FILE.db` (relative
    to `workdir`) for a local store, a database URL; None for `mlflow.db` in the workdir."""
    if text is None:
        return None
    text = _database_url(text, workdir)
    if text.startswith(("sqlite:///", "http://", "https://", "postgresql+", "mysql", "databricks")):
        return text
    raise AuroraSweepError(
        f"tracking URI {text!r}: give an MLflow server's address (http://HOST:5000) or "
        "sqlite:///FILE.db; MLflow 3 no longer opens a ./mlruns file store"
    )


def data_levels(data: dict) -> tuple[int, ...]:
    raw_levels = data.get("levels", [500, 700, 850])
    if not isinstance(raw_levels, list):
        raise AuroraSweepError(
            f"[data] levels must be a list such as [500, 850], not {raw_levels!r}"
        )
    levels = tuple(as_whole(v, "[data] levels") for v in raw_levels)
    bad = [lv for lv in levels if lv not in AURORA_LEVELS]
    if bad or not levels:
        raise AuroraSweepError(
            f"[data] levels {bad or levels}: Aurora knows only {', '.join(map(str, AURORA_LEVELS))} hPa"
        )
    if len(set(levels)) != len(levels):
        raise AuroraSweepError("[data] levels: a level is listed twice")
    return levels


def lr_range(value: Any) -> tuple[float, float] | None:
    """[search] learning_rate: [low, high], sampled log-uniformly; None when not given."""
    if value is None:
        return None
    if not (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        and 0 < value[0] <= value[1]
    ):
        raise AuroraSweepError("[search] learning_rate: give [low, high] with 0 < low <= high")
    return (float(value[0]), float(value[1]))


def study_objectives(study: dict, target: str) -> tuple[Objective, tuple[str, ...]]:
    """`[study] objective`, or `objectives` = [objective] or [objective, cost]: one of the
    target's (`targets.Target.objectives`), by default its natural one; the objective parsed,
    and every objective's name (Optuna's)."""
    from aurora_sweep.config.targets import TARGETS

    natural = TARGETS[target].objectives
    allowed = (*natural, *(name + INTERIOR for name in natural))
    listed = study.get("objectives")
    if listed is None:
        objective = study.get("objective", allowed[0])
        if objective not in allowed:
            raise AuroraSweepError(
                f"[study] objective {objective!r} is not one of {', '.join(allowed)}, the "
                f"scores of the target {target}"
            )
        return Objective.parse(objective), (objective,)
    if (
        not isinstance(listed, list)
        or not 1 <= len(listed) <= 2
        or listed[0] not in allowed
        or (len(listed) == 2 and listed[1] not in COSTS)
    ):
        raise AuroraSweepError(
            f"[study] objectives {listed!r}: give one of {', '.join(allowed)}, optionally "
            f'followed by one of {", ".join(COSTS)}, e.g. ["{allowed[0]}", "peak_memory_mb"]'
        )
    if "objective" in study and study["objective"] != listed[0]:
        raise AuroraSweepError(
            f"[study] objective {study['objective']!r} and objectives {listed!r} disagree: "
            "keep only objectives"
        )
    return Objective.parse(listed[0]), tuple(listed)


def per_base_table(model: dict, key: str) -> dict:
    """A [model.<key>] table keyed by base name (Aurora 1.5, "v1.5", is one, and the
    baseline model too); an unknown name is refused by name."""
    table = as_table(model.get(key, {}), f"[model.{key}]")
    known = BASE_MODELS
    for name in table:
        if name not in known:
            raise AuroraSweepError(f"[model.{key}] {name}: not a base; {nearest(name, known)}")
    return table


def as_table(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise AuroraSweepError(f"{what} must be a table, not {value!r}")
    return value


def check_space(space: Any) -> None:
    """Refuse [search] choices out of their bounds (the kinds were checked as they were read)."""
    if any(n < 1 for n in (*space.lora_rank, *space.batch_size, *space.accumulate)):
        raise AuroraSweepError(
            "[search] lora_rank, batch_size and accumulate choices must be at least 1"
        )
    if any(n < 0 for n in space.unfrozen_blocks):
        raise AuroraSweepError("[search] unfrozen_blocks choices must be 0 or more")
    if any(w <= 0 for w in space.target_weight):
        raise AuroraSweepError("[search] target_weight choices must be above 0")
    if any(r not in LEADS for r in space.rollout_steps):
        raise AuroraSweepError(
            f"[search] rollout_steps {list(space.rollout_steps)}: choose among 1, 2 and 4 "
            "(6, 12 and 24 hours)"
        )
    if any(f < 0 for f in space.target_input_lr):
        raise AuroraSweepError("[search] target_input_lr choices must be 0 (output-only) or more")
    if any(0 < t < MIN_GRID_POINTS or t < 0 for t in space.tile):
        raise AuroraSweepError(
            f"[search] tile {list(space.tile)}: give 0 (the whole region) or at least "
            f"{MIN_GRID_POINTS} points a side (Aurora's backbone halves the patch grid twice)"
        )
    if any(n < 1 for n in space.blocks):
        raise AuroraSweepError("[search] blocks (for the blocks method) must be 1 or more")


def level_choices(value: Any, study_levels: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """[search] levels: the subsets of [data] levels trials may train on, each in [data] levels'
    order (a list of lists, or one list for a single subset); none given: () ([data] levels)."""
    if value is None:
        return ()
    example = "[search] levels must be lists of pressure levels, such as [[500], [500, 850]]"
    if not isinstance(value, list) or not value:
        raise AuroraSweepError(f"{example}, not {value!r}")
    subsets = value if all(isinstance(v, list) for v in value) else [value]
    out: list[tuple[int, ...]] = []
    for subset in subsets:
        if not isinstance(subset, list) or not subset:
            raise AuroraSweepError(f"{example}, not {value!r}")
        levels = [as_whole(v, "[search] levels") for v in subset]
        outside = [lv for lv in levels if lv not in study_levels]
        if outside:
            raise AuroraSweepError(
                f"[search] levels {subset}: {', '.join(map(str, outside))} hPa not in [data] "
                f"levels {list(study_levels)}; a trial trains on a subset of the store's levels"
            )
        if len(set(levels)) != len(levels):
            raise AuroraSweepError(f"[search] levels {subset}: a level is listed twice")
        ordered = tuple(lv for lv in study_levels if lv in levels)
        if ordered in out:
            raise AuroraSweepError(f"[search] levels: {subset} is listed twice")
        out.append(ordered)
    return tuple(out)


def levels_text(levels: tuple[int, ...]) -> str:
    """A subset of levels as the study records it (an Optuna choice): '500,850'."""
    return ",".join(map(str, levels))


def text_levels(text: str) -> tuple[int, ...]:
    """The levels of `levels_text`'s '500,850'."""
    return tuple(int(v) for v in text.split(","))


def memory_estimate(resources: dict) -> str:
    """[resources] memory_estimate: "auto", "traced" or "fitted" (`memory.estimate_peak`)."""
    how = as_text(resources.get("memory_estimate", "auto"), "[resources] memory_estimate")
    if how not in ("auto", "traced", "fitted"):
        raise AuroraSweepError(
            f'[resources] memory_estimate = {how!r}: use "auto" (trace where a cap is set), '
            '"traced" or "fitted"'
        )
    return how


def checkpointing_choices(value: Any) -> tuple[bool | str, ...]:
    """[search] activation_checkpointing: true, false or "auto" (the least recomputation that
    fits the cap, `memory.plan_checkpointing`), one or a list."""
    value = value if isinstance(value, list) else [value]
    if not value:
        raise AuroraSweepError("[search] activation_checkpointing: give at least one choice")
    for v in value:
        if not isinstance(v, bool) and v != "auto":
            raise AuroraSweepError(
                f'[search] activation_checkpointing: {v!r} is not true, false or "auto"'
            )
    return tuple(value)


def choices(
    value: Any, key: str, kind: type, allowed: tuple = (), section: str = "search"
) -> tuple:
    """A [search] (or other `section`) setting's choices: one value or a list, each of `kind`
    and among `allowed`."""
    where = f"[{section}] {key}"
    if not isinstance(value, list):
        value = [value]
    if not value:
        raise AuroraSweepError(f"{where}: give at least one choice")
    for v in value:
        if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise AuroraSweepError(f"{where}: {v!r} is not an integer")
        if kind is bool and not isinstance(v, bool):
            raise AuroraSweepError(f"{where}: {v!r} is not true or false")
        if kind is str and not isinstance(v, str):
            raise AuroraSweepError(f"{where}: {v!r} is not a string")
        if kind is float and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise AuroraSweepError(f"{where}: {v!r} is not a number")
        if allowed and v not in allowed:
            raise AuroraSweepError(f"{where}: {v!r} is not one of {', '.join(map(str, allowed))}")
    return tuple(float(v) for v in value) if kind is float else tuple(value)


def lora_target_choices(value: Any) -> tuple[str, ...]:
    """[search] lora_targets: modules joined by '+', each among `recipe.LORA_MODULES`, put in
    one order."""
    if not isinstance(value, list) or not value:
        raise AuroraSweepError(
            "[search] lora_targets: give a list such as ['qkv+proj', 'qkv+proj+fc1+fc2']"
        )
    out = []
    for v in value:
        parts = v.split("+") if isinstance(v, str) else v
        if not parts or any(p not in LORA_MODULES for p in parts):
            raise AuroraSweepError(
                f"[search] lora_targets: {v!r} names a module outside {', '.join(LORA_MODULES)};"
                " join several with '+', e.g. 'qkv+proj'"
            )
        out.append("+".join(p for p in LORA_MODULES if p in parts))
    return tuple(out)


def target_name(value: Any, bases: tuple[str, ...], baselines: tuple[str, ...]) -> str:
    """`[model] target`: a variable of `targets.TARGETS`. A base with its own precipitation
    (Aurora 1.5) adapts it, and the Aurora 1.5 baseline forecasts it: both only for a target
    made of it (tp, pr); Aurora 1.5 reads swvl1 as an input besides."""
    from aurora_sweep.config.bases import BASES, reads_v15_inputs
    from aurora_sweep.config.targets import TARGETS

    name = as_text(value, "[model] target")
    if name not in TARGETS:
        raise AuroraSweepError(f"[model] target {name!r}: not a target; {nearest(name, TARGETS)}")
    if TARGETS[name].from_hourly_precipitation:
        return name
    own = [b for b in bases if BASES[b].own_precipitation]
    if own or "aurora-1.5" in baselines:
        use = f"the {own[0]} base" if own else 'the baseline "aurora-1.5"'
        also = ", and reads swvl1 as an input" if name == "swvl1" else ""
        raise AuroraSweepError(
            f"[model] target {name!r}: {use} forecasts Aurora 1.5's own precipitation{also}; "
            "predict tp or pr with it, or leave it out of the study"
        )
    if name == "swvl1" and any(map(reads_v15_inputs, bases)):
        raise AuroraSweepError(
            "[model] target 'swvl1' is one of Aurora 1.5's inputs: predict it with the other bases"
        )
    return name
