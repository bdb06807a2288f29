"""Predict a trial's peak GPU memory before it trains, enforce the cap, measure after.

A study runs each trial inside a GPU memory cap. Training a config that cannot fit wastes minutes
and, recorded as FAILED, gets proposed again by the sampler; so the study asks `estimate_peak`
first and records a config over the cap as infeasible without running it.

The peak of one training step is the sum of its parts:

- weights: every parameter, fp32 (Aurora's autocast keeps parameters in fp32);
- gradients and optimizer: fp32 gradients and AdamW's two fp32 moments per trainable parameter
  (Adafactor: a row and a column of second moments per trained matrix);
- activations: tensors autograd saves for backward during the forward pass, on the gradient's
  path only. When tp's input patch embedding trains, the path starts in the encoder and runs
  through every block, whatever is frozen: each keeps what it needs to pass gradients to its
  input. With tp output-only (`target_input_lr = 0`) it starts at the first block that trains
  (LoRA: the first block; `blocks`: the last N; `head`: the decoder), and the encoder and the
  blocks before it save nothing. Frozen linears need only their weight to pass a gradient; a
  linear whose weight trains (LoRA on it, an unfrozen block, the decoder under `head`) also
  keeps its input. With bf16 autocast the backbone saves bf16 copies of its activations and of
  the weights of the blocks on the path. With activation checkpointing a forward keeps only
  module inputs; the peak comes in backward, when one checkpointed unit at a time is
  recomputed;
- optimizer step: on CUDA, the foreach step's temporaries, one fp32 value per trainable
  parameter, which matter only when they outgrow the (by then freed) activations, as in a full
  fine-tune (the CPU's per-tensor step has none worth counting);
- overhead: on CUDA, the cuBLAS workspace and the caching allocator's slack.

A trial on rollouts (`rollout_steps` > 1) runs its first steps without gradients
(`train.pushforward`), keeping no activations: its peak is that of one training step.

Parameters are counted on the meta device; activations come from per-token coefficients fitted
to exact saved-tensor measurements (`saved_tensor_bytes`, bench/calibrate_memory.py). A trial's
scoring has a peak of its own (`memory.scoring_peak`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from aurora_sweep.config.bases import BASES
from aurora_sweep.config.recipe import AURORA_CHECKPOINTING, AUTO_CHECKPOINTING, TrialConfig
from aurora_sweep.config.study import MIB
from aurora_sweep.config.targets import DEFAULT
from aurora_sweep.data import store
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.memory.meta_model import (
    LINEAR_INPUTS,
    Architecture,
    BlockShape,
    architecture,
    build_meta_model,
)
from aurora_sweep.model.aurora15 import STEP_HOURS

FP32 = 4
# the variables of a trial's batch, under Aurora's names
SURF_VARS = (*store.SURF_VARS, DEFAULT)  # Aurora's four and the target (any: one variable)
STATIC_VARS = tuple(store.AURORA_STATIC.values())
ATMOS_VARS = store.ATMOS_VARS

#: Bytes saved for backward per feature element, fitted by non-negative least squares to the
#: saved-tensor bytes of one forward pass (torch.autograd.graph.saved_tensors_hooks, distinct
#: storages, parameters excluded) of the demo model (32x64 and 64x128 crops) and of
#: AuroraSmallPretrained with random weights (32x64 and 64x64 crops), 2-4 levels, batch 1-2,
#: fp32 and bf16, every method, tp's input trained and output-only (CPU, torch 2.15,
#: microsoft-aurora 2.0.1; `python bench/calibrate_memory.py` re-measures and re-fits them, its
#: figures in bench/results/calibration-<date>.json). Features (per sample, see
#: `activation_features`), each counted only on the gradient's path:
#:   block: sum over Swin blocks of tokens x width; window: the same on window-padded tokens;
#:   trainable: inputs of linears whose weight trains; encoder_levels / decoder_levels: patches x
#:   pressure levels x width (the level perceivers, fp32); encoder_pixels / decoder_pixels: input
#:   grid values (fp32); decoder_trained: patches x (levels + latent levels) x width where the
#:   decoder's weights train (`head`, `full`; their linears keep their inputs); encoder_trained:
#:   the same where the encoder's do (`full`).
ACTIVATION_COEFFS: dict[str, dict[str, float]] = {
    "fp32": {
        "block": 30.723,
        "window": 12.268,
        "trainable": 3.918,
        "encoder_levels": 0.0,
        "encoder_pixels": 5.418,
        "decoder_levels": 68.902,
        "decoder_pixels": 1.592,
        "decoder_trained": 22.545,
        "encoder_trained": 54.444,
    },
    "bf16": {"block": 19.941, "window": 0.0, "trainable": 2.407},
}
#: The features outside the backbone, run in fp32 whatever the trial's precision.
OUTER_FEATURES = (
    "encoder_levels", "encoder_pixels", "decoder_levels", "decoder_pixels",
    "decoder_trained", "encoder_trained",
)  # fmt: skip
#: DoRA saves more for backward than LoRA (the base output and the low-rank update, for its
#: magnitude scaling): bytes per window-padded token per output feature of each DoRA-wrapped
#: linear. Fitted on the CPU in fp32 (bench/bench_memory.py, reduced AuroraSmallPretrained input,
#: r8 qkv+proj: peak 591 MiB against LoRA's 526); the same is assumed under bf16 (unmeasured).
DORA_SAVED_BYTES = 8.1
#: cuBLAS/cuDNN workspaces that the caching allocator holds during a step (not yet measured on
#: a GPU here: a conservative allowance).
CUDA_WORKSPACE_BYTES = 64 * MIB
#: Reserved-over-allocated slack of the CUDA caching allocator, as a fraction of the rest.
CUDA_ALLOCATOR_SLACK = 0.10


@dataclass(frozen=True)
class MemoryEstimate:
    """A predicted peak, in bytes, and the parts it adds up from."""

    total_bytes: int
    parts: dict[str, int]
    #: "traced" (`trace`: the trial's step run on fake tensors) or "fitted" (the coefficients
    #: below); `note` says why a trace fell back to the fit
    method: str = "fitted"
    note: str = ""

    @property
    def megabytes(self) -> float:
        return self.total_bytes / MIB


def block_features(block: BlockShape) -> dict[str, float]:
    """Per-sample feature elements of one block (see ACTIVATION_COEFFS); zero off the path."""
    if not block.on_path:
        return dict.fromkeys(("block", "window", "trainable"), 0.0)
    trainable = sum(
        (block.padded_tokens if padded else block.tokens) * block.width * mult
        for name, (mult, padded) in LINEAR_INPUTS.items()
        if name in block.trainable
    )
    # LoRA's A output (rank wide) is saved as B's input
    trainable += block.padded_tokens * block.lora_rank
    return {
        "block": block.tokens * block.width,
        "window": block.padded_tokens * block.width,
        "trainable": trainable,
    }


def outer_features(arch: Architecture, *, grid: tuple[int, int], levels: int) -> dict[str, float]:
    """Per-sample feature elements of the encoder and decoder around the backbone: the decoder
    is always on the gradient's path, the encoder only where tp's input or its weights train."""
    patches = (grid[0] // arch.patch_size) * (grid[1] // arch.patch_size)
    pixels = (grid[0] - grid[0] % arch.patch_size) * grid[1]
    level_tokens = patches * levels * arch.embed_dim
    values = pixels * (len(SURF_VARS) + len(STATIC_VARS) + levels * len(ATMOS_VARS))
    trained = patches * (levels + arch.latent_levels) * arch.embed_dim
    encoder = arch.input_trains or arch.encoder_trains
    return {
        "encoder_levels": level_tokens if encoder else 0.0,
        "encoder_pixels": values if encoder else 0.0,
        "decoder_levels": level_tokens,
        "decoder_pixels": values,
        "decoder_trained": trained if arch.decoder_trains else 0.0,
        "encoder_trained": trained if arch.encoder_trains else 0.0,
    }


def activation_features(
    arch: Architecture, *, grid: tuple[int, int], levels: int
) -> dict[str, float]:
    """Per-sample feature elements of a whole forward pass, summed over blocks."""
    total = dict.fromkeys(("block", "window", "trainable"), 0.0)
    for block in arch.blocks:
        for k, v in block_features(block).items():
            total[k] += v
    return total | outer_features(arch, grid=grid, levels=levels)


def _dot(features: dict[str, float], coeffs: dict[str, float]) -> float:
    return sum(coeffs[k] * v for k, v in features.items())


def autocast_weight_bytes(arch: Architecture) -> int:
    """The bf16 copies of backbone weights that autocast saves for backward: those on the
    gradient's path, in proportion to the blocks' weights."""
    on = sum(b.params for b in arch.blocks if b.on_path)
    # the patch merging between stages is on the path where the blocks around it are
    return int(2 * arch.params.backbone * on / sum(b.params for b in arch.blocks))


def activation_bytes(
    arch: Architecture,
    *,
    grid: tuple[int, int],
    levels: int,
    batch_size: int,
    precision: str,
    checkpointing: bool,
    coeffs: dict[str, dict[str, float]] | None = None,
) -> int:
    """Activation bytes held at the step's peak (see the module docstring).

    Without checkpointing: everything saved in the forward pass on the gradient's path, plus
    bf16 copies of those blocks' weights under autocast. With Aurora's checkpointing (encoder,
    backbone, its layers and blocks, decoder all wrapped): the input of every backbone block on
    the path stays while one block, or the encoder or decoder, is recomputed with its full
    activations.
    """
    per_block, outside = _unit_bytes(
        arch, grid=grid, levels=levels, precision=precision, coeffs=coeffs
    )
    path = [b for b in arch.blocks if b.on_path]
    bf16 = precision != "fp32"
    if not checkpointing:
        weight_copies = autocast_weight_bytes(arch) if bf16 else 0
        return int(batch_size * (sum(per_block) + outside) + weight_copies)
    # block inputs live in the fp32 residual stream; only the block being recomputed keeps the
    # bf16 copies of its weights
    inputs = [FP32 * b.tokens * b.width for b in path]
    largest_recompute = max([*per_block, outside])
    weight_copies = 2 * max((b.params for b in path), default=0) if bf16 else 0
    return int(batch_size * (sum(inputs) + largest_recompute) + weight_copies)


def _unit_bytes(
    arch: Architecture, *, grid: tuple[int, int], levels: int, precision: str, coeffs=None
) -> tuple[list[float], float]:
    """Per sample, what each block on the gradient's path saves for backward; the outer units'."""
    coeffs = coeffs or ACTIVATION_COEFFS
    inner = coeffs["fp32" if precision == "fp32" else "bf16"]
    per_block = [
        _dot(block_features(b), inner) + DORA_SAVED_BYTES * b.padded_tokens * b.dora_width
        for b in arch.blocks
        if b.on_path
    ]
    return per_block, _dot(outer_features(arch, grid=grid, levels=levels), coeffs["fp32"])


def largest_unit_bytes(
    arch: Architecture, *, grid: tuple[int, int], levels: int, precision: str
) -> float:
    """Per sample, the most one unit (a block; the encoder and decoder) saves for backward: what
    checkpointing recomputes at a time, and a bound on a gradient-free forward's working set."""
    per_block, outside = _unit_bytes(arch, grid=grid, levels=levels, precision=precision)
    return max([*per_block, outside])


