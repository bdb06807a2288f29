"""Shared by the memory benchmarks: build a trial's model with random weights, run steps.

No pretrained checkpoint is needed to measure memory: which tensors are saved, and their sizes,
do not depend on the weights' values (a randomly initialised Aurora has zero adaLN modulation,
which changes values, not shapes).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from aurora_sweep.config.recipe import TrialConfig
from aurora_sweep.memory.estimate import cpu_live_peak_bytes  # noqa: F401 - the benches' import
from aurora_sweep.model.build import apply_method, build_base, init_new_variable, set_precision

EUROPE_GRID = (149, 208)
EUROPE_LEVELS = (250, 500, 700, 850)


def trial_config(**changes: object) -> TrialConfig:
    """A trial config with benchmark defaults; `changes` override fields."""
    base = TrialConfig(
        lora_rank=8,
        lora_targets="qkv+proj",
        unfrozen_blocks=0,
        batch_size=1,
        precision="fp32",
        learning_rate=1e-4,
        activation_checkpointing=False,
        base="demo",
        levels=EUROPE_LEVELS,
        steps=1,
        eval_every=1,
        val_samples=1,
        weight_decay=0.0,
        seed=0,
    )
    return dataclasses.replace(base, **changes)


def build_random_trial_model(trial: TrialConfig):
    """`train.build_trial_model` without a checkpoint: random weights, same modules.

    Every method (`trial.method`: the LoRA variants, head, blocks, full) is made trainable by
    `model.apply_method`, as a trial does; `full` is Aurora's reference fine-tuning recipe (no
    LoRA, every parameter trains) when `trial` also asks for bf16 and checkpointing, as
    `study.reference_trial` does. Returns (the module to train: a peft wrapper for the LoRA
    methods, the Aurora model otherwise; the Aurora model).
    """
    torch.manual_seed(trial.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_base(trial.base, stats=(0.0, 1.0), arch=trial.arch)
    init_new_variable(model)
    trained, _ = apply_method(
        model, method=trial.method, rank=trial.lora_rank, targets=trial.lora_targets,
        unfrozen_blocks=trial.unfrozen_blocks, train_input=trial.target_input_lr > 0,
    )  # fmt: skip
    set_precision(model, trial.precision)
    if trial.checkpointed:
        model.configure_activation_checkpointing(trial.checkpointed)
    return trained, model
