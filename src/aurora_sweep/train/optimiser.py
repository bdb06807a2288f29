"""A trial's optimiser: AdamW or Adafactor over what it trains, with steps of the same size at
the same learning rate, the new variable's learning rates, and the schedule (warm-up, then a
cosine decay)."""

from __future__ import annotations

import numpy as np
import torch

from aurora_sweep.config.bases import BASES
from aurora_sweep.config.recipe import FULL_NEW_VARIABLE_LR, TrialConfig
from aurora_sweep.model.build import TrainableParts, input_embedding

#: Learning-rate multiplier for the new variable's head.
NEW_VARIABLE_LR_FACTOR = 5.0
#: The learning-rate schedule: a linear warm-up over this share of the steps (at least one),
#: then a cosine decay to `FINAL_LR_FACTOR` of the peak at the last step.
WARMUP_SHARE, FINAL_LR_FACTOR = 0.1, 0.1


def learning_rate_factor(step: int, steps: int) -> float:
    """The share of the peak learning rate at `step` (1-based) of `steps`: a linear warm-up over
    the first `WARMUP_SHARE` of the steps, then a cosine decay to `FINAL_LR_FACTOR` at the last.

    A constant rate lets fast starters win the pruner's early comparisons; Aurora's fine-tuning
    guide samples a constant rate, so warm-up and decay are our choice (a common one).
    """
    warmup = max(1, round(WARMUP_SHARE * steps))
    if step <= warmup:
        return step / warmup
    if steps <= warmup:
        return 1.0
    progress = (step - warmup) / (steps - warmup)
    return FINAL_LR_FACTOR + (1 - FINAL_LR_FACTOR) * 0.5 * (1 + np.cos(np.pi * progress))


def input_lr(trial: TrialConfig) -> float:
    """The learning rate of the target's input embedding: `target_input_lr` times the trial's rate."""
    return trial.learning_rate * trial.target_input_lr


def new_variable_lr(trial: TrialConfig) -> float:
    """The target's embedding and head start from zero and must learn the most: a larger step. A base's
    own precipitation head (Aurora 1.5's) is pretrained: the trial's rate."""
    if BASES[trial.base].own_precipitation:
        return trial.learning_rate
    if trial.method == "full":
        return FULL_NEW_VARIABLE_LR
    return trial.learning_rate * NEW_VARIABLE_LR_FACTOR


#: Adafactor's floor under its relative step: torch's Adafactor moves a tensor by
#: max(eps2, RMS of the tensor) × lr × its normalised update, and its default eps2 of 1e-3 moves
#: a zero-initialised tensor (LoRA's B, the new variable's head and embedding) 1,000× less than
#: AdamW at the same learning rate, and a pretrained one of RMS 0.02 50× less. At 1, every tensor
#: of RMS up to 1 moves by lr × its normalised update, as under AdamW (whose first step is
#: lr × sign(gradient)): a sweep compares the two optimisers' memory, not their step sizes.
ADAFACTOR_STEP_FLOOR = 1.0


def new_optimiser(kind: str, params, *, lr: float, weight_decay: float = 0.0, **options):
    """AdamW or Adafactor (`kind`) over `params` (tensors or parameter groups), with steps of the
    same size at the same learning rate (`ADAFACTOR_STEP_FLOOR`)."""
    if kind == "adafactor":
        eps = (None, ADAFACTOR_STEP_FLOOR)
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay, eps=eps, **options)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **options)


def trial_optimiser(trial: TrialConfig, peft_model, model, parts: TrainableParts):
    """The trial's optimiser (AdamW or Adafactor) over the trained parameters, its schedule,
    and the parameters clipped.

    The target's head starts from zero and must learn the most: a larger step for it; its input
    embedding writes into Aurora's latent state: a step of its own (none: output-only).
    """
    embedding = model.get_parameter(input_embedding(model))
    head = [model.get_parameter(k) for k in parts.new_variable]
    head = [p for p in head if p is not embedding]
    new_ids = {id(p) for p in (*head, embedding)}
    rest = [p for p in peft_model.parameters() if p.requires_grad and id(p) not in new_ids]
    groups = [{"params": rest}, {"params": head, "lr": new_variable_lr(trial)}]
    if embedding.requires_grad:
        groups.append({"params": [embedding], "lr": input_lr(trial)})
    optimiser = new_optimiser(
        trial.optimizer, groups, lr=trial.learning_rate, weight_decay=trial.weight_decay
    )
    # LambdaLR calls the factor once at construction (step 0), then after each step
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda k: learning_rate_factor(k + 1, trial.steps)
    )
    return optimiser, schedule, [p for group in groups for p in group["params"]]
