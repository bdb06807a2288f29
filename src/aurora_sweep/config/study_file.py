"""Reading a study's TOML file: every section and setting checked once (`settings`), anything
unknown refused by name, into the frozen `study.StudyConfig`."""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from aurora_sweep.config.bases import arch_overrides, reads_v15_inputs
from aurora_sweep.config.recipe import (
    BASE_MODELS,
    DATA_SOURCES,
    LEADS,
    METHODS,
    OPTIMIZERS,
    PRECISIONS,
    TP_LOSSES,
    parse_lead,
)
from aurora_sweep.config.settings import (
    Region,
    as_bool,
    as_number,
    as_period,
    as_table,
    as_text,
    as_whole,
    check_region,
    check_space,
    checkpointing_choices,
    choices,
    data_levels,
    level_choices,
    lora_target_choices,
    lr_range,
    memory_estimate,
    nearest,
    parse_memory,
    per_base_table,
    storage_url,
    study_objectives,
    target_name,
    tracking_url,
)
from aurora_sweep.config.study import (
    BASELINES,
    DEMO_CONFIG,
    DataConfig,
    ModelConfig,
    SearchSpace,
    StudyConfig,
    TrainConfig,
    default_of,
)
from aurora_sweep.config.targets import DEFAULT as DEFAULT_TARGET
from aurora_sweep.errors import AuroraSweepError


def _given(table: dict, key: str) -> Any:
    """A [search] setting as the file gives it, SearchSpace's default when it does not."""
    return table.get(key, list(default_of(SearchSpace, key)))


def _choices(table: dict, key: str, kind: type, allowed: tuple = ()) -> tuple:
    """A [search] list of choices (`settings.choices`)."""
    return choices(_given(table, key), key, kind, allowed)


