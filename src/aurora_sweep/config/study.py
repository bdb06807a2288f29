"""Study configuration: frozen dataclasses, one per section of a study's TOML file.

A study config says what data to use (demo or ERA5, region, levels, period, splits), which base
model to adapt, how long each trial trains, and what the search may vary. Every check happens
when the file is read (`study_file.load_config`); the rest of the package trusts these
dataclasses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aurora_sweep.config.objective import Objective
from aurora_sweep.config.settings import (
    Period,
    Region,
    storage_url,
    tracking_url,
)
from aurora_sweep.config.targets import DEFAULT as DEFAULT_TARGET

MIB = 2**20  # bytes in a MiB: memory is reported in MB of 2**20 bytes
#: `[study] baselines`: persistence and climatology (always scored), Aurora 1.5 untrained.
BASELINES = ("persistence", "climatology", "aurora-1.5")


PACKAGE_DIR = Path(__file__).parents[1]
DEMO_CONFIG = PACKAGE_DIR / "sweeps" / "demo.toml"


@dataclass(frozen=True)
class DataConfig:
    """Where samples come from."""

    source: str
    store: Path
    region: Region
    levels: tuple[int, ...]
    grid: float
    period: Period
    train: Period
    validation: Period
    test: Period
    #: whether the store holds Aurora 1.5's inputs too (a study that uses it)
    v15_inputs: bool = False
    target: str = DEFAULT_TARGET  #: what the study predicts ([model] target, `targets`)

    @property
    def wrap_longitude(self) -> bool:
        """Whether Aurora's shifted windows should join the grid's east and west edges: only on
        a grid all the way round the globe, which a region (at most 180° wide) never is."""
        return False


@dataclass(frozen=True)
class ModelConfig:
    """The base model that trials adapt (`[search] base` may name several, `bases.BASES`)."""

    base: str = "small-pretrained"
    #: the checkpoint of `base`; other bases' in `checkpoints` (None: the packaged demo or the
    #: pinned file in the Hugging Face cache)
    checkpoint: Path | None = None
    checkpoints: dict[str, Path] = field(default_factory=dict)
    #: constructor overrides per base (`[model.arch.<base>]`), as `bases.arch_overrides` keeps them
    arch: dict[str, tuple] = field(default_factory=dict)
    #: Aurora 1.5's static fields (`aurora15.STATIC_FILE`; None: the pinned file on the hub)
    v15_static: Path | None = None

    def checkpoint_for(self, base: str) -> Path | None:
        """The checkpoint file the study gives for `base`, if any."""
        return self.checkpoints.get(base) or (self.checkpoint if base == self.base else None)

    def arch_for(self, base: str) -> tuple:
        return self.arch.get(base, ())


@dataclass(frozen=True)
class TrainConfig:
    """Fixed settings of every trial's fine-tune."""

    steps: int = 200
    eval_every: int = 50  # when not given: a quarter of `steps` (at least 1)
    val_samples: int = 64  # the pruner's fixed validation subset
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class SearchSpace:
    """What Optuna may vary; a single-element list fixes a dimension. A parameter that a method
    does not use is not sampled for it (LoRA rank and targets for `head`, say). The defaults
    here are the defaults of a study file's [search]."""

    method: tuple[str, ...] = ("lora",)
    blocks: tuple[int, ...] = (2,)  # how many last backbone blocks the `blocks` method trains
    lora_rank: tuple[int, ...] = (8,)
    lora_targets: tuple[str, ...] = ("qkv+proj",)
    unfrozen_blocks: tuple[int, ...] = (0,)
    batch_size: tuple[int, ...] = (1,)
    precision: tuple[str, ...] = ("bf16",)
    learning_rate: tuple[float, float] | None = None  # None: [train] learning_rate, fixed
    #: true, false or "auto" (the least recomputation that fits the cap, `memory`)
    activation_checkpointing: tuple[bool | str, ...] = (False,)
    #: the new variable's weight in Aurora's loss (`loss.py`), and its error
    target_weight: tuple[float, ...] = (1.0,)
    loss: tuple[str, ...] = ("mae",)
    #: the learning rate of the new variable's input embedding, over the trial's rate: how much
    #: the target may write into Aurora's latent state (0: output-only)
    target_input_lr: tuple[float, ...] = (0.1,)
    #: model steps a training sample rolls out (the loss on the last, gradients through it)
    rollout_steps: tuple[int, ...] = (1,)
    #: the bases trials adapt; empty: [model] base alone
    base: tuple[str, ...] = ()
    #: micro-batches per optimiser step (gradient accumulation), and the optimiser
    accumulate: tuple[int, ...] = (1,)
    optimizer: tuple[str, ...] = ("adamw",)
    #: points a side of the random square each training step takes (0: the whole region)
    tile: tuple[int, ...] = (0,)
    #: the subsets of [data] levels trials train on (`settings.level_choices`); empty: [data]
    #: levels alone
    levels: tuple[tuple[int, ...], ...] = ()