def state_bytes(params, optimizer: str) -> dict[str, int]:
    """What a trial keeps alive between steps: its weights, gradients and optimiser state (AdamW:
    two fp32 moments per trained value; Adafactor: its factored second moments)."""
    moments = 2 * params.trainable if optimizer == "adamw" else params.factored
    return {
        "weights": FP32 * params.total,
        "gradients": FP32 * params.trainable,
        "optimizer": FP32 * moments,
    }


def input_bytes(*, grid: tuple[int, int], levels: int, batch_size: int) -> int:
    """The batch on the device: two history steps of every variable, fp32."""
    per_step = len(SURF_VARS) + levels * len(ATMOS_VARS)
    return FP32 * grid[0] * grid[1] * (batch_size * 2 * per_step + len(STATIC_VARS))


def estimate_from_architecture(
    arch: Architecture,
    *,
    grid: tuple[int, int],
    levels: int,
    batch_size: int,
    precision: str,
    checkpointing: bool,
    device: str = "cuda",
    optimizer: str = "adamw",
    note: str = "",
    passes: int = 1,
) -> MemoryEstimate:
    """`estimate_peak` for an architecture already read (reuse it across a grid of configs);
    `passes`: forward passes a sample takes in one step (Aurora 1.5's six hours, stacked along
    the batch: six times the activations)."""
    p = arch.params
    parts = {
        **state_bytes(p, optimizer),
        "inputs": input_bytes(grid=grid, levels=levels, batch_size=batch_size),
        "activations": activation_bytes(
            arch,
            grid=grid,
            levels=levels,
            batch_size=batch_size * passes,
            precision=precision,
            checkpointing=checkpointing,
        ),
    }
    # on CUDA the optimiser's foreach step (its default there) allocates about one fp32
    # temporary per trainable parameter after backward has freed the activations: it raises the
    # peak only where it is larger than them (a full fine-tune; the traced step on fake CUDA
    # shows it). The CPU's per-tensor loop allocates one tensor's worth at a time
    cuda = device.startswith("cuda")
    parts["optimizer_step"] = max(0, FP32 * p.trainable - parts["activations"]) if cuda else 0
    return _with_overhead(parts, device, method="fitted", note=note)