def load_config(path: str | Path | None = None, *, workdir: Path | None = None) -> StudyConfig:
    """Read and check a study config; `None` gives the embedded demo study.

    Relative paths in the file (data store, checkpoint, storage) are taken relative to `workdir`
    (default: the current directory), so that a study run from the project root keeps its state
    there.
    """
    path = Path(path) if path is not None else DEMO_CONFIG
    workdir = (workdir or Path.cwd()).resolve()
    if not path.is_file():
        raise AuroraSweepError(f"no study config at {path}: pass --config sweep/<study>.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise AuroraSweepError(f"{path} is not valid TOML: {e}") from None
    try:
        check_keys(raw)
        return _build(raw, path, workdir)
    except AuroraSweepError as e:
        raise AuroraSweepError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise AuroraSweepError(f"{path}: missing or malformed setting ({e})") from None


#: Every section and setting a study file may hold; anything else is refused by name.
SCHEMA: dict[str, tuple[str, ...]] = {
    "study": ("name", "objective", "objectives", "storage", "tracking_uri", "heartbeat_seconds",
              "seed", "reference", "max_forgetting", "max_failures", "lead", "baselines",
              "finalists", "seeds", "edge_margin", "scoring_pruner", "system_metrics"),
    "data": ("source", "store", "region", "levels", "grid", "period", "train", "validation",
             "test"),
    "model": (*(f.name for f in fields(ModelConfig)), "target"),
    "train": tuple(f.name for f in fields(TrainConfig)),
    "search": tuple(f.name for f in fields(SearchSpace)),
    "resources": ("gpu_memory_cap", "memory_estimate"),
}  # fmt: skip
REGION_KEYS = ("north", "south", "west", "east")


def check_keys(raw: dict) -> None:
    """Refuse unknown sections and settings, naming the nearest valid one: a typo such as
    `[train] step = 500` would otherwise leave the default in force without a word."""
    for section, table in raw.items():
        if section not in SCHEMA:
            close = difflib.get_close_matches(section, list(SCHEMA), n=1, cutoff=0.6)
            hint = f"did you mean [{close[0]}]?" if close else f"known: {', '.join(SCHEMA)}"
            raise AuroraSweepError(f"unknown section [{section}]; {hint}")
        if not isinstance(table, dict):
            raise AuroraSweepError(f"[{section}] must be a table of settings, not {table!r}")
        for key in table:
            if key not in SCHEMA[section]:
                raise AuroraSweepError(
                    f"[{section}] {key}: unknown setting; {nearest(key, SCHEMA[section])}"
                )
    if "data" not in raw:
        raise AuroraSweepError(
            "[data] is missing: every study names its data (see sweep/demo.toml)"
        )
    region = raw["data"].get("region")
    if not isinstance(region, dict):
        raise AuroraSweepError(
            "[data] region: give region = { north = 72.0, south = 35.0, west = -12.0, east = 40.0 }"
        )
    for key in region:
        if key not in REGION_KEYS:
            raise AuroraSweepError(
                f"[data.region] {key}: unknown setting; {nearest(key, REGION_KEYS)}"
            )
    missing = [k for k in REGION_KEYS if k not in region]
    if missing:
        raise AuroraSweepError(f"[data.region] lacks {', '.join(missing)}")
    for key in REGION_KEYS:
        as_number(region[key], f"[data.region] {key}")


def _build(raw: dict, path: Path, workdir: Path) -> StudyConfig:
    study, resources = raw.get("study", {}), raw.get("resources", {})
    name = as_text(study["name"], "[study] name") if "name" in study else path.stem
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise AuroraSweepError(f"[study] name {name!r}: use letters, digits, '.', '_' and '-'")
    for key in ("storage", "tracking_uri"):
        if key in study:
            as_text(study[key], f"[study] {key}")
    cap = resources.get("gpu_memory_cap")
    model, search = (
        _model_config(raw.get("model", {}), workdir),
        _search_space(raw.get("search", {})),
    )
    if search.base and model.base not in search.base:
        raise AuroraSweepError(
            f"[search] base {list(search.base)} leaves out [model] base {model.base!r}, whose "
            "recipes the study's references run and whose file [model] checkpoint names: add it "
            "to [search] base, or set [model] base to one of them"
        )
    settings = _study_settings(study)
    data = _data_config(raw["data"], name, workdir)
    uses_v15 = any(map(reads_v15_inputs, search.base or (model.base,)))
    target = target_name(
        raw.get("model", {}).get("target", DEFAULT_TARGET),
        search.base or (model.base,),
        settings["baselines"],
    )
    v15_inputs = uses_v15 or "aurora-1.5" in settings["baselines"]
    data = dataclasses.replace(data, v15_inputs=v15_inputs, target=target)
    objective, objectives = study_objectives(study, target)
    if objective.interior and not settings["edge_margin"]:
        raise AuroraSweepError(
            f"[study] objective {objective.name!r} scores the box's interior, but [study] "
            "edge_margin = 0 leaves no edge zone out: give edge_margin in degrees (e.g. 5), or "
            f"the objective {objective.on(False).name!r}"
        )
    search = dataclasses.replace(
        search, levels=level_choices(raw.get("search", {}).get("levels"), data.levels)
    )
    return StudyConfig(
        name=name,
        path=path.resolve(),
        objective=objective,
        objectives=objectives,
        storage=storage_url(study.get("storage") or f"sqlite:///{name}.optuna.db", workdir),
        tracking_uri=tracking_url(study.get("tracking_uri"), workdir),
        gpu_memory_cap=parse_memory(cap) if cap is not None else None,
        memory_estimate=memory_estimate(resources),
        sampler_seed=as_whole(study.get("seed", 0), "[study] seed"),
        data=data,
        model=model,
        train=_train_config(raw.get("train", {})),
        search=search,
        workdir=workdir,
        **settings,
    )


def as_p_value(value: Any, what: str) -> float:
    """A p-value threshold from TOML: 0 (off) up to 1."""
    p = as_number(value, what, minimum=0.0)
    if p >= 1:
        raise AuroraSweepError(f"{what} is a p-value: give one below 1 (0.1 is usual; 0: off)")
    return p


def _study_settings(study: dict) -> dict[str, Any]:
    """[study]'s settings with a default in StudyConfig."""

    def given(key: str) -> Any:
        return study.get(key, default_of(StudyConfig, key))

    return dict(
        reference=as_bool(given("reference"), "[study] reference"),
        heartbeat_seconds=as_whole(
            given("heartbeat_seconds"), "[study] heartbeat_seconds", minimum=1
        ),
        max_forgetting=as_number(given("max_forgetting"), "[study] max_forgetting", minimum=1.0),
        max_failures=as_whole(given("max_failures"), "[study] max_failures", minimum=1),
        finalists=as_whole(given("finalists"), "[study] finalists", minimum=1),
        seeds=as_whole(given("seeds"), "[study] seeds", minimum=1),
        edge_margin=as_number(given("edge_margin"), "[study] edge_margin", minimum=0.0),
        scoring_pruner=as_p_value(given("scoring_pruner"), "[study] scoring_pruner"),
        system_metrics=as_number(given("system_metrics"), "[study] system_metrics", minimum=0.0),
        lead_steps=parse_lead(
            study.get("lead", LEADS[default_of(StudyConfig, "lead_steps")]), "[study] lead"
        ),
        baselines=choices(
            study.get("baselines", list(default_of(StudyConfig, "baselines"))),
            "baselines",
            str,
            BASELINES,
            "study",
        ),
    )


#: the splits' default periods: train on the two years after Aurora's pretraining, then one each
DEFAULT_SPLITS = {
    "train": ["2022-01-01", "2023-12-31"],
    "validation": ["2024-01-01", "2024-12-31"],
    "test": ["2025-01-01", "2025-12-31"],
}


def _data_config(data: dict, name: str, workdir: Path) -> DataConfig:
    source = data.get("source", "era5")
    if source not in DATA_SOURCES:
        raise AuroraSweepError(f"[data] source {source!r} is not one of {', '.join(DATA_SOURCES)}")
    r = data["region"]
    region = Region(float(r["north"]), float(r["south"]), float(r["west"]), float(r["east"]))
    check_region(region)
    grid = as_number(data.get("grid", 0.25), "[data] grid")
    if grid <= 0:
        raise AuroraSweepError(f"[data] grid {grid}: give the grid spacing in degrees, e.g. 0.25")
    splits = {k: as_period(data.get(k, d), f"[data] {k}") for k, d in DEFAULT_SPLITS.items()}
    ordered = sorted(splits.items(), key=lambda kv: kv[1].start)
    for (a, pa), (b, pb) in zip(ordered, ordered[1:]):
        if pb.start <= pa.end:
            raise AuroraSweepError(f"[data] the {a} and {b} periods overlap")
    period = as_period(
        data.get("period", [str(ordered[0][1].start), str(ordered[-1][1].end)]), "[data] period"
    )
    for k, p in splits.items():
        if p.start < period.start or p.end > period.end:
            raise AuroraSweepError(f"[data] the {k} period lies outside [data] period")
    store = workdir / as_text(data.get("store", f"data/{name}/store.zarr"), "[data] store")
    return DataConfig(
        source=source,
        store=store,
        region=region,
        levels=data_levels(data),
        grid=grid,
        period=period,
        train=splits["train"],
        validation=splits["validation"],
        test=splits["test"],
    )


def _model_config(model: dict, workdir: Path) -> ModelConfig:
    base = model.get("base", default_of(ModelConfig, "base"))
    if base not in BASE_MODELS:
        raise AuroraSweepError(f"[model] base {base!r} is not one of {', '.join(BASE_MODELS)}")
    checkpoint = model.get("checkpoint")
    if checkpoint is not None:
        as_text(checkpoint, "[model] checkpoint")
    return ModelConfig(
        base=base,
        checkpoint=(workdir / checkpoint) if checkpoint else None,
        checkpoints={
            k: workdir / as_text(v, f"[model.checkpoints] {k}")
            for k, v in per_base_table(model, "checkpoints").items()
        },
        arch={
            k: arch_overrides(as_table(v, f"[model.arch.{k}]"))
            for k, v in per_base_table(model, "arch").items()
        },
        v15_static=workdir / as_text(model["v15_static"], "[model] v15_static")
        if "v15_static" in model
        else None,
    )


def _train_config(train: dict) -> TrainConfig:
    def given(key: str) -> Any:
        return train.get(key, default_of(TrainConfig, key))

    steps = as_whole(given("steps"), "[train] steps", minimum=1)
    return TrainConfig(
        steps=steps,
        eval_every=as_whole(
            train.get("eval_every", max(1, steps // 4)), "[train] eval_every", minimum=1
        ),
        val_samples=as_whole(given("val_samples"), "[train] val_samples", minimum=1),
        learning_rate=as_number(
            given("learning_rate"), "[train] learning_rate", minimum=0, above=True
        ),
        weight_decay=as_number(given("weight_decay"), "[train] weight_decay", minimum=0),
        seed=as_whole(given("seed"), "[train] seed"),
    )


def _search_space(search: dict) -> SearchSpace:
    space = SearchSpace(
        method=_choices(search, "method", str, METHODS),
        blocks=_choices(search, "blocks", int),
        lora_rank=_choices(search, "lora_rank", int),
        lora_targets=lora_target_choices(_given(search, "lora_targets")),
        unfrozen_blocks=_choices(search, "unfrozen_blocks", int),
        batch_size=_choices(search, "batch_size", int),
        precision=_choices(search, "precision", str, PRECISIONS),
        learning_rate=lr_range(search.get("learning_rate")),
        activation_checkpointing=checkpointing_choices(_given(search, "activation_checkpointing")),
        target_weight=_choices(search, "target_weight", float),
        loss=_choices(search, "loss", str, TP_LOSSES),
        target_input_lr=_choices(search, "target_input_lr", float),
        rollout_steps=_choices(search, "rollout_steps", int),
        base=_choices(search, "base", str, BASE_MODELS) if "base" in search else (),
        accumulate=_choices(search, "accumulate", int),
        optimizer=_choices(search, "optimizer", str, OPTIMIZERS),
        tile=_choices(search, "tile", int),
    )
    check_space(space)
    return space
