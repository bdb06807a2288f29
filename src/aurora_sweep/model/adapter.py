"""A fine-tuned trial as a directory anyone can load: adapter, other weights, stats, card.

Layout of an adapter directory:

- `adapter_config.json`, `adapter_model.safetensors`: the peft adapter (LoRA, rsLoRA or DoRA),
  loadable with `peft.PeftModel.from_pretrained` onto the base model built from
  `aurora_sweep.json`; absent for the methods without LoRA (`head`, `blocks`, `full`);
- `trained_weights.safetensors`: what peft does not hold: the target's patch embedding and decoder head
  (Aurora keeps them in a ParameterDict), any fully trained backbone blocks, and the decoder
  (`head`) or every weight (`full`); load it with `load_state_dict(..., strict=False)`;
- `aurora_sweep.json`: the trial's config, the target and its normalisation, the base checkpoint's name and
  sha256, the data region/levels/splits, the trial's metrics and loss curves;
- `study.toml`: the study config the trial ran under (for `evaluate`);
- `README.md`: a model card (written by `export_best`).

`load_finetuned(path)` rebuilds the model from these files; `read_meta` reads `aurora_sweep.json`
(an `AdapterMeta`), and `open_adapter` opens the directory for `evaluate`, `report` and
`forecast`: its metadata, its study config and the device, the model loaded when asked.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from aurora_sweep.config.bases import target_description
from aurora_sweep.config.recipe import TrialConfig
from aurora_sweep.config.study import StudyConfig
from aurora_sweep.config.study_file import load_config
from aurora_sweep.config.targets import DEFAULT, TARGETS
from aurora_sweep.data.samples import TargetStats
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.model.build import (
    LORA_METHODS,
    WRAPPED,
    TrainableParts,
    build_base,
    load_base_checkpoint,
    set_longitude_wrap,
    set_precision,
    unwrap,
)
from aurora_sweep.model.files import (
    file_sha256,
    is_model_uri,
    local_adapter,
    resolve_checkpoint,
)

META = "aurora_sweep.json"
WEIGHTS = "trained_weights.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"


def adapter_tensors(model, adapter: str = "default") -> dict:
    """The LoRA tensors of a peft model, keyed as peft saves them (adapter name dropped)."""
    return {
        k.replace(WRAPPED, "").replace(f".{adapter}.", "."): v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if "lora_" in k
    }


def save_adapter(
    directory: Path,
    *,
    model,
    parts: TrainableParts,
    trial: TrialConfig,
    stats: TargetStats,
    checkpoint: Path,
    study_config: Path,
    metrics: dict[str, float],
    history: dict[str, list] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a trial's adapter directory (`history`: its loss curves, for the report)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if trial.method in LORA_METHODS:
        model.save_pretrained(directory)
        # peft picks the adapter's tensors by the module names of its layers, which activation
        # checkpointing prefixes with `_checkpoint_wrapped_module.` (state_dict keys keep the
        # plain names): it then finds none and writes an empty adapter. Write them ourselves.
        save_file(adapter_tensors(model), directory / ADAPTER_FILE, metadata={"format": "pt"})
    named = {k.replace(WRAPPED, ""): p for k, p in unwrap(model).named_parameters()}
    weights = {k: named[k].detach().float().cpu().contiguous() for k in parts.saved_outside_adapter}
    save_file(weights, directory / WEIGHTS)
    shutil.copyfile(study_config, directory / "study.toml")
    meta = {
        "trial": trial.to_dict(),
        "target_stats": {
            "target": stats.target,
            "location": stats.location,
            "scale": stats.scale,
            "mean": stats.mean,
            "units": TARGETS[stats.target].units,
        },
        "base": {
            "name": trial.base,
            "checkpoint": checkpoint.name,
            "sha256": file_sha256(checkpoint),
        },
        "metrics": metrics,
        "history": history or {},
        **(extra or {}),
    }
    (directory / META).write_text(json.dumps(meta, indent=2, default=str))
    return directory


@dataclass(frozen=True)
class BaseCheckpoint:
    """The base checkpoint an adapter was trained on."""

    name: str  # the base (`bases.BASES`)
    checkpoint: str  # the file's name
    sha256: str


@dataclass(frozen=True)
class AdapterMeta:
    """An adapter's `aurora_sweep.json`, read once (`read_meta`)."""

    trial: TrialConfig
    #: the target and its normalisation the adapter was trained with
    stats: TargetStats
    base: BaseCheckpoint
    #: the trial's validation scores
    metrics: dict[str, float]
    #: the study's data: region, grid and the splits (empty when the adapter does not say)
    data: dict[str, Any]
    #: the loss curves (`train_loss`, `val_loss`; empty when the adapter does not carry them)
    history: dict[str, list]
    #: the study's objective (the target's RMSE for an adapter written before objectives)
    objective: str
    #: how the trial compares with the study's reference recipes (`export_best`)
    references: tuple[str, ...] = ()
    #: the study's finalists, ranked by their mean over seeds (`best`'s lines), if it had any
    finalists: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, meta: dict[str, Any]) -> AdapterMeta:
        stats = _stats(meta)
        return cls(
            trial=TrialConfig.from_dict(meta["trial"]),
            stats=stats,
            base=BaseCheckpoint(**{k: meta["base"][k] for k in ("name", "checkpoint", "sha256")}),
            metrics=meta.get("metrics", {}),
            data=meta.get("data", {}),
            history=meta.get("history") or {},
            objective=meta.get("objective", TARGETS[stats.target].metric("rmse")),
            references=tuple(meta.get("references") or ()),
            finalists=tuple(meta.get("finalists") or ()),
        )


