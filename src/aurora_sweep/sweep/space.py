"""The search space: what a trial samples, and the reference recipes a new study starts with.

The space is conditional on the method (no LoRA rank for `head`, `blocks` or `full`). A new study
first runs Aurora's own full fine-tune and plain LoRA at its defaults, so that the best trial can
say how far it beats them.
"""

from __future__ import annotations

import warnings
from typing import Any

import optuna

from aurora_sweep.config.recipe import FULL_LR, FULL_NEW_VARIABLE_LR, LORA_METHODS, TrialConfig
from aurora_sweep.config.settings import (
    check_region_size,
    interior_window,
    levels_text,
    region_shape,
    text_levels,
)
from aurora_sweep.config.study import StudyConfig
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.sweep.records import TrialRecord, attrs


def sample_trial(trial: optuna.Trial, config: StudyConfig) -> TrialConfig:
    """Draw one trial's configuration from the study's search space.

    The space is conditional: the method comes first, and a parameter the method does not use
    is not sampled for it (no LoRA rank for `head`, `blocks` or `full`). `full` is Aurora's own
    recipe, whole: bf16 backbone autocast, activation checkpointing, its learning rates.
    """
    s = config.search
    record = TrialRecord.of(trial)
    if record.replica_of is not None and record.config:  # a finalist's recipe, another seed
        return TrialConfig.from_dict(record.config)
    if record.reference == "full":  # Aurora's own recipe, as it is, whatever the space holds
        return reference_trial(config)
    base = _maybe(trial, "base", config.bases)
    chosen = _method(trial, s)  # method first: the rest of the space is conditional on it
    chosen |= dict(
        batch_size=trial.suggest_categorical("batch_size", list(s.batch_size)),
        target_weight=trial.suggest_categorical("target_weight", list(s.target_weight)),
        loss=trial.suggest_categorical("loss", list(s.loss)),
        target_input_lr=trial.suggest_categorical("target_input_lr", list(s.target_input_lr)),
        rollout_steps=trial.suggest_categorical("rollout_steps", list(s.rollout_steps)),
        # the levers added later are sampled only when searched, so that a study that does not
        # search them draws the same trials as before
        accumulate=_maybe(trial, "accumulate", s.accumulate),
        optimizer=_maybe(trial, "optimizer", s.optimizer),
    )
    # a rollout trains on the whole region: a tile cannot know what its steps carry in (`tiles`)
    chosen["tile"] = _maybe(trial, "tile", s.tile) if chosen["rollout_steps"] == 1 else 0
    chosen["levels"] = _levels(trial, config)
    return _trial_config(config, base=base, **chosen, **_step(trial, config, chosen["method"]))


def _method(trial: optuna.Trial, s) -> dict[str, Any]:
    """The method, and what it trains: LoRA's rank, modules and unfrozen blocks, or the blocks
    the `blocks` method trains."""
    method = trial.suggest_categorical("method", list(s.method))
    lora = method in LORA_METHODS
    rank = trial.suggest_categorical("lora_rank", list(s.lora_rank)) if lora else 0
    targets = trial.suggest_categorical("lora_targets", list(s.lora_targets)) if lora else ""
    if lora:
        unfrozen = trial.suggest_categorical("unfrozen_blocks", list(s.unfrozen_blocks))
    elif method == "blocks":
        unfrozen = trial.suggest_categorical("blocks", list(s.blocks))
    else:
        unfrozen = 0
    return dict(method=method, lora_rank=rank, lora_targets=targets, unfrozen_blocks=unfrozen)


def _step(trial: optuna.Trial, config: StudyConfig, method: str) -> dict[str, Any]:
    """Precision, activation checkpointing and learning rate: Aurora's own for `full`."""
    s = config.search
    if method == "full":
        precision, checkpointing, lr = _full_precision(config), True, FULL_LR
    else:
        precision = trial.suggest_categorical("precision", list(s.precision))
        checkpointing = trial.suggest_categorical(
            "activation_checkpointing", list(s.activation_checkpointing)
        )
        lr = (
            trial.suggest_float("learning_rate", *s.learning_rate, log=True)
            if s.learning_rate
            else config.train.learning_rate
        )
    return dict(precision=precision, activation_checkpointing=checkpointing, learning_rate=lr)


def _maybe(trial: optuna.Trial, name: str, choices: tuple) -> Any:
    """The choice for `name`: sampled when there are several, else the only one."""
    return trial.suggest_categorical(name, list(choices)) if len(choices) > 1 else choices[0]


def _levels(trial: optuna.Trial, config: StudyConfig) -> tuple[int, ...]:
    """The pressure levels a trial trains on: sampled from `[search] levels` when it offers
    several (as '500,850': Optuna's choices are numbers or strings), else the only choice."""
    choices = config.level_choices
    if len(choices) == 1:
        return choices[0]
    return text_levels(trial.suggest_categorical("levels", [levels_text(c) for c in choices]))


def widest_levels(config: StudyConfig) -> tuple[int, ...]:
    """The searched subset with the most levels (the first of the widest): the references'."""
    return max(config.level_choices, key=len)


def _trial_config(config: StudyConfig, **recipe: Any) -> TrialConfig:
    """A trial's config: the sampled `recipe` (its base: [model] base unless sampled; its
    levels: the widest searched unless sampled) and what the study fixes for every trial."""
    base = recipe.pop("base", config.model.base)
    levels = recipe.pop("levels", None) or widest_levels(config)
    return TrialConfig(
        **recipe,
        base=base,
        arch=config.model.arch_for(base),
        levels=levels,
        steps=config.train.steps,
        eval_every=config.train.eval_every,
        val_samples=config.train.val_samples,
        weight_decay=config.train.weight_decay,
        seed=config.train.seed,
        wrap_longitude=config.data.wrap_longitude,
    )


