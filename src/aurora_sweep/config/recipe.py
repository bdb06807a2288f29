"""A trial's recipe, `TrialConfig`: what Optuna samples, MLflow logs and an adapter carries;
and the vocabularies recipes and studies are written in (methods, precisions, bases, objectives,
costs, leads).

A leaf module (dataclasses and constants only): the config, the search space, the scheduler, the
memory estimate and the export read recipes without importing the training code or torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

from aurora_sweep.config.bases import BASES, arch_overrides
from aurora_sweep.errors import AuroraSweepError

#: Aurora's fine-tuning guide: 3e-4 for the pretrained weights, 1e-3 for a new variable's
#: embedding and head (the `full` reference recipe uses these, not a sampled rate).
FULL_LR, FULL_NEW_VARIABLE_LR = 3e-4, 1e-3

#: The fine-tuning methods a study can search, each a complete recipe: LoRA and two of its peft
#: variants (rank-stabilised scaling, weight-decomposed DoRA), each optionally with the last N
#: blocks trained too; `head`: the backbone frozen, only the target's embedding and head and the
#: decoder trained; `blocks`: the last N backbone blocks fully trained, no LoRA; `full`: every
#: parameter trained, Aurora's own fine-tuning recipe (the reference).
LoraMethod = Literal["lora", "rslora", "dora"]
Method = Literal[LoraMethod, "head", "blocks", "full"]
METHODS: tuple[Method, ...] = get_args(Method)
LORA_METHODS: tuple[LoraMethod, ...] = get_args(LoraMethod)
#: Pressure levels (hPa) that Aurora was trained on.
AURORA_LEVELS = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)
#: Linear layers of the Swin backbone that LoRA may target.
LoraModule = Literal["qkv", "proj", "fc1", "fc2"]
LORA_MODULES: tuple[LoraModule, ...] = get_args(LoraModule)
Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
BASE_MODELS = tuple(BASES)  # bases.py says what each is
#: The scores Optuna may minimise, as `<target>_<score>` (`targets.Target.objectives`): RMSE in
#: the target's units, or SEEPS's dimensionless error; see metrics.py.
ObjectiveScore = Literal["seeps", "rmse"]
OBJECTIVE_SCORES: tuple[ObjectiveScore, ...] = get_args(ObjectiveScore)
#: What a skill objective can be traded against in a two-objective study: the trial's measured
#: peak memory (CUDA peak allocated; on a CPU the process's peak resident set), the peak GPU
#: memory predicted before it ran, or its wall time.
Cost = Literal["peak_memory_mb", "predicted_peak_mb", "trial_seconds"]
COSTS: tuple[Cost, ...] = get_args(Cost)
DataSource = Literal["demo", "era5"]
DATA_SOURCES: tuple[DataSource, ...] = get_args(DataSource)
#: The leads every completed trial is scored at, in model steps of 6 h, and their names: the
#: 6-hour scores keep their plain names, the others gain `_12h` or `_24h`.
LEADS = {1: "6h", 2: "12h", 4: "24h"}


def lead_suffix(steps: int) -> str:
    """'' for one model step (6 h), '_12h', '_24h' for the longer leads."""
    return "" if steps == 1 else f"_{LEADS[steps]}"


def parse_lead(text: Any, where: str = "lead") -> int:
    """'6h', '12h', '24h' -> model steps of 6 h."""
    for steps, label in LEADS.items():
        if str(text).strip().lower() == label:
            return steps
    raise AuroraSweepError(
        f"{where} {text!r}: give one of {', '.join(repr(v) for v in LEADS.values())}"
    )


#: The optimisers a trial may train with: AdamW (two fp32 moments per trained value) or torch's
#: Adafactor (factored second moments: a row and a column per matrix, no first moment).
Optimizer = Literal["adamw", "adafactor"]
OPTIMIZERS: tuple[Optimizer, ...] = get_args(Optimizer)
#: The new variable's error in the loss: absolute (Aurora's) or squared.
Loss = Literal["mae", "mse"]
TP_LOSSES: tuple[Loss, ...] = get_args(Loss)
#: The fewest grid points a side of a region may have: Aurora cuts the grid into 4×4 patches and
#: its backbone halves the patch grid twice, which needs at least 2 rows (and columns) of patches
#: before the last halving: 3 patches, 12 points (after cropping to whole patches).
MIN_GRID_POINTS = 12
#: The Aurora modules `configure_activation_checkpointing` wraps by default: every unit, nested
#: (the backbone, its layers and their blocks, the encoder and decoder), the least memory and
#: the most recomputation (each block's forward runs four times in a step).
AURORA_CHECKPOINTING = (
    "Basic3DDecoderLayer", "Basic3DEncoderLayer", "LinearPatchReconstruction",
    "Perceiver3DDecoder", "Perceiver3DEncoder", "Swin3DTransformerBackbone",
    "Swin3DTransformerBlock",
)  # fmt: skip
#: What `activation_checkpointing = "auto"` chooses from, least recomputation first: nothing;
#: every Swin block (its forward runs twice); the blocks, the encoder and the decoder; Aurora's
#: whole set. The first that fits the cap is the trial's.
AUTO_CHECKPOINTING = (
    (),
    ("Swin3DTransformerBlock",),
    ("LinearPatchReconstruction", "Perceiver3DDecoder", "Perceiver3DEncoder",
     "Swin3DTransformerBlock"),
    AURORA_CHECKPOINTING,
)  # fmt: skip


@dataclass(frozen=True)
class BaseKey:
    """Which untouched base model's scores a trial is compared with: `base` run in `precision`
    (on `levels` when a trial trains on a subset of the study's): a trial's forgetting is
    measured against its own base in its own precision on its own levels. `str()` is the key
    those scores are stored under (`demo/fp32`, `demo/fp32/500,700hPa`)."""

    base: str
    precision: Precision
    levels: tuple[int, ...] = ()

    def __str__(self) -> str:
        key = f"{self.base}/{self.precision}"
        return f"{key}/{','.join(map(str, self.levels))}hPa" if self.levels else key


@dataclass(frozen=True)
class TrialConfig:
    """A trial's whole configuration: sampled by Optuna, logged to MLflow, written on export."""

    lora_rank: int
    lora_targets: str
    unfrozen_blocks: int
    batch_size: int
    precision: Precision
    learning_rate: float
    activation_checkpointing: bool | str  # True, False, or "auto" until the trial is planned
    base: str
    levels: tuple[int, ...]
    steps: int
    eval_every: int
    val_samples: int
    weight_decay: float
    seed: int
    #: the fine-tuning recipe (`METHODS`); adapters from before methods existed are LoRA
    method: Method = "lora"
    #: the new variable's weight in Aurora's loss, and its error ("mae" or "mse")
    target_weight: float = 1.0
    loss: Loss = "mae"
    #: the learning rate of the target's input embedding over `learning_rate`; 0: output-only
    target_input_lr: float = 1.0
    #: model steps a training sample rolls out (the loss on the last one, `pushforward`)
    rollout_steps: int = 1
    #: whether the shifted windows join the grid's east and west edges: a global grid only
    #: (adapters from before this setting were trained with Aurora's default, True)
    wrap_longitude: bool = True
    #: constructor overrides of the base (`[model.arch.<base>]`, `bases.arch_overrides`)
    arch: tuple[tuple[str, Any], ...] = ()
    #: micro-batches of `batch_size` whose gradients add up to one optimiser step (the
    #: effective batch is batch_size x accumulate; `steps` counts optimiser steps)
    accumulate: int = 1
    optimizer: Optimizer = "adamw"
    #: points a side of the square each step trains on (`tiles`); 0: the whole region
    tile: int = 0
    #: the Aurora module classes checkpointed when `activation_checkpointing` is on; () is
    #: Aurora's whole set. "auto" (sampled) becomes True or False and a set before the trial runs
    checkpoint_modules: tuple[str, ...] = ()
    #: samples a scoring pass (the pruner's checks, the whole split): the largest the memory cap
    #: allows, chosen before the trial runs (`memory.scoring_peak`); 0: no cap chose it, the
    #: device's default (`verify.scoring.eval_batch_size`)
    eval_batch: int = 0

    @property
    def checkpointed(self) -> tuple[str, ...]:
        """The module classes this trial checkpoints (none without checkpointing)."""
        if self.activation_checkpointing is not True:
            return ()
        return self.checkpoint_modules or AURORA_CHECKPOINTING

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["levels"] = list(self.levels)
        d["arch"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.arch}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["levels"] = tuple(int(v) for v in d["levels"])
        d["arch"] = arch_overrides(d.get("arch") or {})
        d["checkpoint_modules"] = tuple(d.get("checkpoint_modules") or ())
        return cls(**d)
