"""The Aurora models a study can adapt, and where each one's weights come from.

Which base fits a small GPU is itself a question the sweep answers (`[search] base`), so each base
is a row of data, not a branch of code: the microsoft-aurora class that builds it, the constructor
arguments aurora-sweep adds, and the pinned Hugging Face file of its pretrained weights. A leaf
module: the config, the search space and the memory estimate read it without importing torch.

- `demo`: a tiny Aurora pretrained on the embedded demo world before 2022 (packaged with
  aurora-sweep, so the pipeline runs anywhere).
- `small-pretrained`: AuroraSmallPretrained (about 113 M parameters, embed_dim 256), which
  microsoft/aurora documents as meant for debugging.
- `pretrained`: AuroraPretrained, the 1.3 B-parameter model of the paper (embed_dim 512, encoder
  depths 6/10/8) with the same variables as the small one.
- `v1.5`: Aurora 1.5 (AuroraV1p5, 1.3 B parameters, 26 surface variables), which predicts hourly
  precipitation itself: a trial adapts that output (`own_precipitation`), summed over a step's
  hours (`hourly.SixHourAurora15`), instead of adding a 6-hour tp. It reads 14 more surface
  variables and 36 static fields, so a study with it imports them (`DataConfig.v15_inputs`).

A base is built with its own constructor defaults, then `arch` overrides from the study
(`[model.arch.<base>]`): a test or a quick pipeline check can run a base's class at reduced width
from a checkpoint written for that width.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

#: Where microsoft/aurora publishes its checkpoints.
HF_REPO = "microsoft/aurora"


@dataclass(frozen=True)
class Base:
    """One base model a study can fine-tune."""

    name: str
    #: the class in the `aurora` package that builds it
    aurora_class: str
    #: its pretrained weights on Hugging Face (`HF_REPO`) and the revision pinned; None: packaged
    checkpoint_name: str | None
    revision: str | None
    #: constructor arguments aurora-sweep sets beyond the class's own defaults
    arch: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    #: the base's own hourly precipitation output, which a trial adapts (summed over a step's
    #: hours); None: the base has none, and a trial adds tp as a new variable
    own_precipitation: str | None = None
    #: the first day after the data it was trained on (a split before it scores data the base
    #: has learnt); None: not published
    training_ends: dt.date | None = dt.date(2022, 1, 1)


BASES: dict[str, Base] = {
    "demo": Base(
        "demo", "Aurora", None, None,
        arch=dict(
            encoder_depths=(1, 2, 1), decoder_depths=(1, 2, 1), encoder_num_heads=(2, 4, 8),
            decoder_num_heads=(8, 4, 2), embed_dim=48, num_heads=4, latent_levels=4,
            # four latent levels under a window two levels deep, as in AuroraSmallPretrained:
            # with one window across all latent levels, the partition fails on some grids
            window_size=(2, 4, 8),
        ),
        summary="a tiny Aurora pretrained on the demo world (packaged)",
    ),
    "small-pretrained": Base(
        "small-pretrained", "AuroraSmallPretrained", "aurora-0.25-small-pretrained.ckpt",
        "0be7e57c685dac86b78c4a19a3ab149d13c6a3dd",
        summary="AuroraSmallPretrained, about 113 M parameters",
    ),
    "pretrained": Base(
        "pretrained", "AuroraPretrained", "aurora-0.25-pretrained.ckpt",
        "0be7e57c685dac86b78c4a19a3ab149d13c6a3dd",
        summary="AuroraPretrained, the paper's 1.3 B-parameter model",
    ),
    "v1.5": Base(
        "v1.5", "AuroraV1p5", "aurora-0.25-v1.5.ckpt", "a96afd7ee6d65e3bd2d476f3be798a25a56f2296",
        summary="Aurora 1.5, 1.3 B parameters, 26 surface variables with hourly precipitation",
        own_precipitation="scaled_tp_1h",
        # microsoft/aurora's docs say it was fine-tuned on IFS analyses, not over which years
        training_ends=None,
    ),
}  # fmt: skip


#: Models a study runs as they are, beside the bases it adapts: Aurora 1.5, whose own hourly
#: precipitation untrained is the `[study] baselines` "aurora-1.5" (`aurora15.py`). Their
#: checkpoints and constructor overrides are given as a base's are ([model.checkpoints],
#: [model.arch.<name>]).
BASELINE_MODELS: dict[str, Base] = {"v1.5": BASES["v1.5"]}


def reads_v15_inputs(base: str) -> bool:
    """Whether `base` reads Aurora 1.5's inputs (its extra surface variables and statics)."""
    return BASES[base].own_precipitation is not None


def arch_overrides(values: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Constructor overrides as a sorted, hashable tuple (TOML lists become tuples), the form
    `TrialConfig.arch` keeps."""
    return tuple(
        sorted((k, tuple(v) if isinstance(v, list | tuple) else v) for k, v in values.items())
    )


def target_description(base: str, target: str) -> str:
    """What a fine-tune of `base` adapts to predict `target` (a name of `targets.TARGETS`), in
    a sentence (report and model card)."""
    own = BASES[base].own_precipitation
    if own:
        combined = "mean of its six hours (mm h-1)" if target == "pr" else "sum of its six hours"
        return (
            f"The fine-tune adapts the base's own hourly precipitation ({own}, output-only): "
            f"{target} is the {combined} after each input time; no new variable was added."
        )
    return (
        f"{target} is a new output variable of the base: its patch embedding and decoder head "
        "were added and trained from zero (the head's bias at the train-split mean)."
    )