def default_of(cls: type, name: str) -> Any:
    """The default of a config dataclass's field: each setting's default is declared once."""
    return cls.__dataclass_fields__[name].default


@dataclass(frozen=True)
class StudyConfig:
    """Everything a study needs, loaded from one TOML file."""

    name: str
    path: Path
    objective: Objective  # at 6 h; the study's lead is `lead_steps`
    storage: str
    tracking_uri: str | None
    gpu_memory_cap: int | None
    sampler_seed: int
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    search: SearchSpace
    workdir: Path = field(default_factory=Path.cwd)
    #: How often a running trial tells a database storage it is alive; a trial silent for
    #: three times as long (its process or machine died) is failed and retried.
    heartbeat_seconds: int = 60
    #: Start a new study with the reference recipes (Aurora's full fine-tune, plain LoRA).
    reference: bool = True
    #: What Optuna minimises: the objective alone, or the objective and a cost from COSTS (a
    #: multi-objective study whose answer is a Pareto front).
    objectives: tuple[str, ...] = ()
    #: A completed trial whose worst forgetting ratio (RMSE of a variable Aurora already
    #: predicted, over the untouched base model's) exceeds this is infeasible: a recipe that
    #: breaks the model it adapts is never the study's answer.
    max_forgetting: float = 1.10
    #: `run` stops after this many failed trials in a row (a study that cannot succeed).
    max_failures: int = 5
    #: After the search, the best distinct feasible recipes trained again (`sweep.finalists`),
    #: each with this many seeds in all; either at 1: none.
    finalists: int = 3
    seeds: int = 3
    #: The lead the objective is scored at, in model steps of 6 h (1: 6 h, 2: 12 h, 4: 24 h).
    lead_steps: int = 1
    #: Degrees in from each side of the box left out of the interior scores (`_interior`): a
    #: regional model receives nothing through its edges, so its skill decays inward from them
    #: with lead time (about 4° a 6-hour step, `training-and-verification` review); 0: none.
    edge_margin: float = 5.0
    #: A completed trial is scored in blocks of days; after each, one that cannot beat the best
    #: feasible trial on the same days by a one-sided Wilcoxon test at this p-value stops there,
    #: pruned with a partial score (`verify.early_stop`); 0: every trial scored whole.
    scoring_pruner: float = 0.1
    #: Seconds between two samples of the machine's CPU, memory (and GPU) use that MLflow's own
    #: monitor logs into each trial's run (`system/...`); 0: none.
    system_metrics: float = 5.0
    #: How a trial's peak is predicted (`memory.estimate_peak`): "traced" runs its step on
    #: fake tensors, "fitted" adds up coefficients; "auto" traces where a cap decides what runs.
    memory_estimate: str = "auto"
    #: What every trial's target is compared with (`BASELINES`)
    baselines: tuple[str, ...] = ("persistence", "climatology")

    def __post_init__(self) -> None:
        if not self.objectives:
            object.__setattr__(self, "objectives", (self.objective.name,))

    @property
    def objective_metric(self) -> str:
        """The metric Optuna minimises: the objective at the study's lead (`tp_seeps_24h`)."""
        return self.objective.at(self.lead_steps).name

    @property
    def cost(self) -> str | None:
        """The cost objective of a two-objective study, None for a single objective."""
        return self.objectives[1] if len(self.objectives) > 1 else None

    @property
    def estimate_how(self) -> str:
        """`memory.estimate_peak`'s `how` for this study's trials."""
        if self.memory_estimate == "auto":
            return "traced" if self.gpu_memory_cap else "fitted"
        return self.memory_estimate

    @property
    def bases(self) -> tuple[str, ...]:
        """The bases trials adapt: `[search] base`, or `[model] base` alone."""
        return self.search.base or (self.model.base,)

    @property
    def level_choices(self) -> tuple[tuple[int, ...], ...]:
        """The pressure levels trials may train on: `[search] levels`, or [data] levels."""
        return self.search.levels or (self.data.levels,)


def with_overrides(config: StudyConfig, **changes: Any) -> StudyConfig:
    """A copy of `config` with top-level fields replaced (CLI flags)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    if "storage" in changes:
        changes["storage"] = storage_url(changes["storage"], config.workdir)
    if "tracking_uri" in changes:
        changes["tracking_uri"] = tracking_url(changes["tracking_uri"], config.workdir)
    return dataclasses.replace(config, **changes)