def _stats(meta: dict[str, Any]) -> TargetStats:
    """The target and its normalisation an adapter was trained with (an adapter written before
    targets other than tp keeps them under `tp_stats`)."""
    saved = meta.get("target_stats") or {**meta["tp_stats"], "target": DEFAULT}
    return TargetStats(
        **{k: saved[k] for k in ("location", "scale", "mean", "target") if k in saved}
    )


def _read_json(directory: Path) -> dict[str, Any]:
    path = Path(directory) / META
    if not path.is_file():
        raise AuroraSweepError(f"{directory} is not an aurora-sweep adapter (no {META})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AuroraSweepError(f"{path} is damaged ({e}); export the adapter again") from None


def read_meta(directory: Path) -> AdapterMeta:
    """The metadata of the adapter in `directory`; refused in one line when there is none."""
    return AdapterMeta.from_dict(_read_json(directory))


def write_references(
    directory: Path, references: list[str], finalists: list[str] | tuple[str, ...] = ()
) -> None:
    """Record in the adapter's metadata how its trial compares with the study's references,
    and what the study's finalists were (`report.finalists.finalist_lines`)."""
    path = Path(directory) / META
    meta = _read_json(directory)
    meta["references"] = references
    meta["finalists"] = list(finalists)
    path.write_text(json.dumps(meta, indent=2, default=str))


def base_checkpoint(meta: AdapterMeta, given: Path | None = None) -> Path:
    """The base checkpoint file the adapter was trained on: `given`, else the packaged demo or
    the Hugging Face cache's; refused when its sha256 is not the one the adapter records."""
    path = resolve_checkpoint(meta.trial.base, given)
    if file_sha256(path) != meta.base.sha256:
        raise AuroraSweepError(
            f"{path} is not the base checkpoint this adapter was trained on "
            f"(sha256 {meta.base.sha256[:12]}...); pass the right file with --checkpoint"
        )
    return path


def load_finetuned(
    directory: str | Path,
    *,
    checkpoint: Path | None = None,
    device: str = "cpu",
    tracking_uri: str | None = None,
):
    """The fine-tuned model from an adapter directory, in eval mode, ready to forecast.

    Args:
        directory: an adapter directory written by `aurora-sweep best --export`, or its
            registered version, `models:/<study>/<version>` (`report.registry`).
        checkpoint: the base checkpoint file, when it is not the packaged demo or in the
            Hugging Face cache. Its sha256 must match the one the adapter was trained on.
        tracking_uri: where a `models:/` URI is registered (default: MLflow's).
    """
    directory = local_adapter(directory, tracking_uri=tracking_uri)
    meta = read_meta(directory)
    return _load_model(directory, meta, base_checkpoint(meta, checkpoint), device)


def _load_model(directory: Path, meta: AdapterMeta, checkpoint: Path, device: str):
    """`load_finetuned` of the adapter in `directory` with its metadata read and its base
    checkpoint found."""
    from peft import PeftModel

    trial, stats = meta.trial, meta.stats
    # a forecast's target is clamped at 0 from the first step; the shifted windows as trained
    model = build_base(
        trial.base,
        target=stats.target,
        stats=(stats.location, stats.scale),
        clamp=True,
        arch=trial.arch,
    )
    load_base_checkpoint(model, checkpoint)
    set_longitude_wrap(model, trial.wrap_longitude)
    if trial.method in LORA_METHODS:
        peft_model = PeftModel.from_pretrained(model, directory)
        _check_lora(directory, peft_model)
    else:  # head, blocks, full: every trained tensor is in trained_weights
        peft_model = model
    weights = load_file(directory / WEIGHTS)
    result = unwrap(peft_model).load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise AuroraSweepError(
            f"{directory / WEIGHTS} has weights this model lacks: {result.unexpected_keys[:3]}"
        )
    set_precision(unwrap(peft_model), trial.precision)
    peft_model.to(device).eval()
    return peft_model


def _check_lora(directory: Path, peft_model) -> None:
    """Refuse an adapter file that holds fewer LoRA tensors than the model has."""
    lora = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    stored = load_file(directory / ADAPTER_FILE)
    if len(stored) != len(lora):
        raise AuroraSweepError(
            f"{directory / ADAPTER_FILE} holds {len(stored)} LoRA tensors but the model has "
            f"{len(lora)}: the adapter is incomplete; export it again"
        )


@dataclass(frozen=True)
class Adapter:
    """An exported adapter opened (`open_adapter`): its metadata, the study config its trial
    ran under and the device it runs on. Its model is loaded when asked (`load_model`), so that
    its caller may read the data first."""

    path: Path
    meta: AdapterMeta
    config: StudyConfig
    device: torch.device
    given_checkpoint: Path | None = None
    #: what the user named: the folder, or the `models:/` URI it was fetched from
    source: str = ""

    @cached_property
    def checkpoint(self) -> Path:
        """The base checkpoint it was trained on (`--checkpoint`, else found), its sha256 checked."""
        return base_checkpoint(self.meta, self.given_checkpoint)

    def load_model(self):
        """The fine-tuned model on the adapter's device, in eval mode (`load_finetuned`)."""
        return _load_model(self.path, self.meta, self.checkpoint, str(self.device))


def open_adapter(
    ref: str | Path, *, checkpoint: Path | None = None, tracking_uri: str | None = None
) -> Adapter:
    """The adapter in folder `ref` (or registered as `models:/<study>/<version>`) with its
    metadata and its study config (`study.toml`), to run on the default device; `checkpoint`:
    the base checkpoint file, when it is not found."""
    from aurora_sweep.devices import default_device

    directory = local_adapter(ref, tracking_uri=tracking_uri)
    meta = read_meta(directory)
    config = load_config(directory / "study.toml")
    source = str(ref) if is_model_uri(ref) else str(directory.resolve())
    return Adapter(directory, meta, config, default_device(), checkpoint, source)


MODEL_CARD = """\
# {name}: Aurora fine-tuned for {what} ({target})

Fine-tuned by aurora-sweep from the base model **{base}** (checkpoint `{ckpt}`, sha256 `{sha}`)
to forecast {target}, the {what}: {each} ({units}, CF `{standard}`, `{cell}`), 6 h after its last input
time, over the region {region} at {grid}° on pressure levels {levels} hPa. {adapted}

## Recipe (trial {number} of study `{study}`)

| setting | value |
| --- | --- |
{recipe}

## Validation skill ({val} split, latitude-weighted, {units})

| metric | value |
| --- | --- |
{metrics}

`{target}_skill_*` is 1 - objective/objective_reference ({objective}): above 0 beats the
reference. `*_q05`/`*_q95` bound the 90 % block-bootstrap interval. Persistence repeats the last
observed value over the lead; climatology is the train-split mean by grid point, calendar month
and time of day. `forget_<var>_ratio` is the fine-tuned model's RMSE over the base model's (> 1:
worse). `–`: undefined on these data (no event at a threshold; climatology's anomaly
correlation). For every score with its interval and the maps: `aurora-sweep report {dir}`.

## Data

Training {train}; validation {valp}; test {test} (the test split was not used in the search).
{target} normalisation from the training split: location {loc:.4f}, scale {scale:.4f} {units}.

## Use

```python
from aurora_sweep import load_finetuned
model = load_finetuned("{dir}")          # peft model around Aurora, eval mode
prediction = model(batch)               # aurora.Batch with 2t, 10u, 10v, msl, {target} inputs
values = prediction.surf_vars["{target}"]   # {units}
```

Or score it: `aurora-sweep evaluate {dir} --split test --json`; forecast NetCDF:
`aurora-sweep forecast {dir} --init ...`.

## Files

`adapter_config.json` + `adapter_model.safetensors` (peft LoRA), `trained_weights.safetensors`
({target} embedding and head, unfrozen blocks), `aurora_sweep.json` (config, stats, metrics, base
identity), `study.toml` (the study config).
"""


def write_model_card(directory: Path, *, study: str, number: int, note: str = "") -> Path:
    meta = read_meta(directory)
    trial, data, base, stats = meta.trial, meta.data, meta.base, meta.stats
    target = TARGETS[stats.target]
    card = MODEL_CARD.format(
        target=target.name,
        each=target.each_step,
        what=target.what,
        units=target.units,
        standard=target.standard_name,
        cell=target.cell_methods,
        name=Path(directory).name,
        base=base.name,
        ckpt=base.checkpoint,
        sha=base.sha256,
        region=data.get("region", "?"),
        grid=data.get("grid", "?"),
        levels=", ".join(map(str, trial.levels)),
        number=number,
        study=study,
        recipe="\n".join(f"| {k} | {v} |" for k, v in trial.to_dict().items()),
        val="validation",
        objective=meta.objective,
        metrics="\n".join(
            f"| {k} | {v:.4f} |" if math.isfinite(v) else f"| {k} | – |"
            for k, v in meta.metrics.items()
        ),
        train=data.get("train", "?"),
        valp=data.get("validation", "?"),
        test=data.get("test", "?"),
        loc=stats.location,
        scale=stats.scale,
        dir=Path(directory).name,
        adapted=target_description(base.name, target.name),
    )
    if any("_aurora15" in k for k in meta.metrics):
        card += (
            "\n## Against Aurora 1.5 untrained\n\n`*_aurora15` scores Aurora 1.5's own "
            "precipitation (its hourly `scaled_tp_1h` over the lead, no training) on the "
            f"same samples; `{target.metric('skill_aurora15')}` above 0 beats it. Aurora 1.5 "
            "was fine-tuned on IFS analyses and is started and scored here from ERA5, on this "
            "region as the trials run (its east and west edges joined only for a box round "
            "the globe), in its own precision.\n"
        )
    if note:
        card += f"\n## Seeds\n\n{note}\n"
    if meta.finalists:
        card += "\n## The study's finalists\n\n```\n" + "\n".join(meta.finalists) + "\n```\n"
    if meta.references:
        card += "\n## Against the study's reference recipes (validation split)\n\n" + "".join(
            f"- {line}\n" for line in meta.references
        )
    path = Path(directory) / "README.md"
    path.write_text(card)
    return path
