"""A trial's recipe, `TrialConfig`: what Optuna samples, MLflow logs and an adapter carries.

A leaf module (dataclasses only): the search space, the scheduler, the memory estimate and the
export read recipes without importing the training code or torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

#: Aurora's fine-tuning guide: 3e-4 for the pretrained weights, 1e-3 for a new variable's
#: embedding and head (the `full` reference recipe uses these, not a sampled rate).
FULL_LR, FULL_NEW_VARIABLE_LR = 3e-4, 1e-3


@dataclass(frozen=True)
class TrialConfig:
    """A trial's whole configuration: sampled by Optuna, logged to MLflow, written on export."""

    lora_rank: int
    lora_targets: str
    unfrozen_blocks: int
    batch_size: int
    precision: str
    learning_rate: float
    activation_checkpointing: bool
    base: str
    levels: tuple[int, ...]
    steps: int
    eval_every: int
    val_samples: int
    weight_decay: float
    seed: int
    #: the fine-tuning recipe (`model.METHODS`); adapters from before methods existed are LoRA
    method: str = "lora"
    #: the new variable's weight in Aurora's loss, and its error ("mae" or "mse")
    target_weight: float = 1.0
    loss: str = "mae"
    #: the learning rate of tp's input embedding over `learning_rate`; 0: tp is output-only
    target_input_lr: float = 1.0
    #: model steps a training sample rolls out (the loss on the last one, `pushforward`)
    rollout_steps: int = 1
    #: whether the shifted windows join the grid's east and west edges: a global grid only
    #: (adapters from before this setting were trained with Aurora's default, True)
    wrap_longitude: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["levels"] = list(self.levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["levels"] = tuple(int(v) for v in d["levels"])
        return cls(**d)