def _reference_loss(config: StudyConfig) -> dict[str, Any]:
    """The new variable's loss in the reference recipes: Aurora's (absolute error) at weight 1
    when the space has them, else the space's first choices."""
    s = config.search
    return {
        "target_weight": 1.0 if 1.0 in s.target_weight else s.target_weight[0],
        "loss": "mae" if "mae" in s.loss else s.loss[0],
    }


def _full_precision(config: StudyConfig) -> str:
    """bf16, as Aurora's recipe has it, when the study allows it (on a CPU, bf16 is emulated and
    the demo searches fp32 only)."""
    return "bf16" if "bf16" in config.search.precision else config.search.precision[0]


def reference_trial(config: StudyConfig) -> TrialConfig:
    """Aurora's fine-tuning recipe: every weight trained, bf16 backbone autocast, activation
    checkpointing, 3e-4 (1e-3 for the target's embedding and head), the smallest batch of the study."""
    return _trial_config(
        config,
        method="full",
        lora_rank=0,
        lora_targets="",
        unfrozen_blocks=0,
        batch_size=min(config.search.batch_size),
        precision=_full_precision(config),
        learning_rate=FULL_LR,
        activation_checkpointing=True,
        **_reference_loss(config),
        target_input_lr=FULL_NEW_VARIABLE_LR / FULL_LR,  # the guide's 1e-3 for the embedding
        rollout_steps=min(config.search.rollout_steps),
    )


def enqueue_references(study: optuna.Study, config: StudyConfig) -> list[str]:
    """A new study starts with the reference recipes, so that it can say how far its best trial
    beats them: Aurora's full fine-tune and, when the space has LoRA, plain LoRA at defaults;
    then, where it searches several bases, one trial of each base the references do not run
    (its other settings sampled), so that every base is tried before the sampler picks."""
    if study.get_trials(deepcopy=False):
        return []
    added = _enqueue_reference_recipes(study, config) if config.reference else []
    for base in config.bases if len(config.bases) > 1 else ():
        if not (config.reference and base == config.model.base):
            study.enqueue_trial({"base": base})
            added.append(base)
    return added


def _enqueue_reference_recipes(study: optuna.Study, config: StudyConfig) -> list[str]:
    study.enqueue_trial({}, user_attrs=attrs(reference="full"))
    added = ["full"]
    s = config.search
    if "lora" in s.method:
        nearest = min(s.lora_rank, key=lambda r: abs(r - 8))
        params = {
            "method": "lora",
            "lora_rank": nearest,
            "lora_targets": "qkv+proj" if "qkv+proj" in s.lora_targets else s.lora_targets[0],
            "unfrozen_blocks": min(s.unfrozen_blocks),
            "batch_size": min(s.batch_size),
            "precision": s.precision[0],
            "activation_checkpointing": s.activation_checkpointing[0],
            **_reference_loss(config),
            "target_input_lr": s.target_input_lr[0],
            "rollout_steps": min(s.rollout_steps),
        }
        if len(config.bases) > 1:  # the references run on [model] base
            params["base"] = config.model.base
        if len(config.level_choices) > 1:  # Aurora's own use: every level of the search
            params["levels"] = levels_text(widest_levels(config))
        if s.learning_rate:  # the study's learning rate, brought inside the searched range
            low, high = s.learning_rate
            params["learning_rate"] = min(max(config.train.learning_rate, low), high)
        study.enqueue_trial(params, user_attrs=attrs(reference="lora"))
        added.append("lora")
    return added


def check_search(config: StudyConfig) -> None:
    """Refuse, before anything is recorded, a search the base model cannot run."""
    from aurora_sweep.data.samples import patch_crop
    from aurora_sweep.memory.meta_model import meta_base
    from aurora_sweep.model.build import backbone_blocks

    check_region_size(config.data.region, config.data.grid)
    grid = config.data.grid
    interior_window(patch_crop(*region_shape(config.data.region, grid)), grid, config.edge_margin)
    check_tiles(config)
    s = config.search
    asks = []
    if set(s.method) & set(LORA_METHODS):
        asks.append(("unfrozen_blocks", max(s.unfrozen_blocks)))
    if "blocks" in s.method:
        asks.append(("blocks", max(s.blocks)))
    for base in config.bases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the base the memory estimate copies for every trial, built once for both
            model = meta_base(base, config.model.arch_for(base))
        depth = len(backbone_blocks(model))
        for key, n in asks:
            if n > depth:
                raise AuroraSweepError(
                    f"[search] {key} asks for {n} blocks but the {base} base model's "
                    f"backbone has {depth}: choose at most {depth}"
                )


def check_tiles(config: StudyConfig) -> None:
    """Refuse a tile that is the whole box or more, and tiles that no trial could train on (a
    trial with rollouts trains on the whole region, `tiles`)."""
    rows, cols = region_shape(config.data.region, config.data.grid)
    tiles, rollouts = config.search.tile, config.search.rollout_steps
    for tile in tiles:
        if tile >= rows and tile >= cols:
            raise AuroraSweepError(
                f"[search] tile {tile}: the box is {rows}x{cols} points, so the tile is all of "
                "it; give 0 for the whole region, or a tile smaller than the box"
            )
    if 0 not in tiles and 1 not in rollouts:
        raise AuroraSweepError(
            f"[search] tile {list(tiles)} with rollout_steps {list(rollouts)}: a rollout trains "
            "on the whole region (a tile cannot know what its steps carry in from outside it); "
            "add 0 to [search] tile or 1 to [search] rollout_steps"
        )