def _with_overhead(parts: dict[str, int], device: str, *, method: str, note: str = ""):
    """The estimate of tensor bytes `parts`, with the CUDA workspace and allocator slack."""
    parts = dict(parts)
    overhead = 0
    if device.startswith("cuda"):
        overhead = CUDA_WORKSPACE_BYTES + int(CUDA_ALLOCATOR_SLACK * sum(parts.values()))
    parts["overhead"] = overhead
    return MemoryEstimate(sum(parts.values()), parts, method=method, note=note)


def estimate_peak(
    trial: TrialConfig,
    *,
    grid: tuple[int, int],
    levels: int,
    device: str = "cuda",
    how: str = "fitted",
) -> MemoryEstimate:
    """Predicted peak memory of one training step of `trial` on `grid` with `levels` levels.

    Args:
        trial: the trial's configuration (base, LoRA, freezing, batch size, precision,
            checkpointing, tile, accumulation, optimiser).
        grid: (lat, lon) points of a sample before Aurora's patch crop.
        levels: number of pressure levels.
        device: "cuda" adds the CUDA workspace and allocator slack; "cpu" does not.
        how: "traced" runs the step on fake tensors (`trace`: exact for any base and recipe,
            seconds per structure), falling back to the fit where the trace fails; "fitted"
            adds up the coefficients (milliseconds).
    """
    if grid[1] % 4 or grid[0] % 4 > 1:
        raise AuroraSweepError(
            f"grid {grid[0]}x{grid[1]}: Aurora needs a width that is a multiple of 4 and a height "
            "that is a multiple of 4 or one more; crop the region first"
        )
    if trial.tile:  # a step sees the tile only (`tiles`)
        from aurora_sweep.train.tiles import tile_side

        grid = tile_side(trial.tile, grid)
    note = ""
    if how == "traced":
        from aurora_sweep.memory.traced import TraceFailed, traced_peak

        try:
            traced = traced_peak(trial, grid=grid, levels=levels, device=device)
            return _with_overhead(traced.parts, device, method="traced")
        except TraceFailed as e:
            note = f"the trace failed ({e}); fitted instead"
    return estimate_from_architecture(
        trial_architecture(trial, grid),
        grid=grid,
        levels=levels,
        batch_size=trial.batch_size,
        precision=trial.precision,
        checkpointing=bool(trial.checkpointed),  # the fit knows Aurora's whole set only
        device=device,
        optimizer=trial.optimizer,
        note=note,
        passes=STEP_HOURS if BASES[trial.base].own_precipitation else 1,
    )


def trial_architecture(trial: TrialConfig, grid: tuple[int, int]) -> Architecture:
    """`architecture` of `trial`'s model on `grid` (shared by every trial of its structure)."""
    shape = (trial.base, trial.lora_rank, trial.lora_targets, trial.unfrozen_blocks)
    return _architecture(*shape, grid, trial.method, trial.target_input_lr > 0, trial.arch)


@functools.lru_cache(maxsize=128)
def _architecture(
    base: str,
    lora_rank: int,
    lora_targets: str,
    unfrozen_blocks: int,
    grid: tuple[int, int],
    method: str = "lora",
    train_input: bool = True,
    arch: tuple = (),
) -> Architecture:
    """`architecture` of a trial's model: the same for every trial with the same structure, so a
    sweep builds each structure on the meta device once."""
    shape = TrialConfig(
        lora_rank=lora_rank,
        lora_targets=lora_targets,
        unfrozen_blocks=unfrozen_blocks,
        batch_size=1,
        precision="fp32",
        learning_rate=0.0,
        activation_checkpointing=False,
        base=base,
        arch=arch,
        levels=(),
        steps=1,
        eval_every=1,
        val_samples=0,
        weight_decay=0.0,
        seed=0,
        method=method,
        target_input_lr=1.0 if train_input else 0.0,
    )
    return architecture(build_meta_model(shape), grid=grid)


def plan_checkpointing(
    trial: TrialConfig,
    *,
    grid: tuple[int, int],
    levels: int,
    cap_bytes: int | None,
    how: str = "fitted",
    device: str = "cuda",
) -> tuple[TrialConfig, MemoryEstimate]:
    """`trial` with "auto" checkpointing made concrete, and its estimate; any other trial as it
    is, with its estimate.

    "auto" takes the first set of `AUTO_CHECKPOINTING` (least recomputation first) whose
    estimate fits the cap: none without a cap. When none fits, Aurora's whole set, the least
    memory, which the cap then refuses. The fitted estimate knows only no checkpointing and
    Aurora's whole set, so only a traced one chooses the sets between them.
    """
    if trial.activation_checkpointing != "auto":
        return trial, estimate_peak(trial, grid=grid, levels=levels, device=device, how=how)
    candidates = AUTO_CHECKPOINTING if how == "traced" else ((), AURORA_CHECKPOINTING)
    for modules in candidates:
        planned = dataclasses.replace(
            trial, activation_checkpointing=bool(modules), checkpoint_modules=modules
        )
        estimate = estimate_peak(planned, grid=grid, levels=levels, device=device, how=how)
        if cap_bytes is None or estimate.total_bytes <= cap_bytes:
            break
    return planned, estimate


def check_cap(estimate: MemoryEstimate, cap_bytes: int | None) -> float:
    """Megabytes (MiB) by which `estimate` exceeds the cap; 0 when it fits or there is no cap
    (a study hands this to Optuna as the constraint value: > 0 means infeasible)."""
    if cap_bytes is None:
        return 0.0
    return max(0.0, (estimate.total_bytes - cap_bytes) / MIB)


def cuda_memory_fraction(cap_bytes: int, device_total_bytes: int) -> float:
    """The fraction for `torch.cuda.set_per_process_memory_fraction` that enforces the cap (the
    CUDA context, a few hundred MiB, lives outside the allocator and outside this fraction)."""
    if cap_bytes <= 0:
        raise AuroraSweepError(f"gpu_memory_cap = {cap_bytes} bytes: give a positive size")
    if cap_bytes > device_total_bytes:
        raise AuroraSweepError(
            f"gpu_memory_cap is {cap_bytes / 2**30:.1f} GiB but this GPU has "
            f"{device_total_bytes / 2**30:.1f} GiB: lower [resources] gpu_memory_cap or use a "
            "larger GPU"
        )
    return cap_bytes / device_total_bytes


@contextmanager
def saved_tensor_bytes(model: torch.nn.Module) -> Iterator[dict[str, int]]:
    """Count the bytes autograd saves for backward inside the block (activation memory).

    Distinct storages only (a tensor and its views count once), parameters and buffers excluded
    (they are weights). Exact and device-independent: the same tensors are saved on a GPU.

        with saved_tensor_bytes(model) as saved:
            model(batch)
        saved["bytes"]
    """
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}
    result = {"bytes": 0}

    def pack(t: torch.Tensor) -> Any:
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["bytes"] = sum(storages.values())


def cpu_live_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of live CPU tensor memory while `fn()` runs, over what was alive before (torch
    profiler memory events): every allocation torch makes (activations, recomputation under
    checkpointing, gradients, temporaries) and every free, in order; the CPU analogue of
    `torch.cuda.max_memory_allocated` minus what was allocated before."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak
